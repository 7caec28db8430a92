"""Flax linen + ``flax.training.train_state.TrainState`` with jaxopt_llm.

A small causal transformer in linen on the embedded corpus, trained with ``optim.lion`` under a
warmup-stable-decay schedule (``schedules.wsd``), gradient accumulation (``optax.MultiSteps``)
and ``optax.apply_if_finite`` (a non-finite gradient skips the update). Our optimizers are
plain ``optax.GradientTransformation``s, so ``TrainState.apply_gradients`` takes them as is.
About a minute on two CPU cores.
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxopt_llm import losses, optim, schedules
from jaxopt_llm.train import data

STEPS, ACCUM, BATCH, CONTEXT, VOCAB = 300, 2, 16, 64, data.VOCAB_SIZE  # 300 updates


class Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + nn.SelfAttention(num_heads=self.heads)(nn.LayerNorm()(x), mask=mask)
    h = nn.Dense(4 * self.d)(nn.LayerNorm()(x))
    return x + nn.Dense(self.d)(nn.gelu(h))


class TinyLM(nn.Module):
  d: int = 64
  heads: int = 2
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, self.d)
    pos = self.param("pos", nn.initializers.normal(0.02), (CONTEXT, self.d))
    x = embed(tokens) + pos[: tokens.shape[1]]
    for _ in range(self.layers):
      x = Block(self.d, self.heads)(x)
    return embed.attend(nn.LayerNorm()(x))  # tied head


train_ids, val_ids = data.train_val_split(data.encode(data.load_corpus()))
batches = data.BatchIterator(train_ids, BATCH, CONTEXT, seed=0)
val = jnp.asarray(data.eval_windows(val_ids, CONTEXT, max_windows=256))

model = TinyLM()
params = model.init(jax.random.PRNGKey(0), val[:1])["params"]
schedule = schedules.wsd(3e-3, warmup_steps=30, stable_steps=210, decay_steps=60, min_lr=3e-4)
lion = optim.lion(schedule, b2=0.99, weight_decay=0.3, mask=optim.weight_decay_mask)
tx = optax.apply_if_finite(
    optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), lion), ACCUM),
    max_consecutive_errors=5)
state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def loss_fn(params, tokens):
  return losses.causal_lm_loss(state.apply_fn({"params": params}, tokens), tokens)


@jax.jit
def train_step(state, tokens):  # one micro-batch; MultiSteps applies every ACCUM calls
  loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
  return state.apply_gradients(grads=grads), loss


@jax.jit
def evaluate(params, tokens):
  logits = model.apply({"params": params}, tokens)
  return (losses.causal_lm_loss(logits, tokens),
          losses.token_accuracy(logits[:, :-1], tokens[:, 1:]))


t0 = time.time()
for update in range(1, STEPS + 1):
  for _ in range(ACCUM):
    state, loss = train_step(state, jnp.asarray(next(batches)))
  if update % 50 == 0:
    val_loss, acc = evaluate(state.params, val)
    print(f"update {update:4d}  train {float(loss):.3f}  val {float(val_loss):.3f} nats/byte"
          f"  acc {100 * float(acc):.1f}%  lr {float(schedule(update)):.2e}  "
          f"({time.time() - t0:.0f} s)")
print(f"unigram entropy of the corpus: {data.unigram_entropy(train_ids):.3f} nats/byte")
