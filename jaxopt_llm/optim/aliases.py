"""Named optimizers: short ``optax.chain``s of building blocks with PyTorch / official defaults.

``jaxopt_llm.optim.adamw(1e-3)`` and ``torch.optim.AdamW(params, lr=1e-3)`` agree step for
step (fp32, verified for 200 steps in ``tests/parity/test_optimizers.py``).

Naming follows optax: the learning rate is the first argument, keyword ``learning_rate``
(so ``optax.inject_hyperparams(optim.adamw)(learning_rate=...)`` and everything that reads
``hyperparams["learning_rate"]`` work). A positional argument means what optax's argument
in that position means (``adam(learning_rate, b1, b2, eps)``); every argument optax orders
differently or lacks is keyword-only (``adamw``'s ``weight_decay``: optax's fifth
positional argument is ``eps_root``; ``adagrad``'s: optax's second is
``initial_accumulator_value``). Defaults are PyTorch's (e.g. ``adamw``'s weight decay 0.01,
optax's 1e-4) and eps sits where PyTorch puts it.

Every ``learning_rate`` and ``weight_decay`` accepts a float or an optax schedule
``step -> value``; so do ``b1`` of the Adam family (``adam``, ``adam_l2``, ``adamw`` and
``adam_variants``' ``nadam``, ``radam``, ``adamax``) and ``momentum`` of ``sgd`` /
``rmsprop`` (``beta`` of ``momentum``), which torch's OneCycleLR and CyclicLR
(cycle_momentum=True) rewrite before every step: the step uses the value at the number of
updates already applied, in every formula that reads it (values checked to lie in [0, 1)). A schedule given as a Python callable is checked when the optimizer is
built: it is evaluated at steps 0, 1, 2, 3, 5, 10, 20, 50, ..., 10**6, 10**7 and around its
``milestones`` (``jaxopt_llm.schedules`` records the end of each warmup and decay there),
and a NaN, infinite or negative value raises a ValueError naming the argument and the step
(``jaxopt_llm._validation.check_schedule``). A schedule that cannot be evaluated eagerly
(rare: it raises on a Python int and on an int32 scalar) is left unchecked, and whatever
it raises surfaces at the first ``update``. Decoupled weight decay (AdamW, Lion, Sophia) is multiplied by the current
learning rate, as in PyTorch: ``p <- p - lr_t * (u_t + wd * p)``. Coupled (L2) decay (SGD,
Adagrad, RMSprop, ``adam_l2``) is added to the gradient before the statistics:
``g <- g + wd * p``.

``mask`` selects which parameters are decayed: a pytree of bools like the params, or a
callable ``params -> such a pytree`` (see ``weight_decay_mask``). With
``optax.inject_hyperparams``, pass ``static_args="mask"`` for a callable mask (optax treats
callables as schedules otherwise).

``fused=True`` (the default of ``adamw``, ``adam``, ``adam_l2``, ``lion``, ``sophia``)
registers the copy-free one-pass step of ``fused.py`` for ``optim.update_and_apply``; the
returned transformation is the same chain either way.

Rules every optimizer here follows (the torch twins added later too, by building on
``named_chain`` and the ``scale_by_*`` blocks): every hyperparameter is checked when the optimizer
is built, with a TypeError or ValueError naming it (a string, a bool where a number belongs,
a callable where no schedule is allowed, a non-float ``*_dtype``, a non-bool flag, a mask
that is not bools); integer and bool parameter leaves are never changed (no state, an exact
0 update: see ``jaxopt_llm.optim.numerics``); ``update`` without ``params`` raises the
"requires params" ValueError wherever params are needed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import optax

from jaxopt_llm._validation import check_bool, check_choice, check_scalar, check_schedule
from jaxopt_llm.optim import fused as fused_steps
from jaxopt_llm.optim import transforms
from jaxopt_llm.optim.numerics import check_real_leaves, is_static_zero

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def weight_decay_mask(params: optax.Params) -> Any:
  """The usual LLM rule: decay matrices (kernels, embeddings), not biases or norm scales.

  Returns a pytree of bools with ``params``' structure: True where ``ndim >= 2``.
  Use as ``adamw(learning_rate, mask=weight_decay_mask)``.
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _check_mask_tree(owner: str, tree: Any, what: str) -> None:
  for leaf in jax.tree.leaves(tree):
    dtype = getattr(leaf, "dtype", None)
    if not (isinstance(leaf, bool) or (dtype is not None and dtype == bool)):
      raise TypeError(f"{owner}: `mask` must be None, a callable params -> pytree of bools, or "
                      f"a pytree of bools; {what} a leaf {type(leaf).__name__} {leaf!r}")


