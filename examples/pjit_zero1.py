"""ZeRO-1 on 8 devices with jit + NamedSharding: params replicated, AdamW state split 8 ways.

A character-level MLP language model is trained on a short text. The batch is split over the
mesh's "data" axis, every optimizer-state leaf that mirrors a param is split over it too, and
XLA inserts the collectives (reduce-scatter of the gradients, all-gather of the new params).
Prints the state layout, the per-device optimizer-state bytes for the three modes, and the
loss. Without accelerators it makes 8 virtual CPU devices; runs in well under 30 s on CPU.

  python examples/pjit_zero1.py
"""
import os

# XLA reads the flag when jax is first imported: set it before that.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxopt_llm import losses, optim, parallel, schedules  # noqa: E402

TEXT = (
    "the harbour was quiet in the early morning. fishing boats rocked against the stone pier, "
    "their ropes creaking as the tide came in, and the gulls walked along the wall looking for "
    "anything the night had left behind. an old man sat on a crate mending a net, pulling the "
    "twine through each knot with the patience of someone who had done it many times. the "
    "baker at the corner opened her shutters and the smell of bread drifted down to the water."
) * 4
CONTEXT, EMBED, HIDDEN, BATCH, STEPS = 6, 32, 256, 256, 300


def init_params(vocab, seed=0):
  rng = np.random.RandomState(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return {"embed": f32(0.1 * rng.randn(vocab, EMBED)),
          "hidden": {"kernel": f32(rng.randn(CONTEXT * EMBED, HIDDEN) / np.sqrt(CONTEXT * EMBED)),
                     "bias": f32(np.zeros(HIDDEN))},
          "out": {"kernel": f32(rng.randn(HIDDEN, vocab) / np.sqrt(HIDDEN)),
                  "bias": f32(np.zeros(vocab))}}


def loss_fn(params, batch):
  e = params["embed"][batch["x"]].reshape(batch["x"].shape[0], -1)
  h = jax.nn.gelu(e @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return losses.cross_entropy(h @ params["out"]["kernel"] + params["out"]["bias"], batch["y"])


def main():
  t0 = time.perf_counter()
  chars = sorted(set(TEXT))
  ids = np.array([chars.index(c) for c in TEXT], np.int32)
  params = init_params(len(chars))
  tx = optim.adamw(schedules.warmup_cosine(1e-2, 30, STEPS, min_lr=1e-3), weight_decay=0.1,
                   mask=optim.weight_decay_mask)

  mesh = parallel.make_mesh()  # all devices on the "data" axis
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"model: {n_params:,} params, vocab {len(chars)}\n")

  # Per-device bytes of the AdamW state in each mode (created directly in its layout).
  plans = {mode: parallel.plan_shardings(tx, params, mesh, mode) for mode in parallel.MODES}
  print(f"{'mode':<11}{'state bytes/device':>19}{'params bytes/device':>21}")
  for mode, plan in plans.items():
    p = parallel.place_params(params, plan)
    s = parallel.init_opt_state(tx, p, plan)
    print(f"{mode:<11}{max(parallel.bytes_per_device(s).values()):>19,}"
          f"{max(parallel.bytes_per_device(p).values()):>21,}")

  plan = plans["zero1"]
  print("\nZeRO-1 layout of AdamW's first moment (params stay replicated):")
  for path, sh in jax.tree_util.tree_leaves_with_path(plan.opt_state[0].mu):
    leaf = params
    for k in path:
      leaf = leaf[k.key]
    print(f"  mu{jax.tree_util.keystr(path):<22} {str(leaf.shape):<12} {sh.spec}")

  params_d = parallel.place_params(params, plan)
  state = parallel.init_opt_state(tx, params_d, plan)
  step = parallel.make_train_step(loss_fn, tx, plan)
  rng = np.random.RandomState(1)
  print()
  for t in range(STEPS):
    start = rng.randint(0, len(ids) - CONTEXT - 1, BATCH)
    window = ids[start[:, None] + np.arange(CONTEXT + 1)]
    batch = parallel.shard_batch({"x": window[:, :CONTEXT], "y": window[:, CONTEXT]}, mesh)
    params_d, state, loss = step(params_d, state, batch)
    if t % 50 == 0 or t == STEPS - 1:
      print(f"step {t:4d}  loss {float(loss):.3f}")
  p = np.bincount(ids, minlength=len(chars)) / len(ids)
  unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
  print(f"\nunigram entropy {unigram:.3f} nats; final train loss {float(loss):.3f}")
  mu = state[0].mu["hidden"]["kernel"]
  print(f"mu['hidden']['kernel'] {mu.shape}: {mu.sharding.spec}, "
        f"{mu.addressable_shards[0].data.shape} per device")
  print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
