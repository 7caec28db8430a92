"""The README's quick start runs as written, and its API tables name real functions."""
import pathlib
import re

import jaxopt_llm
from jaxopt_llm import losses, optim, schedules

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quick_start_runs_and_learns(capsys):
  block = README.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
  namespace = {}
  exec(compile(block, "README.md quick start", "exec"), namespace)
  assert float(namespace["loss"]) < 3.0  # from log(64) = 4.16 at chance
  assert "loss after 100 steps" in capsys.readouterr().out


def test_api_tables_name_existing_functions():
  names = re.findall(r"^\| `([a-z_0-9]+)\(", README, flags=re.M)
  assert len(names) >= 25
  for name in names:
    assert any(hasattr(m, name) for m in (losses, optim, schedules)), name
  assert jaxopt_llm.__version__
