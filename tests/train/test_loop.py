"""train(): metrics, evaluation grid, stop and resume equal one run, refusals; the run
folder's safety (a used folder refused, a locked one refused, SIGTERM saves and the resume
is bit-exact, a damaged newest checkpoint falls back to the one before and still ends
bit-identical); and `jaxopt-llm train --shard zero1` as a real 2-process run (gloo over
127.0.0.1, 4 CPU devices each): the same losses as the 8-device run of one process, and a
resume from its checkpoint (``parallel.launch_local`` picks a free port per launch, so this is
safe under pytest-xdist)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxopt_llm import parallel
from jaxopt_llm.train import loop
from jaxopt_llm.train.checkpoint import MANIFEST
from jaxopt_llm.train.config import TrainConfig
from jaxopt_llm.train.run_dir import RunDirError, RunLock

TINY = dict(n_layer=1, d_model=16, n_head=2, block_size=16, batch_size=4, eval_windows=4,
            sample_tokens=0, log_every=1)
quiet = dict(progress=False, log=lambda s: None)
SIX = dict(TINY, steps=6, eval_every=2)


@pytest.fixture(scope="module")
def straight():
  """The uninterrupted 6-step run every interrupted one must equal, bit for bit."""
  return loop.train(TrainConfig(**SIX), **quiet)


def assert_same_run(result, ref, out_dir):
  """Bit-identical final state and the same logged train losses (steps 1..6, each once)."""
  for x, y in zip(jax.tree.leaves(jax.device_get(result.state)),
                  jax.tree.leaves(jax.device_get(ref.state))):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    logged = [(r["step"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "train"]
  assert logged == [(r["step"], r["loss"]) for r in ref.history if r["kind"] == "train"]


def test_train_stop_and_resume_equals_one_run(tmp_path):
  cfg = TrainConfig(**SIX, save_every=3)
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


def _snapshot(folder):
  return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
          for r, _, fs in os.walk(folder) for f in fs}


def test_resume_refuses_a_different_config_or_a_missing_checkpoint(tmp_path):
  cfg = TrainConfig(**TINY, steps=6)
  loop.train(cfg, out_dir=str(tmp_path), stop_after=2, **quiet)
  before = _snapshot(tmp_path)
  other = TrainConfig(**{**TINY, "d_model": 32}, steps=6)
  with pytest.raises(ValueError, match="d_model"):
    loop.train(other, out_dir=str(tmp_path), resume=True, **quiet)
  # more steps change warmup_cosine's past learning rates: refused, in one line
  with pytest.raises(ValueError, match=r"`steps` 6 -> 8 changes the learning rate of the 2 "
                     "steps already taken"):
    loop.train(TrainConfig(**TINY, steps=8), out_dir=str(tmp_path), resume=True, **quiet)
  with pytest.raises(ValueError, match="no checkpoint"):
    loop.train(cfg, out_dir=str(tmp_path / "empty"), resume=True, **quiet)
  # a fresh run in the used folder is refused and leaves every byte as it was ...
  with pytest.raises(RunDirError, match=r"holds checkpoints of an earlier run \(up to step 2\): "
                     "continue it with --resume, replace it with --overwrite"):
    loop.train(cfg, out_dir=str(tmp_path), **quiet)
  # ... and so is any run while another holds the folder's lock
  with RunLock(str(tmp_path)):
    with pytest.raises(RunDirError, match="in use by another run"):
      loop.train(cfg, out_dir=str(tmp_path), resume=True, **quiet)
  assert _snapshot(tmp_path) == before
  # --overwrite replaces the earlier run
  loop.train(cfg, out_dir=str(tmp_path), overwrite=True, stop_after=1, **quiet)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  with open(tmp_path / "metrics.jsonl") as f:
    assert [r["step"] for r in map(json.loads, f) if r["kind"] == "train"] == [1]


def test_more_steps_on_resume_when_the_past_schedule_is_unchanged(tmp_path):
  const = dict(TINY, schedule="constant", eval_every=0)
  loop.train(TrainConfig(**const, steps=2), out_dir=str(tmp_path), **quiet)  # a finished run
  longer = loop.train(TrainConfig(**const, steps=4), out_dir=str(tmp_path), resume=True,
                      **quiet)
  ref = loop.train(TrainConfig(**const, steps=4), **quiet)
  assert_same_run(longer, ref, str(tmp_path))


def largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f != MANIFEST]
  return max(files, key=os.path.getsize)


def test_a_damaged_newest_checkpoint_falls_back_and_the_run_ends_the_same(tmp_path, straight):
  cfg = TrainConfig(**SIX, save_every=2)
  loop.train(cfg, out_dir=str(tmp_path / "cut"), stop_after=4, **quiet)  # checkpoints 2, 4
  shutil.copytree(tmp_path / "cut", tmp_path / "flip")
  big = largest_file(tmp_path / "cut" / "checkpoints" / "4")
  os.truncate(big, os.path.getsize(big) // 2)
  big = largest_file(tmp_path / "flip" / "checkpoints" / "4")
  with open(big, "r+b") as f:
    f.seek(os.path.getsize(big) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  for name, why in (("cut", "bytes"), ("flip", "checksum mismatch")):
    notes = []
    resumed = loop.train(cfg, out_dir=str(tmp_path / name), resume=True, progress=False,
                         log=notes.append)
    fallback = [n for n in notes if n.startswith("checkpoint 4 damaged")]
    assert len(fallback) == 1 and why in fallback[0], notes
    assert "using step 2 instead" in fallback[0]
    assert any("resuming at step 2" in n for n in notes)
    assert os.path.isdir(tmp_path / name / "checkpoints" / "corrupt" / "4")
    assert_same_run(resumed, straight, str(tmp_path / name))


SIGTERM_CHILD = """
import signal, sys, time
from jaxopt_llm.train import loop
from jaxopt_llm.train.config import TrainConfig

