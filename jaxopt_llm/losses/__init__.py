"""Losses and metrics for LLM training.

All losses are pure functions of arrays, compute in at least float32 (bf16/fp16 inputs
are upcast; float64 inputs under x64 stay float64), are logsumexp-stable and jit-able;
the softmax losses keep the relative precision of tiny losses (``_common.softmax_nll``).
One concept per module:
``cross_entropy`` (CE, causal-LM CE), ``fused`` (CE through the LM head without the
``[tokens, vocab]`` logits), ``masked_lm`` (BERT masking), ``contrastive`` (InfoNCE, CLIP),
``preference`` (per-token/sequence log-probs, DPO family), ``kto`` / ``orpo`` / ``cpo`` / ``bco``
(TRL's KTO, ORPO, CPO with SimPO/AlphaPO, and BCO trainer losses), ``grpo`` (the GRPO
family's policy losses and group-relative advantages), ``log_probs`` (per-token
log-probs from hidden states without the logits), ``sampling`` (a label per token
from the LM head's softmax without the logits), ``divergence``
(KL, entropy), ``metrics`` (perplexity, accuracies) and ``combine`` (weighted sums). The
token losses share one validation/masking/formula module, ``_common``.

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
from jaxopt_llm.losses.preference import (
    dpo_loss, log_sum_squared_probs, per_token_log_probs, sequence_log_probs)
from jaxopt_llm.losses.kto import kto_loss
from jaxopt_llm.losses.orpo import orpo_loss
from jaxopt_llm.losses.cpo import cpo_loss
from jaxopt_llm.losses.bco import BCOState, bco_init, bco_loss, bco_update
from jaxopt_llm.losses.grpo import grpo_loss, group_advantages
from jaxopt_llm.losses.log_probs import token_log_probs_from_hidden
from jaxopt_llm.losses.sampling import categorical_from_hidden

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
    "per_token_log_probs",
    "sequence_log_probs",
    "log_sum_squared_probs",
    "dpo_loss",
    # kto.py, orpo.py, cpo.py, bco.py
    "kto_loss",
    "orpo_loss",
    "cpo_loss",
    "bco_loss",
    "bco_init",
    "bco_update",
    "BCOState",
    # grpo.py, log_probs.py
    "grpo_loss",
    "group_advantages",
    "token_log_probs_from_hidden",
    # sampling.py
    "categorical_from_hidden",
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
