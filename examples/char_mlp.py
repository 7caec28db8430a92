"""The character-level MLP language model that ``pjit_zero1.py`` and ``pmap_dp.py`` train.

Importing this module first gives a CPU-only machine 8 virtual devices (XLA reads the flag
when jax is first imported, so it is set here, before this module imports jax; an
``XLA_FLAGS`` that already sets a device count wins). Python puts ``examples/`` on the path
of a script run from it, so ``python examples/pjit_zero1.py`` finds this module from any
working directory.

The model: the embeddings of ``CONTEXT`` characters, concatenated, a GELU hidden layer, and
a softmax over the next character; trained on a short text whose unigram entropy (the loss
of a model that ignores the context) is printed for comparison.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxopt_llm import losses  # noqa: E402

TEXT = (
    "the harbour was quiet in the early morning. fishing boats rocked against the stone pier, "
    "their ropes creaking as the tide came in, and the gulls walked along the wall looking for "
    "anything the night had left behind. an old man sat on a crate mending a net, pulling the "
    "twine through each knot with the patience of someone who had done it many times. the "
    "baker at the corner opened her shutters and the smell of bread drifted down to the water."
) * 4
CONTEXT, EMBED, HIDDEN, BATCH, STEPS = 6, 32, 256, 256, 300
CHARS = sorted(set(TEXT))
IDS = np.array([CHARS.index(c) for c in TEXT], np.int32)


def init_params(vocab: int = len(CHARS), seed: int = 0) -> dict:
  rng = np.random.RandomState(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return {"embed": f32(0.1 * rng.randn(vocab, EMBED)),
          "hidden": {"kernel": f32(rng.randn(CONTEXT * EMBED, HIDDEN) / np.sqrt(CONTEXT * EMBED)),
                     "bias": f32(np.zeros(HIDDEN))},
          "out": {"kernel": f32(rng.randn(HIDDEN, vocab) / np.sqrt(HIDDEN)),
                  "bias": f32(np.zeros(vocab))}}


def loss_fn(params: dict, batch: dict) -> jax.Array:
  """Mean next-character cross-entropy (a plain mean: exact under pmap's pmean too)."""
  e = params["embed"][batch["x"]].reshape(batch["x"].shape[0], -1)
  h = jax.nn.gelu(e @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return losses.cross_entropy(h @ params["out"]["kernel"] + params["out"]["bias"], batch["y"])


def batches(steps: int = STEPS, batch_size: int = BATCH, seed: int = 1):
  """``steps`` random batches of ``CONTEXT`` characters and the next one, as host arrays."""
  rng = np.random.RandomState(seed)
  for _ in range(steps):
    start = rng.randint(0, len(IDS) - CONTEXT - 1, batch_size)
    window = IDS[start[:, None] + np.arange(CONTEXT + 1)]
    yield {"x": window[:, :CONTEXT], "y": window[:, CONTEXT]}


def unigram_entropy() -> float:
  """The loss of the best context-free model, in nats."""
  p = np.bincount(IDS, minlength=len(CHARS)) / len(IDS)
  return float(-(p[p > 0] * np.log(p[p > 0])).sum())
