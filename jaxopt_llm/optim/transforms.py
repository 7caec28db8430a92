"""Gradient transformations (``scale_by_*``) and the per-leaf formula of each optimizer.

Each optimizer's arithmetic is written once, as a small pure function of one gradient leaf,
its state leaves and the hyperparameters (``adam_leaf``, ``lion_leaf``, ``sophia_leaf`` and
``fold_hessian``, ``momentum_leaf``, ``adagrad_leaf``, ``rmsprop_leaf``). The ``scale_by_*``
building blocks map it over the pytree; the one-pass step of ``jaxopt_llm.optim.fused``
(behind ``update_and_apply``) calls the very same function, so a formula changes in one
place. Each ``scale_by_*`` returns an ``optax.GradientTransformation`` with a NamedTuple
state, following optax's conventions, but with PyTorch's update semantics so that a chain of
them reproduces ``torch.optim`` step for step:

* ``scale_by_adam``: eps added *after* the bias-corrected square root, like torch.optim.Adam.
* ``scale_by_lion``: the official Lion rule (Chen et al., 2023, google/automl).
* ``scale_by_sophia``: the official SophiaG rule (Liu et al., 2023).
* ``scale_by_momentum``: torch.optim.SGD's momentum buffer (first step starts at the gradient).
* ``scale_by_adagrad``, ``scale_by_rmsprop``: torch.optim.Adagrad / RMSprop.

Statistics are always computed in float32 (or wider when the gradient is wider) and only
*stored* in ``mu_dtype`` / ``nu_dtype``: "fp32 master math" for bf16 moments (the shared
arithmetic lives in ``jaxopt_llm.optim.numerics``). The learning rate and weight decay are
separate links of the chain (see ``aliases.py``). Positional arguments mean what optax's
do; the ones optax lacks or orders differently are keyword-only.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import math

import chex
import jax
import jax.numpy as jnp
import optax

from jaxopt_llm._validation import (
    check_bool,
    check_choice,
    check_float_dtype,
    check_scalar,
    check_schedule,
)
from jaxopt_llm.optim.numerics import (
    F32,
    all_finite,
    bias_correction,
    compute_dtype,
    ema,
    fraction_true,
    freeze_non_float,
    full_like,
    is_static_zero,
    check_state,
    check_updates_like,
    map_leaves,
    require_params,
    safe_div,
    store_tree,
    upcast,
    value_at,
    zeros_like,
)

# A number or a schedule ``n -> value`` (n: updates already applied, int32), like optax's
# learning rates: b1 / momentum, which torch's OneCycleLR and CyclicLR(cycle_momentum=True)
# rewrite before every step.
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


def _check_decays(owner: str, **decays: Any) -> None:
  """Every EMA decay (b1, b2, alpha, ...) must be a number in [0, 1)."""
  for name, value in decays.items():
    check_scalar(owner, name, value, lo=0.0, hi=1.0, hi_open=True)


def check_decay(owner: str, name: str, value: Any, *, hi: float = 1.0) -> None:
  """A decay that may be a schedule (``b1``, ``momentum``): a number in [0, ``hi``) or a
  schedule ``n -> value`` whose values are checked by ``check_schedule`` to lie in
  [0, ``hi``) (a TypeError or ValueError naming ``name`` otherwise)."""
  if callable(value):
    check_schedule(owner, name, value, lo=0.0, hi=math.nextafter(hi, 0.0))
  else:
    check_scalar(owner, name, value, lo=0.0, hi=hi, hi_open=True)


def _check_dtypes(owner: str, **dtypes: Any) -> None:
  """Every storage dtype (mu_dtype, nu_dtype) must be None or floating."""
  for name, value in dtypes.items():
    check_float_dtype(owner, name, value)


def _check_flags(owner: str, **flags: Any) -> None:
  for name, value in flags.items():
    check_bool(owner, name, value)


# --------------------------------------------------------------------------------------------
# The weight-decay and learning-rate links


def _skipping_non_float(owner: str, inner: optax.GradientTransformation
                        ) -> optax.GradientTransformation:
  """``inner`` (same state) that never sees nor returns anything but an exact 0 for a
  non-float parameter leaf (``numerics.freeze_non_float`` before and after): an int leaf
  is not decayed, a ``float0`` gradient (``jax.grad(..., allow_int=True)``) is not
  multiplied. ``updates`` must match ``params`` leaf for leaf (a ValueError, not a silent
  broadcast)."""

  def update_fn(updates, state, params=None):
    check_updates_like(owner, updates, params)
    updates, state = inner.update(freeze_non_float(updates, params), state, params)
    return freeze_non_float(updates, params), state

  return optax.GradientTransformation(inner.init, update_fn)


def scale_by_learning_rate(learning_rate: Any) -> optax.GradientTransformation:
  """``optax.scale_by_learning_rate`` (same state, same arithmetic) whose update is an exact
  0 for every non-float parameter leaf.

  The last link of every named optimizer: whatever the links before it did to an integer
  leaf, the integer parameter is left unchanged by ``optax.apply_updates``.
  """
  return _skipping_non_float("scale_by_learning_rate",
                             optax.scale_by_learning_rate(learning_rate))


def add_decayed_weights(weight_decay: Any, mask: Any = None) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` (same state, same arithmetic: ``g + wd * p`` on the
  leaves ``mask`` selects) that leaves non-float parameter leaves out. Needs ``params``:
  without them, the "requires params" ValueError."""
  inner = optax.add_decayed_weights(weight_decay, mask)

  def update_fn(updates, state, params=None):
    require_params("add_decayed_weights", params)
    return _skipping_non_float("add_decayed_weights", inner).update(updates, state, params)

  return optax.GradientTransformation(inner.init, update_fn)