def log(text):
  print(text, flush=True)
  if text.startswith("step     2:"):  # the eval after step 2: wait for the parent's SIGTERM
    stop = signal.getsignal(signal.SIGTERM).__self__
    for _ in range(2400):
      if stop.signum:
        break
      time.sleep(0.05)

loop.train(TrainConfig(**{cfg}), out_dir=sys.argv[1], progress=False, log=log)
"""


def test_sigterm_saves_a_checkpoint_and_the_resume_is_bit_exact(tmp_path, straight):
  cfg = dict(SIX, save_every=2)
  out = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD.format(cfg=cfg), out],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:
      if line.startswith("step     2:"):
        proc.send_signal(signal.SIGTERM)
        break
    rest, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 143, err[-3000:]
  assert "SIGTERM: finishing the current step" in rest
  assert "SIGTERM: stopped after step 3; checkpoint saved in" in rest
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "3"]
  assert not os.path.exists(os.path.join(out, "run.lock"))  # released on the way out
  notes = []
  resumed = loop.train(TrainConfig(**cfg), out_dir=out, resume=True, progress=False,
                       log=notes.append)
  assert any("resuming at step 3" in n for n in notes)
  assert_same_run(resumed, straight, out)


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

  # process 0 checksummed the files of both processes; the lock was the run's, and is gone
  with open(out / "checkpoints" / "5" / MANIFEST) as f:
    listed = json.load(f)["files"]
  assert any("process_1" in p for p in listed) and any("process_0" in p for p in listed)
  assert not os.path.exists(out / "run.lock")

  # The step-10 checkpoint damaged (cut short): both processes resume from step 5.
  big = max((os.path.join(r, f) for r, _, fs in os.walk(out / "checkpoints" / "10")
             for f in fs), key=os.path.getsize)
  os.truncate(big, 1)
  resumed = launch_train(out, "--resume")
  assert "checkpoint 10 damaged" in resumed[0].stdout
  assert "resuming at step 5" in resumed[0].stdout
  np.testing.assert_allclose(logged_train_losses(out), ref_losses, rtol=1e-5, atol=0)


def test_resume_refuses_data_edited_since_the_checkpoint(tmp_path):
  text = tmp_path / "mine.txt"
  text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
  cfg = TrainConfig(**TINY, steps=4, data=str(text), eval_every=0)
  out = str(tmp_path / "run")
  loop.train(cfg, out_dir=out, stop_after=2, **quiet)
  # the same length, other content: refused in one line naming what changed
  text.write_text("the quick brown cat jumps over the lazy dog. " * 40)
  with pytest.raises(RunDirError, match="the data or tokenizer changed since the checkpoint "
                     r"\(unigram_entropy"):
    loop.train(cfg, out_dir=out, resume=True, **quiet)
  # the original content back (a new mtime, so a new cache key): resumable
  text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
  assert int(loop.train(cfg, out_dir=out, resume=True, **quiet).state.opt_step) == 4
