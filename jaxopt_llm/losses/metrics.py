"""Evaluation metrics for token predictions.

Every metric takes ``logits`` (``[..., V]``, any floating dtype), integer ``labels``
(``[...]``), ``ignore_index`` and an optional boolean ``where`` of ``labels.shape``, with
``cross_entropy``'s masking: a token counts when ``label != ignore_index`` and ``where``
is True there. They compute in float32 (float64 for float64 logits) and are jit-able. An
all-ignored or empty batch never gives NaN (accuracies 0.0, perplexity 1.0). A counted
label outside ``[0, V)`` raises ``ValueError`` in an eager call and gives NaN under
``jit``, as in :func:`~jaxopt_llm.losses.cross_entropy`; so do the log-probabilities
(``perplexity``, ``length_normalized_score``: ``_common.softmax_nll``, exact for tiny
losses).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxopt_llm._validation import check_int, check_scalar
from jaxopt_llm.losses._common import (
    Targets, reduce_masked, token_log_probs, validated_targets)


def _mean_indicator(correct: jax.Array, t: Targets) -> jax.Array:
  # A bad label, or a NaN among a counted token's logits (whose argmax and rank mean
  # nothing), makes the metric NaN rather than a silently "wrong" or "right" prediction.
  undefined = t.bad | jnp.any(jnp.isnan(t.logits), axis=-1)
  hits = jnp.where(undefined, jnp.nan, correct.astype(t.logits.dtype))
  return reduce_masked(jnp.where(t.valid, hits, 0.0), t.valid, "mean")


def perplexity(logits: ArrayLike, labels: ArrayLike, *, ignore_index: int = -100,
               where: ArrayLike | None = None) -> jax.Array:
  r"""Perplexity ``exp(mean_t(-log p(y_t)))`` over the counted tokens (a float32 scalar;
  float64 for float64 logits).

  The mean is taken over all counted tokens of the batch together (a token-weighted
  corpus perplexity, not a mean of per-sequence perplexities). With no counted token
  the mean cross-entropy is 0, so the result is ``exp(0) = 1.0``. Arguments: see the
  module docstring.
  """
  t = validated_targets("perplexity", logits, labels, ignore_index=ignore_index,
                        where=where)
  log_p, _ = token_log_probs(t)
  return jnp.exp(reduce_masked(-log_p, t.valid, "mean"))


def token_accuracy(logits: ArrayLike, labels: ArrayLike, *, ignore_index: int = -100,
                   where: ArrayLike | None = None) -> jax.Array:
  r"""Fraction of counted tokens with ``argmax_c z_c == y`` (a float32 or float64 scalar in [0, 1]).

  ``argmax`` breaks ties towards the lowest class index (``jnp.argmax``), so with tied
  top logits this can differ from ``top_k_accuracy(..., k=1)``, which counts ties in the
  label's favour. With no counted token the result is 0.0. Arguments: see the module
  docstring.
  """
  t = validated_targets("token_accuracy", logits, labels, ignore_index=ignore_index,
                        where=where)
  return _mean_indicator(jnp.argmax(t.logits, axis=-1) == t.labels, t)


def top_k_accuracy(logits: ArrayLike, labels: ArrayLike, k: int, *,
                   ignore_index: int = -100, where: ArrayLike | None = None) -> jax.Array:
  r"""Fraction of counted tokens whose label is among the ``k`` highest logits.

  Defined by rank: a token is correct iff ``#{c : z_c > z_y} < k``. Ties therefore
  count in the label's favour (a label tied for k-th place is a hit), which makes the
  metric independent of how ``top_k`` would order equal values. ``k >= V`` gives 1.0.
  With no counted token the result is 0.0.

  Args:
    k: integer >= 1 (the other arguments: see the module docstring).

  Returns:
    A float32 (float64 for float64 logits) scalar in [0, 1].
  """
  owner = "top_k_accuracy"
  if not isinstance(k, jax.core.Tracer):
    check_int(owner, "k", k, lo=1)
  t = validated_targets(owner, logits, labels, ignore_index=ignore_index, where=where)
  z_y = jnp.take_along_axis(t.logits, t.labels[..., None], axis=-1)
  rank = jnp.sum(t.logits > z_y, axis=-1)
  return _mean_indicator(rank < k, t)


def length_normalized_score(logits: ArrayLike, labels: ArrayLike, *,
                            ignore_index: int = -100, where: ArrayLike | None = None,
                            alpha: float = 1.0) -> jax.Array:
  r"""Per-sequence length-normalised log-likelihood, for ranking continuations.

  For a sequence with counted tokens ``t`` (``n`` of them)::

    score = sum_t log p(y_t) / n**alpha

  ``alpha = 0`` is the total log-probability, ``alpha = 1`` the mean log-probability
  per token; values in between trade off the bias towards short candidates (as in
  length-normalised beam search). A sequence with ``n = 0`` scores 0.0.

  ``logits[..., t, :]`` must already be the prediction for ``labels[..., t]``: for a
  causal LM pass ``logits[..., :-1, :]`` and ``labels[..., 1:]`` (and set prompt
  positions to ``ignore_index`` to score the continuation only).

  Args:
    logits: ``[..., T, V]`` logits (labels ``[..., T]``; the others: see the module
      docstring).
    alpha: length-penalty exponent, >= 0.

  Returns:
    float32 (float64 for float64 logits) ``[...]``, one score per sequence.
  """
  owner = "length_normalized_score"
  check_scalar(owner, "alpha", alpha, lo=0.0)
  if jnp.ndim(labels) < 1:
    raise ValueError(f"{owner}: `labels` must have a time axis ([..., T]), got shape "
                     f"{jnp.shape(labels)}")
  t = validated_targets(owner, logits, labels, ignore_index=ignore_index, where=where)
  log_p, _ = token_log_probs(t)
  total = jnp.sum(log_p, axis=-1)
  n = jnp.sum(t.valid, axis=-1, dtype=total.dtype)
  # max(n, 1) keeps 0**alpha (and 0/0) away; total is already 0 when n == 0.
  return total / jnp.power(jnp.maximum(n, 1.0), jnp.asarray(alpha, total.dtype))
