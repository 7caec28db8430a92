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

PyTorch twins. Every ``torch.optim.lr_scheduler`` class has a snake_case twin taking the
base rate first as ``lr`` (``base_lr`` / ``max_lr`` for CyclicLR / OneCycleLR) and torch's own
argument names after it: ``step_lr``, ``multi_step_lr``, ``constant_lr``, ``linear_lr``,
``exponential_lr``, ``polynomial_lr``, ``cosine_annealing_lr``,
``cosine_annealing_warm_restarts``, ``cyclic_lr``, ``one_cycle_lr``, ``sequential_lr``,
``chained_scheduler``, ``lambda_lr``, ``multiplicative_lr``, and ``reduce_lr_on_plateau``
(stateful: an optax transformation taking ``value=``). ``cyclic_momentum`` and
``one_cycle_momentum`` give the momentum / ``betas[0]`` those two schedulers write each
step. Index convention: ``schedule(n)`` is the rate torch uses for the (n+1)-th
``optimizer.step()``, after n ``scheduler.step()`` calls. The twins follow a torch run, so
they do *not* follow the "stay at min_lr" convention above: ``cosine_annealing_lr`` is
periodic past ``T_max`` as torch's is, ``one_cycle_lr`` holds the value torch computes at
``total_steps``; each docstring says what happens past the end.

Names: none of these is the name of an ``optax.schedules`` function with other arguments.
The PyTorch twins are named after their ``lr_scheduler`` class (``exponential_lr`` is
``ExponentialLR``: ``optax.exponential_decay(init_value, transition_steps, decay_rate)``
is a different function); the warmup/decay shapes after what they do.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import optax

from jaxopt_llm._validation import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_scalar,
    is_concrete,
)

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
  # Twins of the torch.optim.lr_scheduler classes.
  "step_lr",
  "multi_step_lr",
  "constant_lr",
  "linear_lr",
  "polynomial_lr",
  "cosine_annealing_lr",
  "cosine_annealing_warm_restarts",
  "cyclic_lr",
  "cyclic_momentum",
  "one_cycle_lr",
  "one_cycle_momentum",
  "sequential_lr",
  "chained_scheduler",
  "lambda_lr",
  "multiplicative_lr",
  "reduce_lr_on_plateau",
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
  return _step_schedule("step_decay", lr, step_size, gamma)


def _step_schedule(owner: str, lr: Any, step_size: Any, gamma: Any) -> Schedule:
  """``step_decay`` / ``step_lr`` (validated, errors prefixed with ``owner``)."""
  base = _real(owner, "lr", lr, lo=0.0)
  size = _steps(owner, "step_size", step_size, lo=1)
  g = _real(owner, "gamma", gamma, lo=0.0, lo_open=True, hi=1.0)
  log_gamma = math.log(g)

  def schedule(step: Any) -> jax.Array:
    n = _num_periods(step, size)
    return _f32(base) * _gamma_power(log_gamma, n)

  return _with_milestones(schedule, size)


def _period_position(step: Any, size: int) -> tuple[jax.Array, jax.Array]:
  """``(floor(n / size), n mod size)`` as float32 for ``n = max(step, 0)``.

  The position is taken in integer arithmetic for integer steps, exact at every step:
  ``t - k * size`` in float32 keeps nothing of it once the step passes 2**24 (at step
  2**31 - 1, CyclicLR's position came out negative and the rate below ``base_lr``). Float
  steps get ``t - k * size`` kept in ``[0, size]``.
  """
  k = _num_periods(step, size)
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
    return k, jnp.float32(max(int(step), 0) % size)
  if isinstance(step, np.ndarray) and np.issubdtype(step.dtype, np.integer):
    return k, jnp.asarray(np.maximum(step, 0) % size, dtype=jnp.float32)
  s = jnp.asarray(step)
  if jnp.issubdtype(s.dtype, jnp.integer):
    if size > jnp.iinfo(s.dtype).max:  # every representable step is < size
      return k, jnp.maximum(s, 0).astype(jnp.float32)
    return k, (jnp.maximum(s, 0) % size).astype(jnp.float32)
  t = _float_step(s)
  return k, jnp.clip(t - k * jnp.float32(size), 0.0, jnp.float32(size))


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


# ----------------------------------------------------------------------------------------
# Twins of every torch.optim.lr_scheduler class.
#
# Index convention (all of them): ``schedule(n)`` is the learning rate PyTorch uses for the
# (n+1)-th ``optimizer.step()``, i.e. ``optimizer.param_groups[0]["lr"]`` after ``n`` calls
# of ``scheduler.step()`` (n = updates already applied, what optax passes as ``count``).
# The momentum twins (``cyclic_momentum``, ``one_cycle_momentum``) give the ``momentum`` /
# ``betas[0]`` PyTorch writes into the param group at the same point.
#
# PyTorch computes most of these recursively (``lr <- lr * ratio``) in Python float64; we
# evaluate the closed form the recursion telescopes to, in float32, accurate to a few ulps
# of float32 (the tests compare against the real classes, stepped past their ends). Where
# the recursion and its closed form differ (ConstantLR/LinearLR with ``total_iters=0``,
# MultiStepLR's negative milestones) we follow the recursion, i.e. what a torch run does.
# ----------------------------------------------------------------------------------------

_F32_EXACT = 2**24  # integers up to here are exact in float32


