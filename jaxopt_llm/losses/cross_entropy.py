"""Token-level cross-entropy for language models.

``cross_entropy`` follows ``torch.nn.functional.cross_entropy`` (ignore_index, label
smoothing, reductions) and adds the PaLM z-loss. ``causal_lm_loss`` applies it to
next-token prediction. The private helpers below (``_validated_targets`` /
``_validated_labels`` for argument checks, ``_mask`` / ``_token_log_probs`` / ``_reduce``
for masking, the safe gather and reductions) hold that logic once; ``metrics.py`` and
``fused.py`` are built on them.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxopt_llm._validation import check_choice, check_int, check_real, is_concrete

_REDUCTIONS = ("mean", "sum", "none")


class _Targets(NamedTuple):
  """Inputs of a token loss after validation, upcast and masking."""
  logits: jax.Array     # float32 [..., V]; rows that do not count are zeroed.
  labels: jax.Array     # int32 [...], always in [0, V) so the gather is safe.
  valid: jax.Array      # bool [...], True where the token counts.
  bad: jax.Array        # bool [...], True where a counted label is outside [0, V).


def _check_logits(owner: str, name: str, logits: jax.Array, min_ndim: int = 1) -> None:
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(
        f"{owner}: `{name}` must be a floating array, got dtype {logits.dtype}")
  if logits.ndim < min_ndim:
    raise ValueError(
        f"{owner}: `{name}` must have at least {min_ndim} dimension(s), got shape "
        f"{logits.shape}")


def _as_mask(owner: str, where: Any, shape: tuple[int, ...]) -> jax.Array:
  where = jnp.asarray(where)
  # Integer 0/1 masks (e.g. a tokenizer's attention_mask) are accepted; floats are not,
  # since a soft weight silently rounded to a hard mask would be a different loss.
  if not (where.dtype == jnp.bool_ or jnp.issubdtype(where.dtype, jnp.integer)):
    raise ValueError(f"{owner}: `where` must be a boolean (or integer 0/1) array, got "
                     f"dtype {where.dtype}")
  if where.shape != tuple(shape):
    raise ValueError(f"{owner}: `where` must have shape {tuple(shape)}, got {where.shape}")
  return where.astype(jnp.bool_)


def _validated_targets(owner: str, logits: Any, labels: Any, *, ignore_index: int,
                       where: Any | None, validate: bool = False,
                       labels_name: str = "labels") -> _Targets:
  """Validates a (logits, labels, where) triple and returns its ``_Targets``.

  Raises ValueError on bad shapes/dtypes and, when ``labels`` is concrete, on counted
  labels outside ``[0, V)``. When traced, ``validate`` adds a checkify check instead.
  """
  logits = jnp.asarray(logits)
  _check_logits(owner, "logits", logits)
  valid, safe_labels, bad = _validated_labels(
      owner, labels, logits.shape[:-1], logits.shape[-1], ignore_index=ignore_index,
      where=where, validate=validate, labels_name=labels_name,
      shape_name="logits.shape[:-1]")
  return _Targets(_masked_logits(logits, valid), safe_labels, valid, bad)


def _validated_labels(owner: str, labels: Any, shape: tuple[int, ...], vocab: int, *,
                      ignore_index: int, where: Any | None, validate: bool,
                      labels_name: str, shape_name: str,
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The label half of ``_validated_targets``: returns ``_mask``'s (valid, labels, bad).

  Needs only the vocabulary size, not the logits, so the fused loss (which never holds
  the logits) validates exactly like ``cross_entropy``. ``shape_name`` says where the
  expected ``shape`` comes from in the error message.
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
    where = _as_mask(owner, where, labels.shape)

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
      shown = values[:10].tolist()
      more = "" if values.size <= 10 else f" (and {values.size - 10} more)"
      raise ValueError(
          f"{owner}: `{labels_name}` must be in [0, {vocab}) or equal to ignore_index "
          f"({ignore_index}); got out-of-range value(s) {shown}{more}")
  valid, safe_labels, bad = _mask(labels, where, ignore_index, vocab)
  if validate and not eager and labels.size:
    bad_flat = bad.reshape(-1)
    first = jnp.argmax(bad_flat)
    checkify.check(
        ~jnp.any(bad_flat),
        f"{owner}: `{labels_name}` must be in [0, {vocab}) or equal to ignore_index "
        f"({ignore_index}); got out-of-range value {{value}} at flat index {{index}}",
        value=labels.reshape(-1)[first], index=first)
  return valid, safe_labels, bad


def _mask(labels: jax.Array, where: jax.Array | None, ignore_index: int,
          vocab: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The one place masking is decided: (valid, safe gather index, bad) per token."""
  valid = labels != ignore_index
  if where is not None:
    valid = valid & where
  in_range = (labels >= 0) & (labels < vocab)
  # The gather index is always in range: a plain gather would clamp or wrap a bad index
  # into a plausible-looking finite loss; ``bad`` marks those tokens for NaN instead.
  safe_labels = jnp.where(valid & in_range, labels, 0).astype(jnp.int32)
  return valid, safe_labels, valid & ~in_range


