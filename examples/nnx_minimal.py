"""Minimal Flax NNX training loop with jaxopt_llm's loss, optimizer and schedule.

The tiny GPT of ``jaxopt_llm.train`` on the embedded corpus (byte-level), trained with
``nnx.Optimizer`` around ``optim.adamw`` + ``schedules.warmup_cosine``; about a minute on two
CPU cores. ``jaxopt-llm train`` is the full version (guards, accumulation, checkpoints).
"""
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_llm import losses, optim, schedules
from jaxopt_llm.train import data
from jaxopt_llm.train.model import GPT, GPTConfig, generate

STEPS, BATCH, CONTEXT, PEAK_LR = 300, 32, 64, 1e-2

train_ids, val_ids = data.train_val_split(data.encode(data.load_corpus()))
batches = data.BatchIterator(train_ids, BATCH, CONTEXT, seed=0)
val = jnp.asarray(data.eval_windows(val_ids, CONTEXT, max_windows=256))

model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=64, block_size=CONTEXT), nnx.Rngs(0))
schedule = schedules.warmup_cosine(PEAK_LR, STEPS // 10, STEPS, min_lr=PEAK_LR / 10)
tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optim.adamw(schedule, b2=0.95, weight_decay=0.1, mask=optim.weight_decay_mask))
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, tokens):
  def loss_fn(model):
    return losses.causal_lm_loss(model(tokens), tokens)  # predicts token t+1 from t
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def evaluate(model, tokens):
  logits = model(tokens)
  return (losses.causal_lm_loss(logits, tokens),
          losses.token_accuracy(logits[:, :-1], tokens[:, 1:]))


t0 = time.time()
for step in range(1, STEPS + 1):
  loss = train_step(model, optimizer, jnp.asarray(next(batches)))
  if step % 50 == 0:
    val_loss, acc = evaluate(model, val)
    print(f"step {step:4d}  train {float(loss):.3f}  val {float(val_loss):.3f} nats/byte  "
          f"acc {100 * float(acc):.1f}%  lr {float(schedule(step)):.2e}  "
          f"({time.time() - t0:.0f} s)")

print(f"unigram entropy of the corpus: {data.unigram_entropy(train_ids):.3f} nats/byte")
graphdef, params = nnx.split(model)
new = generate(graphdef, params, data.encode("The "), 160, jax.random.PRNGKey(0))
print("sample:", repr("The " + data.decode(new)))
