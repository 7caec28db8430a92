"""Shared helpers of the token losses: argument checks, masking, the per-token formula.

``cross_entropy``, ``causal_lm_loss``, the fused loss, the metrics, ``sequence_log_probs``
and the divergences decide masking, label validation and reductions here, once, so they
cannot drift apart. A token *counts* when ``label != ignore_index`` and ``where`` is True
there; a counted label outside ``[0, V)`` is *bad*: eagerly a ``ValueError``, under jit
NaN in the value *and* the gradient (or a checkify check with ``validate=True``), never a
silently wrong finite value.

The per-token formula (``combine_token_loss``: label smoothing, torch's class weights,
z-loss) and the (weighted) mean (``reduce_masked``) are written once here for
``cross_entropy`` and the fused loss; soft targets (class probabilities) are
``soft_nll``.

The per-row negative log-likelihood ``-log softmax(z)_y`` of every softmax loss (token CE,
the fused CE, InfoNCE, CLIP) is :func:`softmax_nll`: it keeps the relative precision of
tiny losses (see there), so a well-fit token's loss is not the rounding error of
``logsumexp(z) - z_y``.

Internal to ``jaxopt_llm.losses`` (the leading underscore of the module); the names are
public so the loss modules can share them.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from jaxopt_llm._validation import (
    check_bool, check_choice, check_int, check_scalar, is_concrete)

REDUCTIONS = ("mean", "sum", "none")


class Targets(NamedTuple):
  """Inputs of a token loss after validation, upcast and masking."""
  logits: jax.Array     # compute_dtype [..., V]; rows that do not count are zeroed.
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


def as_mask(owner: str, where: Any, shape: tuple[int, ...] | None = None, *,
            name: str = "where", shape_text: str | None = None, min_ndim: int = 0) -> jax.Array:
  """``where`` as a boolean array; ValueError naming ``name`` for another dtype, fewer than
  ``min_ndim`` axes, or (when ``shape`` is given) another shape (``shape_text`` says which)."""
  where = jnp.asarray(where)
  # Integer 0/1 masks (e.g. a tokenizer's attention_mask) are accepted; floats are not,
  # since a soft weight silently rounded to a hard mask would be a different loss.
  if not (where.dtype == jnp.bool_ or jnp.issubdtype(where.dtype, jnp.integer)):
    raise ValueError(f"{owner}: `{name}` must be a boolean (or integer 0/1) array, got "
                     f"dtype {where.dtype}")
  if where.ndim < min_ndim:
    raise ValueError(f"{owner}: `{name}` must have at least {min_ndim} dimension(s), got "
                     f"shape {where.shape}")
  if shape is not None and where.shape != tuple(shape):
    raise ValueError(f"{owner}: `{name}` must have {shape_text or 'shape'} {tuple(shape)}, "
                     f"got {where.shape}")
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
  if logits.shape[-1] == 0:
    raise ValueError(f"{owner}: `logits` must have at least one class (last axis V >= 1), "
                     f"got shape {logits.shape}")
  valid, safe_labels, bad = validated_labels(
      owner, labels, logits.shape[:-1], logits.shape[-1], ignore_index=ignore_index,
      where=where, validate=validate, labels_name=labels_name,
      shape_name="logits.shape[:-1]")
  # Zero the rows that do not count *before* any math: their (possibly inf/NaN) logits
  # then cannot leak NaN into the value or, through 0 * NaN, into the gradient.
  masked = jnp.where(valid[..., None], logits.astype(compute_dtype(logits)), 0.0)
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


class SoftmaxNll(NamedTuple):
  """Per row of logits ``z`` with label ``y`` (see :func:`softmax_nll_parts`)."""
  nll: jax.Array         # -log softmax(z)_y, with relative precision down to tiny values
  lse: jax.Array         # log sum_c exp(z_c) = top + log(total)
  label_grad: jax.Array  # d nll / d z_y = p_y - 1, also with relative precision
  top: jax.Array         # m = max_c z_c
  total: jax.Array       # sum_c exp(z_c - m) >= 1


def softmax_probs(logits: jax.Array, top: jax.Array, total: jax.Array) -> jax.Array:
  """``softmax(z) = exp(z - m) / total``: not ``exp(z - lse)``, whose rounded ``lse``
  (an ulp of ``m``: 1e-3 at logits ~1e4) would shift every probability."""
  return jnp.exp(logits - top[..., None]) * (1.0 / total)[..., None]


def softmax_nll_parts(logits: jax.Array, labels: jax.Array) -> SoftmaxNll:
  r"""``-log softmax(z)_y`` per row, exact for tiny values; labels must be in ``[0, V)``.

  ``logsumexp(z) - z_y`` rounds ``lse`` (of the size of the largest logit) before the
  subtraction, so a well-fit row (loss ~1e-5 at logits ~100) keeps only the rounding
  error; ``log(sum_c exp(z_c - m))`` still rounds ``1 + s`` for ``s ~ 1e-5``. Here, with
  ``m = max_c z_c``, ``r = sum_{c != y} exp(z_c - m)`` (the label's term left out by its
  index, so there is nothing to cancel) and ``e_y = exp(z_y - m)``::

    nll = log1p(r / e_y)               where z_y > m - 1
        = (m - z_y) + log(e_y + r)     elsewhere (nll >= 1: two non-negative terms)
    lse = m + log(e_y + r)

  Both forms are sums of non-negative terms, so ``nll`` has the relative precision of
  ``r`` and ``e_y`` (a few ulps; for ``z = [100, 88, 87]``, ``y = 0``: 8.4045e-6, exact
  8.40451e-6) and is never negative. One reduction over the classes besides the max, as
  ``logsumexp``. The label's term is left out by multiplying by ``sign|c - y|`` on a
  floating iota (exact below 2**24 classes in float32; a comparison above), since XLA:CPU
  vectorises that reduction and not one with a select. ``label_grad = -r / (e_y + r)``
  is ``p_y - 1`` without the cancellation of ``p_y - 1`` at ``p_y ~ 1``.

  NaN anywhere in a row gives NaN; ``-inf`` logits (a masked vocabulary) are exact
  zeros of the softmax, and ``z_y = -inf`` gives ``nll = +inf``.
  """
  dtype = logits.dtype
  vocab = logits.shape[-1]
  m = jnp.max(logits, axis=-1)
  if vocab <= 2 ** (jnp.finfo(dtype).nmant + 1):
    iota = lax.broadcasted_iota(dtype, logits.shape, logits.ndim - 1)
    not_label = jnp.sign(jnp.abs(iota - labels[..., None].astype(dtype)))
  else:
    iota = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    not_label = (iota != labels[..., None]).astype(dtype)
  r = jnp.sum(jnp.exp(logits - m[..., None]) * not_label, axis=-1)
  d_y = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0] - m
  nll, lse, label_grad, total = nll_from_sums(m, r, d_y)
  return SoftmaxNll(nll, lse, label_grad, m, total)


def nll_from_sums(m: jax.Array, r: jax.Array, d_y: jax.Array) -> tuple[jax.Array, ...]:
  """``(nll, lse, p_y - 1, total)`` from the max ``m``, the other classes' sum
  ``r = sum_{c != y} exp(z_c - m)`` and ``d_y = z_y - m``: the formula of
  :func:`softmax_nll_parts`, also fed by the fused loss's blockwise sums
  (``total = e_y + r = sum_c exp(z_c - m) >= 1``)."""
  e_y = jnp.exp(d_y)
  total = e_y + r
  near = d_y > -1.0
  nll = jnp.where(near, jnp.log1p(r / jnp.where(near, e_y, 1.0)), jnp.log(total) - d_y)
  return nll, m + jnp.log(total), -r / total, total


@jax.custom_jvp
def softmax_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""``(nll, lse)`` per row of :func:`softmax_nll_parts`, with the exact derivatives.

  ``d nll / dz = softmax(z) - onehot(y)`` (the label's entry ``p_y - 1`` computed as
  ``-r / (e_y + r)``, so the gradient of a tiny loss is as precise as the loss) and
  ``d lse / dz = softmax(z)``. Written as a ``custom_jvp``, so forward mode, reverse mode
  and higher derivatives (the rule is itself differentiable) all work; under ``jit`` XLA
  recomputes ``softmax(z)`` in the backward pass instead of storing it.
  """
  parts = softmax_nll_parts(logits, labels)
  return parts.nll, parts.lse


