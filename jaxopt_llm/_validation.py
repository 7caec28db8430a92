"""Argument checks shared by losses, optimizers and schedules.

Python-level hyperparameters are checked when a loss/optimizer/schedule is built or called
eagerly. Traced values (under jit or ``optax.inject_hyperparams``) and schedules cannot be
inspected at build time, so the checks skip them rather than force a device sync.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` has a value we can read now (not a tracer, not a schedule)."""
  if callable(x) or isinstance(x, jax.core.Tracer):
    return False
  return True


def _scalar(owner: str, name: str, x: Any) -> float | None:
  if not is_concrete(x):
    return None
  if isinstance(x, (str, bytes)) or x is None:
    # np.asarray("0.1") would parse, so a string typed where a number belongs is refused
    # here rather than silently accepted or failing later with a TypeError naming nothing.
    raise TypeError(f"{owner}: `{name}` must be a number, got {type(x).__name__} {x!r}")
  arr = np.asarray(x)
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise TypeError(f"{owner}: `{name}` must be a number, got {type(x).__name__} {x!r}")
  if arr.ndim != 0:
    return None
  return float(arr)


def check_real(owner: str, name: str, value: Any, *, lo: float | None = None,
               hi: float | None = None, lo_open: bool = False,
               hi_open: bool = False) -> None:
  """Raises ValueError naming ``owner``'s ``name`` unless lo <= value <= hi (or open bounds).

  Also rejects NaN/inf. Non-concrete values (tracers, schedules, arrays) are skipped.
  """
  v = _scalar(owner, name, value)
  if v is None:
    return
  lo_txt = "(" if lo_open else "["
  hi_txt = ")" if hi_open else "]"
  rng = f"{lo_txt}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{hi_txt}"
  bad = not math.isfinite(v)
  if lo is not None:
    bad |= v <= lo if lo_open else v < lo
  if hi is not None:
    bad |= v >= hi if hi_open else v > hi
  if bad:
    raise ValueError(f"{owner}: `{name}` must be in {rng}, got {value!r}")


def check_int(owner: str, name: str, value: Any, *, lo: int | None = None) -> None:
  """Raises ValueError unless ``value`` is an integer (Python or numpy) >= lo."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{owner}: `{name}` must be an integer, got {value!r}")
  if lo is not None and value < lo:
    raise ValueError(f"{owner}: `{name}` must be an integer >= {lo}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{owner}: `{name}` must be one of {choices}, got {value!r}")
