"""Contrastive losses for two-tower (dual-encoder) models: InfoNCE and CLIP.

All similarities are cosine similarities of L2-normalised features (float32, float64 for
float64 inputs), computed by :func:`l2_normalize`, which never divides by zero: a zero
vector normalises to zero, so its similarity to everything is 0 and the loss and its
gradients stay finite. Each row's ``-log softmax`` at its positive is
``_common.softmax_nll``, as in ``cross_entropy``: a well-separated pair's tiny loss keeps
its relative precision (at CLIP's logit scale 100 the logits are ~100, and
``logsumexp - z_pos`` would keep only their rounding). An empty batch gives 0.0.

``in_batch_info_nce`` and ``clip_loss`` use the other examples of the batch as negatives.
With ``axis_name`` (inside ``jax.shard_map`` or ``jax.pmap``) the negatives are gathered
from every device along that axis (``lax.all_gather``, whose transpose sends each
device's share of the gradient back to the device that produced the features), so the
loss equals the single-device loss on the concatenated global batch.
"""
from __future__ import annotations

import math
from typing import Any, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxopt_llm._validation import check_bool, check_choice, check_scalar
from jaxopt_llm.losses._common import (
    REDUCTIONS, compute_dtype, softmax_nll)
# CLIP (Radford et al., 2021, sec. 2.5): the logit scale is a learned log-parameter,
# initialised to log(1 / 0.07) and clipped so the scale never exceeds 100.
CLIP_INIT_LOGIT_SCALE = math.log(1.0 / 0.07)
CLIP_MAX_LOGIT_SCALE = math.log(100.0)
# Similarity matmuls run at full float32 precision: a TF32/bf16 pass on an accelerator
# would put ~1e-3 relative error on similarities that are then multiplied by 1/0.07.
_PRECISION = lax.Precision.HIGHEST


def _check_features(owner: str, name: str, x: Any,
                    ndim: int | tuple[int, ...]) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{owner}: `{name}` must be a floating array, got dtype {x.dtype}")
  ndims = (ndim,) if isinstance(ndim, int) else ndim
  if x.ndim not in ndims:
    want = " or ".join(f"{n}-D" for n in ndims)
    raise ValueError(f"{owner}: `{name}` must be {want}, got shape {x.shape}")
  return x


def l2_normalize(x: jax.typing.ArrayLike, *, axis: int = -1,
                 eps: float = 1e-8) -> jax.Array:
  r"""``x / max(||x||, eps)`` along ``axis`` (in float32 or wider), safe at 0.

  Computed as ``(x / s) * rsqrt(max(sum((x / s)**2), (eps / s)**2))`` with ``s`` the
  power of two of the largest ``|x_i|`` (held constant for the gradient): at ``x = 0``
  the ``max`` picks the constant, so both the value (0) and the gradient (``1 / eps``)
  are finite, and norms anywhere in the float range are exact (an unscaled
  ``sum(x**2)`` overflows above ~1.8e19 in float32, and the bf16 maximum 3.4e38 is a
  valid feature value). For ``||x|| >= eps`` this is ``torch.nn.functional.normalize(x,
  eps=eps)``, except that for entries below ``eps / 1.8e19`` in float32 (5e-28 at the
  default ``eps``) the result is 0 instead of ``x / eps`` (< 1e-19).

  Args:
    x: floating array.
    axis: the feature axis.
    eps: smallest norm divided by (> 0).

  Returns:
    array of ``x.shape``, float32 (float64 for float64 ``x``).
  """
  owner = "l2_normalize"
  check_scalar(owner, "eps", eps, lo=0.0, lo_open=True)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{owner}: `x` must be a floating array, got dtype {x.dtype}")
  if x.ndim == 0:
    raise ValueError(f"{owner}: `x` must have at least 1 dimension, got a scalar")
  if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not (
      -x.ndim <= axis < x.ndim):
    raise ValueError(f"{owner}: `axis` must be an integer in [-{x.ndim}, {x.ndim}), got "
                     f"{axis!r}")
  dtype = compute_dtype(x)
  x = x.astype(dtype)
  # x / max(||x||, eps) is invariant to scaling x and eps by the same s > 0: with s the
  # power of two of the largest |x_i| (a constant for autodiff; exact to divide by, and
  # kept where 1 / s is a normal float, which XLA:CPU would otherwise flush to 0),
  # sum((x / s)**2) is in [1/4, 16 n], so norms anywhere in the float range neither
  # overflow (||x|| > 1.8e19 would, squared, in float32) nor underflow.
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  info = jnp.finfo(dtype)
  _, exponent = jnp.frexp(jnp.where(jnp.isfinite(amax), amax, 0.0))
  exponent = jnp.clip(exponent, info.minexp + 1, info.maxexp - 2)
  s = lax.stop_gradient(jnp.ldexp(jnp.ones((), dtype), exponent))
  xs = x / s
  sq = jnp.sum(jnp.square(xs), axis=axis, keepdims=True)
  return xs * lax.rsqrt(jnp.maximum(sq, jnp.square(jnp.asarray(eps, dtype) / s)))


