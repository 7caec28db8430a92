"""One process of the 2-process run in ``test_distributed.py`` (run by path, not collected).

``python _distributed_child.py OUT_PREFIX`` under ``parallel.launch_local``: joins the run
(``initialize_distributed`` reads the launcher's environment variables), trains ``STEPS``
steps of AdamW under ZeRO-1 on the global 8-device mesh, each process feeding its own rows of
the same global batches, and writes ``OUT_PREFIX.<process index>.npz`` with the loss curve,
the final params and AdamW's ``mu`` (gathered from both processes with ``to_host``).

``train()`` is also what the test runs in its own process on 8 devices for the reference:
one code path, so the two runs differ only in how many processes hold the devices.
"""
import os
import sys

import numpy as np

STEPS = 10
BATCH = 32
N_DEVICES = 8
# Fewer XLA backend passes: faster to compile, the same IEEE fp32 arithmetic.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def init_params(seed: int = 0) -> dict:
  """A small MLP; [16, 32], [32] and [32, 5] split 8 ways under ZeRO-1, [5] and [] do not."""
  rng = np.random.RandomState(seed)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  return {"l1": {"w": f32(0.3 * rng.randn(16, 32)), "b": f32(np.zeros(32))},
          "l2": {"w": f32(0.3 * rng.randn(32, 5)), "b": f32(0.1 * rng.randn(5))},
          "scale": f32(1.0)}


def global_batches(seed: int = 0) -> list:
  """The same global batches on every process (same seed)."""
  rng = np.random.RandomState(seed)
  x = rng.randn(STEPS, BATCH, 16).astype(np.float32)
  y = rng.randint(0, 5, (STEPS, BATCH)).astype(np.int32)
  return [{"x": x[t], "y": y[t]} for t in range(STEPS)]


def loss_fn(params, batch):
  import jax.numpy as jnp
  from jaxopt_llm import losses
  h = jnp.tanh(batch["x"] @ params["l1"]["w"] + params["l1"]["b"])
  logits = params["scale"] * (h @ params["l2"]["w"] + params["l2"]["b"])
  return losses.cross_entropy(logits, batch["y"])


def train() -> dict:
  """``STEPS`` ZeRO-1 AdamW steps on every device of the run; host numpy results."""
  import jax
  from jaxopt_llm import optim, parallel
  mesh = parallel.make_mesh()
  assert mesh.devices.size == N_DEVICES, mesh
  tx = optim.adamw(1e-2, weight_decay=0.1)
  params = init_params()
  plan = parallel.plan_shardings(tx, params, mesh, "zero1")
  p = parallel.place_params(params, plan)
  s = parallel.init_opt_state(tx, p, plan)
  step = parallel.make_train_step(loss_fn, tx, plan, compiler_options=FAST_COMPILE)
  losses_ = []
  for batch in global_batches():
    p, s, loss = step(p, s, parallel.shard_batch(parallel.process_local_slice(batch, mesh),
                                                 mesh))
    losses_.append(parallel.to_host(loss))
  mu = s[0].mu
  out = {"loss": np.stack(losses_),
         "mu_split": np.asarray(not mu["l1"]["w"].sharding.is_fully_replicated)}
  for prefix, tree in (("params", p), ("mu", mu)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(parallel.to_host(tree)):
      out[prefix + jax.tree_util.keystr(path)] = leaf
  return out


def main(out_prefix: str) -> None:
  # What a child of a test run inherits when nothing rewrites it (launch_local does): 8
  # virtual devices. initialize_distributed's local_device_count (4, from the launcher's
  # JAXOPT_LLM_LOCAL_DEVICE_COUNT) must win over it: the device counts are asserted below.
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  from jaxopt_llm import parallel
  assert parallel.initialize_distributed(), "launched without the multi-process environment"
  import jax
  counts = (jax.process_count(), jax.device_count(), jax.local_device_count())
  assert counts == (2, N_DEVICES, N_DEVICES // 2), counts
  result = train()
  np.savez(f"{out_prefix}.{jax.process_index()}.npz", **result)
  print(f"process {jax.process_index()}: devices {counts}, final loss {result['loss'][-1]:.6f}")


if __name__ == "__main__":
  main(sys.argv[1])