# --------------------------------------------------------------------------------------------
# Adam


class ScaleByAdamState(NamedTuple):
  """State of ``scale_by_adam``: step count, first and second moments (and their max).

  torch.optim.Adam / AdamW per-parameter state keys: ``count`` = ``step``, ``mu`` =
  ``exp_avg``, ``nu`` = ``exp_avg_sq``, ``nu_max`` = ``max_exp_avg_sq`` (amsgrad).
  """
  count: chex.Array  # int32, number of updates applied so far
  mu: optax.Updates
  nu: optax.Updates
  nu_max: Optional[optax.Updates]  # only with amsgrad=True, else None


def adam_leaf(g: jax.Array, m: jax.Array, v: jax.Array, v_max: Optional[jax.Array],
              count: jax.Array, *, b1: Any, b2: Any, eps: Any) -> tuple:
  r"""Adam on one leaf at step ``count`` (>= 1): ``(direction, m', v', v_max')``.

  .. math::
    m' = b_1 m + (1-b_1) g,\quad v' = b_2 v + (1-b_2) g^2,\quad
    u = \frac{m' / (1-b_1^t)}{\sqrt{v'} / \sqrt{1-b_2^t} + \epsilon}

  (``max(v_max, v')`` in the denominator when ``v_max`` is given: amsgrad). The direction has
  ``g``'s dtype; the new state is in the compute dtype, not yet stored.
  """
  m1 = ema(m, g, b1)
  v1 = ema(v, jnp.square(upcast(g)), b2)
  vm1 = None if v_max is None else jnp.maximum(upcast(v_max), v1)
  den = jnp.sqrt(v1 if vm1 is None else vm1) / jnp.sqrt(bias_correction(b2, count)) + eps
  direction = safe_div(m1 / bias_correction(b1, count), den, eps)
  return direction.astype(g.dtype), m1, v1, vm1


