"""Move a running PyTorch training to JAX with ``jaxopt_llm.from_torch``.

A small PyTorch GPT (byte-level, on the library's embedded corpus) trains for 100 steps with
AdamW, weight decay on the matrices only (two param groups) and a warmup-cosine LambdaLR,
while ``from_torch.Recorder`` records every step. Then:

1. ``from_torch.replay`` feeds the recorded gradients through the converted optimizer and
   prints the worst divergence from torch's parameters (the optimizer and scheduler alone:
   the gradients are torch's);
2. ``from_torch.optimizer`` / ``params`` / ``opt_state`` convert the optimizer, the
   scheduler, the weights and the AdamW moments, and the run continues in JAX (the same GPT
   written as a jax function of the torch-named weights) for 20 more steps, side by side with
   torch continuing on its own (and, to show what the state is worth, a JAX run restarted
   with fresh AdamW moments). The remaining gap is the model's: the JAX forward and backward
   are fp32 like torch's, not bitwise equal to them.

    python examples/migrate_from_torch.py          # about 15 s on two CPU cores

Needs torch (``pip install 'jaxopt_llm[torch]'``).
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from torch import nn

from jaxopt_llm import from_torch
from jaxopt_llm.losses import cross_entropy

VOCAB, CONTEXT, D, HEADS, LAYERS, BATCH = 256, 32, 32, 2, 2, 8
PEAK_LR, WARMUP = 3e-3, 10


# ---------------------------------------------------------------------------------------
# The PyTorch side: what the user has today.


class Block(nn.Module):
  def __init__(self):
    super().__init__()
    self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
    self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
    self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

  def forward(self, x):
    b, t, _ = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
    heads = lambda z: z.view(b, t, HEADS, D // HEADS).transpose(1, 2)
    y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, D))
    return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
  def __init__(self):
    super().__init__()
    self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(CONTEXT, D)
    self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
    self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

  def forward(self, idx):
    x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


def torch_loss(model, tokens):
  logits = model(tokens[:, :-1])
  return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def warmup_cosine(total):
  """The user's own lambda (not a Hugging Face one, so from_torch tabulates it)."""
  def lr_lambda(step):
    if step < WARMUP:
      return step / WARMUP
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - WARMUP) / (total - WARMUP))))
  return lr_lambda


# ---------------------------------------------------------------------------------------
# The same GPT as a jax function of the torch-named weights (Linear: y = x W^T + b).


def _layer_norm(x, p, name):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]


def _linear(x, p, name):
  y = x @ p[f"{name}.weight"].T
  return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def jax_logits(p, idx):
  b, t = idx.shape
  x = p["tok.weight"][idx] + p["pos.weight"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(LAYERS):
    n = f"blocks.{i}"
    q, k, v = jnp.split(_linear(_layer_norm(x, p, f"{n}.ln1"), p, f"{n}.qkv"), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, HEADS, D // HEADS).transpose(0, 2, 1, 3)
    att = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(D // HEADS)
    att = jax.nn.softmax(jnp.where(mask, att, -jnp.inf), axis=-1)
    y = (att @ heads(v)).transpose(0, 2, 1, 3).reshape(b, t, D)
    x = x + _linear(y, p, f"{n}.proj")
    h = jax.nn.gelu(_linear(_layer_norm(x, p, f"{n}.ln2"), p, f"{n}.fc"), approximate=True)
    x = x + _linear(h, p, f"{n}.out")
  return _linear(_layer_norm(x, p, "ln"), p, "head")


def batches(steps, seed=0):
  from jaxopt_llm.train import data
  ids = np.asarray(data.encode(data.load_corpus()), np.int64)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    starts = rng.integers(0, len(ids) - CONTEXT - 1, size=BATCH)
    yield np.stack([ids[s:s + CONTEXT + 1] for s in starts])


def max_rel(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))
                   / max(float(np.max(np.abs(np.asarray(b[k])))), 1e-30)) for k in b)


def main(steps: int = 100, extra: int = 20, out_dir: str | None = None) -> dict:
  t0 = time.time()
  torch.manual_seed(0)
  total = steps + extra
  model = GPT()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=PEAK_LR, betas=(0.9, 0.95))
  sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
  data = list(batches(total))

  # 1. train in PyTorch, recording every step
  rec = from_torch.Recorder(opt, sched, named_parameters=model.named_parameters(),
                            max_steps=steps)
  for tokens in data[:steps]:
    loss = torch_loss(model, torch.from_numpy(tokens))
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
  out_dir = out_dir or tempfile.mkdtemp(prefix="migrate_from_torch_")
  path = rec.save(os.path.join(out_dir, "run.npz"))
  print(f"torch: {steps} steps, loss {loss.item():.3f}; recorded to {path}")

  # 2. replay the recorded gradients through the converted optimizer
  report = from_torch.replay(path)
  print(report)
  print(f"worst divergence over the replay: {report.worst:.2e}")

  # 3. convert and continue in JAX from torch's state
  named = list(model.named_parameters())
  tx = from_torch.optimizer(opt, sched, named_parameters=named, steps=total)
  params = from_torch.params(named)
  state = from_torch.opt_state(opt, tx, params, scheduler=sched, named_parameters=named)

  @jax.jit
  def jax_step(params, state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: cross_entropy(jax_logits(p, tokens[:, :-1]), tokens[:, 1:]))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  fresh_params, fresh_state = params, tx.init(params)  # for comparison: moments dropped
  for tokens in data[steps:]:
    params, state, jloss = jax_step(params, state, jnp.asarray(tokens))
    fresh_params, fresh_state, _ = jax_step(fresh_params, fresh_state, jnp.asarray(tokens))
    loss = torch_loss(model, torch.from_numpy(tokens))  # torch goes on too, for comparison
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
  ref = {n: p.detach().numpy() for n, p in model.named_parameters()}
  gap, fresh_gap = max_rel(params, ref), max_rel(fresh_params, ref)
  print(f"JAX continued {extra} steps from the converted state: loss {float(jloss):.3f} "
        f"(torch {loss.item():.3f}); parameters within {gap:.1e} (max rel) of torch's, "
        f"against {fresh_gap:.1e} when restarting AdamW from fresh moments "
        f"[{time.time() - t0:.1f} s]")
  return {"worst_divergence": report.worst, "jax_vs_torch": gap, "fresh_vs_torch": fresh_gap,
          "report": report, "jax_loss": float(jloss), "torch_loss": loss.item()}


if __name__ == "__main__":
  main()
