"""Losses and metrics for LLM training.

All losses are pure functions of arrays, compute in float32 whatever the input dtype,
are logsumexp-stable and jit-able.
"""
from jaxopt_llm.losses.cross_entropy import causal_lm_loss, cross_entropy
from jaxopt_llm.losses.divergence import entropy, kl_divergence
from jaxopt_llm.losses.fused import fused_linear_cross_entropy
from jaxopt_llm.losses.metrics import (
    length_normalized_score, perplexity, token_accuracy, top_k_accuracy)
from jaxopt_llm.losses.combine import combine_losses
from jaxopt_llm.losses.contrastive import (
    clip_loss, cosine_similarity, in_batch_info_nce, info_nce, l2_normalize)
from jaxopt_llm.losses.masked_lm import mask_tokens, masked_lm_loss
from jaxopt_llm.losses.preference import dpo_loss, sequence_log_probs

__all__ = [
    # cross_entropy.py
    "cross_entropy",
    "causal_lm_loss",
    # fused.py
    "fused_linear_cross_entropy",
    # divergence.py
    "kl_divergence",
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
    "cosine_similarity",
    "l2_normalize",
    # masked_lm.py
    "mask_tokens",
    "masked_lm_loss",
    # combine.py
    "combine_losses",
]
