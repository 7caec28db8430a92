"""The jit engine: a train step compiled once for a ``ShardingPlan``, XLA adds the collectives.

``make_train_step(loss_fn, optimizer, plan)`` is generic over a ``loss_fn(params, batch) ->
loss`` and any ``optax.GradientTransformation`` (ours, optax's, and compositions such as
``optax.chain``, ``optax.MultiSteps`` and ``optax.inject_hyperparams``). The batch is the
global batch (``shard_batch``), so the step's body is the single-device one and the result
equals it up to rounding; ``shard_step`` runs any existing step function that way.

**Averaging beyond the gradient.** Under jit with a sharded global batch the computation is
already global: Sophia's Hessian estimators (``jaxopt_llm.optim.hessian``) need no
``axis_name`` (and with ``jax_threefry_partitionable``, the default, the sampled labels are
the same as on one device), and a token mean over *valid* tokens is the global one.

**Equal up to rounding.** A sharded step sums the gradient in another order than one device
(differences ~1e-7 relative). Optimizers that normalise per coordinate amplify that where a
gradient is near zero: Adam's ``m / sqrt(v)`` and, most of all, the ``sign`` in Lion and
Sophia, which moves a parameter whose true gradient is 0 by ``+-lr`` on rounding noise alone.
(A transformer's attention *key bias* is such a parameter: softmax ignores a shift shared by
all keys, so its gradient is exactly 0 in theory and noise in practice; it never changes the
model's output.) Compare sharded and single-device runs on losses, or on params whose
gradients are not near zero.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import optax

from jaxopt_llm.parallel._common import LossFn, UpdateFn, gradient_step
from jaxopt_llm.parallel.sharding import ShardingPlan

__all__ = ["shard_step", "make_train_step"]


def shard_step(step_fn: Callable, plan: ShardingPlan, *, donate: bool = True,
               compiler_options: Optional[dict] = None) -> Callable:
  """``jit`` of any ``step_fn(params, opt_state, batch, *rest) -> (params, opt_state, aux)``.

  ``params`` and ``opt_state`` enter and leave in ``plan``'s layout (donated, so the old
  buffers are reused, unless ``donate=False``), ``batch`` split over the data axis, ``rest``
  (a PRNG key, a step number, ...) and ``aux`` (loss, metrics) replicated. The way to run an
  existing train step on many devices: its body is unchanged, the batch is global, and XLA
  inserts the collectives (gradient all-reduce or reduce-scatter, param all-gather).
  ``compiler_options`` go to ``jax.jit`` (e.g. ``{"xla_backend_optimization_level": 0}``
  trades step speed for compile time in tests).
  """
  cache: dict[int, Callable] = {}

  def get(n_rest: int) -> Callable:
    if n_rest not in cache:
      cache[n_rest] = jax.jit(
          step_fn,
          in_shardings=(plan.params, plan.opt_state, plan.batch) + (plan.replicated,) * n_rest,
          out_shardings=(plan.params, plan.opt_state, plan.replicated),
          donate_argnums=(0, 1) if donate else (),
          compiler_options=compiler_options)
    return cache[n_rest]

  def stepped(params, opt_state, batch, *rest):
    return get(len(rest))(params, opt_state, batch, *rest)

  stepped.lower = lambda params, opt_state, batch, *rest: get(len(rest)).lower(
      params, opt_state, batch, *rest)
  return stepped


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    plan: ShardingPlan, *, has_aux: bool = False, donate: bool = True,
                    update_fn: Optional[UpdateFn] = None,
                    compiler_options: Optional[dict] = None) -> Callable:
  """A jitted ``step(params, opt_state, batch, *rest) -> (params, opt_state, loss)``.

  One step of ``params <- params + optimizer.update(grad loss_fn(params, batch))`` on the
  global ``batch`` (from ``shard_batch``), laid out by ``plan`` (see ``shard_step``).
  With ``has_aux`` the loss function returns ``(loss, aux)`` and the step returns it so.

  ``update_fn(grads, opt_state, params, batch, *rest) -> (updates, opt_state)`` replaces the
  plain ``optimizer.update(grads, opt_state, params)`` when the update needs more: Sophia's
  ``hessian.update_every_k`` with an estimator over ``batch``, extra arguments of an
  ``optax.GradientTransformationExtraArgs``. ``rest`` (e.g. a PRNG key and the step number)
  is passed through from the step's call.
  """

  def make_global(out, grads):
    # In ZeRO-1 this pins the gradient to the state's layout: XLA reduce-scatters it instead
    # of all-reducing, and the optimizer arithmetic runs on 1/n of each leaf per device.
    return out, jax.lax.with_sharding_constraint(grads, plan.grads)

  step = gradient_step(loss_fn, optimizer, has_aux=has_aux, update_fn=update_fn,
                       make_global=make_global)
  return shard_step(step, plan, donate=donate, compiler_options=compiler_options)
