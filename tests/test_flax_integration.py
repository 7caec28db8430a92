"""Our optimizers, schedules and losses drop into a Flax NNX training loop unchanged."""
import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jaxopt_llm import losses, optim, schedules


class TinyLM(nnx.Module):
  def __init__(self, vocab: int, dim: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    return self.head(self.norm(self.embed(tokens)))


@pytest.mark.parametrize("make_tx", [
    lambda s: optim.adamw(s, b2=0.95, weight_decay=0.1, mask=optim.weight_decay_mask),
    lambda s: optim.lion(s, weight_decay=0.1),
    lambda s: optim.momentum(s),
])
def test_nnx_optimizer_train_step_lowers_loss(make_tx):
  vocab = 16
  model = TinyLM(vocab, 32, nnx.Rngs(0))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   make_tx(schedules.warmup_cosine(3e-2, 5, 60, min_lr=3e-3)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # a deterministic next-token rule the model can learn: t -> (3 t + 1) mod vocab
  tokens = (jnp.arange(8 * 12).reshape(8, 12) * 7) % vocab
  tokens = tokens.at[:, 1:].set((3 * tokens[:, :-1] + 1) % vocab)

  @nnx.jit
  def train_step(model, optimizer, tokens):
    def loss_fn(model):
      return losses.causal_lm_loss(model(tokens), tokens)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  first = float(train_step(model, optimizer, tokens))
  for _ in range(59):
    last = float(train_step(model, optimizer, tokens))
  assert last < 0.5 * first, (first, last)


def test_nnx_step_equals_functional_optax_step():
  model = TinyLM(8, 8, nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.adamw(1e-2, weight_decay=0.1)
  tokens = jnp.arange(16).reshape(2, 8) % 8

  def loss_of(params):
    return losses.causal_lm_loss(nnx.merge(graphdef, params)(tokens), tokens)

  grads = jax.grad(loss_of)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads_nnx = nnx.grad(lambda m: losses.causal_lm_loss(m(tokens), tokens))(model)
  optimizer.update(model, grads_nnx)
  chex.assert_trees_all_close(nnx.state(model, nnx.Param), expected, rtol=1e-6, atol=1e-7)
