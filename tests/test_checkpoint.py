"""Orbax checkpoints: a resumed run continues bit-exactly."""
import json
import os

import jax
import numpy as np
import pytest

from jaxopt_llm import optim
from jaxopt_llm.train import data, loop
from jaxopt_llm.train.checkpoint import Checkpointer

TINY = dict(n_layer=1, d_model=16, n_head=2, block_size=16, batch_size=4, eval_windows=4,
            sample_tokens=0, log_every=1)


def assert_trees_identical(a, b):
  """Same structure and bit-identical leaves (exact equality, NaNs included)."""
  la, ta = jax.tree_util.tree_flatten(jax.device_get(a))
  lb, tb = jax.tree_util.tree_flatten(jax.device_get(b))
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)
    assert x.tobytes() == y.tobytes()  # bit for bit (also -0.0 vs 0.0, NaN payloads)


def _resume_case(tmp_path, cfg, n):
  """2n optimizer steps straight vs n steps, save, restore into fresh objects, n steps."""
  train_ids, _ = data.train_val_split(data.encode(data.load_corpus()))
  micro = n * cfg.accum

  prog = loop.build_program(cfg)
  it = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  straight = prog.init(cfg.seed)
  for _ in range(2 * micro):
    straight, _ = prog.step(straight, next(it))

  it = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  state = prog.init(cfg.seed)
  for _ in range(micro):
    state, _ = prog.step(state, next(it))
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  saved_at = ckpt.save(state, {"data": it.state(), "config": cfg.to_dict()})
  assert saved_at == micro
  saved = jax.device_get(state)
  ckpt.close()

  # Fresh model, optimizer, compiled step and iterator, initialised with another seed so
  # that nothing can come from the old objects; the program cache is bypassed on purpose.
  fresh = loop._build_program.__wrapped__(
      tuple(sorted((k, v) for k, v in cfg.to_dict().items()
                   if k not in loop._NOT_IN_PROGRAM)))
  assert fresh.step is not prog.step
  target = fresh.init(cfg.seed + 1)
  restored, extra = Checkpointer(str(tmp_path / "ckpt")).restore(target)
  assert_trees_identical(restored, saved)
  assert extra["config"] == cfg.to_dict()
  it2 = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  it2.restore(extra["data"])
  for _ in range(micro):
    restored, _ = fresh.step(restored, next(it2))
  assert_trees_identical(restored, straight)
  return straight


def test_resume_is_bit_exact_adamw(tmp_path):
  cfg = loop.TrainConfig(**TINY, optimizer="adamw", steps=6)  # as in the test below
  final = _resume_case(tmp_path, cfg, n=3)
  assert int(final.step) == 6


@pytest.mark.skipif(not hasattr(optim, "sophia"), reason="Sophia not in this version")
def test_resume_is_bit_exact_sophia_with_accumulation(tmp_path):
  # Everything a run carries: MultiSteps accumulators mid-way, Sophia's Hessian EMA, the
  # RNG key for its sampled labels, the spike guard's window.
  cfg = loop.TrainConfig(**TINY, optimizer="sophia", steps=10, accum=2, hessian_every=2)
  final = _resume_case(tmp_path, cfg, n=3)
  assert int(final.opt_step) == 6 and int(final.guard.count) == 12


def test_train_stop_and_resume_equals_one_run(tmp_path):
  cfg = loop.TrainConfig(**TINY, steps=6, eval_every=2)
  straight = loop.train(cfg, out_dir=str(tmp_path / "a"), progress=False, log=lambda s: None)
  part = loop.train(cfg, out_dir=str(tmp_path / "b"), progress=False, log=lambda s: None,
                    stop_after=3)
  assert int(part.state.opt_step) == 3
  resumed = loop.train(cfg, out_dir=str(tmp_path / "b"), resume=True, progress=False,
                       log=lambda s: None)
  assert_trees_identical(resumed.state, straight.state)

  def curve(hist, kind, key):
    return [(r["step"], r[key]) for r in hist if r["kind"] == kind]

  assert curve(resumed.history, "train", "loss") == curve(straight.history, "train", "loss")
  assert curve(straight.history, "eval", "val_loss")[-1] == curve(resumed.history, "eval",
                                                                   "val_loss")[-1]
  # evals on the grid of both runs, plus the one where the first part stopped
  assert [s for s, _ in curve(resumed.history, "eval", "val_loss")] == [0, 2, 3, 4, 6]
  with open(tmp_path / "b" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert os.path.exists(tmp_path / "b" / "loss_curve.png")


def test_resume_refuses_a_different_config_or_a_missing_checkpoint(tmp_path):
  cfg = loop.TrainConfig(**TINY, steps=6)
  loop.train(cfg, out_dir=str(tmp_path), progress=False, log=lambda s: None, stop_after=1)
  other = loop.TrainConfig(**{**TINY, "d_model": 32}, steps=6)
  with pytest.raises(ValueError, match="d_model"):
    loop.train(other, out_dir=str(tmp_path), resume=True, progress=False, log=lambda s: None)
  with pytest.raises(ValueError, match="no checkpoint"):
    loop.train(cfg, out_dir=str(tmp_path / "empty"), resume=True, progress=False,
               log=lambda s: None)


def test_checkpointer_keeps_the_latest_two(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  state = loop.TrainState(step=np.int32(0), opt_step=np.int32(0), params={"w": np.ones(3)},
                          opt_state=(), guard=loop.guard_init(4), rng=np.zeros(2, np.uint32))
  for s in (1, 2, 3):
    ckpt.save(state._replace(step=np.int32(s), params={"w": np.full(3, float(s))}), {"s": s})
  assert ckpt.latest_step() == 3
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 3]
  restored, extra = ckpt.restore(jax.tree.map(np.asarray, state), step=2)
  np.testing.assert_array_equal(restored.params["w"], np.full(3, 2.0))
  assert extra == {"s": 2}
