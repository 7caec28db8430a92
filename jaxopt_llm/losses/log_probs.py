"""Per-token log-probabilities from hidden states, without the ``[tokens, vocab]`` logits.

RL and preference losses (GRPO, DPO with per-token terms) need ``log p(y_t)`` for every
completion token, not a mean loss. Taking them from the full logits ``hidden @ kernel``
materialises a ``[B * T, V]`` float32 block (plus its gradient): 16 GiB for 8 completions
of 4096 tokens at V = 128256. :func:`token_log_probs_from_hidden` gets them from
:func:`~jaxopt_llm.losses.fused_linear_cross_entropy` with ``reduction="none"``, whose
per-token value is ``-log p(y_t)``: the logits exist one ``[chunk, block]`` tile at a
time, forward and backward.

Same numbers as ``log_softmax(hidden @ kernel / temperature)`` gathered at the labels (the
masking of :func:`~jaxopt_llm.losses.sequence_log_probs`), and the same convention as
TRL 1.16's GRPO (``selective_log_softmax`` / its fused LM head): logits are divided by the
sampling ``temperature``, after a Gemma-style soft-cap when there is one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_choice, check_int, check_real
from jaxopt_llm.losses._common import as_mask, check_floating
from jaxopt_llm.losses.fused import fused_linear_cross_entropy


def token_log_probs_from_hidden(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    temperature: float = 1.0,
    logit_soft_cap: float | None = None,
    ignore_index: int = -100,
    where: jax.typing.ArrayLike | None = None,
    shift: bool = False,
    chunk_size: int | None = None,
    validate: bool = False,
) -> jax.Array:
  r"""``log p(y_t)`` per token from the LM head's input, never holding ``[N, V]`` logits.

  With ``u = hidden @ kernel + bias``, logits ``z = u`` (or ``c * tanh(u / c)`` with a
  soft-cap ``c``) and a sampling temperature ``tau``::

    out[..., t] = log_softmax(z[..., t, :] / tau)[y_t]     where token t counts
    out[..., t] = 0                                        elsewhere

  A token counts when ``labels != ignore_index`` and ``where`` is True there (as in
  :func:`~jaxopt_llm.losses.sequence_log_probs`), so ``out.sum(-1)`` equals
  ``sequence_log_probs(hidden @ kernel + bias, labels, ...)`` at ``tau = 1`` and
  ``out`` equals the log-softmax gather on the full logits, token by token (the tests
  check both). Out-of-range labels: ``ValueError`` eagerly, NaN under ``jit`` (or a
  checkify check with ``validate=True``), never a silently wrong finite value.

  How: ``-fused_linear_cross_entropy(hidden / tau, kernel, labels, bias=bias / tau,
  logit_soft_cap=c / tau, reduction="none")``; dividing ``u`` by ``tau`` and the cap by
  ``tau`` gives ``(c / tau) tanh((u / tau) / (c / tau)) = z / tau``. Only
  ``[chunk_size, vocab_block_size]`` tiles of logits are alive at a time; the backward
  keeps the per-token statistics (O(N)) and recomputes each tile's logits. See the
  fused loss for the memory and precision details (float32 logits and softmax; gradients
  for ``hidden``, ``kernel`` and ``bias`` in their dtypes). With ``tau != 1`` a
  half-precision ``hidden`` is divided in float32 (so the head product runs in float32).
  ``benchmarks/token_log_probs.py`` measures the compiled temporary memory against the
  full-logits path: for 8 completions of 4096 tokens (d = 1024, V = 32000, float32) a
  GRPO value-and-gradient step plans 0.283 GiB of temporaries instead of 11.7 GiB.

  Args:
    hidden: ``[..., T, d]`` (or ``[N, d]``) floating hidden states (the LM head's input).
    kernel: ``[d, V]`` head kernel (Flax ``Dense`` layout; a tied embedding ``E [V, d]``
      is ``E.T``).
    labels: ``[..., T]`` integer tokens whose log-probabilities are wanted.
    bias: optional ``[V]`` head bias.
    temperature: ``tau > 0``; the logits are divided by it (TRL's GRPO scores
      completions at its sampling temperature).
    logit_soft_cap: optional ``c > 0``, the model's final-logit soft-cap (applied before
      the temperature).
    ignore_index: label value of tokens that do not count (their output is 0).
    where: optional boolean (or 0/1) mask of ``labels.shape``, e.g. a completion mask.
    shift: causal-LM alignment: score ``labels[..., 1:]`` with ``hidden[..., :-1, :]``
      (and ``where[..., 1:]``); the output then has ``T - 1`` positions. With ``False``
      the caller has aligned them.
    chunk_size: tokens per logits tile (see ``fused_linear_cross_entropy``).
    validate: add a checkify check for out-of-range labels when traced.

  Returns:
    float32 ``labels.shape`` (shifted: ``T - 1`` positions) of log-probabilities, 0
    where a token does not count (the fused loss computes in float32).

  Raises:
    ValueError: naming the argument, for bad shapes/dtypes, ``temperature``,
      ``logit_soft_cap``, ``shift``, or (eagerly) out-of-range labels.
  """
  owner = "token_log_probs_from_hidden"
  check_choice(owner, "shift", shift, (True, False))
  check_real(owner, "temperature", temperature, lo=0.0, lo_open=True)
  if logit_soft_cap is not None:
    check_real(owner, "logit_soft_cap", logit_soft_cap, lo=0.0, lo_open=True)
  check_int(owner, "ignore_index", ignore_index)
  hidden = jnp.asarray(hidden)
  labels = jnp.asarray(labels)
  check_floating(owner, "hidden", hidden, min_ndim=2)
  if labels.shape != hidden.shape[:-1]:
    raise ValueError(f"{owner}: `labels` must have shape hidden.shape[:-1] = "
                     f"{hidden.shape[:-1]}, got {labels.shape}")
  if where is not None:
    where = as_mask(owner, where, labels.shape)
  if shift:
    hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    where = None if where is None else where[..., 1:]

  scaled_hidden, scaled_bias, cap = hidden, bias, logit_soft_cap
  if not (isinstance(temperature, (int, float)) and float(temperature) == 1.0):
    # Dividing a bf16 ``hidden`` in bf16 would round the tempered logits to 8 bits; in
    # float32 the products then run in float32 too (more exact than needed, never less).
    inv_t = 1.0 / jnp.asarray(temperature, jnp.result_type(hidden.dtype, jnp.float32))
    scaled_hidden = hidden.astype(inv_t.dtype) * inv_t
    scaled_bias = None if bias is None else jnp.asarray(bias) * inv_t
    cap = None if logit_soft_cap is None else logit_soft_cap * inv_t
  nll = fused_linear_cross_entropy(
      scaled_hidden, kernel, labels, bias=scaled_bias, ignore_index=ignore_index,
      reduction="none", chunk_size=chunk_size, logit_soft_cap=cap, where=where,
      validate=validate)
  return -nll
