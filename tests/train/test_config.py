"""TrainConfig: validation names the field; resumption refuses a changed trajectory."""
import pytest

from jaxopt_llm.train.config import TrainConfig, check_resumable


@pytest.mark.parametrize("kwargs,name", [
    (dict(optimizer="nope"), "optimizer"),
    (dict(steps=10, warmup_steps=20), "warmup_steps"),
    (dict(lr=-1.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(d_model=64, n_head=3), "d_model"),
    (dict(shard="zero3"), "shard"),
    (dict(steps=0), "steps"),
    (dict(block_size=1), "block_size"),
    (dict(decay_type="exp"), "decay_type"),
    (dict(num_processes=2), "num_processes"),  # many processes need a shard mode
])
def test_train_config_rejects_bad_values(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    TrainConfig(**kwargs).validate()


def test_defaults_are_valid_and_resumption_ignores_only_logging_fields():
  cfg = TrainConfig()
  cfg.validate()
  assert cfg.peak_lr == 1e-2 and cfg.warmup == 60  # AdamW recipe, steps // 10
  check_resumable(cfg.to_dict(), TrainConfig(log_every=1, eval_every=7, process_id=0))
  with pytest.raises(ValueError, match="d_model: None -> 32"):
    check_resumable(cfg.to_dict(), TrainConfig(d_model=32))


def test_save_every_defaults_to_ten_checkpoints_a_run():
  assert TrainConfig(steps=600).resolved_save_every() == 60
  assert TrainConfig(steps=6).resolved_save_every() == 1
  assert TrainConfig(steps=600, save_every=0).resolved_save_every() == 0  # only at the end
  with pytest.raises(ValueError, match="`save_every`"):
    TrainConfig(save_every=-1).validate()


def test_resume_may_change_the_schedule_only_where_the_past_stays_the_same():
  def check(before, after, done):
    check_resumable(TrainConfig(**before).to_dict(), TrainConfig(**after), done)

  # constant: any number of steps; wsd: more steps in the stable phase, with the same warmup
  check(dict(schedule="constant", steps=100), dict(schedule="constant", steps=500), 100)
  wsd = dict(schedule="wsd", warmup_steps=10)
  # wsd over 100 steps decays from step 80 on (lr(80) is still the peak)
  check(dict(wsd, steps=100), dict(wsd, steps=300), 81)
  check(dict(wsd, steps=100), dict(wsd, steps=100, decay_type="cosine"), 81)  # new cooldown
  with pytest.raises(ValueError, match="changes the learning rate of the 82 steps"):
    check(dict(wsd, steps=100), dict(wsd, steps=300), 82)  # its decay had begun
  with pytest.raises(ValueError, match=r"warmup was 10 steps: give `warmup_steps` 10"):
    check(dict(schedule="wsd", steps=100), dict(schedule="wsd", steps=300), 50)
  with pytest.raises(ValueError, match="`steps` 100 -> 200 changes the learning rate"):
    check(dict(steps=100), dict(steps=200), 50)  # warmup_cosine: the whole curve moves
  with pytest.raises(ValueError, match=r"`steps` \(40\) is below the checkpoint's step 50"):
    check(dict(schedule="constant", steps=100), dict(schedule="constant", steps=40), 50)
  with pytest.raises(ValueError, match="different config"):  # not a schedule field
    check(dict(schedule="constant", steps=100), dict(schedule="constant", steps=200, clip=0.5),
          50)
  with pytest.raises(ValueError, match="different config"):  # without `done`: as before
    check(dict(schedule="constant", steps=100), dict(schedule="constant", steps=200), None)
