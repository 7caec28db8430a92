"""Argument checks shared by losses, optimizers and schedules.

Python-level hyperparameters are checked when a loss/optimizer/schedule is built or called
eagerly. Traced values (under jit or ``optax.inject_hyperparams``) and schedules cannot be
inspected at build time, so the checks skip them rather than force a device sync.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` has a value we can read now (not a tracer, not a schedule)."""
  if callable(x) or isinstance(x, jax.core.Tracer):
    return False
  return True


def _is_number_dtype(dtype: Any) -> bool:
  """Numeric or bool, bfloat16 and the other ml_dtypes included (NumPy does not know those
  are numbers)."""
  return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def _scalar(owner: str, name: str, x: Any) -> float | None:
  if not is_concrete(x):
    return None
  if isinstance(x, (str, bytes)) or x is None:
    # np.asarray("0.1") would parse, so a string typed where a number belongs is refused
    # here rather than silently accepted or failing later with a TypeError naming nothing.
    raise TypeError(f"{owner}: `{name}` must be a number, got {type(x).__name__} {x!r}")
  arr = np.asarray(x)
  if not _is_number_dtype(arr.dtype):
    raise TypeError(f"{owner}: `{name}` must be a number, got {type(x).__name__} {x!r}")
  if jnp.issubdtype(arr.dtype, jnp.complexfloating):
    raise TypeError(f"{owner}: `{name}` must be a real number, got {x!r}")
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


# --------------------------------------------------------------------------------------------
# Hyperparameters of optimizers, building blocks, guards and schedules.
#
# The rules, shared by every public builder (and by the torch-twin optimizers still to come):
#
# * a number (b1, eps, momentum, ...) goes through ``check_scalar``: a Python/NumPy/JAX scalar,
#   never a string, a callable or a non-scalar array; its range through ``check_real``'s bounds;
# * a value that may be a schedule (``learning_rate``, ``weight_decay``) goes through
#   ``check_schedule``: a number as above, or a callable evaluated on ``SCHEDULE_CHECK_STEPS``;
# * a flag (``amsgrad``, ``nesterov``, ``fused``, ...) through ``check_bool`` ("False" is not
#   False);
# * a storage dtype (``mu_dtype``, ``nu_dtype``) through ``check_float_dtype``.

# Steps at which a callable learning rate / weight decay is evaluated when the optimizer is
# built: the first steps, then about three points per decade up to 10**7. A schedule may add
# its own milestones (e.g. the end of its warmup) as a ``milestones`` attribute (an iterable
# of ints); ``jaxopt_llm.schedules`` sets it. Each milestone m is checked at m - 1, m, m + 1.
SCHEDULE_CHECK_STEPS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000,
                        10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
                        10_000_000)


def check_scalar(owner: str, name: str, value: Any, **bounds: Any) -> None:
  """A hyperparameter that is one number (not a schedule): ``check_real`` plus its type.

  Raises TypeError naming ``name`` for a string, None, a bool, a callable or another
  non-numeric value,
  ValueError for an array that is not a scalar or a value outside ``bounds`` (``check_real``'s
  ``lo``, ``hi``, ``lo_open``, ``hi_open``). Tracers (``optax.inject_hyperparams`` under jit)
  pass when they are numeric scalars: their value cannot be read.
  """
  if callable(value):
    raise TypeError(f"{owner}: `{name}` must be a number, not a callable (only a learning rate "
                    f"or a weight decay may be a schedule), got {value!r}")
  if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
    raise TypeError(f"{owner}: `{name}` must be a number, got {type(value).__name__} {value!r}")
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    if not isinstance(value, (int, float, complex, np.number)):
      raise TypeError(f"{owner}: `{name}` must be a number, got {type(value).__name__} "
                      f"{value!r}")
  else:
    if not jnp.issubdtype(dtype, jnp.number):
      raise TypeError(f"{owner}: `{name}` must be a number, got dtype {dtype}")
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(f"{owner}: `{name}` must be a real number, got dtype {dtype}")
    if np.ndim(value) != 0:
      raise ValueError(f"{owner}: `{name}` must be a scalar, got shape {np.shape(value)}")
  check_real(owner, name, value, **bounds)


def schedule_check_steps(schedule: Any) -> list[int]:
  """The steps ``check_schedule`` evaluates ``schedule`` at: ``SCHEDULE_CHECK_STEPS`` and
  m - 1, m, m + 1 for each of its ``milestones``."""
  steps = set(SCHEDULE_CHECK_STEPS)
  try:
    milestones = [int(m) for m in getattr(schedule, "milestones", ())]
  except (TypeError, ValueError):
    milestones = []
  for m in milestones:
    steps.update(s for s in (m - 1, m, m + 1) if s >= 0)
  return sorted(steps)