@softmax_nll.defjvp
def _softmax_nll_jvp(primals, tangents):
  logits, labels = primals
  dz, _ = tangents
  parts = softmax_nll_parts(logits, labels)
  p = softmax_probs(logits, parts.top, parts.total)
  onehot = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == labels[..., None]
  q = jnp.where(onehot, parts.label_grad[..., None], p)
  return (parts.nll, parts.lse), (jnp.sum(q * dz, axis=-1), jnp.sum(p * dz, axis=-1))


def masked_log_probs(nll: jax.Array, valid: jax.Array, bad: jax.Array) -> jax.Array:
  """``log p(y) = -nll`` per token: 0 where not valid, NaN where the label is bad.

  A bad label's NaN multiplies the value (``-nll * NaN``), so its gradient is NaN too: a
  guard that checks gradients fires, where ``where(bad, nan, -nll)`` would give the
  gradient an exact, silent 0.
  """
  poison = jnp.where(bad, jnp.nan, 1.0).astype(nll.dtype)
  return jnp.where(valid, -nll * poison, 0.0)


def token_log_probs(t: Targets) -> tuple[jax.Array, jax.Array]:
  """Returns (log p(y), logsumexp(z)) per token: 0 where not valid, NaN where bad."""
  nll, lse = softmax_nll(t.logits, t.labels)
  return masked_log_probs(nll, t.valid, t.bad), lse


