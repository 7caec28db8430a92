"""Shared helpers of the token losses: argument checks, masking, the per-token formula.

``cross_entropy``, ``causal_lm_loss``, the fused loss, the metrics, ``sequence_log_probs``
and the divergences decide masking, label validation and reductions here, once, so they
cannot drift apart. A token *counts* when ``label != ignore_index`` and ``where`` is True
there; a counted label outside ``[0, V)`` is *bad*: eagerly a ``ValueError``, under jit
NaN (or a checkify check with ``validate=True``), never a silently wrong finite value.

Internal to ``jaxopt_llm.losses`` (the leading underscore of the module); the names are
public so the loss modules can share them.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxopt_llm._validation import check_int, is_concrete

REDUCTIONS = ("mean", "sum", "none")


class Targets(NamedTuple):
  """Inputs of a token loss after validation, upcast and masking."""
  logits: jax.Array     # float32 [..., V]; rows that do not count are zeroed.
  labels: jax.Array     # int32 [...], always in [0, V) so the gather is safe.
  valid: jax.Array      # bool [...], True where the token counts.
  bad: jax.Array        # bool [...], True where a counted label is outside [0, V).


def is_concrete_zero(x: Any) -> bool:
  """True for a concrete 0 (e.g. a Python ``0.0``): its term can be left out of the graph.

  Leaving it out, rather than multiplying by 0, keeps an overflowing term (``lse**2`` of
  huge logits) from turning into ``0 * inf = NaN``. (``optim.numerics.is_static_zero`` is
  stricter, Python numbers only, so that an optimizer's chain has one structure.)
  """
  return is_concrete(x) and float(x) == 0.0


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """The dtype a loss computes in: at least float32, float64 when any input is float64.

  bf16/fp16 inputs are upcast (their rounding would swamp small losses); float64 inputs under
  ``jax_enable_x64`` keep float64, so "float32 whatever the input" never means a downcast.
  """
  dtypes = [jnp.asarray(a).dtype for a in arrays if a is not None]
  dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
  return jnp.result_type(jnp.float32, *dtypes)


def check_floating(owner: str, name: str, x: jax.Array, min_ndim: int = 1) -> None:
  """Raises ValueError unless ``x`` is a floating array with at least ``min_ndim`` axes."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{owner}: `{name}` must be a floating array, got dtype {x.dtype}")
  if x.ndim < min_ndim:
    raise ValueError(
        f"{owner}: `{name}` must have at least {min_ndim} dimension(s), got shape "
        f"{x.shape}")


def as_mask(owner: str, where: Any, shape: tuple[int, ...]) -> jax.Array:
  """``where`` as a boolean array of ``shape``; ValueError for another shape or dtype."""
  where = jnp.asarray(where)
  # Integer 0/1 masks (e.g. a tokenizer's attention_mask) are accepted; floats are not,
  # since a soft weight silently rounded to a hard mask would be a different loss.
  if not (where.dtype == jnp.bool_ or jnp.issubdtype(where.dtype, jnp.integer)):
    raise ValueError(f"{owner}: `where` must be a boolean (or integer 0/1) array, got "
                     f"dtype {where.dtype}")
  if where.shape != tuple(shape):
    raise ValueError(f"{owner}: `where` must have shape {tuple(shape)}, got {where.shape}")
  return where.astype(jnp.bool_)


def sequence_targets(owner: str, logits: Any, labels: Any, where: Any | None, *,
                     labels_name: str, shift: bool,
                     ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Checks ``[..., T, V]`` logits against ``[..., T]`` labels (and ``where``).

  With ``shift``, the causal-LM shift: position ``t`` predicts token ``t + 1``, so this
  returns ``(logits[..., :-1, :], labels[..., 1:], where[..., 1:])``; ``where`` is
  shifted like the labels, so a target counts when *its* token is valid.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  check_floating(owner, "logits", logits, min_ndim=2)
  if logits.shape[:-1] != labels.shape:
    raise ValueError(
        f"{owner}: `{labels_name}` must have shape logits.shape[:-1] = "
        f"{logits.shape[:-1]}, got {labels.shape}")
  if where is not None:
    where = as_mask(owner, where, labels.shape)
  if not shift:
    return logits, labels, where
  return logits[..., :-1, :], labels[..., 1:], None if where is None else where[..., 1:]


def validated_targets(owner: str, logits: Any, labels: Any, *, ignore_index: int,
                      where: Any | None, validate: bool = False,
                      labels_name: str = "labels") -> Targets:
  """Validates a (logits, labels, where) triple and returns its ``Targets``.

  Raises ValueError on bad shapes/dtypes and, when ``labels`` is concrete, on counted
  labels outside ``[0, V)``. When traced, ``validate`` adds a checkify check instead.
  """
  logits = jnp.asarray(logits)
  check_floating(owner, "logits", logits)
  valid, safe_labels, bad = validated_labels(
      owner, labels, logits.shape[:-1], logits.shape[-1], ignore_index=ignore_index,
      where=where, validate=validate, labels_name=labels_name,
      shape_name="logits.shape[:-1]")
  # Zero the rows that do not count *before* any math: their (possibly inf/NaN) logits
  # then cannot leak NaN into the value or, through 0 * NaN, into the gradient.
  masked = jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)
  return Targets(masked, safe_labels, valid, bad)