def _check_mask(owner: str, mask: MaskOrFn) -> MaskOrFn:
  """None, a pytree (prefix) of bools, or a callable ``params -> such a pytree``, which is
  returned wrapped so that what it returns is checked when the optimizer calls it (a
  callable returning, say, a float would otherwise decay every leaf, silently)."""
  if mask is None:
    return None
  if not callable(mask):
    _check_mask_tree(owner, mask, "got")
    return mask

  def checked(tree):
    out = mask(tree)
    _check_mask_tree(owner, out, f"the callable returned {out!r}, with")
    return out

  return checked


def _check_state(owner: str, n_links: int, update: Callable) -> Callable:
  """``update`` of a chain of ``n_links`` links, refusing a state that is not such a chain's
  (None, another optimizer's state) with a TypeError naming ``state``."""

  def checked(updates, state, params=None, **extra_args):
    if not isinstance(state, tuple) or hasattr(state, "_fields") or len(state) != n_links:
      raise TypeError(f"{owner}: `state` must be the state this optimizer's init(params) "
                      f"returned (a tuple of {n_links} link states), got "
                      f"{type(state).__name__}")
    return update(updates, state, params, **extra_args)

  return checked


def named_chain(owner: str, direction: Optional[optax.GradientTransformation],
           learning_rate: ScalarOrSchedule, weight_decay: ScalarOrSchedule, mask: MaskOrFn, *,
           decay_first: bool, whole_step: Optional[Callable] = None
           ) -> optax.GradientTransformation:
  """``chain(decay, direction, lr)`` (coupled: ``decay_first``) or ``chain(direction, decay,
  lr)``; the decay link is left out when ``weight_decay`` is a literal 0 (a pass saved).
  Every named optimizer is built by it (those of ``adam_variants.py`` too).

  ``whole_step(layout, mask)`` builds the one-pass step registered for ``update_and_apply``
  (``mask`` as checked here). The returned transformation's ``update`` refuses a state that
  is not this chain's with a TypeError naming ``state``.
  Checks the learning rate and weight decay (numbers or schedules, ``check_schedule``) and the
  mask. The decay and lr links are ``transforms.add_decayed_weights`` and
  ``transforms.scale_by_learning_rate``: optax's, with an exact 0 update for non-float
  parameters.
  """
  check_schedule(owner, "learning_rate", learning_rate, lo=0.0)
  check_schedule(owner, "weight_decay", weight_decay, lo=0.0)
  mask = _check_mask(owner, mask)
  has_decay = not is_static_zero(weight_decay)
  decay = [transforms.add_decayed_weights(weight_decay, mask)] if has_decay else []
  head = [] if direction is None else [direction]
  parts = [*decay, *head] if decay_first else [*head, *decay]
  chain = optax.chain(*parts, transforms.scale_by_learning_rate(learning_rate))

  def init(params):
    check_real_leaves(params)
    return chain.init(params)

  tx = optax.GradientTransformationExtraArgs(
      init, _check_state(owner, len(parts) + 1, chain.update))
  if whole_step is None:
    return tx
  layout = fused_steps.ChainLayout(
      direction=parts.index(direction),
      decay=parts.index(decay[0]) if has_decay else None,
      learning_rate=len(parts))
  return fused_steps.register_whole_step(tx, whole_step(layout, mask))


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: ScalarOrSchedule = 0.0,
    *,
    dampening: ScalarOrSchedule = 0.0,
    nesterov: bool = False,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    buffer_init: str = "grad",
) -> optax.GradientTransformation:
  r"""torch.optim.SGD: :math:`p \leftarrow p - lr\cdot u` with ``scale_by_momentum``'s buffer.

  ``momentum=0`` (the default) is plain SGD and keeps no state. Weight decay is coupled (L2).
  ``learning_rate`` and ``momentum`` are positional as in ``optax.sgd`` (whose buffer starts
  at zero; torch's, here, at the first gradient); the rest is keyword-only (optax's third
  positional argument is ``nesterov``). ``buffer_init``: see ``scale_by_momentum`` (it only
  matters with ``dampening > 0``). ``momentum`` may be a schedule ``n -> value`` (n = updates
  already applied), as torch's CyclicLR / OneCycleLR cycle it; a schedule always keeps the
  buffer.
  """
  owner = "sgd"
  transforms.check_decay(owner, "momentum", momentum)
  if callable(dampening):  # ``momentum(beta=schedule)`` passes its beta as the dampening
    check_schedule(owner, "dampening", dampening, lo=0.0, hi=1.0)
  else:
    check_scalar(owner, "dampening", dampening, lo=0.0, hi=1.0)
  check_bool(owner, "nesterov", nesterov)
  check_choice(owner, "buffer_init", buffer_init, ("grad", "zero"))
  direction = None
  if not is_static_zero(momentum) or nesterov:
    direction = transforms.scale_by_momentum(momentum, dampening=dampening, nesterov=nesterov,
                                             buffer_init=buffer_init)
  return named_chain(owner, direction, learning_rate, weight_decay, mask, decay_first=True)


