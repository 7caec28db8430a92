"""The quick demo (`make run`): a character-level MLP language model trained on a small
embedded text with AdamW and with Lion, both under a warmup-cosine schedule. Prints the
loss falling against the unigram baseline, then a sample. Runs in well under a minute on
two CPU cores. (The full Flax NNX GPT training lands as the main job in a later release.)
"""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm import losses, optim, schedules

# ---- config -----------------------------------------------------------------------------
CONTEXT = 4          # characters of context
EMBED = 16
HIDDEN = 96
BATCH = 128
STEPS = 600
WARMUP = 60
EVAL_EVERY = 100
SEED = 0
# Lion takes a 3-10x smaller lr and a larger decay than AdamW (Chen et al., 2023).
OPTIMIZERS = {
    "adamw": lambda lr: optim.adamw(lr, b2=0.95, weight_decay=0.1, mask=optim.weight_decay_mask),
    "lion": lambda lr: optim.lion(lr, b2=0.99, weight_decay=0.3, mask=optim.weight_decay_mask),
}
PEAK_LR = {"adamw": 3e-3, "lion": 1e-3}

TEXT = """\
The harbour was quiet in the early morning. Fishing boats rocked against the stone pier,
their ropes creaking as the tide came in, and the gulls walked along the wall looking for
anything the night had left behind. An old man sat on a crate mending a net, pulling the
twine through each knot with the patience of someone who had done it ten thousand times.
The baker at the corner opened her shutters and the smell of bread drifted down to the
water. A boy ran past with a basket of eggs, careful not to run too fast, and the old man
called after him to mind the step by the chandler's door. The boy laughed and slowed down.
By the time the sun was over the lighthouse the market was full. There were crates of
mackerel and herring, baskets of mussels, bundles of rope and cork floats, and a woman
selling lemons from a wooden cart. People bargained loudly and then shook hands. A dog
slept in the shade of the fish stall and did not move for anyone. The harbour master
walked slowly along the quay with a notebook, writing down the names of the boats that had
come in and the boats that had not. Two boats were still out. He looked at the sky, which
was clear, and at the sea, which was calm, and he wrote nothing more. In the afternoon the
wind turned and the water grew rough. The market closed early. The old man folded his net
and carried it to his shed, and the baker sold the last of her bread at half the price.
Everyone looked out to sea from time to time without saying why. Near evening the first of
the two boats came round the point, low in the water with its catch, and a cheer went up
along the pier. The second boat came in an hour later with a torn sail and a tired crew,
and the harbour master closed his notebook at last. That night the inn by the water was
loud with stories, and the boy who had carried the eggs fell asleep under a table while
the fishermen told of the wind, the waves, and the long way home.
"""


def make_data():
  chars = sorted(set(TEXT))
  ids = np.array([chars.index(c) for c in TEXT], np.int32)
  split = int(0.9 * len(ids))
  return chars, jnp.asarray(ids[:split]), jnp.asarray(ids[split:])


def unigram_entropy(ids, vocab):
  p = np.bincount(np.asarray(ids), minlength=vocab) / len(ids)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def init_params(key, vocab):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "embed": 0.1 * jax.random.normal(k1, (vocab, EMBED)),
      "hidden": {"kernel": jax.random.normal(k2, (CONTEXT * EMBED, HIDDEN)) / math.sqrt(CONTEXT * EMBED),
                 "bias": jnp.zeros(HIDDEN)},
      "out": {"kernel": jax.random.normal(k3, (HIDDEN, vocab)) / math.sqrt(HIDDEN),
              "bias": jnp.zeros(vocab)},
  }


def forward(params, x):
  e = params["embed"][x].reshape(x.shape[0], -1)
  h = jnp.tanh(e @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def windows(ids, key, n):
  start = jax.random.randint(key, (n,), 0, ids.shape[0] - CONTEXT - 1)
  idx = start[:, None] + jnp.arange(CONTEXT + 1)
  w = ids[idx]
  return w[:, :CONTEXT], w[:, CONTEXT]


def train(name, train_ids, val_ids, vocab):
  schedule = schedules.warmup_cosine(PEAK_LR[name], WARMUP, STEPS, min_lr=PEAK_LR[name] / 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), OPTIMIZERS[name](schedule))
  params = init_params(jax.random.PRNGKey(SEED), vocab)
  state = tx.init(params)

  def loss_fn(params, x, y):
    return losses.cross_entropy(forward(params, x), y)

  @jax.jit
  def step(params, state, key):
    x, y = windows(train_ids, key, BATCH)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def evaluate(params):
    x, y = windows(val_ids, jax.random.PRNGKey(123), 1024)
    return loss_fn(params, x, y)

  history = []
  key = jax.random.PRNGKey(SEED + 1)
  for t in range(STEPS + 1):
    if t % EVAL_EVERY == 0:
      history.append((t, float(evaluate(params)), float(schedule(t))))
    if t < STEPS:
      key, sub = jax.random.split(key)
      params, state, _ = step(params, state, sub)
  return params, history


def sample(params, chars, prompt, n=160, temperature=0.7):
  ids = [chars.index(c) for c in prompt]
  key = jax.random.PRNGKey(7)
  fwd = jax.jit(forward)
  for _ in range(n):
    x = jnp.asarray(ids[-CONTEXT:], jnp.int32)[None]
    key, sub = jax.random.split(key)
    ids.append(int(jax.random.categorical(sub, fwd(params, x)[0] / temperature)))
  return "".join(chars[i] for i in ids)


def main():
  chars, train_ids, val_ids = make_data()
  vocab = len(chars)
  baseline = unigram_entropy(train_ids, vocab)
  print(f"corpus: {len(TEXT)} characters, vocabulary {vocab}; "
        f"unigram entropy {baseline:.3f} nats (a model that ignores context)")
  results = {}
  for name in OPTIMIZERS:
    t0 = time.time()
    results[name] = train(name, train_ids, val_ids, vocab)
    print(f"trained {name:5s} for {STEPS} steps in {time.time() - t0:.1f}s")
  print(f"\nvalidation loss (nats/char), warmup {WARMUP} + cosine to step {STEPS}")
  print(f"{'step':>5s}  " + "  ".join(f"{n:>7s} {'lr':>8s}" for n in OPTIMIZERS))
  for i in range(len(results["adamw"][1])):
    row = [results[n][1][i] for n in OPTIMIZERS]
    print(f"{row[0][0]:5d}  " + "  ".join(f"{loss:7.3f} {lr:8.2e}" for _, loss, lr in row))
  for name in OPTIMIZERS:
    final = results[name][1][-1][1]
    verdict = "below" if final < baseline else "NOT below"
    print(f"{name}: {results[name][1][0][1]:.3f} -> {final:.3f} nats, {verdict} the unigram "
          f"baseline {baseline:.3f} (perplexity {math.exp(final):.1f})")
  print("\nsample (adamw):", repr(sample(results["adamw"][0], chars, "The boat")))


if __name__ == "__main__":
  main()
