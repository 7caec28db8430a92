"""PNG figures (matplotlib, Agg backend: no display needed): loss curves and schedules.

matplotlib is optional (``pip install 'jaxopt_llm[plots]'``, also in ``[train]``): without
it, ``plot_run`` / ``plot_runs`` given a ``log`` say in one line that they skipped the PNG
and return False (a run that trained for an hour does not crash at its last line), and
otherwise raise ``MissingMatplotlib`` (an ImportError) with that line.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional, Sequence

INSTALL = "pip install 'jaxopt_llm[plots]'"


class MissingMatplotlib(ImportError):
  pass


def have_matplotlib() -> bool:
  try:
    return importlib.util.find_spec("matplotlib") is not None
  except (ImportError, ValueError):
    return False


def _pyplot(path: str):
  try:
    import matplotlib
  except ImportError:
    raise MissingMatplotlib(f"matplotlib is not installed: skipped {path} ({INSTALL})") \
        from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _series(history: Sequence[dict], kind: str, key: str):
  pts = [(r["step"], r[key]) for r in history if r.get("kind") == kind and key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(history: Sequence[dict], path: str, *, title: str = "",
             baseline: Optional[float] = None,
             log: Optional[Callable[[str], None]] = None) -> bool:
  """Train loss, val loss and the unigram entropy (top); the learning rate (bottom).
  Returns whether the PNG was written (see the module docstring for ``log``)."""
  return plot_runs({"": history}, path, title=title, baseline=baseline, log=log)


def plot_runs(histories: dict[str, Sequence[dict]], path: str, *, title: str = "",
              baseline: Optional[float] = None,
              log: Optional[Callable[[str], None]] = None) -> bool:
  """All runs' train (thin) and val (markers) losses on one axis, their lrs below.
  Returns whether the PNG was written (see the module docstring for ``log``)."""
  try:
    plt = _pyplot(path)
  except MissingMatplotlib as e:
    if log is None:
      raise
    log(str(e))
    return False
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
  return True


def plot_schedule(schedule: Callable, total_steps: int, path: str, *, title: str = "") -> None:
  """The schedule's value at every step ``0..total_steps``."""
  import numpy as np
  plt = _pyplot(path)
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
