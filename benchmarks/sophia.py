"""Sophia (GNB estimate every k steps) vs AdamW and Lion on the tiny GPT: step time and loss.

    python benchmarks/sophia.py            # 'micro' GPT, 600 steps per optimizer (+ k=1 timing)
    python benchmarks/sophia.py --quick    # 'nano' GPT, 120 steps
    python benchmarks/sophia.py --sweep sophia --sweep adamw   # lr (x rho) grids (slow)

Every optimizer trains the same model from the same initialisation on the same batches of
the embedded corpus (byte-level, ``jaxopt_llm.train.data``), with gradient clipping at 1.0 and
the same warmup-cosine schedule shape (warmup 10% of the steps, decay to 10% of the peak),
each at its recommended peak lr (``RECIPES`` below). One jitted train step per optimizer;
Sophia's calls ``hessian.update_every_k`` with the Gauss-Newton-Bartlett estimator on the
step's own batch (labels sampled from the model, ``lax.cond`` so that only every k-th step
pays for the estimate).

Step time: the optimizers' training loops run interleaved, in chunks of ``k`` steps (so every
Sophia chunk holds exactly one estimate), ``block_until_ready`` at the end of each chunk;
the mean per step excludes the first (compiling) chunk. The ratio Sophia/AdamW is taken
within this run: on a busy machine compare only ratios of the same run. Loss: validation
cross-entropy (nats/token) on fixed windows after the equal number of steps, and the mean
training loss of the last 10% of the steps.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_llm import losses, optim, schedules
from jaxopt_llm.optim import hessian
from jaxopt_llm.train import data as corpus_data
from jaxopt_llm.train.model import GPT, GPTConfig

_MASK = optim.weight_decay_mask

# Recommended hyperparameters for this model (peak lr, decay on matrices only), from
# `--sweep` on the 'micro' GPT, 600 steps, batch 16x64 (val loss after 600 steps):
#   adamw  lr 1e-3: 2.014   3e-3: 1.742   2e-2: 2.322
#   lion   lr 1e-4: 2.628   3e-4: 2.074   1e-3: 1.881   3e-3: 2.368
#   sophia lr 2.5e-4: 2.106   5e-4: 1.960   1e-3: 2.288   2e-3: 2.456   4e-3: 2.537 (rho 0.04)
#          rho 0.02 / 0.1 at lr 5e-4: 1.992 / 2.010
RECIPES = {
    "adamw": dict(build=lambda lr: optim.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1,
                                               mask=_MASK),
                  lr=3e-3, desc="adamw lr=3e-3 b=(0.9,0.95) wd=0.1"),
    "lion": dict(build=lambda lr: optim.lion(lr, b1=0.9, b2=0.99, weight_decay=0.3, mask=_MASK),
                 lr=1e-3, desc="lion lr=1e-3 b=(0.9,0.99) wd=0.3"),
    "sophia": dict(build=lambda lr, rho=0.04: optim.sophia(lr, b1=0.965, b2=0.99, rho=rho,
                                                            weight_decay=0.1, mask=_MASK),
                   lr=5e-4, rho=0.04, k=10,
                   desc="sophia lr=5e-4 b=(0.965,0.99) rho=0.04 wd=0.1 k=10 (GNB)"),
}


def make_batches(ids: np.ndarray, steps: int, batch: int, block: int, seed: int) -> np.ndarray:
  """[steps, batch, block + 1] random windows (the same for every optimizer)."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(ids) - block - 1, size=(steps, batch))
  return ids[starts[..., None] + np.arange(block + 1)]


