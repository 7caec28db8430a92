"""Learning-rate schedules for LLM training, as optax schedules ``step -> lr``.

Every function here builds a schedule: a callable that takes the optimizer step (a Python
int or an integer/float scalar array, traced or not) and returns the learning rate as a
float32 array of the same shape as ``step`` (a scalar for a scalar step). The schedules are
pure ``jnp`` code with no Python branching on the step, so they work under ``jax.jit`` and
``jax.vmap`` and inside ``optax.scale_by_learning_rate`` / ``optax.inject_hyperparams``.

The closed forms follow Hugging Face ``transformers.optimization`` (the ``get_*_schedule``
LambdaLR lambdas, multiplied by the peak learning rate) and PyTorch's
``torch.optim.lr_scheduler`` classes. Conventions shared by all of them:

* Warmups rise linearly from 0 at step 0: ``lr = peak_lr * step / warmup_steps``.
* Decays end at ``min_lr`` and stay there for every later step (some reference formulas are
  periodic or keep going; each docstring says where we differ and why).
* Negative steps are clamped to 0.
* Hyperparameters are concrete Python/NumPy scalars, validated when the schedule is built;
  a bad one raises ``ValueError`` naming the argument.
* Each schedule records its phase boundaries (end of warmup, start and end of decay) as a
  ``milestones`` tuple attribute: the optimizers' build-time check of a schedule
  (``jaxopt_llm._validation.check_schedule``) evaluates it around those steps too.
* The step is converted to float32 before any arithmetic, so ``step + offset`` never
  overflows int32 (steps up to 2**24 are represented exactly; larger steps are rounded to
  the nearest float32, which is far below the resolution of any schedule).

Names: none of these is the name of an ``optax.schedules`` function with other arguments.
The PyTorch twins are named after their ``lr_scheduler`` class (``exponential_lr`` is
``ExponentialLR``: ``optax.exponential_decay(init_value, transition_steps, decay_rate)``
is a different function); the warmup/decay shapes after what they do.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm._validation import check_choice, check_int, check_real, is_concrete

__all__ = [
  "warmup_cosine",
  "wsd",
  "linear_decay",
  "polynomial_decay",
  "constant_with_warmup",
  "inverse_sqrt",
  "step_decay",
  "exponential_lr",
  "cosine_annealing",
]

# A schedule maps the step count (int or integer array) to a float32 learning rate.
Schedule = Callable[[Any], jax.Array]

_WSD_DECAY_TYPES = ("linear", "cosine", "1-sqrt")
_HALF_PI = 0.5 * math.pi


# ----------------------------------------------------------------------------------------
# Argument checks and shared helpers.
# ----------------------------------------------------------------------------------------


def _real(owner: str, name: str, value: Any, **bounds: Any) -> float:
  """Validates a real hyperparameter and returns it as a Python float (float64).

  ``check_real`` skips values it cannot read (tracers, arrays); a schedule's hyperparameters
  are baked into its closed form when it is built, so here they must be concrete scalars.
  """
  numeric = isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))
  if isinstance(value, (bool, np.bool_)) or not numeric:
    raise ValueError(f"{owner}: `{name}` must be a real number, got {value!r}")
  if not is_concrete(value):
    raise ValueError(f"{owner}: `{name}` must be a concrete number when the schedule is "
                     f"built, got a traced value {value!r}")
  arr = np.asarray(value)
  if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.integer)
                           or np.issubdtype(arr.dtype, np.floating)):
    raise ValueError(f"{owner}: `{name}` must be a real scalar, got {value!r}")
  check_real(owner, name, value, **bounds)
  return float(arr)


def _with_milestones(schedule: Schedule, *steps: int) -> Schedule:
  """``schedule`` with its phase boundaries recorded as ``schedule.milestones``."""
  schedule.milestones = tuple(sorted({int(s) for s in steps}))
  return schedule


def _steps(owner: str, name: str, value: Any, lo: int) -> int:
  check_int(owner, name, value, lo=lo)
  return int(value)


def _check_step(step: Any) -> None:
  """A schedule's step must be a real number or array (int, float or bool): a string (which
  ``jnp.asarray(..., float32)`` would parse), None or a complex step is a TypeError naming
  ``step``."""
  dtype = getattr(step, "dtype", None)
  ok = (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
        or jnp.issubdtype(dtype, jnp.bool_)) if dtype is not None else (
            isinstance(step, (int, float, np.integer, np.floating, np.bool_))
            and not isinstance(step, complex))
  if not ok:
    raise TypeError(f"schedule: `step` must be a real number or array (the optimizer step), "
                    f"got {type(step).__name__} {step!r}")


def _float_step(step: Any) -> jax.Array:
  """The step as float32, clamped to >= 0 (``_check_step`` first).

  Converting before any arithmetic keeps ``step + timescale`` etc. out of int32 (which would
  wrap for steps near 2**31), and makes ``step / warmup_steps`` true division.
  """
  _check_step(step)
  return jnp.maximum(jnp.asarray(step, dtype=jnp.float32), 0.0)


def _f32(x: float) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _linear_warmup(step: jax.Array, peak_lr: float, warmup_steps: int,
                   after: jax.Array) -> jax.Array:
  """``peak_lr * step / warmup_steps`` for ``step < warmup_steps``, else ``after``.

  Computed as ``step * float32(peak_lr / warmup_steps)``: multiplying by a constant is
  monotone under rounding (XLA's vectorised CPU division is not correctly rounded, so we
  avoid dividing by a constant throughout). The min() guards against a 1-ulp overshoot of
  ``peak_lr`` for enormous warmups.
  """
  if warmup_steps == 0:
    return after
  hi = _f32(peak_lr)
  ramp = jnp.minimum(step * jnp.float32(peak_lr / warmup_steps), hi)
  return jnp.where(step < warmup_steps, ramp, after)


def _remaining(step: jax.Array, end: int, length: int) -> jax.Array:
  """Fraction of the decay phase ``[end - length, end]`` still to go: 1 at its start, 0 at end.

  Exactly 1 up to the start, exactly 0 from ``end`` on, and non-increasing in between. A
  phase of length 0 (e.g. ``warmup_steps == total_steps``) is treated as already over at
  ``end``, which also avoids dividing by zero. Computed as ``(end - step) / length`` rather
  than ``1 - progress`` so that it keeps its relative accuracy near the end of the phase,
  where the learning rate is smallest.
  """
  if length == 0:
    return jnp.where(step < end, 1.0, 0.0).astype(jnp.float32)
  frac = (jnp.float32(end) - step) * jnp.float32(1.0 / length)
  # length * float32(1 / length) need not round to 1, hence the explicit start.
  return jnp.where(step <= end - length, 1.0, jnp.clip(frac, 0.0, 1.0))


def _progress(step: jax.Array, start: int, length: int) -> jax.Array:
  """``clip((step - start) / length, 0, 1)``: the complement of :func:`_remaining`.

  Computed from the step, not as ``1 - remaining``, so it is accurate near 0.
  """
  return jnp.clip((step - jnp.float32(start)) * jnp.float32(1.0 / max(length, 1)), 0.0, 1.0)


def _cosine_factor(remaining: jax.Array) -> jax.Array:
  """``0.5 * (1 + cos(pi * p))`` with ``p = 1 - remaining``, evaluated as ``sin(pi/2 * r)**2``.

  The two are equal (half-angle identity), but ``1 + cos(x)`` cancels catastrophically in
  float32 as ``x -> pi``: near the end of a decay it would carry an absolute error of ~6e-8,
  i.e. a large relative error in a small learning rate. ``sin(pi/2 * r)`` of a small ``r``
  is accurate to an ulp.
  """
  return jnp.square(jnp.sin(jnp.float32(_HALF_PI) * remaining))


def _interp(min_lr: float, peak_lr: float, remaining: jax.Array,
            factor: jax.Array) -> jax.Array:
  """``min_lr + (peak_lr - min_lr) * factor``, for a factor in [0, 1] that decays with time.

  Exactly the float32 ``peak_lr`` where ``remaining == 1`` (decay not started) and exactly the
  float32 ``min_lr`` where ``remaining == 0`` (decay over), whatever the rounding of
  ``factor`` there; in between the clip keeps rounding from leaving [min_lr, peak_lr]. The
  form ``lo + factor * (hi - lo)`` (difference taken in float64) is monotone in ``factor``.
  """
  lo, hi = _f32(min_lr), _f32(peak_lr)
  mid = jnp.clip(lo + factor * jnp.float32(peak_lr - min_lr), lo, hi)
  return jnp.where(remaining >= 1.0, hi, jnp.where(remaining <= 0.0, lo, mid))


def _gamma_power(log_gamma: float, n: jax.Array) -> jax.Array:
  """``gamma ** n`` for float32 ``n >= 0`` (an integer count) given ``log(gamma) <= 0``.

  ``jnp.power(float32(gamma), n)`` multiplies the rounding error of ``gamma`` by ``n``
  (~1e-6 relative after 50 steps of gamma=0.9). Instead ``log(gamma)`` is taken in float64
  and split into a head with 8 significant bits plus a tail, so ``n * head`` is exact in
  float32 for n < 2**16 and ``exp(n * head) * exp(n * tail)`` is accurate to a few ulps.
  The tail exponent is clipped: once it is large, ``exp(n * head)`` has underflowed to 0 and
  the clip only keeps ``0 * inf`` (NaN) away.
  """
  if log_gamma == 0.0:
    return jnp.ones_like(n)
  mant, expo = math.frexp(log_gamma)
  head = math.ldexp(round(mant * 2.0**8), expo - 8)
  tail = log_gamma - head
  tail_exp = jnp.clip(n * jnp.float32(tail), -64.0, 64.0)
  return jnp.exp(n * jnp.float32(head)) * jnp.exp(tail_exp)


def _check_warmup_total(owner: str, warmup_steps: Any, total_steps: Any) -> tuple[int, int]:
  total = _steps(owner, "total_steps", total_steps, lo=1)
  warmup = _steps(owner, "warmup_steps", warmup_steps, lo=0)
  if warmup > total:
    raise ValueError(f"{owner}: `warmup_steps` ({warmup}) must be <= `total_steps` ({total})")
  return warmup, total


def _check_peak_min(owner: str, peak_lr: Any, min_lr: Any,
                    peak_name: str = "peak_lr", min_name: str = "min_lr") -> tuple[float, float]:
  peak = _real(owner, peak_name, peak_lr, lo=0.0)
  low = _real(owner, min_name, min_lr, lo=0.0, hi=peak)
  return peak, low


def _decay_schedule(peak: float, low: float, warmup: int, total: int,
                    factor: Callable[[jax.Array], jax.Array]) -> Schedule:
  """The warmup-then-decay shape of ``warmup_cosine``, ``linear_decay``,
  ``polynomial_decay`` and ``cosine_annealing`` (validated arguments).

  ``peak * t / W`` for ``t < W``, then ``low + (peak - low) * factor(r)`` with ``r`` the
  fraction of ``[W, T]`` still to go (:func:`_remaining`); ``low`` from ``T`` on.
  """
  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    rem = _remaining(t, total, total - warmup)
    return _linear_warmup(t, peak, warmup, _interp(low, peak, rem, factor(rem)))

  return _with_milestones(schedule, warmup, total)


def _warmup_then_decay(owner: str, peak_lr: Any, warmup_steps: Any, total_steps: Any,
                       min_lr: Any, factor: Callable[[jax.Array], jax.Array]) -> Schedule:
  """Validates the HF-style ``(peak_lr, warmup_steps, total_steps, min_lr)``, then
  :func:`_decay_schedule`."""
  peak, low = _check_peak_min(owner, peak_lr, min_lr)
  warmup, total = _check_warmup_total(owner, warmup_steps, total_steps)
  return _decay_schedule(peak, low, warmup, total, factor)


# ----------------------------------------------------------------------------------------
# Warmup + decay schedules (Hugging Face transformers semantics).
# ----------------------------------------------------------------------------------------


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0) -> Schedule:
  r"""Linear warmup then half-cosine decay from ``peak_lr`` to ``min_lr``.

  .. math::

    \mathrm{lr}(t) = \begin{cases}
      \mathrm{peak} \cdot t / W & t < W \\
      \mathrm{min} + (\mathrm{peak} - \mathrm{min}) \cdot \tfrac12 (1 + \cos(\pi p))
        & t \ge W,\quad p = \mathrm{clip}\big(\tfrac{t - W}{T - W}, 0, 1\big)
    \end{cases}

  Reference: Hugging Face ``get_cosine_schedule_with_warmup`` (``num_cycles=0.5``) and its
  min-lr variant ``get_cosine_with_min_lr_schedule_with_warmup`` (``min_lr_rate =
  min_lr / peak_lr``).

  Differences from HF, on purpose: HF's cosine keeps going past ``total_steps`` (it rises
  again); here ``p`` is clipped, so the rate is ``min_lr`` at ``t = T`` and stays there. If
  ``warmup_steps == total_steps`` there is no decay phase: the warmup ramp runs up to
  ``T - 1`` and the rate is ``min_lr`` from ``t = T`` on (HF would give ``peak`` at ``T``).

  Args:
    peak_lr: learning rate at the end of warmup, >= 0.
    warmup_steps: W, number of warmup steps, 0 <= W <= total_steps.
    total_steps: T >= 1, the step at which the decay reaches ``min_lr``.
    min_lr: final learning rate, 0 <= min_lr <= peak_lr.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  return _warmup_then_decay("warmup_cosine", peak_lr, warmup_steps, total_steps, min_lr,
                            _cosine_factor)


