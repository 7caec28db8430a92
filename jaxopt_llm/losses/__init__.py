"""Losses and metrics for LLM training.

All losses are pure functions of arrays, compute in float32 whatever the input dtype,
are logsumexp-stable and jit-able.
"""
from jaxopt_llm.losses.cross_entropy import causal_lm_loss, cross_entropy
from jaxopt_llm.losses.divergence import entropy, kl_divergence
from jaxopt_llm.losses.metrics import (
    length_normalized_score, perplexity, token_accuracy, top_k_accuracy)

__all__ = [
    # cross_entropy.py
    "cross_entropy",
    "causal_lm_loss",
    # divergence.py
    "kl_divergence",
    "entropy",
    # metrics.py
    "perplexity",
    "token_accuracy",
    "top_k_accuracy",
    "length_normalized_score",
]
