"""GRPO on a verifiable toy task: a tiny GPT learns, from reward alone, to count up.

The policy is the nano GPT of ``jaxopt_llm.train.model`` (2 layers, 2 heads, d = 64) over
the 10 digits, randomly initialised: it has never seen the task. Each prompt is one digit
``p``; the right completion is ``p+1, p+2, p+3, p+4`` (mod 10). The reward of a sampled
completion is the fraction of its 4 digits that are right (verifiable, no reward model),
about 1/10 for a random policy.

Each step samples ``--group`` completions for each of ``--prompts`` prompts, turns the
rewards into group-relative advantages (``losses.group_advantages``), scores the
completions' per-token log-probs from the hidden states and the head kernel without the
``[N, V]`` logits (``losses.token_log_probs_from_hidden``), and takes ``--iterations``
Adam steps on ``losses.grpo_loss`` (TRL's defaults: ``loss_type="dapo"``, clip range
0.2; after the first step the policy is off the sampling policy, so the ratio and its
clipping are live). With ``--beta > 0`` a KL penalty to the initial policy is added.

Printed every ``--print-every`` steps: the mean sampled reward over those steps (the
curve), the greedy exact-match rate over the 10 prompts, the last loss and clip ratio
(``clip_ratio/region_mean``). With the defaults the reward goes from about 0.1 to
about 1.0 and greedy decoding solves every prompt within 300 steps, in about a minute on
two CPU cores. (A learning rate of 1e-2 collapses the policy onto a wrong deterministic
answer, after which every group has zero reward variance and zero advantage.)

    python examples/grpo_toy.py [--steps 300] [--loss-type dapo] [--beta 0.0]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_llm import losses, optim
from jaxopt_llm.losses.grpo import LOSS_TYPES
from jaxopt_llm.train.model import GPT, GPTConfig

VOCAB = 10
PROMPT = 1
LENGTH = 4


def targets(prompts):
  return (prompts[:, -1:] + jnp.arange(1, LENGTH + 1)) % VOCAB


def reward_fn(prompts, completions):
  """The verifiable reward: fraction of completion tokens equal to the target."""
  return jnp.mean((completions == targets(prompts)).astype(jnp.float32), axis=1)


def completion_log_probs(graphdef, params, seqs):
  """``log pi(y_t)`` of the ``LENGTH`` completion tokens, ``[N, LENGTH]``."""
  model = nnx.merge(graphdef, params)
  where = jnp.arange(seqs.shape[1]) >= PROMPT          # only the completion is scored
  logp = losses.token_log_probs_from_hidden(
      model.hidden(seqs), model.head_kernel(), seqs,
      where=jnp.broadcast_to(where, seqs.shape), shift=True)
  return logp[:, PROMPT - 1:]


def sample(graphdef, params, prompts, key, greedy=False):
  """Completes each prompt with ``LENGTH`` tokens sampled at temperature 1 (or argmax)."""
  model = nnx.merge(graphdef, params)
  n = prompts.shape[0]
  buf = jnp.zeros((n, PROMPT + LENGTH), jnp.int32).at[:, :PROMPT].set(prompts)

  def body(i, carry):
    buf, key = carry
    # Causal: the not-yet-written tail of the buffer does not change these logits.
    logits = model(buf)[:, PROMPT - 1 + i]
    key, sub = jax.random.split(key)
    tok = (jnp.argmax(logits, -1) if greedy else jax.random.categorical(sub, logits))
    return buf.at[:, PROMPT + i].set(tok.astype(jnp.int32)), key

  buf, _ = jax.lax.fori_loop(0, LENGTH, body, (buf, key))
  return buf


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
  parser.add_argument("--group", type=int, default=8, help="completions per prompt")
  parser.add_argument("--iterations", type=int, default=2,
                      help="gradient steps per sampled batch (TRL's num_iterations)")
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--loss-type", default="dapo", choices=LOSS_TYPES)
  parser.add_argument("--beta", type=float, default=0.0, help="KL to the initial policy")
  parser.add_argument("--print-every", type=int, default=25)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  t0 = time.time()

  cfg = GPTConfig(vocab_size=VOCAB, block_size=PROMPT + LENGTH, n_layer=2, n_head=2,
                  d_model=64)
  graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(args.seed)))
  reference = params
  tx = optim.adamw(args.lr, weight_decay=0.0)
  opt_state = tx.init(params)
  mask = jnp.ones((args.prompts * args.group, LENGTH), bool)   # fixed-length completions
  grpo_kwargs = dict(loss_type=args.loss_type, beta=args.beta,
                     max_completion_length=LENGTH)
  if args.loss_type == "cispo":
    grpo_kwargs["epsilon_high"] = 5.0     # ScaleRL's cap on the ratio itself

  @jax.jit
  def rollout(params, key):
    k_prompt, k_sample = jax.random.split(key)
    prompts = jax.random.randint(k_prompt, (args.prompts, PROMPT), 0, VOCAB)
    prompts = jnp.repeat(prompts, args.group, axis=0)     # a group per prompt
    seqs = sample(graphdef, params, prompts, k_sample)
    rewards = reward_fn(prompts, seqs[:, PROMPT:])
    advantages, reward_metrics = losses.group_advantages(rewards, args.group)
    old = completion_log_probs(graphdef, params, seqs)   # the sampling policy's
    ref = completion_log_probs(graphdef, reference, seqs) if args.beta else None
    return seqs, advantages, old, ref, reward_metrics

  @jax.jit
  def update(params, opt_state, seqs, advantages, old, ref):
    def loss_fn(params):
      logp = completion_log_probs(graphdef, params, seqs)
      return losses.grpo_loss(logp, old, advantages, mask, ref_per_token_logps=ref,
                              **grpo_kwargs)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  @jax.jit
  def greedy_exact(params):
    prompts = jnp.arange(VOCAB)[:, None]
    seqs = sample(graphdef, params, prompts, jax.random.PRNGKey(0), greedy=True)
    return jnp.mean(jnp.all(seqs[:, PROMPT:] == targets(prompts), axis=1))

  history: dict[str, list[float]] = {"step": [], "reward": [], "greedy_exact": [],
                                     "loss": [], "clip": []}
  print(f"GRPO ({args.loss_type}) on 'count up from the prompt digit', nano GPT from "
        f"scratch, {args.prompts} prompts x {args.group} completions per step")
  print(f"{'step':>5s} {'reward':>7s} {'greedy exact':>12s} {'loss':>9s} {'clip':>6s}")
  key = jax.random.PRNGKey(args.seed)
  window = []
  for step in range(args.steps + 1):
    key, sub = jax.random.split(key)
    seqs, advantages, old, ref, reward_metrics = rollout(params, sub)
    window.append(float(reward_metrics["reward"]))
    if step < args.steps:
      for _ in range(args.iterations):
        params, opt_state, loss, metrics = update(params, opt_state, seqs, advantages,
                                                  old, ref)
    if step % args.print_every == 0 or step == args.steps:
      clip = float(metrics.get("clip_ratio/region_mean", np.nan)) if step else 0.0
      row = (step, float(np.mean(window)), float(greedy_exact(params)),
             float(loss) if step else 0.0, clip)
      window = []
      for name, value in zip(history, row):
        history[name].append(value)
      print(f"{row[0]:5d} {row[1]:7.3f} {row[2]:12.0%} {row[3]:9.4f} {row[4]:6.3f}")
  print(f"\nmean sampled reward {history['reward'][0]:.3f} -> {history['reward'][-1]:.3f}; "
        f"greedy exact match {history['greedy_exact'][0]:.0%} -> "
        f"{history['greedy_exact'][-1]:.0%} ({time.time() - t0:.1f}s)")
  return history


if __name__ == "__main__":
  main()
