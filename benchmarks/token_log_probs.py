"""Per-token log-probs for RL losses: fused (no [N, V] logits) vs the full logits.

A GRPO step needs ``log p(y_t)`` for every completion token. For a long-completion batch
(``B`` completions of ``T`` tokens, hidden size ``d``, vocabulary ``V``) we compile

  * full:  ``log_softmax(hidden @ kernel)`` gathered at the labels (materialises the
           float32 ``[B*T, V]`` logits, and their gradient in the backward pass);
  * fused: ``losses.token_log_probs_from_hidden(hidden, kernel, labels)`` (chunks of
           the logits through ``fused_linear_cross_entropy(..., reduction="none")``);

each as (a) the forward alone and (b) ``jax.value_and_grad`` of ``grpo_loss`` (dapo, off
policy, with the k3 KL) w.r.t. ``(hidden, kernel)``, and report XLA's compiled temporary
memory (``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``: the
scratch beyond inputs and outputs). Nothing is executed, so the full path's multi-GiB
buffers are only planned, never allocated: the script runs anywhere in seconds.

Default shape (B, T, d, V) = (8, 4096, 1024, 32000) float32; ``--gpu-shape`` adds
(8, 4096, 4096, 128256) bfloat16 (Llama-3 vocabulary). ``--chunk-size`` overrides the
fused default (``default_chunk_size``: 384 tokens at V = 32000 on CPU, 1024 on GPU).

  python benchmarks/token_log_probs.py [--batch B] [--length T] [--d D] [--vocab V]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jaxopt_llm.losses import grpo_loss, token_log_probs_from_hidden
from jaxopt_llm.losses.fused import default_chunk_size


def full_log_probs(hidden, kernel, labels):
  logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _grpo_step(log_probs_fn):
  def loss(hidden, kernel, labels, old, ref, adv, mask):
    logp = log_probs_fn(hidden, kernel, labels)
    return grpo_loss(logp, old, adv, mask, ref_per_token_logps=ref, beta=0.04)[0]
  return jax.value_and_grad(loss, argnums=(0, 1))


def measure(b, t, d, v, dtype, chunk_size=None):
  hidden = jax.ShapeDtypeStruct((b, t, d), dtype)
  kernel = jax.ShapeDtypeStruct((d, v), dtype)
  labels = jax.ShapeDtypeStruct((b, t), jnp.int32)
  per_tok = jax.ShapeDtypeStruct((b, t), jnp.float32)
  adv = jax.ShapeDtypeStruct((b,), jnp.float32)
  mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
  fused = lambda h, w, y: token_log_probs_from_hidden(h, w, y, chunk_size=chunk_size)  # noqa
  rows = {}
  for name, fn in (("full", full_log_probs), ("fused", fused)):
    fwd = jax.jit(fn).lower(hidden, kernel, labels).compile()
    step = jax.jit(_grpo_step(fn)).lower(hidden, kernel, labels, per_tok, per_tok, adv,
                                         mask).compile()
    rows[name] = (fwd.memory_analysis().temp_size_in_bytes,
                  step.memory_analysis().temp_size_in_bytes)
  return rows


def _gib(x):
  return f"{x / 2**30:8.3f} GiB"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=4096)
  p.add_argument("--d", type=int, default=1024)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--chunk-size", type=int, default=None)
  p.add_argument("--gpu-shape", action="store_true",
                 help="also (8, 4096, 4096, 128256) bfloat16")
  args = p.parse_args()
  shapes = [(args.batch, args.length, args.d, args.vocab, jnp.float32)]
  if args.gpu_shape:
    shapes.append((8, 4096, 4096, 128256, jnp.bfloat16))
  print(f"backend: {jax.default_backend()}, jax {jax.__version__}")
  for b, t, d, v, dtype in shapes:
    chunk = args.chunk_size or default_chunk_size(b * t, v)
    rows = measure(b, t, d, v, dtype, args.chunk_size)
    logits = b * t * v * 4
    print(f"\nB={b} T={t} d={d} V={v} {jnp.dtype(dtype).name}; fused chunk {chunk} tokens; "
          f"float32 [B*T, V] logits = {_gib(logits).strip()}")
    print(f"{'':8s}{'forward temp':>16s}{'GRPO value+grad temp':>24s}")
    for name, (fwd, step) in rows.items():
      print(f"{name:8s}{_gib(fwd):>16s}{_gib(step):>24s}")
    (ff, fs), (uf, us) = rows["fused"], rows["full"]
    print(f"{'ratio':8s}{f'1/{uf / max(ff, 1):.0f}':>16s}{f'1/{us / max(fs, 1):.0f}':>24s}")


if __name__ == "__main__":
  main()
