"""Masked-language-model objective: BERT's 80/10/10 corruption and the loss on it.

``mask_tokens`` picks the prediction positions and corrupts the inputs; its labels hold
the original token at those positions and ``ignore_index`` everywhere else, so the loss
is plain :func:`~jaxopt_llm.losses.cross_entropy` on them (``masked_lm_loss``).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_int, check_scalar, is_concrete
from jaxopt_llm.losses._common import token_cross_entropy
from jaxopt_llm.losses.cross_entropy import cross_entropy


def mask_tokens(
    input_ids: jax.typing.ArrayLike,
    key: jax.Array,
    *,
    mask_token_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    special_tokens_mask: jax.typing.ArrayLike | None = None,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    ignore_index: int = -100,
) -> tuple[jax.Array, jax.Array]:
  r"""BERT's masked-LM corruption (Devlin et al., 2019, "BERT", sec. 3.1 and A.1).

  Each token that is not special is chosen for prediction independently with
  probability ``mask_prob`` (as HF's ``DataCollatorForLanguageModeling``; BERT's
  original code picks a fixed count per sequence). A chosen token is then::

    [MASK]                          with probability replace_prob      (0.8)
    a uniform token in [0, V)       with probability random_prob       (0.1)
    left unchanged                  otherwise                          (0.1)

  The random token is drawn from the whole vocabulary, as HF does (so it may be a
  special token, or by chance the original token). One uniform draw per token decides
  the three cases, so they are exclusive with exactly these probabilities.

  Args:
    input_ids: integer ``[...]`` token ids.
    key: a ``jax.random`` key.
    mask_token_id: id of ``[MASK]`` (integer >= 0).
    vocab_size: ``V`` (>= 1), the range of the random replacements.
    mask_prob: selection probability in [0, 1] (the three probabilities may be traced
      scalars, e.g. a masking-rate schedule under jit).
    special_tokens_mask: optional boolean (or 0/1) array of ``input_ids.shape``; True
      marks tokens never chosen (CLS/SEP/padding).
    replace_prob: probability in [0, 1] that a chosen token becomes ``[MASK]``.
    random_prob: probability in [0, 1 - replace_prob] that it becomes a random token.
    ignore_index: label of the positions that are not predicted.

  Returns:
    ``(inputs, labels)``: the corrupted ids (``input_ids``' dtype) and int32 labels
    (the original id where chosen, ``ignore_index`` elsewhere), both ``input_ids.shape``.
  """
  owner = "mask_tokens"
  check_int(owner, "mask_token_id", mask_token_id, lo=0)
  check_int(owner, "vocab_size", vocab_size, lo=1)
  check_int(owner, "ignore_index", ignore_index)
  check_scalar(owner, "mask_prob", mask_prob, lo=0.0, hi=1.0)
  check_scalar(owner, "replace_prob", replace_prob, lo=0.0, hi=1.0)
  check_scalar(owner, "random_prob", random_prob, lo=0.0, hi=1.0)
  if is_concrete(replace_prob) and is_concrete(random_prob):
    # The slack lets e.g. 0.8 + 0.2 through: 1.0 - 0.8 is 0.19999999999999996 in floats.
    if float(replace_prob) + float(random_prob) > 1.0 + 1e-9:
      raise ValueError(f"{owner}: `random_prob` must be in [0, 1 - replace_prob] = "
                       f"[0, {1.0 - float(replace_prob):g}], got {random_prob!r}")
  input_ids = jnp.asarray(input_ids)
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"{owner}: `input_ids` must be an integer array, got dtype "
                     f"{input_ids.dtype}")
  if special_tokens_mask is not None:
    special_tokens_mask = jnp.asarray(special_tokens_mask)
    if special_tokens_mask.shape != input_ids.shape or not (
        special_tokens_mask.dtype == jnp.bool_
        or jnp.issubdtype(special_tokens_mask.dtype, jnp.integer)):
      raise ValueError(
          f"{owner}: `special_tokens_mask` must be a boolean (or 0/1) array of shape "
          f"{input_ids.shape}, got {special_tokens_mask.dtype}{special_tokens_mask.shape}")
    special_tokens_mask = special_tokens_mask.astype(jnp.bool_)

  k_select, k_how, k_token = jax.random.split(key, 3)
  shape = input_ids.shape
  chosen = jax.random.uniform(k_select, shape) < mask_prob
  if special_tokens_mask is not None:
    chosen &= ~special_tokens_mask
  u = jax.random.uniform(k_how, shape)
  to_mask = chosen & (u < replace_prob)
  to_random = chosen & (u >= replace_prob) & (u < replace_prob + random_prob)
  random_ids = jax.random.randint(k_token, shape, 0, vocab_size, dtype=jnp.int32)

  inputs = jnp.where(to_mask, jnp.asarray(mask_token_id, input_ids.dtype), input_ids)
  inputs = jnp.where(to_random, random_ids.astype(input_ids.dtype), inputs)
  labels = jnp.where(chosen, input_ids.astype(jnp.int32), jnp.int32(ignore_index))
  return inputs, labels


def masked_lm_loss(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                   **kwargs: Any) -> jax.Array:
  r"""Cross-entropy on the masked positions only (BERT's MLM loss).

  ``labels`` are those of :func:`mask_tokens`: the original token where a position was
  chosen, ``ignore_index`` elsewhere. The loss is exactly
  :func:`~jaxopt_llm.losses.cross_entropy` with these labels (the same code, with this
  function's name in error messages),
  so ``"mean"`` averages over the chosen positions of the whole batch (HF's
  ``BertForMaskedLM``), unchosen positions get zero loss and zero gradient, and a batch
  with no chosen position gives 0.0, not NaN.

  Args:
    logits: ``[..., V]`` scores.
    labels: ``[...]`` labels from :func:`mask_tokens`.
    **kwargs: keyword arguments of :func:`~jaxopt_llm.losses.cross_entropy`
      (``ignore_index``, ``label_smoothing``, ``z_loss``, ``reduction``, ``where``,
      ``validate``); bad ones raise its errors.

  Returns:
    As :func:`~jaxopt_llm.losses.cross_entropy`.
  """
  owner = "masked_lm_loss"
  # cross_entropy's own defaults (so the two cannot drift apart), its checks and formula,
  # with this function's name in the error messages.
  params = dict(cross_entropy.__kwdefaults__)
  unknown = set(kwargs) - set(params)
  if unknown:
    raise TypeError(f"{owner}: unexpected keyword argument(s) {sorted(unknown)}")
  params.update(kwargs)
  return token_cross_entropy(owner, "labels", logits, labels, **params)
