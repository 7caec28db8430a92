r"""torch.optim.Adafactor as an optax transformation, step for step.

torch's rule (torch 2.13, ``torch/optim/_adafactor.py``, single-tensor path), which differs
from ``optax.adafactor`` (and from the paper's code): eps1 is applied to the final variance
estimate and to the update (not added to the squared gradient), the relative step size is
capped by the learning rate, :math:`\rho_t = \min(lr, 1/\sqrt t)`, and the weight decay is
decoupled and multiplied by the learning rate (not by the relative step size). The
per-leaf formula is ``adafactor_leaf``; ``scale_by_adafactor`` maps it over the pytree;
``adafactor`` is the named optimizer (``aliases.named_chain``).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm._validation import check_scalar, check_schedule
from jaxopt_llm.optim import aliases
from jaxopt_llm.optim.numerics import (
    check_real_leaves,
    check_state,
    check_updates_like,
    compute_dtype,
    frozen_update,
    is_frozen,
    is_static_zero,
    lerp,
    require_params,
    upcast,
    value_at,
)

ScalarOrSchedule = aliases.ScalarOrSchedule
MaskOrFn = aliases.MaskOrFn


class ScaleByAdafactorState(NamedTuple):
  """State of ``scale_by_adafactor``; each field equals torch.optim.Adafactor's state key:

  * ``count`` = ``step`` (int32 here, float32 in torch, one per parameter there);
  * ``row_var`` = ``row_var``: for a parameter of >= 2 dims, shape ``(..., n, 1)`` (the
    EMA of the mean of :math:`g^2` over the last dim); ``None`` for a parameter of < 2
    dims (torch has no such key then);
  * ``col_var`` = ``col_var``: shape ``(..., 1, m)`` (mean over the second-to-last dim);
    ``None`` for < 2 dims;
  * ``variance`` = ``variance``: for a parameter of < 2 dims, its shape (the EMA of
    :math:`g^2`); ``None`` for >= 2 dims.

  A non-float parameter has ``optax.MaskedNode()`` in all three (no state). The statistics
  are kept in the parameter's compute dtype (float32 for bf16/fp16 parameters, where torch
  keeps the gradient's dtype).
  """
  count: chex.Array
  row_var: optax.Updates
  col_var: optax.Updates
  variance: optax.Updates


def _eps1_of(eps1: Optional[float], param_dtype: Any) -> float:
  """torch's ``eps1``: ``finfo(param.dtype).eps`` when None (the *parameter's* dtype)."""
  return float(jnp.finfo(param_dtype).eps) if eps1 is None else float(eps1)


def _lerp_squares(start: jax.Array, end: jax.Array, weight: Any) -> jax.Array:
  """torch's ``lerp`` of second-moment statistics (values >= 0), with an overflowed
  (``+inf``) one kept ``+inf``: the lerp formula itself gives ``inf - inf * 0 = NaN`` at
  weight 1 and ``inf + w * (x - inf) = NaN`` after, where the EMA is ``+inf``."""
  out = lerp(start, end, weight)
  overflow = (jnp.isposinf(start) | jnp.isposinf(end)) & ~jnp.isnan(start) & ~jnp.isnan(end)
  return jnp.where(overflow, jnp.inf, out)


def adafactor_leaf(g: jax.Array, p: jax.Array, r: Optional[jax.Array],
                   c: Optional[jax.Array], v: Optional[jax.Array], count: jax.Array, *,
                   learning_rate: Any, beta2_decay: Any, eps1: Optional[float], eps2: Any,
                   d: Any) -> tuple:
  r"""Adafactor (torch's rule) on one leaf at step ``count`` = t >= 1:
  ``(direction, r', c', v')``; the parameter moves by ``-direction`` (plus weight decay).

  .. math::
    \hat\beta_{2,t} = 1 - t^{\tau},\quad \rho_t = \min(lr, 1/\sqrt t),\quad
    \alpha_t = \max(\epsilon_2, \mathrm{RMS}(p))\,\rho_t \\
    \text{dim} \ge 2:\ R' = \operatorname{lerp}(R, \operatorname{mean}_{-1} g^2,
    t^{\tau}),\ C' = \operatorname{lerp}(C, \operatorname{mean}_{-2} g^2, t^{\tau}),\
    \hat V = \frac{R' C'}{\max(\operatorname{mean}_{-2} R', \epsilon_1)} \\
    \text{else}:\ \hat V = V' = \operatorname{lerp}(V, g^2, t^{\tau}) \\
    U = \frac{g}{\sqrt{\max(\hat V, \epsilon_1^2)}},\qquad
    u = \frac{\alpha_t}{\max(1, \mathrm{RMS}(U)/d)}\, U

  ``r`` and ``c`` are given for a leaf of >= 2 dims (``v`` is None), ``v`` otherwise.
  ``eps1=None`` means ``finfo(p.dtype).eps``. With ``eps1 = 0`` an entry whose estimate
  :math:`\hat V` is 0 (an all-zero row or column so far, or an underflowed :math:`g^2`)
  steps by 0, where torch computes inf * 0 = NaN; an overflowed estimate steps by 0 too,
  as in Adam: a :math:`g^2` beyond the float32 range (|g| > 1.8e19) makes its row and
  column statistics inf (kept in the state), and every entry whose estimate is then inf or
  inf / inf, 0 * inf (torch: NaN) steps by 0, never NaN. A NaN gradient propagates.
  Returns the direction in ``g``'s dtype and the new statistics in the compute dtype.
  """
  g32, p32 = upcast(g), upcast(p)
  dtype = g32.dtype
  n = g.size
  if n == 0:  # nothing to move (torch would divide by numel 0)
    return jnp.zeros_like(g), r, c, v
  e1 = _eps1_of(eps1, jnp.asarray(p).dtype)
  t = count.astype(dtype)
  weight = jnp.power(t, jnp.asarray(beta2_decay, dtype))  # 1 - beta2_t
  lr = jnp.asarray(learning_rate, dtype)
  rho = jnp.minimum(lr, jax.lax.rsqrt(t))
  rms_p = jnp.sqrt(jnp.sum(jnp.square(p32))) / np.sqrt(n).astype(dtype)
  alpha = jnp.maximum(jnp.asarray(eps2, dtype), rms_p) * rho
  g2 = jnp.square(g32)
  if g.ndim >= 2:
    r1 = _lerp_squares(r, jnp.mean(g2, axis=-1, keepdims=True), weight)
    c1 = _lerp_squares(c, jnp.mean(g2, axis=-2, keepdims=True), weight)
    v1 = None
    v_hat = (r1 * c1) / jnp.maximum(jnp.mean(r1, axis=-2, keepdims=True),
                                    jnp.asarray(e1, dtype))
  else:
    r1 = c1 = None
    v1 = _lerp_squares(v, g2, weight)
    v_hat = v1
  v_hat = jnp.maximum(v_hat, jnp.asarray(e1 * e1, dtype))
  # g / sqrt(v) as torch writes it (rsqrt, then multiply); 0 where v is 0 or inf, and where
  # the factored estimate is NaN from overflowed but NaN-free statistics (inf / inf when a
  # g**2 beyond the float range made a row and its mean inf, or 0 * inf: torch gives NaN
  # there). A NaN in the statistics themselves (a NaN gradient) still propagates.
  bad = (v_hat == 0) | (v_hat == jnp.inf)
  if g.ndim >= 2:
    stats_nan = (jnp.isnan(r1) | jnp.isnan(c1)
                 | jnp.isnan(jnp.mean(r1, axis=-2, keepdims=True)))
    bad = bad | (jnp.isnan(v_hat) & ~stats_nan)
  u = jnp.where(bad, jnp.zeros_like(g32), g32 * jax.lax.rsqrt(jnp.where(bad, 1.0, v_hat)))
  rms_u = jnp.sqrt(jnp.sum(jnp.square(u))) / np.sqrt(n).astype(dtype)
  denom = jnp.maximum(1.0, rms_u / jnp.asarray(d, dtype))
  return ((alpha / denom) * u).astype(g.dtype), r1, c1, v1


def _check_eps(owner: str, eps: Any) -> tuple:
  if not isinstance(eps, (tuple, list)) or len(eps) != 2:
    raise TypeError(f"{owner}: `eps` must be a pair (eps1, eps2), eps1 a number or None, got "
                    f"{eps!r}")
  eps1, eps2 = eps
  if eps1 is not None:
    check_scalar(owner, "eps[0]", eps1, lo=0.0)
  check_scalar(owner, "eps[1]", eps2, lo=0.0)
  return eps1, eps2


def _check_adafactor(owner: str, learning_rate: Any, beta2_decay: Any, eps: Any,
                     d: Any) -> tuple:
  check_schedule(owner, "learning_rate", learning_rate, lo=0.0)
  check_scalar(owner, "beta2_decay", beta2_decay, hi=0.0)
  check_scalar(owner, "d", d, lo=1.0)
  return _check_eps(owner, eps)


def scale_by_adafactor(
    learning_rate: ScalarOrSchedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[Optional[float], float] = (None, 1e-3),
    d: float = 1.0,
) -> optax.GradientTransformation:
  r"""torch.optim.Adafactor's step without weight decay (Shazeer & Stern, 2018, "Adafactor:
  Adaptive Learning Rates with Sublinear Memory Cost", as torch implements it;
  ``adafactor_leaf``), returned positive: chain it with ``scale(-1)`` (``adafactor`` does).

  .. math::
    u_t = \frac{\max(\epsilon_2, \mathrm{RMS}(p_{t-1}))\,\min(lr_t, t^{-1/2})}
               {\max(1, \mathrm{RMS}(U_t)/d)}\, U_t,\qquad
    U_t = \frac{g_t}{\sqrt{\max(\hat V_t, \epsilon_1^2)}}

  with :math:`\hat V_t` from factored row/column second moments over the last two dims for
  parameters of >= 2 dims (a 3-D parameter gets one factorisation per leading index), an
  unfactored one below, both averaged with :math:`1 - \hat\beta_{2,t} = t^{\tau}`
  (``beta2_decay`` :math:`\tau`; the first step takes :math:`g^2` as it is). The learning
  rate only caps the relative step size :math:`\rho_t`, so this block owns it (and needs
  ``params``: the step is relative to :math:`\mathrm{RMS}(p)`).

  Args:
    learning_rate: the cap on :math:`\rho_t` (a number or a schedule), >= 0.
    beta2_decay: :math:`\tau` <= 0.
    eps: ``(eps1, eps2)``: eps1 >= 0 or None (``finfo(param dtype).eps``) bounds the
      variance estimate from below; eps2 >= 0 is the smallest parameter RMS used to scale
      the step.
    d: the update clipping threshold, >= 1.
  """
  owner = "scale_by_adafactor"
  eps1, eps2 = _check_adafactor(owner, learning_rate, beta2_decay, eps, d)

  def init_fn(params):
    check_real_leaves(params)

    def slots(p):
      if is_frozen(p):
        return (optax.MaskedNode(),) * 3
      shape, dtype = jnp.shape(p), compute_dtype(jnp.asarray(p))
      if len(shape) >= 2:
        return (jnp.zeros(shape[:-1] + (1,), dtype),
                jnp.zeros(shape[:-2] + (1,) + shape[-1:], dtype), None)
      return None, None, jnp.zeros(shape, dtype)

    treedef = jax.tree.structure(params)
    out = [slots(p) for p in treedef.flatten_up_to(params)]
    row, col, var = (treedef.unflatten([o[i] for o in out]) for i in range(3))
    return ScaleByAdafactorState(count=jnp.zeros([], jnp.int32), row_var=row, col_var=col,
                                 variance=var)

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByAdafactorState)
    require_params(owner, params)
    check_updates_like(owner, updates, params)
    count = optax.safe_increment(state.count)
    lr = value_at(learning_rate, state.count)
    treedef = jax.tree.structure(updates)
    try:
      cols = [treedef.flatten_up_to(x) for x in (params, state.row_var, state.col_var,
                                                  state.variance)]
    except (ValueError, TypeError) as e:
      raise ValueError(f"{owner}: `state` was built by init for other parameters: its "
                       f"structure differs from the updates' {treedef}") from e
    outs = []
    for g, p, r, c, v in zip(treedef.flatten_up_to(updates), *cols):
      if isinstance(v, optax.MaskedNode) or isinstance(r, optax.MaskedNode):
        outs.append((frozen_update(g), r, c, v))
        continue
      shape = jnp.shape(g)
      want = (r is not None and c is not None) if len(shape) >= 2 else v is not None
      if want and len(shape) >= 2:  # the factored statistics' shapes, as init makes them
        want = (jnp.shape(r) == shape[:-1] + (1,)
                and jnp.shape(c) == shape[:-2] + (1,) + shape[-1:])
      if not want or (v is not None and jnp.shape(v) != shape):
        raise ValueError(f"{owner}: `state` was built by init for other parameters (a leaf "
                         f"of shape {jnp.shape(g)} has no matching statistics)")
      outs.append(adafactor_leaf(g, p, r, c, v, count, learning_rate=lr,
                                 beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d))
    direction, row, col, var = (treedef.unflatten([o[i] for o in outs]) for i in range(4))
    return direction, ScaleByAdafactorState(count=count, row_var=row, col_var=col,
                                            variance=var)

  return optax.GradientTransformation(init_fn, update_fn)


def _decay_times_lr(learning_rate: Any, weight_decay: Any) -> Any:
  """``lr * wd`` as a number, or as a schedule when either is one (same step count)."""
  if is_static_zero(weight_decay):
    return 0.0
  if not callable(learning_rate) and not callable(weight_decay):
    return learning_rate * weight_decay
  return lambda n: value_at(learning_rate, n) * value_at(weight_decay, n)


def adafactor(
    learning_rate: ScalarOrSchedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[Optional[float], float] = (None, 1e-3),
    d: float = 1.0,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""torch.optim.Adafactor (defaults included): ``scale_by_adafactor``, then decoupled
  weight decay multiplied by the learning rate, then the sign flip:

  .. math::
    p_t = p_{t-1} - lr_t\,wd\,p_{t-1} - u_t

  (torch: ``p.mul_(1 - lr * wd)`` before ``p.add_(U, alpha=-alpha/denom)``, with
  :math:`u_t` computed from :math:`p_{t-1}`; torch rounds the factor ``1 - lr*wd`` to the
  parameter dtype, here ``lr*wd*p`` is not rounded first). Not ``optax.adafactor``: see the
  module docstring. ``update`` needs ``params``. Arguments after ``d`` are keyword-only.
  """
  owner = "adafactor"
  _check_adafactor(owner, learning_rate, beta2_decay, eps, d)
  check_schedule(owner, "weight_decay", weight_decay, lo=0.0)
  direction = scale_by_adafactor(learning_rate, beta2_decay, eps, d)
  return aliases.named_chain(owner, direction, 1.0, _decay_times_lr(learning_rate, weight_decay),
                             mask, decay_first=False)
