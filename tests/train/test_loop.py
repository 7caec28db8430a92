"""train(): metrics, evaluation grid, stop and resume equal one run, refusals; and
`jaxopt-llm train --shard zero1` as a real 2-process run (gloo over 127.0.0.1, 4 CPU devices
each): the same losses as the 8-device run of one process, and a resume from its checkpoint
(``parallel.launch_local`` picks a free port per launch, so this is safe under pytest-xdist)."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from jaxopt_llm import parallel
from jaxopt_llm.train import loop
from jaxopt_llm.train.config import TrainConfig

TINY = dict(n_layer=1, d_model=16, n_head=2, block_size=16, batch_size=4, eval_windows=4,
            sample_tokens=0, log_every=1)
quiet = dict(progress=False, log=lambda s: None)


def test_train_stop_and_resume_equals_one_run(tmp_path):
  cfg = TrainConfig(**TINY, steps=6, eval_every=2)
  straight = loop.train(cfg, out_dir=str(tmp_path / "a"), **quiet)
  part = loop.train(cfg, out_dir=str(tmp_path / "b"), stop_after=3, **quiet)
  assert int(part.state.opt_step) == 3
  resumed = loop.train(cfg, out_dir=str(tmp_path / "b"), resume=True, **quiet)
  for x, y in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                  jax.tree.leaves(jax.device_get(straight.state))):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()  # bit for bit

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
  train = [r for r in records if r["kind"] == "train"]
  for key in ("loss", "lr", "grad_norm", "param_norm", "state_norm/mu", "state_norm/nu"):
    assert key in train[-1], key
  assert "state_norm/history" not in train[-1]  # the guard's window is not a moment
  assert os.path.exists(tmp_path / "b" / "loss_curve.png")


def test_resume_refuses_a_different_config_or_a_missing_checkpoint(tmp_path):
  cfg = TrainConfig(**TINY, steps=6)
  loop.train(cfg, out_dir=str(tmp_path), stop_after=1, **quiet)
  other = TrainConfig(**{**TINY, "d_model": 32}, steps=6)
  with pytest.raises(ValueError, match="d_model"):
    loop.train(other, out_dir=str(tmp_path), resume=True, **quiet)
  with pytest.raises(ValueError, match="no checkpoint"):
    loop.train(cfg, out_dir=str(tmp_path / "empty"), resume=True, **quiet)


# ---------------------------------------------------------------------------------------
# Several processes

MULTI = dict(n_layer=1, d_model=16, n_head=2, block_size=16, batch_size=8, steps=10,
            eval_every=0, eval_windows=8, log_every=1, sample_tokens=0, save_every=5,
            shard="zero1")
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in MULTI.items()] + ["--no-progress"]


def launch_train(out, *extra):
  results = parallel.launch_local(
      [sys.executable, "-m", "jaxopt_llm.cli", "train", *FLAGS, "--out", str(out), *extra],
      2, local_device_count=4, timeout=400)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} failed:\n{r.stdout}\n{r.stderr[-4000:]}"
  return results


def logged_train_losses(out):
  with open(out / "metrics.jsonl") as f:
    recs = [json.loads(line) for line in f]
  train = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 11))  # each step once, also resumed
  return np.array([r["loss"] for r in train])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 CPU devices of conftest.py")
def test_two_processes_train_like_one_and_resume(tmp_path):
  out = tmp_path / "run"
  first = launch_train(out)
  assert "val loss" in first[0].stdout and "val loss" not in first[1].stdout  # process 0 logs
  ref = loop.train(TrainConfig(**MULTI), progress=False, log=lambda s: None)
  ref_losses = np.array([r["loss"] for r in ref.history if r["kind"] == "train"])
  np.testing.assert_allclose(logged_train_losses(out), ref_losses, rtol=1e-5, atol=0)
  assert ref_losses[-1] < ref_losses[0]

  # Killed after the step-5 checkpoint: drop step 10's, resume from 5 with both processes.
  shutil.rmtree(out / "checkpoints" / "10")
  resumed = launch_train(out, "--resume")
  assert "resuming at step 5" in resumed[0].stdout
  np.testing.assert_allclose(logged_train_losses(out), ref_losses, rtol=1e-5, atol=0)