def _masked_logits(logits: jax.Array, valid: jax.Array) -> jax.Array:
  # Zero the rows that do not count *before* any math: their (possibly inf/NaN) logits
  # then cannot leak NaN into the value or, through 0 * NaN, into the gradient.
  return jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)


def _token_log_probs(t: _Targets) -> tuple[jax.Array, jax.Array]:
  """Returns (log p(y), logsumexp(z)) per token: 0 where not valid, NaN where bad."""
  lse = jax.nn.logsumexp(t.logits, axis=-1)
  z_y = jnp.take_along_axis(t.logits, t.labels[..., None], axis=-1)[..., 0]
  log_p = jnp.where(t.bad, jnp.nan, z_y - lse)
  return jnp.where(t.valid, log_p, 0.0), lse


def _reduce(per_token: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
  if reduction == "none":
    return per_token
  total = jnp.sum(per_token)
  if reduction == "sum":
    return total
  # max(count, 1): an all-masked batch has total == 0, so the mean is 0 with zero
  # gradient instead of 0/0.
  count = jnp.sum(valid, dtype=jnp.float32)
  return total / jnp.maximum(count, 1.0)


def _cross_entropy(owner: str, labels_name: str, logits: Any, labels: Any, *,
                   ignore_index: int, label_smoothing: float, z_loss: float,
                   reduction: str, where: Any | None, validate: bool) -> jax.Array:
  check_choice(owner, "reduction", reduction, _REDUCTIONS)
  check_real(owner, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
  check_real(owner, "z_loss", z_loss, lo=0.0)
  t = _validated_targets(
      owner, logits, labels, ignore_index=ignore_index, where=where, validate=validate,
      labels_name=labels_name)
  log_p, lse = _token_log_probs(t)
  loss = -log_p
  # Static skips: with a Python 0.0 the extra terms are not built at all, so e.g. an
  # overflowing mean_c(z) or lse**2 for huge logits cannot turn into 0 * inf = NaN.
  if not (is_concrete(label_smoothing) and float(label_smoothing) == 0.0):
    eps = jnp.asarray(label_smoothing, jnp.float32)
    loss = (1.0 - eps) * loss + eps * (lse - jnp.mean(t.logits, axis=-1))
  if not (is_concrete(z_loss) and float(z_loss) == 0.0):
    loss = loss + jnp.asarray(z_loss, jnp.float32) * jnp.square(lse)
  loss = jnp.where(t.valid, loss, 0.0)
  return _reduce(loss, t.valid, reduction)


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    where: jax.typing.ArrayLike | None = None,
    validate: bool = False,
) -> jax.Array:
  r"""Softmax cross-entropy with integer labels, ignore_index, smoothing and z-loss.

  For a token with logits ``z`` (``V`` classes), label ``y`` and
  ``lse = log sum_c exp(z_c)``::

    nll    = lse - z_y                                  # = -log softmax(z)_y
    smooth = lse - mean_c(z_c)                          # = mean_c(-log softmax(z)_c)
    loss   = (1 - eps) * nll + eps * smooth + z_loss * lse**2

  with ``eps = label_smoothing``. The first two terms are exactly
  ``torch.nn.functional.cross_entropy(..., label_smoothing=eps)`` (the smoothed target
  puts ``eps / V`` on every class, the label included). The last term is the auxiliary
  z-loss of PaLM (Chowdhery et al., 2022, "PaLM: Scaling Language Modeling with
  Pathways", sec. 5), which keeps the softmax normaliser near 1 (``lse`` near 0).
  ``lse`` is computed with ``jax.nn.logsumexp`` (max subtraction), never as
  ``log(softmax)``, and all math is float32 whatever the input dtype (bf16/fp16 logits
  are upcast first).

  A token counts when ``label != ignore_index`` and ``where`` is True there. Tokens
  that do not count get loss 0 and exactly zero gradient, even if their logits are
  inf or NaN. Reductions:

  * ``"mean"``: sum over counted tokens / number of counted tokens (PyTorch's
    ``reduction="mean"`` with ``ignore_index``).
  * ``"sum"``: sum over counted tokens.
  * ``"none"``: per-token losses of shape ``labels.shape`` (0 where not counted).

  Deliberate difference from PyTorch: when no token counts, ``"mean"`` returns 0.0 with
  zero gradient (PyTorch returns NaN), so a fully padded micro-batch does not poison the
  accumulated gradient.

  The gradient w.r.t. ``z`` of a counted token (no smoothing, no z-loss) is
  ``softmax(z) - onehot(y)``.

  Bad input:
    * ``reduction`` not in {"mean", "sum", "none"}, ``label_smoothing`` outside
      [0, 1], ``z_loss < 0``, non-floating ``logits``, non-integer ``labels`` or
      ``logits.shape[:-1] != labels.shape`` raise ``ValueError`` naming the argument.
    * A counted label outside ``[0, V)``: in an eager call (``labels`` concrete) this
      always raises ``ValueError`` naming ``labels``, the bad value(s) and ``V``. Under
      ``jit`` the values are unknown at trace time: with ``validate=True`` a
      ``jax.experimental.checkify`` check is emitted, so wrap the function as
      ``checkify.checkify(jax.jit(f))`` and call ``err.throw()`` (staging a
      ``validate=True`` call without ``checkify`` is an error from JAX itself). With
      ``validate=False`` that token's loss is NaN (and so is a mean/sum over it),
      never a silently wrong finite value: the gather never clamps or wraps.
    * If ``where`` is traced but ``labels`` concrete, the label check is the traced
      one, since which tokens count is not known eagerly.

  Args:
    logits: ``[..., V]`` unnormalised scores, any floating dtype.
    labels: ``[...]`` integer class indices.
    ignore_index: label value that marks a token as not counted.
    label_smoothing: ``eps`` in [0, 1].
    z_loss: weight (>= 0) of the PaLM z-loss ``lse**2``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    where: optional boolean (or integer 0/1) array of ``labels.shape``; False is
      treated exactly like ``ignore_index``.
    validate: emit a checkify check for out-of-range labels when traced.

  Returns:
    A float32 scalar, or float32 ``labels.shape`` for ``reduction="none"``.
  """
  return _cross_entropy(
      "cross_entropy", "labels", logits, labels, ignore_index=ignore_index,
      label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, where=where,
      validate=validate)


def causal_lm_loss(logits: jax.typing.ArrayLike, input_ids: jax.typing.ArrayLike,
                   **kwargs: Any) -> jax.Array:
  r"""Next-token cross-entropy: position ``t`` predicts token ``t + 1``.

  Equivalent to ``cross_entropy(logits[..., :-1, :], input_ids[..., 1:], **kwargs)``.
  If ``where`` is given it must have ``input_ids``' shape and is shifted the same way
  (``where[..., 1:]``): a target counts when *its* token is valid, so passing a
  padding mask as ``where`` drops every prediction of a pad token. With ``T == 1``
  there is no target and the mean is 0.0.

  Args:
    logits: ``[..., T, V]`` scores, one row per position.
    input_ids: ``[..., T]`` integer tokens.
    **kwargs: keyword arguments of :func:`cross_entropy` (``ignore_index``,
      ``label_smoothing``, ``z_loss``, ``reduction``, ``where``, ``validate``).

  Returns:
    As :func:`cross_entropy`; ``reduction="none"`` gives shape ``[..., T - 1]``.
  """
  owner = "causal_lm_loss"
  logits = jnp.asarray(logits)
  input_ids = jnp.asarray(input_ids)
  _check_logits(owner, "logits", logits, min_ndim=2)
  if logits.shape[:-1] != input_ids.shape:
    raise ValueError(
        f"{owner}: `input_ids` must have shape logits.shape[:-1] = {logits.shape[:-1]}, "
        f"got {input_ids.shape}")
  where = kwargs.pop("where", None)
  if where is not None:
    where = _as_mask(owner, where, input_ids.shape)[..., 1:]
  # cross_entropy's own defaults, so the two functions cannot drift apart.
  params = {k: v for k, v in cross_entropy.__kwdefaults__.items() if k != "where"}
  unknown = set(kwargs) - set(params)
  if unknown:
    raise TypeError(f"{owner}: unexpected keyword argument(s) {sorted(unknown)}")
  params.update(kwargs)
  return _cross_entropy(owner, "input_ids", logits[..., :-1, :], input_ids[..., 1:],
                        where=where, **params)
