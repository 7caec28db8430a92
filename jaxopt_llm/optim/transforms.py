"""Gradient transformations (``scale_by_*``): the building blocks of our named optimizers.

Each function returns an ``optax.GradientTransformation`` with a NamedTuple state, following
optax's conventions, but with PyTorch's update semantics so that a chain of them reproduces
``torch.optim`` step for step:

* ``scale_by_adam``: eps added *after* the bias-corrected square root, like torch.optim.Adam.
* ``scale_by_lion``: the official Lion rule (Chen et al., 2023, google/automl).
* ``scale_by_momentum``: torch.optim.SGD's momentum buffer (first step starts at the gradient).
* ``scale_by_adagrad``, ``scale_by_rmsprop``: torch.optim.Adagrad / RMSprop.

Statistics are always computed in float32 (or wider when the gradient is wider) and only
*stored* in ``mu_dtype`` / ``nu_dtype``: "fp32 master math" for bf16 moments.
The learning rate and weight decay are separate links of the chain (see ``aliases.py``).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from jaxopt_llm._validation import check_real

_F32 = jnp.float32


def _compute_dtype(x: jax.Array) -> jnp.dtype:
  """float32 for half-precision inputs; keeps float64 when x64 is on."""
  return jnp.promote_types(x.dtype, _F32)


def _up(x: jax.Array) -> jax.Array:
  return x.astype(_compute_dtype(x))


def _zeros_like(params: optax.Params, dtype: Optional[Any]) -> optax.Updates:
  return jax.tree.map(
      lambda p: jnp.zeros(p.shape, dtype=dtype or _compute_dtype(p)), params)


def _store(x: jax.Array, dtype: Any, *, keep_nonzero: bool = False) -> jax.Array:
  """``x.astype(dtype)`` that saturates instead of overflowing to inf (fp16 state storage).

  With ``keep_nonzero`` (second moments, which are >= 0) a positive value that would round
  to zero is stored as the smallest positive number of ``dtype`` instead: in fp16 (and so
  for ``nu_dtype=float16``) any v < 6e-8 underflows, while the first moment m it pairs with
  may not, and m / (sqrt(0) + eps) then overflows the fp16 update. A no-op (no extra op)
  when ``dtype`` is ``x``'s own dtype, i.e. for the default fp32 state.
  """
  dtype = jnp.dtype(dtype)
  if (dtype == x.dtype or not jnp.issubdtype(dtype, jnp.floating)
      or not jnp.issubdtype(x.dtype, jnp.floating)):
    return x.astype(dtype)
  # Only a narrower exponent range (fp16, not bf16) needs the guards: no extra ops for bf16.
  to, frm = jnp.finfo(dtype), jnp.finfo(x.dtype)
  if to.maxexp < frm.maxexp:
    x = jnp.clip(x, -float(to.max), float(to.max))
  y = x.astype(dtype)
  if keep_nonzero and to.minexp > frm.minexp:
    tiny = jnp.asarray(to.smallest_subnormal, dtype)
    y = jnp.where((y == 0) & (x > 0), tiny, y)
  return y


def _cast_tree(tree: optax.Updates, dtype: Optional[Any],
               like: optax.Updates, *, keep_nonzero: bool = False) -> optax.Updates:
  """Stores ``tree`` in ``dtype`` (or the dtype it had in ``like``), see ``_store``."""
  return jax.tree.map(
      lambda t, l: _store(t, dtype or l.dtype, keep_nonzero=keep_nonzero), tree, like)


def _safe_div(num: jax.Array, den: jax.Array, eps: Any) -> jax.Array:
  """``num / den``, with 0 where ``den == 0`` unless ``eps`` is a Python number > 0.

  Adam's denominator ``sqrt(v) + eps`` is 0 only when eps is 0 (or injected as an array) and
  v is 0, i.e. for an all-zero gradient history, whose step is 0 (not 0/0 = NaN as in
  torch.optim.Adam(eps=0)). With a literal eps > 0 this is a plain division. NaN stays NaN.
  """
  if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0:
    return num / den
  zero = den == 0
  return jnp.where(zero, jnp.zeros_like(num), num / jnp.where(zero, 1.0, den))


def _increment(count: jax.Array) -> jax.Array:
  """count + 1 that saturates instead of wrapping around at int32 max."""
  return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def _bias_correction(b: Any, t: jax.Array) -> jax.Array:
  """1 - b**t, accurate in float32 for b close to 1.

  Computed as -expm1(t * log b) with log b taken in float64 when b is a Python number: in
  float32, 1 - 0.999**1 loses 1e-5 of its value to cancellation (PyTorch does this sum in
  double, so the float32 form would cost us parity).
  """
  if isinstance(b, (int, float)):
    if b == 0:
      return jnp.ones([], _F32)
    log_b = jnp.asarray(math.log(b), _F32)
  else:
    log_b = jnp.log(jnp.asarray(b, _F32))
  return -jnp.expm1(t * log_b)


def _is_static_zero(x: Any) -> bool:
  """True only for a Python number equal to 0.

  Arrays (e.g. from ``optax.inject_hyperparams``) never count as zero, so the structure of a
  chain built at ``init`` equals the one built again inside ``update``.
  """
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


# --------------------------------------------------------------------------------------------
# Adam


class ScaleByAdamState(NamedTuple):
  """State of ``scale_by_adam``: step count, first and second moments (and their max)."""
  count: chex.Array  # int32, number of updates applied so far
  mu: optax.Updates
  nu: optax.Updates
  nu_max: Optional[optax.Updates]  # only with amsgrad=True, else None


def scale_by_adam(
    b1: float = 0.9,
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

  With ``amsgrad`` the denominator uses :math:`\max_{s\le t} v_s` (torch's amsgrad).
  Moments start at zero. The moments are computed in float32 and stored in ``mu_dtype`` /
  ``nu_dtype`` (default: the parameter dtype promoted to float32), so bf16 storage halves the
  state without changing the arithmetic. Because the arithmetic is float32, the default
  ``eps=1e-8`` does not underflow for fp16 parameters. fp16-safe storage: moments saturate at
  the storage dtype's max instead of becoming inf, a positive second moment never rounds to
  0 (``nu_dtype=float16`` underflows below 6e-8), and with ``eps=0`` an all-zero gradient
  history gives a 0 step, not 0/0.

  Args:
    b1: decay of the first moment, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    eps: added to the bias-corrected root of the second moment, >= 0.
    amsgrad: use the running maximum of the second moment.
    mu_dtype: storage dtype of the first moment.
    nu_dtype: storage dtype of the second moment (and of its maximum).
  """
  owner = "scale_by_adam"
  check_real(owner, "b1", b1, lo=0.0, hi=1.0, hi_open=True)
  check_real(owner, "b2", b2, lo=0.0, hi=1.0, hi_open=True)
  check_real(owner, "eps", eps, lo=0.0)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)

  def init_fn(params):
    nu = _zeros_like(params, nu_dtype)
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=_zeros_like(params, mu_dtype),
        nu=nu,
        nu_max=_zeros_like(params, nu_dtype) if amsgrad else None)

  def update_fn(updates, state, params=None):
    del params
    count = _increment(state.count)
    t = count.astype(_F32)
    bc1 = _bias_correction(b1, t)
    bc2_sqrt = jnp.sqrt(_bias_correction(b2, t))

    mu = jax.tree.map(lambda m, g: b1 * _up(m) + (1.0 - b1) * _up(g), state.mu, updates)
    nu = jax.tree.map(
        lambda v, g: b2 * _up(v) + (1.0 - b2) * jnp.square(_up(g)), state.nu, updates)
    if amsgrad:
      nu_max = jax.tree.map(lambda vm, v: jnp.maximum(_up(vm), v), state.nu_max, nu)
      denom_src = nu_max
    else:
      nu_max = None
      denom_src = nu

    def direction(m, v, g):
      u = _safe_div(m / bc1, jnp.sqrt(v) / bc2_sqrt + eps, eps)
      return u.astype(g.dtype)

    new_updates = jax.tree.map(direction, mu, denom_src, updates)
    return new_updates, ScaleByAdamState(
        count=count,
        mu=_cast_tree(mu, mu_dtype, state.mu),
        nu=_cast_tree(nu, nu_dtype, state.nu, keep_nonzero=True),
        nu_max=None if nu_max is None else _cast_tree(nu_max, nu_dtype, state.nu_max,
                                                      keep_nonzero=True))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Lion