def pairwise_cosine_similarity(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, *,
                               eps: float = 1e-8) -> jax.Array:
  r"""Cosine similarity of every row of ``a`` with every row of ``b``:
  ``S_ij = <a_i, b_j> / (||a_i|| ||b_j||)``.

  ``a`` is ``[N, D]`` and ``b`` is ``[M, D]``; the result is float32 (float64 for
  float64 inputs) ``[N, M]`` (the
  similarity matrix of the contrastive losses). Each row is normalised by
  :func:`l2_normalize` (so a zero row has similarity 0 to everything, never NaN). Not
  ``optax.losses.cosine_similarity(predictions, targets)``, which compares matched rows
  (``[..., D]`` with ``[..., D]`` gives ``[...]``): that is ``jnp.sum(l2_normalize(a) *
  l2_normalize(b), -1)`` here.
  """
  owner = "pairwise_cosine_similarity"
  check_scalar(owner, "eps", eps, lo=0.0, lo_open=True)
  a = _check_features(owner, "a", a, 2)
  b = _check_features(owner, "b", b, 2)
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(f"{owner}: `b` must have feature size {a.shape[-1]}, got {b.shape}")
  return jnp.matmul(l2_normalize(a, eps=eps), l2_normalize(b, eps=eps).T,
                    precision=_PRECISION)


def _reduce_rows(losses: jax.Array, reduction: str) -> jax.Array:
  if reduction == "none":
    return losses
  if reduction == "sum":
    return jnp.sum(losses)
  # max(B, 1): an empty batch has mean 0.0 (zero gradient), not 0/0.
  return jnp.sum(losses) / max(losses.shape[0], 1)


