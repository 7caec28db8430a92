"""Shared helpers of the trainer-level preference losses (KTO, ORPO, CPO, BCO).

Validation of per-sequence log-probs and desirability labels, the safe (floored) means,
and TRL's reward/log-prob metrics, written once so the four losses cannot drift apart:

* paired losses (ORPO, CPO) log ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``:
  batch means, ties counted as wrong in the accuracy (TRL's ``chosen > rejected``);
* unpaired losses (KTO, BCO) log the same names except the accuracy, as means over the
  desirable (``labels == True``) and undesirable examples of the batch.

Every mean divides by ``max(count, 1)``: an empty batch (or one without desirable
examples) gives 0.0, never 0/0 = NaN. Metrics are under ``stop_gradient``.

Internal to ``jaxopt_llm.losses`` (the leading underscore of the module); the names are
public so the loss modules can share them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm._validation import is_concrete
from jaxopt_llm.losses._common import as_mask, check_floating


def as_logps(owner: str, name: str, x: Any, dtype: Any, *,
             shape: tuple[int, ...] | None = None, like: str = "") -> jax.Array:
  """``x`` as a ``dtype`` array; ValueError naming ``name`` unless floating (and ``shape``).

  ``like`` names the argument whose shape ``x`` must have, for the error message.
  """
  x = jnp.asarray(x)
  check_floating(owner, name, x, min_ndim=0)
  if shape is not None and x.shape != tuple(shape):
    raise ValueError(f"{owner}: `{name}` must have the shape of `{like}` {tuple(shape)}, "
                     f"got {x.shape}")
  return x.astype(dtype)


def as_scalar_loss(owner: str, name: str, x: Any, dtype: Any) -> jax.Array:
  """A precomputed scalar loss (e.g. the chosen NLL) as a 0-d ``dtype`` array."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{owner}: `{name}` must be a floating scalar, got dtype {x.dtype}")
  if x.ndim != 0:
    raise ValueError(f"{owner}: `{name}` must be a scalar (shape ()), got shape {x.shape}")
  return x.astype(dtype)


def as_labels(owner: str, labels: Any, shape: tuple[int, ...]) -> jax.Array:
  """Desirability labels (True = desirable/chosen) as a bool array of ``shape``.

  Booleans or integer 0/1 (a dataset's ``label`` column); concrete integers other than
  0/1 are a ValueError rather than silently read as True.
  """
  raw = jnp.asarray(labels)
  labels = as_mask(owner, raw, shape, name="labels", shape_text="the shape of `policy_logps`")
  if raw.dtype != jnp.bool_ and is_concrete(raw):
    values = np.unique(np.asarray(raw))
    if not np.all(np.isin(values, (0, 1))):
      raise ValueError(f"{owner}: integer `labels` must be 0 or 1, got values "
                       f"{values[:10].tolist()}")
  return labels


def safe_mean(x: jax.Array) -> jax.Array:
  """Mean over all elements; 0.0 (with zero gradient) for an empty array."""
  return jnp.sum(x) / max(x.size, 1)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``sum(x[mask]) / max(count(mask), 1)``; 0.0 where nothing is selected."""
  count = jnp.sum(mask, dtype=x.dtype)
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(count, 1.0)


def paired_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                   chosen_logps: jax.Array, rejected_logps: jax.Array
                   ) -> dict[str, jax.Array]:
  """TRL's ORPO/CPO metrics: batch means of the rewards, accuracy, margin and log-probs."""
  sg = jax.lax.stop_gradient
  chosen_rewards, rejected_rewards = sg(chosen_rewards), sg(rejected_rewards)
  return {
      "rewards/chosen": safe_mean(chosen_rewards),
      "rewards/rejected": safe_mean(rejected_rewards),
      "rewards/accuracies": safe_mean(
          (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)),
      "rewards/margins": safe_mean(chosen_rewards - rejected_rewards),
      "logps/chosen": safe_mean(sg(chosen_logps)),
      "logps/rejected": safe_mean(sg(rejected_logps)),
  }


def unpaired_metrics(rewards: jax.Array, logps: jax.Array, labels: jax.Array
                     ) -> dict[str, jax.Array]:
  """TRL's KTO/BCO metrics: means over the desirable and the undesirable examples.

  ``rewards/margins`` is ``rewards/chosen - rewards/rejected`` when the batch has both
  kinds, else 0.0 (TRL logs no margin then; it logs no ``rewards/chosen`` without a
  desirable example either, where this gives 0.0).
  """
  sg = jax.lax.stop_gradient
  rewards, logps = sg(rewards), sg(logps)
  chosen_r = masked_mean(rewards, labels)
  rejected_r = masked_mean(rewards, ~labels)
  both = jnp.any(labels) & jnp.any(~labels)
  return {
      "rewards/chosen": chosen_r,
      "rewards/rejected": rejected_r,
      "rewards/margins": jnp.where(both, chosen_r - rejected_r, 0.0),
      "logps/chosen": masked_mean(logps, labels),
      "logps/rejected": masked_mean(logps, ~labels),
  }