def _eval_at(schedule: Any, step: int) -> Any:
  """``schedule(step)`` on a Python int, else on an int32 scalar (optax's step count)."""
  try:
    return schedule(step)
  except Exception:  # noqa: BLE001 - retried with the count type optax passes
    return schedule(np.int32(step))


def _schedule_values(schedule: Any, steps: list[int]) -> list[tuple[int, Any]] | None:
  """``[(step, schedule(step))]``, or None when the schedule cannot be evaluated eagerly.

  One vectorised call on an int32 array of the steps first (jnp schedules are elementwise:
  one dispatch instead of one per step); when that raises or does not return one value per
  step (Python branching on the step, a reduction), one call per step.
  """
  try:
    out = schedule(np.asarray(steps, np.int32))
    if not isinstance(out, jax.core.Tracer) and np.shape(out) == (len(steps),):
      return list(zip(steps, np.asarray(out)))
  except Exception:  # noqa: BLE001 - not vectorisable: step by step below
    pass
  values = []
  for step in steps:
    try:
      out = _eval_at(schedule, step)
    except Exception:  # noqa: BLE001 - see check_schedule: not checkable, not checked
      return None
    if isinstance(out, jax.core.Tracer):
      return None
    values.append((step, out))
  return values


def check_schedule(owner: str, name: str, value: Any, *, lo: float | None = 0.0,
                   hi: float | None = None) -> None:
  """A hyperparameter that may be a schedule ``step -> value`` (learning rate, weight decay).

  A number goes through ``check_scalar`` (``lo <= value <= hi``). A callable is evaluated at
  build time, eagerly (``jax.ensure_compile_time_eval``, so also when the optimizer is built
  inside a jitted function), at every step of ``SCHEDULE_CHECK_STEPS`` and around its
  ``milestones``: first in one call on an int32 array of those steps, else one call per step
  on a Python int (then an int32 scalar). A value there that is NaN, infinite, outside
  ``[lo, hi]`` or not a real scalar raises ValueError (TypeError for a non-number) naming
  ``name`` and the step. This catches a schedule that is negative or NaN at step 0, at the
  end of its warmup or late in training; it cannot prove a schedule valid at steps it does
  not visit.

  A schedule that cannot be evaluated eagerly (it raises on a Python int and on an int32
  scalar, or returns a traced value because it closes over a tracer) is not checked: the
  build goes on, and whatever it raises surfaces at the first ``update``, which calls it
  with the step count.
  """
  if not callable(value):
    check_scalar(owner, name, value, lo=lo, hi=hi)
    return
  with jax.ensure_compile_time_eval():
    values = _schedule_values(value, schedule_check_steps(value))
  rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
  for step, out in values or ():
    try:
      arr = np.asarray(out)
    except Exception:  # noqa: BLE001
      arr = np.asarray(None)
    if not _is_number_dtype(arr.dtype) or jnp.issubdtype(arr.dtype, jnp.complexfloating):
      raise TypeError(f"{owner}: `{name}` is a schedule that returned {type(out).__name__} "
                      f"{out!r} at step {step}, not a real number")
    if arr.ndim != 0:
      raise ValueError(f"{owner}: `{name}` is a schedule that returned shape {arr.shape} at "
                       f"step {step}; it must return a scalar")
    v = float(arr)
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
      raise ValueError(
          f"{owner}: `{name}` is a schedule that gives {v!r} at step {step}; it must be "
          f"finite and in {rng} at every step (checked when the optimizer is built, at "
          f"steps {SCHEDULE_CHECK_STEPS[0]}..{SCHEDULE_CHECK_STEPS[-1]} and around the "
          f"schedule's milestones)")


def check_bool(owner: str, name: str, value: Any) -> None:
  """A flag: ``True`` or ``False`` (Python or NumPy bool). ``"False"`` is truthy: refused."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}: `{name}` must be True or False, got {type(value).__name__} "
                    f"{value!r}")


def check_float_dtype(owner: str, name: str, value: Any) -> None:
  """A storage dtype: None (the default) or a floating dtype (``jnp.bfloat16``, ``"float16"``).

  Raises TypeError naming ``name`` for something that is not a dtype, ValueError for a dtype
  that is not floating (``jnp.int8`` would round every moment to an integer).
  """
  if value is None:
    return
  if not isinstance(value, (str, type, np.dtype)):
    # np.dtype(array) would silently read the array's dtype.
    raise TypeError(f"{owner}: `{name}` must be a floating dtype such as jnp.bfloat16 or None, "
                    f"got {type(value).__name__} {value!r}")
  try:
    dtype = jnp.dtype(value)
  except Exception:  # noqa: BLE001 - numpy/jax raise TypeError or ValueError
    raise TypeError(f"{owner}: `{name}` must be a floating dtype such as jnp.bfloat16 or None, "
                    f"got {value!r}") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{owner}: `{name}` must be a floating dtype such as jnp.bfloat16 or None, "
                     f"got {dtype}")