class Run:
  """One optimizer's training state and its jitted step."""

  def __init__(self, name: str, tx: optax.GradientTransformation, graphdef, params,
               hessian_every: int = 0):
    self.name, self.k = name, hessian_every
    self.tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
    self.params = jax.tree.map(jnp.copy, params)  # own buffers: the step donates them
    self.opt_state = self.tx.init(self.params)
    self.losses: list[float] = []
    self.seconds: list[float] = []
    self.steps_timed = 0

    def loss_fn(p, tokens):
      logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      return losses.cross_entropy(logits, tokens[:, 1:])

    def step(params, opt_state, tokens, key, t):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      if self.k:
        estimate = lambda p: hessian.gauss_newton_bartlett(
            lambda q: nnx.merge(graphdef, q)(tokens[:, :-1]), p, key)
        updates, opt_state = hessian.update_every_k(
            self.tx, grads, opt_state, params, step=t, estimate_fn=estimate, k=self.k)
      else:
        updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self.step = jax.jit(step, donate_argnums=(0, 1))

  def run_chunk(self, batches: np.ndarray, keys: jax.Array, start: int, timed: bool) -> None:
    t0 = time.perf_counter()
    out = []
    for i in range(len(batches)):
      self.params, self.opt_state, loss = self.step(
          self.params, self.opt_state, batches[i], keys[i], jnp.int32(start + i))
      out.append(loss)
    jax.block_until_ready((self.params, self.opt_state))
    if timed:
      self.seconds.append(time.perf_counter() - t0)
      self.steps_timed += len(batches)
    self.losses.extend(float(v) for v in out)

  @property
  def ms_per_step(self) -> float:
    return 1e3 * sum(self.seconds) / max(self.steps_timed, 1)


def train_all(runs: list[Run], batches: np.ndarray, chunk: int, seed: int) -> None:
  keys = jax.random.split(jax.random.PRNGKey(seed), len(batches))
  for c, start in enumerate(range(0, len(batches), chunk)):
    sl = slice(start, start + chunk)
    for r in runs:  # interleaved, so that machine noise hits every optimizer alike
      r.run_chunk(batches[sl], keys[sl], start, timed=c > 0)


def evaluate(graphdef, params, val: np.ndarray) -> float:
  @jax.jit
  def loss(p, tokens):
    return losses.cross_entropy(nnx.merge(graphdef, p)(tokens[:, :-1]), tokens[:, 1:])
  return float(np.mean([float(loss(params, v)) for v in val]))


