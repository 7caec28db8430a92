"""The tiny GPT: causal, logits = hidden @ head, reference attention, generate = greedy loop."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_llm.train import data
from jaxopt_llm.train import model as M


def fixed_batch(b=2, t=16, seed=0) -> jnp.ndarray:
  ids = data.encode(data.load_corpus())
  starts = np.random.default_rng(seed).integers(0, len(ids) - t, size=b)
  return jnp.asarray(ids[starts[:, None] + np.arange(t)])


@pytest.fixture(scope="module")
def tiny_model():
  cfg = M.GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=16)
  return nnx.jit(lambda: M.GPT(cfg, nnx.Rngs(0)))()  # jitted: one compilation for all inits


@nnx.jit
def forward(model, x):  # one compilation per shape, instead of one per op when eager
  return model(x), model.hidden(x) @ model.head_kernel()


def test_model_is_causal_and_logits_are_hidden_times_head(tiny_model):
  x = fixed_batch(2, 16)
  logits, from_hidden = forward(tiny_model, x)
  chex.assert_shape(logits, (2, 16, 256))
  chex.assert_type(logits, jnp.float32)
  y = x.at[:, 9:].set((x[:, 9:] + 17) % 256)  # change the future from position 9 on
  changed, _ = forward(tiny_model, y)
  np.testing.assert_array_equal(changed[:, :9], logits[:, :9])
  assert not np.allclose(changed[:, 9:], logits[:, 9:])
  np.testing.assert_array_equal(from_hidden, logits)
  # tied head: the kernel is the embedding, transposed
  np.testing.assert_array_equal(tiny_model.head_kernel(), tiny_model.wte.embedding[...].T)


def test_attention_equals_reference_softmax_attention(tiny_model):
  @nnx.jit
  def both(attn, x):
    q, k, v = jnp.split(attn.qkv(x), 3, axis=-1)
    heads = lambda z: z.reshape(2, 16, 2, 8)  # noqa: E731
    ref = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True,
                                       implementation="xla")
    return attn(x), attn.proj(ref.reshape(2, 16, 16))

  ours, ref = both(tiny_model.blocks[0].attn, jax.random.normal(jax.random.PRNGKey(0),
                                                                  (2, 16, 16)))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_untied_head_has_its_own_kernel():
  cfg = M.GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8, tied_head=False)
  m = nnx.jit(lambda: M.GPT(cfg, nnx.Rngs(0)))()
  chex.assert_shape(m.head_kernel(), (16, 256))
  assert not np.allclose(m.head_kernel(), m.wte.embedding[...].T)
  assert "head" in nnx.to_pure_dict(nnx.state(m))
  logits, from_hidden = forward(m, jnp.zeros((1, 8), jnp.int32))
  np.testing.assert_array_equal(logits, from_hidden)


def test_model_config_validation():
  with pytest.raises(ValueError, match="d_model"):
    M.GPTConfig(d_model=10, n_head=4)
  with pytest.raises(ValueError, match="size"):
    M.GPTConfig.from_size("huge")
  abstract = nnx.eval_shape(
      lambda: M.GPT(M.GPTConfig(n_layer=1, n_head=1, d_model=8, block_size=4), nnx.Rngs(0)))
  with pytest.raises(ValueError, match="block_size"):
    abstract(jnp.zeros((1, 5), jnp.int32))


def test_generate_top1_equals_a_greedy_reference_loop(tiny_model):
  graphdef, params = nnx.split(tiny_model)
  block = tiny_model.cfg.block_size
  for prompt in (data.encode("The "), data.encode("x" * 20)):  # shorter / longer than block
    out = M.generate(graphdef, params, prompt, 24, jax.random.PRNGKey(0), top_k=1)
    chex.assert_shape(out, (24,))
    ref = list(prompt)
    for _ in range(24):
      # Greedy, on the last `block` tokens: zero-padded on the right to one fixed shape
      # (a single compilation); position len-1 cannot see the padding (causal, tested above).
      window = ref[-block:]
      x = jnp.zeros((1, block), jnp.int32).at[0, :len(window)].set(jnp.asarray(window))
      ref.append(int(jnp.argmax(forward(tiny_model, x)[0][0, len(window) - 1])))
    np.testing.assert_array_equal(out, ref[len(prompt):])
  a = M.generate(graphdef, params, prompt, 10, jax.random.PRNGKey(1))
  b = M.generate(graphdef, params, prompt, 10, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert ((a >= 0) & (a < 256)).all()


# --- mixed precision: compute_dtype="bfloat16" ---------------------------------------------

def dot_dtypes(fn, *args) -> list[tuple]:
  """(lhs, rhs, out) dtypes of every dot_general in ``fn``'s jaxpr, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(sub, "jaxpr"):  # ClosedJaxpr
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_bf16_matmul_is_the_product_of_bf16_rounded_inputs_accumulated_in_float32():
  a = jax.random.normal(jax.random.PRNGKey(0), (8, 32))
  b = jax.random.normal(jax.random.PRNGKey(1), (32, 5))
  got = M.matmul(a, b, "bfloat16")
  chex.assert_type(got, jnp.float32)
  # bf16 x bf16 products are exact in float32: only the summation order may differ.
  rounded = np.asarray(a.astype(jnp.bfloat16), np.float64) @ np.asarray(
      b.astype(jnp.bfloat16), np.float64)
  np.testing.assert_allclose(got, rounded, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got) - np.asarray(a @ b)).max() > 1e-3  # it did round
  np.testing.assert_array_equal(M.matmul(a, b), a @ b)  # float32: the plain product
  # A batched product (attention's p @ v), jitted: the path older XLA:CPU cannot run natively.
  p = jax.random.uniform(jax.random.PRNGKey(2), (2, 2, 8, 8))
  v = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 2, 4))
  got = jax.jit(lambda p, v: M.matmul(p, v, "bfloat16", spec="bhqk,bkhd->bqhd"))(p, v)
  rounded = np.einsum("bhqk,bkhd->bqhd", *(np.asarray(z.astype(jnp.bfloat16), np.float64)
                                           for z in (p, v)))
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, rounded, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="compute_dtype"):
    M.GPTConfig(compute_dtype="float16")