def smoothing_term(logits: jax.Array, lse: jax.Array,
                   class_weight: jax.Array | None = None) -> jax.Array:
  r"""The label-smoothing term ``smooth`` of :func:`combine_token_loss`, per row::

    smooth = sum_c w_c * (lse - z_c) / V     = sum_c w_c * (-log p_c) / V
           = lse - mean_c z_c                 without class weights (w_c = 1)

  (torch's ``cross_entropy(weight=w, label_smoothing=eps)`` weights the smoothing term by
  every class's weight). Unweighted, the mean is ``sum_c (z_c / V)``, which does not
  overflow at several logits of 3e38 where ``sum_c z_c`` would. Weighted, each term
  ``lse - z_c`` is >= 0, so with ``w >= 0`` the sum has no cancellation and can overflow
  to ``+inf`` but not give NaN; a class of weight 0 adds exactly 0 (value and gradient)
  even where its logit is ``-inf`` (``0 * inf`` would be NaN).
  """
  dtype = logits.dtype
  inv_v = jnp.asarray(1.0 / logits.shape[-1], dtype)
  if class_weight is None:
    return lse - jnp.sum(logits * inv_v, axis=-1)
  w = jnp.asarray(class_weight, dtype)
  return jnp.sum(zero_safe_mul(w * inv_v, lse[..., None] - logits), axis=-1)


def zero_safe_mul(coef: jax.Array, x: jax.Array) -> jax.Array:
  """``coef * x``, but exactly 0 where ``coef == 0`` and ``x`` is infinite (not NaN).

  A NaN ``x`` stays NaN (a bad label's poison), and the derivatives are those of the
  product: ``x`` w.r.t. ``coef`` (finite where ``x`` is), ``coef`` w.r.t. ``x``.
  """
  return coef * jnp.where((coef == 0) & jnp.isinf(x), 0.0, x)


