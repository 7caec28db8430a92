"""Per-device optimizer-state bytes: AdamW vs Lion vs Sophia, replicated vs ZeRO-1 vs FSDP.

The state is created in each layout with ``parallel.init_opt_state`` (jit with
``out_shardings``, so no device ever holds more than its share) on 8 devices, and measured
from the arrays' ``addressable_shards``, not computed from a formula. The params are those of
a small GPT-style decoder (untied embedding and head, pre-LN blocks), a few million of them.

Expected: AdamW and Sophia keep two params-shaped moments (``mu``, ``nu`` / ``hessian``), Lion
one; ZeRO-1 and FSDP divide that by 8 (leaves with no dimension divisible by 8 stay whole,
here none); FSDP also divides the params.

  python benchmarks/state_bytes.py            # ~7.3M params
  python benchmarks/state_bytes.py --quick    # ~0.6M params
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxopt_llm import optim, parallel  # noqa: E402


def gpt_params(vocab: int, d: int, layers: int) -> dict:
  """Zeros with a GPT's shapes (values do not matter for a byte count)."""
  z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  block = lambda: {"ln1": z(d), "qkv": z(d, 3 * d), "proj": z(d, d), "ln2": z(d),  # noqa: E731
                   "fc": z(d, 4 * d), "fc_out": z(4 * d, d)}
  return {"embed": z(vocab, d), "pos": z(256, d),
          "blocks": [block() for _ in range(layers)], "ln_f": z(d), "head": z(d, vocab)}


def optimizers() -> dict:
  return {"adamw": optim.adamw(1e-3), "lion": optim.lion(1e-4), "sophia": optim.sophia(1e-4)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="a ~0.6M-param model")
  args = ap.parse_args()
  vocab, d, layers = (1024, 128, 2) if args.quick else (8192, 256, 4)
  t0 = time.perf_counter()
  params = gpt_params(vocab, d, layers)
  n_params = sum(p.size for p in jax.tree.leaves(params))
  param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  mesh = parallel.make_mesh()
  n = mesh.shape["data"]
  print(f"{n_params:,} params ({param_bytes / 2**20:.1f} MiB fp32), {n} "
        f"{jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")
  print()
  head = (f"{'optimizer':<10}{'mode':<12}{'state MiB/device':>17}{'x params':>10}"
          f"{'params MiB/device':>19}{'state total/params':>20}")
  print(head)
  print("-" * len(head))
  for name, tx in optimizers().items():
    for mode in parallel.MODES:
      plan = parallel.plan_shardings(tx, params, mesh, mode)
      p = parallel.place_params(params, plan)
      s = parallel.init_opt_state(tx, p, plan)
      per_dev_state = max(parallel.bytes_per_device(s).values())
      per_dev_params = max(parallel.bytes_per_device(p).values())
      total_state = sum(l.nbytes for l in jax.tree.leaves(s))
      print(f"{name:<10}{mode:<12}{per_dev_state / 2**20:>17.3f}"
            f"{per_dev_state / param_bytes:>10.3f}{per_dev_params / 2**20:>19.3f}"
            f"{total_state / param_bytes:>20.3f}")
      del p, s
  print(f"\n'x params': per-device state bytes / all params' bytes (replicated AdamW = 2, "
        f"Lion = 1; ZeRO-1 / FSDP divide by {n}). 'state total/params': the whole state "
        f"(all shards once) / params.\nmeasured from addressable_shards; "
        f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
