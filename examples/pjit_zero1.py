"""ZeRO-1 on 8 devices with jit + NamedSharding: params replicated, AdamW state split 8 ways.

A character-level MLP language model (``char_mlp.py``) is trained on a short text. The batch
is split over the mesh's "data" axis, every optimizer-state leaf that mirrors a param is
split over it too, and XLA inserts the collectives (reduce-scatter of the gradients,
all-gather of the new params). Prints the state layout, the per-device optimizer-state bytes
for the three modes, and the loss. Without accelerators it makes 8 virtual CPU devices; runs
in well under 30 s on CPU.

``--processes 2`` runs the same program as 2 processes with 4 CPU devices each (started by
``parallel.launch_local``, collectives over gloo): every process builds the same batches and
feeds its own rows (``process_local_slice``); process 0 prints. Same 8-device mesh, same
losses up to rounding.

  python examples/pjit_zero1.py
  python examples/pjit_zero1.py --processes 2
"""
import argparse
import sys
import time

import char_mlp  # first: it sets up 8 virtual CPU devices before jax is imported

import jax  # noqa: E402

from jaxopt_llm import optim, parallel, schedules  # noqa: E402

N_DEVICES = 8


def launch(processes: int) -> None:
  """Runs this file as ``processes`` processes; prints process 0's output."""
  results = parallel.launch_local([sys.executable, __file__], processes,
                                  local_device_count=N_DEVICES // processes, timeout=900)
  for i, r in enumerate(results):
    if r.returncode:
      raise SystemExit(f"process {i} failed ({r.returncode}):\n{r.stderr[-3000:]}")
  print("".join(line for line in results[0].stdout.splitlines(keepends=True)
                if not line.startswith("[Gloo]")), end="")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--processes", type=int, default=1, choices=(1, 2, 4, 8),
                  help="run as this many processes on this machine (CPU, gloo)")
  args = ap.parse_args(argv)
  if args.processes > 1:
    return launch(args.processes)
  t0 = time.perf_counter()
  parallel.initialize_distributed()  # a no-op unless started by launch_local (or a cluster)
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  params = char_mlp.init_params()
  tx = optim.adamw(schedules.warmup_cosine(1e-2, 30, char_mlp.STEPS, min_lr=1e-3),
                   weight_decay=0.1, mask=optim.weight_decay_mask)

  mesh = parallel.make_mesh()  # all devices (of all processes) on the "data" axis
  log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
      f"devices in {jax.process_count()} process(es)")
  n_params = sum(p.size for p in jax.tree.leaves(params))
  log(f"model: {n_params:,} params, vocab {len(char_mlp.CHARS)}\n")

  # Per-device bytes of the AdamW state in each mode (created directly in its layout).
  plans = {mode: parallel.plan_shardings(tx, params, mesh, mode) for mode in parallel.MODES}
  log(f"{'mode':<11}{'state bytes/device':>19}{'params bytes/device':>21}")
  for mode, plan in plans.items():
    p = parallel.place_params(params, plan)
    s = parallel.init_opt_state(tx, p, plan)
    log(f"{mode:<11}{max(parallel.bytes_per_device(s).values()):>19,}"
        f"{max(parallel.bytes_per_device(p).values()):>21,}")

  plan = plans["zero1"]
  log("\nZeRO-1 layout of AdamW's first moment (params stay replicated):")
  for path, sh in jax.tree_util.tree_leaves_with_path(plan.opt_state[0].mu):
    leaf = params
    for k in path:
      leaf = leaf[k.key]
    log(f"  mu{jax.tree_util.keystr(path):<22} {str(leaf.shape):<12} {sh.spec}")

  params_d = parallel.place_params(params, plan)
  state = parallel.init_opt_state(tx, params_d, plan)
  step = parallel.make_train_step(char_mlp.loss_fn, tx, plan)
  log()
  for t, batch in enumerate(char_mlp.batches()):
    # The same global batch on every process; each feeds its rows (one process: all of them).
    batch = parallel.shard_batch(parallel.process_local_slice(batch, mesh), mesh)
    params_d, state, loss = step(params_d, state, batch)
    if t % 50 == 0 or t == char_mlp.STEPS - 1:
      log(f"step {t:4d}  loss {float(parallel.to_host(loss)):.3f}")
  log(f"\nunigram entropy {char_mlp.unigram_entropy():.3f} nats; final train loss "
      f"{float(parallel.to_host(loss)):.3f}")
  mu = state[0].mu["hidden"]["kernel"]
  log(f"mu['hidden']['kernel'] {mu.shape}: {mu.sharding.spec}, "
      f"{mu.addressable_shards[0].data.shape} per device")
  log(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
