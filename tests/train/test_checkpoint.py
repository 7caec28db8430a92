"""Orbax checkpoints: a resumed run continues bit-exactly; the checksum manifest catches a
flipped bit, a truncated file or a checkpoint cut short, and the newest intact one is used."""
import json
import os

import jax
import numpy as np
import pytest

from jaxopt_llm.train import data, step
from jaxopt_llm.train.checkpoint import (MANIFEST, CheckpointError, Checkpointer, check_intact,
                                         restore_latest_intact)
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


def _small_state(s):
  return step.TrainState(step=np.int32(s), opt_step=np.int32(s),
                         params={"w": np.full(1000, float(s), np.float32)},
                         opt_state=(np.zeros(4, np.float32),), rng=np.zeros(2, np.uint32))


def largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f != MANIFEST]
  return max(files, key=os.path.getsize)


def test_manifest_detects_damage_and_the_newest_intact_step_is_used(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
  for s in (1, 2, 3):
    ckpt.save(_small_state(s), {"s": s})
  with open(tmp_path / "3" / MANIFEST) as f:
    listed = json.load(f)["files"]
  on_disk = {os.path.relpath(os.path.join(r, f), tmp_path / "3")
             for r, _, fs in os.walk(tmp_path / "3") for f in fs} - {MANIFEST}
  assert set(listed) == on_disk and all(len(v["sha256"]) == 64 for v in listed.values())
  assert all(check_intact(str(tmp_path / str(s))) is None for s in (1, 2, 3))

  # one flipped bit in the newest checkpoint's largest file (the arrays)
  big = largest_file(tmp_path / "3")
  raw = bytearray(open(big, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(big, "wb").write(bytes(raw))
  assert "checksum mismatch" in check_intact(str(tmp_path / "3"))
  with pytest.raises(CheckpointError, match="damaged"):
    ckpt.restore(jax.tree.map(np.asarray, _small_state(0)), step=3)
  notes = []
  assert ckpt.latest_intact_step(notes.append) == 2
  assert len(notes) == 1 and notes[0].startswith("checkpoint 3 damaged (step 3: ")
  # a reader falls back without moving anything
  state, extra, s = restore_latest_intact(str(tmp_path), _small_state(0), notes.append)
  assert s == 2 and extra == {"s": 2}
  np.testing.assert_array_equal(state.params["w"], np.full(1000, 2.0))
  assert os.path.isdir(tmp_path / "3")

  # a truncated file, a missing manifest: damaged too; none intact is one clear error
  os.truncate(largest_file(tmp_path / "2"), 10)
  assert "bytes" in check_intact(str(tmp_path / "2")) and "expected" in check_intact(
      str(tmp_path / "2"))
  os.remove(tmp_path / "1" / MANIFEST)
  assert "no checksum manifest" in check_intact(str(tmp_path / "1"))
  with pytest.raises(CheckpointError, match=r"no intact checkpoint .*step 3: .*step 2: .*"
                     r"step 1: no checksum manifest"):
    ckpt.latest_intact_step()
  ckpt.close()
  with pytest.raises(CheckpointError, match="no checkpoint folder"):
    restore_latest_intact(str(tmp_path / "nothing"), _small_state(0))
  assert not os.path.exists(tmp_path / "nothing")  # a reader creates nothing


def test_a_resume_sets_damaged_checkpoints_aside(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  for s in (1, 2):
    ckpt.save(_small_state(s), {"s": s})
  os.truncate(largest_file(tmp_path / "2"), 0)
  notes = []
  assert ckpt.latest_intact_step(notes.append, set_aside=True) == 1
  assert "moved to" in notes[0] and os.path.isdir(tmp_path / "corrupt" / "2")
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  ckpt.save(_small_state(2), {"s": 2})  # the step is written again, and verifies
  assert check_intact(str(tmp_path / "2")) is None and ckpt.latest_intact_step() == 2
  ckpt.close()
