"""Two-tower contrastive learning on a toy task: align two views of a hidden variable.

Each example has a hidden ``z`` (8 numbers) seen through two different noisy nonlinear
"sensors": view A (16 numbers) and view B (12 numbers). Two small MLP encoders, one per
view, are trained so that matching pairs have the highest cosine similarity, with

* ``losses.in_batch_info_nce`` (symmetric, temperature 0.1), and
* ``losses.clip_loss`` (CLIP's learnable log-scale, initialised to log(1/0.07)).

Printed on 512 held-out pairs: top-1 retrieval accuracy (for each A, is its own B the
most similar of the 512?; chance is 0.2%), and CLIP's learned scale.

``--sharded`` trains the InfoNCE towers data-parallel under ``jax.shard_map`` over all
devices with global negatives (``axis_name``): the loss is that of the whole batch, as on
one device. Run as a script it creates 8 virtual CPU devices for this.

    python examples/contrastive_toy.py [--steps 300] [--sharded] [--losses clip_loss]
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--sharded" in sys.argv:
  # Must be set before jax is imported: XLA reads it once.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxopt_llm import losses, optim  # noqa: E402

LATENT, DIM_A, DIM_B, HIDDEN, OUT = 8, 16, 12, 64, 16
TEMPERATURE = 0.1
EVAL_PAIRS = 512


def make_world(seed):
  """The fixed sensors: random mixing matrices of the two views."""
  rng = np.random.default_rng(seed)
  return {"a": rng.standard_normal((LATENT, DIM_A)) / math.sqrt(LATENT),
          "b": rng.standard_normal((LATENT, DIM_B)) / math.sqrt(LATENT),
          "b2": rng.standard_normal((DIM_B, DIM_B)) / math.sqrt(DIM_B)}


def sample(world, rng, n):
  # Data are made on the host with numpy: cheap, and nothing to compile.
  z = rng.standard_normal((n, LATENT))
  xa = np.tanh(2.0 * z @ world["a"]) + 0.1 * rng.standard_normal((n, DIM_A))
  hb = z @ world["b"]
  xb = np.sin(hb) @ world["b2"] + 0.5 * hb + 0.1 * rng.standard_normal((n, DIM_B))
  return xa.astype(np.float32), xb.astype(np.float32)


def init_tower(rng, dim_in):
  return {"w1": rng.standard_normal((dim_in, HIDDEN)) / math.sqrt(dim_in),
          "b1": np.zeros(HIDDEN),
          "w2": rng.standard_normal((HIDDEN, OUT)) / math.sqrt(HIDDEN)}


def tower(p, x):
  return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"]


def init_params(seed):
  rng = np.random.default_rng(seed)
  params = {"a": init_tower(rng, DIM_A), "b": init_tower(rng, DIM_B),
            "logit_scale": np.asarray(losses.contrastive.CLIP_INIT_LOGIT_SCALE)}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def retrieval_accuracy(params, xa, xb):
  sim = losses.pairwise_cosine_similarity(tower(params["a"], xa), tower(params["b"], xb))
  return jnp.mean(jnp.argmax(sim, axis=1) == jnp.arange(xa.shape[0]))


def loss_fn(params, xa, xb, kind, axis_name=None):
  ea, eb = tower(params["a"], xa), tower(params["b"], xb)
  if kind == "clip_loss":
    return losses.clip_loss(ea, eb, params["logit_scale"], axis_name=axis_name)
  return losses.in_batch_info_nce(ea, eb, temperature=TEMPERATURE, symmetric=True,
                                  axis_name=axis_name)


def train(kind, world, args, sharded=False):
  tx = optim.adamw(args.lr, weight_decay=0.0)
  params = init_params(args.seed)
  state = tx.init(params)
  eval_a, eval_b = sample(world, np.random.default_rng(10_000 + args.seed), EVAL_PAIRS)

  if sharded:
    # Data parallel: the batch is split over the devices, the parameters replicated.
    # Negatives are gathered from every device, so the loss is the global-batch one and
    # jax.grad through the shard_map gives its exact gradient.
    mesh = jax.make_mesh((len(jax.devices()),), ("batch",), axis_types=(AxisType.Auto,))
    objective = jax.shard_map(
        lambda p, a, b: loss_fn(p, a, b, kind, axis_name="batch"), mesh=mesh,
        in_specs=(P(), P("batch"), P("batch")), out_specs=P())
  else:
    def objective(p, a, b):
      return loss_fn(p, a, b, kind)

  @jax.jit
  def step(params, state, xa, xb):
    loss, grads = jax.value_and_grad(objective)(params, xa, xb)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def evaluate(params):
    return (objective(params, eval_a[:args.batch], eval_b[:args.batch]),
            retrieval_accuracy(params, eval_a, eval_b))

  rng = np.random.default_rng(args.seed + 1)
  history = {"step": [], "loss": [], "accuracy": [], "scale": []}
  for t in range(args.steps + 1):
    if t % args.eval_every == 0 or t == args.steps:
      loss, acc = evaluate(params)
      for name, value in zip(history, (t, loss, acc, jnp.exp(params["logit_scale"]))):
        history[name].append(float(value))
    if t < args.steps:
      params, state, _ = step(params, state, *sample(world, rng, args.batch))
  return history


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--sharded", action="store_true",
                      help="InfoNCE data-parallel over all devices, global negatives")
  parser.add_argument("--losses", default="in_batch_info_nce,clip_loss",
                      help="comma-separated: in_batch_info_nce, clip_loss")
  args = parser.parse_args(argv)
  n_dev = len(jax.devices())
  if args.sharded and args.batch % n_dev:
    parser.error(f"--batch {args.batch} must be divisible by the {n_dev} devices")
  t0 = time.time()
  world = make_world(1234)
  results = {}
  kinds = args.losses.split(",")
  for kind in kinds:
    if kind not in ("in_batch_info_nce", "clip_loss"):
      parser.error(f"--losses: unknown loss {kind!r}")
  for kind in kinds:
    sharded = args.sharded and kind == "in_batch_info_nce"
    results[kind] = train(kind, world, args, sharded=sharded)
    where = f", sharded over {n_dev} devices (global negatives)" if sharded else ""
    print(f"\n{kind}{where}: batch {args.batch}, top-1 retrieval among "
          f"{EVAL_PAIRS} held-out pairs (chance {1 / EVAL_PAIRS:.1%})")
    scale = kind == "clip_loss"
    print(f"{'step':>5s} {'loss':>8s} {'top-1':>7s}" + (f" {'scale':>7s}" if scale else ""))
    h = results[kind]
    for i in range(len(h["step"])):
      print(f"{int(h['step'][i]):5d} {h['loss'][i]:8.4f} {h['accuracy'][i]:7.1%}"
            + (f" {h['scale'][i]:7.2f}" if scale else ""))
  print("\n" + "; ".join(
      f"{k}: top-1 {h['accuracy'][0]:.1%} -> {h['accuracy'][-1]:.1%}"
      for k, h in results.items()) + f" ({time.time() - t0:.1f}s)")
  return results


if __name__ == "__main__":
  main()