def linear_decay(peak_lr: float, warmup_steps: int, total_steps: int,
                 min_lr: float = 0.0) -> Schedule:
  r"""Linear warmup then linear decay from ``peak_lr`` to ``min_lr`` at ``total_steps``.

  .. math::

    \mathrm{lr}(t) = \begin{cases}
      \mathrm{peak} \cdot t / W & t < W \\
      \mathrm{min} + (\mathrm{peak} - \mathrm{min}) \cdot
        \mathrm{clip}\big(\tfrac{T - t}{T - W}, 0, 1\big) & t \ge W
    \end{cases}

  Reference: Hugging Face ``get_linear_schedule_with_warmup`` (which decays to 0; ``min_lr``
  here is a floor the line ends at, the HF schedule is the case ``min_lr = 0``). As in HF,
  ``warmup_steps == total_steps`` gives ``min_lr`` from ``t = T`` on.

  Arguments and result: as :func:`warmup_cosine`.
  """
  return _warmup_then_decay("linear_decay", peak_lr, warmup_steps, total_steps, min_lr,
                            lambda rem: rem)


def polynomial_decay(peak_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0, power: float = 1.0) -> Schedule:
  r"""Linear warmup then polynomial decay from ``peak_lr`` to ``min_lr``.

  .. math::

    \mathrm{lr}(t) = \begin{cases}
      \mathrm{peak} \cdot t / W & t < W \\
      (\mathrm{peak} - \mathrm{min}) \cdot \big(1 - \tfrac{t - W}{T - W}\big)^{\mathrm{power}}
        + \mathrm{min} & W \le t \le T \\
      \mathrm{min} & t > T
    \end{cases}

  Reference: Hugging Face ``get_polynomial_decay_schedule_with_warmup`` with
  ``lr_end = min_lr`` (HF also requires ``lr_end <= lr_init``). ``power = 1`` is
  :func:`linear_decay`. Where HF divides by zero (``warmup_steps == total_steps`` at
  ``t = T``) we return ``min_lr``, like the other decays.

  Args:
    power: exponent of the decay, > 0 (< 1 decays fast late, > 1 decays fast early). The
      other arguments and the result: as :func:`warmup_cosine`.
  """
  owner = "polynomial_decay"
  pw = _real(owner, "power", power, lo=0.0, lo_open=True)
  # Integer powers (the common 1 and 2) go through repeated multiplication, which is exact
  # to an ulp; a general float power is exp(power * log(x)) inside XLA.
  exponent = int(pw) if pw.is_integer() and pw <= 64 else jnp.float32(pw)
  return _warmup_then_decay(owner, peak_lr, warmup_steps, total_steps, min_lr,
                            lambda rem: jnp.power(rem, exponent))


