"""Classic data parallelism with pmap: one replica per device, gradients averaged by pmean.

The same character-level MLP as ``pjit_zero1.py``, trained with Lion. Each of the 8 devices
takes 1/8 of the batch; ``lax.pmean`` averages the gradients (and the loss) over the "data"
axis before the update, so every replica applies the same update. Checks at the end that the
replicas still hold identical params. Without accelerators it makes 8 virtual CPU devices;
runs in well under 30 s on CPU.

  python examples/pmap_dp.py
"""
import os

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
  """Runs per device on its slice; a plain mean, so pmean of the per-device means is exact."""
  e = params["embed"][batch["x"]].reshape(batch["x"].shape[0], -1)
  h = jax.nn.gelu(e @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return losses.cross_entropy(h @ params["out"]["kernel"] + params["out"]["bias"], batch["y"])


def main():
  t0 = time.perf_counter()
  n_dev = jax.local_device_count()
  chars = sorted(set(TEXT))
  ids = np.array([chars.index(c) for c in TEXT], np.int32)
  # Lion: 3-10x smaller lr than AdamW, larger decay (Chen et al., 2023).
  tx = optim.lion(schedules.warmup_cosine(2e-3, 30, STEPS, min_lr=2e-4), weight_decay=0.3,
                  mask=optim.weight_decay_mask)
  params = init_params(len(chars))
  print(f"{n_dev} {jax.devices()[0].platform} devices, {BATCH // n_dev} examples each; "
        f"{sum(p.size for p in jax.tree.leaves(params)):,} params")

  step = parallel.make_pmap_train_step(loss_fn, tx)  # axis_name="data"
  params_r = parallel.replicate(params)
  state_r = parallel.replicate(tx.init(params))
  print(f"per-device bytes: params {max(parallel.bytes_per_device(params_r).values()):,}, "
        f"Lion state {max(parallel.bytes_per_device(state_r).values()):,} (one moment)\n")

  rng = np.random.RandomState(1)
  for t in range(STEPS):
    start = rng.randint(0, len(ids) - CONTEXT - 1, BATCH)
    window = ids[start[:, None] + np.arange(CONTEXT + 1)]
    batch = parallel.split_batch({"x": window[:, :CONTEXT], "y": window[:, CONTEXT]})
    params_r, state_r, loss = step(params_r, state_r, batch)
    if t % 50 == 0 or t == STEPS - 1:
      print(f"step {t:4d}  loss {float(loss[0]):.3f}")

  p = np.bincount(ids, minlength=len(chars)) / len(ids)
  unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
  print(f"\nunigram entropy {unigram:.3f} nats; final train loss {float(loss[0]):.3f}")
  same = all(bool(np.all(np.asarray(x) == np.asarray(x)[:1])) for x in jax.tree.leaves(params_r))
  print(f"replicas identical after {STEPS} steps: {same}")
  print(f"total {time.perf_counter() - t0:.1f} s")
  if not same:
    raise SystemExit("replicas diverged")


if __name__ == "__main__":
  main()
