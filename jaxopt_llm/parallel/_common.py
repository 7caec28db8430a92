"""Helpers shared by the modules of ``jaxopt_llm.parallel`` (public names, internal module).

``leaf_shape`` reads the shape of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar;
``gradient_step`` is the body every train step here runs, once for the jit engine and once
for pmap, which differ only in how the gradient and the loss are made global.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

PyTree = Any
LossFn = Callable[..., Any]
UpdateFn = Callable[..., tuple[Any, Any]]


def leaf_shape(x: Any) -> tuple[int, ...]:
  """The shape of an array, a ``ShapeDtypeStruct`` or a Python/numpy scalar."""
  return tuple(getattr(x, "shape", np.shape(x)))


def gradient_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                  has_aux: bool, update_fn: Optional[UpdateFn],
                  make_global: Callable[[Any, PyTree], tuple[Any, PyTree]]) -> Callable:
  r"""``step(params, opt_state, batch, *rest) -> (params, opt_state, loss_or_(loss, aux))``.

  .. math::
    (\ell, g) = \text{make\_global}(\text{value\_and\_grad}(\text{loss\_fn})(p, b)),
    \qquad (u, s) = \text{update}(g, s, p),\qquad p \leftarrow p + u

  ``make_global(out, grads) -> (out, grads)`` is where the engines differ: a sharding
  constraint under jit (XLA then inserts the all-reduce or reduce-scatter), ``lax.pmean``
  under pmap. ``update`` is ``optimizer.update(g, s, p)``, or
  ``update_fn(g, s, p, batch, *rest)`` when given.
  """

  def step(params, opt_state, batch, *rest):
    out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
    out, grads = make_global(out, grads)
    if update_fn is None:
      updates, opt_state = optimizer.update(grads, opt_state, params)
    else:
      updates, opt_state = update_fn(grads, opt_state, params, batch, *rest)
    return optax.apply_updates(params, updates), opt_state, out

  return step
