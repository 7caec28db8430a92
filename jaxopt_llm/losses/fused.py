"""Fused linear cross-entropy: the LM-head loss without the ``[tokens, vocab]`` logits.

``fused_linear_cross_entropy(hidden, kernel, labels)`` has the value and the gradients
(hidden, kernel, bias) of ``cross_entropy(hidden @ kernel + bias, labels)`` but walks the
logits in ``[chunk, block]`` tiles (tokens x vocabulary columns), so neither the
``[N, V]`` logits nor a float32 ``[d, V]`` kernel-gradient accumulator ever exists. The
scheme is Apple's Cut Cross-Entropy (Wijmans et al., 2024, "Cut Your Losses in
Large-Vocabulary Language Models"): the forward pass is an online logsumexp across
vocabulary blocks (per token: the running max, the sum of the other classes' exponentials,
the label's logit, the smoothing sum), and the backward pass recomputes each vocabulary
block's logits and finishes that block's kernel gradient in one matmul with float32
accumulation (``preferred_element_type``), written once, in the kernel's dtype, straight
into the gradient. Pure ``jax.numpy`` + ``jax.custom_vjp``.

Label validation and masking are ``_common``'s (as ``cross_entropy``'s), and so is the
per-token loss (``_common.combine_token_loss``) and its reduction; only the online
statistics and the gradient of that loss are written out here (the backward never sees
the logits). Inside ``jax.shard_map`` the loop carries and gradients follow
``jaxopt_llm._shard_map``'s varying-axes rules; with ``axis_name`` the kernel may be
sharded over the vocabulary (tensor parallelism) and the per-token statistics are combined
with ``pmax``/``psum`` instead of gathering the kernel.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Hashable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_llm._shard_map import as_varying, tree_varying_axes, varying_axes
from jaxopt_llm._validation import check_bool, check_choice, check_int, check_scalar
from jaxopt_llm.losses._common import (
    REDUCTIONS, check_floating, combine_token_loss, compute_dtype, is_concrete_zero,
    masked_log_probs, nll_from_sums, reduce_masked, scaled_for_weighted_mean,
    validated_class_weight, validated_labels)

LAYOUTS = ("dv", "vd")
# Byte budget of one float32 [chunk, block] tile of logits. About three tiles (logits,
# probabilities, their gradient) are alive at the peak, so this bounds the temporary
# memory beyond the O(N d) hidden-state buffers. CPU: 32 MiB (N=4096, d=512, V=32000
# fp32: tiles [4096, 2000], 71-102 MiB of temporaries, 0.07-0.10x the unfused path's; 48 MiB
# gave 0.15x for no measurable speed). Accelerators 128 MiB ([8192, 4008] at N = 8192:
# matmuls large enough to run at full speed, and 3 tiles under the 501 MiB of a
# (2048, 128256) bf16 kernel gradient).
_TILE_BYTES = {"cpu": 32 * 2**20}
_TILE_BYTES_ACCELERATOR = 128 * 2**20
# Backends whose matmuls get float32 operands (each block cast first; the products are
# the same, as a product of two bf16 numbers is exact in float32): XLA:CPU runs bf16 dots
# slowly or not at all (jax 0.7: "Unsupported element type for DotThunk"). Public so the
# tests can run the accelerators' formulation (bf16 operands, float32 accumulation) on CPU.
UPCAST_BACKENDS: tuple[str, ...] = ("cpu",)
_MIN_BLOCK = 128   # vocabulary columns per tile, at least (when V allows)
_MIN_CHUNK = 16


def _budget(backend: str | None) -> int:
  backend = jax.default_backend() if backend is None else backend
  return _TILE_BYTES.get(backend, _TILE_BYTES_ACCELERATOR)


def _check_sizes(owner, num_tokens, vocab_size, backend):
  check_int(owner, "num_tokens", num_tokens, lo=0)
  check_int(owner, "vocab_size", vocab_size, lo=1)
  if backend is not None and not isinstance(backend, str):
    raise ValueError(f"{owner}: `backend` must be a platform name or None, got {backend!r}")


def default_chunk_size(num_tokens: int, vocab_size: int, backend: str | None = None) -> int:
  """The ``chunk_size`` (tokens per tile) that ``chunk_size=None`` picks.

  All the tokens (one chunk: each vocabulary block's kernel gradient is then a single
  matmul over every token) while a float32 ``[N, min(V, 128)]`` tile fits the byte budget
  (32 MiB on CPU, 128 MiB on GPU/TPU; ``backend`` defaults to ``jax.default_backend()``),
  else the most tokens, a multiple of 128, that fit it; at least 16.
  """
  _check_sizes("default_chunk_size", num_tokens, vocab_size, backend)
  rows = _budget(backend) // (4 * min(vocab_size, _MIN_BLOCK))
  if num_tokens <= rows:
    return max(num_tokens, 1)
  return max(rows // 128 * 128, _MIN_CHUNK)


def default_vocab_block_size(num_tokens: int, vocab_size: int,
                             backend: str | None = None,
                             chunk_size: int | None = None) -> int:
  """The ``vocab_block_size`` (vocabulary columns per tile) that ``None`` picks.

  The most columns whose float32 ``[chunk, block]`` tile fits the byte budget (see
  :func:`default_chunk_size`), then evened out over the ``ceil(V / block)`` blocks and
  rounded up to a multiple of 8 (little or no overlap of the last block); at most ``V``.
  (4096 tokens, V = 32000 on CPU: 16 blocks of 2000; 8192 tokens, V = 128256 on GPU:
  32 blocks of 4008.)
  """
  owner = "default_vocab_block_size"
  _check_sizes(owner, num_tokens, vocab_size, backend)
  if chunk_size is None:
    chunk_size = default_chunk_size(num_tokens, vocab_size, backend)
  check_int(owner, "chunk_size", chunk_size, lo=1)
  cols = max(_budget(backend) // (4 * max(min(chunk_size, max(num_tokens, 1)), 1)),
             _MIN_BLOCK)
  if cols >= vocab_size:
    return vocab_size
  n_blocks = -(-vocab_size // cols)
  even = -(-vocab_size // n_blocks)
  return min(-(-even // 8) * 8, vocab_size)


class _Static(NamedTuple):
  """Everything the loops' structure depends on (hashable: a nondiff argument)."""
  chunk: int        # tokens per tile
  block: int        # vocabulary columns per tile (of this device's shard)
  smoothing: bool   # False only for a concrete label_smoothing == 0: the term is not built.
  zloss: bool       # likewise for z_loss.
  softcap: bool
  layout: str       # "dv": kernel [d, V]; "vd": [V, d]
  axis_name: Hashable | None   # vocabulary-sharded kernel: the mesh axis (or axes)
  upcast: bool      # cast each operand block to the compute dtype before the dot (CPU)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Need:
  """Which input gradients the backward computes (static: a residual without leaves).

  ``axes``: for (hidden, kernel, bias), the shard_map axes each primal varies over; a
  gradient that varies over more (a replicated kernel fed per-device hidden states, or
  hidden states fed to a vocabulary-sharded kernel) is summed over the extra axes, which
  is the transpose of the implicit broadcast.
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


class _Stats(NamedTuple):
  """Per token, over the whole (all shards') vocabulary; see :func:`_finish_stats`."""
  top: jax.Array         # m = max_c z_c
  total: jax.Array       # sum_c exp(z_c - m) >= 1
  label_grad: jax.Array  # p_y - 1, without cancellation
  lse: jax.Array
  nll: jax.Array         # -log p_y, exact for tiny values
  smooth: jax.Array | None   # sum_c w_c (lse - z_c) / V


class _Inputs(NamedTuple):
  """The operands of the loops (the kernel in its own layout, never transposed)."""
  hidden: jax.Array          # [N, d], rows that do not count zeroed
  kernel: jax.Array          # [d, Vs] ("dv") or [Vs, d] ("vd"); Vs = this shard's columns
  bias: jax.Array | None     # [Vs]
  labels: jax.Array          # [N] int32 in [0, V) (global ids)
  live: jax.Array            # [N] bool
  cls_weight: jax.Array | None   # [Vs] class weights, compute dtype


def _vocab(st: _Static, kernel: jax.Array) -> int:
  return kernel.shape[1] if st.layout == "dv" else kernel.shape[0]


def _offset(st: _Static, vocab_local: int) -> jax.Array | int:
  """The global id of this shard's first column."""
  if st.axis_name is None:
    return 0
  return lax.axis_index(st.axis_name) * vocab_local


def _bits(st: _Static, kernel: jax.Array) -> jax.Array:
  """The kernel the loops slice: on CPU a 16-bit float kernel is viewed as ``uint16``.

  XLA:CPU runs bfloat16/float16 slices and updates in float32 ("float normalization"):
  a slice of a bfloat16 kernel inside a loop becomes a slice of a float32 copy of the
  whole kernel, hoisted out of the loop, and a write into a bfloat16 gradient an update
  of a float32 copy: [d, V] float32 temporaries, each twice the kernel gradient. Integer
  slices and writes are left alone, so the bits travel as ``uint16`` (a free view) and
  only each block is converted.
  """
  if st.upcast and jnp.dtype(kernel.dtype).itemsize == 2:
    return lax.bitcast_convert_type(kernel, jnp.uint16)
  return kernel


def _from_bits(w: jax.Array, dtype, acc) -> jax.Array:
  """A block of :func:`_bits`' view back in ``acc`` (exact: a widening)."""
  if w.dtype != jnp.uint16:
    return w.astype(acc) if w.dtype != acc else w
  if jnp.dtype(dtype) == jnp.bfloat16:   # bfloat16 is the top half of a float32
    return lax.bitcast_convert_type(w.astype(jnp.uint32) << 16, jnp.float32).astype(acc)
  return lax.bitcast_convert_type(w, dtype).astype(acc)


def _to_bits(w: jax.Array, like: jax.Array, dtype) -> jax.Array:
  """``w`` rounded to ``dtype``, in the representation of the buffer ``like``."""
  w = w.astype(dtype)
  return lax.bitcast_convert_type(w, jnp.uint16) if like.dtype == jnp.uint16 else w


def _mm_dtype(st: _Static, x: _Inputs, acc):
  """The matmuls' operand dtype: the inputs' (promoted), or ``acc`` when ``st.upcast``."""
  return acc if st.upcast else jnp.result_type(x.hidden.dtype, x.kernel.dtype)


def _block_of(st: _Static, kernel: jax.Array, start: jax.Array, dtype, mm) -> jax.Array:
  """Block ``start`` of the kernel (``dtype``; or of its ``_bits`` view) in dtype ``mm``."""
  w = lax.dynamic_slice_in_dim(kernel, start, st.block, axis=1 if st.layout == "dv" else 0)
  return _from_bits(w, dtype, mm)


def _logits(st: _Static, h_c: jax.Array, w_j: jax.Array, b_j: jax.Array | None,
            hyper: _Hyper, acc) -> tuple[jax.Array, jax.Array]:
  """(z, u): the tile's logits ``z = softcap(u)``, ``u = h W_j + b_j``, in ``acc``."""
  dims = (((1,), (0,)), ((), ())) if st.layout == "dv" else (((1,), (1,)), ((), ()))
  u = lax.dot_general(h_c, w_j, dims, preferred_element_type=acc)
  if b_j is not None:
    u = u + b_j
  if st.softcap:
    return hyper.cap * jnp.tanh(u / hyper.cap), u
  return u, u


def _tiles(st: _Static, n: int, vocab: int, init, inner, *, block_start=None,
           block_end=None, varying=frozenset()):
  """Runs ``inner`` over every [chunk, block] tile, vocabulary blocks outermost.

  Tile (i, j) covers tokens ``[r0, r0 + C)`` with ``r0 = min(i C, N - C)`` and columns
  ``[c0, c0 + B)`` with ``c0 = min(j B, Vs - B)``: when C (B) does not divide N (Vs) the
  last chunk (block) overlaps the one before, and ``fresh_rows`` / ``fresh_cols`` mark its
  rows (columns) not done before. Every tile has the static shape [C, B], with no padded
  copy of anything. ``block_start(c0, carry)`` adds a block's accumulators to the carry
  before its token chunks, ``block_end(c0, fresh_cols, carry)`` writes and drops them.
  """
  c, b = st.chunk, st.block
  n_chunks, n_blocks = -(-n // c), -(-vocab // b)

  def block_body(j, carry):
    c0 = jnp.minimum(j * b, vocab - b)
    fresh_cols = c0 + jnp.arange(b) >= j * b
    if block_start is not None:
      carry = block_start(c0, carry)

    def chunk_body(i, carry):
      r0 = jnp.minimum(i * c, n - c)
      fresh_rows = r0 + jnp.arange(c) >= i * c
      return inner(r0, fresh_rows, c0, fresh_cols, carry)

    if n_chunks == 1:
      carry = chunk_body(0, carry)
    else:
      carry = lax.fori_loop(0, n_chunks, chunk_body, as_varying(carry, varying))
    if block_end is not None:
      carry = block_end(c0, fresh_cols, carry)
    return carry

  if n_blocks == 1:
    return block_body(0, init)
  return lax.fori_loop(0, n_blocks, block_body, as_varying(init, varying))


def _rows(x: jax.Array, r0: jax.Array, c: int) -> jax.Array:
  return lax.dynamic_slice_in_dim(x, r0, c)


def _write(buf: jax.Array, new: jax.Array, start: jax.Array, fresh: jax.Array,
           axis: int = 0) -> jax.Array:
  """Writes ``new`` into ``buf`` at ``start`` along ``axis``, only where ``fresh``."""
  old = lax.dynamic_slice_in_dim(buf, start, new.shape[axis], axis=axis)
  shape = [1] * new.ndim
  shape[axis] = fresh.shape[0]
  new = new.astype(buf.dtype)
  new = jnp.where(fresh.reshape(shape), new, old)
  return lax.dynamic_update_slice_in_dim(buf, new, start, axis=axis)


def _prepared(st: _Static, x: _Inputs, acc) -> jax.Array:
  """The hidden states the tiles multiply: rows that do not count zeroed (their inf/NaN
  cannot reach the logits or, through 0 * NaN, the kernel gradient; their logits are then
  just the bias), in the compute dtype when ``st.upcast``."""
  h = x.hidden.astype(_mm_dtype(st, x, acc))
  return jnp.where(x.live[:, None], h, jnp.zeros((), h.dtype))


class _Tiling(NamedTuple):
  """What both passes over the tiles (``_stats``, ``_grads``) start from."""
  vocab: int                 # this shard's columns
  v_total: int               # every shard's columns
  offset: jax.Array | int    # global id of this shard's first column
  acc: Any                   # compute dtype
  h: jax.Array               # ``_prepared`` hidden states
  kbits: jax.Array           # the kernel as the loops slice it (``_bits``)


def _tiling(st: _Static, x: _Inputs) -> _Tiling:
  vocab = _vocab(st, x.kernel)
  acc = compute_dtype(x.hidden, x.kernel, x.bias)
  v_total = vocab if st.axis_name is None else vocab * _axis_size(st.axis_name)
  return _Tiling(vocab, v_total, _offset(st, vocab), acc, _prepared(st, x, acc),
                 _bits(st, x.kernel))


def _stats(st: _Static, x: _Inputs, hyper: _Hyper) -> _Stats:
  """One pass over the tiles: the per-token statistics of the online logsumexp.

  Per token, over the columns seen so far: the running max ``m``, ``r = sum_{c != y}
  exp(z_c - m)`` (rescaled by ``exp(m_old - m_new)`` when the max grows), the label's
  logit ``z_y`` and the smoothing sum ``sum_c w_c z_c / V``. With ``axis_name`` they are
  then combined over the vocabulary shards (``pmax`` of ``m``, ``psum`` of the rescaled
  sums), so every device ends with the whole vocabulary's statistics.
  """
  n = x.hidden.shape[0]
  vocab, v_total, offset, acc, h, kbits = _tiling(st, x)
  c = st.chunk
  neg_inf = jnp.asarray(-jnp.inf, acc)

  def inner(r0, fresh_rows, c0, fresh_cols, carry):
    w_j = _block_of(st, kbits, c0, x.kernel.dtype, _mm_dtype(st, x, acc))
    b_j = None if x.bias is None else lax.dynamic_slice_in_dim(x.bias, c0, st.block)
    z, _ = _logits(st, _rows(h, r0, c), w_j, b_j, hyper, acc)
    y_c = _rows(x.labels, r0, c)
    cols = offset + c0 + lax.broadcasted_iota(jnp.int32, z.shape, 1)
    is_y = cols == y_c[:, None]
    m_old = _rows(carry["top"], r0, c)
    m_new = jnp.maximum(m_old, jnp.max(z, axis=1))
    rescale = jnp.where(m_old == neg_inf, 0.0, jnp.exp(m_old - m_new))
    e = jnp.exp(z - m_new[:, None])
    r = _rows(carry["rest"], r0, c) * rescale + jnp.sum(
        jnp.where(fresh_cols & ~is_y, e, 0.0), axis=1)
    zy = _rows(carry["zy"], r0, c) + jnp.sum(jnp.where(fresh_cols & is_y, z, 0.0), axis=1)
    out = dict(carry)
    out["top"] = _write(carry["top"], m_new, r0, fresh_rows)
    out["rest"] = _write(carry["rest"], r, r0, fresh_rows)
    out["zy"] = _write(carry["zy"], zy, r0, fresh_rows)
    if st.smoothing:
      inv_v = jnp.asarray(1.0 / v_total, acc)
      colw = inv_v if x.cls_weight is None else lax.dynamic_slice_in_dim(
          x.cls_weight, c0, st.block) * inv_v
      colw = jnp.where(fresh_cols, colw, 0.0)
      # A class of weight 0 (or a column already counted) adds exactly 0, also where its
      # logit is -inf (0 * inf would be NaN).
      sz = jnp.sum(jnp.where(colw > 0, z * colw, 0.0), axis=1)
      out["sz"] = _write(carry["sz"], _rows(carry["sz"], r0, c) + sz, r0, fresh_rows)
    return out

  init = {"top": jnp.full((n,), -jnp.inf, acc), "rest": jnp.zeros((n,), acc),
          "zy": jnp.zeros((n,), acc)}
  if st.smoothing:
    init["sz"] = jnp.zeros((n,), acc)
  varying = tree_varying_axes(x, hyper)
  s = _tiles(st, n, vocab, init, inner, varying=varying)
  top, rest, zy = s["top"], s["rest"], s["zy"]
  sz = s.get("sz")
  if st.axis_name is not None:
    g_top = lax.pmax(top, st.axis_name)
    rest = lax.psum(rest * jnp.where(top == neg_inf, 0.0, jnp.exp(top - g_top)),
                    st.axis_name)
    top = g_top
    zy = lax.psum(zy, st.axis_name)   # 0 on every shard but the label's
    if sz is not None:
      sz = lax.psum(sz, st.axis_name)
  smooth_scale = None
  if st.smoothing:
    smooth_scale = (jnp.ones((), acc) if x.cls_weight is None
                    else _class_weight_sum(st, x.cls_weight) / v_total)
  return _finish_stats(top, rest, zy, sz, smooth_scale)


def _axis_size(axis_name) -> int:
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  return math.prod(lax.axis_size(a) for a in names)


def _class_weight_sum(st: _Static, w: jax.Array) -> jax.Array:
  total = jnp.sum(w)
  return total if st.axis_name is None else lax.psum(total, st.axis_name)


def _finish_stats(top, rest, zy, sz, smooth_scale) -> _Stats:
  r"""The per-token results of the online statistics: ``_common.nll_from_sums`` (the
  formula of ``softmax_nll_parts``: a tiny loss keeps its relative precision) of the max
  ``m``, ``r = sum_{c != y} exp(z_c - m)`` and ``z_y - m``, fed by the blockwise sums
  instead of a complete row; ``smooth = (sum_c w_c / V) lse - sum_c w_c z_c / V``.
  """
  nll, lse, label_grad, total = nll_from_sums(top, rest, zy - top)
  smooth = None if sz is None else smooth_scale * lse - sz
  return _Stats(top, total, label_grad, lse, nll, smooth)


def _token_losses(st: _Static, x: _Inputs, bad: jax.Array, hyper: _Hyper,
                  target_weight: jax.Array | None, s: _Stats) -> jax.Array:
  """``_common.combine_token_loss`` of the statistics: the per-token loss."""
  nll = -masked_log_probs(s.nll, x.live, bad)    # NaN for a bad label
  return combine_token_loss(
      nll, s.smooth, s.lse, x.live, label_smoothing=hyper.eps if st.smoothing else None,
      z_loss=hyper.zl if st.zloss else None, target_weight=target_weight)


def _grads(st: _Static, need: _Need, x: _Inputs, bad: jax.Array, hyper: _Hyper,
           target_weight: jax.Array | None, s: _Stats, ct: jax.Array
           ) -> dict[str, jax.Array]:
  r"""The gradients of ``sum_i ct_i loss_i`` (``need``), one more pass over the tiles.

  With ``p = softmax(z)``, ``a = 1 - eps``, class weights ``w`` (1 without), ``S = sum_c
  w_c / V`` and ``lse`` the logsumexp, the derivative of ``combine_token_loss``::

    dloss/dz_c = (a w_y + eps S + 2 zl lse) p_c - a w_y [c = y] - eps w_c / V

  At the label, ``a w_y (p_y - 1) + (eps S + 2 zl lse) p_y - eps w_y / V`` with
  ``p_y - 1`` the exact ``label_grad``. A bad (out-of-range) label has ``a = NaN``: its
  row's gradient is NaN, like its loss. Then ``* (1 - tanh^2)`` for the soft-cap and
  ``g = ct * dloss/dz`` gives ``dh = g W^T`` (accumulated over vocabulary blocks in the
  compute dtype), ``dW_j = h^T g_j`` (one block, finished over every token chunk in a
  ``[d, B]`` accumulator with float32 accumulation, written once in the kernel's dtype)
  and ``db_j = sum_i g_ij``.
  """
  n, d = x.hidden.shape
  vocab, v_total, offset, acc, h, kbits = _tiling(st, x)
  c, b = st.chunk, st.block
  dv = st.layout == "dv"

  scale = jnp.where(x.live, ct.astype(acc), 0.0)
  one = jnp.ones((), acc)
  a = (one - hyper.eps) if st.smoothing else one
  if target_weight is not None:
    a = a * target_weight
  a = jnp.where(bad, jnp.nan, a)
  extra = jnp.zeros((), acc)
  if st.smoothing:
    s_w = one if x.cls_weight is None else _class_weight_sum(st, x.cls_weight) / v_total
    extra = extra + hyper.eps * s_w
  if st.zloss:
    extra = extra + 2.0 * (hyper.zl * s.lse)
  coef_p = scale * (a + extra)
  coef_y = scale * (a * s.label_grad + extra * (1.0 + s.label_grad))
  coef_w = scale * (hyper.eps / v_total) if st.smoothing else None
  overlap_rows, overlap_cols = n % c != 0, vocab % b != 0
  mm_dtype = _mm_dtype(st, x, acc)

  def block_start(c0, carry):
    carry = dict(carry)
    if need.kernel:
      carry["dw_j"] = jnp.zeros((d, b) if dv else (b, d), acc)
    if need.bias:
      carry["db_j"] = jnp.zeros((b,), acc)
    return carry

  def inner(r0, fresh_rows, c0, fresh_cols, carry):
    w_j = _block_of(st, kbits, c0, x.kernel.dtype, _mm_dtype(st, x, acc))
    b_j = None if x.bias is None else lax.dynamic_slice_in_dim(x.bias, c0, b)
    h_c = _rows(h, r0, c)
    z, _ = _logits(st, h_c, w_j, b_j, hyper, acc)
    y_c = _rows(x.labels, r0, c)
    cols = offset + c0 + lax.broadcasted_iota(jnp.int32, z.shape, 1)
    p = jnp.exp(z - _rows(s.top, r0, c)[:, None]) * (1.0 / _rows(s.total, r0, c))[:, None]
    g = jnp.where(cols == y_c[:, None], _rows(coef_y, r0, c)[:, None],
                  p * _rows(coef_p, r0, c)[:, None])
    if coef_w is not None:
      wcol = 1.0 if x.cls_weight is None else lax.dynamic_slice_in_dim(x.cls_weight, c0, b)
      g = g - _rows(coef_w, r0, c)[:, None] * wcol
    if st.softcap:   # d(c tanh(u / c))/du = 1 - tanh^2
      g = g * (1.0 - jnp.square(z / hyper.cap))
    if overlap_rows or overlap_cols:   # tiles done before count once
      g = jnp.where(fresh_rows[:, None] & fresh_cols, g, 0.0)
    out = dict(carry)
    g_mm = g.astype(mm_dtype)
    if need.hidden:
      dims = (((1,), (1,)), ((), ())) if dv else (((1,), (0,)), ((), ()))
      dh_c = lax.dot_general(g_mm, w_j.astype(mm_dtype), dims, preferred_element_type=acc)
      out["dh"] = lax.dynamic_update_slice_in_dim(
          carry["dh"], _rows(carry["dh"], r0, c) + dh_c, r0, axis=0)
    if need.kernel:
      hc = h_c.astype(mm_dtype)
      if dv:
        dw = lax.dot_general(hc, g_mm, (((0,), (0,)), ((), ())), preferred_element_type=acc)
      else:
        dw = lax.dot_general(g_mm, hc, (((0,), (0,)), ((), ())), preferred_element_type=acc)
      out["dw_j"] = carry["dw_j"] + dw
    if need.bias:
      out["db_j"] = carry["db_j"] + jnp.sum(g, axis=0)
    return out

  def block_end(c0, fresh_cols, carry):
    carry = dict(carry)
    if need.kernel:
      carry["dw"] = _write(carry["dw"], _to_bits(carry.pop("dw_j"), carry["dw"],
                                                 x.kernel.dtype), c0, fresh_cols,
                           axis=1 if dv else 0)
    if need.bias:
      carry["db"] = _write(carry["db"], carry.pop("db_j"), c0, fresh_cols)
    return carry

  init: dict[str, jax.Array] = {}
  if need.hidden:
    init["dh"] = jnp.zeros((n, d), acc)
  if need.kernel:   # written block by block, once, in the kernel's dtype
    init["dw"] = jnp.zeros(x.kernel.shape, kbits.dtype)
  if need.bias:
    init["db"] = jnp.zeros((vocab,), x.bias.dtype)
  varying = tree_varying_axes(x, hyper, ct, s)
  out = _tiles(st, n, vocab, init, inner, block_start=block_start, block_end=block_end,
               varying=varying)
  if need.kernel and out["dw"].dtype != x.kernel.dtype:
    out["dw"] = lax.bitcast_convert_type(out["dw"], x.kernel.dtype)
  return out


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(st: _Static, x: _Inputs, bad, hyper, target_weight):
  """Per-token losses ([N], 0 where a token does not count)."""
  return _token_losses(st, x, bad, hyper, target_weight, _stats(st, x, hyper))


def _fused_fwd(st, x, bad, hyper, target_weight):
  # symbolic_zeros=True: each leaf arrives as CustomVJPPrimal(value, perturbed), which tells
  # which gradients are wanted; e.g. a frozen kernel skips the d x V matmul entirely.
  need = _Need(x.hidden.perturbed, x.kernel.perturbed,
               x.bias is not None and x.bias.perturbed)
  perturbed = [p.perturbed for p in jax.tree.leaves(
      (hyper, target_weight, x.cls_weight),
      is_leaf=lambda p: isinstance(p, jax.custom_derivatives.CustomVJPPrimal))]
  if any(perturbed):
    raise NotImplementedError(
        "fused_linear_cross_entropy: gradients with respect to label_smoothing, z_loss, "
        "logit_soft_cap or weight are not implemented (only hidden, kernel and bias)")
  value = lambda t: jax.tree.map(
      lambda p: p.value, t,
      is_leaf=lambda p: isinstance(p, jax.custom_derivatives.CustomVJPPrimal))
  x, bad, hyper, target_weight = value((x, bad, hyper, target_weight))
  need = dataclasses.replace(
      need,
      axes=(varying_axes(x.hidden), varying_axes(x.kernel),
            frozenset() if x.bias is None else varying_axes(x.bias)),
      dtypes=(x.hidden.dtype, x.kernel.dtype, None if x.bias is None else x.bias.dtype))
  s = _stats(st, x, hyper)
  loss = _token_losses(st, x, bad, hyper, target_weight, s)
  # O(N) residuals besides the inputs; the backward recomputes each tile's logits.
  s = s._replace(nll=None, smooth=None)
  return loss, (need, x, bad, hyper, target_weight, s)


def _finish(x: jax.Array | None, dtype, axes: frozenset) -> jax.Array | None:
  """Sums a gradient over extra shard_map axes and casts it to ``dtype``."""
  if x is None:
    return None
  extra = varying_axes(x) - axes
  if extra:
    x = lax.psum(x, tuple(sorted(extra)))
  return x.astype(dtype)


def _fused_bwd(st, res, ct):
  need, x, bad, hyper, target_weight, s = res
  zeros = jax.tree.map(lambda _: None, (x, bad, hyper, target_weight))
  if isinstance(ct, jax.custom_derivatives.SymbolicZero) or not need.any:
    return zeros
  out = _grads(st, need, x, bad, hyper, target_weight, s, ct)
  dh, dw, db = (_finish(out.get(k), dt, ax)
                for k, dt, ax in zip(("dh", "dw", "db"), need.dtypes, need.axes))
  return (x._replace(hidden=dh, kernel=dw, bias=db, labels=None, live=None,
                     cls_weight=None), None, None, None)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def fused_linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    kernel_layout: str = "dv",
    chunk_size: int | None = None,
    vocab_block_size: int | None = None,
    logit_soft_cap: float | None = None,
    where: jax.typing.ArrayLike | None = None,
    axis_name: Hashable | None = None,
    validate: bool = False,
) -> jax.Array:
  r"""``cross_entropy(hidden @ kernel + bias, labels)`` without the ``[N, V]`` logits.

  With ``u = hidden @ kernel + bias`` and logits ``z = u`` (or, with a soft-cap ``c``,
  ``z = c * tanh(u / c)`` as in Gemma 2), each token's loss is that of
  :func:`~jaxopt_llm.losses.cross_entropy` (``_common.combine_token_loss``)::

    loss = (1 - eps) * w_y * (lse - z_y) + eps * sum_c w_c (lse - z_c) / V + z_loss * lse**2

  with class weights ``w`` (``weight``; 1 without), the same masking (``ignore_index``,
  ``where``), reductions (PyTorch's ``mean`` over counted tokens, weighted: divided by
  the sum of the counted targets' weights ``w_y``, as torch; 0.0 and zero gradients when
  nothing counts or the batch is empty), bad-input behaviour (out-of-range labels:
  ``ValueError`` eagerly; under jit a NaN loss *and* NaN gradients, or a checkify check
  with ``validate=True``) and numerics (a tiny loss keeps its relative precision, e.g.
  8.4045e-6 for logits ``[100, 88, 87]``, and so does the label entry ``p_y - 1`` of its
  gradient; at logits up to the bf16 maximum the loss is ``+inf`` where the true value
  exceeds float32, never NaN, and the gradients stay finite). It is
  ``torch.nn.functional.linear_cross_entropy(hidden, kernel, labels, linear_bias=bias,
  weight=weight, ...)`` for ``kernel_layout="vd"`` (torch's ``[V, d]`` weight); value
  and gradients equal the unfused computation up to float rounding.

  How (Cut Cross-Entropy, Wijmans et al., 2024): the logits are formed one ``[chunk_size,
  vocab_block_size]`` tile at a time, vocabulary blocks outermost.

  * Forward: an online logsumexp across the vocabulary blocks keeps, per token, the
    running max, the sum of the other classes' exponentials, the label's logit and the
    smoothing sum (O(N)); the loss follows from them (one ``hidden @ kernel`` matmul).
  * Backward (a ``jax.custom_vjp``; the per-token cotangent is folded in): each block's
    logits are recomputed, and its gradient gives ``dL/dhidden`` (accumulated over the
    blocks), that block's ``dL/dkernel`` (one matmul over every token chunk, float32
    accumulation, written once in the kernel's dtype straight into the gradient) and
    ``dL/dbias``. Three more matmuls: four in all, one more than the unfused path, which
    buys the absence of any ``[d, V]`` temporary. Gradients of inputs that are not
    differentiated (a frozen ``kernel``) are not computed; a call that is not
    differentiated computes only the loss.

  Matmuls take the inputs' dtype with float32 accumulation (``preferred_element_type``;
  on CPU each block's operands are cast to float32 first, the same products, faster on
  XLA:CPU); the softmax, the statistics, the loss and the per-block gradient accumulators
  are float32 (all float64 when an input is float64, under ``jax_enable_x64``); gradients
  are returned in the inputs' dtypes. Differentiable in reverse mode, also twice
  (reverse-over-reverse, and forward-over-reverse Hessian-vector products); plain
  forward mode (``jvp`` of the loss) is not defined for a ``custom_vjp``. Gradients with
  respect to ``label_smoothing``, ``z_loss``, ``logit_soft_cap`` or ``weight`` raise
  ``NotImplementedError`` (never a silent zero).

  Memory: besides inputs and gradients, a few float32 ``[chunk, block]`` tiles (32 MiB
  each on CPU, 128 MiB on GPU/TPU), the hidden states' float32 gradient accumulator and
  (bf16 on CPU) a float32 copy of ``hidden`` (``O(N d)``), one block's float32 kernel
  gradient, and O(N) statistics. No ``[N, V]`` and no ``[d, V]`` temporary.

  Several devices:

  * Token-sharded ``hidden`` (data parallelism): call it inside ``jax.shard_map``, per
    device with ``reduction="sum"``, and divide ``lax.psum`` of the sums by ``lax.psum``
    of the counted tokens (under plain ``jit`` XLA would gather the tokens: the loops
    slice them). Gradients of replicated ``kernel`` / ``bias`` are summed over the
    devices by the backward pass.
  * Vocabulary-sharded ``kernel`` (tensor parallelism): inside ``jax.shard_map`` with
    ``kernel`` (and ``bias``, ``weight``) split over the vocabulary on mesh axis
    ``axis_name`` (shard ``k`` holds classes ``[k Vs, (k + 1) Vs)``, in ``axis_index``
    order) and ``hidden``/``labels`` (global class ids) the same on those devices, pass
    ``axis_name``: the statistics are combined with ``pmax``/``psum`` (O(N) per device;
    the kernel is never gathered), the loss is the whole vocabulary's on every device,
    and ``dL/dhidden`` is summed over the shards.

  Args:
    hidden: ``[..., d]`` floating features (the last hidden states).
    kernel: the output projection, ``[d, V]`` for ``kernel_layout="dv"`` (Flax
      ``Dense``; for a tied embedding table ``E`` of shape ``[V, d]`` pass ``E`` with
      ``kernel_layout="vd"``, which never transposes it) or ``[V, d]`` for ``"vd"``
      (``torch.nn.Linear.weight``). ``V`` is this shard's classes under ``axis_name``.
    labels: ``[...]`` integer targets, ``hidden.shape[:-1]``.
    bias: optional ``[V]`` bias.
    weight: optional ``[V]`` class weights (torch's ``weight``): finite, >= 0.
    ignore_index: label value of tokens that do not count.
    label_smoothing: ``eps`` in [0, 1].
    z_loss: weight (>= 0) of the PaLM z-loss ``lse**2``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    kernel_layout: ``"dv"`` (default) or ``"vd"``; explicit, never guessed from shapes.
    chunk_size: tokens per tile (an int >= 1; need not divide the number of tokens).
      ``None``: :func:`default_chunk_size`, all the tokens unless that is very many.
    vocab_block_size: vocabulary columns per tile (an int >= 1; need not divide ``V``).
      ``None``: :func:`default_vocab_block_size`, a tile of at most 32 MiB (CPU) or
      128 MiB (GPU/TPU): 2000 columns for 4096 tokens at V = 32000 on CPU.
    logit_soft_cap: optional ``c > 0``; logits become ``c * tanh(z / c)``.
    where: optional boolean (or 0/1) mask of ``labels.shape``; False is like
      ``ignore_index``.
    axis_name: the ``shard_map`` mesh axis (or tuple of axes) over which ``kernel`` is
      split on the vocabulary; ``None`` (default): the whole vocabulary is here.
    validate: as in :func:`~jaxopt_llm.losses.cross_entropy` (checkify check for
      out-of-range labels under jit).

  Returns:
    A scalar, or ``labels.shape`` for ``reduction="none"``; float32 (float64 when an
    input is float64).

  Raises:
    ValueError: naming the argument, for a bad ``reduction``, ``kernel_layout``,
      ``label_smoothing``, ``z_loss``, ``chunk_size``, ``vocab_block_size``,
      ``logit_soft_cap``, ``validate``, ``axis_name`` (not a bound mesh axis), dtypes or
      shapes of ``hidden`` / ``kernel`` / ``bias`` / ``weight`` / ``labels`` /
      ``where``, negative or non-finite (concrete) weights, or (eagerly) out-of-range
      labels.
    TypeError: naming the argument, for a string or other non-number hyperparameter.
  """
  owner = "fused_linear_cross_entropy"
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  check_choice(owner, "kernel_layout", kernel_layout, LAYOUTS)
  check_scalar(owner, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
  check_scalar(owner, "z_loss", z_loss, lo=0.0)
  if chunk_size is not None:
    check_int(owner, "chunk_size", chunk_size, lo=1)
  if vocab_block_size is not None:
    check_int(owner, "vocab_block_size", vocab_block_size, lo=1)
  if logit_soft_cap is not None:
    check_scalar(owner, "logit_soft_cap", logit_soft_cap, lo=0.0, lo_open=True)
  check_bool(owner, "validate", validate)

  hidden = jnp.asarray(hidden)
  kernel = jnp.asarray(kernel)
  check_floating(owner, "hidden", hidden)
  check_floating(owner, "kernel", kernel)
  d = hidden.shape[-1]
  dv = kernel_layout == "dv"
  want = f"[d, V] = [{d}, V]" if dv else f"[V, d] = [V, {d}]"
  if kernel.ndim != 2 or kernel.shape[0 if dv else 1] != d or kernel.shape[1 if dv else 0] < 1:
    raise ValueError(
        f"{owner}: `kernel` must have shape {want} with V >= 1 for "
        f"kernel_layout={kernel_layout!r} (d = hidden.shape[-1]), got {kernel.shape}")
  vocab = kernel.shape[1 if dv else 0]
  if bias is not None:
    bias = jnp.asarray(bias)
    check_floating(owner, "bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(
          f"{owner}: `bias` must have shape [V] = ({vocab},), got {bias.shape}")
  if axis_name is None:
    shards = 1
  else:
    try:
      shards = _axis_size(axis_name)
    except (NameError, KeyError, ValueError, TypeError) as e:
      raise ValueError(f"{owner}: `axis_name` {axis_name!r} must name mesh axes bound by "
                       f"an enclosing jax.shard_map ({e})") from None
  acc = compute_dtype(hidden, kernel, bias)
  cls_weight = validated_class_weight(owner, weight, vocab)
  if cls_weight is not None:
    cls_weight = cls_weight.astype(acc)
  batch_shape = hidden.shape[:-1]
  live, safe_labels, bad = validated_labels(
      owner, labels, batch_shape, vocab * shards, ignore_index=ignore_index, where=where,
      validate=validate, labels_name="labels", shape_name="hidden.shape[:-1]")

  n = math.prod(batch_shape)
  if n == 0:
    return jnp.zeros(batch_shape if reduction == "none" else (), acc)
  backend = jax.default_backend()
  chunk = default_chunk_size(n, vocab, backend) if chunk_size is None else min(chunk_size, n)
  block = (default_vocab_block_size(n, vocab, backend, chunk) if vocab_block_size is None
           else min(vocab_block_size, vocab))
  st = _Static(
      chunk=chunk, block=block,
      smoothing=not is_concrete_zero(label_smoothing),
      zloss=not is_concrete_zero(z_loss),
      softcap=logit_soft_cap is not None, layout=kernel_layout, axis_name=axis_name,
      upcast=backend in UPCAST_BACKENDS)
  if cls_weight is not None and reduction == "mean":  # weights up to float32's max
    cls_weight, z_loss = scaled_for_weighted_mean(cls_weight, z_loss, axis_name)
  hyper = _Hyper(jnp.asarray(label_smoothing, acc), jnp.asarray(z_loss, acc),
                 jnp.asarray(1.0 if logit_soft_cap is None else logit_soft_cap, acc))
  live, safe_labels, bad = live.reshape(n), safe_labels.reshape(n), bad.reshape(n)
  target_weight = None
  if cls_weight is not None:
    # w_y per token; with a sharded weight, from the shard that holds y.
    local = safe_labels - _offset(st, vocab)
    here = (local >= 0) & (local < vocab)
    target_weight = jnp.where(here, cls_weight[jnp.clip(local, 0, vocab - 1)], 0.0)
    if axis_name is not None:
      target_weight = lax.psum(target_weight, axis_name)
  x = _Inputs(hidden.reshape(n, d), kernel, bias, safe_labels, live, cls_weight)
  loss = _fused(st, x, bad, hyper, target_weight)
  out = reduce_masked(loss, live, reduction, weights=target_weight)
  return out.reshape(batch_shape) if reduction == "none" else out