def constant_with_warmup(peak_lr: float, warmup_steps: int) -> Schedule:
  r"""Linear warmup then constant ``peak_lr``.

  .. math::

    \mathrm{lr}(t) = \mathrm{peak} \cdot \min(1, t / W)

  Reference: Hugging Face ``get_constant_schedule_with_warmup``. ``warmup_steps = 0`` is a
  constant schedule (HF ``get_constant_schedule``).

  Args:
    peak_lr: learning rate after warmup, >= 0.
    warmup_steps: W >= 0.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "constant_with_warmup"
  peak = _real(owner, "peak_lr", peak_lr, lo=0.0)
  warmup = _steps(owner, "warmup_steps", warmup_steps, lo=0)

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    return _linear_warmup(t, peak, warmup, jnp.full_like(t, peak))

  return _with_milestones(schedule, warmup)


def inverse_sqrt(peak_lr: float, warmup_steps: int, timescale: int | None = None) -> Schedule:
  r"""Linear warmup then inverse-square-root decay.

  .. math::

    \mathrm{lr}(t) = \begin{cases}
      \mathrm{peak} \cdot t / W & t < W \\
      \mathrm{peak} / \sqrt{(t + \tau - W) / \tau} & t \ge W
    \end{cases}

  with timescale ``tau`` defaulting to ``W``, or 10000 when ``W = 0``. With the default
  ``tau = W`` this is the Transformer schedule ``peak * sqrt(W / t)`` after warmup.

  Reference: Hugging Face ``get_inverse_sqrt_schedule``. There is no end and no ``min_lr``:
  the rate decays towards 0 forever. ``(t + tau - W) / tau`` is evaluated as
  ``1 + (t - W) / tau`` in float32, so large steps cannot overflow.

  Args:
    peak_lr: learning rate at the end of warmup, >= 0.
    warmup_steps: W >= 0.
    timescale: tau >= 1 (an integer number of steps), or None for the default.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "inverse_sqrt"
  peak = _real(owner, "peak_lr", peak_lr, lo=0.0)
  warmup = _steps(owner, "warmup_steps", warmup_steps, lo=0)
  if timescale is None:
    tau = warmup or 10_000
  else:
    tau = _steps(owner, "timescale", timescale, lo=1)

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    # The max() only matters inside the warmup, whose value jnp.where discards anyway.
    since = jnp.maximum(t - jnp.float32(warmup), 0.0)
    decayed = _f32(peak) / jnp.sqrt(1.0 + since * jnp.float32(1.0 / tau))
    # Exactly peak at the end of warmup (XLA's division need not give peak / 1 == peak).
    decayed = jnp.where(since <= 0.0, _f32(peak), decayed)
    return _linear_warmup(t, peak, warmup, decayed)

  return _with_milestones(schedule, warmup)