def _row_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``-log softmax(logits)[i, targets[i]]`` per row (``_common.softmax_nll``)."""
  return softmax_nll(logits, targets)[0]


def info_nce(
    query: jax.typing.ArrayLike,
    positive: jax.typing.ArrayLike,
    negatives: jax.typing.ArrayLike,
    *,
    temperature: float | jax.Array = 0.07,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> jax.Array:
  r"""InfoNCE with explicit negatives (van den Oord et al., 2018, "Representation
  Learning with Contrastive Predictive Coding", eq. 4).

  With cosine similarities ``s(u, v)`` and ``tau = temperature``, for query ``i``::

    loss_i = -log( exp(s(q_i, p_i) / tau)
                   / (exp(s(q_i, p_i) / tau) + sum_k exp(s(q_i, n_ik) / tau)) )

  i.e. cross-entropy with the positive as class 0 of ``K + 1`` classes. Negatives come in
  two layouts:

  * ``[B, K, D]``: ``K`` negatives per query (e.g. mined hard negatives); query ``i`` sees
    only ``negatives[i]``.
  * ``[K, D]``: one shared pool that every query sees (e.g. a memory bank / queue).

  The other positives are *not* negatives here; for in-batch negatives use
  :func:`in_batch_info_nce`.

  Args:
    query: ``[B, D]``.
    positive: ``[B, D]``, row ``i`` is the positive of query ``i``.
    negatives: ``[B, K, D]`` per query or ``[K, D]`` shared (``K`` may be 0).
    temperature: ``tau > 0`` (a float or a traced/learnable scalar).
    reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (shape ``[B]``).
    eps: the normalisation floor of :func:`l2_normalize`.

  Returns:
    scalar, or ``[B]`` for ``reduction="none"`` (float32; float64 for float64 inputs).
    An empty batch gives 0.0 (``"mean"``).
  """
  owner = "info_nce"
  check_scalar(owner, "temperature", temperature, lo=0.0, lo_open=True)
  check_scalar(owner, "eps", eps, lo=0.0, lo_open=True)
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  query = _check_features(owner, "query", query, 2)
  positive = _check_features(owner, "positive", positive, 2)
  negatives = _check_features(owner, "negatives", negatives, (2, 3))
  if positive.shape != query.shape:
    raise ValueError(f"{owner}: `positive` must have the shape of `query` {query.shape}, "
                     f"got {positive.shape}")
  batch, dim = query.shape
  if negatives.shape[-1] != dim or (negatives.ndim == 3 and negatives.shape[0] != batch):
    raise ValueError(f"{owner}: `negatives` must be [{batch}, K, {dim}] or [K, {dim}], "
                     f"got {negatives.shape}")
  q = l2_normalize(query, eps=eps)
  p = l2_normalize(positive, eps=eps)
  n = l2_normalize(negatives, eps=eps)
  pos = jnp.sum(q * p, axis=-1, keepdims=True)
  if n.ndim == 3:
    neg = jnp.einsum("bd,bkd->bk", q, n, precision=_PRECISION)
  else:
    neg = jnp.matmul(q, n.T, precision=_PRECISION)
  logits = jnp.concatenate([pos, neg], axis=-1) / jnp.asarray(temperature, q.dtype)
  losses = _row_nll(logits, jnp.zeros((batch,), jnp.int32))
  return _reduce_rows(losses, reduction)


def _in_batch_ce(a: jax.Array, b: jax.Array, scale: jax.Array, symmetric: bool,
                 axis_name: Hashable | None) -> jax.Array:
  """Mean over the (global) batch of CE(scale * a_i . b_j, target j = i)."""
  n_local = a.shape[0]
  if n_local == 0:   # equal shards: every device's batch is empty; no class to normalise
    return jnp.zeros((), a.dtype)
  if axis_name is None:
    a_all, b_all, offset, n_global = a, b, 0, n_local
  else:
    # tiled: [n_devices * n_local, D], device d's rows at [d * n_local, (d+1) * n_local).
    # all_gather is differentiable; its transpose (psum_scatter) routes every device's
    # cotangent for a gathered row back to the row's owner.
    b_all = lax.all_gather(b, axis_name, tiled=True)
    a_all = lax.all_gather(a, axis_name, tiled=True) if symmetric else None
    offset = lax.axis_index(axis_name) * n_local
    n_global = b_all.shape[0]
  # Row i of this device's block is example offset + i of the global batch, so its
  # positive sits at column offset + i: the diagonal of the device's row block.
  targets = offset + jnp.arange(n_local)

  def ce_sum(x, y_all):
    logits = scale * jnp.matmul(x, y_all.T, precision=_PRECISION)
    return jnp.sum(_row_nll(logits, targets))

  total = ce_sum(a, b_all)
  if symmetric:
    total = 0.5 * (total + ce_sum(b, a_all))
  if axis_name is not None:
    total = lax.psum(total, axis_name)
  # max(n, 1): an empty batch gives 0.0 with zero gradient, not 0/0 (cross_entropy's rule).
  return total / max(n_global, 1)


def _check_pair(owner: str, a: Any, b: Any) -> tuple[jax.Array, jax.Array]:
  a = _check_features(owner, "a", a, 2)
  b = _check_features(owner, "b", b, 2)
  if a.shape != b.shape:
    raise ValueError(f"{owner}: `b` must have the shape of `a` {a.shape}, got {b.shape}")
  return a, b


def in_batch_info_nce(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    *,
    temperature: float | jax.Array = 0.07,
    symmetric: bool = False,
    axis_name: Hashable | None = None,
    eps: float = 1e-8,
) -> jax.Array:
  r"""InfoNCE with in-batch negatives (SimCLR's NT-Xent for two towers; Chen et al.,
  2020, "A Simple Framework for Contrastive Learning of Visual Representations";
  van den Oord et al., 2018).

  ``(a_i, b_i)`` are positive pairs and every other ``b_j`` of the batch is a negative
  for ``a_i``. With cosine similarities ``S_ij = s(a_i, b_j)`` and ``tau =
  temperature``::

    loss_a->b = mean_i [ logsumexp_j(S_ij / tau) - S_ii / tau ]
    loss      = loss_a->b                                   (symmetric=False)
              = (loss_a->b + loss_b->a) / 2                 (symmetric=True)

  where ``loss_b->a`` uses ``S.T``. This is ``torch.nn.functional.cross_entropy(S / tau,
  arange(B))`` (and its transpose).

  Global negatives: with ``axis_name``, call this inside ``jax.shard_map`` or
  ``jax.pmap`` with each device holding an equal-size shard of ``a`` and ``b``. ``b``
  (and ``a`` if symmetric) is all-gathered along ``axis_name`` (which may also be a
  tuple of mesh axes), device ``d``'s positives sit at columns ``d * B_local + i`` (the
  diagonal offset by the device index), and the per-device sums are ``psum``-ed and
  divided by the global batch size: every device returns the same value, the
  single-device loss on the concatenated batch. Gradients flow through the gather.

  * ``jax.shard_map`` (varying-axis checking on, the default): the loss is replicated,
    so use ``out_specs=P()``; ``jax.grad`` inside or outside the ``shard_map`` gives the
    exact gradient of the global loss.
  * ``jax.pmap``: as for any ``psum``-ed loss under ``pmap``, ``jax.grad`` inside sees
    the global loss once per device, so per-device gradients w.r.t. local *inputs* are
    ``n_devices`` times the global ones; the usual ``lax.pmean`` of parameter gradients
    across devices then gives exactly the gradient of the global loss.

  Args:
    a: ``[B, D]`` features of the first tower (this device's shard with ``axis_name``).
    b: ``[B, D]`` features of the second tower.
    temperature: ``tau > 0`` (float or traced/learnable scalar).
    symmetric: average the a->b and b->a losses (CLIP-style).
    axis_name: mesh/pmap axis (or tuple of axes) to gather negatives over; None for the
      local batch only.
    eps: the normalisation floor of :func:`l2_normalize`.

  Returns:
    A scalar, float32 (float64 for float64 inputs); 0.0 for an empty batch.
  """
  owner = "in_batch_info_nce"
  check_scalar(owner, "temperature", temperature, lo=0.0, lo_open=True)
  check_scalar(owner, "eps", eps, lo=0.0, lo_open=True)
  check_bool(owner, "symmetric", symmetric)
  a, b = _check_pair(owner, a, b)
  a, b = l2_normalize(a, eps=eps), l2_normalize(b, eps=eps)
  scale = 1.0 / jnp.asarray(temperature, a.dtype)
  return _in_batch_ce(a, b, scale, bool(symmetric), axis_name)


def clip_loss(
    a: jax.typing.ArrayLike,
    b: jax.typing.ArrayLike,
    logit_scale: float | jax.Array = CLIP_INIT_LOGIT_SCALE,
    *,
    max_logit_scale: float = CLIP_MAX_LOGIT_SCALE,
    axis_name: Hashable | None = None,
    eps: float = 1e-8,
) -> jax.Array:
  r"""CLIP's symmetric contrastive loss (Radford et al., 2021, "Learning Transferable
  Visual Models From Natural Language Supervision", fig. 3), as open_clip's ``ClipLoss``.

  ``logit_scale`` is the learnable *log* of the inverse temperature (CLIP initialises it
  to ``log(1 / 0.07)``, :data:`CLIP_INIT_LOGIT_SCALE`). With ``S_ij`` the cosine
  similarity of ``a_i`` and ``b_j``::

    t    = exp(min(logit_scale, max_logit_scale))            # <= 100 by default
    loss = ( CE(t * S, arange(B)) + CE(t * S.T, arange(B)) ) / 2

  Equal to ``in_batch_info_nce(a, b, temperature=1 / t, symmetric=True)``; ``axis_name``
  gathers global negatives the same way (open_clip's ``gather_with_grad=True,
  local_loss=True``, averaged over devices).

  The clamp is applied in the forward pass, with ``torch.clamp``'s gradient: 0 while
  ``logit_scale`` is above ``max_logit_scale``, the full one at and below it. open_clip
  also clamps the parameter itself in place after each optimizer step (so it can come
  back down); do the same by projecting it after the update, e.g.
  ``params["logit_scale"] = jnp.minimum(params["logit_scale"], math.log(100))``.

  Args:
    a: ``[B, D]`` first-tower features (e.g. images); need not be normalised.
    b: ``[B, D]`` second-tower features (e.g. texts).
    logit_scale: the log-scale parameter (scalar, usually traced).
    max_logit_scale: clamp (finite), default ``log(100)``.
    axis_name: as in :func:`in_batch_info_nce`.
    eps: the normalisation floor of :func:`l2_normalize`.

  Returns:
    A scalar, float32 (float64 for float64 inputs); 0.0 for an empty batch.
  """
  owner = "clip_loss"
  check_scalar(owner, "logit_scale", logit_scale)
  check_scalar(owner, "max_logit_scale", max_logit_scale)
  check_scalar(owner, "eps", eps, lo=0.0, lo_open=True)
  a, b = _check_pair(owner, a, b)
  logit_scale = jnp.asarray(logit_scale)
  logit_scale = logit_scale.astype(compute_dtype(a, b, logit_scale))
  # where, not minimum: exactly at the clamp (where open_clip's in-place clamp leaves the
  # parameter) the gradient is the full one, as torch.clamp's, not minimum's half.
  scale = jnp.exp(jnp.where(logit_scale > max_logit_scale, max_logit_scale, logit_scale))
  a, b = l2_normalize(a, eps=eps), l2_normalize(b, eps=eps)
  return _in_batch_ce(a, b, scale, True, axis_name)
