"""ORPO: Odds Ratio Preference Optimization (reference-free, SFT + odds-ratio term).

``orpo_loss`` is the loss of TRL 1.16's ``experimental.orpo.ORPOTrainer``
(``odds_ratio_loss`` and ``get_batch_loss_metrics``) as a pure, jit-able function.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_real
from jaxopt_llm.losses._common import compute_dtype
from jaxopt_llm.losses._preference_common import (
    as_logps, as_scalar_loss, paired_metrics, safe_mean)

_LOG_HALF = -math.log(2.0)


def log1mexp(x: jax.typing.ArrayLike) -> jax.Array:
  r"""``log(1 - exp(x))`` for ``x <= 0``, accurate everywhere (TRL's ``log1mexp``).

  Branches at ``-log 2`` (Maechler, 2012, "Accurately Computing log(1 - exp(-|a|))"):
  ``log1p(-exp(x))`` below it, ``log(-expm1(x))`` above. At ``x = 0`` (probability 1)
  the exact value is ``-inf``, and its derivative ``-inf``; here ``x`` is clamped to at
  most ``-tiny`` (the smallest normal number of the dtype), so the value is finite
  (about -87 in float32) and the gradient there is 0 instead of NaN. ``x > 0`` (not a
  log-probability) gives NaN, as in TRL.
  """
  x = jnp.asarray(x)
  tiny = jnp.finfo(x.dtype).tiny
  # jnp.where, not minimum/maximum: those split the gradient in half at a tie.
  xs = jnp.where(x <= -tiny, x, -tiny)
  # Each branch on an input that is safe for it, so the unused one cannot leak a NaN
  # into the gradient through jnp.where.
  below = xs < _LOG_HALF
  lo = jnp.where(below, xs, _LOG_HALF)
  hi = jnp.where(below, _LOG_HALF, xs)
  out = jnp.where(below, jnp.log1p(-jnp.exp(lo)), jnp.log(-jnp.expm1(hi)))
  return jnp.where(x > 0, jnp.nan, out)


def orpo_loss(
    policy_chosen_logps: jax.typing.ArrayLike,
    policy_rejected_logps: jax.typing.ArrayLike,
    nll_loss: jax.typing.ArrayLike,
    *,
    beta: float | jax.Array = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without
  Reference Model", eqs. 4 and 7), as TRL 1.16's ``ORPOTrainer``.

  With ``l_c = log pi(y_c)``, ``l_r = log pi(y_r)`` the *length-averaged* completion
  log-probs (TRL's ``get_batch_logps(average_log_prob=True)``; e.g.
  ``sequence_log_probs(logits, labels, shift=True, average=True)``) and ``lme(x) =
  log(1 - exp(x))`` (:func:`log1mexp`)::

    log_odds = (l_c - l_r) - (lme(l_c) - lme(l_r))      # log odds(y_c) / odds(y_r)
    ratio    = log sigma(log_odds)
    loss     = nll_loss - beta * mean_i ratio_i

  ``nll_loss`` is TRL's ``policy_nll_loss``: the mean next-token cross-entropy of the
  *chosen* sequences over prompt **and** completion (every attended position), e.g.
  ``causal_lm_loss(chosen_logits, chosen_input_ids, where=chosen_attention_mask)``. It is
  passed precomputed (a scalar) and enters with weight 1; its gradient is the caller's.

  Gradient: ``d loss / d l_c = -(beta / B) sigma(-log_odds) / (1 - exp(l_c))`` and
  ``d loss / d l_r = +(beta / B) sigma(-log_odds) / (1 - exp(l_r))``.

  Differences from TRL: ``l = 0`` exactly (probability 1, e.g. an empty completion whose
  average TRL would compute as 0/0) gives a finite value and a zero gradient through
  ``lme`` (see :func:`log1mexp`); ``logits/*`` (which need the logits) are not computed.

  Metrics (TRL's names, batch means, ``stop_gradient``): ``rewards/chosen`` /
  ``rewards/rejected`` (``beta * l``), ``rewards/accuracies`` (``beta l_c > beta l_r``;
  ties are wrong), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
  ``nll_loss``, ``log_odds_ratio`` (TRL's name for ``mean(ratio)``) and
  ``log_odds_chosen`` (``mean(log_odds)``).

  Args:
    policy_chosen_logps: ``[B]`` (any shape) length-averaged log-probs, ``<= 0``.
    policy_rejected_logps: as above, the shape of ``policy_chosen_logps``.
    nll_loss: scalar, the chosen sequences' mean cross-entropy (see above).
    beta: ``> 0``, the odds-ratio term's weight (TRL's ``beta``, the paper's lambda).

  Returns:
    ``(loss, metrics)``: a scalar in the compute dtype (float32, float64 for float64
    inputs under x64) and a dict of scalars.
  """
  owner = "orpo_loss"
  check_real(owner, "beta", beta, lo=0.0, lo_open=True)
  dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps, nll_loss)
  pc = as_logps(owner, "policy_chosen_logps", policy_chosen_logps, dtype)
  pr = as_logps(owner, "policy_rejected_logps", policy_rejected_logps, dtype,
                shape=pc.shape, like="policy_chosen_logps")
  nll = as_scalar_loss(owner, "nll_loss", nll_loss, dtype)
  beta = jnp.asarray(beta, dtype)

  log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
  ratio = jax.nn.log_sigmoid(log_odds)
  loss = nll - safe_mean(beta * ratio)
  sg = jax.lax.stop_gradient
  metrics = paired_metrics(beta * pc, beta * pr, pc, pr)
  metrics.update({
      "nll_loss": sg(nll),
      "log_odds_ratio": safe_mean(sg(ratio)),
      "log_odds_chosen": safe_mean(sg(log_odds)),
  })
  return loss, metrics
