"""plots: PNGs of a run's curves; without matplotlib, one line (or MissingMatplotlib)."""
import os
import sys

import pytest

from jaxopt_llm.train import plots

HISTORY = [{"kind": "eval", "step": 0, "val_loss": 5.5},
           {"kind": "train", "step": 1, "loss": 5.0, "lr": 1e-3},
           {"kind": "train", "step": 2, "loss": 4.0, "lr": 2e-3},
           {"kind": "eval", "step": 2, "val_loss": 4.2}]


def test_plot_run_writes_a_png(tmp_path):
  pytest.importorskip("matplotlib")
  path = tmp_path / "c.png"
  assert plots.plot_run(HISTORY, str(path), title="t", baseline=3.0) is True
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_png_is_skipped_in_one_line_or_raised(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  assert not plots.have_matplotlib()
  lines = []
  path = str(tmp_path / "c.png")
  assert plots.plot_run(HISTORY, path, log=lines.append) is False
  assert plots.plot_runs({"a": HISTORY}, path, log=lines.append) is False
  assert len(lines) == 2 and "jaxopt_llm[plots]" in lines[0] and path in lines[0]
  with pytest.raises(plots.MissingMatplotlib, match=r"jaxopt_llm\[plots\]"):
    plots.plot_run(HISTORY, path)
  with pytest.raises(ImportError):  # a MissingMatplotlib is an ImportError
    plots.plot_schedule(lambda s: s, 10, path)
  assert not os.path.exists(path)
