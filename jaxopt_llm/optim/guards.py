r"""Skip bad updates: non-finite values and loss spikes, as an optax wrapper.

``skip_spikes(inner)`` wraps any transformation in the style of ``optax.apply_if_finite``, but
also looks at the loss, which ``update`` takes as an extra argument::

  tx = guards.skip_spikes(optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(1e-3)))
  state = tx.init(params)
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, state, params, loss=loss)
  params = optax.apply_updates(params, updates)

The rule, with :math:`\mu, \sigma` the mean and (unbiased) standard deviation of the last
``window`` *accepted* losses:

* skip when ``loss`` or any gradient entry is non-finite (NaN / inf);
* skip when ``loss > mu + k * sigma`` (a spike), once ``min_history`` (at least 2) accepted
  losses have been seen, and unless ``max_consecutive_skips`` spikes were skipped in a row
  just before: then the loss level itself has moved, and the step is accepted.

A skipped step returns zero updates and leaves the inner state untouched (the inner
optimizer never sees the batch); an accepted one is ``inner.update(...)`` and its loss enters
the window. ``k = 0`` turns the spike test off (only non-finite steps are skipped). The
statistics live in the state (``SkipSpikesState``: a ring buffer and counters), so the wrapper
is jit-safe and checkpointed with the rest of the optimizer state. Extra arguments (Sophia's
``hessian=``) are forwarded to ``inner`` when it is an ``optax.GradientTransformationExtraArgs``
(optax's convention, as in ``optax.chain``; note that ``optax.MultiSteps`` is not one: wrap it
as ``GradientTransformationExtraArgs(ms.init, ms.update)``).

Reference: ``optax.apply_if_finite`` (non-finite skipping); spike skipping as in large-model
training reports (e.g. PaLM, Chowdhery et al. 2022, sec. 5.1: restart/skip around spikes).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_llm._validation import check_int, check_scalar
from jaxopt_llm.optim.numerics import all_finite

__all__ = ["SkipSpikesState", "skip_spikes", "spike_threshold", "all_finite"]


class SkipSpikesState(NamedTuple):
  inner_state: optax.OptState
  history: jax.Array            # float32 [window]: ring buffer of recent accepted losses
  count: jax.Array              # int32: accepted steps (losses written to the buffer)
  consecutive: jax.Array        # int32: spikes skipped in a row
  skipped_nonfinite: jax.Array  # int32 totals, for logging
  skipped_spike: jax.Array


def spike_threshold(state: SkipSpikesState, k: float, min_history: int) -> jax.Array:
  r""":math:`\mu + k\sigma` of the accepted losses in the window (unbiased :math:`\sigma`);
  ``+inf`` until ``max(min_history, 2)`` of them have been seen, and always when ``k == 0``."""
  window = state.history.shape[0]
  n = jnp.minimum(state.count, window)
  valid = jnp.arange(window) < n
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, state.history, 0.0)) / nf
  var = jnp.sum(jnp.where(valid, jnp.square(state.history - mean), 0.0)) / jnp.maximum(nf - 1, 1)
  armed = (n >= max(min_history, 2)) & (k > 0)
  return jnp.where(armed, mean + k * jnp.sqrt(var), jnp.inf)


def skip_spikes(inner: optax.GradientTransformation, *, k: float = 6.0, window: int = 64,
                min_history: int = 16, max_consecutive_skips: int = 25
                ) -> optax.GradientTransformationExtraArgs:
  """``inner``, skipped on non-finite steps and loss spikes (see the module docstring).

  Args:
    inner: the transformation to guard (any optax transformation).
    k: a loss above ``mean + k * std`` of the window is a spike; 0 disables the spike test.
    window: how many recent accepted losses the statistics use.
    min_history: accepted losses needed before the spike test is armed.
    max_consecutive_skips: after this many spikes skipped in a row, accept the next one.

  Returns:
    A transformation whose ``update(updates, state, params=None, *, loss, **extra)`` needs
    the step's scalar loss.
  """
  owner = "skip_spikes"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"{owner}: `inner` must be an optax GradientTransformation, got "
                    f"{type(inner).__name__} {inner!r}")
  check_scalar(owner, "k", k, lo=0.0)
  check_int(owner, "window", window, lo=1)
  check_int(owner, "min_history", min_history, lo=0)
  check_int(owner, "max_consecutive_skips", max_consecutive_skips, lo=0)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros((), jnp.int32)
    return SkipSpikesState(inner.init(params), jnp.zeros((window,), jnp.float32),
                           zero, zero, zero, zero)

  def update_fn(updates, state, params=None, *, loss=None, **extra_args):
    if loss is None:
      raise ValueError(f"{owner}: update needs the step's loss: tx.update(grads, state, "
                       "params, loss=loss)")
    if not hasattr(loss, "dtype") and not isinstance(loss, (int, float)) or isinstance(
        loss, bool):
      raise TypeError(f"{owner}: `loss` must be a real scalar, got {type(loss).__name__} "
                      f"{loss!r}")
    dtype = jnp.result_type(loss)
    if jnp.ndim(loss) != 0 or not (jnp.issubdtype(dtype, jnp.floating)
                                   or jnp.issubdtype(dtype, jnp.integer)):
      raise ValueError(f"{owner}: `loss` must be a real scalar, got shape {jnp.shape(loss)} "
                       f"dtype {dtype}")
    for leaf in jax.tree.leaves(updates):
      if not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float)):
        raise TypeError(f"{owner}: every `updates` leaf must be an array, got "
                        f"{type(leaf).__name__} {leaf!r}")
    finite = all_finite(loss) & all_finite(updates)
    # A finite float64 loss beyond the float32 range is kept finite in the float32 window.
    f32_max = float(jnp.finfo(jnp.float32).max)
    loss = jnp.asarray(jnp.clip(loss, -f32_max, f32_max), jnp.float32)
    spike = finite & (loss > spike_threshold(state, k, min_history)) & (
        state.consecutive < max_consecutive_skips)
    accept = finite & ~spike

    def apply(updates, inner_state):
      return inner.update(updates, inner_state, params, **extra_args)

    def skip(updates, inner_state):
      shapes = jax.eval_shape(apply, updates, inner_state)[0]
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner_state

    # Only the taken branch runs: a skipped step costs no optimizer arithmetic.
    new_updates, inner_state = jax.lax.cond(accept, apply, skip, updates, state.inner_state)
    slot = state.count % window
    history = jnp.where(accept, state.history.at[slot].set(loss), state.history)
    return new_updates, SkipSpikesState(
        inner_state=inner_state,
        history=history,
        count=state.count + accept.astype(jnp.int32),
        consecutive=jnp.where(spike, state.consecutive + 1, 0).astype(jnp.int32),
        skipped_nonfinite=state.skipped_nonfinite + (~finite).astype(jnp.int32),
        skipped_spike=state.skipped_spike + spike.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