def step_lr(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
  r"""PyTorch ``StepLR``: :func:`step_decay` under torch's name.

  .. math::

    \mathrm{lr}(n) = \mathrm{lr} \cdot \gamma^{\lfloor n / \mathrm{step\_size} \rfloor}

  Args:
    lr: initial learning rate (the optimizer's ``lr``), >= 0.
    step_size: period of the decay, >= 1.
    gamma: factor per period, 0 < gamma <= 1 (torch also accepts a growing gamma > 1;
      refused here).

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  return _step_schedule("step_lr", lr, step_size, gamma)


def _milestone_ints(owner: str, name: str, milestones: Any) -> tuple[int, ...]:
  """A sequence of integers in [0, 2**24) (kept with multiplicity, sorted)."""
  if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
    raise ValueError(f"{owner}: `{name}` must be a list of integers, got {milestones!r}")
  out = []
  for m in milestones:
    if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, np.integer)):
      raise ValueError(f"{owner}: `{name}` must be a list of integers, got {milestones!r}")
    if not 0 <= m < _F32_EXACT:
      raise ValueError(f"{owner}: `{name}` must be integers in [0, 2**24), got {milestones!r}")
    out.append(int(m))
  return tuple(sorted(out))


def multi_step_lr(lr: float, milestones: Any, gamma: float = 0.1) -> Schedule:
  r"""PyTorch ``MultiStepLR``: multiply by ``gamma`` at each milestone.

  .. math::

    \mathrm{lr}(n) = \mathrm{lr} \cdot \gamma^{\#\{i : m_i \le n\}}

  A milestone listed twice counts twice (torch keeps a ``Counter``); the order does not
  matter. A milestone 0 applies from step 0 (as in torch).

  Args:
    lr: initial learning rate, >= 0.
    milestones: integer steps in [0, 2**24) (torch never reaches a negative milestone;
      refused here).
    gamma: factor per milestone, 0 < gamma <= 1.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "multi_step_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  marks = _milestone_ints(owner, "milestones", milestones)
  g = _real(owner, "gamma", gamma, lo=0.0, lo_open=True, hi=1.0)
  log_gamma = math.log(g)
  marks_f32 = np.asarray(marks, np.float32)

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    if not marks:
      return jnp.full_like(t, base)
    count = jnp.sum((t[..., None] >= marks_f32).astype(jnp.float32), axis=-1)
    return _f32(base) * _gamma_power(log_gamma, count)

  return _with_milestones(schedule, *marks)


def constant_lr(lr: float, factor: float = 1.0 / 3, total_iters: int = 5) -> Schedule:
  r"""PyTorch ``ConstantLR``: ``lr * factor`` for the first ``total_iters`` steps, then ``lr``.

  .. math::

    \mathrm{lr}(n) = \begin{cases} \mathrm{lr} \cdot \mathrm{factor} & n < T \\
      \mathrm{lr} & n \ge T \end{cases}

  As torch's recursion does, ``total_iters = 0`` gives ``lr * factor`` for every step
  (torch applies the factor at step 0 and never undoes it; its closed form would say ``lr``).

  Args:
    lr: base learning rate, >= 0.
    factor: 0 < factor <= 1 (torch divides by it at ``total_iters``; 0 is allowed only
      with ``total_iters = 0``).
    total_iters: T >= 0.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "constant_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  total = _steps(owner, "total_iters", total_iters, lo=0)
  f = _real(owner, "factor", factor, lo=0.0, hi=1.0, lo_open=total > 0)
  low = base * f

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    if total == 0:
      return jnp.full_like(t, low)
    return jnp.where(t < total, _f32(low), _f32(base))

  return _with_milestones(schedule, total)


def linear_lr(lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
              total_iters: int = 5) -> Schedule:
  r"""PyTorch ``LinearLR``: the factor moves linearly from ``start_factor`` to ``end_factor``.

  .. math::

    \mathrm{lr}(n) = \mathrm{lr} \cdot \big(s + (e - s) \min(n, T) / T\big)

  evaluated as ``(lr*s * (T - m) + lr*e * m) / T`` with ``m = min(n, T)`` (a sum of two
  non-negative terms: no cancellation when ``e = 0``). ``total_iters = 0`` gives
  ``lr * start_factor`` for every step, as torch's recursion does.

  Args:
    lr: base learning rate, >= 0.
    start_factor: 0 < s <= 1 (torch's range).
    end_factor: 0 <= e <= 1.
    total_iters: T >= 0.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "linear_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  s = _real(owner, "start_factor", start_factor, lo=0.0, lo_open=True, hi=1.0)
  e = _real(owner, "end_factor", end_factor, lo=0.0, hi=1.0)
  total = _steps(owner, "total_iters", total_iters, lo=0)
  first, last = base * s, base * e

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    if total == 0:
      return jnp.full_like(t, first)
    m = jnp.minimum(t, jnp.float32(total))
    mid = (_f32(first) * (jnp.float32(total) - m) + _f32(last) * m) * jnp.float32(1.0 / total)
    return jnp.where(t <= 0.0, _f32(first), jnp.where(m >= total, _f32(last), mid))

  return _with_milestones(schedule, total)


def polynomial_lr(lr: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
  r"""PyTorch ``PolynomialLR``: polynomial decay to 0 at ``total_iters``, then 0.

  .. math::

    \mathrm{lr}(n) = \mathrm{lr} \cdot \big(1 - \min(n, T) / T\big)^{\mathrm{power}}

  This is :func:`polynomial_decay` without warmup and with ``min_lr = 0``.

  Args:
    lr: base learning rate, >= 0.
    total_iters: T >= 1.
    power: > 0 (torch's recursion divides by zero for a negative power; 0 would be a
      constant schedule).

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "polynomial_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  total = _steps(owner, "total_iters", total_iters, lo=1)
  pw = _real(owner, "power", power, lo=0.0, lo_open=True)
  exponent = int(pw) if pw.is_integer() and pw <= 64 else jnp.float32(pw)
  return _decay_schedule(base, 0.0, 0, total, lambda rem: jnp.power(rem, exponent))


def _blend(end: float, start: float, factor: jax.Array) -> jax.Array:
  """``end + (start - end) * factor`` for a factor in [0, 1] (either of ``start``/``end`` may
  be the larger): exactly ``start`` at factor 1 and ``end`` at factor 0, and never outside
  the two (rounding)."""
  lo, hi = _f32(min(start, end)), _f32(max(start, end))
  mid = jnp.clip(_f32(end) + factor * jnp.float32(start - end), lo, hi)
  return jnp.where(factor >= 1.0, _f32(start), jnp.where(factor <= 0.0, _f32(end), mid))


def cosine_annealing_lr(lr: float, T_max: int, eta_min: float = 0.0) -> Schedule:  # noqa: N803
  r"""PyTorch ``CosineAnnealingLR`` as a torch run produces it, also past ``T_max``.

  .. math::

    \mathrm{lr}(n) = \eta_{min} + (\mathrm{lr} - \eta_{min})
      \cdot \tfrac12 \big(1 + \cos(\pi n / T_{max})\big)

  for every ``n``: periodic with period ``2 T_max`` (down to ``eta_min`` at ``T_max``, back
  up to ``lr`` at ``2 T_max``, ...). Torch steps a recursion
  ``lr_n = eta_min + (lr_{n-1} - eta_min) (1 + cos(pi n/T)) / (1 + cos(pi (n-1)/T))`` (with an
  additive restart at ``n = T + 1 (mod 2T)``); in exact arithmetic it telescopes to the
  formula above, so this is its closed form. What remains is torch's own float64 rounding,
  which grows with ``T_max`` and the number of periods when ``eta_min > 0`` (measured:
  below 1e-12 relative for T_max <= 2000, 6e-10 for T_max = 20000, 1.5e-7 for T_max = 1e5
  with eta_min = lr / 2 over three periods); this schedule is the exact value, in float32.

  Unlike :func:`cosine_annealing` (which stays at ``eta_min`` after ``T_max``, the usual
  intent), this is the twin of a torch run. ``eta_min > lr`` (an increasing "annealing")
  is allowed, as in torch. The factor ``(1 + cos x)/2`` is evaluated as ``sin^2`` of the
  exact integer distance to the nearest zero, so values near ``eta_min = 0`` keep their
  relative accuracy.

  Args:
    lr: base learning rate, >= 0.
    T_max: half period, >= 1.
    eta_min: >= 0.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "cosine_annealing_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  t_max = _steps(owner, "T_max", T_max, lo=1)
  low = _real(owner, "eta_min", eta_min, lo=0.0)

  def schedule(step: Any) -> jax.Array:
    _, r = _period_position(step, 2 * t_max)  # in [0, 2T)
    dist = jnp.abs(r - jnp.float32(t_max))  # from the zero of 1 + cos: factor 0 at dist 0
    return _blend(low, base, _cosine_factor(dist * jnp.float32(1.0 / t_max)))

  return _with_milestones(schedule, 0, t_max, 2 * t_max)


def cosine_annealing_warm_restarts(lr: float, T_0: int, T_mult: int = 1,  # noqa: N803
                                   eta_min: float = 0.0) -> Schedule:
  r"""PyTorch ``CosineAnnealingWarmRestarts`` (SGDR), stepped without an epoch argument.

  .. math::

    \mathrm{lr}(n) = \eta_{min} + (\mathrm{lr} - \eta_{min})
      \cdot \tfrac12 \big(1 + \cos(\pi T_{cur} / T_i)\big)

  Cycle ``i`` (from 0) lasts ``T_i = T_0 T_mult^i`` steps and starts at
  ``S_i = T_0 (T_mult^i - 1) / (T_mult - 1)`` (``i T_0`` for ``T_mult = 1``);
  ``T_cur = n - S_i``. The rate is ``lr`` at each restart and never reaches ``eta_min``
  exactly (the restart comes first), as in torch.

  Args:
    lr: base learning rate (the maximum), >= 0.
    T_0: length of the first cycle, >= 1.
    T_mult: integer growth factor of the cycle length, >= 1.
    eta_min: >= 0.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "cosine_annealing_warm_restarts"
  base = _real(owner, "lr", lr, lo=0.0)
  t0 = _steps(owner, "T_0", T_0, lo=1)
  mult = _steps(owner, "T_mult", T_mult, lo=1)
  low = _real(owner, "eta_min", eta_min, lo=0.0)
  starts, lengths = [0], [t0]
  if mult > 1:
    while starts[-1] + lengths[-1] <= _F32_EXACT:
      starts.append(starts[-1] + lengths[-1])
      lengths.append(lengths[-1] * mult)
  starts_f32 = np.asarray(starts, np.float32)
  lengths_f32 = np.asarray(lengths, np.float32)

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    if mult == 1:
      _, cur = _period_position(step, t0)
      rem = (jnp.float32(t0) - cur) * jnp.float32(1.0 / t0)
    else:
      i = jnp.sum((t[..., None] >= starts_f32[1:]).astype(jnp.int32), axis=-1)
      length = jnp.asarray(lengths_f32)[i]
      rem = (length - (t - jnp.asarray(starts_f32)[i])) / length
    return _blend(low, base, _cosine_factor(rem))

  return _with_milestones(schedule, *starts[:8])


_CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def _cyclic_shape(owner: str, step_size_up: Any, step_size_down: Any, mode: Any, gamma: Any,
                  scale_fn: Any, scale_mode: Any) -> tuple[Callable[[Any], jax.Array], int]:
  """The CyclicLR height ``scale_factor(n) * scale_fn(...)`` in [0, 1] (validated), and
  the cycle length."""
  up = _steps(owner, "step_size_up", step_size_up, lo=1)
  down = up if step_size_down is None else _steps(owner, "step_size_down", step_size_down, lo=0)
  total = up + down
  g = _real(owner, "gamma", gamma, lo=0.0, lo_open=True, hi=1.0)
  log_gamma = math.log(g)
  check_choice(owner, "scale_mode", scale_mode, ("cycle", "iterations"))
  if scale_fn is None:
    check_choice(owner, "mode", mode, _CYCLIC_MODES)
    # torch overrides scale_mode for the built-in modes.
    scale_mode = "iterations" if mode == "exp_range" else "cycle"
  else:
    if not callable(scale_fn):
      raise TypeError(f"{owner}: `scale_fn` must be a callable or None, got {scale_fn!r}")
    try:
      probe = jnp.asarray(scale_fn(jnp.ones((2,), jnp.float32)))
    except Exception as e:  # noqa: BLE001
      raise TypeError(f"{owner}: `scale_fn` must be written with jnp operations (it is called "
                      f"on a float32 array of cycle numbers or steps, traced under jit); "
                      f"calling it on an array failed: {e}") from e
    if probe.shape not in ((), (2,)) or not (jnp.issubdtype(probe.dtype, jnp.floating)
                                             or jnp.issubdtype(probe.dtype, jnp.integer)):
      raise TypeError(f"{owner}: `scale_fn` must map an array of steps to a real array of the "
                      f"same shape (or a constant), got shape {probe.shape} dtype {probe.dtype}")
    # The amplitude is a factor of (max - base): a negative or non-finite one at the first
    # cycle would put the rate outside [base, max] or make it NaN. Only this probe can be
    # checked eagerly; the function's values at later cycles are the caller's.
    if not bool(jnp.all((probe >= 0) & (probe <= 1))):
      raise ValueError(f"{owner}: `scale_fn` must return values in [0, 1] (it scales "
                       f"max - base); at cycle/step 1 it returned {probe}")

  def height(step: Any) -> jax.Array:
    t = _float_step(step)
    k, r = _period_position(step, total)  # torch's cycle - 1, the position in [0, total)
    rising = r * jnp.float32(1.0 / up)
    falling = (jnp.float32(total) - r) * jnp.float32(1.0 / max(down, 1))
    scale = jnp.where(r < up, rising, jnp.where(r == up, 1.0, falling))
    if scale_fn is not None:
      arg = k + 1.0 if scale_mode == "cycle" else t
      amp = jnp.broadcast_to(jnp.asarray(scale_fn(arg)).astype(jnp.float32), t.shape)
    elif mode == "triangular":
      amp = jnp.ones_like(t)
    elif mode == "triangular2":
      amp = jnp.ldexp(jnp.ones_like(t), -jnp.minimum(k, 200.0).astype(jnp.int32))
    else:
      amp = _gamma_power(log_gamma, t)
    return scale * amp

  return height, total


def cyclic_lr(base_lr: float, max_lr: float, step_size_up: int = 2000,
              step_size_down: int | None = None, mode: str = "triangular", gamma: float = 1.0,
              scale_fn: Callable[[Any], Any] | None = None,
              scale_mode: str = "cycle") -> Schedule:
  r"""PyTorch ``CyclicLR`` (Smith 2017): triangular cycles between ``base_lr`` and ``max_lr``.

  With cycle length ``C = up + down``, position ``r = n mod C`` and cycle number
  ``c = floor(n / C) + 1``:

  .. math::

    \mathrm{lr}(n) = \mathrm{base} + (\mathrm{max} - \mathrm{base}) \cdot h(r) \cdot s,
    \qquad h(r) = \begin{cases} r / \mathrm{up} & r \le \mathrm{up} \\
      (C - r) / \mathrm{down} & r > \mathrm{up} \end{cases}

  with ``s = 1`` ("triangular"), ``2^{-(c-1)}`` ("triangular2"), ``gamma^n`` ("exp_range"),
  or ``scale_fn(c)`` / ``scale_fn(n)`` for a custom ``scale_fn`` with ``scale_mode`` "cycle"
  / "iterations" (``mode`` is then ignored, as in torch). A custom ``scale_fn`` must be
  written with ``jnp`` (it receives a float32 array, traced under jit); it is probed on an
  array when the schedule is built.

  Momentum (torch's ``cycle_momentum=True``, the default, for an optimizer with momentum
  or betas): :func:`cyclic_momentum` with the same cycle arguments.

  Args:
    base_lr: the lower bound (the rate at step 0), >= 0.
    max_lr: the upper bound, >= 0.
    step_size_up: steps of the rising half, >= 1.
    step_size_down: steps of the falling half, >= 0 (None: ``step_size_up``).
    mode: "triangular", "triangular2" or "exp_range".
    gamma: the "exp_range" decay, 0 < gamma <= 1.
    scale_fn: optional custom amplitude, values in [0, 1] (its value at cycle/step 1 is
      checked when the schedule is built: outside [0, 1] or NaN is a ValueError).
    scale_mode: "cycle" or "iterations" (for ``scale_fn``).

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "cyclic_lr"
  lo = _real(owner, "base_lr", base_lr, lo=0.0)
  hi = _real(owner, "max_lr", max_lr, lo=0.0)
  height, total = _cyclic_shape(owner, step_size_up, step_size_down, mode, gamma, scale_fn,
                                scale_mode)

  def schedule(step: Any) -> jax.Array:
    return _f32(lo) + jnp.float32(hi - lo) * height(step)

  return _with_milestones(schedule, total)


def cyclic_momentum(base_momentum: float = 0.8, max_momentum: float = 0.9,
                    step_size_up: int = 2000, step_size_down: int | None = None,
                    mode: str = "triangular", gamma: float = 1.0,
                    scale_fn: Callable[[Any], Any] | None = None,
                    scale_mode: str = "cycle") -> Schedule:
  r"""The momentum (``momentum``, or ``betas[0]``) PyTorch's ``CyclicLR`` writes before step n.

  .. math::

    \mathrm{momentum}(n) = \mathrm{max} - (\mathrm{max} - \mathrm{base}) \cdot h(r) \cdot s

  with the height ``h`` and amplitude ``s`` of :func:`cyclic_lr` (same cycle arguments):
  cycled inversely to the learning rate, ``max_momentum`` at each cycle's start.

  Args:
    base_momentum: the momentum at the peak lr, in [0, 1).
    max_momentum: the momentum at the cycle's start, in [0, 1).
    The other arguments: as :func:`cyclic_lr`.

  Returns:
    A schedule ``step -> momentum`` (float32).
  """
  owner = "cyclic_momentum"
  lo = _real(owner, "base_momentum", base_momentum, lo=0.0, hi=1.0, hi_open=True)
  hi = _real(owner, "max_momentum", max_momentum, lo=0.0, hi=1.0, hi_open=True)
  height, total = _cyclic_shape(owner, step_size_up, step_size_down, mode, gamma, scale_fn,
                                scale_mode)

  def schedule(step: Any) -> jax.Array:
    return _f32(hi) - jnp.float32(hi - lo) * height(step)

  return _with_milestones(schedule, total)


def _one_cycle_phases(owner: str, total_steps: Any, pct_start: Any, anneal_strategy: Any,
                      three_phase: Any) -> tuple[int, list[tuple[float, float]]]:
  """``total`` and the phases ``(start_step, end_step)`` of torch's OneCycleLR (validated).

  Torch picks, for step n, the first phase with ``n <= end_step`` (the last phase for any
  later n) and divides by ``end_step - start_step``: a phase of length 0 that some step in
  [0, total_steps] selects would be a ZeroDivisionError in torch; refused here.
  """
  total = _steps(owner, "total_steps", total_steps, lo=1)
  pct = _real(owner, "pct_start", pct_start, lo=0.0, hi=1.0)
  check_choice(owner, "anneal_strategy", anneal_strategy, ("cos", "linear"))
  check_bool(owner, "three_phase", three_phase)
  if three_phase:
    ends = [float(pct * total) - 1, float(2 * pct * total) - 2, total - 1.0]
  else:
    ends = [float(pct * total) - 1, total - 1.0]
  phases = list(zip([0.0] + ends[:-1], ends))
  for i, (start, end) in enumerate(phases):
    lower = max(ends[:i], default=-1.0)  # n > lower selects phase i (n <= end unless last)
    upper = total if i == len(phases) - 1 else min(end, total)
    first = max(0, math.floor(lower) + 1)
    if first <= upper and end == start:
      raise ValueError(f"{owner}: `pct_start` = {pct} with `total_steps` = {total} gives a "
                       f"phase of length 0 (steps {start} to {end}), on which torch's "
                       f"OneCycleLR divides by zero")
  return total, phases


def _one_cycle(total: int, phases: list[tuple[float, float]], values: list[tuple[float, float]],
               strategy: str, floor: float | None = None) -> Schedule:
  """Piecewise anneal ``values[i] = (start_value, end_value)`` over ``phases[i]``; the
  value at ``total`` is held for every later step, and never goes below ``floor`` if given
  (the linear anneal extrapolated to ``total`` can cross it)."""

  def phase_value(t: jax.Array, start: float, end: float, v0: float, v1: float) -> jax.Array:
    if v0 == v1:
      return jnp.full_like(t, v0)
    # Anchored at the smaller of the phase's two values, so the result is a sum of two
    # non-negative terms (no cancellation; values near min_lr keep their relative accuracy):
    # rising, v0 + (v1 - v0) g(p) with p = (t - start) / (end - start); falling,
    # v1 + (v0 - v1) g(1 - p) with 1 - p = (end - t) / (end - start); g(x) = sin^2(pi x / 2)
    # for "cos" (torch's (1 - cos(pi x)) / 2) or x for "linear". p may leave [0, 1] outside
    # the phase, as torch's pct does. The anchor step is split into a float32 head + tail.
    anchor, sign = (start, 1.0) if v0 < v1 else (end, -1.0)
    head = np.float32(anchor)
    tail = np.float32(anchor - float(head))
    x = ((t - jnp.float32(head)) - jnp.float32(tail)) * jnp.float32(sign / (end - start))
    factor = jnp.square(jnp.sin(jnp.float32(_HALF_PI) * x)) if strategy == "cos" else x
    lo, hi = min(v0, v1), max(v0, v1)
    return _f32(lo) + jnp.float32(hi - lo) * factor

  def schedule(step: Any) -> jax.Array:
    t = jnp.minimum(_float_step(step), jnp.float32(total))
    out = phase_value(t, *phases[-1], *values[-1])
    for (start, end), (v0, v1) in reversed(list(zip(phases[:-1], values[:-1]))):
      out = jnp.where(t <= jnp.float32(end), phase_value(t, start, end, v0, v1), out)
    return out if floor is None else jnp.maximum(out, jnp.float32(floor))

  marks = [math.ceil(end) for _, end in phases if end >= 0] + [total]
  return _with_milestones(schedule, *marks)


def one_cycle_lr(max_lr: float, total_steps: int, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False) -> Schedule:
  r"""PyTorch ``OneCycleLR`` (Smith & Topin 2017; fastai's two phases by default).

  With ``initial = max_lr / div_factor`` and ``min = initial / final_div_factor``, the rate
  anneals (cosine ``end + (start - end)(1 + cos(pi p))/2`` or linear) from ``initial`` to
  ``max_lr`` over steps ``[0, pct_start T - 1]``, then from ``max_lr`` to ``min`` until
  ``T - 1`` (``three_phase``: back to ``initial`` by ``2 pct_start T - 2``, then to ``min``
  by ``T - 1``), with torch's phase boundaries and ``p = (n - start)/(end - start)``.

  Torch computes one more value, at ``n = T`` (the last phase extrapolated one step), and
  raises on the next ``scheduler.step()``, so a torch run that goes on keeps that value:
  this schedule returns it for every ``n >= T``. One difference: with
  ``anneal_strategy="linear"`` that extrapolated value can be negative (e.g. ``three_phase``,
  where torch gives -9.7e-5 at ``max_lr=0.1``, T=100); a learning rate below 0 would
  climb the loss, so the schedule gives 0 there instead.

  Momentum (torch's ``cycle_momentum=True``, the default): :func:`one_cycle_momentum`.

  Args:
    max_lr: the peak learning rate, >= 0.
    total_steps: T >= 1.
    pct_start: fraction of T spent rising, in [0, 1].
    anneal_strategy: "cos" or "linear".
    div_factor: ``initial = max_lr / div_factor``, > 0.
    final_div_factor: ``min = initial / final_div_factor``, > 0.
    three_phase: the original paper's three phases.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "one_cycle_lr"
  peak = _real(owner, "max_lr", max_lr, lo=0.0)
  div = _real(owner, "div_factor", div_factor, lo=0.0, lo_open=True)
  final_div = _real(owner, "final_div_factor", final_div_factor, lo=0.0, lo_open=True)
  total, phases = _one_cycle_phases(owner, total_steps, pct_start, anneal_strategy,
                                    three_phase)
  initial = peak / div
  low = initial / final_div
  if three_phase:
    values = [(initial, peak), (peak, initial), (initial, low)]
  else:
    values = [(initial, peak), (peak, low)]
  return _one_cycle(total, phases, values, anneal_strategy, floor=0.0)


def one_cycle_momentum(total_steps: int, base_momentum: float = 0.85,
                       max_momentum: float = 0.95, pct_start: float = 0.3,
                       anneal_strategy: str = "cos", three_phase: bool = False) -> Schedule:
  r"""The momentum (``momentum``, or ``betas[0]``) PyTorch's ``OneCycleLR`` writes before
  step n: cycled inversely to :func:`one_cycle_lr` (same phases and anneal).

  ``max_momentum -> base_momentum`` while the rate rises, then back to ``max_momentum``
  (``three_phase``: ``base -> max`` in phase 2, constant ``max`` in phase 3); held at its
  value at ``total_steps`` afterwards.

  Args:
    total_steps, pct_start, anneal_strategy, three_phase: as :func:`one_cycle_lr`.
    base_momentum: momentum at the peak lr, in [0, 1).
    max_momentum: momentum at the start, in [0, 1).

  Returns:
    A schedule ``step -> momentum`` (float32).
  """
  owner = "one_cycle_momentum"
  lo = _real(owner, "base_momentum", base_momentum, lo=0.0, hi=1.0, hi_open=True)
  hi = _real(owner, "max_momentum", max_momentum, lo=0.0, hi=1.0, hi_open=True)
  total, phases = _one_cycle_phases(owner, total_steps, pct_start, anneal_strategy,
                                    three_phase)
  if three_phase:
    values = [(hi, lo), (lo, hi), (hi, hi)]
  else:
    values = [(hi, lo), (lo, hi)]
  return _one_cycle(total, phases, values, anneal_strategy)


def _check_schedules(owner: str, name: str, schedules: Any) -> list[Callable[[Any], Any]]:
  if isinstance(schedules, (str, bytes)) or not hasattr(schedules, "__iter__"):
    raise ValueError(f"{owner}: `{name}` must be a list of schedules, got {schedules!r}")
  out = list(schedules)
  if not out:
    raise ValueError(f"{owner}: `{name}` must not be empty")
  for i, s in enumerate(out):
    if not callable(s):
      raise TypeError(f"{owner}: `{name}`[{i}] must be a schedule (a callable step -> value), "
                      f"got {s!r}")
  return out


def sequential_lr(schedules: Any, milestones: Any) -> Schedule:
  r"""PyTorch ``SequentialLR``: ``schedules[i]`` from ``milestones[i-1]`` on, counting from 0.

  .. math::

    \mathrm{lr}(n) = s_i(n - m_{i-1}) \quad \text{for } m_{i-1} \le n < m_i
    \qquad (m_{-1} = 0)

  At a milestone torch restarts the next scheduler at its own step 0 (``_update_lr(0)``,
  its closed-form value there: ``lr`` for the twins here) and steps it from there, so each
  schedule here is the twin built as if it ran alone. Caveat for ``from_torch``: a torch
  ``MultiplicativeLR`` after a milestone instead continues from the previous scheduler's
  last rate times ``lr_lambda(0)``; build its :func:`multiplicative_lr` with that ``lr``.

  Args:
    schedules: the schedules (callables ``step -> lr``), at least one.
    milestones: ``len(schedules) - 1`` non-decreasing integer steps in [0, 2**24).

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "sequential_lr"
  scheds = _check_schedules(owner, "schedules", schedules)
  if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
    raise ValueError(f"{owner}: `milestones` must be a list of integers, got {milestones!r}")
  raw = list(milestones)
  marks = _milestone_ints(owner, "milestones", raw)
  if list(marks) != [int(m) for m in raw]:
    raise ValueError(f"{owner}: `milestones` must be non-decreasing, got {raw!r}")
  if len(marks) != len(scheds) - 1:
    raise ValueError(f"{owner}: `milestones` must have len(schedules) - 1 = {len(scheds) - 1} "
                     f"entries, got {len(marks)}")

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    out = jnp.asarray(scheds[0](t), jnp.float32)
    for m, s in zip(marks, scheds[1:]):
      out = jnp.where(t >= m, jnp.asarray(s(t - jnp.float32(m)), jnp.float32), out)
    return out

  inner = [m + int(x) for m, s in zip((0,) + marks, scheds)
           for x in getattr(s, "milestones", ())]
  return _with_milestones(schedule, *marks, *inner)


def chained_scheduler(lr: float, factors: Any) -> Schedule:
  r"""PyTorch ``ChainedScheduler``: the chained schedulers' multiplicative factors compose.

  .. math::

    \mathrm{lr}(n) = \mathrm{lr} \cdot \prod_i f_i(n)

  Representation: each ``f_i`` is a factor schedule ``step -> multiplier``; for a torch
  twin here, that is the twin built with ``lr=1.0`` (e.g. ``chained_scheduler(0.1,
  [linear_lr(1.0, 0.1, total_iters=10), exponential_lr(1.0, 0.99)])``).

  Exact for torch's chainable schedulers, which multiply the shared ``lr`` by a per-step
  ratio: StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR,
  MultiplicativeLR, and CosineAnnealingLR with ``eta_min = 0`` up to ``T_max`` (its
  restart after ``T_max`` adds ``base_lr`` terms instead of multiplying, and with
  ``eta_min > 0`` its step is affine: neither is a product of factors). Schedulers that
  overwrite the rate (LambdaLR, CyclicLR, OneCycleLR, CosineAnnealingWarmRestarts) are
  not chainable in this sense.

  Args:
    lr: base learning rate, >= 0.
    factors: factor schedules, at least one.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "chained_scheduler"
  base = _real(owner, "lr", lr, lo=0.0)
  fs = _check_schedules(owner, "factors", factors)

  def schedule(step: Any) -> jax.Array:
    t = _float_step(step)
    out = jnp.full_like(t, base)
    for f in fs:
      out = out * jnp.asarray(f(t), jnp.float32)
    return out

  return _with_milestones(schedule, *[int(x) for f in fs for x in getattr(f, "milestones", ())])


def _tabulate(owner: str, lr_lambda: Any, total_steps: Any) -> tuple[Callable, int]:
  if not callable(lr_lambda):
    raise TypeError(f"{owner}: `lr_lambda` must be a callable epoch -> factor, got "
                    f"{lr_lambda!r}")
  total = _steps(owner, "total_steps", total_steps, lo=0)

  def factor(n: int) -> float:
    v = lr_lambda(n)
    if isinstance(v, (str, bytes, bool, np.bool_)) or np.ndim(v) != 0:
      raise TypeError(f"{owner}: `lr_lambda`({n}) must return a number, got {v!r}")
    try:
      v = float(v)
    except (TypeError, ValueError) as e:
      raise TypeError(f"{owner}: `lr_lambda`({n}) must return a number, got {v!r}") from e
    if not math.isfinite(v):
      raise ValueError(f"{owner}: `lr_lambda`({n}) = {v} is not finite")
    return v

  return factor, total


def _table_schedule(owner: str, table: np.ndarray) -> Schedule:
  """Looks ``table[min(floor(step), len - 1)]`` up (table in float64, checked, kept as
  float32)."""
  if np.any(table < 0):
    bad = int(np.argmax(table < 0))
    raise ValueError(f"{owner}: `lr_lambda` gives a negative learning rate {table[bad]} at "
                     f"step {bad}")
  with np.errstate(over="ignore"):  # an overflow is the error raised just below
    values = table.astype(np.float32)
  if not np.all(np.isfinite(values)):
    bad = int(np.argmax(~np.isfinite(values)))
    raise ValueError(f"{owner}: `lr_lambda` gives a learning rate {table[bad]} at step {bad} "
                     f"that overflows float32")
  last = len(values) - 1
  device_values = jnp.asarray(values)

  def schedule(step: Any) -> jax.Array:
    _check_step(step)
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
      return device_values[min(max(int(step), 0), last)]
    s = jnp.asarray(step)
    if jnp.issubdtype(s.dtype, jnp.integer):
      idx = jnp.clip(s, 0, min(last, int(jnp.iinfo(s.dtype).max)))
    else:
      idx = jnp.clip(jnp.floor(_float_step(s)), 0, last).astype(jnp.int32)
    return device_values[idx]

  return _with_milestones(schedule, last)


def lambda_lr(lr: float, lr_lambda: Callable[[int], float], total_steps: int) -> Schedule:
  r"""PyTorch ``LambdaLR``: ``lr * lr_lambda(n)``, tabulated for ``n = 0..total_steps``.

  An arbitrary Python ``lr_lambda`` cannot be traced by JAX, so it is called once per step
  when the schedule is built (float64, as torch does) and the rates are kept as a float32
  table (4 bytes per step; a jit constant). Beyond ``total_steps`` the rate stays at
  ``lr * lr_lambda(total_steps)`` (documented clamp: make ``total_steps`` the run length).
  A known closed form (``warmup_cosine`` etc. for Hugging Face's lambdas) is better when
  one exists. A lambda that raises, returns a non-number, a non-finite or a negative rate
  is an error when the schedule is built, naming the step.

  Args:
    lr: base learning rate, >= 0.
    lr_lambda: callable ``int -> float``.
    total_steps: last step tabulated, >= 0.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "lambda_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  factor, total = _tabulate(owner, lr_lambda, total_steps)
  table = np.asarray([base * factor(n) for n in range(total + 1)], np.float64)
  return _table_schedule(owner, table)


def multiplicative_lr(lr: float, lr_lambda: Callable[[int], float],
                      total_steps: int) -> Schedule:
  r"""PyTorch ``MultiplicativeLR``: ``lr(0) = lr``, ``lr(n) = lr(n-1) * lr_lambda(n)``.

  Tabulated like :func:`lambda_lr` (the running product in float64, in torch's order);
  beyond ``total_steps`` the rate stays at its value there (documented clamp).

  Args:
    lr: base learning rate, >= 0.
    lr_lambda: callable ``int -> float`` (the factor applied at step ``n >= 1``).
    total_steps: last step tabulated, >= 0.

  Returns:
    A schedule ``step -> lr`` (float32).
  """
  owner = "multiplicative_lr"
  base = _real(owner, "lr", lr, lo=0.0)
  factor, total = _tabulate(owner, lr_lambda, total_steps)
  table = [base]
  for n in range(1, total + 1):
    table.append(table[-1] * factor(n))
  return _table_schedule(owner, np.asarray(table, np.float64))


# ----------------------------------------------------------------------------------------
# ReduceLROnPlateau: stateful, a gradient transformation.
# ----------------------------------------------------------------------------------------


class ReduceLROnPlateauState(NamedTuple):
  """State of :func:`reduce_lr_on_plateau` (scalars, float in the default float dtype).

  lr: the current learning rate (torch's ``param_groups[0]["lr"]``).
  best: the best metric so far (``+inf`` / ``-inf`` before the first).
  num_bad_epochs, cooldown_counter: torch's counters.
  count: metrics seen (torch's ``last_epoch``).
  """
  lr: jax.Array
  best: jax.Array
  num_bad_epochs: jax.Array
  cooldown_counter: jax.Array
  count: jax.Array


def reduce_lr_on_plateau(lr: float, mode: str = "min", factor: float = 0.1,
                         patience: int = 10, threshold: float = 1e-4,
                         threshold_mode: str = "rel", cooldown: int = 0,
                         min_lr: float = 0.0,
                         eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  r"""PyTorch ``ReduceLROnPlateau`` as an optax transformation that scales the updates by
  ``current_lr / lr`` and takes the metric as ``update(..., value=metric)``.

  Use it after an optimizer built with ``learning_rate=lr``:
  ``optax.chain(adamw(learning_rate=lr, ...), reduce_lr_on_plateau(lr, patience=...))``;
  the product is the rate torch uses (decoupled weight decay included, which torch also
  multiplies by the current ``lr``).

  ``update(updates, state, params=None, *, value=None)`` first scales ``updates`` by the
  factor in ``state`` (the rate for this step), then, when ``value`` is given, folds the
  metric in exactly as ``scheduler.step(value)`` after ``optimizer.step()`` in torch:

  * better: ``value < best (1 - threshold)`` ("min", "rel"), ``value < best - threshold``
    ("min", "abs"), ``value > best (1 + threshold)`` ("max", "rel"), ``value > best +
    threshold`` ("max", "abs"); a better value becomes ``best`` and resets
    ``num_bad_epochs``, anything else (NaN included) counts one bad epoch;
  * in cooldown the counter is decremented and bad epochs are ignored;
  * when ``num_bad_epochs > patience``: ``new = max(lr * factor, min_lr)``, applied only if
    ``lr - new > eps``; then cooldown restarts and the counter resets.

  ``value=None`` (e.g. steps without a validation metric) only scales. Non-float update
  leaves pass through unchanged. The state is a few scalars in the default float dtype
  (float32, float64 under x64); torch keeps Python floats (float64).

  Differences from ``optax.contrib.reduce_on_plateau``: that one reduces when the count
  *reaches* ``patience`` (torch: exceeds), has no ``eps``, ``mode="max"`` or separate
  ``threshold_mode``, a relative ``min_scale`` instead of an absolute ``min_lr``, and
  applies the scale after folding in the current value.

  Args:
    lr: the optimizer's learning rate (torch's initial ``lr``), > 0.
    mode: "min" or "max".
    factor: reduction factor, 0 <= factor < 1.
    patience: bad epochs tolerated, >= 0.
    threshold: >= 0.
    threshold_mode: "rel" or "abs".
    cooldown: epochs to wait after a reduction, >= 0.
    min_lr: lower bound of the rate, >= 0.
    eps: minimal change of the rate, >= 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  owner = "reduce_lr_on_plateau"
  base = _real(owner, "lr", lr, lo=0.0, lo_open=True)
  check_choice(owner, "mode", mode, ("min", "max"))
  check_scalar(owner, "factor", factor, lo=0.0, hi=1.0, hi_open=True)
  pat = _steps(owner, "patience", patience, lo=0)
  check_scalar(owner, "threshold", threshold, lo=0.0)
  check_choice(owner, "threshold_mode", threshold_mode, ("rel", "abs"))
  cool = _steps(owner, "cooldown", cooldown, lo=0)
  check_scalar(owner, "min_lr", min_lr, lo=0.0)
  check_scalar(owner, "eps", eps, lo=0.0)
  factor, threshold, min_lr, eps = float(factor), float(threshold), float(min_lr), float(eps)

  def init_fn(params: Any) -> ReduceLROnPlateauState:
    del params
    dtype = jnp.result_type(float)
    worst = math.inf if mode == "min" else -math.inf
    return ReduceLROnPlateauState(
        lr=jnp.asarray(base, dtype), best=jnp.asarray(worst, dtype),
        num_bad_epochs=jnp.zeros([], jnp.int32), cooldown_counter=jnp.zeros([], jnp.int32),
        count=jnp.zeros([], jnp.int32))

  def fold(state: ReduceLROnPlateauState, value: Any) -> ReduceLROnPlateauState:
    try:  # a string is no metric (jnp.asarray's own error names nothing)
      v = None if isinstance(value, (str, bytes)) else jnp.asarray(value)
    except TypeError:
      v = None
    if v is None or v.ndim != 0 or not (jnp.issubdtype(v.dtype, jnp.floating)
                           or jnp.issubdtype(v.dtype, jnp.integer)):
      raise TypeError(f"{owner}: `value` (the metric) must be a real scalar, got "
                      f"{type(value).__name__} {value!r}"[:300] if v is None else
                      f"{owner}: `value` (the metric) must be a real scalar, got "
                      f"{type(value).__name__} of shape {v.shape} dtype {v.dtype}")
    v = v.astype(state.best.dtype)
    best = state.best
    if mode == "min":
      better = v < (best * (1.0 - threshold) if threshold_mode == "rel" else best - threshold)
    else:
      better = v > (best * (1.0 + threshold) if threshold_mode == "rel" else best + threshold)
    best = jnp.where(better, v, best)
    bad = jnp.where(better, 0, state.num_bad_epochs + 1)
    cooling = state.cooldown_counter > 0
    cooldown_counter = jnp.where(cooling, state.cooldown_counter - 1, state.cooldown_counter)
    bad = jnp.where(cooling, 0, bad)
    reduce = bad > pat
    new_lr = jnp.maximum(state.lr * factor, min_lr)
    new_lr = jnp.where(reduce & (state.lr - new_lr > eps), new_lr, state.lr)
    return ReduceLROnPlateauState(
        lr=new_lr.astype(state.lr.dtype), best=best,
        num_bad_epochs=jnp.where(reduce, 0, bad).astype(jnp.int32),
        cooldown_counter=jnp.where(reduce, cool, cooldown_counter).astype(jnp.int32),
        count=state.count + 1)

  def update_fn(updates: Any, state: ReduceLROnPlateauState, params: Any = None, *,
                value: Any = None, **extra_args: Any) -> tuple[Any, ReduceLROnPlateauState]:
    del params, extra_args
    if not isinstance(state, ReduceLROnPlateauState):
      raise TypeError(f"{owner}: `state` must be the ReduceLROnPlateauState that "
                      f"{owner}(...).init(params) returned, got {type(state).__name__}")
    scale = state.lr / base

    def one(u: Any) -> Any:
      dtype = jnp.result_type(u)
      if not jnp.issubdtype(dtype, jnp.inexact):
        return u  # a non-float leaf passes through
      wide = jnp.promote_types(dtype, jnp.float32)
      return (jnp.asarray(u, wide) * scale.astype(wide)).astype(dtype)

    updates = jax.tree.map(one, updates)
    if value is not None:
      state = fold(state, value)
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
