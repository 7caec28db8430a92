"""Optimizer step time and optimizer-state memory: ours vs optax vs PyTorch.

    python benchmarks/optimizer_step.py          # 1M and 32M fp32 params, 1 and 200 leaves
    python benchmarks/optimizer_step.py --quick  # 1M only, 7 rounds

What is timed is the whole step users run, ``params, state = step(params, state, grads)``
jitted with ``donate_argnums=(0, 1)`` (params and state updated in place), after warm-up,
with ``block_until_ready`` on every step; PyTorch's ``opt.step()`` likewise (in place by
design). "ours X" is ``tx.update`` + ``optax.apply_updates`` (the reference chain); "+ update_and_apply" is
``jaxopt_llm.optim.update_and_apply`` (the same numbers, bit for bit, with the state writes
ordered so that XLA:CPU makes no copy of the state; see ``jaxopt_llm/optim/fused.py``).
The variants of one group (AdamW, Lion, Sophia) run interleaved, round after round, and the
table gives each one's median and min: on a busy machine compare rows of one group only.

GB/s = bytes an ideal step must read and write / median time (see ``IDEAL_BYTES``); the
limit printed with each model is a measured in-place ``x = 2 * x`` over a large fp32 array
(jax, jitted with donation; torch ``mul_``). PyTorch runs with
``torch.set_num_threads(os.cpu_count())``; JAX's CPU backend uses every core by default.
Torch's Lion is ``jaxopt_llm.parity.reference.LionReference`` (a per-parameter Python loop,
like lion-pytorch without Triton), lion-pytorch not being a dependency. On a GPU backend the
JAX rows run there and the torch rows are skipped.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm import optim

try:  # optional
  import torch
except ImportError:  # pragma: no cover
  torch = None

MB = 1 << 20


# --------------------------------------------------------------------------------------------
# Models


def leaf_shapes(total: int, leaves: int) -> list[tuple[int, ...]]:
  """``leaves`` shapes with ``total`` entries in all (to within a row of 256).

  One leaf: a flat vector. Many: a transformer-like mix, 80% matrices [rows, 256] carrying
  almost all entries and 20% vectors of 256 (biases, norm scales).
  """
  if leaves == 1:
    return [(total,)]
  n_vec = leaves // 5
  n_mat = leaves - n_vec
  rows = max(1, (total - 256 * n_vec) // (256 * n_mat))
  shapes = [(rows, 256)] * n_mat + [(256,)] * n_vec
  used = sum(int(np.prod(s)) for s in shapes)
  extra_rows = (total - used) // 256
  if extra_rows > 0:
    shapes[0] = (rows + extra_rows, 256)
  return shapes


def make_tree(shapes, seed: int, dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(seed)
  return {f"p{i:03d}": jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
          for i, s in enumerate(shapes)}


# --------------------------------------------------------------------------------------------
# Variants: each factory returns a zero-argument callable that runs one step to completion


def jax_variant(tx: optax.GradientTransformation, params: dict, grads: dict,
                whole_step: bool) -> Callable[[], None]:
  """``params, state = step(params, state, grads)``, jitted with params and state donated.

  ``whole_step``: ``optim.update_and_apply`` (ours only); else ``tx.update`` +
  ``optax.apply_updates``, the usual optax step.
  """
  if whole_step:
    def step(p, s, g):
      return optim.update_and_apply(tx, g, s, p)
  else:
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

  jstep = jax.jit(step, donate_argnums=(0, 1))
  box = [jax.tree.map(jnp.copy, params), None]
  box[1] = tx.init(box[0])

  def run():
    box[0], box[1] = jstep(box[0], box[1], grads)
    jax.block_until_ready(box)
  return run


def torch_variant(kind: str, params: dict, grads: dict) -> Callable[[], None]:
  ps = []
  for k, v in params.items():
    t = torch.tensor(np.asarray(v), requires_grad=True)
    t.grad = torch.tensor(np.asarray(grads[k]))
    ps.append(t)
  if kind == "adamw_foreach":
    opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True)
  elif kind == "adamw_fused":
    opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)
  elif kind == "lion_ref":
    from jaxopt_llm.parity.reference import LionReference
    opt = LionReference(ps, lr=1e-4, weight_decay=0.01)
  else:
    raise ValueError(kind)
  return opt.step


BF16 = jnp.bfloat16

# Bytes an ideal step reads + writes per fp32 parameter (fp32 grads): AdamW p,g,m,v in and
# p,m,v out; bf16 moments count 2 bytes each; Lion p,g,m in, p,m out; Sophia on a step
# without a Hessian estimate p,g,m,h in, p,m out.
IDEAL_BYTES = {"adamw": 28, "adamw_bf16": 20, "lion": 20, "sophia": 24}


def groups(use_torch: bool) -> list[tuple[str, list]]:
  """[(group, [(row, ideal-bytes kind, factory(params, grads) -> run)])]."""
  ours = lambda make, whole: (lambda p, g: jax_variant(make(), p, g, whole))
  adamw = [
      ("optax.adamw", "adamw", ours(lambda: optax.adamw(1e-3, weight_decay=0.01), False)),
      ("ours adamw", "adamw", ours(lambda: optim.adamw(1e-3), False)),
      ("ours adamw + update_and_apply", "adamw", ours(lambda: optim.adamw(1e-3), True)),
      ("ours adamw bf16 m,v", "adamw_bf16",
       ours(lambda: optim.adamw(1e-3, mu_dtype=BF16, nu_dtype=BF16), False)),
      ("ours adamw bf16 m,v + update_and_apply", "adamw_bf16",
       ours(lambda: optim.adamw(1e-3, mu_dtype=BF16, nu_dtype=BF16), True)),
  ]
  if use_torch:
    adamw += [
        ("torch AdamW(foreach=True)", "adamw",
         lambda p, g: torch_variant("adamw_foreach", p, g)),
        ("torch AdamW(fused=True)", "adamw", lambda p, g: torch_variant("adamw_fused", p, g)),
    ]
  lion = [
      ("optax.lion", "lion", ours(lambda: optax.lion(1e-4, weight_decay=0.01), False)),
      ("ours lion", "lion", ours(lambda: optim.lion(1e-4, weight_decay=0.01), False)),
      ("ours lion + update_and_apply", "lion",
       ours(lambda: optim.lion(1e-4, weight_decay=0.01), True)),
  ]
  if use_torch:
    lion.append(("torch Lion (LionReference, a Python loop)", "lion",
                 lambda p, g: torch_variant("lion_ref", p, g)))
  sophia = [
      ("ours sophia", "sophia", ours(lambda: optim.sophia(1e-4), False)),
      ("ours sophia + update_and_apply", "sophia", ours(lambda: optim.sophia(1e-4), True)),
  ]
  return [("AdamW", adamw), ("Lion", lion), ("Sophia, steps without a Hessian estimate", sophia)]


# --------------------------------------------------------------------------------------------
# Timing


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict:
  """(median, min) seconds per call, the variants taking turns round after round."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def copy_bandwidth(n: int, rounds: int) -> dict[str, float]:
  """GB/s of an in-place ``x = 2 * x`` over n fp32 entries (read + write 8 bytes each)."""
  f = jax.jit(lambda x: x * 2.0, donate_argnums=0)
  box = [jnp.ones((n,), jnp.float32)]

  def jrun():
    box[0] = f(box[0])
    box[0].block_until_ready()
  fns = {"jax": jrun}
  if torch is not None:
    x = torch.ones(n)
    fns["torch mul_"] = lambda: x.mul_(2.0)
  res = interleaved(fns, rounds, warmup=3)
  return {k: 8 * n / med / 1e9 for k, (med, _) in res.items()}


