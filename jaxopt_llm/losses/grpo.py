r"""GRPO-family policy losses and group-relative advantages, at TRL 1.16 parity.

:func:`grpo_loss` is the loss of TRL 1.16's ``GRPOTrainer._compute_loss`` (``trl/trainer/
grpo_trainer.py``) as a pure function of per-token log-probabilities, for every loss type
it has: ``grpo`` (Shao et al., 2024, DeepSeekMath), ``dr_grpo`` (Liu et al., 2025,
"Understanding R1-Zero-Like Training"), ``dapo`` (Yu et al., 2025), ``bnpo``, ``cispo``
(MiniMax-M1, 2025), ``sapo`` (Soft Adaptive Policy Optimization, 2025), ``luspo`` and
``vespo``; with two-sided clipping (``delta``, INTELLECT-2), the k3 KL penalty and its
importance-ratio bias correction (DeepSeek-V3.2), token- or sequence-level importance
sampling (GSPO), off-policy sequence masking (DeepSeek-V3.2), the vLLM
importance-sampling correction, top-entropy token masking ("Beyond the 80/20 rule") and
the entropy bonus. :func:`group_advantages` is the advantage block of TRL 1.16's
``GRPOTrainer._generate_and_score_completions``.

Everything that decides parity was read from TRL 1.16.0's code; where ours differs it is
on purpose and said so: no NaN where TRL would produce one (an empty batch, ``inf * 0`` at
an overflowing importance ratio), and the caller, not a trainer, owns gradient
accumulation and the cross-device counts (see "Several devices" in :func:`grpo_loss`).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_choice, check_int, check_real, is_concrete
from jaxopt_llm.losses._common import as_mask, check_floating, compute_dtype, is_concrete_zero
from jaxopt_llm.losses._preference_common import masked_mean

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# The PPO-style clipped surrogate; these also log the clip_ratio/* metrics.
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# TRL adds this to the reward standard deviation (outside the square root).
ADVANTAGE_EPSILON = 1e-4
# TRL's VESPO clamps (get_gamma_weights).
_VESPO_LOG_RATIO_CLAMP = 20.0
_VESPO_LOG_LOWER = math.log(1e-8)


# ---------------------------------------------------------------------------------------
# input checks


def _floating(owner: str, name: str, x: Any, shape: tuple[int, ...] | None = None,
              *, ndim: int | None = None) -> jax.Array:
  x = jnp.asarray(x)
  check_floating(owner, name, x, min_ndim=0)
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{owner}: `{name}` must have {ndim} dimensions, got shape {x.shape}")
  if shape is not None and x.shape != tuple(shape):
    raise ValueError(f"{owner}: `{name}` must have the shape of per_token_logps "
                     f"{tuple(shape)}, got {x.shape}")
  return x


# ---------------------------------------------------------------------------------------
# formulas


def k3_kl(log_ratio: jax.Array) -> jax.Array:
  r"""The k3 estimator of KL(pi || ref) per token, ``d = log ref - log pi``::

    k3 = exp(d) - d - 1 = expm1(d) - d      (>= 0)

  (Schulman, 2020, "Approximating KL divergence"; TRL's ``per_token_kl``). Near ``d = 0``
  (``|d| < 0.1``) its Taylor series ``d^2/2 (1 + d/3 + d^2/12 + d^3/60 + d^4/360)``
  (truncation below 1e-8 relative): ``exp(d) - d - 1`` in float32 loses the small values
  to cancellation (0.2 relative at ``d = 1e-3``; ``expm1(d) - d`` 2e-4).
  """
  d = log_ratio
  small = jnp.abs(d) < 0.1
  ds = jnp.where(small, d, 0.0)       # the branch not taken sees a safe input
  series = 0.5 * ds * ds * (1.0 + ds * (1.0 / 3.0 + ds * (1.0 / 12.0 + ds * (
      1.0 / 60.0 + ds * (1.0 / 360.0)))))
  dl = jnp.where(small, 1.0, d)
  return jnp.where(small, series, jnp.expm1(dl) - dl)


def weighted_k3_kl(log_ratio: jax.Array, log_weight: jax.Array) -> jax.Array:
  r"""``exp(w) * k3(d)``: the k3 KL times the importance ratio ``exp(w)``, without NaN.

  TRL's ``use_bias_correction_kl`` (default True) multiplies the per-token KL by the
  policy/old ratio ``coef_1 = exp(w)``. Written as that product it is ``inf * 0 = NaN``
  when one factor overflows and the other is 0 (a log-ratio gap of 1e4 with ``ref == pi``
  on that token). Here ``k3 == 0`` gives 0 (gradient 0, its true value); a product that
  overflows is taken in the log domain, ``exp(w + log k3)``; a value beyond the float
  range is +inf with gradient 0 (the loss is then +inf; its true gradient can be finite,
  since ``w + d`` need not depend on ``log pi``, but a step on an infinite loss is
  unusable either way).
  """
  sg = jax.lax.stop_gradient
  log_k3 = _log_k3
  # Which formula each token takes, decided on values (no gradient).
  d0, w0 = sg(log_ratio), sg(log_weight)
  k0 = k3_kl(d0)
  zero = k0 == 0
  use_log = ~zero & ~jnp.isfinite(jnp.exp(w0) * k0)
  over = use_log & ~jnp.isfinite(jnp.exp(w0 + log_k3(jnp.where(use_log, d0, 1.0))))
  use_log = use_log & ~over
  # Each branch sees inputs that are safe for it, so a branch not taken cannot send
  # 0 * inf = NaN back through the gradient.
  plain_in = zero | use_log | over
  plain = (jnp.exp(jnp.where(plain_in, 0.0, log_weight))
           * k3_kl(jnp.where(plain_in, 0.0, log_ratio)))
  logged = jnp.exp(jnp.where(use_log, log_weight, 0.0)
                   + log_k3(jnp.where(use_log, log_ratio, 1.0)))
  return jnp.where(zero, 0.0, jnp.where(over, jnp.inf, jnp.where(use_log, logged, plain)))


@jax.custom_jvp
def _log_k3(d: jax.Array) -> jax.Array:
  """``log k3(d)`` for ``k3(d) > 0``; for large d ``k3 = e^d (1 - (1 + d) e^-d)`` (e^d
  alone would overflow)."""
  big = d > 1.0
  d_big = jnp.where(big, d, 2.0)
  log_big = d_big + jnp.log1p(-(1.0 + d_big) * jnp.exp(-d_big))
  return jnp.where(big, log_big, jnp.log(k3_kl(jnp.where(big, 1.0, d))))


@_log_k3.defjvp
def _log_k3_jvp(primals, tangents):
  # d log k3 / dd = expm1(d) / k3(d), written so that neither factor overflows (autodiff
  # of the value would divide a huge cotangent by k3 first and overflow to inf - inf).
  (d,), (t,) = primals, tangents
  big = d > 1.0
  d_big = jnp.where(big, d, 2.0)
  slope_big = -jnp.expm1(-d_big) / (1.0 - (1.0 + d_big) * jnp.exp(-d_big))
  d_small = jnp.where(big, 1.0, d)
  slope_small = jnp.expm1(d_small) / k3_kl(d_small)
  return _log_k3(d), jnp.where(big, slope_big, slope_small) * t


def _live_exp(log_w: jax.Array, live: jax.Array, value: jax.Array) -> jax.Array:
  """``exp(log_w)`` where ``live`` (differentiable), the constant ``value`` elsewhere.

  The importance ratio enters the loss only where it is not clipped; elsewhere its
  gradient is 0. Feeding ``exp`` a 0 there keeps an overflowing ratio (exp(1e4) = inf)
  from turning that 0 into ``0 * inf = NaN``, which is what PyTorch (and TRL) gives.
  """
  return jnp.where(live, jnp.exp(jnp.where(live, log_w, 0.0)), value)


def _per_sequence(x: jax.Array, num_tokens: int) -> bool:
  # TRL: a [B, 1] quantity is one value per sequence (importance_sampling_level
  # "sequence", vespo's weights); [B, T] is per token. (For T == 1 both are [B, 1]; we
  # then treat it as per token, so a masked-out completion does not count.)
  return x.shape[-1] == 1 and num_tokens != 1


def _global_masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """TRL's ``global_masked_mean``: over counted tokens, or over sequences for [B, 1]."""
  x = jnp.asarray(x, jnp.result_type(x.dtype, jnp.float32))
  if _per_sequence(x, mask.shape[-1]):
    return jnp.sum(x) / max(x.shape[0], 1)
  return masked_mean(jnp.broadcast_to(x, mask.shape), mask)


def _seq_means(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """TRL's ``masked_seq_mean`` per sequence, and which sequences have a value.

  TRL divides by the token count unclamped (NaN for an empty completion) and then takes a
  ``nanmin`` / ``nanmax``; the second output marks the sequences that are not NaN there.
  """
  x = jnp.asarray(x, jnp.result_type(x.dtype, jnp.float32))
  if _per_sequence(x, mask.shape[-1]):
    return x[:, 0], jnp.ones(x.shape[:1], bool)
  x = jnp.broadcast_to(x, mask.shape)
  count = jnp.sum(mask, axis=-1, dtype=x.dtype)
  return jnp.sum(jnp.where(mask, x, 0.0), axis=-1) / jnp.maximum(count, 1.0), count > 0


def _nan_extreme(values: jax.Array, ok: jax.Array, fn) -> jax.Array:
  """``fn`` (jnp.min / jnp.max) over ``values[ok]``; 0.0 when none is ok (TRL: NaN)."""
  fill = jnp.inf if fn is jnp.min else -jnp.inf
  out = fn(jnp.where(ok, values, fill), initial=fill)
  return jnp.where(jnp.any(ok), out, 0.0)


def _vespo_gamma_weights(advantages, log_ratio, mask, importance_sampling_ratio, *,
                         k_pos, lambda_pos, k_neg, lambda_neg):
  """TRL 1.16 ``GRPOTrainer.get_gamma_weights`` (no gradient): phi(w) per sequence.

  ``log phi(w) = lambda + k log w - lambda w`` with ``w`` the sequence importance ratio
  ``exp(sum_t clamp(log r_t, -20, 20))`` (plus the summed clamped log of the vLLM ratio),
  ``log w`` clamped to [log 1e-8, 20]; ``k``, ``lambda`` by the sign of the advantage
  (``lambda >= 1e-4``); non-finite ``phi`` becomes 0.
  """
  clamped = jnp.clip(log_ratio, -_VESPO_LOG_RATIO_CLAMP, _VESPO_LOG_RATIO_CLAMP)
  seq = jnp.sum(jnp.where(mask, clamped, 0.0), axis=-1, keepdims=True)
  if importance_sampling_ratio is not None:
    # As TRL: summed over every position (the sampler's ratio of padding is 1).
    log_is = jnp.clip(jnp.log(importance_sampling_ratio), _VESPO_LOG_LOWER,
                      _VESPO_LOG_RATIO_CLAMP)
    seq = seq + jnp.sum(log_is, axis=-1, keepdims=True)
  log_w = jnp.clip(seq, _VESPO_LOG_LOWER, _VESPO_LOG_RATIO_CLAMP)
  w = jnp.exp(log_w)
  nonneg = advantages >= 0
  k = jnp.where(nonneg, k_pos, k_neg)
  lam = jnp.maximum(jnp.where(nonneg, lambda_pos, lambda_neg), 1e-4)
  phi = jnp.exp(lam + k * log_w - lam * w)
  return jax.lax.stop_gradient(jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


# ---------------------------------------------------------------------------------------
# the loss


def grpo_loss(
    per_token_logps: jax.typing.ArrayLike,
    old_per_token_logps: jax.typing.ArrayLike | None,
    advantages: jax.typing.ArrayLike,
    completion_mask: jax.typing.ArrayLike,
    *,
    ref_per_token_logps: jax.typing.ArrayLike | None = None,
    loss_type: str = "dapo",
    epsilon_low: float | jax.Array = 0.2,
    epsilon_high: float | jax.Array = 0.2,
    beta: float | jax.Array = 0.0,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    use_bias_correction_kl: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: float | jax.Array | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    importance_sampling_ratio: jax.typing.ArrayLike | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_per_token_logps: jax.typing.ArrayLike | None = None,
    entropies: jax.typing.ArrayLike | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float | jax.Array = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""The GRPO family's policy loss, as TRL 1.16's ``GRPOTrainer._compute_loss``.

  Inputs are per completion token (``[B, T]``, ``B`` completions padded to ``T``; the
  mask is the *unshifted* completion mask, ``1`` on the completion's own tokens, as
  TRL's ``completion_mask`` / ``tool_mask`` product): ``log pi`` (``per_token_logps``,
  the only input differentiated), ``log pi_old`` (the sampling policy; ``None`` means
  ``stop_gradient(log pi)``, TRL's on-policy shortcut), the advantages ``A`` (``[B]`` or
  ``[B, T]``; see :func:`group_advantages`). Old / reference / sampling log-probs,
  advantages and the vLLM ratio are constants (``stop_gradient``), as in TRL. Notation::

    r_t = log pi_t - log pi_old,t
    w_t = r_t                                   importance_sampling_level="token"
    w   = sum_t m_t r_t / max(sum_t m_t, 1)     "sequence" (GSPO; one per completion)
    rho = exp(w)                                (TRL's coef_1)

  Per-token losses ``l_t`` by ``loss_type`` (``eps_l``, ``eps_h`` = ``epsilon_low``,
  ``epsilon_high``):

  * ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo`` (PPO's clipped surrogate):
    ``l = -min(rho' A, clip(rho, 1 - eps_l, 1 + eps_h) A)`` with ``rho' = min(rho,
    delta)`` when ``delta`` is set (two-sided clipping) and ``rho' = rho`` otherwise.
  * ``cispo``: ``l = -sg(min(rho, eps_h)) A log pi``; ``eps_h`` caps the ratio itself
    (not ``1 + eps_h``; MiniMax-M1 / ScaleRL use ``epsilon_high = 5``).
  * ``sapo``: ``l = -(4 / tau) sigmoid(tau (rho - 1)) A`` with ``tau =
    sapo_temperature_pos`` where ``A > 0``, ``sapo_temperature_neg`` elsewhere.
  * ``vespo``: ``l = -sg(phi) A log pi``, ``phi`` TRL's gamma weight of the sequence
    ratio (see ``get_gamma_weights``; ``vespo_k_*``, ``vespo_lambda_*``).

  Then, in TRL's order: ``l *= keep`` with the off-policy sequence mask ``keep = (A >= 0)
  | (mean_t m_t (log pi_sampling - log pi) <= off_policy_mask_threshold)`` when the
  threshold is set (``sampling_per_token_logps`` defaults to the old log-probs); ``l *=
  [H_t >= quantile_{1 - top_entropy_quantile}(H)]`` (over the counted tokens) when
  ``top_entropy_quantile < 1``; ``l *= importance_sampling_ratio`` (the vLLM
  correction; not for ``vespo``, which folds it into ``phi``) when given; and with
  ``beta != 0`` the KL penalty, ``l += beta * kl_t``::

    kl_t = exp(d_t) - d_t - 1,  d_t = log ref_t - log pi_t        (k3)
    kl_t = rho * (exp(d_t) - d_t - 1)       use_bias_correction_kl=True (TRL's default)

  The bias correction multiplies by the *differentiable* ratio, so it changes the
  gradient even on-policy, where ``rho == 1``. Aggregation (``m`` the mask, ``n_i`` the
  completion lengths, all floored at 1 as in TRL):

  ==========================  =========================================================
  ``grpo``, ``sapo``          ``mean_i (sum_t m l)_i / max(n_i, 1)``  (per completion)
  ``bnpo``                    ``sum m l / max(sum m, 1)``  (tokens of this batch)
  ``dr_grpo``                 ``sum m l / (B * max_completion_length)``
  ``dapo``, ``cispo``,        ``sum m l / max(num_items_in_batch, 1)`` (tokens of the
  ``vespo``                   *whole* batch; default: ``sum m`` here)
  ``luspo``                   ``mean_i (sum_t m l)_i``  (length-weighted, GSPO-style)
  ==========================  =========================================================

  With ``entropy_coef != 0`` the entropy bonus is subtracted: ``loss -= entropy_coef *
  sum(m' H) / max(sum m', 1)``, ``m'`` the mask times the top-entropy mask (TRL's static
  bonus; for its adaptive schedule pass the current coefficient each step).

  Returns ``(loss, metrics)``, metrics under TRL's names, ``stop_gradient``-ed:
  ``kl`` (with ``beta != 0``; the corrected KL when corrected), ``entropy`` (when
  ``entropies`` is given), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
  ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max`` (the
  clipped types; ``rho'`` below ``1 - eps_l`` with ``A < 0`` / above ``1 + eps_h`` with
  ``A > 0``; means over counted tokens, or over completions at the sequence level;
  min/max over the per-completion means), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``,
  ``policy_loss`` (the loss before the entropy bonus, when there is one).

  Gradient accumulation is the caller's: TRL divides by the number of accumulation steps
  inside the loss; here the loss is that of one batch.

  Several devices: ``grpo``, ``sapo`` and ``luspo`` average per-completion values, so
  the mean of per-device losses (equal per-device batch sizes) is the global loss;
  ``bnpo`` (the local token count) and ``dr_grpo`` (``B``, the local batch size) are
  per-device normalisers in TRL as well. ``dapo``, ``cispo`` and ``vespo`` divide by the
  token count of the *whole* (global, accumulated) batch: under ``jax.jit`` with a
  sharded global batch the default (``sum(completion_mask)``) already is that count;
  inside ``shard_map`` / ``pmap`` pass ``num_items_in_batch = lax.psum(sum(mask))`` and
  ``psum`` the losses / gradients (TRL divides the count by the number of processes
  because DDP then *averages* gradients: the same thing). The top-entropy quantile is
  over all processes' tokens in TRL; here over the tokens given. The metrics are over
  the batch given (TRL's are global).

  Values: PyTorch's semantics everywhere except that nothing is NaN where TRL's code is:
  a masked token (even with inf/NaN inputs there) contributes exactly 0; an empty or
  all-masked batch gives 0 with zero gradient; an importance ratio that overflows (log
  gaps of 1e4) where it is clipped, capped or gated gives its finite value with gradient
  0 (TRL: ``0 * inf = NaN``). The loss is +inf only where its true value is beyond the
  float range: the unclipped ``-rho A`` of a negative-advantage token with ``log rho``
  above ~88 (no ``delta``), or the k3 KL with ``log ref - log pi`` above ~88.

  Args:
    per_token_logps: ``[B, T]`` policy log-probs of the completion tokens (e.g.
      :func:`~jaxopt_llm.losses.token_log_probs_from_hidden`).
    old_per_token_logps: ``[B, T]`` log-probs under the policy that sampled, or ``None``.
    advantages: ``[B]`` (or ``[B, T]``) advantages.
    completion_mask: ``[B, T]`` boolean / 0-1 mask of the tokens that count.
    ref_per_token_logps: ``[B, T]`` reference-model log-probs; needed when ``beta != 0``.
    loss_type: one of ``LOSS_TYPES``.
    epsilon_low, epsilon_high: clip range (``>= 0``); TRL's ``epsilon`` and
      ``epsilon_high`` (which defaults to ``epsilon``). For ``cispo`` ``epsilon_high`` is
      the cap on the ratio.
    beta: KL coefficient (``>= 0``).
    delta: optional upper cap of the unclipped ratio (``> 0``; INTELLECT-2 two-sided
      clipping).
    importance_sampling_level: ``"token"`` or ``"sequence"``.
    use_bias_correction_kl: multiply the KL by the importance ratio (TRL's default True).
    max_completion_length: the ``dr_grpo`` constant (TRL's ``max_completion_length``);
      required for ``dr_grpo``.
    num_items_in_batch: the ``dapo`` / ``cispo`` / ``vespo`` normaliser, the number of
      counted tokens of the whole batch; default ``sum(completion_mask)``.
    sapo_temperature_pos, sapo_temperature_neg: SAPO temperatures (``> 0``).
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO parameters.
    importance_sampling_ratio: optional ``[B, T]`` vLLM importance-sampling ratio.
    off_policy_mask_threshold: optional off-policy sequence-masking threshold.
    sampling_per_token_logps: ``[B, T]`` sampler log-probs for that mask (default: old).
    entropies: optional ``[B, T]`` per-token entropies (for the ``entropy`` metric, the
      top-entropy mask and the entropy bonus; differentiable for the bonus).
    top_entropy_quantile: ``rho`` in [0, 1]; below 1 keeps only the tokens whose
      entropy is in the top ``rho`` quantile (needs ``entropies``).
    entropy_coef: entropy-bonus coefficient (needs ``entropies`` when nonzero).

  Returns:
    ``(loss, metrics)``: a scalar in the compute dtype (float32, float64 under x64 with
    float64 inputs) and a dict of scalars.

  Raises:
    ValueError: naming the argument: an unknown ``loss_type`` or
      ``importance_sampling_level``, out-of-range hyperparameters, wrong dtypes or
      shapes, ``beta != 0`` without ``ref_per_token_logps``, ``dr_grpo`` without
      ``max_completion_length``, entropy options without ``entropies``.
    TypeError: a string (or other non-number) where a number belongs.
  """
  owner = "grpo_loss"
  check_choice(owner, "loss_type", loss_type, LOSS_TYPES)
  check_choice(owner, "importance_sampling_level", importance_sampling_level,
               IMPORTANCE_SAMPLING_LEVELS)
  check_choice(owner, "use_bias_correction_kl", use_bias_correction_kl, (True, False))
  check_real(owner, "epsilon_low", epsilon_low, lo=0.0)
  check_real(owner, "epsilon_high", epsilon_high, lo=0.0)
  check_real(owner, "beta", beta, lo=0.0)
  if delta is not None:
    check_real(owner, "delta", delta, lo=0.0, lo_open=True)
  check_real(owner, "sapo_temperature_pos", sapo_temperature_pos, lo=0.0, lo_open=True)
  check_real(owner, "sapo_temperature_neg", sapo_temperature_neg, lo=0.0, lo_open=True)
  for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                      ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg),
                      ("entropy_coef", entropy_coef)):
    check_real(owner, name, value)
  if off_policy_mask_threshold is not None:
    check_real(owner, "off_policy_mask_threshold", off_policy_mask_threshold)
  check_real(owner, "top_entropy_quantile", top_entropy_quantile, lo=0.0, hi=1.0)
  if num_items_in_batch is not None:
    check_real(owner, "num_items_in_batch", num_items_in_batch, lo=0.0)
  if loss_type == "dr_grpo":
    if max_completion_length is None:
      raise ValueError(f"{owner}: loss_type='dr_grpo' needs `max_completion_length` (its "
                       "normaliser is batch_size * max_completion_length)")
    check_int(owner, "max_completion_length", max_completion_length, lo=1)
  elif max_completion_length is not None:
    check_int(owner, "max_completion_length", max_completion_length, lo=1)

  logp = _floating(owner, "per_token_logps", per_token_logps, ndim=2)
  shape = logp.shape
  b, t = shape
  mask = as_mask(owner, completion_mask, shape, name="completion_mask",
                 shape_text="the shape of per_token_logps")
  old = None if old_per_token_logps is None else _floating(
      owner, "old_per_token_logps", old_per_token_logps, shape)
  adv = _floating(owner, "advantages", advantages)
  if adv.shape not in ((b,), shape):
    raise ValueError(f"{owner}: `advantages` must have shape [B] = ({b},) or [B, T] = "
                     f"{shape}, got {adv.shape}")
  use_kl = not is_concrete_zero(beta)
  if use_kl and ref_per_token_logps is None:
    raise ValueError(f"{owner}: beta != 0 needs `ref_per_token_logps`")
  ref = None if ref_per_token_logps is None else _floating(
      owner, "ref_per_token_logps", ref_per_token_logps, shape)
  isr = None if importance_sampling_ratio is None else _floating(
      owner, "importance_sampling_ratio", importance_sampling_ratio, shape)
  sampling = None if sampling_per_token_logps is None else _floating(
      owner, "sampling_per_token_logps", sampling_per_token_logps, shape)
  ent = None if entropies is None else _floating(owner, "entropies", entropies, shape)
  use_entropy_mask = not (is_concrete(top_entropy_quantile)
                          and float(top_entropy_quantile) == 1.0)
  use_bonus = not is_concrete_zero(entropy_coef)
  if ent is None and use_entropy_mask:
    raise ValueError(f"{owner}: top_entropy_quantile < 1 needs `entropies`")
  if ent is None and use_bonus:
    raise ValueError(f"{owner}: entropy_coef != 0 needs `entropies`")

  dtype = compute_dtype(logp, old, adv, ref, isr, sampling, ent)
  sg = jax.lax.stop_gradient

  def masked(x):
    # Masked positions are 0 *before* any math: inf/NaN there cannot leak into the value
    # or, through 0 * inf, into the gradient.
    return jnp.where(mask, x.astype(dtype), 0.0)

  logp = masked(logp)
  old = sg(logp) if old is None else sg(masked(old))
  adv = sg(adv.astype(dtype))
  if adv.ndim == 1:
    adv = adv[:, None]
  count = jnp.sum(mask, axis=-1, keepdims=True, dtype=dtype)    # n_i, [B, 1]

  log_ratio = logp - old
  if importance_sampling_level == "token":
    log_w = log_ratio
  else:
    log_w = jnp.sum(log_ratio, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
  rho = jnp.exp(sg(log_w))                                      # TRL's coef_1 (value)
  out_shape = jnp.broadcast_shapes(log_w.shape, adv.shape)
  log_w_b = jnp.broadcast_to(log_w, out_shape)
  rho_b = jnp.broadcast_to(rho, out_shape)
  metrics: dict[str, jax.Array] = {}

  if use_kl:
    d = sg(masked(ref)) - logp
    kl = weighted_k3_kl(d, log_w) if use_bias_correction_kl else k3_kl(d)
    kl = jnp.where(mask, kl, 0.0)

  eps_l = jnp.asarray(epsilon_low, dtype)
  eps_h = jnp.asarray(epsilon_high, dtype)
  if loss_type in CLIPPED_LOSS_TYPES:
    rho_capped = rho_b if delta is None else jnp.minimum(rho_b, jnp.asarray(delta, dtype))
    clipped = jnp.clip(rho_b, 1.0 - eps_l, 1.0 + eps_h)
    # min(rho' A, clip(rho) A) is rho' A or clip(rho) A by the sign of A; the ratio is
    # differentiable only where the chosen factor is rho itself (not clipped, not capped).
    take_first = jnp.where(adv > 0, rho_capped <= clipped, rho_capped >= clipped)
    factor = jnp.where(take_first, rho_capped, clipped)
    live = (factor == rho_b) & (adv != 0)
    ratio = _live_exp(log_w_b, live, factor)
    per_token = jnp.where(adv == 0, 0.0, -adv * ratio)
    low = (rho_capped < 1.0 - eps_l) & (adv < 0)
    high = (rho_capped > 1.0 + eps_h) & (adv > 0)
    for name, flag in (("low", low), ("high", high), ("region", low | high)):
      metrics[f"clip_ratio/{name}_mean"] = _global_masked_mean(flag, mask)
    lows, ok = _seq_means(low, mask)
    metrics["clip_ratio/low_min"] = _nan_extreme(lows, ok, jnp.min)
    highs, ok = _seq_means(high, mask)
    metrics["clip_ratio/high_max"] = _nan_extreme(highs, ok, jnp.max)
  elif loss_type == "cispo":
    per_token = -jnp.minimum(rho_b, eps_h) * adv * logp
    metrics["cispo_clip_ratio"] = _global_masked_mean((rho_b > eps_h) & (adv > 0), mask)
  elif loss_type == "sapo":
    tau = jnp.where(adv > 0, jnp.asarray(sapo_temperature_pos, dtype),
                    jnp.asarray(sapo_temperature_neg, dtype))
    # sigmoid(tau (rho - 1)) is 1 with gradient 0 once rho overflows.
    ratio = _live_exp(log_w_b, jnp.isfinite(rho_b), rho_b)
    per_token = -(jax.nn.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau) * adv
  else:  # vespo
    phi = _vespo_gamma_weights(
        adv, sg(log_ratio), mask, None if isr is None else sg(isr.astype(dtype)),
        k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg,
        lambda_neg=vespo_lambda_neg)
    per_token = -phi * adv * logp
    metrics["vespo/phi_seq_mean"] = _global_masked_mean(phi, mask)

  if off_policy_mask_threshold is not None:
    sampled = old if sampling is None else sg(masked(sampling))
    kl_div = jnp.nan_to_num(sampled - sg(logp), nan=0.0)
    avg_kl = jnp.sum(jnp.where(mask, kl_div, 0.0), axis=-1, keepdims=True) / jnp.maximum(
        count, 1.0)
    keep = (adv >= 0) | (avg_kl <= off_policy_mask_threshold)
    per_token = jnp.where(keep, per_token, 0.0)
  effective = mask
  if use_entropy_mask:
    ent_sg = sg(ent.astype(dtype))
    q = 1.0 - jnp.asarray(top_entropy_quantile, dtype)
    threshold = jnp.nanquantile(jnp.where(mask, ent_sg, jnp.nan), q)
    high_entropy = (jnp.where(mask, ent_sg, 0.0) >= threshold) & mask
    per_token = jnp.where(high_entropy, per_token, 0.0)
    effective = high_entropy
  if isr is not None and loss_type != "vespo":
    per_token = per_token * sg(masked(isr))
  if use_kl:
    per_token = per_token + jnp.asarray(beta, dtype) * kl

  per_token = jnp.where(mask, jnp.broadcast_to(per_token, shape), 0.0)
  per_seq = jnp.sum(per_token, axis=-1)
  batch = max(b, 1)   # an empty batch: the sums are 0, so 0 / 1
  if loss_type in ("grpo", "sapo"):
    loss = jnp.sum(per_seq / jnp.maximum(count[:, 0], 1.0)) / batch
  elif loss_type == "bnpo":
    loss = jnp.sum(per_seq) / jnp.maximum(jnp.sum(count), 1.0)
  elif loss_type == "dr_grpo":
    loss = jnp.sum(per_seq) / (batch * max_completion_length)
  elif loss_type == "luspo":
    loss = jnp.sum(per_seq) / batch
  else:  # dapo, cispo, vespo
    items = jnp.sum(count) if num_items_in_batch is None else jnp.asarray(
        num_items_in_batch, dtype)
    loss = jnp.sum(per_seq) / jnp.maximum(items, 1.0)

  if use_bonus:
    metrics["policy_loss"] = loss
    bonus = jnp.sum(jnp.where(effective, ent.astype(dtype), 0.0)) / jnp.maximum(
        jnp.sum(effective, dtype=dtype), 1.0)
    loss = loss - jnp.asarray(entropy_coef, dtype) * bonus
  if use_kl:
    metrics["kl"] = _global_masked_mean(kl, mask)
  if ent is not None:
    metrics["entropy"] = _global_masked_mean(jnp.where(mask, ent.astype(dtype), 0.0), mask)
  return loss, jax.tree.map(sg, metrics)


# ---------------------------------------------------------------------------------------
# advantages


def _nanmean(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  return jnp.nanmean(x, axis=axis, keepdims=keepdims)


def nanstd(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
  """TRL's ``nanstd``: the sample (Bessel-corrected) std ignoring NaN; NaN for < 2 values."""
  mean = jnp.nanmean(x, axis=axis, keepdims=True)
  var = jnp.nanmean(jnp.square(x - mean), axis=axis, keepdims=keepdims)
  n = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=keepdims).astype(x.dtype)
  var = jnp.where(n > 1, var * n / jnp.maximum(n - 1, 1.0), jnp.nan)
  return jnp.sqrt(var)


def group_advantages(
    rewards: jax.typing.ArrayLike,
    group_size: int,
    *,
    scale_rewards: str | bool = "group",
    reward_weights: jax.typing.ArrayLike | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Group-relative advantages, as TRL 1.16's ``GRPOTrainer`` computes them.

  ``rewards`` holds ``N = G * group_size`` completions, the ``group_size`` completions of
  each prompt next to each other (TRL's ``num_generations``), ``[N]`` or ``[N, K]`` for
  ``K`` reward functions (weighted by ``reward_weights``, default 1). A NaN reward marks
  a completion a reward function could not score; one that no function scored is left
  out of the statistics and gets advantage 0 (TRL's "unscorable" rows). With
  ``multi_objective_aggregation="sum_then_normalize"`` (TRL's default) and ``r_i =
  nansum_k w_k r_ik``::

    A_i = r_i - mean_group(r)                                  scale_rewards="none"
    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)        "group" (default; True)
    A_i = (r_i - mean_group(r)) / (std_batch(r) + 1e-4)        "batch"

  the std the *sample* std (Bessel's correction, TRL's ``nanstd``), the ``1e-4`` added
  to it (not under the root); a group of one completion has std 0 (A = 0). With
  ``"normalize_then_sum"`` (GDPO) each reward function is first normalised within the
  groups, ``(r_ik - mean_group) / (std_group + 1e-4)``, the weighted sum then by the
  batch mean and std; ``scale_rewards`` is not used there, as in TRL. Any NaN left (a
  group with a single scorable completion) becomes 0.

  Whole-batch quantities: every group must be complete in ``rewards`` and ``"batch"``
  (and ``normalize_then_sum``) scale by the std of all of ``rewards``. TRL gathers the
  rewards of all processes before this step; do the same (e.g. compute on the global
  batch, or ``all_gather`` first), then slice each device's part.

  Returns ``(advantages [N], metrics)`` with TRL's names: ``reward`` (mean of the
  weighted rewards), ``reward_std`` (their sample std) and ``frac_reward_zero_std`` (the
  fraction of completions whose std above is ``<= 1e-8``, ``torch.isclose(std, 0)``).
  Where TRL's metric would be NaN (no scorable completion, fewer than two) it is 0.

  Raises:
    ValueError: naming the argument, for a bad ``group_size`` (``N`` not a multiple),
      ``scale_rewards``, ``multi_objective_aggregation``, or shapes/dtypes.
  """
  owner = "group_advantages"
  check_int(owner, "group_size", group_size, lo=1)
  if scale_rewards is True or scale_rewards is False:
    scale_rewards = "group" if scale_rewards else "none"   # TRL's GRPOConfig mapping
  check_choice(owner, "scale_rewards", scale_rewards, SCALE_REWARDS)
  check_choice(owner, "multi_objective_aggregation", multi_objective_aggregation,
               MULTI_OBJECTIVE_AGGREGATIONS)
  rewards = jnp.asarray(rewards)
  if not (jnp.issubdtype(rewards.dtype, jnp.floating)
          or jnp.issubdtype(rewards.dtype, jnp.integer) or rewards.dtype == jnp.bool_):
    raise ValueError(f"{owner}: `rewards` must be a real array, got dtype {rewards.dtype}")
  if rewards.ndim not in (1, 2):
    raise ValueError(f"{owner}: `rewards` must have shape [N] or [N, K], got "
                     f"{rewards.shape}")
  n = rewards.shape[0]
  if n % group_size:
    raise ValueError(f"{owner}: the number of rewards ({n}) must be a multiple of "
                     f"`group_size` ({group_size})")
  dtype = compute_dtype(rewards)
  per_func = rewards.astype(dtype).reshape(n, -1)
  k = per_func.shape[1]
  if reward_weights is None:
    weights = jnp.ones((k,), dtype)
  else:
    weights = jnp.asarray(reward_weights)
    if weights.shape != (k,):
      raise ValueError(f"{owner}: `reward_weights` must have shape [K] = ({k},), got "
                       f"{weights.shape}")
    weights = weights.astype(dtype)
  unscorable = jnp.all(jnp.isnan(per_func), axis=1)
  weighted = jnp.where(unscorable, jnp.nan, jnp.nansum(per_func * weights, axis=1))
  if n == 0:
    zero = jnp.zeros((), dtype)
    return jnp.zeros((0,), dtype), {"reward": zero, "reward_std": zero,
                                    "frac_reward_zero_std": zero}
  g = group_size

  if multi_objective_aggregation == "sum_then_normalize":
    grouped = weighted.reshape(-1, g)
    mean = jnp.repeat(_nanmean(grouped, axis=1), g)
    if scale_rewards == "batch":
      std = (jnp.broadcast_to(nanstd(weighted), (n,)) if n > 1 else jnp.zeros((n,), dtype))
    else:  # "group" (and "none", where the std only feeds the zero-std metric)
      std = jnp.repeat(nanstd(grouped, axis=1), g) if g > 1 else jnp.zeros((n,), dtype)
    adv = weighted - mean
    if scale_rewards != "none":
      adv = adv / (std + ADVANTAGE_EPSILON)
  else:  # normalize_then_sum
    grouped = per_func.reshape(-1, g, k)
    mean_k = _nanmean(grouped, axis=1, keepdims=True)
    std_k = (nanstd(grouped, axis=1, keepdims=True) if g > 1 else jnp.zeros_like(mean_k))
    normed = ((grouped - mean_k) / (std_k + ADVANTAGE_EPSILON)).reshape(n, k)
    summed = jnp.where(unscorable, jnp.nan, jnp.nansum(normed * weights, axis=1))
    std = jnp.broadcast_to(nanstd(summed), (n,)) if n > 1 else jnp.zeros((n,), dtype)
    adv = (summed - _nanmean(summed)) / (std + ADVANTAGE_EPSILON)
  adv = jnp.nan_to_num(adv, nan=0.0)

  def finite_or_zero(x):
    return jnp.where(jnp.isnan(x), 0.0, x)

  metrics = {
      "reward": finite_or_zero(_nanmean(weighted)),
      "reward_std": finite_or_zero(nanstd(weighted)),
      "frac_reward_zero_std": jnp.mean((jnp.abs(std) <= 1e-8).astype(dtype)),
  }
  return adv, metrics
