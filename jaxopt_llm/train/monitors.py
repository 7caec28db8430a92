"""What to watch while training: gradient and optimizer-state norms, lr, Sophia's win rate.

All functions are pure and jit-able; the loop calls them in one jitted function only on
logging steps, so the other steps pay nothing for them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def global_norm(tree: Any) -> jax.Array:
  r""":math:`\sqrt{\sum_i \|x_i\|_2^2}` over every leaf, in float32."""
  leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _field_name(path) -> str | None:
  """The innermost NamedTuple field on a leaf's path ('mu', 'nu', 'hessian', ...)."""
  name = None
  for entry in path:
    if isinstance(entry, jax.tree_util.GetAttrKey):
      name = entry.name
  return name


def optimizer_state_norms(opt_state: Any) -> dict[str, jax.Array]:
  """L2 norm of each kind of optimizer-state buffer, keyed by its state field name.

  Walks any optax state (chains, ``MultiSteps``, ``masked``, ``inject_hyperparams``) and
  groups the floating, non-scalar leaves by the innermost NamedTuple field that holds them:
  AdamW gives ``{"mu": |m|, "nu": |v|}``, Lion ``{"mu": ...}``, Sophia ``{"mu", "hessian"}``,
  ``MultiSteps`` adds ``"acc_grads"``. Scalars (step counts, Sophia's win rate) are skipped.
  A field name that occurs in several sub-states is summed into one norm.
  """
  sums: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    leaf = jnp.asarray(leaf)
    if leaf.ndim == 0 or not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    name = _field_name(path) or "state"
    sq = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    sums[name] = sums.get(name, 0.0) + sq
  return {k: jnp.sqrt(v) for k, v in sorted(sums.items())}


def sophia_stats(opt_state: Any) -> dict[str, jax.Array]:
  """``{"sophia_win_rate", "sophia_hessian_norm"}`` when ``opt_state`` holds a Sophia state.

  The win rate is the fraction of coordinates whose step was *not* clipped to ``lr`` in the
  last update (the official implementation logs it the same way); empty dict otherwise.
  """
  try:
    from jaxopt_llm.optim import sophia_hessian_norm, sophia_win_rate
  except ImportError:  # Sophia not installed in this version of the library
    return {}
  try:
    return {"sophia_win_rate": sophia_win_rate(opt_state),
            "sophia_hessian_norm": sophia_hessian_norm(opt_state)}
  except ValueError:  # no Sophia state in this optimizer
    return {}


def monitor(params: Any, opt_state: Any) -> dict[str, jax.Array]:
  """Param norm, optimizer-state norms (``state_norm/<field>``) and Sophia's statistics."""
  out = {"param_norm": global_norm(params)}
  out.update({f"state_norm/{k}": v for k, v in optimizer_state_norms(opt_state).items()})
  out.update(sophia_stats(opt_state))
  return out


def schedule_value(schedule: optax.Schedule | float, step: jax.Array) -> jax.Array:
  """The learning rate at ``step`` for a schedule or a constant."""
  if callable(schedule):
    return jnp.asarray(schedule(step), jnp.float32)
  return jnp.asarray(schedule, jnp.float32)
