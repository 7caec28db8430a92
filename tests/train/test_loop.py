"""train(): metrics, evaluation grid, stop and resume equal one run, refusals."""
import json
import os

import jax
import numpy as np
import pytest

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
