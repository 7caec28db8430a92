"""KL divergence and entropy of categorical distributions given as logits.

Both are safe for ``-inf`` logits (a masked vocabulary): classes with probability 0
contribute exactly 0 and produce no NaN in the value or the gradient.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_choice
from jaxopt_llm.losses._common import (
    REDUCTIONS, as_mask, check_floating, compute_dtype, reduce_masked)


def _row_mask(owner: str, logits: jax.Array, where: Any | None) -> jax.Array:
  if where is None:
    return jnp.ones(logits.shape[:-1], jnp.bool_)
  return as_mask(owner, where, logits.shape[:-1])


def _masked_log_softmax(logits: jax.Array, rows: jax.Array, dtype: Any) -> jax.Array:
  # Masked-out rows are replaced by zeros first, so a fully -inf (or NaN) row that the
  # caller excluded cannot produce NaN through lse = -inf.
  logits = jnp.where(rows[..., None], logits.astype(dtype), 0.0)
  return jax.nn.log_softmax(logits, axis=-1)


def _p_times(log_p: jax.Array, value: jax.Array, support: jax.Array) -> jax.Array:
  """sum_c p_c * value_c over the support of p, with 0 * (-inf) treated as 0.

  Double ``where``: the outer one alone fixes the value but not the gradient, since
  the untaken branch is still differentiated and d(p * value)/dp = value = NaN there
  (-inf - -inf). Replacing ``value`` off the support first keeps that branch finite.
  """
  safe_value = jnp.where(support, value, 0.0)
  return jnp.sum(jnp.where(support, jnp.exp(log_p) * safe_value, 0.0), axis=-1)


def kl_divergence_from_logits(
    p_logits: jax.typing.ArrayLike,
    q_logits: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
  r"""KL(p || q) between ``p = softmax(p_logits)`` and ``q = softmax(q_logits)``.

  Per row (last axis = classes)::

    KL(p || q) = sum_c p_c * (log p_c - log q_c)

  with ``log p``, ``log q`` from ``jax.nn.log_softmax`` in float32 (float64 for float64
  logits). Classes with
  ``p_c == 0`` (``p_logits`` of ``-inf``, or underflow) contribute exactly 0 with zero
  gradient. Where ``p_c > 0`` but ``q_c == 0`` the divergence is ``+inf``, as it should
  be. Equal to ``torch.nn.functional.kl_div(log_q, log_p, log_target=True,
  reduction="none").sum(-1)`` and to ``optax.losses.kl_divergence_with_log_targets(
  log_q, log_p)``. Named apart from ``optax.losses.kl_divergence(log_predictions,
  targets)``, which takes log-probabilities and probabilities in the other order: here
  both arguments are logits and the *first* is the reference distribution ``p``.

  Args:
    p_logits: ``[..., V]`` logits of ``p`` (e.g. the teacher).
    q_logits: ``[..., V]`` logits of ``q`` (e.g. the student), same shape.
    where: optional boolean array of shape ``[...]``; False rows give 0 and are left
      out of the mean.
    reduction: ``"none"`` (shape ``[...]``, one value per row), ``"mean"`` over rows
      where ``where`` is True (0.0 if there are none), or ``"sum"``.

  Returns:
    ``[...]`` or a scalar, float32 (float64 for float64 logits).
  """
  owner = "kl_divergence_from_logits"
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  p_logits = jnp.asarray(p_logits)
  q_logits = jnp.asarray(q_logits)
  check_floating(owner, "p_logits", p_logits)
  check_floating(owner, "q_logits", q_logits)
  if q_logits.shape != p_logits.shape:
    raise ValueError(f"{owner}: `q_logits` must have the shape of p_logits "
                     f"{p_logits.shape}, got {q_logits.shape}")
  rows = _row_mask(owner, p_logits, where)
  dtype = compute_dtype(p_logits, q_logits)
  log_p = _masked_log_softmax(p_logits, rows, dtype)
  log_q = _masked_log_softmax(q_logits, rows, dtype)
  # Support by p > 0, not log_p > -inf: a p that underflows to 0 must not meet a
  # log q of -inf as 0 * inf.
  support = jnp.exp(log_p) > 0
  kl = jnp.where(rows, _p_times(log_p, log_p - log_q, support), 0.0)
  return reduce_masked(kl, rows, reduction)


def entropy(
    logits: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
  r"""Shannon entropy ``H(p) = -sum_c p_c log p_c`` of ``p = softmax(logits)`` (nats).

  Computed from ``jax.nn.log_softmax`` in float32 (float64 for float64 logits). Classes
  with ``p_c == 0``
  (``-inf`` logits) contribute exactly 0 with zero gradient, so a masked vocabulary is
  safe. A uniform distribution over ``V`` classes gives ``log V``.

  Args:
    logits: ``[..., V]`` logits.
    where: optional boolean array of shape ``[...]``; False rows give 0 and are left
      out of the mean.
    reduction: ``"none"`` (shape ``[...]``), ``"mean"`` over rows where ``where`` is
      True (0.0 if there are none), or ``"sum"``.

  Returns:
    ``[...]`` or a scalar, float32 (float64 for float64 logits).
  """
  owner = "entropy"
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  logits = jnp.asarray(logits)
  check_floating(owner, "logits", logits)
  rows = _row_mask(owner, logits, where)
  log_p = _masked_log_softmax(logits, rows, compute_dtype(logits))
  support = jnp.exp(log_p) > 0
  h = jnp.where(rows, -_p_times(log_p, log_p, support), 0.0)
  return reduce_masked(h, rows, reduction)
