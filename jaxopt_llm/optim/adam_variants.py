"""NAdam, RAdam and Adamax: torch.optim's Adam variants, with torch 2.13's defaults and rules.

Each optimizer is written once as a per-leaf formula (``nadam_leaf``, ``radam_leaf``,
``adamax_leaf``) plus the per-step scalars every leaf shares (``nadam_scalars``,
``radam_scalars``), mapped over the pytree by a ``scale_by_*`` building block with a NamedTuple
state, and named as a short chain (``nadam``, ``radam``, ``adamax``) built like ``adamw``
(``aliases.named_chain``: weight decay link, direction, learning rate).

torch's weight decay in these three is *coupled* (L2, ``g <- g + wd * p`` before the moments)
unless ``decoupled_weight_decay=True`` (NAdam, RAdam; torch multiplies ``p *= 1 - lr * wd``
before the step, which is AdamW's ``p <- p - lr (u + wd p)``: the update does not read p).

Every state's fields name the torch per-parameter state key they hold (``optimizer.state[p]``),
so a converter maps torch state to ours and back field by field: ``count`` is torch's
``step`` (a float tensor there, int32 here), ``mu`` is ``exp_avg``, ``nu`` is ``exp_avg_sq``
(Adamax: ``exp_inf``), ``mu_product`` is NAdam's ``mu_product``. The moments are computed in
float32 (or wider for wider parameters) and stored in ``mu_dtype`` / ``nu_dtype``; integer and
bool parameter leaves get no state and are never changed (``numerics``).

``b1`` may be a schedule ``n -> b1_n`` (n = number of updates already applied, int32, as for an
optax learning rate): torch's OneCycleLR and CyclicLR(cycle_momentum=True) rewrite
``betas[0]`` before every step, and the step uses the current value throughout (bias
corrections ``1 - b_{1,t}^t``, NAdam's :math:`\\mu_t` and its running product).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxopt_llm._validation import check_bool, check_float_dtype, check_scalar
from jaxopt_llm.optim.aliases import MaskOrFn, ScalarOrSchedule, named_chain
from jaxopt_llm.optim.numerics import (
    F32,
    bias_correction,
    check_state,
    ema,
    map_leaves,
    safe_div,
    store_tree,
    upcast,
    value_at,
    zeros_like,
)
from jaxopt_llm.optim.transforms import check_decay

__all__ = [
    "ScaleByNadamState", "ScaleByRadamState", "ScaleByAdamaxState",
    "scale_by_nadam", "scale_by_radam", "scale_by_adamax",
    "nadam", "radam", "adamax",
    "nadam_leaf", "radam_leaf", "adamax_leaf", "nadam_scalars", "radam_scalars",
]


def _check_common(owner: str, b1: Any, b2: Any, eps: Any, mu_dtype: Any,
                  nu_dtype: Any) -> None:
  check_decay(owner, "b1", b1)
  check_scalar(owner, "b2", b2, lo=0.0, hi=1.0, hi_open=True)
  check_scalar(owner, "eps", eps, lo=0.0)
  check_float_dtype(owner, "mu_dtype", mu_dtype)
  check_float_dtype(owner, "nu_dtype", nu_dtype)


# --------------------------------------------------------------------------------------------
# NAdam


class ScaleByNadamState(NamedTuple):
  """State of ``scale_by_nadam``; each field is the torch.optim.NAdam per-parameter state key
  named here.

  * ``count``: torch ``state["step"]`` (int32 here, a float tensor in torch), the number of
    updates applied.
  * ``mu_product``: torch ``state["mu_product"]``, :math:`\\prod_{s\\le t}\\mu_s` (a float32
    scalar; torch keeps one float32 scalar tensor per parameter, all equal).
  * ``mu``: torch ``state["exp_avg"]``, the first moment (a tree like the params).
  * ``nu``: torch ``state["exp_avg_sq"]``, the second moment (a tree like the params).
  """
  count: chex.Array
  mu_product: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def nadam_scalars(b1: Any, b2: Any, momentum_decay: Any, count: jax.Array,
                  mu_product: jax.Array) -> tuple:
  r"""NAdam's per-step scalars at step ``count`` (>= 1), float32:
  ``(c_grad, c_avg, bias_correction2, mu_product')`` with

  .. math::
    \mu_t = b_1\left(1 - \tfrac12\, 0.96^{t\psi}\right),\quad
    \mu_{t+1} = b_1\left(1 - \tfrac12\, 0.96^{(t+1)\psi}\right),\quad
    \Pi_t = \Pi_{t-1}\mu_t \\
    c_\text{grad} = \frac{1-\mu_t}{1-\Pi_t},\qquad
    c_\text{avg} = \frac{\mu_{t+1}}{1-\Pi_t\,\mu_{t+1}},\qquad 1 - b_2^t

  (:math:`\psi` = ``momentum_decay``; ``b1`` is this step's value, also in
  :math:`\mu_{t+1}`, as torch uses the current ``betas[0]`` for both).
  """
  t = count.astype(F32)
  log96 = math.log(0.96) * float(momentum_decay) if isinstance(momentum_decay, (int, float)) \
      else jnp.log(jnp.asarray(0.96, F32)) * momentum_decay
  mu_t = b1 * (1.0 - 0.5 * jnp.exp(t * log96))
  mu_next = b1 * (1.0 - 0.5 * jnp.exp((t + 1.0) * log96))
  mu_product = (mu_product * mu_t).astype(F32)
  c_grad = (1.0 - mu_t) / (1.0 - mu_product)
  c_avg = mu_next / (1.0 - mu_product * mu_next)
  return c_grad, c_avg, bias_correction(b2, count), mu_product


def nadam_leaf(g: jax.Array, m: jax.Array, v: jax.Array, *, b1: Any, b2: Any, eps: Any,
               c_grad: Any, c_avg: Any, bias_correction2: Any) -> tuple:
  r"""NAdam on one leaf: ``(direction, m', v')``, torch.optim.NAdam's rule.

  .. math::
    m' = b_1 m + (1-b_1) g,\quad v' = b_2 v + (1-b_2) g^2,\quad
    d = \sqrt{v' / (1-b_2^t)} + \epsilon,\quad
    u = c_\text{grad}\,\frac{g}{d} + c_\text{avg}\,\frac{m'}{d}

  (scalars from ``nadam_scalars``). With ``eps = 0`` an all-zero gradient history gives a 0
  step, not 0/0. A gradient beyond 1.8e19 overflows :math:`g^2` (float32) to inf: that
  coordinate's :math:`v'` is inf and it steps by 0, as in Adam (and torch), never NaN.
  """
  g32 = upcast(g)
  m1 = ema(m, g32, b1)
  v1 = ema(v, jnp.square(g32), b2)
  den = jnp.sqrt(v1 / bias_correction2) + eps
  direction = c_grad * safe_div(g32, den, eps) + c_avg * safe_div(m1, den, eps)
  return direction.astype(g.dtype), m1, v1


def scale_by_nadam(
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    momentum_decay: float = 4e-3,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""NAdam's direction (Dozat, 2016, "Incorporating Nesterov Momentum into Adam"), with
  torch.optim.NAdam's momentum schedule and arithmetic (``nadam_scalars``, ``nadam_leaf``):

  .. math::
    m_t = b_1 m_{t-1} + (1-b_1) g_t,\quad v_t = b_2 v_{t-1} + (1-b_2) g_t^2 \\
    u_t = \frac{1-\mu_t}{1-\prod_{s\le t}\mu_s}\,\frac{g_t}{\sqrt{v_t/(1-b_2^t)}+\epsilon}
        + \frac{\mu_{t+1}}{1-\prod_{s\le t+1}\mu_s}\,\frac{m_t}{\sqrt{v_t/(1-b_2^t)}+\epsilon}

  with :math:`\mu_t = b_1(1 - \frac12 0.96^{t\psi})`, :math:`\psi` = ``momentum_decay``.
  The running product is kept in the state (float32, like torch's ``mu_product``), so a
  scheduled ``b1`` accumulates exactly as in torch.

  Args:
    b1: decay of the first moment, in [0, 1), or a schedule ``n -> b1_n``.
    b2: decay of the second moment, in [0, 1).
    eps: added to the bias-corrected root of the second moment, >= 0.
    momentum_decay: :math:`\psi`, >= 0 (torch's default 4e-3).
    mu_dtype: storage dtype of the first moment (arithmetic stays float32).
    nu_dtype: storage dtype of the second moment.
  """
  owner = "scale_by_nadam"
  _check_common(owner, b1, b2, eps, mu_dtype, nu_dtype)
  check_scalar(owner, "momentum_decay", momentum_decay, lo=0.0)

  def init_fn(params):
    return ScaleByNadamState(
        count=jnp.zeros([], jnp.int32),
        mu_product=jnp.ones([], F32),
        mu=zeros_like(params, mu_dtype),
        nu=zeros_like(params, nu_dtype))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByNadamState)
    del params
    b1_t = value_at(b1, state.count)
    count = optax.safe_increment(state.count)
    c_grad, c_avg, bc2, mu_product = nadam_scalars(b1_t, b2, momentum_decay, count,
                                                   state.mu_product)
    direction, mu, nu = map_leaves(
        lambda g, m, v: nadam_leaf(g, m, v, b1=b1_t, b2=b2, eps=eps, c_grad=c_grad,
                                   c_avg=c_avg, bias_correction2=bc2),
        updates, state.mu, state.nu, n_outputs=3, owner=owner)
    return direction, ScaleByNadamState(
        count=count, mu_product=mu_product,
        mu=store_tree(mu, mu_dtype, state.mu),
        nu=store_tree(nu, nu_dtype, state.nu, keep_nonzero=True))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# RAdam


class ScaleByRadamState(NamedTuple):
  """State of ``scale_by_radam``; each field is the torch.optim.RAdam per-parameter state key
  named here.

  * ``count``: torch ``state["step"]`` (int32 here), the number of updates applied.
  * ``mu``: torch ``state["exp_avg"]``, the first moment.
  * ``nu``: torch ``state["exp_avg_sq"]``, the second moment.
  """
  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


# -2 (1/expm1(x) - 1/x) = 1 - x/6 + x^3/360 - x^5/15120 + x^7/604800 - x^9/23950080 + ...
# (Bernoulli numbers), used for x <= 1 where the closed form cancels.
_RHO_SERIES = (1.0, -1.0 / 6.0, 0.0, 1.0 / 360.0, 0.0, -1.0 / 15120.0, 0.0, 1.0 / 604800.0,
               0.0, -1.0 / 23950080.0)


def radam_scalars(b1: Any, b2: float, count: jax.Array) -> tuple:
  r"""RAdam's per-step scalars at step ``count`` (>= 1), float32:
  ``(bias_correction1, bias_correction2, rectify, rect)``.

  .. math::
    \rho_\infty = \frac{2}{1-b_2} - 1,\qquad
    \rho_t = \rho_\infty - \frac{2 t b_2^t}{1-b_2^t},\qquad
    r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

  and ``rectify`` is :math:`\rho_t > 5`. torch evaluates :math:`\rho_t` in float64; written
  as above in float32 it cancels (1999 - 1993 at t = 6 for b2 = 0.999, ~5e-5 off). Here,
  with :math:`\lambda = -\log b_2` and :math:`x = t\lambda`, the same quantity is
  :math:`\rho_t = \rho_0 + t\,T(x)`, :math:`T(x) = 2/x - 2/\operatorname{expm1}(x)` (a
  Bernoulli series for x <= 1) and :math:`\rho_0 = \rho_\infty - 2/\lambda` (float64, once):
  no cancellation, float32-accurate. ``b2`` must be a Python number (not a schedule).
  """
  bc1 = bias_correction(b1, count)
  bc2 = bias_correction(b2, count)
  rho_inf = 2.0 / (1.0 - b2) - 1.0
  if rho_inf <= 5.0:  # b2 <= 2/3: rho_t < rho_inf <= 5 at every step, never rectified
    return bc1, bc2, jnp.zeros([], bool), jnp.ones([], F32)
  lam = -math.log1p(-(1.0 - b2))
  rho0 = rho_inf - 2.0 / lam
  t = count.astype(F32)
  x = t * jnp.asarray(lam, F32)
  xs = jnp.minimum(x, 1.0)
  series = jnp.zeros([], F32)
  for c in reversed(_RHO_SERIES):
    series = series * xs + c
  xl = jnp.maximum(x, 1.0)
  closed = 2.0 / xl - 2.0 / jnp.expm1(xl)
  rho_t = rho0 + t * jnp.where(x <= 1.0, series, closed)
  k = rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0))
  rect = jnp.sqrt(jnp.maximum((rho_t - 4.0) * (rho_t - 2.0) / rho_t * k, 0.0))
  return bc1, bc2, rho_t > 5.0, rect


def radam_leaf(g: jax.Array, m: jax.Array, v: jax.Array, *, b1: Any, b2: Any, eps: Any,
               bias_correction1: Any, bias_correction2: Any, rectify: Any, rect: Any
               ) -> tuple:
  r"""RAdam on one leaf: ``(direction, m', v')``, torch.optim.RAdam's rule.

  .. math::
    m' = b_1 m + (1-b_1) g,\quad v' = b_2 v + (1-b_2) g^2,\quad
    \hat m = m' / (1-b_1^t) \\
    u = \hat m\, r_t \frac{\sqrt{1-b_2^t}}{\sqrt{v'} + \epsilon}\ \text{if}\ \rho_t > 5
    \ \text{else}\ \hat m

  (scalars from ``radam_scalars``). With ``eps = 0`` an all-zero gradient history gives a 0
  step, not 0/0. A gradient beyond 1.8e19 overflows :math:`g^2` (float32) to inf: that
  coordinate's :math:`v'` is inf and its rectified steps are 0, as in Adam (and torch), never
  NaN (the unrectified first steps, :math:`\hat m`, do not read :math:`v`).
  """
  g32 = upcast(g)
  m1 = ema(m, g32, b1)
  v1 = ema(v, jnp.square(g32), b2)
  m_hat = m1 / bias_correction1
  adapted = safe_div(m_hat, jnp.sqrt(v1) + eps, eps) * (jnp.sqrt(bias_correction2) * rect)
  direction = jnp.where(rectify, adapted, m_hat)
  return direction.astype(g.dtype), m1, v1


def scale_by_radam(
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""RAdam's direction (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and
  Beyond"), torch.optim.RAdam's rule (``radam_scalars``, ``radam_leaf``):

  .. math::
    u_t = \frac{m_t}{1-b_1^t}\cdot\begin{cases}
      r_t\,\sqrt{1-b_2^t} / (\sqrt{v_t} + \epsilon) & \rho_t > 5 \\ 1 & \text{otherwise}
    \end{cases}

  For the first steps (while the variance of the adaptive rate is intractable, :math:`\rho_t
  \le 5`: t <= 5 for b2 = 0.999) the step is bias-corrected momentum SGD.

  Args:
    b1: decay of the first moment, in [0, 1), or a schedule ``n -> b1_n``.
    b2: decay of the second moment, in [0, 1).
    eps: added to the root of the second moment, >= 0.
    mu_dtype: storage dtype of the first moment (arithmetic stays float32).
    nu_dtype: storage dtype of the second moment.
  """
  owner = "scale_by_radam"
  _check_common(owner, b1, b2, eps, mu_dtype, nu_dtype)
  try:
    b2 = float(b2)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"{owner}: `b2` must be a concrete number (the rectification term is "
                    f"derived from it in float64 when the optimizer is built), got "
                    f"{b2!r}; with optax.inject_hyperparams pass static_args=('b2',)") from e

  def init_fn(params):
    return ScaleByRadamState(
        count=jnp.zeros([], jnp.int32), mu=zeros_like(params, mu_dtype),
        nu=zeros_like(params, nu_dtype))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByRadamState)
    del params
    b1_t = value_at(b1, state.count)
    count = optax.safe_increment(state.count)
    bc1, bc2, rectify, rect = radam_scalars(b1_t, b2, count)
    direction, mu, nu = map_leaves(
        lambda g, m, v: radam_leaf(g, m, v, b1=b1_t, b2=b2, eps=eps, bias_correction1=bc1,
                                   bias_correction2=bc2, rectify=rectify, rect=rect),
        updates, state.mu, state.nu, n_outputs=3, owner=owner)
    return direction, ScaleByRadamState(
        count=count, mu=store_tree(mu, mu_dtype, state.mu),
        nu=store_tree(nu, nu_dtype, state.nu, keep_nonzero=True))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Adamax


class ScaleByAdamaxState(NamedTuple):
  """State of ``scale_by_adamax``; each field is the torch.optim.Adamax per-parameter state
  key named here.

  * ``count``: torch ``state["step"]`` (int32 here), the number of updates applied.
  * ``mu``: torch ``state["exp_avg"]``, the first moment.
  * ``nu``: torch ``state["exp_inf"]``, the exponentially weighted infinity norm.
  """
  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def adamax_leaf(g: jax.Array, m: jax.Array, u: jax.Array, *, b1: Any, b2: Any, eps: Any,
                bias_correction1: Any) -> tuple:
  r"""Adamax on one leaf: ``(direction, m', u')``, torch.optim.Adamax's rule.

  .. math::
    m' = b_1 m + (1-b_1) g,\quad u' = \max(b_2 u, |g| + \epsilon),\quad
    d = \frac{m'}{u' (1-b_1^t)}

  (eps inside the max, as torch). With ``eps = 0`` an all-zero gradient history gives a 0
  step, not 0/0.
  """
  g32 = upcast(g)
  m1 = ema(m, g32, b1)
  u1 = jnp.maximum(b2 * upcast(u), jnp.abs(g32) + eps)
  direction = safe_div(m1, u1, eps) / bias_correction1
  return direction.astype(g.dtype), m1, u1


def scale_by_adamax(
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Adamax's direction (Kingma & Ba, 2015, section 7.1), torch.optim.Adamax's rule
  (``adamax_leaf``):

  .. math::
    m_t = b_1 m_{t-1} + (1-b_1) g_t,\quad u_t = \max(b_2 u_{t-1}, |g_t| + \epsilon),\quad
    u_t^\text{dir} = \frac{m_t}{(1-b_1^t)\,u_t}

  Args:
    b1: decay of the first moment, in [0, 1), or a schedule ``n -> b1_n``.
    b2: decay of the infinity norm, in [0, 1).
    eps: added to ``|g|`` inside the max, >= 0.
    mu_dtype: storage dtype of the first moment (arithmetic stays float32).
    nu_dtype: storage dtype of the infinity norm.
  """
  owner = "scale_by_adamax"
  _check_common(owner, b1, b2, eps, mu_dtype, nu_dtype)

  def init_fn(params):
    return ScaleByAdamaxState(
        count=jnp.zeros([], jnp.int32), mu=zeros_like(params, mu_dtype),
        nu=zeros_like(params, nu_dtype))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByAdamaxState)
    del params
    b1_t = value_at(b1, state.count)
    count = optax.safe_increment(state.count)
    bc1 = bias_correction(b1_t, count)
    direction, mu, nu = map_leaves(
        lambda g, m, u: adamax_leaf(g, m, u, b1=b1_t, b2=b2, eps=eps, bias_correction1=bc1),
        updates, state.mu, state.nu, n_outputs=3, owner=owner)
    return direction, ScaleByAdamaxState(
        count=count, mu=store_tree(mu, mu_dtype, state.mu),
        nu=store_tree(nu, nu_dtype, state.nu, keep_nonzero=True))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# The named optimizers


def nadam(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    mask: MaskOrFn = None,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""torch.optim.NAdam (defaults included): ``scale_by_nadam``, then the learning rate.

  .. math::
    p \leftarrow p - lr_t\,u_t(g + wd\,p)\ \text{(coupled, default)}\quad\text{or}\quad
    p \leftarrow p - lr_t\left(u_t(g) + wd\,p\right)\ \text{(decoupled\_weight\_decay)}

  (``decoupled_weight_decay=True`` is torch's NAdamW, ``p *= 1 - lr wd`` before the step.)
  ``b1`` may be a schedule (torch's OneCycleLR / CyclicLR cycling ``betas[0]``).
  """
  owner = "nadam"
  check_bool(owner, "decoupled_weight_decay", decoupled_weight_decay)
  direction = scale_by_nadam(b1, b2, eps, momentum_decay=momentum_decay, mu_dtype=mu_dtype,
                             nu_dtype=nu_dtype)
  return named_chain(owner, direction, learning_rate, weight_decay, mask,
                     decay_first=not decoupled_weight_decay)


def radam(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    decoupled_weight_decay: bool = False,
    mask: MaskOrFn = None,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""torch.optim.RAdam (defaults included): ``scale_by_radam``, then the learning rate.

  Weight decay is coupled (``g + wd p`` enters the moments) unless
  ``decoupled_weight_decay=True`` (torch's RAdamW: ``p <- p - lr (u + wd p)``). ``b1`` may be
  a schedule.
  """
  owner = "radam"
  check_bool(owner, "decoupled_weight_decay", decoupled_weight_decay)
  direction = scale_by_radam(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  return named_chain(owner, direction, learning_rate, weight_decay, mask,
                     decay_first=not decoupled_weight_decay)


def adamax(
    learning_rate: ScalarOrSchedule = 2e-3,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""torch.optim.Adamax (defaults included): coupled decay, ``scale_by_adamax``, learning
  rate: :math:`p \leftarrow p - lr_t\,u_t(g + wd\,p)`. ``b1`` may be a schedule."""
  direction = scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  return named_chain("adamax", direction, learning_rate, weight_decay, mask,
                     decay_first=True)