def scale_by_adam(
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    amsgrad: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Adam's direction with PyTorch's eps placement (Kingma & Ba, 2015; torch.optim.Adam).

  .. math::
    m_t = b_1 m_{t-1} + (1-b_1) g_t,\quad v_t = b_2 v_{t-1} + (1-b_2) g_t^2 \\
    u_t = \frac{m_t / (1-b_1^t)}{\sqrt{v_t} / \sqrt{1-b_2^t} + \epsilon}

  (``adam_leaf``). With ``amsgrad`` the denominator uses :math:`\max_{s\le t} v_s` (torch's
  amsgrad). Moments start at zero. The moments are computed in float32 and stored in
  ``mu_dtype`` / ``nu_dtype`` (default: the parameter dtype promoted to float32), so bf16
  storage halves the state without changing the arithmetic. Because the arithmetic is
  float32, the default ``eps=1e-8`` does not underflow for fp16 parameters. fp16-safe
  storage: moments saturate at the storage dtype's max instead of becoming inf, a positive
  second moment never rounds to 0 (``nu_dtype=float16`` underflows below 6e-8), and with
  ``eps=0`` an all-zero gradient history gives a 0 step, not 0/0.

  ``b1`` may be a schedule ``n -> b1_n`` (n = updates already applied, as for a learning
  rate): torch's OneCycleLR / CyclicLR(cycle_momentum=True) rewrite ``betas[0]`` before
  every step, and torch then uses the *current* value everywhere, the bias correction
  included: :math:`1 - b_{1,t}^t`. A schedule that returns Python floats
  (``optax.constant_schedule``) gives bit for bit the float's result.

  Args:
    b1: decay of the first moment, in [0, 1), or a schedule of it.
    b2: decay of the second moment, in [0, 1).
    eps: added to the bias-corrected root of the second moment, >= 0.
    amsgrad: use the running maximum of the second moment.
    mu_dtype: storage dtype of the first moment.
    nu_dtype: storage dtype of the second moment (and of its maximum).
  """
  owner = "scale_by_adam"
  check_decay(owner, "b1", b1)
  _check_decays(owner, b2=b2)
  check_scalar(owner, "eps", eps, lo=0.0)
  _check_flags(owner, amsgrad=amsgrad)
  _check_dtypes(owner, mu_dtype=mu_dtype, nu_dtype=nu_dtype)

  def init_fn(params):
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=zeros_like(params, mu_dtype),
        nu=zeros_like(params, nu_dtype),
        nu_max=zeros_like(params, nu_dtype) if amsgrad else None)

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByAdamState)
    del params
    b1_t = value_at(b1, state.count)
    count = optax.safe_increment(state.count)
    direction, mu, nu, nu_max = map_leaves(
        lambda g, m, v, vm: adam_leaf(g, m, v, vm, count, b1=b1_t, b2=b2, eps=eps),
        updates, state.mu, state.nu, state.nu_max, n_outputs=4, owner=owner)
    return direction, ScaleByAdamState(
        count=count,
        mu=store_tree(mu, mu_dtype, state.mu),
        nu=store_tree(nu, nu_dtype, state.nu, keep_nonzero=True),
        nu_max=store_tree(nu_max, nu_dtype, state.nu_max, keep_nonzero=True) if amsgrad
        else None)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Lion


class ScaleByLionState(NamedTuple):
  """State of ``scale_by_lion``: step count and the momentum."""
  count: chex.Array
  mu: optax.Updates


def lion_leaf(g: jax.Array, m: jax.Array, *, b1: Any, b2: Any) -> tuple:
  r"""Lion on one leaf: ``(sign(b1 m + (1-b1) g), b2 m + (1-b2) g)``.

  The direction (``g``'s dtype) reads the *old* momentum; the new one is in the compute
  dtype, not yet stored.
  """
  return jnp.sign(ema(m, g, b1)).astype(g.dtype), ema(m, g, b2)


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Lion's direction (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

  The official rule (google/automl ``lion_pytorch.py``): the sign is taken of an
  interpolation that uses the *old* momentum, and the momentum is updated afterwards with a
  different decay (``lion_leaf``):

  .. math::
    u_t = \operatorname{sign}(b_1 m_{t-1} + (1-b_1) g_t),\qquad
    m_t = b_2 m_{t-1} + (1-b_2) g_t

  ``sign(0) = 0``, as in PyTorch. The state is one moment (half of Adam's).

  Args:
    b1: interpolation factor for the update direction, in [0, 1).
    b2: decay of the momentum, in [0, 1).
    mu_dtype: storage dtype of the momentum (the arithmetic stays float32).
  """
  owner = "scale_by_lion"
  _check_decays(owner, b1=b1, b2=b2)
  _check_dtypes(owner, mu_dtype=mu_dtype)

  def init_fn(params):
    return ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=zeros_like(params, mu_dtype))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByLionState)
    del params
    direction, mu = map_leaves(lambda g, m: lion_leaf(g, m, b1=b1, b2=b2), updates, state.mu,
                               n_outputs=2, owner=owner)
    return direction, ScaleByLionState(
        count=optax.safe_increment(state.count), mu=store_tree(mu, mu_dtype, state.mu))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Sophia (official SophiaG rule)


class ScaleBySophiaState(NamedTuple):
  """State of ``scale_by_sophia``.

  ``win_rate`` is written by every update for logging (see ``jaxopt_llm.optim.sophia_win_rate``,
  ``sophia_hessian_norm`` and ``sophia_hessian_rejected``, which find this state anywhere
  inside a chain).
  """
  count: chex.Array  # int32, number of updates applied so far
  mu: optax.Updates  # momentum m (EMA of gradients, no bias correction)
  hessian: optax.Updates  # h, EMA of the Hessian-diagonal estimates (stored in nu_dtype)
  hessian_count: chex.Array  # int32, number of estimates folded into h so far
  hessian_rejected: chex.Array  # int32, number of non-finite estimates refused (h unchanged)
  win_rate: chex.Array  # float32, fraction of coordinates NOT clipped by the last update


