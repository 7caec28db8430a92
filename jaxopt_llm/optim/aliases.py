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
                mu_dtype, nu_dtype) -> optax.GradientTransformation:
  """Adam's direction with decay before it (coupled L2) or after it (decoupled), then lr."""
  _check_lr(owner, lr)
  _check_wd(owner, weight_decay)
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
) -> optax.GradientTransformation:
  """torch.optim.Adam without weight decay (see ``adam_l2`` and ``adamw``)."""
  return _adam_chain("adam", lr, b1, b2, eps, 0.0, None, coupled=True, amsgrad=amsgrad,
                     mu_dtype=mu_dtype, nu_dtype=nu_dtype)


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
) -> optax.GradientTransformation:
  r"""Adam with *coupled* L2 decay, ``torch.optim.Adam(weight_decay=...)``.

  :math:`g \leftarrow g + wd\cdot p` enters the moments, so the decay is divided by
  :math:`\sqrt{v}` and large-gradient weights are barely decayed: the reason for AdamW
  (Loshchilov & Hutter, 2019). Here for comparison.
  """
  return _adam_chain("adam_l2", lr, b1, b2, eps, weight_decay, mask, coupled=True,
                     amsgrad=amsgrad, mu_dtype=mu_dtype, nu_dtype=nu_dtype)


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
) -> optax.GradientTransformation:
  r"""AdamW (Loshchilov & Hutter, 2019) with torch.optim.AdamW's defaults and arithmetic.

  .. math::
    p \leftarrow p - lr_t\left(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + wd\cdot p\right)

  Note PyTorch's default ``weight_decay=0.01`` (optax.adamw uses 1e-4). Pass
  ``mask=weight_decay_mask`` to leave biases and norm scales undecayed.
  """
  return _adam_chain("adamw", lr, b1, b2, eps, weight_decay, mask, coupled=False,
                     amsgrad=amsgrad, mu_dtype=mu_dtype, nu_dtype=nu_dtype)


def lion(
    lr: ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Lion (Chen et al., 2023) with the official defaults and update order.

  .. math::
    p \leftarrow p - lr_t\left(\operatorname{sign}(b_1 m + (1-b_1) g) + wd\cdot p\right),
    \qquad m \leftarrow b_2 m + (1-b_2) g

  The sign makes every coordinate move by exactly ``lr``: use a learning rate 3-10x smaller
  and a weight decay 3-10x larger than for AdamW (the paper's advice).
  """
  _check_lr("lion", lr)
  _check_wd("lion", weight_decay)
  return optax.chain(
      transforms.scale_by_lion(b1, b2, mu_dtype=mu_dtype),
      *_decay(weight_decay, mask),
      optax.scale_by_learning_rate(lr))
