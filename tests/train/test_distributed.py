"""`jaxopt-llm train --shard zero1` as a real 2-process run (gloo over 127.0.0.1, 4 CPU devices
each): the same losses as the 8-device run of one process, and a resume from its checkpoint.

``parallel.launch_local`` picks a free port per launch, so this is safe under pytest-xdist.
"""
import json
import shutil
import sys

import jax
import numpy as np
import pytest

from jaxopt_llm import parallel
from jaxopt_llm.train import loop
from jaxopt_llm.train.config import TrainConfig

TINY = dict(n_layer=1, d_model=16, n_head=2, block_size=16, batch_size=8, steps=10,
            eval_every=0, eval_windows=8, log_every=1, sample_tokens=0, save_every=5,
            shard="zero1")
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + ["--no-progress"]


def launch(out, *extra):
  results = parallel.launch_local(
      [sys.executable, "-m", "jaxopt_llm.cli", "train", *FLAGS, "--out", str(out), *extra],
      2, local_device_count=4, timeout=400)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} failed:\n{r.stdout}\n{r.stderr[-4000:]}"
  return results


def train_losses(out):
  with open(out / "metrics.jsonl") as f:
    recs = [json.loads(line) for line in f]
  train = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 11))  # each step once, also resumed
  return np.array([r["loss"] for r in train])


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 CPU devices of conftest.py")
def test_two_processes_train_like_one_and_resume(tmp_path):
  out = tmp_path / "run"
  first = launch(out)
  assert "val loss" in first[0].stdout and "val loss" not in first[1].stdout  # process 0 logs
  ref = loop.train(TrainConfig(**TINY), progress=False, log=lambda s: None)
  ref_losses = np.array([r["loss"] for r in ref.history if r["kind"] == "train"])
  np.testing.assert_allclose(train_losses(out), ref_losses, rtol=1e-5, atol=0)
  assert ref_losses[-1] < ref_losses[0]

  # Killed after the step-5 checkpoint: drop step 10's, resume from 5 with both processes.
  shutil.rmtree(out / "checkpoints" / "10")
  resumed = launch(out, "--resume")
  assert "resuming at step 5" in resumed[0].stdout
  np.testing.assert_allclose(train_losses(out), ref_losses, rtol=1e-5, atol=0)