def validated_labels(owner: str, labels: Any, shape: tuple[int, ...], vocab: int, *,
                     ignore_index: int, where: Any | None, validate: bool,
                     labels_name: str, shape_name: str,
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The label half of ``validated_targets``: returns (valid, safe labels, bad) per token.

  Needs only the vocabulary size, not the logits, so the fused loss (which never holds
  the logits) validates exactly like ``cross_entropy``. ``shape_name`` says where the
  expected ``shape`` comes from in the error message. The safe labels are always in
  ``[0, V)``: a plain gather would clamp or wrap a bad index into a plausible-looking
  finite loss; ``bad`` marks those tokens for NaN instead.
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{owner}: `{labels_name}` must be an integer array, got dtype "
                     f"{labels.dtype}")
  if tuple(shape) != labels.shape:
    raise ValueError(
        f"{owner}: `{labels_name}` must have shape {shape_name} = "
        f"{tuple(shape)}, got {labels.shape}")
  check_int(owner, "ignore_index", ignore_index)
  # Signed and at least 32-bit, so comparisons with a negative ignore_index or with V
  # cannot overflow; a huge unsigned label wraps to a negative, still out-of-range value.
  labels = labels.astype(jnp.int64 if labels.dtype.itemsize == 8 else jnp.int32)
  if where is not None:
    where = as_mask(owner, where, labels.shape)

  range_msg = (f"{owner}: `{labels_name}` must be in [0, {vocab}) or equal to "
               f"ignore_index ({ignore_index})")
  eager = is_concrete(labels) and (where is None or is_concrete(where))
  if eager:
    # Eager: the values are on hand, so a bad label is always an error. numpy, not jnp:
    # inside an outer jit even ops on concrete inputs would be traced.
    labels_np = np.asarray(labels)
    bad_np = (labels_np != ignore_index) & ((labels_np < 0) | (labels_np >= vocab))
    if where is not None:
      bad_np &= np.asarray(where)
    if bad_np.any():
      values = np.unique(labels_np[bad_np])
      more = "" if values.size <= 10 else f" (and {values.size - 10} more)"
      raise ValueError(f"{range_msg}; got out-of-range value(s) {values[:10].tolist()}{more}")

  valid = labels != ignore_index
  if where is not None:
    valid = valid & where
  in_range = (labels >= 0) & (labels < vocab)
  safe_labels = jnp.where(valid & in_range, labels, 0).astype(jnp.int32)
  bad = valid & ~in_range
  if validate and not eager and labels.size:
    bad_flat = bad.reshape(-1)
    first = jnp.argmax(bad_flat)
    checkify.check(
        ~jnp.any(bad_flat),
        f"{range_msg}; got out-of-range value {{value}} at flat index {{index}}",
        value=labels.reshape(-1)[first], index=first)
  return valid, safe_labels, bad


def label_log_probs(logits: jax.Array, labels: jax.Array, lse: jax.Array,
                    valid: jax.Array, bad: jax.Array) -> jax.Array:
  """``log p(y) = z_y - lse`` per token: 0 where not valid, NaN where the label is bad."""
  z_y = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jnp.where(valid, jnp.where(bad, jnp.nan, z_y - lse), 0.0)


def token_log_probs(t: Targets) -> tuple[jax.Array, jax.Array]:
  """Returns (log p(y), logsumexp(z)) per token: 0 where not valid, NaN where bad."""
  lse = jax.nn.logsumexp(t.logits, axis=-1)
  return label_log_probs(t.logits, t.labels, lse, t.valid, t.bad), lse


def token_loss(logits: jax.Array, log_p: jax.Array, lse: jax.Array, valid: jax.Array, *,
               label_smoothing: jax.Array | None, z_loss: jax.Array | None) -> jax.Array:
  r"""The per-token cross-entropy of ``cross_entropy`` and the fused loss, in one place::

    loss = (1 - eps) * (-log p(y)) + eps * (lse - mean_c z_c) + z_loss * lse**2

  (``eps = label_smoothing``; torch's label smoothing plus PaLM's z-loss), 0 where the
  token does not count. ``log_p`` is :func:`label_log_probs`' output; ``None`` for a
  term leaves it out of the graph (see :func:`is_concrete_zero`).
  """
  loss = -log_p
  if label_smoothing is not None:
    eps = jnp.asarray(label_smoothing, jnp.float32)
    loss = (1.0 - eps) * loss + eps * (lse - jnp.mean(logits, axis=-1))
  if z_loss is not None:
    loss = loss + jnp.asarray(z_loss, jnp.float32) * jnp.square(lse)
  return jnp.where(valid, loss, 0.0)


def reduce_masked(values: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  """``"none"``: ``values``; ``"sum"``: their sum; ``"mean"``: sum / number of valid.

  ``values`` must already be 0 where not valid. The mean divides by ``max(count, 1)``:
  an all-masked batch has sum 0, so the mean is 0.0 with zero gradient instead of 0/0.
  """
  if reduction == "none":
    return values
  total = jnp.sum(values)
  if reduction == "sum":
    return total
  count = jnp.sum(valid, dtype=jnp.float32)
  return total / jnp.maximum(count, 1.0)
