"""What to watch while training: gradient and optimizer-state norms, lr, Sophia's win rate.

All functions are pure and jit-able; the trainer calls ``monitor`` in one jitted function
(``prog.monitor``) only on logging steps, so the other steps pay nothing for it. Cost on the
default 'nano' config (``benchmarks/train_step.py``'s machine): ``prog.monitor`` 0.23 ms per
call, ``global_norm`` of the gradient 0.1 ms, against a 20-50 ms step. Every norm is one
float32 sum of squares per leaf, added up (``sum_of_squares``): no concatenation, so a leaf
sharded over devices is reduced where it lives and only scalars cross devices.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt_llm import optim


def sum_of_squares(leaves: list) -> jax.Array:
  r""":math:`\sum_i \sum_j x_{ij}^2` over ``leaves``, accumulated in float32 (0 when empty)."""
  total = jnp.zeros((), jnp.float32)
  for x in leaves:
    total = total + jnp.sum(jnp.square(jnp.asarray(x).astype(jnp.float32)))
  return total


def global_norm(tree: Any) -> jax.Array:
  r""":math:`\sqrt{\sum_i \|x_i\|_2^2}` over every leaf, in float32."""
  return jnp.sqrt(sum_of_squares(jax.tree.leaves(tree)))


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
  groups: dict[str, list] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    leaf = jnp.asarray(leaf)
    if leaf.ndim == 0 or not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    groups.setdefault(_field_name(path) or "state", []).append(leaf)
  return {k: jnp.sqrt(sum_of_squares(v)) for k, v in sorted(groups.items())}


def sophia_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Sophia's win rate, Hessian-EMA norm and refused-estimate count, when ``opt_state``
  holds a Sophia state (empty dict otherwise).

  The win rate is the fraction of coordinates whose step was *not* clipped to ``lr`` in the
  last update (the official implementation logs it the same way). ``sophia_hessian_rejected``
  counts the estimates with a NaN/inf that were refused (``h`` kept): nonzero deserves a look.
  """
  try:
    return {"sophia_win_rate": optim.sophia_win_rate(opt_state),
            "sophia_hessian_norm": optim.sophia_hessian_norm(opt_state),
            "sophia_hessian_rejected": optim.sophia_hessian_rejected(opt_state)}
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
