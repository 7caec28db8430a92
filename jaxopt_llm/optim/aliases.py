"""Named optimizers: short ``optax.chain``s of building blocks with PyTorch / official defaults.

``jaxopt_llm.optim.adamw(1e-3)`` and ``torch.optim.AdamW(params, lr=1e-3)`` agree step for
step (fp32, verified for 200 steps in ``tests/test_optim_parity_torch.py``).

Every ``lr`` and ``weight_decay`` accepts a float or an optax schedule ``step -> value``.
Decoupled weight decay (AdamW, Lion) is multiplied by the current learning rate, as in
PyTorch: ``p <- p - lr_t * (u_t + wd * p)``. Coupled (L2) decay (SGD, Adagrad, RMSprop,
``adam_l2``) is added to the gradient before the statistics: ``g <- g + wd * p``.

``mask`` selects which parameters are decayed: a pytree of bools like the params, or a
callable ``params -> such a pytree`` (see ``weight_decay_mask``). With
``optax.inject_hyperparams``, pass ``static_args="mask"`` for a callable mask (optax treats
callables as schedules otherwise).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import optax

from jaxopt_llm._validation import check_real
from jaxopt_llm.optim import fused as _fused
from jaxopt_llm.optim import transforms
from jaxopt_llm.optim.transforms import _is_static_zero

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def weight_decay_mask(params: optax.Params) -> Any:
  """The usual LLM rule: decay matrices (kernels, embeddings), not biases or norm scales.

  Returns a pytree of bools with ``params``' structure: True where ``ndim >= 2``.
  Use as ``adamw(lr, mask=weight_decay_mask)``.
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _check_lr(owner: str, lr: ScalarOrSchedule) -> None:
  check_real(owner, "lr", lr, lo=0.0)


def _check_wd(owner: str, weight_decay: ScalarOrSchedule) -> None:
  check_real(owner, "weight_decay", weight_decay, lo=0.0)


def _decay(weight_decay: ScalarOrSchedule, mask: MaskOrFn) -> list[optax.GradientTransformation]:
  """``add_decayed_weights`` unless the decay is a literal 0 (saves a pass over the params)."""
  if _is_static_zero(weight_decay):
    return []
  return [optax.add_decayed_weights(weight_decay, mask)]


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""torch.optim.SGD: :math:`p \leftarrow p - lr\cdot u` with ``scale_by_momentum``'s buffer.

  ``momentum=0`` (the default) is plain SGD and keeps no state. Weight decay is coupled (L2).
  """
  _check_lr("sgd", lr)
  _check_wd("sgd", weight_decay)
  check_real("sgd", "momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
  parts = _decay(weight_decay, mask)
  if not _is_static_zero(momentum) or nesterov:
    parts.append(transforms.scale_by_momentum(momentum, dampening, nesterov))
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts)


def momentum(
    lr: ScalarOrSchedule,
    beta: float = 0.9,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""Momentum in EMA form: :math:`v \leftarrow \beta v + (1-\beta) g,\ p \leftarrow p - lr\,v`.

  Equals ``torch.optim.SGD(momentum=beta, dampening=beta)``; as there, ``v`` starts at
  the first gradient. Unlike the heavy-ball form (``sgd(momentum=...)``) the step size does
  not grow by ``1 / (1 - beta)``.
  """
  check_real("momentum", "beta", beta, lo=0.0, hi=1.0, hi_open=True)
  return sgd(lr, momentum=beta, dampening=beta, weight_decay=weight_decay, mask=mask)


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """torch.optim.Adagrad (defaults included): coupled decay, then ``scale_by_adagrad``."""
  _check_lr("adagrad", lr)
  _check_wd("adagrad", weight_decay)
  return optax.chain(
      *_decay(weight_decay, mask),
      transforms.scale_by_adagrad(initial_accumulator_value, eps, lr_decay),
      optax.scale_by_learning_rate(lr))


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """torch.optim.RMSprop (defaults included): coupled decay, then ``scale_by_rmsprop``."""
  _check_lr("rmsprop", lr)
  _check_wd("rmsprop", weight_decay)
  return optax.chain(
      *_decay(weight_decay, mask),
      transforms.scale_by_rmsprop(alpha, eps, centered, momentum),
      optax.scale_by_learning_rate(lr))