def combine_token_loss(nll: jax.Array, smooth: jax.Array | None, lse: jax.Array,
                       valid: jax.Array, *, label_smoothing: jax.Array | None,
                       z_loss: jax.Array | None,
                       target_weight: jax.Array | None = None) -> jax.Array:
  r"""The per-token cross-entropy of ``cross_entropy`` and the fused loss, in one place::

    loss = (1 - eps) * w_y * nll + eps * smooth + z_loss * lse**2

  (``eps = label_smoothing``; torch's label smoothing and class weights plus PaLM's
  z-loss), 0 where the token does not count (``valid`` False). ``nll`` is the per-token
  ``-log p(y)`` carrying NaN for a bad label (``-masked_log_probs(...)``; for soft targets
  ``sum_c w_c q_c (-log p_c)``), ``smooth`` the caller's :func:`smoothing_term` (with the
  same class weights), ``target_weight`` the label's class weight ``w_y`` per token
  (``None``: 1). ``None`` for ``label_smoothing`` / ``z_loss`` leaves the term out of the
  graph (see :func:`is_concrete_zero`; ``smooth`` may then be ``None``).

  Guarantees (each checked by the tests):

  * A zero coefficient of ``nll`` (``eps == 1`` or ``w_y == 0``, traced or not) gives
    its term exactly 0, also for an infinite ``nll`` (a ``-inf`` label logit), where
    ``0 * inf`` would be NaN; a traced ``eps == 0`` / ``z_loss == 0`` likewise zeroes an
    infinite ``smooth`` / ``lse**2``.
  * A bad label's NaN in ``nll`` is kept by every branch (``0 * NaN`` is NaN), in the
    value and, through ``masked_log_probs``' poison, in the gradient.
  * With non-negative weights every term is >= 0, so the sum can overflow to ``+inf``
    (logits near the float32 range) but is never ``inf - inf = NaN``. The z-loss is
    ``(z_loss * lse) * lse``, whose reverse-mode derivative ``2 * z_loss * lse`` stays
    finite for ``|lse| <= 3.4e38`` (``jnp.square``'s ``2 * lse`` would overflow first)
    when the incoming cotangent is at most 1 (``jax.grad`` of the mean or sum).
  """
  dtype = nll.dtype
  coef = None
  if label_smoothing is not None:
    coef = 1.0 - jnp.asarray(label_smoothing, dtype)
  if target_weight is not None:
    w_y = jnp.asarray(target_weight, dtype)
    coef = w_y if coef is None else coef * w_y
  # coef == 0: 0 * nll, but 0 (not NaN) for an infinite nll and NaN for a bad label.
  loss = nll if coef is None else zero_safe_mul(coef, nll)
  if label_smoothing is not None:
    loss = loss + zero_safe_mul(jnp.asarray(label_smoothing, dtype), smooth)
  if z_loss is not None:
    zl = jnp.asarray(z_loss, dtype)
    loss = loss + jnp.where(zl == 0, 0.0, (zl * lse) * lse)
  return jnp.where(valid, loss, 0.0)


def token_loss(logits: jax.Array, log_p: jax.Array, lse: jax.Array, valid: jax.Array, *,
               label_smoothing: jax.Array | None, z_loss: jax.Array | None,
               class_weight: jax.Array | None = None,
               target_weight: jax.Array | None = None) -> jax.Array:
  r"""The per-token cross-entropy from the logits (:func:`combine_token_loss`)::

    loss = (1 - eps) * (-log p(y)) + eps * (lse - mean_c z_c) + z_loss * lse**2

  without class weights; with them (``class_weight`` ``[V]`` and ``target_weight`` its
  value at each token's label) the first term is multiplied by ``w_y`` and the smoothing
  term is :func:`smoothing_term`'s weighted one. ``log_p`` is :func:`masked_log_probs`'
  output (NaN for a bad label); 0 where the token does not count.
  """
  smooth = None if label_smoothing is None else smoothing_term(logits, lse, class_weight)
  return combine_token_loss(-log_p, smooth, lse, valid, label_smoothing=label_smoothing,
                            z_loss=z_loss, target_weight=target_weight)