def wsd(peak_lr: float, warmup_steps: int, stable_steps: int, decay_steps: int,
        min_lr: float = 0.0, decay_type: str = "linear") -> Schedule:
  r"""Warmup-stable-decay ("trapezoidal") schedule.

  With ``S = W + stable_steps`` the start and ``E = S + decay_steps`` the end of the decay,
  and ``p = clip((t - S) / decay_steps, 0, 1)``:

  .. math::

    \mathrm{lr}(t) = \begin{cases}
      \mathrm{peak} \cdot t / W & t < W \\
      \mathrm{peak} & W \le t < S \\
      \mathrm{min} + (\mathrm{peak} - \mathrm{min}) \cdot f(p) & S \le t
    \end{cases}
    \qquad f(p) = \begin{cases}
      1 - p & \text{"linear"} \\
      \tfrac12 (1 + \cos \pi p) & \text{"cosine"} \\
      1 - \sqrt{p} & \text{"1-sqrt"}
    \end{cases}

  so the rate is ``min_lr`` from ``t = E`` on. Reference: Hugging Face ``get_wsd_schedule``
  (MiniCPM; Hagele et al. 2024 for "1-sqrt"), with an absolute ``min_lr`` in place of HF's
  ``min_lr_ratio = min_lr / peak_lr``. One difference: HF's warmup starts at
  ``min_lr_ratio * peak``; here every warmup starts at 0 (identical when ``min_lr = 0``).
  HF's default decay is cosine; ours is linear.

  ``1 - sqrt(p)`` is evaluated as ``(1 - p) / (1 + sqrt(p))`` with both ``p`` and ``1 - p``
  clipped to [0, 1] first: that is NaN-free before the decay (where ``p`` would be negative)
  and accurate near its end. A ``decay_steps`` of 0 drops from ``peak`` to ``min_lr`` at S.

  Args:
    peak_lr: learning rate of the stable phase, >= 0.
    warmup_steps: W >= 0.
    stable_steps: number of steps at ``peak_lr`` after warmup, >= 0.
    decay_steps: length of the decay, >= 0.
    min_lr: final learning rate, 0 <= min_lr <= peak_lr.
    decay_type: one of "linear", "cosine", "1-sqrt".

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "wsd"
  peak, low = _check_peak_min(owner, peak_lr, min_lr)
  warmup = _steps(owner, "warmup_steps", warmup_steps, lo=0)
  stable = _steps(owner, "stable_steps", stable_steps, lo=0)
  decay = _steps(owner, "decay_steps", decay_steps, lo=0)
  check_choice(owner, "decay_type", decay_type, _WSD_DECAY_TYPES)
  if warmup + stable + decay < 1:
    raise ValueError(f"{owner}: the schedule is empty: `warmup_steps` + `stable_steps` + "
                     f"`decay_steps` must be >= 1, got {warmup} + {stable} + {decay}")
  start = warmup + stable
  end = start + decay

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    rem = _remaining(t, end, decay)  # 1 - p; 1 up to S, 0 from E on
    if decay_type == "linear":
      factor = rem
    elif decay_type == "cosine":
      factor = _cosine_factor(rem)
    else:  # "1-sqrt": 1 - sqrt(p) == (1 - p) / (1 + sqrt(p)), without the cancellation
      factor = rem / (1.0 + jnp.sqrt(_progress(t, start, decay)))
    # In the stable phase rem == 1, so _interp gives exactly peak.
    return _linear_warmup(t, peak, warmup, _interp(low, peak, rem, factor))

  return _with_milestones(schedule, warmup, start, end)


# ----------------------------------------------------------------------------------------
# PyTorch lr_scheduler closed forms.
# ----------------------------------------------------------------------------------------


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
  r"""Multiply the rate by ``gamma`` every ``step_size`` steps.

  .. math::

    \mathrm{lr}(t) = \mathrm{lr} \cdot \gamma^{\lfloor t / \mathrm{step\_size} \rfloor}

  Reference: the closed form of PyTorch ``torch.optim.lr_scheduler.StepLR`` (which applies
  the same factor recursively). ``gamma`` must be in (0, 1] for a decay. The floor is an
  exact integer division for integer steps (no float32 rounding of ``t / step_size``).

  Args:
    lr: initial learning rate, >= 0.
    step_size: period of the decay in steps, >= 1.
    gamma: multiplicative factor per period, 0 < gamma <= 1.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "step_decay"
  base = _real(owner, "lr", lr, lo=0.0)
  size = _steps(owner, "step_size", step_size, lo=1)
  g = _real(owner, "gamma", gamma, lo=0.0, lo_open=True, hi=1.0)
  log_gamma = math.log(g)

  def schedule(step: Any) -> jax.Array:
    n = _num_periods(step, size)
    return _f32(base) * _gamma_power(log_gamma, n)

  return _with_milestones(schedule, size)


