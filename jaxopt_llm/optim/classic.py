"""torch.optim's Adadelta, ASGD and Rprop as optax transformations, step for step.

Each optimizer's arithmetic is one per-leaf function (``adadelta_leaf``, ``asgd_leaf``,
``rprop_leaf``), mapped over the pytree by its ``scale_by_*`` block; the named optimizer is a
short chain (``aliases.named_chain``: coupled weight decay, the block, the learning rate).
Semantics and defaults are torch 2.13's single-tensor paths (``torch/optim/adadelta.py``,
``asgd.py``, ``rprop.py``); ``maximize`` / ``foreach`` / ``capturable`` / ``differentiable``
are not arguments (``jaxopt_llm.from_torch`` handles ``maximize``; the others change nothing).

Each state is a NamedTuple whose docstring names, field by field, the torch per-parameter
state key it equals, for the state converter. Counts are int32 (torch keeps a float32
``step`` per parameter, equal across a param group). Non-float parameter leaves pass through
unchanged with no state; statistics are computed in float32 (float64 under x64 for float64
parameters) and stored in that float dtype.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxopt_llm._validation import check_scalar, check_schedule
from jaxopt_llm.optim import aliases
from jaxopt_llm.optim.numerics import (
    F32,
    check_state,
    check_updates_like,
    full_like,
    map_leaves,
    require_params,
    safe_div,
    upcast,
    value_at,
    zeros_like,
)

ScalarOrSchedule = aliases.ScalarOrSchedule
MaskOrFn = aliases.MaskOrFn


# --------------------------------------------------------------------------------------------
# Adadelta


class ScaleByAdadeltaState(NamedTuple):
  """State of ``scale_by_adadelta``; each field equals torch.optim.Adadelta's state key:

  * ``count`` = ``step`` (int32 here, float32 in torch; one per group here, one per
    parameter there, all equal);
  * ``square_avg`` = ``square_avg`` (EMA of the squared gradient, one leaf per parameter);
  * ``acc_delta`` = ``acc_delta`` (EMA of the squared step, one leaf per parameter).
  """
  count: chex.Array
  square_avg: optax.Updates
  acc_delta: optax.Updates


def adadelta_leaf(g: jax.Array, v: jax.Array, a: jax.Array, *, rho: Any, eps: Any) -> tuple:
  r"""Adadelta on one leaf: ``(direction, v', a')``.

  .. math::
    v' = \rho v + (1-\rho) g^2,\quad
    \Delta = \frac{\sqrt{a + \epsilon}}{\sqrt{v' + \epsilon}}\, g,\quad
    a' = \rho a + (1-\rho) \Delta^2

  The direction :math:`\Delta` has ``g``'s dtype. With ``eps = 0`` an entry whose
  :math:`v'` is 0 steps by 0 (``safe_div``; torch: 0/0 = NaN). A gradient beyond 1.8e19
  overflows :math:`g^2` (float32) to inf: that entry's :math:`v'` is inf and it steps by
  0, as in Adam, never NaN.
  """
  g32 = upcast(g)
  v1 = rho * upcast(v) + (1.0 - rho) * jnp.square(g32)
  delta = safe_div(jnp.sqrt(upcast(a) + eps), jnp.sqrt(v1 + eps), eps) * g32
  a1 = rho * upcast(a) + (1.0 - rho) * jnp.square(delta)
  return delta.astype(g.dtype), v1, a1


def scale_by_adadelta(rho: float = 0.9, eps: float = 1e-6) -> optax.GradientTransformation:
  r"""torch.optim.Adadelta's direction (Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate
  Method"; ``adadelta_leaf``).

  .. math::
    v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
    \Delta_t = \frac{\sqrt{a_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t,\quad
    a_t = \rho a_{t-1} + (1-\rho)\Delta_t^2

  with :math:`v_0 = a_0 = 0`; the parameter moves by :math:`-lr\,\Delta_t` (torch's
  default ``lr=1.0``, the paper has no learning rate). eps sits inside both roots, as in
  torch and the paper (``optax.adadelta`` agrees). With ``eps = 0`` nothing ever moves
  (:math:`a_0 = 0`) and no 0/0 is evaluated.

  Args:
    rho: decay of both averages, in [0, 1] (torch's range).
    eps: added inside both square roots, >= 0.
  """
  owner = "scale_by_adadelta"
  check_scalar(owner, "rho", rho, lo=0.0, hi=1.0)
  check_scalar(owner, "eps", eps, lo=0.0)

  def init_fn(params):
    return ScaleByAdadeltaState(count=jnp.zeros([], jnp.int32),
                                square_avg=zeros_like(params, None),
                                acc_delta=zeros_like(params, None))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByAdadeltaState)
    del params
    direction, square_avg, acc_delta = map_leaves(
        lambda g, v, a: adadelta_leaf(g, v, a, rho=rho, eps=eps),
        updates, state.square_avg, state.acc_delta, n_outputs=3, owner=owner)
    return direction, ScaleByAdadeltaState(count=optax.safe_increment(state.count),
                                           square_avg=square_avg, acc_delta=acc_delta)

  return optax.GradientTransformation(init_fn, update_fn)


def adadelta(
    learning_rate: ScalarOrSchedule = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""torch.optim.Adadelta (defaults included): coupled decay :math:`g \leftarrow g +
  wd\cdot p`, then ``scale_by_adadelta``, then :math:`p \leftarrow p - lr\,\Delta_t`.

  Positional arguments as ``optax.adadelta(learning_rate, rho, eps)`` (whose learning rate
  has no default); weight decay and mask are keyword-only (optax's fourth positional
  argument is ``weight_decay`` too, but its decay is decoupled from the statistics).
  """
  return aliases.named_chain("adadelta", scale_by_adadelta(rho, eps), learning_rate,
                             weight_decay, mask, decay_first=True)


# --------------------------------------------------------------------------------------------
# ASGD


class ScaleByAsgdState(NamedTuple):
  """State of ``scale_by_asgd``; each field equals torch.optim.ASGD's state key:

  * ``count`` = ``step`` (int32 here, float32 in torch);
  * ``eta`` = ``eta`` (float32 scalar: the step size of the *next* update; torch keeps one
    per parameter, all equal within a param group);
  * ``mu`` = ``mu`` (float32 scalar: the averaging weight of the next update; likewise);
  * ``ax`` = ``ax`` (the averaged parameters, one leaf per parameter; read them with
    ``asgd_averaged_params``).
  """
  count: chex.Array
  eta: chex.Array
  mu: chex.Array
  ax: optax.Updates


def asgd_leaf(g: jax.Array, p: jax.Array, ax: jax.Array, *, eta: Any, mu: Any,
              lambd: Any) -> tuple:
  r"""ASGD on one leaf: ``(step, ax')``, where the parameter becomes :math:`p - step`.

  .. math::
    step = \eta\,(g + \lambda p),\qquad p' = p - step
         = p\,(1 - \lambda\eta) - \eta g,\qquad
    ax' = p' \ \text{if}\ \mu = 1\ \text{else}\ ax + \mu\,(p' - ax)

  ``step`` has ``g``'s dtype; ``ax'`` is in the compute dtype.
  """
  g32, p32 = upcast(g), upcast(p)
  dtype = g32.dtype
  eta, mu = jnp.asarray(eta, dtype), jnp.asarray(mu, dtype)
  step = eta * (g32 + lambd * p32)
  p1 = p32 - step
  ax1 = jnp.where(mu == 1, p1, upcast(ax) + (p1 - upcast(ax)) * mu)
  return step.astype(g.dtype), ax1


def asgd_eta(learning_rate: Any, count: jax.Array, *, lambd: Any, alpha: Any) -> jax.Array:
  r"""ASGD's step size after ``count`` steps: :math:`lr / (1 + \lambda\, lr\, t)^\alpha`
  (float32; written ``lr * exp(-alpha * log1p(lambd * lr * t))``, accurate in float32)."""
  lr = jnp.asarray(learning_rate, F32)
  x = lambd * lr * count.astype(F32)
  return lr * jnp.exp(-alpha * jnp.log1p(x))


def asgd_mu(count: jax.Array, *, t0: Any) -> jax.Array:
  r"""ASGD's averaging weight after ``count`` steps: :math:`1 / \max(1, t - t_0)` (float32)."""
  return 1.0 / jnp.maximum(1.0, count.astype(F32) - jnp.asarray(t0, F32))


def scale_by_asgd(
    learning_rate: ScalarOrSchedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
) -> optax.GradientTransformation:
  r"""torch.optim.ASGD's step (Polyak & Juditsky, 1992, "Acceleration of Stochastic
  Approximation by Averaging"; ``asgd_leaf``), returned positive: ``chain`` it with
  ``scale(-1)`` (``asgd`` does) to move the parameters by :math:`-step_t`.

  .. math::
    p_t = p_{t-1}(1 - \lambda\eta_{t-1}) - \eta_{t-1} g_t,\qquad
    ax_t = ax_{t-1} + \mu_{t-1}(p_t - ax_{t-1})\ (ax_t = p_t\ \text{when}\ \mu_{t-1} = 1) \\
    \eta_t = \frac{lr_t}{(1 + \lambda\, lr_t\, t)^\alpha},\qquad
    \mu_t = \frac{1}{\max(1, t - t_0)},\qquad \eta_0 = lr_1,\ \mu_0 = 1

  The step size :math:`\eta` replaces the learning rate: ``learning_rate`` enters only
  through it, so this block needs ``params`` and owns the learning rate (a schedule
  ``n -> lr`` is read, like torch's ``group["lr"]``, at the step whose end computes the next
  :math:`\eta`: it lags one step, as in torch). The averaged parameters :math:`ax` are in
  the state (``asgd_averaged_params``); with the default ``t0 = 1e6`` they are a copy of the
  parameters until step 10**6. The parameter step is written as torch's foreach path
  writes it, :math:`p - \eta(g + \lambda p)`; torch's single-tensor path (its CPU default)
  computes :math:`p (1 - \lambda\eta)` with the factor rounded to float32 first, a drift of
  a few 1e-6 over hundreds of steps that this form does not have.

  Args:
    learning_rate: :math:`lr` (a number or a schedule), >= 0.
    lambd: the decay term :math:`\lambda`, >= 0.
    alpha: the power of the step-size decay, >= 0.
    t0: the step at which averaging starts, >= 0.
  """
  owner = "scale_by_asgd"
  check_schedule(owner, "learning_rate", learning_rate, lo=0.0)
  check_scalar(owner, "lambd", lambd, lo=0.0)
  check_scalar(owner, "alpha", alpha, lo=0.0)
  check_scalar(owner, "t0", t0, lo=0.0)

  def init_fn(params):
    lr0 = value_at(learning_rate, jnp.zeros([], jnp.int32))
    return ScaleByAsgdState(count=jnp.zeros([], jnp.int32),
                            eta=jnp.asarray(lr0, F32), mu=jnp.ones([], F32),
                            ax=zeros_like(params, None))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByAsgdState)
    require_params(owner, params)
    check_updates_like(owner, updates, params)
    count = optax.safe_increment(state.count)
    step, ax = map_leaves(
        lambda g, p, a: asgd_leaf(g, p, a, eta=state.eta, mu=state.mu, lambd=lambd),
        updates, params, state.ax, n_outputs=2, owner=owner)
    lr = value_at(learning_rate, state.count)
    return step, ScaleByAsgdState(count=count,
                                  eta=asgd_eta(lr, count, lambd=lambd, alpha=alpha),
                                  mu=asgd_mu(count, t0=t0), ax=ax)

  return optax.GradientTransformation(init_fn, update_fn)


def asgd(
    learning_rate: ScalarOrSchedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""torch.optim.ASGD (defaults included): coupled decay :math:`g \leftarrow g + wd\cdot p`,
  then ``scale_by_asgd`` (which owns the learning rate through its step size :math:`\eta`),
  then the sign flip. ``update`` needs ``params``.

  The returned parameters are the SGD iterates :math:`p_t`, as torch's; the averaged ones
  (torch's ``state["ax"]``, the point of ASGD) are ``asgd_averaged_params(opt_state)``.
  """
  owner = "asgd"
  check_schedule(owner, "learning_rate", learning_rate, lo=0.0)
  direction = scale_by_asgd(learning_rate, lambd, alpha, t0)
  return aliases.named_chain(owner, direction, 1.0, weight_decay, mask, decay_first=True)


def _asgd_states(opt_state: Any) -> list:
  is_asgd = lambda x: isinstance(x, ScaleByAsgdState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_asgd) if is_asgd(s)]


def asgd_averaged_params(opt_state: Any, params: Optional[optax.Params] = None) -> Any:
  """The averaged parameters :math:`ax` (torch.optim.ASGD's ``state["ax"]``) held by the
  ``ScaleByAsgdState`` found anywhere inside ``opt_state`` (a chain, ``inject_hyperparams``,
  ``masked``, ``multi_transform``: several ASGD states are merged leaf by leaf).

  A leaf without an average (a non-float parameter, or one that no ASGD state covers) is
  ``optax.MaskedNode()``, or, when ``params`` is given, that parameter itself (it never
  changes). Before the first update the averages are zeros, as in torch.

  Raises:
    ValueError: when ``opt_state`` holds no ``ScaleByAsgdState``.
  """
  states = _asgd_states(opt_state)
  if not states:
    raise ValueError("asgd_averaged_params: `opt_state` contains no ScaleByAsgdState (was "
                     "the optimizer built with optim.asgd / scale_by_asgd?)")
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  merged = states[0].ax
  for s in states[1:]:
    merged = jax.tree.map(lambda a, b: b if is_masked(a) else a, merged, s.ax,
                          is_leaf=is_masked)
  if params is None:
    return merged
  return jax.tree.map(lambda a, p: p if is_masked(a) else a, merged, params,
                      is_leaf=is_masked)


# --------------------------------------------------------------------------------------------
# Rprop


class ScaleByRpropState(NamedTuple):
  """State of ``scale_by_rprop``; each field equals torch.optim.Rprop's state key:

  * ``count`` = ``step`` (int32 here, float32 in torch);
  * ``prev`` = ``prev`` (the previous gradient, zeroed where its sign flipped);
  * ``step_size`` = ``step_size`` (the per-entry step sizes, starting at the learning rate).
  """
  count: chex.Array
  prev: optax.Updates
  step_size: optax.Updates


def rprop_leaf(g: jax.Array, prev: jax.Array, step_size: jax.Array, *, eta_minus: Any,
               eta_plus: Any, step_size_min: Any, step_size_max: Any) -> tuple:
  r"""Rprop on one leaf: ``(direction, prev', step_size')``.

  .. math::
    s = \operatorname{sign}(g\cdot prev),\quad
    \delta' = \operatorname{clip}(\delta\cdot\{\eta_+ \text{ if } s>0,\ \eta_- \text{ if }
    s<0,\ 1 \text{ if } s=0\},\ \delta_{min}, \delta_{max}) \\
    g' = 0 \text{ where } s<0 \text{ else } g,\qquad
    u = \operatorname{sign}(g')\,\delta',\qquad prev' = g'

  The product :math:`g\cdot prev` is taken in the compute dtype (an underflow to 0 counts
  as no sign information, factor 1, as in torch). NaN stays NaN.
  """
  g32 = upcast(g)
  dtype = g32.dtype
  s = jnp.sign(g32 * upcast(prev))
  factor = jnp.where(s > 0, jnp.asarray(eta_plus, dtype),
                     jnp.where(s < 0, jnp.asarray(eta_minus, dtype),
                               jnp.where(s == 0, jnp.ones_like(s), s)))
  step1 = jnp.clip(upcast(step_size) * factor, jnp.asarray(step_size_min, dtype),
                   jnp.asarray(step_size_max, dtype))
  g1 = jnp.where(s < 0, jnp.zeros_like(g32), g32)
  return (jnp.sign(g1) * step1).astype(g.dtype), g1, step1


def _check_rprop(owner: str, learning_rate: Any, etas: Any, step_sizes: Any) -> tuple:
  if callable(learning_rate):
    raise TypeError(
        f"{owner}: `learning_rate` must be a number: it is only Rprop's initial step size "
        f"(torch reads group['lr'] once, when the state is created, so an lr scheduler has no "
        f"effect on Rprop), got the callable {learning_rate!r}")
  check_scalar(owner, "learning_rate", learning_rate, lo=0.0)
  for name, pair in (("etas", etas), ("step_sizes", step_sizes)):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise TypeError(f"{owner}: `{name}` must be a pair of numbers, got {pair!r}")
  eta_minus, eta_plus = etas
  check_scalar(owner, "etas[0]", eta_minus, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
  check_scalar(owner, "etas[1]", eta_plus, lo=1.0, lo_open=True)
  lo, hi = step_sizes
  check_scalar(owner, "step_sizes[0]", lo, lo=0.0)
  check_scalar(owner, "step_sizes[1]", hi, lo=0.0)
  if lo > hi:
    raise ValueError(f"{owner}: `step_sizes` must be (min, max) with min <= max, got "
                     f"{step_sizes!r}")
  return eta_minus, eta_plus, lo, hi


def scale_by_rprop(
    learning_rate: float = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> optax.GradientTransformation:
  r"""torch.optim.Rprop's direction (Riedmiller & Braun, 1993; the variant without
  weight-backtracking torch implements; ``rprop_leaf``), returned positive.

  .. math::
    \delta_t = \operatorname{clip}(\delta_{t-1}\,\eta_\pm,\ \delta_{min}, \delta_{max}),\quad
    u_t = \operatorname{sign}(g_t)\,\delta_t\ (0 \text{ where the sign flipped})

  with :math:`\eta_+` where :math:`g_t g_{t-1} > 0`, :math:`\eta_-` where it is < 0 (and
  :math:`g_t` then counts as 0 in the next comparison), 1 where it is 0. ``learning_rate``
  is the initial step size :math:`\delta_0` only (a number: torch reads it once), as
  ``optax.scale_by_rprop``'s.

  Args:
    learning_rate: the initial step size, >= 0.
    etas: :math:`(\eta_-, \eta_+)` with :math:`0 < \eta_- < 1 < \eta_+`.
    step_sizes: :math:`(\delta_{min}, \delta_{max})`, 0 <= min <= max.
  """
  owner = "scale_by_rprop"
  eta_minus, eta_plus, lo, hi = _check_rprop(owner, learning_rate, etas, step_sizes)

  def init_fn(params):
    return ScaleByRpropState(count=jnp.zeros([], jnp.int32), prev=zeros_like(params, None),
                             step_size=full_like(params, learning_rate, None))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByRpropState)
    del params
    direction, prev, step_size = map_leaves(
        lambda g, pr, s: rprop_leaf(g, pr, s, eta_minus=eta_minus, eta_plus=eta_plus,
                                    step_size_min=lo, step_size_max=hi),
        updates, state.prev, state.step_size, n_outputs=3, owner=owner)
    return direction, ScaleByRpropState(count=optax.safe_increment(state.count), prev=prev,
                                        step_size=step_size)

  return optax.GradientTransformation(init_fn, update_fn)


def rprop(
    learning_rate: float = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
) -> optax.GradientTransformation:
  r"""torch.optim.Rprop (defaults included): ``scale_by_rprop`` then the sign flip,
  :math:`p \leftarrow p - \operatorname{sign}(g')\,\delta_t`.

  torch's Rprop has no weight decay. ``learning_rate`` is the initial step size only (a
  number, not a schedule: after the first step torch's Rprop never reads ``lr`` again).
  ``optax.rprop(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size)`` is the
  same rule with other argument names and a 1e-6..1.0 step-size range.
  """
  owner = "rprop"
  _check_rprop(owner, learning_rate, etas, step_sizes)
  return aliases.named_chain(owner, scale_by_rprop(learning_rate, etas, step_sizes), 1.0, 0.0,
                             None, decay_first=True)