def sophia_leaf(g: jax.Array, m: jax.Array, h: jax.Array, *, b1: Any, rho: Any,
                eps: Any) -> tuple:
  r"""Sophia on one leaf: ``(direction, m', not_clipped)``.

  .. math::
    m' = b_1 m + (1-b_1) g,\qquad
    u = \operatorname{sign}(m')\min\!\left(\frac{|m'|}{\rho\max(h, 0) + \epsilon}, 1\right)

  Written as a select so that no 0/0 or x/0 is ever evaluated: when |m'| >= denominator the
  ratio is exactly 1 (as min(., 1) gives), otherwise the denominator is > |m'| >= 0.
  ``h > 0`` is False for negative, zero and NaN curvature, which all count as zero.
  ``not_clipped`` is the boolean mask ``|m'| < rho max(h, 0) + eps`` (for the win rate).
  """
  m1 = ema(m, g, b1)
  h = upcast(h)
  a = jnp.abs(m1)
  den = rho * jnp.where(h > 0, h, jnp.zeros_like(h)) + eps
  kept = a < den
  ratio = jnp.where(kept, a / jnp.where(kept, den, jnp.ones_like(den)), 1.0)
  return (jnp.sign(m1) * ratio).astype(g.dtype), m1, kept


def fold_hessian(hessian: optax.Updates, estimate: optax.Updates, b2: Any) -> tuple:
  r"""Sophia's Hessian EMA :math:`h' = b_2 h + (1-b_2)\hat H`, stored in ``h``'s dtype:
  ``(h', accepted)``.

  ``estimate`` is a pytree with the parameters' structure; leaves that are ``MaskedNode``
  in ``hessian`` (inside ``optax.masked``, which does not mask extra arguments, and for
  non-float parameters) are skipped. An estimate with a NaN or an infinity in any (used)
  entry is refused as a whole: ``h' = h`` and ``accepted`` (a bool scalar) is False. A
  single non-finite estimate folded into the EMA would stay in it for ever (NaN) or freeze
  every later step (inf); ``scale_by_sophia`` counts the refusals in its state.

  Raises:
    ValueError: naming the expected structure, leaf shape or dtype when ``estimate`` differs.
  """
  owner = "scale_by_sophia"
  is_masked = lambda x: isinstance(x, optax.MaskedNode)

  def check(h, est):
    if is_masked(h):
      return h
    if est is None or not hasattr(est, "shape") and not isinstance(est, (int, float)):
      raise ValueError(f"{owner}: each `hessian` leaf must be an array, got "
                       f"{type(est).__name__}")
    est = jnp.asarray(est)
    if est.shape != h.shape:
      raise ValueError(
          f"{owner}: each `hessian` leaf must have its parameter's shape {h.shape}, got "
          f"{est.shape}")
    if not jnp.issubdtype(est.dtype, jnp.floating):
      raise ValueError(f"{owner}: each `hessian` leaf must be a real floating array, got "
                       f"dtype {est.dtype}")
    return est

  try:
    estimate = jax.tree.map(check, hessian, estimate, is_leaf=is_masked)
  except (ValueError, TypeError) as e:
    if str(e).startswith(owner):
      raise
    raise ValueError(
        f"{owner}: `hessian` must be a pytree with the parameters' structure "
        f"({jax.tree.structure(hessian)}), got {jax.tree.structure(estimate)}") from e
  accepted = all_finite(estimate)

  def one(h, est):
    if is_masked(h):
      return h
    return jnp.where(accepted, ema(h, est.astype(compute_dtype(h)), b2).astype(h.dtype), h)

  return jax.tree.map(one, hessian, estimate, is_leaf=is_masked), accepted


