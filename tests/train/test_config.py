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
