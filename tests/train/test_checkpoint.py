"""Orbax checkpoints: a resumed run continues bit-exactly."""
import os

import jax
import numpy as np

from jaxopt_llm.train import data, step
from jaxopt_llm.train.checkpoint import Checkpointer
from jaxopt_llm.train.config import TrainConfig

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
    assert x.tobytes() == y.tobytes()  # bit for bit (also -0.0 vs 0.0, NaN payloads)


def _resume_case(tmp_path, cfg, n):
  """2n optimizer steps straight vs n steps, save, restore into fresh objects, n steps."""
  train_ids, _ = data.train_val_split(data.encode(data.load_corpus()))
  micro = n * cfg.accum

  prog = step.build_program(cfg)
  it = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  straight = prog.init(cfg.seed)
  for _ in range(2 * micro):
    straight, _ = prog.step(straight, next(it))

  it = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  state = prog.init(cfg.seed)
  for _ in range(micro):
    state, _ = prog.step(state, next(it))
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  assert ckpt.save(state, {"data": it.state(), "config": cfg.to_dict()}) == micro
  saved = jax.device_get(state)
  ckpt.close()

  # A fresh program (compiled step, optimizer) and iterator, initialised with another seed
  # so that nothing can come from the old objects; the program cache is bypassed on purpose.
  fresh = step.build_program(cfg, cached=False)
  assert fresh.step is not prog.step
  restored, extra = Checkpointer(str(tmp_path / "ckpt")).restore(fresh.init(cfg.seed + 1))
  assert_trees_identical(restored, saved)
  assert extra["config"] == cfg.to_dict()
  it2 = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  it2.restore(extra["data"])
  for _ in range(micro):
    restored, _ = fresh.step(restored, next(it2))
  assert_trees_identical(restored, straight)
  return straight


def test_resume_is_bit_exact_sophia_with_accumulation(tmp_path):
  # Everything a run carries: MultiSteps accumulators mid-way, Sophia's Hessian EMA, the
  # RNG key for its sampled labels, the spike guard's window. (AdamW's resume is the
  # end-to-end test in test_loop.py.)
  cfg = TrainConfig(**TINY, optimizer="sophia", steps=10, accum=2, hessian_every=2)
  final = _resume_case(tmp_path, cfg, n=3)
  assert int(final.opt_step) == 6 and int(final.guard.count) == 12


def test_checkpointer_keeps_the_latest_two(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  state = step.TrainState(step=np.int32(0), opt_step=np.int32(0), params={"w": np.ones(3)},
                          opt_state=(np.zeros(4, np.float32),), rng=np.zeros(2, np.uint32))
  for s in (1, 2, 3):
    ckpt.save(state._replace(step=np.int32(s), params={"w": np.full(3, float(s))}), {"s": s})
  assert ckpt.latest_step() == 3
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 3]
  restored, extra = ckpt.restore(jax.tree.map(np.asarray, state), step=2)
  np.testing.assert_array_equal(restored.params["w"], np.full(3, 2.0))
  assert extra == {"s": 2}