def bench_config(total: int, leaves: int, rounds: int, warmup: int, use_torch: bool):
  """Rows (group, name, median ms, min ms, GB/s); one group's variants alive at a time."""
  shapes = leaf_shapes(total, leaves)
  n = sum(int(np.prod(s)) for s in shapes)
  params = make_tree(shapes, 0)
  grads = jax.tree.map(lambda x: 1e-2 * x, make_tree(shapes, 1))
  rows = []
  for group, variants in groups(use_torch):
    fns = {name: factory(params, grads) for name, _, factory in variants}
    res = interleaved(fns, rounds, warmup)
    del fns
    for name, kind, _ in variants:
      med, mn = res[name]
      rows.append((group, name, med * 1e3, mn * 1e3, IDEAL_BYTES[kind] * n / med / 1e9))
  return n, rows


# --------------------------------------------------------------------------------------------
# State memory


def state_memory_rows(n: int = 1 << 20) -> list[tuple[str, float]]:
  """Optimizer-state bytes per parameter (fp32 params, computed abstractly)."""
  shapes = leaf_shapes(n, 200)
  params = {f"p{i:03d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}
  count = sum(int(np.prod(s)) for s in shapes)
  bf16 = jnp.bfloat16
  cases = [
      ("adamw (fp32 m, v)", optim.adamw(1e-3)),
      ("adamw mu_dtype=bf16", optim.adamw(1e-3, mu_dtype=bf16)),
      ("adamw mu_dtype=nu_dtype=bf16", optim.adamw(1e-3, mu_dtype=bf16, nu_dtype=bf16)),
      ("adamw amsgrad (fp32)", optim.adamw(1e-3, amsgrad=True)),
      ("adam amsgrad, bf16 m, v", optim.adam(1e-3, amsgrad=True, mu_dtype=bf16,
                                             nu_dtype=bf16)),
      ("lion (fp32 m)", optim.lion(1e-4)),
      ("lion mu_dtype=bf16", optim.lion(1e-4, mu_dtype=bf16)),
      ("sophia (fp32 m, h)", optim.sophia(1e-4)),
      ("sophia mu_dtype=nu_dtype=bf16", optim.sophia(1e-4, mu_dtype=bf16, nu_dtype=bf16)),
      ("sgd (no momentum)", optim.sgd(1e-2)),
      ("sgd momentum", optim.sgd(1e-2, momentum=0.9)),
      ("adagrad", optim.adagrad(1e-2)),
      ("rmsprop", optim.rmsprop(1e-2)),
      ("rmsprop centered + momentum", optim.rmsprop(1e-2, centered=True, momentum=0.9)),
      ("optax.adamw (for comparison)", optax.adamw(1e-3)),
  ]
  return [(name, optim.state_bytes(tx, params) / count) for name, tx in cases]


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="1M params only, fewer rounds")
  ap.add_argument("--sizes", type=str, default=None,
                  help="comma-separated parameter counts (default 1048576,33554432)")
  ap.add_argument("--leaves", type=str, default="1,200", help="comma-separated leaf counts")
  ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 21, quick 7)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args(argv)
  sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes
           else [1 << 20] if args.quick else [1 << 20, 32 << 20])
  leaves = [int(x) for x in args.leaves.split(",")]
  rounds = args.rounds if args.rounds is not None else (7 if args.quick else 21)
  if min(sizes) < 1 or min(leaves) < 1 or rounds < 1 or args.warmup < 0:
    ap.error("sizes, leaves and rounds must be >= 1, warmup >= 0")

  backend = jax.default_backend()
  use_torch = torch is not None and not args.no_torch
  if backend != "cpu":
    use_torch = False  # torch's rows are CPU timings; compare them with the CPU run
  cores = os.cpu_count()
  if torch is not None:
    torch.set_num_threads(cores)
  print(f"# optimizer step: jax {jax.__version__} on {backend} ({jax.devices()[0].device_kind}),"
        f" optax {optax.__version__}, torch {torch.__version__ if torch else '-'}")
  print(f"# {platform.machine()}, {cores} cores; torch.set_num_threads({cores}); JAX CPU uses "
        f"every core; median (min) of {rounds} interleaved rounds per group after "
        f"{args.warmup} warm-up steps; jit with donate_argnums=(0, 1)")

  for total in sizes:
    bw = copy_bandwidth(total, rounds)
    bw_txt = ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items())
    for nl in leaves:
      n, rows = bench_config(total, nl, rounds, args.warmup, use_torch)
      print(f"\n## {n / MB:.1f}M fp32 params in {nl} leaves; limit, in-place x*2: {bw_txt}")
      print(f"{'variant':46s} {'median ms':>10s} {'min ms':>8s} {'GB/s':>6s}")
      med = {}
      last = None
      for group, name, md, mn, gbs in rows:
        if group != last:
          print(f"  [{group}]")
          last = group
        med[name] = md
        print(f"{name:46s} {md:10.2f} {mn:8.2f} {gbs:6.1f}")
      ours, uaa = med["ours adamw"], med["ours adamw + update_and_apply"]
      parts = [f"ours fp32 adamw / optax.adamw = {ours / med['optax.adamw']:.2f} "
               f"(with update_and_apply {uaa / med['optax.adamw']:.2f})"]
      if "torch AdamW(fused=True)" in med:
        tf = med["torch AdamW(fused=True)"]
        parts.append(f"ours fp32 adamw / torch AdamW(fused=True) = {ours / tf:.2f} "
                     f"(with update_and_apply {uaa / tf:.2f})")
      parts.append("ours bf16-moment adamw + update_and_apply / optax.adamw = "
                   f"{med['ours adamw bf16 m,v + update_and_apply'] / med['optax.adamw']:.2f}")
      parts.append("ours lion + update_and_apply / optax.lion = "
                   f"{med['ours lion + update_and_apply'] / med['optax.lion']:.2f}")
      print("ratios of medians: " + "; ".join(parts))

  print("\n## optimizer state, bytes per fp32 parameter (1M params in 200 leaves; the int32 "
        "step counters add nothing measurable)")
  for name, b in state_memory_rows():
    print(f"{name:46s} {b:6.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
