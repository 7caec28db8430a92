"""Fused linear cross-entropy vs the unfused LM-head loss: temporary memory and wall time.

For each shape, ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` of
  * fused:   ``fused_linear_cross_entropy(hidden, kernel, labels)``
  * unfused: ``cross_entropy(hidden @ kernel, labels)``            (ours, materialises [N, V])
  * optax:   ``optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, labels).mean()``
is compiled once; we report XLA's compiled temporary memory (``memory_analysis()
.temp_size_in_bytes``: scratch beyond inputs and outputs) and the median wall time of
several calls after a warm-up (``block_until_ready``; the methods take turns, so load
changes hit all of them alike) and the median process CPU time of those calls (steadier
than wall time on a shared machine), with ratios to the unfused path.

Shapes: (N, d, V) = (4096, 512, 32000) float32 always, and (8192, 2048, 128256) bfloat16
when ``jax.default_backend() == "gpu"``. ``--quick``: (4096, 64, 32000) float32 only.

Goals (issue 4): fused temporary memory <= 1/8 of unfused; fused time <= 1.1x unfused.

  python benchmarks/fused_ce.py [--quick] [--repeats R] [--chunk-size C]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm.losses import cross_entropy, fused_linear_cross_entropy
from jaxopt_llm.losses.fused import default_chunk_size


def _losses(chunk_size):
  return {
      "fused": lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_size=chunk_size),
      "unfused": lambda h, w, y: cross_entropy(h @ w, y),
      "optax": lambda h, w, y: jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(h @ w, y)),
  }


def _inputs(n, d, v, dtype, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((n, d)), dtype)
  kernel = jnp.asarray(rng.standard_normal((d, v)) / np.sqrt(d), dtype)
  labels = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
  return hidden, kernel, labels


def _measure(fns, args, repeats):
  """Compiles each; then times them round-robin, so load drifts hit all alike."""
  compiled = {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
              for k, f in fns.items()}
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  out = {k: jax.block_until_ready(c(*args)) for k, c in compiled.items()}   # warm-up
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(repeats):
    for k, c in compiled.items():
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(c(*args))
      wall[k].append(time.perf_counter() - w0)
      cpu[k].append(time.process_time() - c0)
  return {k: (temp[k], statistics.median(wall[k]), statistics.median(cpu[k]), out[k])
          for k in fns}


def run_case(n, d, v, dtype, repeats, chunk_size):
  args = _inputs(n, d, v, dtype)
  chunk = default_chunk_size(n, v) if chunk_size is None else chunk_size
  name = jnp.dtype(dtype).name
  print(f"\n(N, d, V) = ({n}, {d}, {v}) {name} on {jax.default_backend()}, "
        f"fused chunk_size = {chunk}, full [N, V] float32 = {n * v * 4 / 2**20:.0f} MiB")
  rows = _measure(_losses(chunk_size), args, repeats)
  base_temp, base_time, base_cpu, (base_val, base_grads) = rows["unfused"]
  print(f"{'method':<8} {'temp MiB':>9} {'ratio':>7} {'wall ms':>9} {'ratio':>7} "
        f"{'CPU ms':>9} {'ratio':>7} {'|loss - unfused|':>17} {'max rel grad diff':>18}")
  for label, (temp, secs, cpu, (val, grads)) in rows.items():
    gdiff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                      / jnp.max(jnp.abs(b.astype(jnp.float32))))
                for a, b in zip(grads, base_grads))
    print(f"{label:<8} {temp / 2**20:>9.1f} {temp / max(base_temp, 1):>6.3f}x "
          f"{secs * 1e3:>9.1f} {secs / base_time:>6.3f}x {cpu * 1e3:>9.1f} "
          f"{cpu / base_cpu:>6.3f}x {abs(float(val) - float(base_val)):>17.2e} {gdiff:>18.2e}")
  temp_ratio = rows["fused"][0] / max(base_temp, 1)
  time_ratio = rows["fused"][1] / base_time
  cpu_ratio = rows["fused"][2] / base_cpu
  print(f"goals: temp <= 1/8 of unfused: {'yes' if temp_ratio <= 1 / 8 else 'NO'} "
        f"({temp_ratio:.3f}); wall time <= 1.1x unfused: "
        f"{'yes' if time_ratio <= 1.1 else 'NO'} ({time_ratio:.3f}; CPU time {cpu_ratio:.3f})")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="one smaller float32 shape, (4096, 64, 32000)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed calls per method (default 5, 3 with --quick)")
  parser.add_argument("--chunk-size", type=int, default=None,
                      help="fused chunk size (default: the heuristic)")
  args = parser.parse_args(argv)
  if args.repeats is not None and args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.chunk_size is not None and args.chunk_size < 1:
    parser.error("--chunk-size must be >= 1")
  repeats = args.repeats or (3 if args.quick else 5)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}; value_and_grad w.r.t. (hidden, kernel); "
        f"median of {repeats} calls after one warm-up; ratios are to unfused")
  if args.quick:
    run_case(4096, 64, 32000, jnp.float32, repeats, args.chunk_size)
    return
  run_case(4096, 512, 32000, jnp.float32, repeats, args.chunk_size)
  if jax.default_backend() == "gpu":
    run_case(8192, 2048, 128256, jnp.bfloat16, repeats, args.chunk_size)


if __name__ == "__main__":
  main()