def _num_periods(step: Any, size: int) -> jax.Array:
  """``floor(max(step, 0) / size)`` as float32, exact for integer steps.

  Dispatches on the step's type/dtype, which is static under jit, never on its value.
  """
  _check_step(step)
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
    return jnp.float32(max(int(step), 0) // size)
  if isinstance(step, np.ndarray) and np.issubdtype(step.dtype, np.integer):
    # NumPy int64 steps would wrap if cast to int32 first; divide in NumPy.
    return jnp.asarray(np.maximum(step, 0) // size, dtype=jnp.float32)
  s = jnp.asarray(step)
  if jnp.issubdtype(s.dtype, jnp.integer):
    if size > jnp.iinfo(s.dtype).max:
      return jnp.zeros(s.shape, jnp.float32)  # every representable step is < size
    return (jnp.maximum(s, 0) // size).astype(jnp.float32)
  t = _float_step(s)
  n = jnp.floor(t * jnp.float32(1.0 / size))
  # The product with the rounded reciprocal can land an ulp on the wrong side of an integer
  # (61 * float32(1/61) < 1); step back onto n * size <= t < (n + 1) * size, which is exact
  # for steps below 2**24.
  n = jnp.where((n + 1.0) * size <= t, n + 1.0, n)
  return jnp.where(n * size > t, n - 1.0, n)


def exponential_lr(lr: float, gamma: float) -> Schedule:
  r"""Multiply the rate by ``gamma`` every step: PyTorch's ``ExponentialLR``.

  .. math::

    \mathrm{lr}(t) = \mathrm{lr} \cdot \gamma^{t}

  Reference: the closed form of PyTorch ``torch.optim.lr_scheduler.ExponentialLR``, whose
  name and arguments it keeps. Not ``optax.exponential_decay(init_value,
  transition_steps, decay_rate, ...)`` (a decay by ``decay_rate`` per
  ``transition_steps``, with staircase and end value), hence the other name; this is
  ``optax.exponential_decay(lr, 1, gamma)``. ``gamma`` must be in (0, 1] for a decay.

  Args:
    lr: initial learning rate, >= 0.
    gamma: multiplicative factor per step, 0 < gamma <= 1.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "exponential_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  g = _real(owner, "gamma", gamma, lo=0.0, lo_open=True, hi=1.0)
  log_gamma = math.log(g)

  def schedule(step: Any) -> jax.Array:
    return _f32(base) * _gamma_power(log_gamma, _float_step(step))

  return _with_milestones(schedule)


def cosine_annealing(lr: float, T_max: int, eta_min: float = 0.0) -> Schedule:  # noqa: N803
  r"""Half-cosine from ``lr`` to ``eta_min`` over ``T_max`` steps, then ``eta_min``.

  .. math::

    \mathrm{lr}(t) = \eta_{min} + (\mathrm{lr} - \eta_{min})
      \cdot \tfrac12 \big(1 + \cos(\pi \min(t, T_{max}) / T_{max})\big)

  Reference: the closed form of PyTorch ``torch.optim.lr_scheduler.CosineAnnealingLR``
  (SGDR without restarts). Deliberate difference: PyTorch's closed form is periodic (it
  climbs back to ``lr`` by ``2 * T_max``); here ``t`` is clamped to ``T_max``, so the rate
  stays at ``eta_min``, the usual intent when ``T_max`` is the run length. We also require
  ``0 <= eta_min <= lr`` (PyTorch accepts an increasing "annealing").

  Args:
    lr: initial learning rate, >= 0.
    T_max: number of steps of the half-cosine, >= 1.
    eta_min: final learning rate, 0 <= eta_min <= lr.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "cosine_annealing"
  base, low = _check_peak_min(owner, lr, eta_min, peak_name="lr", min_name="eta_min")
  t_max = _steps(owner, "T_max", T_max, lo=1)
  # warmup_cosine without warmup.
  return _decay_schedule(base, low, 0, t_max, _cosine_factor)
