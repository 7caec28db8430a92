"""Losses and metrics for LLM training.

All losses are pure functions of arrays, compute in at least float32 (bf16/fp16 inputs
are upcast), are logsumexp-stable and jit-able. One concept per module:
``cross_entropy`` (CE, causal-LM CE), ``fused`` (CE through the LM head without the
``[tokens, vocab]`` logits), ``masked_lm`` (BERT masking), ``contrastive`` (InfoNCE, CLIP),
``preference`` (sequence log-probs, DPO family), ``divergence`` (KL, entropy),
``metrics`` (perplexity, accuracies) and ``combine`` (weighted sums). The token losses
share one validation/masking/formula module, ``_common``.

Names shared with ``optax.losses`` mean the same thing there; where ours differ they are
named apart (``kl_divergence_from_logits``, ``pairwise_cosine_similarity``).
"""
from jaxopt_llm.losses.cross_entropy import causal_lm_loss, cross_entropy
from jaxopt_llm.losses.divergence import entropy, kl_divergence_from_logits
from jaxopt_llm.losses.fused import fused_linear_cross_entropy
from jaxopt_llm.losses.metrics import (
    length_normalized_score, perplexity, token_accuracy, top_k_accuracy)
from jaxopt_llm.losses.combine import combine_losses
from jaxopt_llm.losses.contrastive import (
    clip_loss, in_batch_info_nce, info_nce, l2_normalize, pairwise_cosine_similarity)
from jaxopt_llm.losses.masked_lm import mask_tokens, masked_lm_loss
from jaxopt_llm.losses.preference import dpo_loss, sequence_log_probs

__all__ = [
    # cross_entropy.py
    "cross_entropy",
    "causal_lm_loss",
    # fused.py
    "fused_linear_cross_entropy",
    # divergence.py
    "kl_divergence_from_logits",
    "entropy",
    # metrics.py
    "perplexity",
    "token_accuracy",
    "top_k_accuracy",
    "length_normalized_score",
    # preference.py
    "sequence_log_probs",
    "dpo_loss",
    # contrastive.py
    "info_nce",
    "in_batch_info_nce",
    "clip_loss",
    "pairwise_cosine_similarity",
    "l2_normalize",
    # masked_lm.py
    "mask_tokens",
    "masked_lm_loss",
    # combine.py
    "combine_losses",
]
