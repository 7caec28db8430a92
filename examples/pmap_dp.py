"""Classic data parallelism with pmap: one replica per device, gradients averaged by pmean.

The same character-level MLP as ``pjit_zero1.py`` (``char_mlp.py``), trained with Lion. Each
of the 8 devices takes 1/8 of the batch; ``lax.pmean`` averages the gradients (and the loss)
over the "data" axis before the update, so every replica applies the same update. Checks at
the end that the replicas still hold identical params. Without accelerators it makes 8
virtual CPU devices; runs in well under 30 s on CPU.

  python examples/pmap_dp.py
"""
import time

import char_mlp  # first: it sets up 8 virtual CPU devices before jax is imported

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxopt_llm import optim, parallel, schedules  # noqa: E402


def main():
  t0 = time.perf_counter()
  n_dev = jax.local_device_count()
  # Lion: 3-10x smaller lr than AdamW, larger decay (Chen et al., 2023).
  tx = optim.lion(schedules.warmup_cosine(2e-3, 30, char_mlp.STEPS, min_lr=2e-4),
                  weight_decay=0.3, mask=optim.weight_decay_mask)
  params = char_mlp.init_params()
  print(f"{n_dev} {jax.devices()[0].platform} devices, {char_mlp.BATCH // n_dev} examples "
        f"each; {sum(p.size for p in jax.tree.leaves(params)):,} params")

  step = parallel.make_pmap_train_step(char_mlp.loss_fn, tx)  # axis_name="data"
  params_r = parallel.replicate(params)
  state_r = parallel.replicate(tx.init(params))
  print(f"per-device bytes: params {max(parallel.bytes_per_device(params_r).values()):,}, "
        f"Lion state {max(parallel.bytes_per_device(state_r).values()):,} (one moment)\n")

  for t, batch in enumerate(char_mlp.batches()):
    params_r, state_r, loss = step(params_r, state_r, parallel.split_batch(batch))
    if t % 50 == 0 or t == char_mlp.STEPS - 1:
      print(f"step {t:4d}  loss {float(loss[0]):.3f}")

  print(f"\nunigram entropy {char_mlp.unigram_entropy():.3f} nats; final train loss "
        f"{float(loss[0]):.3f}")
  same = all(bool(np.all(np.asarray(x) == np.asarray(x)[:1])) for x in jax.tree.leaves(params_r))
  print(f"replicas identical after {char_mlp.STEPS} steps: {same}")
  print(f"total {time.perf_counter() - t0:.1f} s")
  if not same:
    raise SystemExit("replicas diverged")


if __name__ == "__main__":
  main()
