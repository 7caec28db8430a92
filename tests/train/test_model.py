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