def momentum(
    learning_rate: ScalarOrSchedule,
    beta: ScalarOrSchedule = 0.9,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    buffer_init: str = "grad",
) -> optax.GradientTransformation:
  r"""Momentum in EMA form, :math:`p \leftarrow p - lr\,v_t`, with the buffer :math:`v_t`:

  * ``buffer_init="grad"`` (default, PyTorch's ``SGD(momentum=beta, dampening=beta)``):

    .. math::
      v_1 = g_1,\qquad v_t = \beta v_{t-1} + (1-\beta) g_t \quad (t > 1)

    so the first step is plain SGD, :math:`-lr\,g_1`.
  * ``buffer_init="zero"`` (the form most course notes write):

    .. math::
      v_0 = 0,\qquad v_t = \beta v_{t-1} + (1-\beta) g_t \quad (t \ge 1)

    so the first step is :math:`-lr(1-\beta) g_1`, ``1 / (1 - beta)`` times smaller (10x for
    beta = 0.9), and :math:`v_t` is biased towards 0 for the first ~``1 / (1 - beta)`` steps
    (no bias correction, unlike Adam's first moment).

  Unlike the heavy-ball form (``sgd(momentum=...)``) the step size does not grow by
  ``1 / (1 - beta)``. (optax has no ``momentum`` alias; ``optax.sgd(lr, momentum=beta)`` is
  the heavy-ball form with a zero buffer.)

  ``beta`` may be a schedule ``n -> value`` (n = updates already applied); the step then
  uses the current value as both torch's ``momentum`` and ``dampening``.
  """
  owner = "momentum"
  transforms.check_decay(owner, "beta", beta)
  check_choice(owner, "buffer_init", buffer_init, ("grad", "zero"))
  check_schedule(owner, "learning_rate", learning_rate, lo=0.0)
  check_schedule(owner, "weight_decay", weight_decay, lo=0.0)
  _check_mask(owner, mask)  # (sgd wraps a callable mask)
  return sgd(learning_rate, beta, dampening=beta, weight_decay=weight_decay, mask=mask,
             buffer_init=buffer_init)


