"""Fused linear cross-entropy: the LM-head loss without the ``[tokens, vocab]`` logits.

``fused_linear_cross_entropy(hidden, kernel, labels)`` has the value and the gradients
(hidden, kernel, bias) of ``cross_entropy(hidden @ kernel + bias, labels)`` but walks the
tokens in chunks (a ``lax.fori_loop``), so at most a ``[chunk, V]`` block of logits exists
at any time. The same idea is behind Liger Kernel's FusedLinearCrossEntropy, Apple's Cut
Cross-Entropy (Wijmans et al., 2024) and Levanter's blockwise cross-entropy; here it is pure
``jax.numpy`` + ``jax.custom_vjp``.

Label validation, masking and the per-token loss (label smoothing, z-loss) are
``_common``'s, the same functions ``cross_entropy`` calls, so both decide them in one
place; only the gradient of that loss is written out here (the backward never sees the
logits). Inside ``jax.shard_map`` the loop carries and gradients follow
``jaxopt_llm._shard_map``'s varying-axes rules.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_llm._shard_map import as_varying, tree_varying_axes, varying_axes
from jaxopt_llm._validation import check_bool, check_choice, check_int, check_scalar
from jaxopt_llm.losses._common import (
    REDUCTIONS, check_floating, compute_dtype, is_concrete_zero,
    masked_log_probs, softmax_nll_parts, softmax_probs, token_loss, validated_labels)

# Default chunk: the most tokens whose float32 [C, V] logits block fits in a byte budget,
# rounded down to a multiple of 128 (a power of two below 128). Two such blocks are alive
# at the peak (the logits and their gradient), so the budget bounds the temporary memory.
# The kernel gradient is a sum over chunks of [d, C] @ [C, V] products, each writing and
# adding a whole d x V block, so too few tokens per chunk makes that traffic, not the
# flops, set the speed: on CPU (N=4096, d=512, V=32000 fp32, value_and_grad, process CPU
# time vs the unfused path) 256 tokens measured 1.22x, 384 and 512 tokens 1.13x. 48 MiB
# gives 384 tokens there and keeps the temporary memory under 1/10 of the unfused path's.
# Accelerators get 512 MiB (1024 tokens at V = 128256): their matmuls need the larger
# contraction to run at full speed, and memory there is less scarce.
_CHUNK_BYTES = {"cpu": 48 * 2**20}
_CHUNK_BYTES_ACCELERATOR = 512 * 2**20
_MIN_CHUNK = 16
# XLA:CPU does not accumulate a matmul into its destination, so each chunk's [d, V]
# kernel-gradient product would be a d x V temporary as large as the kernel; on CPU it is
# made in vocabulary blocks of at most this many bytes. GPU matmuls can add into the
# accumulator in place (cuBLAS beta = 1), so there it is one product. Public so it can be
# tuned (and the blocked path tested on small shapes); read at each call.
KERNEL_GRAD_BLOCK_BYTES: dict[str, int] = {"cpu": 16 * 2**20}


def default_chunk_size(num_tokens: int, vocab_size: int, backend: str | None = None) -> int:
  """The ``chunk_size`` that ``chunk_size=None`` picks.

  The most tokens ``C`` with ``C * vocab_size * 4`` bytes (one float32 logits block) at
  most 48 MiB on CPU, 512 MiB on GPU/TPU (``backend``, default
  ``jax.default_backend()``), rounded down to a multiple of 128 (to a power of two
  below 128); at least 16 and at most ``num_tokens``.
  """
  owner = "default_chunk_size"
  check_int(owner, "num_tokens", num_tokens, lo=0)
  check_int(owner, "vocab_size", vocab_size, lo=1)
  if backend is not None and not isinstance(backend, str):
    raise ValueError(f"{owner}: `backend` must be a platform name or None, got {backend!r}")
  backend = jax.default_backend() if backend is None else backend
  budget = _CHUNK_BYTES.get(backend, _CHUNK_BYTES_ACCELERATOR)
  rows = max(budget // (4 * max(vocab_size, 1)), 1)
  chunk = rows // 128 * 128 if rows >= 128 else 2 ** int(math.floor(math.log2(rows)))
  return max(min(max(chunk, _MIN_CHUNK), num_tokens), 1)


class _Static(NamedTuple):
  """Everything the loop's structure depends on (hashable: a nondiff argument)."""
  chunk: int
  reduction: str
  smoothing: bool   # False only for a concrete label_smoothing == 0: the term is not built.
  zloss: bool       # likewise for z_loss.
  softcap: bool
  vocab_block: int  # columns per kernel-gradient product (>= V: one product)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Need:
  """Which input gradients a pass computes (static: a residual without leaves).

  ``axes``: for (hidden, kernel, bias), the shard_map axes each primal varies over; a
  gradient that varies over more (a replicated kernel fed per-device hidden states) is
  summed over the extra axes, which is the transpose of the implicit broadcast.
  """
  hidden: bool
  kernel: bool
  bias: bool
  axes: tuple[frozenset, frozenset, frozenset] = (frozenset(),) * 3
  dtypes: tuple[Any, Any, Any] = (None, None, None)   # gradient dtypes = the inputs'

  @property
  def any(self) -> bool:
    return self.hidden or self.kernel or self.bias