def reduce_masked(values: jax.Array, valid: jax.Array, reduction: str,
                  weights: jax.Array | None = None) -> jax.Array:
  r"""``"none"``: ``values``; ``"sum"``: their sum; ``"mean"``: a (weighted) mean.

  ``values`` must already be 0 where not valid. Without ``weights`` the mean is
  ``sum / max(count, 1)`` over the valid tokens: an all-masked batch has sum 0, so the
  mean is 0.0 with zero gradient instead of 0/0. With per-token ``weights`` (the target
  classes' weights ``w_y``) it is torch's weighted mean, ``sum / sum_{valid} w_y``; a
  zero weight sum (no valid token, or only zero-weight targets) gives 0.0 with zero
  gradient as well, where torch gives NaN (``0/0``) or ``inf``: a deliberate difference,
  so a micro-batch holding only zero-weight classes does not poison the accumulated
  gradient. A NaN sum (a bad label) stays NaN.
  """
  if reduction == "none":
    return values
  total = jnp.sum(values)
  if reduction == "sum":
    return total
  if weights is None:
    count = jnp.sum(valid, dtype=total.dtype)
    return total / jnp.maximum(count, 1.0)
  wsum = jnp.sum(jnp.where(valid, jnp.asarray(weights, total.dtype), 0.0))
  nonzero = wsum != 0       # a NaN weight sum is "nonzero": its NaN is kept
  return jnp.where(nonzero, total / jnp.where(nonzero, wsum, 1.0),
                   0.0 * jnp.where(jnp.isinf(total), 0.0, total))


def unit_max_exponent(weights: jax.Array, axis_name: Any = None) -> jax.Array:
  """``e`` with ``2**(e-1) <= max(weights) < 2**e`` (0 when the maximum is 0 or not
  finite): ``jnp.ldexp(weights, -e)`` puts the largest weight in [0.5, 1), exactly (a
  power-of-two scale rounds nothing but subnormals; ``2**-e`` itself may be subnormal,
  so scale with ``ldexp``, not by multiplying). A weighted mean
  ``sum_i w_i l_i / sum_i w_i`` (any unweighted term of its numerator scaled too) does
  not change, but weights near the float32 maximum no longer overflow its numerator and
  denominator to ``inf / inf = NaN``. A constant for the gradient (the mean's
  derivatives are the same). With ``axis_name`` (weights sharded over those mesh axes) the
  maximum is taken over every shard."""
  top = lax.stop_gradient(jnp.max(weights))
  if axis_name is not None:
    top = lax.pmax(top, axis_name)
  _, e = jnp.frexp(jnp.where(jnp.isfinite(top) & (top > 0), top, 1.0))
  return lax.stop_gradient(jnp.where(jnp.isfinite(top) & (top > 0), e, 0))


def scaled_for_weighted_mean(weights: jax.Array, z_loss: Any | None, axis_name: Any = None
                             ) -> tuple[jax.Array, jax.Array | None]:
  """``(weights, z_loss)`` both scaled by ``2**-e`` (:func:`unit_max_exponent`): the class
  weights of a weighted mean and the z-loss weight, the one unweighted term of its
  numerator, scaled together so that ``sum / sum_{counted} w_y`` is unchanged. Used by
  ``cross_entropy`` and the fused loss before a ``"mean"`` reduction."""
  e = unit_max_exponent(weights, axis_name)
  zl = None if z_loss is None else jnp.ldexp(jnp.asarray(z_loss, weights.dtype), -e)
  return jnp.ldexp(weights, -e), zl