def test_bf16_model_keeps_float32_params_runs_every_product_in_bf16_and_stays_close():
  kw = dict(n_layer=2, n_head=2, d_model=16, block_size=16)
  m32 = nnx.jit(lambda: M.GPT(M.GPTConfig(**kw), nnx.Rngs(0)))()
  m16 = nnx.jit(lambda: M.GPT(M.GPTConfig(**kw, compute_dtype="bfloat16"), nnx.Rngs(0)))()
  p32, p16 = nnx.to_pure_dict(nnx.state(m32)), nnx.to_pure_dict(nnx.state(m16))
  chex.assert_trees_all_equal(p16, p32)  # same init, float32 master weights
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
  x = fixed_batch(2, 16)
  # 2 layers x (qkv, q k^T, p v, proj, fc, proj) + the head: 13 products, all bf16 -> f32
  # (where the backend cannot, float32 products of the bf16-rounded operands: same numbers).
  native = ("bfloat16", "bfloat16", "float32")
  assert dot_dtypes(lambda: m16(x)) == [
      native if M.mixed_dot_supported() else ("float32",) * 3] * 13
  assert {d for d in dot_dtypes(lambda: m32(x))} == {("float32", "float32", "float32")}
  l32, l16 = forward(m32, x)[0], forward(m16, x)[0]
  chex.assert_type(l16, jnp.float32)
  assert 0 < np.abs(np.asarray(l16 - l32)).max() < 0.05 * np.abs(np.asarray(l32)).max()
  # Causality survives the rounding.
  y = x.at[:, 9:].set((x[:, 9:] + 17) % 256)
  np.testing.assert_array_equal(forward(m16, y)[0][:, :9], l16[:, :9])
