r"""Sampling a token per position from the LM head's softmax without the ``[tokens, vocab]`` logits.

``categorical_from_hidden(hidden, kernel, key)`` draws, for every token ``n``, one class

.. math::
  y_n \sim \operatorname{softmax}(h_n W + b)

exactly (the distribution of ``jax.random.categorical(key, hidden @ kernel + bias)``), but
walks the vocabulary in blocks of ``block_size`` columns: the Gumbel-max trick
:math:`y_n = \arg\max_c (z_{nc} + G_{nc})`, with :math:`G_{nc}` i.i.d. standard Gumbel, is a
maximum over the classes, so it can be taken block by block with a running maximum and its
argument (a ``lax.fori_loop``), and only an ``[N, block_size]`` block of logits and noise
exists at a time. Sophia-G's Gauss-Newton-Bartlett estimator
(``optim.hessian.gauss_newton_bartlett_fused``) samples its labels with it when the trainer
uses the fused cross-entropy.

The noise does not depend on the blocking: the noise of class ``c`` is drawn from
``jax.random.fold_in(key, c)`` (one ``[N]`` Gumbel vector per class), so the same key gives
the same labels for every ``block_size`` (the tests check it). It is not the noise of
``jax.random.categorical(key, logits)`` (which draws one ``[N, V]`` array from ``key``): the
labels differ from that function's for the same key, their distribution is the same.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_llm._shard_map import as_varying, tree_varying_axes
from jaxopt_llm._validation import check_int
from jaxopt_llm.losses._common import check_floating, compute_dtype

# Default block: the most vocabulary columns whose float32 [N, block] logits block fits in a
# byte budget, rounded down to a multiple of 128; at least 128 columns (or V), so the loop
# never runs column by column. About five such blocks are alive at once (the random bits,
# the noise, the logits, their sum; XLA:CPU measured 5.0 x N x block x 4 bytes of compiled
# temporaries), so 4 MiB bounds the peak near 20 MiB on CPU. Smaller blocks cost no speed
# there (N=4096, d=512, V=32000: 128-256 columns 2.8 s, 1024 columns 3.4-3.7 s, the full
# logits with jax.random.categorical 6.1-6.5 s of CPU time). Accelerators get 64 MiB.
_BLOCK_BYTES = {"cpu": 4 * 2**20}
_BLOCK_BYTES_ACCELERATOR = 64 * 2**20
_MIN_BLOCK = 128


def default_block_size(num_tokens: int, vocab_size: int, backend: str | None = None) -> int:
  """The ``block_size`` that ``block_size=None`` picks.

  The most columns ``B`` (a multiple of 128, at least 128) with ``num_tokens * B * 4`` bytes
  (one float32 ``[N, B]`` block) at most 4 MiB on CPU, 64 MiB on GPU/TPU (``backend``,
  default ``jax.default_backend()``); at most ``vocab_size``. About five such blocks are
  alive at once.
  """
  owner = "default_block_size"
  check_int(owner, "num_tokens", num_tokens, lo=0)
  check_int(owner, "vocab_size", vocab_size, lo=1)
  if backend is not None and not isinstance(backend, str):
    raise ValueError(f"{owner}: `backend` must be a platform name or None, got {backend!r}")
  backend = jax.default_backend() if backend is None else backend
  budget = _BLOCK_BYTES.get(backend, _BLOCK_BYTES_ACCELERATOR)
  cols = budget // (4 * max(num_tokens, 1)) // _MIN_BLOCK * _MIN_BLOCK
  return min(max(cols, _MIN_BLOCK), vocab_size)


def categorical_from_hidden(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    bias: jax.typing.ArrayLike | None = None,
    block_size: int | None = None,
) -> jax.Array:
  r"""One label per token from ``softmax(hidden @ kernel + bias)``, without the logits.

  .. math::
    y_n = \arg\max_{c} \bigl(z_{nc} + G_{nc}\bigr),\qquad z = h W + b,\qquad
    G_{nc} \overset{\text{iid}}{\sim} \operatorname{Gumbel}(0, 1)

  is an exact sample of :math:`\operatorname{softmax}(z_n)` (the Gumbel-max trick, as
  ``jax.random.categorical``). The maximum is taken over vocabulary blocks of
  ``block_size`` columns in a ``lax.fori_loop`` carrying the running maximum and its class
  (ties go to the lower class, as ``jnp.argmax``): memory ``O(N * block_size)``, never
  ``[N, V]`` (on XLA:CPU a bf16/fp16 kernel is also copied once, as its bits: see the
  code). The noise ``G[:, c]`` is drawn from ``jax.random.fold_in(key, c)``, so the
  labels are the same for every ``block_size``; they are not those of
  ``jax.random.categorical(key, hidden @ kernel + bias)`` (other noise, same distribution).

  The logits are computed as the fused cross-entropy computes them: products in the inputs'
  dtype with float32 accumulation, the bias and the noise in float32 (float64 when an input
  is float64, under ``jax_enable_x64``). A row with a NaN logit gets the class of its first
  NaN (as ``jnp.argmax``); a class with a ``-inf`` logit (say a ``-inf`` bias) is never drawn
  unless every class of the row is ``-inf`` (then class 0). Not differentiable (integer
  output): the inputs are read through ``lax.stop_gradient``.

  Args:
    hidden: ``[..., d]`` floating features (the LM head's input).
    kernel: ``[d, V]`` head kernel (Flax ``Dense`` layout; a tied embedding ``E [V, d]`` is
      ``E.T``).
    key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
    bias: optional ``[V]`` head bias.
    block_size: vocabulary columns per block (an int >= 1; need not divide V). ``None``
      picks :func:`default_block_size` (4 MiB float32 blocks on CPU, 64 MiB on GPU/TPU;
      about five blocks are alive at once).

  Returns:
    int32 labels of shape ``hidden.shape[:-1]``, in ``[0, V)``.

  Raises:
    ValueError: naming the argument, for non-floating or wrongly shaped ``hidden``,
      ``kernel`` or ``bias``, or a ``block_size`` that is not an int >= 1.
  """
  owner = "categorical_from_hidden"
  if block_size is not None:
    check_int(owner, "block_size", block_size, lo=1)
  hidden = jnp.asarray(hidden)
  kernel = jnp.asarray(kernel)
  check_floating(owner, "hidden", hidden)
  check_floating(owner, "kernel", kernel)
  if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1] or kernel.shape[1] < 1:
    raise ValueError(
        f"{owner}: `kernel` must have shape [d, V] = [{hidden.shape[-1]}, V] with V >= 1 "
        f"(d = hidden.shape[-1]), got {kernel.shape}")
  d, vocab = kernel.shape
  if bias is not None:
    bias = jnp.asarray(bias)
    check_floating(owner, "bias", bias)
    if bias.shape != (vocab,):
      raise ValueError(f"{owner}: `bias` must have shape [V] = ({vocab},), got {bias.shape}")
  batch_shape = hidden.shape[:-1]
  n = math.prod(batch_shape)
  if n == 0:
    return jnp.zeros(batch_shape, jnp.int32)
  block = min(default_block_size(n, vocab) if block_size is None else block_size, vocab)

  acc = compute_dtype(hidden, kernel, bias)
  cdt = jnp.result_type(hidden.dtype, kernel.dtype)
  h = lax.stop_gradient(hidden.reshape(n, d).astype(cdt))
  w = lax.stop_gradient(kernel.astype(cdt))
  b = None if bias is None else lax.stop_gradient(bias.astype(acc))
  # A 16-bit kernel is sliced as its bits: XLA:CPU upcasts a bf16/fp16 dynamic-slice to
  # float32 and hoists that upcast out of the loop onto the whole kernel (a float32 [d, V]
  # temporary: 1002 MiB at d=2048, V=128256). XLA:CPU still makes the bitcast a copy (a
  # 16-bit [d, V] temporary, half that); elsewhere a bitcast is free.
  w_bits = jnp.uint16 if jnp.dtype(cdt).itemsize == 2 else None
  if w_bits is not None:
    w = lax.bitcast_convert_type(w, w_bits)
  noise_of = jax.vmap(lambda c: jax.random.gumbel(jax.random.fold_in(key, c), (n,), acc),
                      out_axes=1)

  def body(j, carry):
    best, arg = carry
    # The last block starts at V - block (it overlaps the one before when block does not
    # divide V); its columns already seen are masked out.
    start = jnp.minimum(j * block, vocab - block)
    cols = start + jnp.arange(block, dtype=jnp.int32)
    w_blk = lax.dynamic_slice_in_dim(w, start, block, axis=1)
    if w_bits is not None:
      w_blk = lax.bitcast_convert_type(w_blk, cdt)
    z = jnp.dot(h, w_blk, preferred_element_type=acc)
    if b is not None:
      z = z + lax.dynamic_slice_in_dim(b, start, block)
    v = jnp.where(cols >= j * block, z + noise_of(cols), -jnp.inf)
    at = jnp.argmax(v, axis=1)
    top = jnp.take_along_axis(v, at[:, None], axis=1)[:, 0]
    # A strictly larger value moves the maximum (ties keep the lower class); a NaN takes it
    # unless a NaN already holds it: jnp.argmax's rule over the whole row.
    take = (top > best) | (jnp.isnan(top) & ~jnp.isnan(best))
    return jnp.where(take, top, best), jnp.where(take, cols[at], arg)

  init = (jnp.full((n,), -jnp.inf, acc), jnp.zeros((n,), jnp.int32))
  # Inside shard_map the carry must vary over the axes its updates vary over.
  init = as_varying(init, tree_varying_axes(h, w, b, key))
  _, labels = lax.fori_loop(0, -(-vocab // block), body, init)
  return labels.reshape(batch_shape)


__all__ = ["categorical_from_hidden", "default_block_size"]