def validated_class_weight(owner: str, weight: Any | None, vocab: int
                           ) -> jax.Array | None:
  """``weight`` (torch's per-class rescaling, shape ``[V]``) as a floating array (at least
  float32: ``compute_dtype``), or None.

  TypeError naming ``weight`` for a non-array (a string), ValueError for a non-real dtype
  (bool, complex) or another shape than
  ``(V,)``, and, when the values are concrete, for a negative or non-finite weight.
  torch accepts negative weights; here they are rejected: the loss would be unbounded
  below, and the per-token terms would no longer all be >= 0, so an overflow could give
  ``inf - inf = NaN``, and the weighted mean's denominator could cross zero. A traced
  weight is not checked (its values are unknown): keep it >= 0.
  """
  if weight is None:
    return None
  try:
    w = jnp.asarray(weight)
  except TypeError as e:
    raise TypeError(f"{owner}: `weight` must be an array of per-class weights, got "
                    f"{type(weight).__name__}: {e}") from None
  if w.dtype == jnp.bool_ or not (jnp.issubdtype(w.dtype, jnp.floating)
                                  or jnp.issubdtype(w.dtype, jnp.integer)):
    raise ValueError(f"{owner}: `weight` must be a real (floating or integer) array of "
                     f"per-class weights, got dtype {w.dtype}")
  if w.shape != (vocab,):
    raise ValueError(f"{owner}: `weight` must have shape (V,) = ({vocab},) (one weight "
                     f"per class), got {w.shape}")
  if is_concrete(w):
    w_np = np.asarray(w, np.float64)
    if not np.all(np.isfinite(w_np)) or np.any(w_np < 0):
      bad = np.unique(w_np[~(np.isfinite(w_np) & (w_np >= 0))])
      raise ValueError(f"{owner}: `weight` must be finite and >= 0 (a negative class "
                       f"weight makes the loss unbounded below), got {bad[:10].tolist()}")
  return w.astype(compute_dtype(w))