class ScaleByLionState(NamedTuple):
  """State of ``scale_by_lion``: step count and the momentum."""
  count: chex.Array
  mu: optax.Updates


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Lion's direction (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

  The official rule (google/automl ``lion_pytorch.py``): the sign is taken of an
  interpolation that uses the *old* momentum, and the momentum is updated afterwards with a
  different decay:

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
  check_real(owner, "b1", b1, lo=0.0, hi=1.0, hi_open=True)
  check_real(owner, "b2", b2, lo=0.0, hi=1.0, hi_open=True)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    return ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=_zeros_like(params, mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    direction = jax.tree.map(
        lambda m, g: jnp.sign(b1 * _up(m) + (1.0 - b1) * _up(g)).astype(g.dtype),
        state.mu, updates)
    mu = jax.tree.map(lambda m, g: b2 * _up(m) + (1.0 - b2) * _up(g), state.mu, updates)
    return direction, ScaleByLionState(
        count=_increment(state.count), mu=_cast_tree(mu, mu_dtype, state.mu))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# SGD momentum (PyTorch semantics)


class ScaleByMomentumState(NamedTuple):
  """State of ``scale_by_momentum``: step count and the momentum buffer."""
  count: chex.Array
  trace: optax.Updates


def scale_by_momentum(
    momentum: float = 0.9,
    dampening: float = 0.0,
    nesterov: bool = False,
    *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""torch.optim.SGD's momentum buffer.

  .. math::
    b_1 = g_1,\qquad b_t = \mu\, b_{t-1} + (1-\tau)\, g_t \quad (t > 1) \\
    u_t = g_t + \mu\, b_t \ \text{(nesterov)}\quad\text{else}\quad u_t = b_t

  With ``dampening = momentum`` this is the EMA form :math:`b = \beta b + (1-\beta) g`.
  Like PyTorch (and unlike ``optax.trace``), the buffer starts at the first gradient, not at
  zero, so the first step equals plain SGD.

  Args:
    momentum: the factor :math:`\mu`, in [0, 1).
    dampening: :math:`\tau`, in [0, 1].
    nesterov: Nesterov momentum (requires momentum > 0 and dampening == 0, as PyTorch).
    mu_dtype: storage dtype of the buffer.
  """
  owner = "scale_by_momentum"
  check_real(owner, "momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
  check_real(owner, "dampening", dampening, lo=0.0, hi=1.0)
  if nesterov and (_is_static_zero(momentum) or not _is_static_zero(dampening)):
    raise ValueError(
        f"{owner}: `nesterov` requires momentum > 0 and dampening == 0, got "
        f"momentum={momentum!r}, dampening={dampening!r}")
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    return ScaleByMomentumState(
        count=jnp.zeros([], jnp.int32), trace=_zeros_like(params, mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    first = state.count == 0

    def buffer(b, g):
      g = _up(g)
      return jnp.where(first, g, momentum * _up(b) + (1.0 - dampening) * g)

    trace = jax.tree.map(buffer, state.trace, updates)
    if nesterov:
      out = jax.tree.map(lambda g, b: (_up(g) + momentum * b).astype(g.dtype), updates, trace)
    else:
      out = jax.tree.map(lambda g, b: b.astype(g.dtype), updates, trace)
    return out, ScaleByMomentumState(
        count=_increment(state.count), trace=_cast_tree(trace, mu_dtype, state.trace))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Adagrad (PyTorch semantics)


class ScaleByAdagradState(NamedTuple):
  """State of ``scale_by_adagrad``: step count and the running sum of squared gradients."""
  count: chex.Array
  sum_of_squares: optax.Updates


def scale_by_adagrad(
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    lr_decay: float = 0.0,
) -> optax.GradientTransformation:
  r"""torch.optim.Adagrad's direction (Duchi et al., 2011).

  .. math::
    s_t = s_{t-1} + g_t^2,\qquad u_t = \frac{g_t}{(\sqrt{s_t} + \epsilon)(1 + (t-1)\,d)}

  with :math:`s_0` = ``initial_accumulator_value`` and :math:`d` = ``lr_decay``. PyTorch adds
  eps outside the square root (optax.adagrad adds it inside and starts the sum at 0.1).
  """
  owner = "scale_by_adagrad"
  check_real(owner, "initial_accumulator_value", initial_accumulator_value, lo=0.0)
  check_real(owner, "eps", eps, lo=0.0)
  check_real(owner, "lr_decay", lr_decay, lo=0.0)

  def init_fn(params):
    return ScaleByAdagradState(
        count=jnp.zeros([], jnp.int32),
        sum_of_squares=jax.tree.map(
            lambda p: jnp.full(p.shape, initial_accumulator_value, _compute_dtype(p)), params))

  def update_fn(updates, state, params=None):
    del params
    count = _increment(state.count)
    decay = 1.0 + (count.astype(_F32) - 1.0) * lr_decay
    sos = jax.tree.map(lambda s, g: s + jnp.square(_up(g)), state.sum_of_squares, updates)
    out = jax.tree.map(
        lambda g, s: (_up(g) / (jnp.sqrt(s) + eps) / decay).astype(g.dtype), updates, sos)
    return out, ScaleByAdagradState(count=count, sum_of_squares=sos)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# RMSprop (PyTorch semantics)


class ScaleByRmspropState(NamedTuple):
  """State of ``scale_by_rmsprop``: square average, gradient average (centered), buffer."""
  count: chex.Array
  square_avg: optax.Updates
  grad_avg: Optional[optax.Updates]  # centered=True only
  momentum_buffer: Optional[optax.Updates]  # momentum given (not a literal 0) only


def scale_by_rmsprop(
    alpha: float = 0.99,
    eps: float = 1e-8,
    centered: bool = False,
    momentum: float = 0.0,
) -> optax.GradientTransformation:
  r"""torch.optim.RMSprop's direction (Hinton, 2012).

  .. math::
    s_t = \alpha s_{t-1} + (1-\alpha) g_t^2,\quad
    d_t = \sqrt{s_t - \bar g_t^2} + \epsilon \ \text{(centered,}\ \bar g_t = \alpha \bar g_{t-1}
    + (1-\alpha) g_t)\ \text{else}\ \sqrt{s_t} + \epsilon \\
    u_t = b_t = \mu b_{t-1} + g_t / d_t \ \text{(momentum)}\quad\text{else}\quad u_t = g_t / d_t

  eps is added outside the square root (optax.rmsprop adds it inside by default).
  """
  owner = "scale_by_rmsprop"
  check_real(owner, "alpha", alpha, lo=0.0, hi=1.0, hi_open=True)
  check_real(owner, "eps", eps, lo=0.0)
  check_real(owner, "momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
  use_momentum = not _is_static_zero(momentum)

  def init_fn(params):
    zeros = lambda: _zeros_like(params, None)
    return ScaleByRmspropState(
        count=jnp.zeros([], jnp.int32),
        square_avg=zeros(),
        grad_avg=zeros() if centered else None,
        momentum_buffer=zeros() if use_momentum else None)

  def update_fn(updates, state, params=None):
    del params
    square_avg = jax.tree.map(
        lambda s, g: alpha * s + (1.0 - alpha) * jnp.square(_up(g)), state.square_avg, updates)
    if centered:
      # lerp form a + (1-alpha)(g - a), as torch: s - gbar**2 below cancels, so the way gbar
      # is rounded shows up in the result.
      grad_avg = jax.tree.map(
          lambda a, g: a + (1.0 - alpha) * (_up(g) - a), state.grad_avg, updates)
      # max(., 0) only guards against rounding below zero; mathematically s >= gbar^2.
      denom = jax.tree.map(
          lambda s, a: jnp.sqrt(jnp.maximum(s - jnp.square(a), 0.0)) + eps, square_avg, grad_avg)
    else:
      grad_avg = None
      denom = jax.tree.map(lambda s: jnp.sqrt(s) + eps, square_avg)
    scaled = jax.tree.map(lambda g, d: _up(g) / d, updates, denom)
    if use_momentum:
      buf = jax.tree.map(lambda b, x: momentum * b + x, state.momentum_buffer, scaled)
      scaled = buf
    else:
      buf = None
    out = jax.tree.map(lambda x, g: x.astype(g.dtype), scaled, updates)
    return out, ScaleByRmspropState(
        count=_increment(state.count), square_avg=square_avg, grad_avg=grad_avg,
        momentum_buffer=buf)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Sophia (official SophiaG rule)


class ScaleBySophiaState(NamedTuple):
  """State of ``scale_by_sophia``.

  ``win_rate`` is written by every update for logging (see ``jaxopt_llm.optim.sophia_win_rate``
  and ``sophia_hessian_norm``, which find this state anywhere inside a chain).
  """
  count: chex.Array  # int32, number of updates applied so far
  mu: optax.Updates  # momentum m (EMA of gradients, no bias correction)
  hessian: optax.Updates  # h, EMA of the Hessian-diagonal estimates (stored in nu_dtype)
  hessian_count: chex.Array  # int32, number of estimates folded into h so far
  win_rate: chex.Array  # float32, fraction of coordinates NOT clipped by the last update


def _sophia_direction(m: jax.Array, h: jax.Array, rho: Any,
                      eps: Any) -> tuple[jax.Array, jax.Array]:
  """``sign(m) * min(|m| / (rho * max(h, 0) + eps), 1)`` and the not-clipped mask.

  Written as a select so that no 0/0 or x/0 is ever evaluated: when |m| >= denominator the
  ratio is exactly 1 (as min(., 1) gives), otherwise the denominator is > |m| >= 0.
  ``h > 0`` is False for negative, zero and NaN curvature, which all count as zero.
  """
  a = jnp.abs(m)
  denom = rho * jnp.where(h > 0, h, jnp.zeros_like(h)) + eps
  kept = a < denom
  ratio = jnp.where(kept, a / jnp.where(kept, denom, jnp.ones_like(denom)), 1.0)
  return jnp.sign(m) * ratio, kept


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    eps: float = 1e-15,
    *,
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

  ``update(updates, state, params=None, *, hessian=None)``: ``hessian`` (an extra argument, so
  that ``optax.chain`` forwards it) is a pytree like the params holding a fresh estimate
  :math:`\hat H_t` of the Hessian diagonal (see ``jaxopt_llm.optim.hessian``). It is folded
  into the EMA *after* the step, as the official code calls ``update_hessian()`` after
  ``step()``: this step uses the previous EMA. Absent or ``None``: ``h`` is unchanged.

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
    0/0 is evaluated, so no NaN is produced even with ``eps=0``. ``h = +inf`` freezes that
    coordinate (the limit of the rule); a non-finite estimate stays visible in the stored
    EMA, and so in ``sophia_hessian_norm``.
  * **Before the first estimate** ``h = 0`` and the step is ``sign(m)`` (times ``lr``): sign
    momentum, like the official code, whose first estimate arrives after ``k`` steps.

  The state records ``win_rate``, the fraction of coordinates with ``|m| < rho*max(h,0) +
  eps`` (not clipped) in the last update, for monitoring.

  Args:
    b1: decay of the momentum, in [0, 1).
    b2: decay of the Hessian EMA, in [0, 1).
    rho: the clipping threshold :math:`\rho` (``gamma`` in the paper), >= 0.
    eps: added to the denominator, >= 0.
    mu_dtype: storage dtype of the momentum (arithmetic stays float32).
    nu_dtype: storage dtype of the Hessian EMA (the second-moment slot, named as in Adam).
  """
  owner = "scale_by_sophia"
  check_real(owner, "b1", b1, lo=0.0, hi=1.0, hi_open=True)
  check_real(owner, "b2", b2, lo=0.0, hi=1.0, hi_open=True)
  check_real(owner, "rho", rho, lo=0.0)
  check_real(owner, "eps", eps, lo=0.0)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)

  def init_fn(params):
    return ScaleBySophiaState(
        count=jnp.zeros([], jnp.int32),
        mu=_zeros_like(params, mu_dtype),
        hessian=_zeros_like(params, nu_dtype),
        hessian_count=jnp.zeros([], jnp.int32),
        win_rate=jnp.zeros([], _F32))

  def fold(h, est):
    """One EMA step of ``h`` with the estimate; MaskedNode (inside optax.masked) stays."""
    if isinstance(h, optax.MaskedNode):
      return h
    est = jnp.asarray(est)
    if est.shape != h.shape:
      raise ValueError(
          f"{owner}: each `hessian` leaf must have its parameter's shape {h.shape}, got "
          f"{est.shape}")
    new = b2 * _up(h) + (1.0 - b2) * est.astype(_compute_dtype(h))
    return new.astype(h.dtype)

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    del params, extra_args
    mu = jax.tree.map(lambda m, g: b1 * _up(m) + (1.0 - b1) * _up(g), state.mu, updates)
    # Two maps over the same expression (XLA computes it once): a map returning tuples
    # would be ambiguous when the params themselves are tuples.
    direction = jax.tree.map(
        lambda m, h, g: _sophia_direction(m, _up(h), rho, eps)[0].astype(g.dtype),
        mu, state.hessian, updates)
    kept = jax.tree.leaves(jax.tree.map(
        lambda m, h: _sophia_direction(m, _up(h), rho, eps)[1], mu, state.hessian))
    total = sum(k.size for k in kept)
    win_rate = (sum(jnp.sum(k, dtype=_F32) for k in kept) / max(total, 1)
                if kept else jnp.zeros([], _F32))

    if hessian is None:
      h, hessian_count = state.hessian, state.hessian_count
    else:
      try:
        h = jax.tree.map(fold, state.hessian, hessian,
                         is_leaf=lambda x: isinstance(x, optax.MaskedNode))
      except (ValueError, TypeError) as e:
        if str(e).startswith(owner):
          raise
        raise ValueError(
            f"{owner}: `hessian` must be a pytree with the parameters' structure "
            f"({jax.tree.structure(state.hessian)}), got {jax.tree.structure(hessian)}"
        ) from e
      hessian_count = _increment(state.hessian_count)
    return direction, ScaleBySophiaState(
        count=_increment(state.count),
        mu=_cast_tree(mu, mu_dtype, state.mu),
        hessian=h,
        hessian_count=hessian_count,
        win_rate=jnp.asarray(win_rate, _F32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