class _Hyper(NamedTuple):
  """Scalars in the compute dtype (float32, or float64 for float64 inputs)."""
  eps: jax.Array    # label smoothing
  zl: jax.Array     # z-loss weight
  cap: jax.Array    # logit soft-cap (unused when _Static.softcap is False)


def _sweep(st: _Static, hidden: jax.Array, kernel: jax.Array, bias: jax.Array | None,
           labels: jax.Array, live: jax.Array, bad: jax.Array, hyper: _Hyper, *,
           loss_mode: str | None, need: _Need, weight: jax.Array | None = None,
           stats: tuple[jax.Array, ...] | None = None) -> dict[str, jax.Array]:
  """One pass over the token chunks.

  Computes per chunk the logits ``z = softcap(h @ W + b)`` (in the compute dtype: float32,
  float64 for float64 inputs) once and from them what is asked: the summed loss
  (``loss_mode="sum"``), per-token losses, logsumexp and label gradients ``p_y - 1``
  (``"tokens"``), and the gradients (``need``) of ``sum_i weight_i * loss_i``. ``stats``
  (per token: the max logit, ``sum_c exp(z_c - max)`` and ``p_y - 1``), when given, is
  reused instead of recomputed. The per-token loss is ``_common.softmax_nll_parts``'
  (exact for tiny losses) on each complete ``[chunk, V]`` block of logits.

  Chunk ``i`` starts at ``min(i * C, N - C)``: when C does not divide N the last chunk
  overlaps the one before, and its rows below ``i * C`` (already done) are masked out. So
  every chunk has the static shape [C, d], with no padded copy of ``hidden``.
  """
  n, d = hidden.shape
  vocab = kernel.shape[1]
  c = st.chunk
  n_chunks = -(-n // c)
  cdt = jnp.result_type(hidden.dtype, kernel.dtype)
  acc = compute_dtype(hidden, kernel, bias)
  w_mat = kernel.astype(cdt)
  b_acc = None if bias is None else bias.astype(acc)
  eps, zl, cap = hyper

  def body(i, carry):
    start = jnp.minimum(i * c, n - c)
    rows = start + jnp.arange(c)
    take = lambda x: lax.dynamic_slice_in_dim(x, start, c)
    fresh = rows >= i * c
    live_c = take(live) & fresh
    y_c = take(labels)
    bad_c = take(bad) & live_c
    # Zeroing rows that do not count keeps their (possibly inf/NaN) hidden states out of
    # the logits and the kernel gradient, where 0 * NaN would otherwise leak in; their
    # logits are then just the bias, finite, and their loss and weight are masked to 0.
    h_c = jnp.where(live_c[:, None], take(hidden).astype(cdt), 0)
    u = jnp.dot(h_c, w_mat, preferred_element_type=acc)
    if b_acc is not None:
      u = u + b_acc
    z = cap * jnp.tanh(u / cap) if st.softcap else u
    if stats is None:
      parts = softmax_nll_parts(z, y_c)
      top, total, label_grad = parts.top, parts.total, parts.label_grad
    else:
      top, total, label_grad = (take(x) for x in stats)
    lse_c = top + jnp.log(total)
    out = dict(carry)

    if loss_mode is not None:
      # cross_entropy's per-token loss, row by row.
      log_p = masked_log_probs(parts.nll, live_c, bad_c)
      loss = token_loss(z, log_p, lse_c, live_c,
                        label_smoothing=eps if st.smoothing else None,
                        z_loss=zl if st.zloss else None)
      if loss_mode == "sum":
        out["loss"] = carry["loss"] + jnp.sum(loss)
      else:
        out["loss"] = _write_rows(carry["loss"], loss, start, fresh)
        for k, x in (("top", top), ("total", total), ("label_grad", label_grad)):
          out[k] = _write_rows(carry[k], x, start, fresh)

    if need.any:
      # dloss/dz = (a + eps + 2 zl lse) softmax(z) - a onehot(y) - eps / V, a = 1 - eps.
      # At the label that is a (p_y - 1) + (eps + 2 zl lse) p_y with p_y - 1 =
      # label_grad, exact where p_y ~ 1 (as cross_entropy's). A bad (out-of-range) label
      # has a = NaN: its row's gradient is NaN, like its loss, exactly as cross_entropy.
      w_c = jnp.where(live_c, take(weight), 0.0)
      one = jnp.ones((), acc)
      a = jnp.where(bad_c, jnp.nan, (one - eps) if st.smoothing else one)
      extra = eps if st.smoothing else jnp.zeros((), acc)
      if st.zloss:
        extra = extra + 2.0 * (zl * lse_c)
      p = softmax_probs(z, top, total)
      onehot = lax.broadcasted_iota(jnp.int32, z.shape, 1) == y_c[:, None]
      at_label = w_c * (a * label_grad + extra * (1.0 + label_grad))
      g = jnp.where(onehot, at_label[:, None], p * (w_c * (a + extra))[:, None])
      if st.smoothing:
        g = g - (w_c * eps / vocab)[:, None]
      if st.softcap:   # d(c tanh(u / c))/du = 1 - tanh(u / c)^2
        g = g * (1.0 - jnp.square(z / cap))
      g_c = g.astype(cdt)
      if need.hidden:
        dh_c = jnp.dot(g_c, w_mat.T, preferred_element_type=jnp.float32)
        out["dh"] = _write_rows(carry["dh"], dh_c.astype(hidden.dtype), start, fresh)
      if need.kernel:
        out["dw"] = _add_kernel_grad(carry["dw"], h_c, g_c, st.vocab_block)
      if need.bias:
        out["db"] = carry["db"] + jnp.sum(g, axis=0)
    return out

  init: dict[str, jax.Array] = {}
  if loss_mode == "sum":
    init["loss"] = jnp.zeros((), acc)
  elif loss_mode == "tokens":
    init["loss"] = jnp.zeros((n,), acc)
    for k in ("top", "total", "label_grad"):
      init[k] = jnp.zeros((n,), acc)
  if need.hidden:
    init["dh"] = jnp.zeros((n, d), hidden.dtype)
  if need.kernel:
    init["dw"] = jnp.zeros((d, vocab), acc)
  if need.bias:
    init["db"] = jnp.zeros((vocab,), acc)
  # Inside shard_map a loop carry must already vary over the axes its updates vary
  # over (the per-device hidden states), or lax.fori_loop rejects it.
  varying = tree_varying_axes(hidden, kernel, bias, labels, live, bad, hyper, weight, stats)
  return lax.fori_loop(0, n_chunks, body, as_varying(init, varying))


def _add_kernel_grad(acc: jax.Array, h_c: jax.Array, g_c: jax.Array,
                     block: int) -> jax.Array:
  """``acc + h_c^T @ g_c`` ([d, V], acc's dtype), in vocabulary blocks of ``block`` columns.

  Blocks overlap at the end like the token chunks: the last starts at ``V - block`` and
  only its columns not yet done are added.
  """
  def product(g):
    return lax.dot_general(h_c, g, (((0,), (0,)), ((), ())),
                           preferred_element_type=acc.dtype)

  vocab = acc.shape[1]
  if block >= vocab:
    return acc + product(g_c)

  def body(j, acc):
    start = jnp.minimum(j * block, vocab - block)
    fresh = start + jnp.arange(block) >= j * block
    old = lax.dynamic_slice_in_dim(acc, start, block, axis=1)
    new = old + product(lax.dynamic_slice_in_dim(g_c, start, block, axis=1))
    return lax.dynamic_update_slice_in_dim(acc, jnp.where(fresh, new, old), start, axis=1)

  return lax.fori_loop(0, -(-vocab // block), body, acc)


def _write_rows(buf: jax.Array, rows: jax.Array, start: jax.Array,
                fresh: jax.Array) -> jax.Array:
  """Writes the fresh rows of a chunk into ``buf`` at ``start``, keeping the others."""
  old = lax.dynamic_slice_in_dim(buf, start, rows.shape[0])
  mask = fresh.reshape(fresh.shape + (1,) * (rows.ndim - 1))
  return lax.dynamic_update_slice_in_dim(buf, jnp.where(mask, rows, old), start, axis=0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(st: _Static, hidden, kernel, bias, labels, live, bad, denom, hyper):
  """The loss alone: what a call that is not differentiated runs."""
  if st.reduction == "none":
    return _sweep(st, hidden, kernel, bias, labels, live, bad, hyper, loss_mode="tokens",
                  need=_Need(False, False, False))["loss"]
  total = _sweep(st, hidden, kernel, bias, labels, live, bad, hyper, loss_mode="sum",
                 need=_Need(False, False, False))["loss"]
  return total / denom


def _fused_fwd(st, hidden, kernel, bias, labels, live, bad, denom, hyper):
  # symbolic_zeros=True: each leaf arrives as CustomVJPPrimal(value, perturbed), which tells
  # which gradients are wanted; e.g. a frozen kernel skips the d x V matmul entirely.
  need = _Need(hidden.perturbed, kernel.perturbed, bias is not None and bias.perturbed)
  if any(x.perturbed for x in (denom, *hyper)):
    raise NotImplementedError(
        "fused_linear_cross_entropy: gradients with respect to label_smoothing, z_loss "
        "or logit_soft_cap are not implemented (only hidden, kernel and bias)")
  value = lambda x: None if x is None else x.value
  hidden, kernel, bias = value(hidden), value(kernel), value(bias)
  labels, live, bad, denom = value(labels), value(live), value(bad), value(denom)
  hyper = jax.tree.map(value, hyper)
  need = dataclasses.replace(
      need,
      axes=(varying_axes(hidden), varying_axes(kernel),
            frozenset() if bias is None else varying_axes(bias)),
      dtypes=(hidden.dtype, kernel.dtype, None if bias is None else bias.dtype))
  if st.reduction == "none":
    # The cotangent is per token and unknown yet: keep O(N) residuals (the softmax stats)
    # and recompute the logits chunk by chunk in the backward pass.
    out = _sweep(st, hidden, kernel, bias, labels, live, bad, hyper, loss_mode="tokens",
                 need=_Need(False, False, False))
    return out["loss"], (need, hidden, kernel, bias, labels, live, bad, hyper,
                         (out["top"], out["total"], out["label_grad"]))
  # A scalar loss: its gradients differ from the final ones only by the scalar cotangent,
  # so compute them now from the same logits chunk that gives the loss (3 matmuls per
  # chunk, as the unfused path, instead of 4 with a recompute) and keep them, input-sized,
  # as the residuals.
  weight = jnp.broadcast_to(1.0 / denom, live.shape)
  out = _sweep(st, hidden, kernel, bias, labels, live, bad, hyper, loss_mode="sum",
               need=need, weight=weight)
  # Stored in the inputs' dtypes: for bf16 that halves the residual memory; the cotangent
  # of a training loss is 1.0, so the backward's rescale adds no rounding.
  grads = (out["dh"] if need.hidden else None,
           out["dw"].astype(kernel.dtype) if need.kernel else None,
           out["db"].astype(bias.dtype) if need.bias else None)
  return out["loss"] / denom, (need, grads)


def _finish(x: jax.Array | None, dtype, axes: frozenset,
            g: jax.Array | None = None) -> jax.Array | None:
  """Scales a gradient by ``g`` (in float32 or wider), sums it over extra shard_map axes,
  casts it to ``dtype``."""
  if x is None:
    return None
  x = x.astype(compute_dtype(x))
  if g is not None:
    x = g * x
  extra = varying_axes(x) - axes
  if extra:
    x = lax.psum(x, tuple(sorted(extra)))
  return x.astype(dtype)


def _fused_bwd(st, res, ct):
  need = res[0]
  if isinstance(ct, jax.custom_derivatives.SymbolicZero) or not need.any:
    return (None,) * 8
  if st.reduction == "none":
    _, hidden, kernel, bias, labels, live, bad, hyper, stats = res
    out = _sweep(st, hidden, kernel, bias, labels, live, bad, hyper, loss_mode=None,
                 need=need, weight=ct.astype(compute_dtype(ct, stats[0])), stats=stats)
    grads, g = (out.get("dh"), out.get("dw"), out.get("db")), None
  else:
    grads, g = res[1], ct.astype(compute_dtype(ct))
  dh, dw, db = (_finish(x, dt, ax, g)
                for x, dt, ax in zip(grads, need.dtypes, need.axes))
  return dh, dw, db, None, None, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def fused_linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    logit_soft_cap: float | None = None,
    where: jax.typing.ArrayLike | None = None,
    validate: bool = False,
) -> jax.Array:
  r"""``cross_entropy(hidden @ kernel + bias, labels)`` without the ``[N, V]`` logits.

  With ``u = hidden @ kernel + bias`` and logits ``z = u`` (or, with a soft-cap ``c``,
  ``z = c * tanh(u / c)`` as in Gemma 2), each token's loss is that of
  :func:`~jaxopt_llm.losses.cross_entropy`::

    loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_c z_c) + z_loss * lse**2

  with the same masking (``ignore_index``, ``where``), reductions (PyTorch's ``mean``
  over counted tokens; 0.0 and zero gradients when none counts or the batch is empty),
  bad-input behaviour (out-of-range labels: ``ValueError`` eagerly; under jit a NaN
  loss *and* NaN gradients, or a checkify check with ``validate=True``) and numerics
  (``_common.softmax_nll`` on each ``[chunk, V]`` block: a tiny loss keeps its relative
  precision, e.g. 8.4045e-6 for logits ``[100, 88, 87]``, and so does the label entry
  ``p_y - 1`` of its gradient; at logits up to the bf16 maximum the loss is ``+inf``
  where the true value exceeds float32, never NaN, and the gradients stay finite).
  Value and gradients equal the unfused computation up to float rounding.

  How: the tokens are processed ``chunk_size`` at a time in a ``lax.fori_loop``; only a
  ``[chunk_size, V]`` block of float32 logits (and its gradient) is alive at once. The
  backward is a ``jax.custom_vjp``:

  * ``reduction="mean"`` / ``"sum"`` (a scalar loss): when the call is differentiated,
    the forward pass computes, from each logits block, both the loss and its
    contributions to the gradients ``dL/dhidden``, ``dL/dkernel``, ``dL/dbias`` (Liger
    Kernel's scheme); the backward only scales them by the incoming cotangent. Same
    three matmuls as the unfused path; residuals are input-sized, never ``N x V``.
    Gradients of inputs that are not differentiated (say a frozen ``kernel``) are not
    computed. A call that is not differentiated computes only the loss.
  * ``reduction="none"``: the cotangent is per token, so the forward keeps the per-token
    logsumexp (O(N)) and the backward recomputes each logits block (one extra matmul).

  Matmuls run in the inputs' dtype with float32 accumulation
  (``preferred_element_type``); the softmax, the loss and the ``kernel``/``bias``
  gradient accumulators are float32 (all float64 when an input is float64, under
  ``jax_enable_x64``), and gradients are returned in the inputs' dtypes. Inputs whose
  products ``hidden @ kernel`` overflow float32 give inf/NaN logits, as any float32
  matmul would.
  Differentiable in reverse mode, also twice (reverse-over-reverse, and forward-over-
  reverse Hessian-vector products); plain forward mode (``jvp`` of the loss) is not
  defined for a ``custom_vjp``. Gradients with respect to ``label_smoothing``,
  ``z_loss`` or ``logit_soft_cap`` raise ``NotImplementedError`` (never a silent zero).

  Several devices: the loop slices the token axis, so under ``jit`` with a token-sharded
  ``hidden`` XLA would gather it onto every device (with ``Auto`` mesh axes; with
  ``Explicit`` axes JAX rejects the slice). Call it inside ``jax.shard_map`` instead,
  per device with ``reduction="sum"``, and divide ``lax.psum`` of the sums by
  ``lax.psum`` of the counted tokens; gradients of replicated ``kernel`` / ``bias`` are
  then summed over the devices by the backward pass.

  Memory: besides inputs and gradients, about one or two float32 ``[chunk_size, V]``
  blocks, plus a float32 ``[d, V]`` accumulator when ``kernel`` is not float32 (on CPU
  also a <= 16 MiB block of it). Measured (CPU, N=4096, d=512, V=32000 fp32,
  ``value_and_grad``): about 1/10 of the unfused path's temporary memory.

  Args:
    hidden: ``[..., d]`` floating features (the last hidden states).
    kernel: ``[d, V]`` output projection (Flax ``Dense`` layout; for a tied embedding
      table ``E`` of shape ``[V, d]`` pass ``E.T``).
    labels: ``[...]`` integer targets, ``hidden.shape[:-1]``.
    bias: optional ``[V]`` bias.
    ignore_index: label value of tokens that do not count.
    label_smoothing: ``eps`` in [0, 1].
    z_loss: weight (>= 0) of the PaLM z-loss ``lse**2``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    chunk_size: tokens per chunk (an int >= 1; need not divide the number of tokens).
      ``None`` picks :func:`default_chunk_size`: the most tokens (a multiple of 128)
      whose float32 ``[chunk, V]`` block is at most 48 MiB on CPU or 512 MiB on GPU/TPU
      (at least 16, at most N); 384 at V = 32000 on CPU, 1024 at V = 128256 on GPU.
    logit_soft_cap: optional ``c > 0``; logits become ``c * tanh(z / c)``.
    where: optional boolean (or 0/1) mask of ``labels.shape``; False is like
      ``ignore_index``.
    validate: as in :func:`~jaxopt_llm.losses.cross_entropy` (checkify check for
      out-of-range labels under jit).

  Returns:
    A scalar, or ``labels.shape`` for ``reduction="none"``; float32 (float64 when an
    input is float64).

  Raises:
    ValueError: naming the argument, for a bad ``reduction``, ``label_smoothing``,
      ``z_loss``, ``chunk_size``, ``logit_soft_cap``, ``validate``, dtypes or shapes of
      ``hidden`` / ``kernel`` / ``bias`` / ``labels`` / ``where``, or (eagerly)
      out-of-range labels.
    TypeError: naming the argument, for a string or other non-number hyperparameter.
  """
  owner = "fused_linear_cross_entropy"
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  check_scalar(owner, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
  check_scalar(owner, "z_loss", z_loss, lo=0.0)
  if chunk_size is not None:
    check_int(owner, "chunk_size", chunk_size, lo=1)
  if logit_soft_cap is not None:
    check_scalar(owner, "logit_soft_cap", logit_soft_cap, lo=0.0, lo_open=True)
  check_bool(owner, "validate", validate)

  hidden = jnp.asarray(hidden)
  kernel = jnp.asarray(kernel)
  check_floating(owner, "hidden", hidden)
  check_floating(owner, "kernel", kernel)
  if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1] or kernel.shape[1] < 1:
    raise ValueError(
        f"{owner}: `kernel` must have shape [d, V] = [{hidden.shape[-1]}, V] with V >= 1 "
        f"(d = hidden.shape[-1]), got {kernel.shape}")
  vocab = kernel.shape[1]
  if bias is not None:
    bias = jnp.asarray(bias)
    check_floating(owner, "bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(
          f"{owner}: `bias` must have shape [V] = ({vocab},), got {bias.shape}")
  batch_shape = hidden.shape[:-1]
  live, safe_labels, bad = validated_labels(
      owner, labels, batch_shape, vocab, ignore_index=ignore_index, where=where,
      validate=validate, labels_name="labels", shape_name="hidden.shape[:-1]")

  acc = compute_dtype(hidden, kernel, bias)
  n = math.prod(batch_shape)
  if n == 0:
    return jnp.zeros(batch_shape if reduction == "none" else (), acc)
  backend = jax.default_backend()
  chunk = default_chunk_size(n, vocab, backend) if chunk_size is None else min(chunk_size, n)
  block_bytes = KERNEL_GRAD_BLOCK_BYTES.get(backend)
  vocab_block = (vocab if block_bytes is None
                 else max(block_bytes // (4 * max(kernel.shape[0], 1)), 1))

  st = _Static(
      chunk=chunk, reduction=reduction,
      smoothing=not is_concrete_zero(label_smoothing),
      zloss=not is_concrete_zero(z_loss),
      softcap=logit_soft_cap is not None, vocab_block=min(vocab_block, vocab))
  hyper = _Hyper(jnp.asarray(label_smoothing, acc), jnp.asarray(z_loss, acc),
                 jnp.asarray(1.0 if logit_soft_cap is None else logit_soft_cap, acc))
  live = live.reshape(n)
  if reduction == "mean":
    # max(count, 1): an all-ignored batch gives 0.0 with zero gradients (as
    # reduce_masked).
    denom = jnp.maximum(jnp.sum(live, dtype=acc), 1.0)
  else:
    denom = jnp.ones((), acc)
  out = _fused(st, hidden.reshape(n, hidden.shape[-1]), kernel, bias,
               safe_labels.reshape(n), live, bad.reshape(n), denom, hyper)
  return out.reshape(batch_shape) if reduction == "none" else out