def soft_targets(owner: str, logits: Any, probs: Any, *, where: Any | None,
                 labels_name: str = "labels"
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks ``[..., V]`` class probabilities against the logits; returns ``(logits,
  probs, valid)`` in ``compute_dtype(logits, probs)`` with rows that do not count zeroed
  (so their inf/NaN cannot reach the value or the gradient)."""
  logits = jnp.asarray(logits)
  probs = jnp.asarray(probs)
  check_floating(owner, "logits", logits)
  if logits.shape[-1] == 0:
    raise ValueError(f"{owner}: `logits` must have at least one class (last axis V >= 1), "
                     f"got shape {logits.shape}")
  if probs.shape != logits.shape:
    raise ValueError(
        f"{owner}: floating `{labels_name}` are class probabilities and must have the "
        f"logits' shape {logits.shape}, got {probs.shape} (class indices must be an "
        f"integer array of shape logits.shape[:-1] = {logits.shape[:-1]})")
  shape = logits.shape[:-1]
  valid = (jnp.ones(shape, jnp.bool_) if where is None
           else as_mask(owner, where, shape))
  dtype = compute_dtype(logits, probs)
  z = jnp.where(valid[..., None], logits.astype(dtype), 0.0)
  q = jnp.where(valid[..., None], probs.astype(dtype), 0.0)
  return z, q, valid


class SoftNll(NamedTuple):
  """Per row of :func:`soft_nll`."""
  nll: jax.Array      # sum_c w_c q_c (-log p_c)
  smooth: jax.Array   # sum_c w_c (-log p_c) / V  (smoothing_term)
  lse: jax.Array      # log sum_c exp(z_c)


def soft_nll(logits: jax.Array, probs: jax.Array,
             class_weight: jax.Array | None = None) -> SoftNll:
  r"""The soft-target cross-entropy terms per row, from a stable log-softmax.

  With ``m = z_t`` the largest logit (``t`` its first index) and
  ``s = log1p(sum_{c != t} exp(z_c - m))`` (``= log sum_c exp(z_c - m)``, with ``log1p``
  so that a confident row's tiny ``s`` keeps its relative precision, as
  :func:`softmax_nll_parts` does), ``-log p_c = s + (m - z_c)``: a sum of two non-negative
  terms, so no cancellation. ``m`` is taken by index (not ``max``), so its derivative
  is exactly ``z_t``'s, ties included. Then::

    nll    = sum_c w_c q_c (-log p_c)       (w_c = 1 without class weights)
    smooth = sum_c w_c (-log p_c) / V

  and torch's ``F.cross_entropy`` with probabilities ``q``, class weights ``w`` and label
  smoothing ``eps`` (targets ``q (1 - eps) + eps / V``) is ``(1 - eps) nll + eps smooth``
  (:func:`combine_token_loss`). A class with ``w_c q_c = 0`` adds exactly 0 even where
  its logit is ``-inf`` (torch: ``0 * inf = NaN``); the derivatives w.r.t. ``z``, ``q``
  and ``w`` are those of the formula.
  """
  dtype = logits.dtype
  top = jnp.argmax(logits, axis=-1)[..., None]
  m = jnp.take_along_axis(logits, top, axis=-1)
  shifted = logits - m
  not_top = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) != top
  s = jnp.log1p(jnp.sum(jnp.where(not_top, jnp.exp(shifted), 0.0), axis=-1,
                        keepdims=True))
  neg_logp = s - shifted
  a = probs if class_weight is None else class_weight * probs
  nll = jnp.sum(zero_safe_mul(a, neg_logp), axis=-1)
  inv_v = jnp.asarray(1.0 / logits.shape[-1], dtype)
  if class_weight is None:
    smooth = jnp.sum(neg_logp * inv_v, axis=-1)
  else:
    smooth = jnp.sum(zero_safe_mul(class_weight * inv_v, neg_logp), axis=-1)
  return SoftNll(nll, smooth, (m + s)[..., 0])


def token_cross_entropy(owner: str, labels_name: str, logits: Any, labels: Any, *,
                        ignore_index: int, label_smoothing: float, z_loss: float,
                        reduction: str, where: Any | None, validate: bool,
                        weight: Any | None = None, allow_soft: bool = False) -> jax.Array:
  """``cross_entropy`` with the caller's name and labels' name in error messages (the
  body of ``cross_entropy``, ``causal_lm_loss`` and ``masked_lm_loss``).

  ``weight``: per-class weights ``[V]`` (:func:`validated_class_weight`). With
  ``allow_soft``, floating ``labels`` are class probabilities of the logits' shape
  (told from class indices by dtype only); otherwise labels must be integers.
  """
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  check_scalar(owner, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
  check_scalar(owner, "z_loss", z_loss, lo=0.0)
  check_bool(owner, "validate", validate)
  eps = None if is_concrete_zero(label_smoothing) else label_smoothing
  zl = None if is_concrete_zero(z_loss) else z_loss
  labels_arr = jnp.asarray(labels)
  if allow_soft and jnp.issubdtype(labels_arr.dtype, jnp.floating):
    check_int(owner, "ignore_index", ignore_index)
    if ignore_index >= 0:
      # torch: "ignore_index is not supported for floating point target"; a negative
      # one (the default -100) is ignored, as there.
      raise ValueError(
          f"{owner}: `ignore_index` ({ignore_index}) is not supported with class-"
          f"probability `{labels_name}` (floating labels); mask tokens with `where`")
    z, q, valid = soft_targets(owner, logits, labels_arr, where=where,
                               labels_name=labels_name)
    w = validated_class_weight(owner, weight, z.shape[-1])
    if w is not None:   # one dtype for all: float64 if any of them is
      dtype = compute_dtype(z, w)
      z, q, w = z.astype(dtype), q.astype(dtype), w.astype(dtype)
    terms = soft_nll(z, q, w)
    loss = combine_token_loss(terms.nll, terms.smooth, terms.lse, valid,
                              label_smoothing=eps, z_loss=zl)
    # torch's soft-target mean divides by the number of tokens, not by the weights.
    return reduce_masked(loss, valid, reduction)

  t = validated_targets(
      owner, logits, labels_arr, ignore_index=ignore_index, where=where,
      validate=validate, labels_name=labels_name)
  w = validated_class_weight(owner, weight, t.logits.shape[-1])
  if w is not None:
    dtype = compute_dtype(t.logits, w)
    t, w = t._replace(logits=t.logits.astype(dtype)), w.astype(dtype)
    if reduction == "mean":
      w, zl = scaled_for_weighted_mean(w, zl)
  log_p, lse = token_log_probs(t)
  w_y = None if w is None else w[t.labels]
  loss = token_loss(t.logits, log_p, lse, t.valid, label_smoothing=eps, z_loss=zl,
                    class_weight=w, target_weight=w_y)
  return reduce_masked(loss, t.valid, reduction, w_y)