def fold_counted(state: ScaleBySophiaState, estimate: Optional[optax.Updates], b2: Any,
                 hessian: Optional[optax.Updates] = None) -> tuple:
  """``(h', hessian_count', hessian_rejected')`` after folding ``estimate`` (None: nothing
  to fold) into ``hessian`` (default: ``state.hessian``); shared by ``scale_by_sophia`` and
  the fused step."""
  h = state.hessian if hessian is None else hessian
  if estimate is None:
    return h, state.hessian_count, state.hessian_rejected
  h, accepted = fold_hessian(h, estimate, b2)
  count, rejected = state.hessian_count, state.hessian_rejected
  return (h, jnp.where(accepted, optax.safe_increment(count), count),
          jnp.where(accepted, rejected, optax.safe_increment(rejected)))


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    *,
    rho: float = 0.04,
    eps: float = 1e-15,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sophia's clipped, preconditioned direction (Liu et al., 2023, official ``SophiaG``).

  .. math::
    m_t = b_1 m_{t-1} + (1-b_1) g_t \\
    u_t = \operatorname{sign}(m_t)\,\min\!\left(\frac{|m_t|}{\rho\,\max(h_{t-1}, 0)
          + \epsilon},\ 1\right) \\
    h_t = b_2 h_{t-1} + (1-b_2) \hat H_t \quad\text{only when an estimate } \hat H_t
    \text{ is passed, else } h_t = h_{t-1}

  (``sophia_leaf`` and ``fold_hessian``). ``update(updates, state, params=None, *,
  hessian=None)``: ``hessian`` (an extra argument, so that ``optax.chain`` forwards it) is a
  pytree like the params holding a fresh estimate :math:`\hat H_t` of the Hessian diagonal
  (see ``jaxopt_llm.optim.hessian``). It is folded into the EMA *after* the step, as the
  official code calls ``update_hessian()`` after ``step()``: this step uses the previous EMA.
  Absent or ``None``: ``h`` is unchanged.

  Departures from the official code, all deliberate:

  * **The batch size lives in the estimate.** Official SophiaG stores EMA(g_hat**2) and
    multiplies by the token batch size ``bs`` in the denominator (``rho * bs * h``). Here the
    Gauss-Newton-Bartlett estimator returns ``B * g_hat**2`` (B = number of tokens), so the
    rule is ``rho * h``. Both give the same step for the same B; ours also stays right when
    B changes between estimates (each estimate carries its own B) and lets Hutchinson
    estimates (which have no B) use the same rule.
  * **Negative or NaN curvature counts as zero**: the denominator uses ``max(h, 0)``. The
    official formula (written for GNB, whose estimates are >= 0) gives a negative, unbounded
    ratio for ``rho*h + eps < 0``; Hutchinson estimates can be negative. With ``max(h, 0)``
    such a coordinate takes the full clipped step ``sign(m)``, which is what the paper's
    ``max(gamma*h, eps)`` denominator gives and what the official ``SophiaH`` (Hutchinson)
    does with ``relu(hess)``. For ``h >= 0`` the rule equals the official SophiaG one.
    Every coordinate moves by at most ``lr`` (plus weight decay), whatever ``h`` holds; no
    0/0 is evaluated, so no NaN is produced even with ``eps=0``.
  * **A non-finite estimate is refused.** An estimate with a NaN or an infinity anywhere
    leaves ``h`` unchanged (a NaN folded in would stay in the EMA for ever and silently turn
    Sophia into sign momentum; an inf would freeze every later step) and is counted in
    ``hessian_rejected`` (``sophia_hessian_rejected(state)``); ``hessian_count`` counts the
    accepted ones. The official code folds it in.
  * **Before the first estimate** ``h = 0`` and the step is ``sign(m)`` (times ``lr``): sign
    momentum, like the official code, whose first estimate arrives after ``k`` steps.

  The state records ``win_rate``, the fraction of coordinates with ``|m| < rho*max(h,0) +
  eps`` (not clipped) in the last update, for monitoring (counted exactly, in int32).

  ``rho`` and ``eps`` are keyword-only: ``optax.contrib.scale_by_sophia``'s third positional
  argument is its eps.

  Args:
    b1: decay of the momentum, in [0, 1).
    b2: decay of the Hessian EMA, in [0, 1).
    rho: the clipping threshold :math:`\rho` (``gamma`` in the paper), >= 0.
    eps: added to the denominator, >= 0.
    mu_dtype: storage dtype of the momentum (arithmetic stays float32).
    nu_dtype: storage dtype of the Hessian EMA (the second-moment slot, named as in Adam).
  """
  owner = "scale_by_sophia"
  _check_decays(owner, b1=b1, b2=b2)
  check_scalar(owner, "rho", rho, lo=0.0)
  check_scalar(owner, "eps", eps, lo=0.0)
  _check_dtypes(owner, mu_dtype=mu_dtype, nu_dtype=nu_dtype)

  def init_fn(params):
    return ScaleBySophiaState(
        count=jnp.zeros([], jnp.int32),
        mu=zeros_like(params, mu_dtype),
        hessian=zeros_like(params, nu_dtype),
        hessian_count=jnp.zeros([], jnp.int32),
        hessian_rejected=jnp.zeros([], jnp.int32),
        win_rate=jnp.zeros([], F32))

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    check_state(owner, state, ScaleBySophiaState)
    del params, extra_args
    direction, mu, kept = map_leaves(
        lambda g, m, h: sophia_leaf(g, m, h, b1=b1, rho=rho, eps=eps),
        updates, state.mu, state.hessian, n_outputs=3, owner=owner)
    h, hessian_count, rejected = fold_counted(state, hessian, b2)
    return direction, ScaleBySophiaState(
        count=optax.safe_increment(state.count),
        mu=store_tree(mu, mu_dtype, state.mu),
        hessian=h,
        hessian_count=hessian_count,
        hessian_rejected=rejected,
        win_rate=fraction_true(jax.tree.leaves(kept)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# SGD momentum (PyTorch semantics)


class ScaleByMomentumState(NamedTuple):
  """State of ``scale_by_momentum``: step count and the momentum buffer.

  torch.optim.SGD per-parameter state: ``trace`` = ``momentum_buffer`` (torch has no step;
  ``count == 0`` is torch's not-yet-created buffer, which the first step sets to ``g``).
  """
  count: chex.Array
  trace: optax.Updates


_BUFFER_INITS = ("grad", "zero")


def momentum_leaf(g: jax.Array, buf: jax.Array, first: Optional[jax.Array], *, momentum: Any,
                  dampening: Any, nesterov: bool) -> tuple:
  r"""torch.optim.SGD's momentum on one leaf: ``(direction, b')``.

  :math:`b' = g` on the first step (``first``), else :math:`\mu b + (1-\tau) g`; the
  direction is :math:`g + \mu b'` (nesterov) or :math:`b'`. ``first=None`` (a buffer that
  starts at zero): always :math:`\mu b + (1-\tau) g`.
  """
  g32 = upcast(g)
  b1 = momentum * upcast(buf) + (1.0 - dampening) * g32
  if first is not None:
    b1 = jnp.where(first, g32, b1)
  return (g32 + momentum * b1 if nesterov else b1).astype(g.dtype), b1


def scale_by_momentum(
    momentum: ScalarOrSchedule = 0.9,
    *,
    dampening: ScalarOrSchedule = 0.0,
    nesterov: bool = False,
    mu_dtype: Optional[Any] = None,
    buffer_init: str = "grad",
) -> optax.GradientTransformation:
  r"""torch.optim.SGD's momentum buffer (``momentum_leaf``).

  .. math::
    b_1 = g_1,\qquad b_t = \mu\, b_{t-1} + (1-\tau)\, g_t \quad (t > 1) \\
    u_t = g_t + \mu\, b_t \ \text{(nesterov)}\quad\text{else}\quad u_t = b_t

  With ``dampening = momentum`` this is the EMA form :math:`b = \beta b + (1-\beta) g`.
  Like PyTorch (and unlike ``optax.trace``), the buffer starts at the first gradient, not at
  zero, so the first step equals plain SGD (``buffer_init="grad"``). ``buffer_init="zero"``
  starts it at :math:`b_0 = 0` and applies the recurrence from the first step,
  :math:`b_1 = (1-\tau) g_1` (the course-notes EMA form; equal to "grad" when
  ``dampening = 0``).

  ``momentum`` (and ``dampening``) may be a schedule ``n -> value`` (n = updates already
  applied): torch's CyclicLR / OneCycleLR rewrite SGD's ``momentum`` before every step; the
  step uses the current value.

  Args:
    momentum: the factor :math:`\mu`, in [0, 1), or a schedule of it.
    dampening: :math:`\tau`, in [0, 1], or a schedule of it (``optim.momentum`` passes its
      ``beta`` here too).
    nesterov: Nesterov momentum (requires momentum > 0 and dampening == 0, as PyTorch).
    mu_dtype: storage dtype of the buffer.
    buffer_init: ``"grad"`` (PyTorch: :math:`b_1 = g_1`) or ``"zero"`` (:math:`b_0 = 0`).
  """
  owner = "scale_by_momentum"
  check_decay(owner, "momentum", momentum)
  if callable(dampening):
    check_schedule(owner, "dampening", dampening, lo=0.0, hi=1.0)
  else:
    check_scalar(owner, "dampening", dampening, lo=0.0, hi=1.0)
  _check_flags(owner, nesterov=nesterov)
  _check_dtypes(owner, mu_dtype=mu_dtype)
  check_choice(owner, "buffer_init", buffer_init, _BUFFER_INITS)
  if nesterov and (is_static_zero(momentum) or not is_static_zero(dampening)):
    raise ValueError(
        f"{owner}: `nesterov` requires momentum > 0 and dampening == 0, got "
        f"momentum={momentum!r}, dampening={dampening!r}")

  def init_fn(params):
    return ScaleByMomentumState(
        count=jnp.zeros([], jnp.int32), trace=zeros_like(params, mu_dtype))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByMomentumState)
    del params
    first = state.count == 0 if buffer_init == "grad" else None
    momentum_t = value_at(momentum, state.count)
    dampening_t = value_at(dampening, state.count)
    direction, trace = map_leaves(
        lambda g, b: momentum_leaf(g, b, first, momentum=momentum_t, dampening=dampening_t,
                                   nesterov=nesterov),
        updates, state.trace, n_outputs=2, owner=owner)
    return direction, ScaleByMomentumState(
        count=optax.safe_increment(state.count),
        trace=store_tree(trace, mu_dtype, state.trace))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Adagrad (PyTorch semantics)


class ScaleByAdagradState(NamedTuple):
  """State of ``scale_by_adagrad``: step count and the running sum of squared gradients.

  torch.optim.Adagrad per-parameter state: ``count`` = ``step``, ``sum_of_squares`` = ``sum``.
  """
  count: chex.Array
  sum_of_squares: optax.Updates


def adagrad_leaf(g: jax.Array, s: jax.Array, count: jax.Array, *, eps: Any,
                 lr_decay: Any) -> tuple:
  r"""torch.optim.Adagrad on one leaf at step ``count``: ``(direction, s')`` with
  :math:`s' = s + g^2`, :math:`u = g / ((\sqrt{s'} + \epsilon)(1 + (t-1) d))`.

  With ``eps = 0`` an entry whose sum of squares is exactly 0 (zero gradients so far) steps
  by 0, not 0/0 (``safe_div``)."""
  s1 = s + jnp.square(upcast(g))
  decay = 1.0 + (count.astype(F32) - 1.0) * lr_decay
  return (safe_div(upcast(g), jnp.sqrt(s1) + eps, eps) / decay).astype(g.dtype), s1


def scale_by_adagrad(
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    lr_decay: float = 0.0,
) -> optax.GradientTransformation:
  r"""torch.optim.Adagrad's direction (Duchi et al., 2011; ``adagrad_leaf``).

  .. math::
    s_t = s_{t-1} + g_t^2,\qquad u_t = \frac{g_t}{(\sqrt{s_t} + \epsilon)(1 + (t-1)\,d)}

  with :math:`s_0` = ``initial_accumulator_value`` and :math:`d` = ``lr_decay``. PyTorch adds
  eps outside the square root (optax.scale_by_rss adds it inside and starts the sum at 0.1).
  With ``eps = 0`` a zero-gradient step is exactly 0 (PyTorch: 0/0 = NaN).
  """
  owner = "scale_by_adagrad"
  check_scalar(owner, "initial_accumulator_value", initial_accumulator_value, lo=0.0)
  check_scalar(owner, "eps", eps, lo=0.0)
  check_scalar(owner, "lr_decay", lr_decay, lo=0.0)

  def init_fn(params):
    return ScaleByAdagradState(
        count=jnp.zeros([], jnp.int32),
        sum_of_squares=full_like(params, initial_accumulator_value, None))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByAdagradState)
    del params
    count = optax.safe_increment(state.count)
    direction, sum_of_squares = map_leaves(
        lambda g, s: adagrad_leaf(g, s, count, eps=eps, lr_decay=lr_decay),
        updates, state.sum_of_squares, n_outputs=2, owner=owner)
    return direction, ScaleByAdagradState(count=count, sum_of_squares=sum_of_squares)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# RMSprop (PyTorch semantics)


class ScaleByRmspropState(NamedTuple):
  """State of ``scale_by_rmsprop``: square average, gradient average (centered), buffer.

  torch.optim.RMSprop per-parameter state keys: ``count`` = ``step``, ``square_avg``,
  ``grad_avg`` and ``momentum_buffer`` under the same names.
  """
  count: chex.Array
  square_avg: optax.Updates
  grad_avg: Optional[optax.Updates]  # centered=True only
  momentum_buffer: Optional[optax.Updates]  # momentum given (not a literal 0) only


def rmsprop_leaf(g: jax.Array, s: jax.Array, a: Optional[jax.Array], b: Optional[jax.Array],
                 *, alpha: Any, eps: Any, momentum: Any) -> tuple:
  r"""torch.optim.RMSprop on one leaf: ``(direction, s', gbar', b')``.

  ``a`` (the gradient average) is ``None`` unless centered, ``b`` (the momentum buffer)
  ``None`` without momentum; their new values are then ``None`` too. With ``eps = 0`` an
  entry whose denominator is exactly 0 (zero gradients so far) steps by 0, not 0/0
  (``safe_div``).
  """
  g32 = upcast(g)
  s1 = alpha * s + (1.0 - alpha) * jnp.square(g32)
  if a is None:
    a1, den = None, jnp.sqrt(s1) + eps
  else:
    # lerp form a + (1-alpha)(g - a), as torch: s - gbar**2 below cancels, so the way gbar
    # is rounded shows up in the result. max(., 0) only guards against rounding below zero.
    a1 = a + (1.0 - alpha) * (g32 - a)
    # An overflowed s (inf, |g| > 1.8e19) stays inf (a zero step, as uncentered) rather than
    # inf - inf = NaN.
    var = jnp.where(s1 == jnp.inf, s1, s1 - jnp.square(a1))
    den = jnp.sqrt(jnp.maximum(var, 0.0)) + eps
  u = safe_div(g32, den, eps)
  b1 = None if b is None else momentum * b + u
  return (u if b1 is None else b1).astype(g.dtype), s1, a1, b1


def scale_by_rmsprop(
    alpha: float = 0.99,
    eps: float = 1e-8,
    *,
    centered: bool = False,
    momentum: ScalarOrSchedule = 0.0,
) -> optax.GradientTransformation:
  r"""torch.optim.RMSprop's direction (Hinton, 2012; ``rmsprop_leaf``).

  .. math::
    s_t = \alpha s_{t-1} + (1-\alpha) g_t^2,\quad
    d_t = \sqrt{s_t - \bar g_t^2} + \epsilon \ \text{(centered,}\ \bar g_t = \alpha \bar g_{t-1}
    + (1-\alpha) g_t)\ \text{else}\ \sqrt{s_t} + \epsilon \\
    u_t = b_t = \mu b_{t-1} + g_t / d_t \ \text{(momentum)}\quad\text{else}\quad u_t = g_t / d_t

  eps is added outside the square root (optax.rmsprop adds it inside by default). With
  ``eps = 0`` a zero-gradient step is exactly 0 (PyTorch: 0/0 = NaN); ``centered=True``
  needs ``eps > 0``: the centered variance :math:`s_t - \bar g_t^2` of a constant gradient
  decays to 0 (and rounds to 0 or below), so the step would grow without bound.
  ``momentum`` may be a schedule ``n -> value`` (n = updates already applied; torch's
  CyclicLR / OneCycleLR rewrite it before every step); a schedule always keeps the buffer.
  """
  owner = "scale_by_rmsprop"
  _check_decays(owner, alpha=alpha)
  check_decay(owner, "momentum", momentum)
  check_scalar(owner, "eps", eps, lo=0.0)
  _check_flags(owner, centered=centered)
  if centered and is_static_zero(eps):
    raise ValueError(f"{owner}: `eps` must be > 0 with centered=True (the centered variance "
                     f"of a constant gradient decays to 0), got {eps!r}")
  use_momentum = not is_static_zero(momentum)

  def init_fn(params):
    zeros = lambda: zeros_like(params, None)
    return ScaleByRmspropState(
        count=jnp.zeros([], jnp.int32),
        square_avg=zeros(),
        grad_avg=zeros() if centered else None,
        momentum_buffer=zeros() if use_momentum else None)

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByRmspropState)
    del params
    momentum_t = value_at(momentum, state.count)
    direction, square_avg, grad_avg, buf = map_leaves(
        lambda g, s, a, b: rmsprop_leaf(g, s, a, b, alpha=alpha, eps=eps,
                                        momentum=momentum_t),
        updates, state.square_avg, state.grad_avg, state.momentum_buffer, n_outputs=4, owner=owner)
    return direction, ScaleByRmspropState(
        count=optax.safe_increment(state.count), square_avg=square_avg,
        grad_avg=grad_avg if centered else None,
        momentum_buffer=buf if use_momentum else None)

  return optax.GradientTransformation(init_fn, update_fn)
