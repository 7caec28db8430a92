"""DPO on a toy task: a tiny language model learns to count up rather than down.

1. SFT: a small MLP language model (it sees the last two tokens) is trained on prompts
   of random tokens followed by a response that counts either up (t+1, t+2, ...) or down
   (t-1, t-2, ...) from the last prompt token, half and half. It learns both, so a
   greedy continuation counts up about half of the time. This model is the reference.
2. DPO: starting from the reference, pairs (chosen = counting up, rejected = counting
   down) train the policy with ``losses.dpo_loss`` (TRL 1.16's DPO loss) on the per-token
   log-probs and completion masks of ``losses.per_token_log_probs``, so every TRL 1.16 loss
   type works, the length-normalised ones (``ipo``, ``sigmoid_norm``) and ``sft`` included.

Printed every few steps on held-out pairs: the DPO loss, the reward accuracy (how often
the implicit reward beta * log(pi / ref) ranks the chosen response above the rejected
one; 0 at step 0, where policy == reference and every reward is 0), the reward margin,
and how often the policy's greedy continuation counts up. Runs in a few seconds on CPU.

    python examples/dpo_toy.py [--steps 100] [--beta 0.1] [--loss-type sigmoid]
                               [--label-smoothing 0.0]
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm import losses, optim

VOCAB = 16
PROMPT = 3
RESPONSE = 5
EMBED = 16
HIDDEN = 64
IGNORE = -100


def init_params(rng):
  params = {
      "embed": 0.5 * rng.standard_normal((VOCAB, EMBED)),
      "embed_prev": 0.5 * rng.standard_normal((VOCAB, EMBED)),
      "hidden": {"kernel": rng.standard_normal((2 * EMBED, HIDDEN)) / math.sqrt(2 * EMBED),
                 "bias": np.zeros(HIDDEN)},
      "out": {"kernel": rng.standard_normal((HIDDEN, VOCAB)) / math.sqrt(HIDDEN),
              "bias": np.zeros(VOCAB)},
  }
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def forward(params, ids):
  """Logits ``[N, T, V]``: position t predicts token t + 1 from tokens t and t - 1."""
  prev = jnp.pad(ids[:, :-1], ((0, 0), (1, 0)))
  h = jnp.concatenate([params["embed"][ids], params["embed_prev"][prev]], axis=-1)
  h = jax.nn.gelu(h @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def make_pairs(rng, n):
  """Prompts with their counting-up (chosen) and counting-down (rejected) responses.

  Made on the host with numpy: cheap, and nothing to compile."""
  prompt = rng.integers(0, VOCAB, (n, PROMPT), dtype=np.int32)
  steps = np.arange(1, RESPONSE + 1, dtype=np.int32)
  last = prompt[:, -1:]
  up = np.concatenate([prompt, (last + steps) % VOCAB], axis=1)
  down = np.concatenate([prompt, (last - steps) % VOCAB], axis=1)
  return up, down


def response_labels(ids):
  # Only the response is scored: the prompt's labels are ignored.
  return jnp.asarray(ids).at[:, :PROMPT].set(IGNORE)


def logps(params, ids):
  return losses.sequence_log_probs(forward(params, ids), response_labels(ids), shift=True)


def token_logps(params, ids):
  """Per-token log-probs of the response and its mask, ``[N, T - 1]`` each."""
  return losses.per_token_log_probs(forward(params, ids), response_labels(ids), shift=True)


def greedy_counts_up(params, prompts):
  ids = prompts
  for _ in range(RESPONSE):
    nxt = jnp.argmax(forward(params, ids)[:, -1], axis=-1)
    ids = jnp.concatenate([ids, nxt[:, None]], axis=1)
  want = (prompts[:, -1:] + jnp.arange(1, RESPONSE + 1)) % VOCAB
  return jnp.mean(jnp.all(ids[:, PROMPT:] == want, axis=1))


def sft(rng, steps, batch, lr=1e-2):
  tx = optim.adamw(lr, weight_decay=0.0)
  params = init_params(rng)
  state = tx.init(params)

  @jax.jit
  def step(params, state, ids):
    loss_fn = lambda p: -jnp.mean(logps(p, ids)) / RESPONSE  # noqa: E731
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  for _ in range(steps):
    up, down = make_pairs(rng, batch)
    ids = np.where(rng.random((batch, 1)) < 0.5, up, down)
    params, state, _ = step(params, state, ids)
  return params


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=100, help="DPO steps")
  parser.add_argument("--sft-steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--loss-type", default="sigmoid",
                      choices=losses.preference.LOSS_TYPES)
  parser.add_argument("--label-smoothing", type=float, default=0.0,
                      help="robust, exo_pair (needs > 0), aot, aot_unpaired")
  parser.add_argument("--eval-every", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  t0 = time.time()
  rng = np.random.default_rng(args.seed)
  reference = sft(rng, args.sft_steps, args.batch)
  eval_up, eval_down = make_pairs(np.random.default_rng(10_000 + args.seed), 512)

  tx = optim.adamw(args.lr, weight_decay=0.0)

  def dpo(params, reference, chosen, rejected):
    # The reference is frozen: its log-probs carry no gradient.
    (ref_c, _), (ref_r, _) = jax.lax.stop_gradient((token_logps(reference, chosen),
                                                    token_logps(reference, rejected)))
    (pol_c, mask_c), (pol_r, mask_r) = token_logps(params, chosen), token_logps(params,
                                                                                rejected)
    return losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, chosen_mask=mask_c,
                           rejected_mask=mask_r, beta=args.beta, loss_type=args.loss_type,
                           label_smoothing=args.label_smoothing)

  @jax.jit
  def step(params, state, reference, chosen, rejected):
    (loss, metrics), grads = jax.value_and_grad(dpo, has_aux=True)(
        params, reference, chosen, rejected)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, metrics

  @jax.jit
  def evaluate(params, reference, eval_up, eval_down):
    # Held-out pairs; policy and reference go through the same computation, so at
    # step 0 (policy == reference) every reward is exactly 0.
    loss, metrics = dpo(params, reference, eval_up, eval_down)
    return loss, metrics, greedy_counts_up(params, eval_up[:, :PROMPT])

  params = reference
  state = tx.init(params)
  print(f"SFT reference: {args.sft_steps} steps on responses counting up or down, half "
        f"and half; its greedy continuation counts up "
        f"{float(evaluate(reference, reference, eval_up, eval_down)[2]):.0%} of the time")
  history: dict[str, list[float]] = {"step": [], "loss": [], "reward_accuracy": [],
                                     "reward_margin": [], "counts_up": []}
  print(f"\nDPO ({args.loss_type}, beta={args.beta}) on held-out pairs:")
  print(f"{'step':>5s} {'loss':>8s} {'reward acc':>10s} {'margin':>8s} {'counts up':>9s}")
  for t in range(args.steps + 1):
    if t % args.eval_every == 0 or t == args.steps:
      loss, metrics, up = evaluate(params, reference, eval_up, eval_down)
      row = (t, float(loss), float(metrics["rewards/accuracies"]),
             float(metrics["rewards/margins"]), float(up))
      for name, value in zip(history, row):
        history[name].append(value)
      print(f"{row[0]:5d} {row[1]:8.4f} {row[2]:10.1%} {row[3]:8.3f} {row[4]:9.0%}")
    if t < args.steps:
      params, state, _, _ = step(params, state, reference, *make_pairs(rng, args.batch))
  print(f"\nreward accuracy {history['reward_accuracy'][0]:.0%} -> "
        f"{history['reward_accuracy'][-1]:.0%}; greedy counts up "
        f"{history['counts_up'][0]:.0%} -> {history['counts_up'][-1]:.0%} "
        f"({time.time() - t0:.1f}s)")
  return history


if __name__ == "__main__":
  main()
