"""A tiny decoder-only transformer (GPT-2 layout) in Flax NNX.

Pre-LayerNorm blocks ``x + attn(ln(x))``, ``x + mlp(ln(x))``, causal multi-head attention,
learned absolute positions, a final LayerNorm, and a head that is either tied to the token
embedding (``logits = h @ E^T``) or a separate bias-free ``Linear``. Initialisation follows
GPT-2 (Radford et al., 2019): normal(0, 0.02) weights, the residual output projections
scaled by ``1/sqrt(2 * n_layer)``, zero biases.

Speed (XLA:CPU, measured in ``benchmarks/train_step.py``): every matrix product runs on the
token rows flattened to 2-D (``rows``), ``[B*T, d] @ [d, n]``. Same numbers as the
``[B, T, d]`` products, but the gradient's weight product ``x^T dy`` is then a plain 2-D
contraction; as a 3-D ``dot_general`` (contracting batch *and* time) XLA:CPU surrounds it with
transposes, and the default train step took 18-27% more CPU time.

Besides ``model(tokens) -> logits`` the model exposes ``model.hidden(tokens)`` (final normed
hidden states ``[B, T, d]``) and ``model.head_kernel()`` (``[d, V]``, Flax Dense layout), so a
fused linear cross-entropy can compute the loss without materialising ``[B*T, V]`` logits.

Mixed precision (``compute_dtype="bfloat16"``, ``matmul``): the parameters stay float32 (the
optimizer's master weights; its state is float32 too). Every matrix product rounds its two
operands to bfloat16 and accumulates into a float32 result, as tensor cores and TPUs do; the
backward pass's products also take bfloat16 operands (the gradient is rounded). Everything
between the products (embeddings, the residual stream, LayerNorm, GELU, the attention
softmax, the logits and the loss) is float32, and the parameters get float32 gradients.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm._validation import check_choice, check_int

COMPUTE_DTYPES = ("float32", "bfloat16")

MODEL_SIZES = {
    # name: (n_layer, n_head, d_model)
    "nano": (2, 2, 64),
    "micro": (3, 4, 96),
    "tiny": (4, 4, 128),
    "small": (6, 6, 192),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int = 256
  block_size: int = 64        # context length (tokens)
  n_layer: int = 3
  n_head: int = 4
  d_model: int = 96
  mlp_ratio: int = 4
  tied_head: bool = True
  compute_dtype: str = "float32"  # of the matrix products: float32 | bfloat16

  def __post_init__(self):
    owner = "GPTConfig"
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_ratio"):
      check_int(owner, name, getattr(self, name), lo=1)
    check_choice(owner, "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
    if self.d_model % self.n_head:
      raise ValueError(f"{owner}: `d_model` ({self.d_model}) must be divisible by `n_head` "
                       f"({self.n_head})")

  @classmethod
  def from_size(cls, size: str, **overrides) -> "GPTConfig":
    if size not in MODEL_SIZES:
      raise ValueError(f"GPTConfig: `size` must be one of {tuple(MODEL_SIZES)}, got {size!r}")
    n_layer, n_head, d_model = MODEL_SIZES[size]
    return cls(**{"n_layer": n_layer, "n_head": n_head, "d_model": d_model, **overrides})


_init = nnx.initializers.normal(0.02)


def matmul(a: jax.Array, b: jax.Array, compute_dtype: str = "float32", *,
           spec: str | None = None) -> jax.Array:
  """``a @ b`` (or ``einsum(spec, a, b)``) in ``compute_dtype``.

  float32: the plain product. bfloat16: both operands are rounded to bfloat16 and the product
  accumulates into a float32 result; in the backward pass the incoming float32 gradient is
  rounded to bfloat16 too, so both gradient products also take bfloat16 operands (their
  results, rounded to bfloat16, reach float32 operands through the casts' transposes: a
  float32 parameter gets a float32 gradient).
  """
  if compute_dtype == "float32":
    return jnp.einsum(spec, a, b) if spec else jnp.matmul(a, b)
  return _low_precision_product(spec, a.astype(compute_dtype), b.astype(compute_dtype))


@functools.lru_cache(maxsize=None)
def mixed_dot_supported(platform: str | None = None) -> bool:
  """Whether the backend (default: the default one) runs a batched bfloat16 x bfloat16 ->
  float32 product. Older XLA:CPU (jax 0.7) does not ("Unsupported element type for
  DotThunk"); ``matmul`` then gives the same numbers with a float32 product of the
  bfloat16-rounded operands (a product of two bfloat16 numbers is exact in float32)."""
  platform = platform or jax.default_backend()
  with jax.ensure_compile_time_eval():  # a real run, also when called while tracing
    try:
      x = jnp.ones((2, 2, 4, 4), jnp.bfloat16)  # batched: 1-batch products took another path
      y = jnp.ones((2, 4, 2, 8), jnp.bfloat16)
      device = jax.local_devices(backend=platform)[0]
      x, y = jax.device_put(x, device), jax.device_put(y, device)
      out = jax.jit(lambda x, y: jnp.einsum("bhqk,bkhd->bqhd", x, y,
                                            preferred_element_type=jnp.float32))(x, y)
      return bool(np.asarray(out)[0, 0, 0, 0] == 4.0)
    except Exception:  # noqa: BLE001  (XlaRuntimeError; its module moved between versions)
      return False


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_product(spec, a, b):
  if mixed_dot_supported():
    kw = {"preferred_element_type": jnp.float32}
  else:
    a, b, kw = a.astype(jnp.float32), b.astype(jnp.float32), {}
  return jnp.einsum(spec, a, b, **kw) if spec else jnp.matmul(a, b, **kw)


def _low_precision_product_fwd(spec, a, b):
  return _low_precision_product(spec, a, b), (a, b)


def _low_precision_product_bwd(spec, res, g):
  # The vjp of the product with a low-precision result: its two transposed products take
  # the (rounded) gradient and the saved low-precision operands.
  a, b = res
  _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y) if spec else jnp.matmul(x, y), a, b)
  return vjp(g.astype(a.dtype))


_low_precision_product.defvjp(_low_precision_product_fwd, _low_precision_product_bwd)


def rows(layer: nnx.Linear, x: jax.Array, compute_dtype: str = "float32") -> jax.Array:
  """``layer(x)`` on the rows of ``x [..., d]`` flattened to ``[N, d]``: one 2-D product (see
  the module docstring for why) in ``compute_dtype`` (``matmul``), reshaped back to
  ``[..., n]``. The bias is added in float32."""
  x2 = x.reshape(-1, x.shape[-1])
  if compute_dtype == "float32":
    y = layer(x2)
  else:
    y = matmul(x2, layer.kernel[...], compute_dtype)
    if layer.bias is not None:
      y = y + layer.bias[...]
  return y.reshape(*x.shape[:-1], -1)


class CausalSelfAttention(nnx.Module):
  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d = cfg.d_model
    self.n_head = cfg.n_head
    self.compute_dtype = cfg.compute_dtype
    self.qkv = nnx.Linear(d, 3 * d, kernel_init=_init, rngs=rngs)
    self.proj = nnx.Linear(d, d, kernel_init=nnx.initializers.normal(
        0.02 / math.sqrt(2 * cfg.n_layer)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(rows(self.qkv, x, self.compute_dtype), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, self.n_head, d // self.n_head)  # noqa: E731
    y = causal_attention(heads(q), heads(k), heads(v), compute_dtype=self.compute_dtype)
    return rows(self.proj, y.reshape(b, t, d), self.compute_dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     compute_dtype: str = "float32") -> jax.Array:
  r"""``softmax(q k^T / sqrt(hd) + causal mask) v`` for ``q, k, v [B, T, H, hd]``.

  The two products run in ``compute_dtype`` (float32 result), the softmax in float32.

  Written out rather than ``jax.nn.dot_product_attention(..., is_causal=True)``: the same
  math, and the default train step took 4-9% more CPU time with that one (XLA:CPU; per-head
  slices, an additive mask and a single [3, B, H, T, hd] transpose measured the same as this).
  """
  t, hd = q.shape[1], q.shape[-1]
  scores = matmul(q, k, compute_dtype, spec="bqhd,bkhd->bhqk") * (1.0 / math.sqrt(hd))
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  # A finite fill: a fully masked row cannot occur (the diagonal is always kept), but a
  # finite value keeps even that case NaN-free.
  scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
  return matmul(jax.nn.softmax(scores, axis=-1), v, compute_dtype, spec="bhqk,bkhd->bqhd")


class MLP(nnx.Module):
  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    self.compute_dtype = cfg.compute_dtype
    self.fc = nnx.Linear(d, h, kernel_init=_init, rngs=rngs)
    self.proj = nnx.Linear(h, d, kernel_init=nnx.initializers.normal(
        0.02 / math.sqrt(2 * cfg.n_layer)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    return rows(self.proj, jax.nn.gelu(rows(self.fc, x, cd)), cd)


class Block(nnx.Module):
  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs)
    self.ln2 = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
  """Decoder-only transformer: ``tokens [B, T] int -> logits [B, T, V] float32``."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_init, rngs=rngs)
    self.wpe = nnx.Embed(cfg.block_size, cfg.d_model, embedding_init=_init, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
    self.head = (None if cfg.tied_head else
                 nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=_init,
                            rngs=rngs))

  def hidden(self, tokens: jax.Array) -> jax.Array:
    """Final (LayerNormed) hidden states ``[B, T, d]``: the input of the LM head."""
    t = tokens.shape[-1]
    if t > self.cfg.block_size:
      raise ValueError(f"GPT: sequence length {t} exceeds block_size {self.cfg.block_size}")
    x = self.wte(tokens) + self.wpe(jnp.arange(t))
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x)

  def head_kernel(self) -> jax.Array:
    """The LM head as a ``[d, V]`` kernel (the transposed embedding when tied)."""
    if self.head is None:
      return self.wte.embedding[...].T
    return self.head.kernel[...]

  def __call__(self, tokens: jax.Array) -> jax.Array:
    h = self.hidden(tokens)
    logits = matmul(h.reshape(-1, h.shape[-1]), self.head_kernel(), self.cfg.compute_dtype)
    return logits.reshape(*h.shape[:-1], -1)


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def generate(graphdef: nnx.GraphDef, params, prompt: jax.Array, num_tokens: int,
             key: jax.Array, *, temperature: float = 0.8, top_k: int | None = None
             ) -> jax.Array:
  """Samples ``num_tokens`` tokens after ``prompt`` (1-D int array); returns only the new ones.

  One jitted ``lax.fori_loop``: each step runs the model on the last ``block_size`` tokens
  (a fixed-size window, so one compilation) and samples from ``softmax(logits / temperature)``
  restricted to the ``top_k`` most likely tokens. Causality makes the not-yet-written tail of
  the window irrelevant to the logits we read, so no padding mask is needed.
  """
  check_int("generate", "num_tokens", num_tokens, lo=1)
  prompt = jnp.asarray(prompt, jnp.int32).reshape(-1)
  if prompt.size == 0:
    raise ValueError("generate: `prompt` must hold at least one token")
  model_cfg = nnx.merge(graphdef, params).cfg
  return _generate(graphdef, params, prompt, key, num_tokens, float(temperature), top_k,
                   model_cfg.block_size)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, params, prompt, key, num_tokens, temperature, top_k, block):
  model = nnx.merge(graphdef, params)
  p = prompt.shape[0]
  buf = jnp.zeros((p + num_tokens + block,), jnp.int32).at[:p].set(prompt)

  def body(i, carry):
    buf, key = carry
    length = p + i
    start = jnp.maximum(length - block, 0)
    window = jax.lax.dynamic_slice(buf, (start,), (block,))
    logits = model(window[None])[0, length - 1 - start] / temperature
    if top_k is not None:
      kth = jax.lax.top_k(logits, top_k)[0][-1]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    key, sub = jax.random.split(key)
    tok = jax.random.categorical(sub, logits).astype(jnp.int32)
    return buf.at[length].set(tok), key

  buf, _ = jax.lax.fori_loop(0, num_tokens, body, (buf, key))
  return buf[p:p + num_tokens]