def adagrad(
    learning_rate: ScalarOrSchedule = 1e-2,
    *,
    lr_decay: float = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """torch.optim.Adagrad (defaults included): coupled decay, then ``scale_by_adagrad``.

  Keyword-only after ``learning_rate``: ``optax.adagrad(learning_rate,
  initial_accumulator_value=0.1, eps=1e-7)`` orders (and places eps) differently.
  """
  direction = transforms.scale_by_adagrad(initial_accumulator_value, eps, lr_decay=lr_decay)
  return named_chain("adagrad", direction, learning_rate, weight_decay, mask, decay_first=True)


def rmsprop(
    learning_rate: ScalarOrSchedule = 1e-2,
    *,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    momentum: ScalarOrSchedule = 0.0,
    centered: bool = False,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """torch.optim.RMSprop (defaults included): coupled decay, then ``scale_by_rmsprop``.

  Keyword-only after ``learning_rate``: ``optax.rmsprop(learning_rate, decay, eps,
  initial_scale, ...)`` orders differently (and puts eps inside the root by default).
  ``momentum`` may be a schedule ``n -> value`` (n = updates already applied), as torch's
  CyclicLR / OneCycleLR cycle it.
  """
  check_bool("rmsprop", "centered", centered)
  direction = transforms.scale_by_rmsprop(alpha, eps, centered=centered, momentum=momentum)
  return named_chain("rmsprop", direction, learning_rate, weight_decay, mask, decay_first=True)


def _adam_family(owner: str, *, learning_rate, b1, b2, eps, weight_decay, mask, coupled: bool,
                 amsgrad: bool, mu_dtype: Optional[Any], nu_dtype: Optional[Any], fused: bool
                 ) -> optax.GradientTransformation:
  """Adam's direction with decay before it (coupled L2) or after it (decoupled), then lr.

  ``adam``, ``adam_l2`` and ``adamw`` pass their own arguments on as ``**locals()`` (their
  first statement): an argument added to one of them and not here fails loudly.
  """
  check_bool(owner, "fused", fused)
  check_bool(owner, "amsgrad", amsgrad)
  direction = transforms.scale_by_adam(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype,
                                       nu_dtype=nu_dtype)
  whole_step = (lambda layout, mask: fused_steps.adam_step(
      layout, learning_rate, weight_decay, mask, coupled=coupled, b1=b1, b2=b2, eps=eps,
      amsgrad=amsgrad, mu_dtype=mu_dtype, nu_dtype=nu_dtype)) if fused else None
  return named_chain(owner, direction, learning_rate, weight_decay, mask, decay_first=coupled,
                whole_step=whole_step)


def adam(learning_rate: ScalarOrSchedule = 1e-3, b1: ScalarOrSchedule = 0.9, b2: float = 0.999,
         eps: float = 1e-8, *, amsgrad: bool = False, mu_dtype: Optional[Any] = None,
         nu_dtype: Optional[Any] = None, fused: bool = True) -> optax.GradientTransformation:
  """torch.optim.Adam without weight decay (see ``adam_l2`` and ``adamw``).

  Positional arguments as ``optax.adam``'s (its fifth, ``eps_root``, has no equivalent here);
  the keywords as for ``adamw``.
  """
  return _adam_family("adam", weight_decay=0.0, mask=None, coupled=True, **locals())


def adam_l2(learning_rate: ScalarOrSchedule = 1e-3, b1: ScalarOrSchedule = 0.9,
            b2: float = 0.999,
            eps: float = 1e-8, *, weight_decay: ScalarOrSchedule = 0.01, mask: MaskOrFn = None,
            amsgrad: bool = False, mu_dtype: Optional[Any] = None,
            nu_dtype: Optional[Any] = None, fused: bool = True) -> optax.GradientTransformation:
  r"""Adam with *coupled* L2 decay, ``torch.optim.Adam(weight_decay=...)``.

  :math:`g \leftarrow g + wd\cdot p` enters the moments, so the decay is divided by
  :math:`\sqrt{v}` and large-gradient weights are barely decayed: the reason for AdamW
  (Loshchilov & Hutter, 2019). Here for comparison. The keywords as for ``adamw``.
  """
  return _adam_family("adam_l2", coupled=True, **locals())


def adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    b1: ScalarOrSchedule = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: ScalarOrSchedule = 0.01,
    mask: MaskOrFn = None,
    amsgrad: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    fused: bool = True,
) -> optax.GradientTransformation:
  r"""AdamW (Loshchilov & Hutter, 2019) with torch.optim.AdamW's defaults and arithmetic.

  .. math::
    p \leftarrow p - lr_t\left(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + wd\cdot p\right)

  Note PyTorch's default ``weight_decay=0.01`` (optax.adamw uses 1e-4), keyword-only here
  (optax.adamw's fifth positional argument is ``eps_root``). Pass
  ``mask=weight_decay_mask`` to leave biases and norm scales undecayed.

  Returns ``optax.chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``; with
  ``fused=True`` (default) ``jaxopt_llm.optim.update_and_apply`` runs it as one ordered pass
  per leaf, bitwise equal (see ``jaxopt_llm/optim/fused.py``).

  ``b1`` (in ``adam``, ``adam_l2``, ``adamw``) may be a schedule ``n -> b1_n`` (n = updates
  already applied), as torch's OneCycleLR / CyclicLR(cycle_momentum=True) rewrite
  ``betas[0]``; the bias correction uses the current value, :math:`1 - b_{1,t}^t`, as torch
  does. The fused whole step evaluates it the same way.
  """
  return _adam_family("adamw", coupled=False, **locals())


def lion(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    mu_dtype: Optional[Any] = None,
    fused: bool = True,
) -> optax.GradientTransformation:
  r"""Lion (Chen et al., 2023) with the official defaults and update order.

  .. math::
    p \leftarrow p - lr_t\left(\operatorname{sign}(b_1 m + (1-b_1) g) + wd\cdot p\right),
    \qquad m \leftarrow b_2 m + (1-b_2) g

  The sign makes every coordinate move by exactly ``lr``: use a learning rate 3-10x smaller
  and a weight decay 3-10x larger than for AdamW (the paper's advice). The official default
  decay is 0 (optax.lion's 1e-3); keyword-only, as optax.lion's fourth positional argument
  is ``mu_dtype``. ``fused=True``: ``update_and_apply`` runs one ordered pass per leaf.
  """
  check_bool("lion", "fused", fused)
  direction = transforms.scale_by_lion(b1, b2, mu_dtype=mu_dtype)
  whole_step = (lambda layout, mask: fused_steps.lion_step(
      layout, learning_rate, weight_decay, mask, b1=b1, b2=b2, mu_dtype=mu_dtype)
  ) if fused else None
  return named_chain("lion", direction, learning_rate, weight_decay, mask, decay_first=False,
                whole_step=whole_step)


def sophia(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: float = 0.965,
    b2: float = 0.99,
    *,
    rho: float = 0.04,
    weight_decay: ScalarOrSchedule = 0.1,
    eps: float = 1e-15,
    mask: MaskOrFn = None,
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
  treated as zero. See ``scale_by_sophia`` for these details. Arguments after ``b2`` are
  keyword-only (``optax.contrib.sophia``'s fourth positional argument is its eps).

  The sign-like step moves each coordinate by at most ``lr``: like Lion, Sophia wants a
  smaller lr than AdamW. Monitor ``sophia_win_rate(state)`` (fraction of coordinates not
  clipped; the paper keeps it around 0.1-0.5 by tuning ``rho``) and
  ``sophia_hessian_norm(state)``.
  """
  check_bool("sophia", "fused", fused)
  direction = transforms.scale_by_sophia(b1, b2, rho=rho, eps=eps, mu_dtype=mu_dtype,
                                         nu_dtype=nu_dtype)
  whole_step = (lambda layout, mask: fused_steps.sophia_step(
      layout, learning_rate, weight_decay, mask, b1=b1, b2=b2, rho=rho, eps=eps,
      mu_dtype=mu_dtype)) if fused else None
  return named_chain("sophia", direction, learning_rate, weight_decay, mask, decay_first=False,
                whole_step=whole_step)
