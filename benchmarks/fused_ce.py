"""Fused linear cross-entropy: memory at LLM shapes, and time against PyTorch and unfused JAX.

Three parts (value and gradients w.r.t. hidden and kernel, ``reduction="mean"``, every
5th label ignored):

1. ``memory``: XLA's compiled temporary memory (``memory_analysis().temp_size_in_bytes``:
   scratch beyond inputs and outputs) of ``jax.jit(jax.value_and_grad(...))`` at LLM
   shapes in bfloat16, from ``jax.ShapeDtypeStruct`` (nothing is allocated, so it runs on
   any machine): the fused loss, the unfused ``cross_entropy(hidden @ kernel)`` and the
   fused temp as a multiple of the bf16 ``[d, V]`` kernel gradient (goal: <= 1.5x).
2. ``torch`` (CPU): (N, d, V) = (4096, 512, 32000) in float32 and bfloat16, ours against
   ``torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
   (torch's chunked path, its defaults; torch >= 2.13) and the unfused JAX path, in
   interleaved rounds (one call of each per round, so load changes hit all alike), torch
   on ``--threads`` threads (XLA:CPU uses the machine's cores: run it on a 2-core machine,
   or under ``taskset -c 0,1``). Reports median wall and process CPU time, the load
   average, and the compiled temp of ours vs unfused (goals: time <= 0.9x torch, temp
   <= 1/8 of unfused).
3. ``gpu`` (only when ``jax.default_backend() == "gpu"``): (8192, 2048, 128256) bfloat16,
   fused vs unfused JAX: median wall time, compiled temp and the device's peak memory
   after each (the fused one runs first).

  python benchmarks/fused_ce.py [--quick] [--rounds R] [--threads T] [--parts memory,torch,gpu]

``--quick``: a smaller torch/GPU shape (N, d, V) = (1024, 256, 8000) and two rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.losses import cross_entropy, fused_linear_cross_entropy
from jaxopt_llm.losses.fused import default_chunk_size, default_vocab_block_size

IGNORE = -100
MEMORY_SHAPES = [(8192, 2048, 128256), (32768, 2048, 128256), (8192, 4096, 256000)]
MiB = 2**20


def _fused(h, w, y):
  return fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE)


def _unfused(h, w, y):
  return cross_entropy(jnp.matmul(h, w, preferred_element_type=jnp.float32), y,
                       ignore_index=IGNORE)


def _compile(loss, *args):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()


def memory_table():
  print("\n## Compiled temporary memory of value_and_grad, bf16 inputs "
        f"(backend {jax.default_backend()}; memory_analysis, nothing allocated)")
  print("| (N, d, V) | fused MiB | unfused MiB | fused / unfused | bf16 [d, V] grad MiB "
        "| fused / grad |")
  print("|---|---|---|---|---|---|")
  for n, d, v in MEMORY_SHAPES:
    spec = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((d, v), jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32))
    fused = _compile(_fused, *spec).memory_analysis().temp_size_in_bytes
    unfused = _compile(_unfused, *spec).memory_analysis().temp_size_in_bytes
    grad = d * v * 2
    print(f"| ({n}, {d}, {v}) | {fused / MiB:.0f} | {unfused / MiB:.0f} | "
          f"{fused / unfused:.3f} | {grad / MiB:.0f} | {fused / grad:.2f}x |", flush=True)


def _inputs(n, d, v, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((n, d)).astype(np.float32)
  kernel = (rng.standard_normal((d, v)) / np.sqrt(d)).astype(np.float32)
  labels = rng.integers(0, v, size=n)
  labels[::5] = IGNORE
  return hidden, kernel, labels


def _rounds(fns, rounds):
  """Warm-up, then ``rounds`` rounds calling each function once, in turn."""
  for f in fns.values():
    f()
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      w0, c0 = time.perf_counter(), time.process_time()
      f()
      wall[k].append(time.perf_counter() - w0)
      cpu[k].append(time.process_time() - c0)
  return ({k: statistics.median(x) for k, x in wall.items()},
          {k: statistics.median(x) for k, x in cpu.items()})


def torch_case(n, d, v, dtype, rounds, threads):
  import torch   # only for this comparison
  torch.set_num_threads(threads)
  h, w, y = _inputs(n, d, v)
  jdt = jnp.dtype(dtype)
  jh, jw, jy = jnp.asarray(h, jdt), jnp.asarray(w, jdt), jnp.asarray(y, jnp.int32)
  compiled = {"fused": _compile(_fused, jh, jw, jy), "unfused": _compile(_unfused, jh, jw, jy)}
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  tdt = getattr(torch, jdt.name)
  th = torch.tensor(h).to(tdt).requires_grad_()
  tw = torch.tensor(np.ascontiguousarray(w.T)).to(tdt).requires_grad_()   # [V, d]
  ty = torch.tensor(y, dtype=torch.long)
  options = torch.nn.LinearCrossEntropyOptions()

  def run_torch():
    th.grad = tw.grad = None
    loss = torch.nn.functional.linear_cross_entropy(th, tw, ty, ignore_index=IGNORE,
                                                    options=options)
    loss.backward()
    return loss.detach()

  def run(name):
    return lambda: jax.block_until_ready(compiled[name](jh, jw, jy))

  values = {"fused": float(run("fused")()[0]), "unfused": float(run("unfused")()[0]),
            "torch": float(run_torch().float())}
  load0 = os.getloadavg()[0]
  wall, cpu = _rounds({"fused": run("fused"), "torch": run_torch,
                       "unfused": run("unfused")}, rounds)
  load1 = os.getloadavg()[0]
  print(f"\n## ({n}, {d}, {v}) {jdt.name}, value_and_grad, CPU: {rounds} interleaved rounds, "
        f"torch {torch.__version__} on {threads} threads, {os.cpu_count()} cores, "
        f"load average {load0:.1f} -> {load1:.1f}; fused tile "
        f"[{default_chunk_size(n, v)}, {default_vocab_block_size(n, v)}]")
  print("| method | wall s (median) | / torch | CPU s (median) | / torch | temp MiB | loss |")
  print("|---|---|---|---|---|---|---|")
  for k in ("fused", "torch", "unfused"):
    t = f"{temp[k] / MiB:.0f}" if k in temp else "-"
    print(f"| {k} | {wall[k]:.2f} | {wall[k] / wall['torch']:.2f} | {cpu[k]:.2f} | "
          f"{cpu[k] / cpu['torch']:.2f} | {t} | {values[k]:.6f} |")
  print(f"goals: fused <= 0.9x torch: {'yes' if wall['fused'] <= 0.9 * wall['torch'] else 'NO'} "
        f"({wall['fused'] / wall['torch']:.2f}x wall, {cpu['fused'] / cpu['torch']:.2f}x CPU); "
        f"temp <= 1/8 of unfused: {'yes' if temp['fused'] <= temp['unfused'] / 8 else 'NO'} "
        f"({temp['fused'] / temp['unfused']:.3f})", flush=True)


def gpu_case(n, d, v, rounds):
  h, w, y = _inputs(n, d, v)
  args = (jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), jnp.asarray(y, jnp.int32))
  device = jax.devices()[0]
  print(f"\n## ({n}, {d}, {v}) bfloat16, value_and_grad on {device.device_kind}")
  print("| method | wall ms (median) | ratio | temp MiB | peak MiB after | loss |")
  print("|---|---|---|---|---|---|")
  rows = {}
  for name, loss in (("fused", _fused), ("unfused", _unfused)):   # fused first: its peak
    c = _compile(loss, *args)
    out = jax.block_until_ready(c(*args))
    times = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      jax.block_until_ready(c(*args))
      times.append(time.perf_counter() - t0)
    stats = device.memory_stats() or {}
    rows[name] = (statistics.median(times), c.memory_analysis().temp_size_in_bytes,
                  stats.get("peak_bytes_in_use", 0), float(out[0]))
  for name, (t, temp, peak, val) in rows.items():
    print(f"| {name} | {t * 1e3:.1f} | {t / rows['unfused'][0]:.2f} | {temp / MiB:.0f} | "
          f"{peak / MiB:.0f} | {val:.6f} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller shapes, two rounds")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
  parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
  parser.add_argument("--parts", default="memory,torch,gpu",
                      help="comma-separated subset of memory,torch,gpu")
  args = parser.parse_args(argv)
  if args.rounds is not None and args.rounds < 1:
    parser.error("--rounds must be >= 1")
  parts = set(args.parts.split(","))
  if not parts <= {"memory", "torch", "gpu"}:
    parser.error(f"--parts: unknown {sorted(parts - {'memory', 'torch', 'gpu'})}")
  rounds = args.rounds or (2 if args.quick else 5)
  shape = (1024, 256, 8000) if args.quick else (4096, 512, 32000)
  backend = jax.default_backend()
  print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
  if "memory" in parts:
    memory_table()
  if "torch" in parts and backend == "cpu":
    for dtype in ("float32", "bfloat16"):
      torch_case(*shape, dtype, rounds, args.threads)
  if "gpu" in parts and backend == "gpu":
    gpu_case(*((1024, 256, 8000) if args.quick else (8192, 2048, 128256)), rounds)


if __name__ == "__main__":
  main()
