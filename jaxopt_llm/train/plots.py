"""PNG figures (matplotlib, Agg backend: no display needed): loss curves and schedules."""
from __future__ import annotations

from typing import Callable, Optional, Sequence


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _series(history: Sequence[dict], kind: str, key: str):
  pts = [(r["step"], r[key]) for r in history if r.get("kind") == kind and key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(history: Sequence[dict], path: str, *, title: str = "",
             baseline: Optional[float] = None) -> None:
  """Train loss, val loss and the unigram entropy (top); the learning rate (bottom)."""
  plot_runs({"": history}, path, title=title, baseline=baseline)


def plot_runs(histories: dict[str, Sequence[dict]], path: str, *, title: str = "",
              baseline: Optional[float] = None) -> None:
  """All runs' train (thin) and val (markers) losses on one axis, their lrs below."""
  plt = _pyplot()
  fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
  for i, (name, hist) in enumerate(histories.items()):
    color = f"C{i}"
    label = f"{name} " if name else ""
    x, y = _series(hist, "train", "loss")
    ax.plot(x, y, color=color, lw=1, alpha=0.7, label=f"{label}train")
    x, y = _series(hist, "eval", "val_loss")
    ax.plot(x, y, "o-", color=color, ms=4, lw=1.5, label=f"{label}val")
    x, y = _series(hist, "train", "lr")
    ax_lr.plot(x, y, color=color, label=name or None)
  if baseline is not None:
    ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram entropy {baseline:.2f}")
  ax.set_ylabel("loss (nats / byte)")
  ax.set_title(title)
  ax.legend(fontsize=8, ncol=2)
  ax.grid(alpha=0.3)
  if len(histories) > 1:
    ax_lr.set_yscale("log")  # recipes' peak rates differ by 10-100x
  ax_lr.set_ylabel("learning rate")
  ax_lr.set_xlabel("optimizer step")
  ax_lr.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_schedule(schedule: Callable, total_steps: int, path: str, *, title: str = "") -> None:
  """The schedule's value at every step ``0..total_steps``."""
  import numpy as np
  plt = _pyplot()
  steps = np.arange(total_steps + 1)
  lrs = np.asarray(schedule(steps))
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.plot(steps, lrs)
  ax.set_xlabel("step")
  ax.set_ylabel("learning rate")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