def _adam_chain(owner: str, lr, b1, b2, eps, weight_decay, mask, *, coupled: bool, amsgrad,
                mu_dtype, nu_dtype, fused: bool = True) -> optax.GradientTransformation:
  """Adam's direction with decay before it (coupled L2) or after it (decoupled), then lr.

  ``fused=True``: the same chain as one transformation, one pass per leaf (``fused.py``).
  """
  _check_lr(owner, lr)
  _check_wd(owner, weight_decay)
  if fused:
    return _fused.fused_adam(lr, b1, b2, eps, weight_decay, mask, coupled=coupled,
                             amsgrad=amsgrad, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  decay = _decay(weight_decay, mask)
  direction = transforms.scale_by_adam(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype,
                                       nu_dtype=nu_dtype)
  parts = [*decay, direction] if coupled else [direction, *decay]
  return optax.chain(*parts, optax.scale_by_learning_rate(lr))


def adam(
    lr: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    amsgrad: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    fused: bool = True,
) -> optax.GradientTransformation:
  """torch.optim.Adam without weight decay (see ``adam_l2`` and ``adamw``)."""
  return _adam_chain("adam", lr, b1, b2, eps, 0.0, None, coupled=True, amsgrad=amsgrad,
                     mu_dtype=mu_dtype, nu_dtype=nu_dtype, fused=fused)


def adam_l2(
    lr: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.01,
    mask: MaskOrFn = None,
    *,
    amsgrad: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    fused: bool = True,
) -> optax.GradientTransformation:
  r"""Adam with *coupled* L2 decay, ``torch.optim.Adam(weight_decay=...)``.

  :math:`g \leftarrow g + wd\cdot p` enters the moments, so the decay is divided by
  :math:`\sqrt{v}` and large-gradient weights are barely decayed: the reason for AdamW
  (Loshchilov & Hutter, 2019). Here for comparison.
  """
  return _adam_chain("adam_l2", lr, b1, b2, eps, weight_decay, mask, coupled=True,
                     amsgrad=amsgrad, mu_dtype=mu_dtype, nu_dtype=nu_dtype, fused=fused)


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.01,
    mask: MaskOrFn = None,
    *,
    amsgrad: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    fused: bool = True,
) -> optax.GradientTransformation:
  r"""AdamW (Loshchilov & Hutter, 2019) with torch.optim.AdamW's defaults and arithmetic.

  .. math::
    p \leftarrow p - lr_t\left(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + wd\cdot p\right)

  Note PyTorch's default ``weight_decay=0.01`` (optax.adamw uses 1e-4). Pass
  ``mask=weight_decay_mask`` to leave biases and norm scales undecayed.

  ``fused=True`` (default) returns one transformation that computes decay, moments and lr
  scaling in one pass per leaf, bitwise equal to (and with the state of) the reference
  ``optax.chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`` that
  ``fused=False`` returns. For the fastest CPU step use ``jaxopt_llm.optim.update_and_apply``
  (see ``jaxopt_llm/optim/fused.py``).
  """
  return _adam_chain("adamw", lr, b1, b2, eps, weight_decay, mask, coupled=False,
                     amsgrad=amsgrad, mu_dtype=mu_dtype, nu_dtype=nu_dtype, fused=fused)


def lion(
    lr: ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    mu_dtype: Optional[Any] = None,
    fused: bool = True,
) -> optax.GradientTransformation:
  r"""Lion (Chen et al., 2023) with the official defaults and update order.

  .. math::
    p \leftarrow p - lr_t\left(\operatorname{sign}(b_1 m + (1-b_1) g) + wd\cdot p\right),
    \qquad m \leftarrow b_2 m + (1-b_2) g

  The sign makes every coordinate move by exactly ``lr``: use a learning rate 3-10x smaller
  and a weight decay 3-10x larger than for AdamW (the paper's advice).

  ``fused=True`` (default): one pass per leaf, bitwise equal to (and with the state of) the
  reference chain that ``fused=False`` returns.
  """
  _check_lr("lion", lr)
  _check_wd("lion", weight_decay)
  if fused:
    return _fused.fused_lion(lr, b1, b2, weight_decay, mask, mu_dtype=mu_dtype)
  return optax.chain(
      transforms.scale_by_lion(b1, b2, mu_dtype=mu_dtype),
      *_decay(weight_decay, mask),
      optax.scale_by_learning_rate(lr))


def sophia(
    lr: ScalarOrSchedule = 1e-4,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    weight_decay: ScalarOrSchedule = 0.1,
    eps: float = 1e-15,
    mask: MaskOrFn = None,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    fused: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Sophia (Liu et al., 2023) with the official ``SophiaG`` defaults and update rule.

  .. math::
    p \leftarrow p(1 - lr_t\,wd);\quad m \leftarrow b_1 m + (1-b_1) g;\quad
    p \leftarrow p - lr_t \operatorname{sign}(m)\min\!\left(\frac{|m|}{\rho\,h + \epsilon},
    1\right)

  Pass a Hessian-diagonal estimate as an extra argument, ``tx.update(grads, state, params,
  hessian=H)``, every ``k`` steps (the official recipe: k=10, Gauss-Newton-Bartlett); it is
  folded into ``h = b2*h + (1-b2)*H`` *after* the step. ``jaxopt_llm.optim.hessian`` has the
  estimators and ``update_every_k``, which runs the estimator only every k steps inside one
  jitted step. Until the first estimate ``h = 0`` and Sophia is sign momentum (every
  coordinate moves by ``lr``). The estimate carries the token batch size (GNB returns
  ``B * g**2``), where the official code multiplies ``rho * bs * h``; negative curvature is
  treated as zero. See ``scale_by_sophia`` for these details.

  The sign-like step moves each coordinate by at most ``lr``: like Lion, Sophia wants a
  smaller lr than AdamW. Monitor ``sophia_win_rate(state)`` (fraction of coordinates not
  clipped; the paper keeps it around 0.1-0.5 by tuning ``rho``) and
  ``sophia_hessian_norm(state)``.
  """
  _check_lr("sophia", lr)
  _check_wd("sophia", weight_decay)
  if fused:  # one pass per leaf, bitwise equal to the chain below (fused.py)
    return _fused.fused_sophia(lr, b1, b2, rho, weight_decay, eps, mask, mu_dtype=mu_dtype,
                               nu_dtype=nu_dtype)
  return optax.chain(
      transforms.scale_by_sophia(b1, b2, rho, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
      *_decay(weight_decay, mask),
      optax.scale_by_learning_rate(lr))