def build_runs(names, graphdef, params0, steps, overrides=None):
  runs = []
  for name in names:
    spec = dict(RECIPES[name.split(":")[0]])
    spec.update((overrides or {}).get(name, {}))
    sched = schedules.warmup_cosine(spec["lr"], max(steps // 10, 1), steps,
                                    min_lr=spec["lr"] / 10)
    if name.startswith("sophia"):
      tx = spec["build"](sched, spec.get("rho", 0.04))
      runs.append(Run(name, tx, graphdef, params0, hessian_every=spec.get("k", 10)))
    else:
      runs.append(Run(name, spec["build"](sched), graphdef, params0))
  return runs


def compare(args, graphdef, params0, batches, val, steps, k) -> None:
  names = ["adamw", "lion", "sophia"]
  overrides = {}
  if not args.quick:
    names.append("sophia:k=1")  # the estimator's cost: an estimate on every step
    overrides["sophia:k=1"] = {"k": 1}
  t0 = time.time()
  runs = build_runs(names, graphdef, params0, steps, overrides)
  train_all(runs, batches, k, args.seed)
  print(f"trained {len(runs)} optimizers in {time.time() - t0:.0f}s\n")

  base = next(r for r in runs if r.name == "adamw").ms_per_step
  tail = max(steps // 10, 1)
  print(f"{'optimizer':12s} {'ms/step':>8s} {'vs adamw':>9s} {'val loss':>9s} "
        f"{'train loss':>10s}  {'win rate':>8s}  hyperparameters")
  for r in runs:
    val_loss = evaluate(graphdef, r.params, val)
    win = (f"{float(optim.sophia_win_rate(r.opt_state)):8.3f}" if r.name.startswith("sophia")
           else f"{'':8s}")
    desc = RECIPES[r.name.split(":")[0]]["desc"]
    if r.name == "sophia:k=1":
      desc = desc.replace("k=10", "k=1") + " (estimator cost)"
    print(f"{r.name:12s} {r.ms_per_step:8.1f} {r.ms_per_step / base:8.2f}x {val_loss:9.3f} "
          f"{np.mean(r.losses[-tail:]):10.3f}  {win}  {desc}")
  sophia = next(r for r in runs if r.name == "sophia")
  ratio = sophia.ms_per_step / base
  print(f"\nSophia (k={k}) step time / AdamW step time = {ratio:.2f}x "
        f"(goal <= 1.25x: {'met' if ratio <= 1.25 else 'NOT met'})")
  print(f"Sophia Hessian-EMA norm at the end: "
        f"{float(optim.sophia_hessian_norm(sophia.opt_state)):.3g}")


def sweep(args, graphdef, params0, batches, val, steps, k) -> None:
  default_lrs = {"sophia": [2.5e-4, 5e-4, 1e-3, 2e-3], "adamw": [1e-3, 3e-3, 1e-2],
                 "lion": [3e-4, 1e-3, 3e-3]}
  for opt_name in args.sweep:
    lrs = ([float(v) for v in args.lrs.split(",")] if args.lrs else default_lrs[opt_name])
    rhos = [float(v) for v in args.rhos.split(",")] if opt_name == "sophia" else [None]
    print(f"\n{opt_name} sweep: val loss after {steps} steps"
          + (" (win rate at the end)" if opt_name == "sophia" else ""))
    print(f"{'lr':>8s} " + " ".join(f"{'rho=' + format(r, 'g') if r else 'val loss':17s}"
                                    for r in rhos))
    for lr in lrs:
      cells = []
      for rho in rhos:
        name = f"{opt_name}:{lr}:{rho}"
        spec = {"lr": lr} if rho is None else {"lr": lr, "rho": rho}
        (r,) = build_runs([name], graphdef, params0, steps, {name: spec})
        train_all([r], batches, k, args.seed)
        cell = f"{evaluate(graphdef, r.params, val):6.3f}"
        if rho is not None:
          cell += f" ({float(optim.sophia_win_rate(r.opt_state)):.2f})"
        cells.append(cell)
      print(f"{lr:8.1e} " + " ".join(f"{c:17s}" for c in cells), flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="nano model, 120 steps")
  ap.add_argument("--sweep", action="append", default=[], choices=sorted(RECIPES),
                  help="also sweep this optimizer's peak lr (Sophia: lr x rho); repeatable")
  ap.add_argument("--lrs", default=None, help="comma-separated lr grid for --sweep")
  ap.add_argument("--rhos", default="0.04,0.1", help="rho grid for --sweep sophia")
  ap.add_argument("--sweep-only", action="store_true", help="skip the main comparison")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  size = "nano" if args.quick else "micro"
  steps = args.steps or (120 if args.quick else 600)
  if steps < 20:
    ap.error("--steps must be >= 20")
  batch, block = (8, 64) if args.quick else (16, 64)
  k = RECIPES["sophia"]["k"]
  steps = max(k, steps // k * k)

  ids = corpus_data.encode(corpus_data.load_corpus())
  train_ids, val_ids = corpus_data.train_val_split(ids)
  batches = make_batches(train_ids, steps, batch, block, args.seed)
  val = make_batches(val_ids, 16, 32, block, 12345)
  cfg = GPTConfig.from_size(size, block_size=block)
  graphdef, params0 = nnx.split(GPT(cfg, nnx.Rngs(args.seed)))
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores, "
        f"{platform.machine()}); GPT '{size}' {n_params/1e6:.2f}M params, batch {batch}x"
        f"{block} tokens, {steps} steps, warmup-cosine, clip 1.0")
  print(f"unigram entropy of the corpus: {corpus_data.unigram_entropy(train_ids):.3f} nats")

  if not args.sweep_only:
    compare(args, graphdef, params0, batches, val, steps, k)
  sweep(args, graphdef, params0, batches, val, steps, k)
  return 0


if __name__ == "__main__":
  sys.exit(main())
