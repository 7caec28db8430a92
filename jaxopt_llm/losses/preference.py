"""Preference-optimisation losses: per-token and sequence log-probabilities, the DPO family.

``per_token_log_probs`` / ``sequence_log_probs`` turn a model's logits into the log-likelihoods
the losses consume (with ``cross_entropy``'s masking); ``dpo_loss`` is TRL's ``DPOTrainer``
loss as a pure, jit-able function: by default TRL 1.16's ``DPOTrainer._compute_loss`` (every
loss type, the weighted multi-loss combination, the f-divergence regularisers, LD-DPO, WPO),
and with ``semantics="trl0"`` TRL 0.19's ``DPOTrainer.dpo_loss``. Every log-sigmoid is
``jax.nn.log_sigmoid`` (a softplus), every exponential is taken of a bounded exponent, so the
losses and their gradients stay finite for log-ratio gaps of +-1e4.

The smaller pieces are public so other losses can share them: :func:`smoothed_sigmoid_loss`
(the cDPO form), :func:`f_divergence_scores`, :func:`ld_weighted_log_probs`,
:func:`wpo_weights`, :func:`log_sum_squared_probs`. The reward metrics are
``_preference_common.paired_metrics`` and TRL 0.19's ``bco_pair`` running mean is BCO's
``RunningMoments`` state, :class:`~jaxopt_llm.losses.bco.BCOState`.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_choice, check_real, is_concrete
from jaxopt_llm.losses._common import (
    REDUCTIONS, as_mask, check_floating, compute_dtype, sequence_targets, token_log_probs,
    validated_targets)
from jaxopt_llm.losses._preference_common import paired_metrics, safe_mean
from jaxopt_llm.losses.bco import BCOState, bco_update

# TRL 1.16 DPOTrainer._compute_loss's loss types, in its order.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")
# TRL 0.19 DPOTrainer.dpo_loss's loss types (semantics="trl0"); "aot_pair" is 1.16's
# "aot_unpaired".
TRL0_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero",
                   "apo_down", "sppo_hard", "bco_pair", "aot", "aot_pair", "discopop")
SEMANTICS = ("trl1", "trl0")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16 rejects a non-default f-divergence for every other loss type (the f-DPO
# reparameterisation's beta log Z(x) term only cancels in the chosen - rejected difference).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                           "discopop", "sft")
# Types whose formula has a label-smoothing term; a nonzero label_smoothing with none of
# them is an error rather than silently ignored.
SMOOTHED_LOSS_TYPES = {"trl1": ("robust", "exo_pair", "aot", "aot_unpaired"),
                       "trl0": ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")}
# Types that need the per-token log-probs and masks (not only sequence log-probs).
_PER_TOKEN_TYPES = ("sft",)
# Types that normalise by the completion length (TRL 1.16).
_LENGTH_TYPES = ("ipo", "sigmoid_norm")
# TRL 0.19's exo_pair replaces label_smoothing == 0 (where log(eps) would be -inf) by this.
EXO_DEFAULT_EPSILON = 1e-3
# The largest exponent of TRL 1.16's alpha-divergence scores in float32 (``clamp(max=80)``);
# forward_kl (alpha = 0 of the same family) is clamped at the same place here.
EXP_CLAMP = 80.0


# ---------------------------------------------------------------------------------------
# Log-probabilities from logits.


def per_token_log_probs(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    where: jax.typing.ArrayLike | None = None,
    validate: bool = False,
) -> tuple[jax.Array, jax.Array]:
  r"""Log-probability of each label token and the mask of the tokens that count.

  ``logits`` is ``[..., T, V]`` and ``labels`` ``[..., T]``; a token counts when ``label !=
  ignore_index`` and ``where`` is True there (exactly as in
  :func:`~jaxopt_llm.losses.cross_entropy`; for DPO set the prompt and padding labels to
  ``ignore_index``, or pass the completion mask as ``where``). Per token ``log p(y_t) =
  z_{y_t} - logsumexp(z)`` in float32, and 0.0 (with zero gradient) where it does not count,
  like the ``log_probs`` of TRL 1.16's fused LM head.

  ``shift=True`` is for causal LMs whose ``logits[..., t, :]`` predict token ``t + 1``: it
  scores ``labels[..., 1:]`` with ``logits[..., :-1, :]`` (and shifts ``where`` the same
  way), so both outputs are ``[..., T - 1]`` and the mask is TRL's
  ``completion_mask[..., 1:]``.

  Out-of-range labels are handled as in ``cross_entropy``: ValueError when eager, NaN (or a
  checkify error with ``validate=True``) under ``jit``.

  Returns:
    ``(log_probs, mask)``: float32 and bool arrays of the (shifted) labels' shape.
  """
  owner = "per_token_log_probs"
  check_choice(owner, "shift", shift, (True, False))
  logits, labels, where = sequence_targets(owner, logits, labels, where,
                                           labels_name="labels", shift=shift)
  t = validated_targets(owner, logits, labels, ignore_index=ignore_index, where=where,
                        validate=validate)
  log_p, _ = token_log_probs(t)
  return log_p, t.valid


def sequence_log_probs(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    ignore_index: int = -100,
    average: bool = False,
    shift: bool = False,
    where: jax.typing.ArrayLike | None = None,
    validate: bool = False,
) -> jax.Array:
  r"""Log-probability of each sequence: ``sum_t log p(y_t)`` over its counted tokens.

  The per-token values and mask of :func:`per_token_log_probs` (same arguments), then::

    out = sum_t log p(y_t)                        (average=False; TRL's DPO)
    out = sum_t log p(y_t) / max(n_counted, 1)    (average=True; TRL's CPO/SimPO, 0.x IPO)

  A sequence with no counted token gives 0.0 (with zero gradient), never NaN.

  Args:
    logits: ``[..., T, V]`` scores, any floating dtype.
    labels: ``[..., T]`` integer tokens.
    ignore_index: label value that does not count.
    average: divide by the number of counted tokens (length-normalised).
    shift: score ``labels[..., 1:]`` with ``logits[..., :-1, :]``.
    where: optional boolean ``[..., T]`` mask (e.g. an attention/completion mask).
    validate: emit a checkify check for out-of-range labels when traced.

  Returns:
    float32 array of shape ``logits.shape[:-2]`` (``[B]`` for ``[B, T, V]`` logits).
  """
  check_choice("sequence_log_probs", "average", average, (True, False))
  log_p, valid = per_token_log_probs(logits, labels, ignore_index=ignore_index, shift=shift,
                                     where=where, validate=validate)
  total = jnp.sum(log_p, axis=-1)
  if not average:
    return total
  # Per sequence, the same safe mean as cross_entropy's reduction="mean".
  return total / jnp.maximum(jnp.sum(valid, axis=-1, dtype=total.dtype), 1.0)


def log_sum_squared_probs(logits: jax.typing.ArrayLike) -> jax.Array:
  r"""``log sum_v p_v**2`` of each next-token distribution (``[..., V]`` -> ``[...]``).

  ``= logsumexp(2 z) - 2 logsumexp(z)``, in at least float32: the ``log_sum_sq_probs`` of
  TRL 1.16's fused LM head, which WPO (``dpo_loss(use_weighting=True)``) needs per token.
  For a causal LM pass ``logits[..., :-1, :]`` so it lines up with
  ``per_token_log_probs(..., shift=True)``.
  """
  z = jnp.asarray(logits)
  if not jnp.issubdtype(z.dtype, jnp.floating) or z.ndim < 1:
    raise ValueError(f"log_sum_squared_probs: `logits` must be a floating array with a "
                     f"vocabulary axis, got dtype {z.dtype} shape {z.shape}")
  z = z.astype(compute_dtype(z))
  return jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * jax.nn.logsumexp(z, axis=-1)


# ---------------------------------------------------------------------------------------
# Shared pieces of the preference losses.


def smoothed_sigmoid_loss(z: jax.Array, label_smoothing: float) -> jax.Array:
  """``-(1 - eps) log sigma(z) - eps log sigma(-z)`` (cDPO); the eps term is left out at 0.

  The form TRL uses for 0.x ``sigmoid``, ``aot``/``aot_unpaired`` and CPO's ``sigmoid`` /
  ``simpo``; finite for any finite ``z``.
  """
  loss = -jax.nn.log_sigmoid(z)
  if not (is_concrete(label_smoothing) and float(label_smoothing) == 0.0):
    loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-z)
  return loss


def _exp_family_power(owner: str, f_divergence_type: str, alpha: Any) -> float | None:
  """``alpha - 1`` when the scores are ``expm1((alpha - 1) log u) / (alpha - 1)``, else None."""
  check_choice(owner, "f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
  if f_divergence_type == "forward_kl":
    return -1.0
  if f_divergence_type != "alpha_divergence":
    return None
  if not is_concrete(alpha):
    raise ValueError(f"{owner}: `alpha` must be a Python float (it selects the formula at "
                     f"trace time), got a traced value")
  check_real(owner, "alpha", alpha)
  alpha = float(alpha)
  return None if abs(alpha - 1.0) < 1e-6 else alpha - 1.0  # alpha -> 1: log u


def f_divergence_scores(log_ratio: jax.Array, f_divergence_type: str = "reverse_kl",
                        alpha: float = 0.5) -> jax.Array:
  r"""f-DPO's score ``f'(u)`` of a log-ratio ``log u = log pi - log ref`` (TRL 1.16).

  ::

    reverse_kl        log u                          (standard DPO)
    forward_kl        1 - u**-1  = -expm1(-log u)
    js_divergence     log(2 u / (1 + u)) = log 2 + log sigma(log u)
    alpha_divergence  (u**(alpha - 1) - 1) / (alpha - 1)   (reverse_kl when |alpha - 1| < 1e-6)

  TRL 1.16 clamps the alpha-divergence exponent ``(alpha - 1) log u`` at 80 in float32;
  forward_kl is the same family at ``alpha = 0``, and its exponent ``-log u`` is clamped at the
  same 80 here (TRL leaves it unclamped, so it overflows to inf beyond ``-log u ~ 88``; below 80
  the two agree). ``expm1`` replaces TRL's ``exp(.) - 1`` (more accurate near 0).
  """
  power = _exp_family_power("f_divergence_scores", f_divergence_type, alpha)
  if power is not None:
    return jnp.expm1(jnp.minimum(power * log_ratio, EXP_CLAMP)) * (1.0 / power)
  if f_divergence_type == "js_divergence":
    return math.log(2.0) + jax.nn.log_sigmoid(log_ratio)
  return log_ratio


def _scores_and_delta(owner, chosen_log_ratio, rejected_log_ratio, f_divergence_type, alpha):
  """``(s_c, s_r, s_c - s_r)``; for the exponential scores the difference is taken before
  the ``1 / (alpha - 1)`` scale, so two scores clamped alike differ by exactly 0 (TRL's
  eager value) rather than by an FMA-contracted rounding error of ~1e26 under jit."""
  power = _exp_family_power(owner, f_divergence_type, alpha)
  if power is None:
    s_c = f_divergence_scores(chosen_log_ratio, f_divergence_type, alpha)
    s_r = f_divergence_scores(rejected_log_ratio, f_divergence_type, alpha)
    return s_c, s_r, s_c - s_r
  e_c = jnp.expm1(jnp.minimum(power * chosen_log_ratio, EXP_CLAMP))
  e_r = jnp.expm1(jnp.minimum(power * rejected_log_ratio, EXP_CLAMP))
  return e_c * (1.0 / power), e_r * (1.0 / power), (e_c - e_r) * (1.0 / power)


def ld_weighted_log_probs(per_token_chosen: jax.Array, per_token_rejected: jax.Array,
                          chosen_mask: jax.Array, rejected_mask: jax.Array,
                          ld_alpha: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""LD-DPO's sequence log-probs (Liu et al., 2024, "Length Desensitization in DPO"; TRL 1.16).

  Per pair, ``l_s = min(len_c, len_r)`` (counted tokens); in each sequence the first ``l_s``
  counted tokens weigh 1 and the later ("verbose") ones ``ld_alpha``::

    logps = sum_{t: 1 <= pos_t <= l_s} log p_t + ld_alpha * sum_{t: pos_t > l_s} log p_t

  with ``pos_t = cumsum(mask)_t``, exactly TRL's ``shared_mask`` / ``tail_mask``. Masks are
  ``[..., T]`` (chosen and rejected may differ in ``T``); per-token values outside the mask
  do not count.
  """
  def positions(mask):
    return jnp.cumsum(mask.astype(jnp.int32), axis=-1)

  len_c = jnp.sum(chosen_mask, axis=-1, dtype=jnp.int32)
  len_r = jnp.sum(rejected_mask, axis=-1, dtype=jnp.int32)
  shared = jnp.minimum(len_c, len_r)[..., None]

  def reduce(lp, mask):
    lp = jnp.where(mask, lp, 0.0)
    pos = positions(mask)
    head = jnp.sum(jnp.where(mask & (pos <= shared), lp, 0.0), axis=-1)
    tail = jnp.sum(jnp.where(mask & (pos > shared), lp, 0.0), axis=-1)
    return head + ld_alpha * tail

  return reduce(per_token_chosen, chosen_mask), reduce(per_token_rejected, rejected_mask)


def wpo_weights(per_token_chosen: jax.Array, per_token_rejected: jax.Array,
                chosen_log_sum_sq_probs: jax.Array, rejected_log_sum_sq_probs: jax.Array,
                chosen_mask: jax.Array, rejected_mask: jax.Array,
                ) -> tuple[jax.Array, jax.Array]:
  r"""WPO's pair weights (Zhou et al., 2024, "WPO", eq. 2; TRL 1.16 ``use_weighting``).

  Per sequence ``w = exp(mean_t(log p_t - log sum_v p_{t,v}**2))`` over its counted tokens
  (the mean divides by ``max(n, 1)``), under ``stop_gradient``; the pair weight is
  ``w_c * w_r``. Returns ``(w_c, w_r)``.
  """
  def weight(lp, lssp, mask):
    aligned = jnp.where(mask, lp - lssp, 0.0)
    n = jnp.maximum(jnp.sum(mask, axis=-1, dtype=aligned.dtype), 1.0)
    return jnp.exp(jnp.sum(aligned, axis=-1) / n)

  return jax.lax.stop_gradient((
      weight(per_token_chosen, chosen_log_sum_sq_probs, chosen_mask),
      weight(per_token_rejected, rejected_log_sum_sq_probs, rejected_mask)))


# ---------------------------------------------------------------------------------------
# dpo_loss


def _as_float(owner: str, name: str, x: Any) -> jax.Array:
  x = jnp.asarray(x)
  check_floating(owner, name, x, min_ndim=0)
  return x


def _check_shape(owner: str, name: str, x: jax.Array, shapes: Sequence[tuple[int, ...]],
                 what: str) -> None:
  if x.shape not in [tuple(s) for s in shapes]:
    raise ValueError(f"{owner}: `{name}` must have {what}, got {x.shape}")


class _Batch(NamedTuple):
  """The inputs of dpo_loss reduced to what the loss types read."""
  chosen: jax.Array           # policy sequence log-probs [B...] (LD-weighted with ld_alpha)
  rejected: jax.Array
  ref_chosen: jax.Array
  ref_rejected: jax.Array
  tokens: tuple | None        # (lp_c, lp_r, mask_c, mask_r) per token, or None
  chosen_ratio: jax.Array     # log pi - log ref of the chosen completions [B...]
  rejected_ratio: jax.Array


def _prepare(owner, pc, pr, rc, rr, chosen_mask, rejected_mask, ld_alpha, no_reference):
  pc = _as_float(owner, "policy_chosen_logps", pc)
  pr = _as_float(owner, "policy_rejected_logps", pr)
  refs = {}
  for name, value in (("reference_chosen_logps", rc), ("reference_rejected_logps", rr)):
    refs[name] = None if no_reference else _as_float(owner, name, value)
  dt = compute_dtype(pc, pr, *refs.values())
  pc, pr = pc.astype(dt), pr.astype(dt)
  refs = {k: None if v is None else v.astype(dt) for k, v in refs.items()}

  if (chosen_mask is None) != (rejected_mask is None):
    missing = "rejected_mask" if rejected_mask is None else "chosen_mask"
    raise ValueError(f"{owner}: pass both `chosen_mask` and `rejected_mask` (per-token "
                     f"log-probs) or neither (sequence log-probs); `{missing}` is missing")
  if chosen_mask is None:
    _check_shape(owner, "policy_rejected_logps", pr, [pc.shape],
                 f"the shape of policy_chosen_logps {pc.shape}")
    for name, value in refs.items():
      if value is not None:
        _check_shape(owner, name, value, [pc.shape],
                     f"the shape of policy_chosen_logps {pc.shape}")
    zero = jnp.zeros_like(pc)
    ref_c = zero if refs["reference_chosen_logps"] is None else refs["reference_chosen_logps"]
    ref_r = (zero if refs["reference_rejected_logps"] is None
             else refs["reference_rejected_logps"])
    return _Batch(pc, pr, ref_c, ref_r, None, pc - ref_c, pr - ref_r)

  mask_c = as_mask(owner, chosen_mask, name="chosen_mask", min_ndim=1)
  mask_r = as_mask(owner, rejected_mask, name="rejected_mask", min_ndim=1)
  _check_shape(owner, "policy_chosen_logps", pc, [mask_c.shape],
               f"the shape of chosen_mask {mask_c.shape} (per-token log-probs)")
  _check_shape(owner, "policy_rejected_logps", pr, [mask_r.shape],
               f"the shape of rejected_mask {mask_r.shape} (per-token log-probs)")
  if mask_c.shape[:-1] != mask_r.shape[:-1]:
    raise ValueError(f"{owner}: `chosen_mask` and `rejected_mask` must have the same batch "
                     f"shape, got {mask_c.shape} and {mask_r.shape}")
  # Values outside the mask never count (they may be anything, even -inf).
  lp_c = jnp.where(mask_c, pc, 0.0)
  lp_r = jnp.where(mask_r, pr, 0.0)

  def reduce_pair(a, b):
    if ld_alpha is None:
      return jnp.sum(a, axis=-1), jnp.sum(b, axis=-1)
    return ld_weighted_log_probs(a, b, mask_c, mask_r, ld_alpha)

  chosen, rejected = reduce_pair(lp_c, lp_r)
  batch = mask_c.shape[:-1]
  ref_c = ref_r = jnp.zeros(batch, dt)
  ratio_c, ratio_r = chosen, rejected
  if not no_reference:
    rc_, rr_ = refs["reference_chosen_logps"], refs["reference_rejected_logps"]
    _check_shape(owner, "reference_chosen_logps", rc_, [mask_c.shape, batch],
                 f"shape {mask_c.shape} (per-token) or {batch} (sequence log-probs)")
    _check_shape(owner, "reference_rejected_logps", rr_, [mask_r.shape, batch],
                 f"shape {mask_r.shape} (per-token) or {batch} (sequence log-probs)")
    if (rc_.shape == batch) != (rr_.shape == batch):
      raise ValueError(f"{owner}: `reference_chosen_logps` and `reference_rejected_logps` "
                       f"must both be per-token or both sequence log-probs, got "
                       f"{rc_.shape} and {rr_.shape}")
    if rc_.shape == batch:
      ref_c, ref_r = rc_, rr_  # already reduced (e.g. precomputed, LD-weighted if ld_alpha)
      ratio_c, ratio_r = chosen - ref_c, rejected - ref_r
    else:
      ref_tok_c, ref_tok_r = jnp.where(mask_c, rc_, 0.0), jnp.where(mask_r, rr_, 0.0)
      ref_c, ref_r = reduce_pair(ref_tok_c, ref_tok_r)
      # The log-ratios as sums of per-token differences (the same number as TRL's difference
      # of sums up to rounding): exactly 0 where policy == reference token by token,
      # however the compiler fuses the two sums, and no cancellation of two large sums.
      ratio_c, ratio_r = reduce_pair(lp_c - ref_tok_c, lp_r - ref_tok_r)
  return _Batch(chosen, rejected, ref_c, ref_r, (lp_c, lp_r, mask_c, mask_r), ratio_c,
                ratio_r)


def _lengths(owner, name, given, mask, batch_shape, dt):
  """TRL's ``completion_mask.sum(1).clamp(min=1)`` for ipo / sigmoid_norm."""
  if given is not None:
    x = jnp.asarray(given)
    if not (jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)):
      raise ValueError(f"{owner}: `{name}` must be a numeric array, got dtype {x.dtype}")
    _check_shape(owner, name, x, [batch_shape], f"the batch shape {batch_shape}")
    if is_concrete(x) and x.size and bool(jnp.any(x < 0)):
      raise ValueError(f"{owner}: `{name}` must be >= 0")
    n = x.astype(dt)
  else:
    n = jnp.sum(mask, axis=-1, dtype=dt)
  return jnp.maximum(n, 1.0)


def _pair_losses_trl1(kind, b, cs, rs, delta, *, beta, eps, tau, lengths):
  """Per-pair losses of TRL 1.16 ``DPOTrainer._compute_loss`` (before weighting).

  ``cs``, ``rs``: the f-divergence scores; ``delta``: their difference (``delta_score``).
  """
  clr = b.chosen_ratio                   # chosen_logratios
  rlr = b.rejected_ratio                 # rejected_logratios
  ls = jax.nn.log_sigmoid
  if kind == "sigmoid":
    return -ls(beta * delta)
  if kind == "hinge":
    return jax.nn.relu(1.0 - beta * delta)
  if kind in ("ipo", "sigmoid_norm"):
    len_c, len_r = lengths()
    d = cs / len_c - rs / len_r
    return jnp.square(d - 1.0 / (2.0 * beta)) if kind == "ipo" else -ls(beta * d)
  if kind == "exo_pair":
    z = beta * delta
    # sigma(z) * ls(z) is finite: as z -> -inf sigma(z) -> 0 faster than ls(z) -> -inf.
    return (jax.nn.sigmoid(z) * (ls(z) - math.log1p(-eps))
            + jax.nn.sigmoid(-z) * (ls(-z) - math.log(eps)))
  if kind == "nca_pair":
    r_c, r_r = beta * clr, beta * rlr
    return -ls(r_c) - 0.5 * ls(-r_c) - 0.5 * ls(-r_r)
  if kind == "robust":
    z = beta * delta
    return (-(1.0 - eps) * ls(z) + eps * ls(-z)) / (1.0 - 2.0 * eps)
  if kind == "bco_pair":
    return -ls(beta * clr) - ls(-beta * rlr)
  if kind == "sppo_hard":
    half = 0.5 / beta
    return jnp.square(clr - half) + jnp.square(rlr + half)
  if kind == "aot":
    d = (jnp.sort(b.chosen - b.rejected, axis=0)
         - jnp.sort(b.ref_chosen - b.ref_rejected, axis=0))
    return smoothed_sigmoid_loss(beta * d, eps)
  if kind == "aot_unpaired":
    d = jnp.sort(clr, axis=0) - jnp.sort(rlr, axis=0)
    return smoothed_sigmoid_loss(beta * d, eps)
  if kind == "apo_zero":
    return (1.0 - jax.nn.sigmoid(beta * clr)) + jax.nn.sigmoid(beta * rlr)
  if kind == "apo_down":
    return jax.nn.sigmoid(beta * clr) + (1.0 - jax.nn.sigmoid(beta * (clr - rlr)))
  if kind == "discopop":
    return _discopop(beta * delta, tau)
  if kind == "sft":
    lp_c, _, mask_c, _ = b.tokens
    count = jnp.maximum(jnp.sum(mask_c, dtype=lp_c.dtype), 1.0)
    return jnp.broadcast_to(-jnp.sum(lp_c) / count, b.chosen.shape)
  raise AssertionError(kind)


def _discopop(x, tau):
  """DiscoPOP (Chris Lu et al., 2024, eq. 5), TRL's form, with m = sigma(x / tau)::

    -log sigma(x) (1 - m) + exp(-x) m  =  softplus(-x) sigma(-x / tau) + exp(-x + ls(x / tau))

  The product ``exp(-x) m`` is taken as one exponential: TRL's ``exp(-x) * m`` is
  ``inf * 0 = NaN`` for ``x < -88`` in float32; this one is finite for every x when tau < 1.
  """
  return (-jax.nn.log_sigmoid(x) * jax.nn.sigmoid(-x / tau)
          + jnp.exp(-x + jax.nn.log_sigmoid(x / tau)))


def _pair_losses_trl0(kind, b, *, beta, eps, tau, delta):
  """Per-pair losses of TRL 0.19 ``DPOTrainer.dpo_loss``."""
  clr = b.chosen_ratio
  rlr = b.rejected_ratio
  h = clr - rlr
  ls = jax.nn.log_sigmoid
  z = beta * h
  if kind == "sigmoid":
    return smoothed_sigmoid_loss(z, eps)
  if kind == "robust":
    return ((1.0 - eps) * -ls(z) + eps * ls(-z)) / (1.0 - 2.0 * eps)
  if kind == "hinge":
    return jax.nn.relu(1.0 - z)
  if kind == "ipo":
    return jnp.square(h - 1.0 / (2.0 * beta))
  if kind == "exo_pair":
    e = eps if eps else EXO_DEFAULT_EPSILON
    return (jax.nn.sigmoid(z) * (ls(z) - math.log1p(-e))
            + jax.nn.sigmoid(-z) * (ls(-z) - math.log(e)))
  if kind == "nca_pair":
    r_c, r_r = beta * clr, beta * rlr
    return -ls(r_c) - 0.5 * ls(-r_c) - 0.5 * ls(-r_r)
  if kind == "apo_zero":
    return (1.0 - jax.nn.sigmoid(beta * clr)) + jax.nn.sigmoid(beta * rlr)
  if kind == "apo_down":
    return jax.nn.sigmoid(beta * clr) + (1.0 - jax.nn.sigmoid(z))
  if kind == "sppo_hard":
    half = 0.5 / beta
    return jnp.square(clr - half) + jnp.square(rlr + half)
  if kind == "bco_pair":
    return -ls(beta * clr - delta) - ls(-(beta * rlr - delta))
  if kind == "aot":
    d = (jnp.sort(b.chosen - b.rejected, axis=0)
         - jnp.sort(b.ref_chosen - b.ref_rejected, axis=0))
    return smoothed_sigmoid_loss(beta * d, eps)
  if kind == "aot_pair":
    return smoothed_sigmoid_loss(beta * (jnp.sort(clr, axis=0) - jnp.sort(rlr, axis=0)), eps)
  if kind == "discopop":
    return _discopop(z, tau)
  raise AssertionError(kind)


def dpo_loss(
    policy_chosen_logps: jax.typing.ArrayLike,
    policy_rejected_logps: jax.typing.ArrayLike,
    reference_chosen_logps: jax.typing.ArrayLike | None = None,
    reference_rejected_logps: jax.typing.ArrayLike | None = None,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float | jax.Array] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | jax.Array | None = None,
    use_weighting: bool = False,
    discopop_tau: float | jax.Array = 0.05,
    chosen_mask: jax.typing.ArrayLike | None = None,
    rejected_mask: jax.typing.ArrayLike | None = None,
    chosen_lengths: jax.typing.ArrayLike | None = None,
    rejected_lengths: jax.typing.ArrayLike | None = None,
    chosen_log_sum_sq_probs: jax.typing.ArrayLike | None = None,
    rejected_log_sum_sq_probs: jax.typing.ArrayLike | None = None,
    semantics: str = "trl1",
    reference_free: bool = False,
    bco_state: BCOState | None = None,
    reduction: str = "mean",
) -> tuple[jax.Array, dict[str, Any]]:
  r"""Direct Preference Optimization and its variants: TRL 1.16's ``DPOTrainer`` loss.

  **Inputs.** Either sequence log-probs (any shape ``[B...]``, the same for all four; batch
  axis 0) or, with ``chosen_mask`` / ``rejected_mask`` (``[B, T]`` bool or 0/1, e.g. from
  :func:`per_token_log_probs` with ``shift=True``: TRL's ``completion_mask[:, 1:]``), per-token
  log-probs ``[B, T]`` summed over the mask (values outside it never count). The reference
  may then also be ``[B]`` sequence log-probs (TRL's ``precompute_ref_log_probs``; with
  ``ld_alpha`` these must already be LD-weighted). Per-token inputs are needed by ``sft``,
  ``ld_alpha`` and ``use_weighting``; ``ipo`` and ``sigmoid_norm`` need the completion lengths
  (the mask sums, or ``chosen_lengths`` / ``rejected_lengths``). With a per-token reference
  the log-ratios ``rho`` are sums of per-token differences (TRL: difference of sums; equal up
  to rounding), so they are exactly 0 wherever policy == reference, however jit fuses them.

  **Notation** (``beta > 0``, ``eps = label_smoothing``, ``ls = log sigma``)::

    rho_c = log pi(y_c) - log ref(y_c)      rho_r = log pi(y_r) - log ref(y_r)
    s_c, s_r = f'(rho_c), f'(rho_r)          (f_divergence_scores; = rho for reverse_kl)
    d = s_c - s_r                            (TRL's delta_score)
    n_c, n_r = max(completion length, 1)

  **Loss types** (``semantics="trl1"``, the default; TRL 1.16 ``_compute_loss``):

  * ``sigmoid``: DPO (Rafailov et al., 2023, eq. 7): ``-ls(beta d)``. No label smoothing
    (TRL 1.16 dropped cDPO; ``semantics="trl0"`` has it).
  * ``hinge``: SLiC: ``relu(1 - beta d)``.
  * ``ipo``: IPO (Azar et al., 2023, eq. 17, ``tau = beta``), length-normalised inside the
    loss: ``(s_c / n_c - s_r / n_r - 1 / (2 beta))**2``.
  * ``exo_pair``: EXO (Ji et al., 2024, eq. 16), needs ``0 < eps``: ``sigma(beta d) (ls(beta d)
    - log(1 - eps)) + sigma(-beta d) (ls(-beta d) - log eps)``.
  * ``nca_pair``: NCA: ``-ls(beta rho_c) - ls(-beta rho_c) / 2 - ls(-beta rho_r) / 2``.
  * ``robust``: rDPO (Chowdhury et al., 2024, eq. 8), ``eps < 0.5``:
    ``(-(1 - eps) ls(beta d) + eps ls(-beta d)) / (1 - 2 eps)``.
  * ``bco_pair``: ``-ls(beta rho_c) - ls(-beta rho_r)`` (TRL 1.16 has no running reward mean
    here; TRL 0.19's ``bco_pair`` had one: ``semantics="trl0"``).
  * ``sppo_hard``: SPPO, hard probabilities: ``(rho_c - 1/(2 beta))**2 + (rho_r + 1/(2 beta))**2``.
  * ``aot``: AOT (Melnyk et al., 2024), paired: with ``sort`` over the batch (axis 0),
    ``g = sort(log pi_c - log pi_r) - sort(log ref_c - log ref_r)``, cDPO on ``beta g``:
    ``-(1 - eps) ls(beta g) - eps ls(-beta g)``. Depends on the whole batch.
  * ``aot_unpaired``: the same with ``g = sort(rho_c) - sort(rho_r)``. Whole batch.
  * ``apo_zero`` / ``apo_down``: APO (D'Oosterlinck et al., 2024, eqs. 7, 8):
    ``1 - sigma(beta rho_c) + sigma(beta rho_r)`` and ``sigma(beta rho_c) + 1 - sigma(beta
    (rho_c - rho_r))``.
  * ``discopop``: DiscoPOP (Lu et al., 2024, eq. 5), ``x = beta d``, ``m = sigma(x / tau)``:
    ``-ls(x) (1 - m) + exp(-x) m`` (``tau = discopop_tau``; evaluated as one exponential,
    finite for every ``x`` when ``tau < 1``).
  * ``sft``: the chosen completions' NLL, ``-mean(log pi)`` over every counted chosen token
    of the batch (one number for the batch; 0 with no token, where TRL gives NaN).
  * ``sigmoid_norm``: ``-ls(beta (s_c / n_c - s_r / n_r))``.

  **Combination.** ``loss_type`` may be a list (MPO, e.g. ``["sigmoid", "bco_pair",
  "sft"]``) with ``loss_weights`` (default all 1)::

    loss = sum_k loss_weights[k] * mean_batch(w_pair * l_k)

  ``w_pair = w_c w_r`` with ``use_weighting`` (WPO, :func:`wpo_weights`; needs per-token
  inputs and ``chosen_log_sum_sq_probs`` / ``rejected_log_sum_sq_probs`` ``[B, T]``, see
  :func:`log_sum_squared_probs`), else 1. ``ld_alpha`` (LD-DPO, :func:`ld_weighted_log_probs`)
  replaces the summed log-probs (policy and per-token reference) by their LD weighting.
  ``f_divergence_type`` / ``f_alpha_divergence_coef`` choose ``f'`` (:func:`f_divergence_scores`);
  only the types in :data:`F_DIVERGENCE_LOSS_TYPES` accept a non-default one (as in TRL).

  **Label smoothing** is used by ``robust``, ``exo_pair`` (where it must be > 0), ``aot`` and
  ``aot_unpaired``; a nonzero value with none of these is an error (TRL ignores it).

  **TRL 1.16 differences kept out**: TRL raises at run time for ``sft`` with
  ``use_weighting`` (an in-place multiply of an expanded tensor) and for ``use_weighting``
  with ``aot``/``aot_unpaired``; both are ValueErrors here. Empty completions give 0 where
  TRL's ``sft`` gives NaN. forward_kl's exponent is clamped at 80 (see
  :func:`f_divergence_scores`). Squared types (``ipo``, ``sppo_hard``) of exponential scores
  (forward_kl, alpha_divergence) overflow to inf for gaps beyond ~80/beta, as in TRL.

  **semantics="trl0"** (TRL 0.19 ``DPOTrainer.dpo_loss``, single loss type of
  :data:`TRL0_LOSS_TYPES`, reverse-KL only, no ``ld_alpha`` / ``use_weighting``): ``sigmoid``
  is cDPO ``-(1 - eps) ls(beta h) - eps ls(-beta h)`` (``h = rho_c - rho_r``); ``ipo`` is
  ``(h - 1/(2 beta))**2`` on the log-probs as given (TRL 0.19 fed it length-averaged
  log-probs: ``sequence_log_probs(..., average=True)``); ``exo_pair`` uses eps = 1e-3 when
  ``eps == 0``; ``aot_pair`` is 1.16's ``aot_unpaired``; ``bco_pair`` is
  ``-ls(beta rho_c - delta) - ls(-(beta rho_r - delta))`` with ``delta`` the running mean
  of the batch-mean rewards ``mean([beta rho_c, beta rho_r])``, updated with this batch first
  (TRL's ``RunningMoments``): pass ``bco_state`` (``losses.bco_init()`` to start) and
  carry ``metrics["bco_state"]`` (the :func:`~jaxopt_llm.losses.bco_update`-d state) to the
  next call. ``reference_free=True`` sets
  ``log ref = 0`` everywhere (TRL 0.19 zeroed it only in the ``logits``; the reference
  arguments may then be None).

  **Metrics** (batch means, ``stop_gradient``; TRL's names): ``rewards/chosen`` = mean(beta
  rho_c), ``rewards/rejected``, ``rewards/accuracies`` = mean(beta rho_c > beta rho_r) (a tie
  is wrong, so 0.0 when policy == reference), ``rewards/margins``, ``logps/chosen`` /
  ``logps/rejected`` (the policy's summed, LD-weighted, log-probs). TRL's ``entropy``,
  ``logits/*`` and ``mean_token_accuracy`` need the logits (see ``losses.metrics``).

  Gradient (``sigmoid``, mean over ``B``): ``d loss / d log pi(y_c^i) = -beta sigma(-beta
  d^i) / B = -d loss / d log pi(y_r^i)``: each pair weighs by how wrongly the implicit reward
  ranks it.

  Args:
    policy_chosen_logps: ``[B...]`` sequence log-probs, or ``[B, T]`` per token with masks.
    policy_rejected_logps: as above.
    reference_chosen_logps: as the policy's, or ``[B]`` with masks; None only with
      ``semantics="trl0", reference_free=True``.
    reference_rejected_logps: as above.
    beta: ``> 0``, the KL-penalty strength (inverse temperature; IPO's tau).
    loss_type: one of :data:`LOSS_TYPES` (``trl0``: :data:`TRL0_LOSS_TYPES`) or a list.
    loss_weights: one real per loss type (default 1.0 each).
    label_smoothing: ``eps`` in ``[0, 0.5]`` (``[0, 0.5)`` with ``robust``), a Python float.
    f_divergence_type: one of :data:`F_DIVERGENCE_TYPES`.
    f_alpha_divergence_coef: ``alpha`` of ``alpha_divergence``, a Python float.
    ld_alpha: LD-DPO's weight of the verbose tokens in ``[0, 1]``, or None (off).
    use_weighting: WPO weighting.
    discopop_tau: ``> 0``, DiscoPOP's temperature.
    chosen_mask: ``[B, T]`` mask of the chosen per-token log-probs (with ``rejected_mask``).
    rejected_mask: ``[B, T']`` mask of the rejected per-token log-probs.
    chosen_lengths: ``[B]`` completion lengths for ``ipo`` / ``sigmoid_norm`` (default: the
      mask sums). TRL 1.16 counts the unshifted ``completion_mask``, one more than the
      shifted mask when a completion starts at position 0 (empty prompt).
    rejected_lengths: as above.
    chosen_log_sum_sq_probs: ``[B, T]`` per-token ``log sum_v p_v**2`` (WPO).
    rejected_log_sum_sq_probs: as above.
    semantics: ``"trl1"`` (TRL 1.16, default) or ``"trl0"`` (TRL 0.19).
    reference_free: ``trl0`` only: treat the reference log-probs as 0.
    bco_state: ``trl0`` ``bco_pair`` only: the running reward moments (a ``BCOState``).
    reduction: ``"mean"`` (TRL's), ``"sum"`` or ``"none"`` (per pair: ``sum_k w_k w_pair l_k``,
      whose mean is the loss; for ``aot`` the pairs are in sorted order).

  Returns:
    ``(loss, metrics)``: a scalar (or ``[B...]`` for ``reduction="none"``) in at least
    float32, and the dict of scalar metrics (plus ``"bco_state"``, the new state, for ``trl0``
    ``bco_pair``).
  """
  owner = "dpo_loss"
  check_choice(owner, "semantics", semantics, SEMANTICS)
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  check_choice(owner, "reference_free", reference_free, (True, False))
  check_choice(owner, "use_weighting", use_weighting, (True, False))
  check_choice(owner, "f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
  trl0 = semantics == "trl0"

  kinds = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
  if not kinds:
    raise ValueError(f"{owner}: `loss_type` must name at least one loss type")
  allowed = TRL0_LOSS_TYPES if trl0 else LOSS_TYPES
  for kind in kinds:
    if kind == "simpo":
      raise ValueError(f"{owner}: loss_type='simpo' is SimPO, which TRL implements in its "
                       f"CPOTrainer (reference-free, length-averaged, with cpo_alpha's NLL "
                       f"term): use jaxopt_llm.losses.cpo_loss(..., loss_type='simpo')")
    if kind == "aot_pair" and not trl0:
      raise ValueError(f"{owner}: loss_type='aot_pair' is TRL 0.19's name; TRL 1.16 calls "
                       f"it 'aot_unpaired' (or pass semantics='trl0')")
    check_choice(owner, "loss_type", kind, allowed)
  if loss_weights is None:
    weights = (1.0,) * len(kinds)
  else:
    weights = tuple(loss_weights)
    if len(weights) != len(kinds):
      raise ValueError(f"{owner}: `loss_weights` must have one weight per loss type "
                       f"({len(kinds)}), got {len(weights)}")
    for w in weights:
      check_real(owner, "loss_weights", w)

  check_real(owner, "beta", beta, lo=0.0, lo_open=True)
  check_real(owner, "discopop_tau", discopop_tau, lo=0.0, lo_open=True)
  # Python floats: they pick formula branches (exo's eps, the alpha -> 1 limit) at trace time.
  for name, value in (("label_smoothing", label_smoothing),
                      ("f_alpha_divergence_coef", f_alpha_divergence_coef)):
    if not is_concrete(value):
      raise ValueError(f"{owner}: `{name}` must be a Python float (it selects the formula "
                       f"at trace time), got a traced value")
  check_real(owner, "f_alpha_divergence_coef", f_alpha_divergence_coef)
  check_real(owner, "label_smoothing", label_smoothing, lo=0.0, hi=0.5,
             hi_open="robust" in kinds)
  eps = float(label_smoothing)
  smoothed = SMOOTHED_LOSS_TYPES[semantics]
  if eps and not set(kinds) & set(smoothed):
    hint = (" (TRL 1.16's sigmoid has no cDPO smoothing; semantics='trl0' has it)"
            if "sigmoid" in kinds and not trl0 else "")
    raise ValueError(f"{owner}: `label_smoothing` is only used by loss_type in {smoothed}; "
                     f"got {label_smoothing!r} with loss_type={loss_type!r}{hint}")
  if not trl0 and "exo_pair" in kinds and eps == 0.0:
    raise ValueError(f"{owner}: loss_type='exo_pair' needs `label_smoothing` > 0 (TRL "
                     f"1.16 raises too; the EXO paper recommends 1e-3)")
  if ld_alpha is not None:
    check_real(owner, "ld_alpha", ld_alpha, lo=0.0, hi=1.0)

  if trl0:
    if len(kinds) > 1 or loss_weights is not None:
      raise ValueError(f"{owner}: TRL 0.19 has one loss type; `loss_type` lists and "
                       f"`loss_weights` need semantics='trl1'")
    for name, value, default in (("f_divergence_type", f_divergence_type, "reverse_kl"),
                                 ("ld_alpha", ld_alpha, None),
                                 ("use_weighting", use_weighting, False)):
      if value != default:
        raise ValueError(f"{owner}: `{name}` is implemented with TRL 1.16's semantics only; "
                         f"pass semantics='trl1'")
    if (bco_state is None) == (kinds[0] == "bco_pair"):
      raise ValueError(f"{owner}: `bco_state` is required with loss_type='bco_pair' under "
                       f"semantics='trl0' (start from losses.bco_init()) and unused otherwise")
    if bco_state is not None and not isinstance(bco_state, BCOState):
      raise ValueError(f"{owner}: `bco_state` must be a BCOState (see losses.bco_init), got "
                       f"{type(bco_state).__name__}")
  else:
    if reference_free:
      raise ValueError(f"{owner}: TRL 1.16 has no `reference_free`; pass zeros as the "
                       f"reference log-probs, use cpo_loss for reference-free CPO/SimPO, or "
                       f"semantics='trl0' for TRL 0.19's flag")
    if bco_state is not None:
      raise ValueError(f"{owner}: `bco_state` is TRL 0.19's bco_pair running mean; TRL 1.16's "
                       f"bco_pair has none (pass semantics='trl0' for it)")
    if f_divergence_type != "reverse_kl":
      bad = [k for k in kinds if k not in F_DIVERGENCE_LOSS_TYPES]
      if bad:
        raise ValueError(f"{owner}: f_divergence_type={f_divergence_type!r} is only "
                         f"supported for loss types {F_DIVERGENCE_LOSS_TYPES}; got {bad}")
    if use_weighting:
      bad = [k for k in kinds if k in ("aot", "aot_unpaired", "sft")]
      if bad:
        raise ValueError(f"{owner}: `use_weighting` (WPO) is not available with {bad}: aot "
                         f"sorts the pairs (TRL raises NotImplementedError) and TRL 1.16 fails "
                         f"on sft's expanded batch loss")
  per_token_needed = ([k for k in kinds if k in _PER_TOKEN_TYPES]
                      + (["ld_alpha"] if ld_alpha is not None else [])
                      + (["use_weighting"] if use_weighting else []))
  if per_token_needed and chosen_mask is None:
    raise ValueError(f"{owner}: {per_token_needed} need per-token log-probs: pass "
                     f"`chosen_mask` and `rejected_mask` with [B, T] log-probs")

  no_reference = trl0 and reference_free
  if not no_reference:
    for name, value in (("reference_chosen_logps", reference_chosen_logps),
                        ("reference_rejected_logps", reference_rejected_logps)):
      if value is None:
        raise ValueError(f"{owner}: `{name}` is required (None only with semantics='trl0', "
                         f"reference_free=True)")
  b = _prepare(owner, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, chosen_mask, rejected_mask, ld_alpha, no_reference)
  dt = b.chosen.dtype
  if any(k in ("aot", "aot_unpaired", "aot_pair") for k in kinds) and b.chosen.ndim < 1:
    raise ValueError(f"{owner}: loss_type 'aot' sorts over the batch axis 0: the log-probs "
                     f"need one")
  beta_ = jnp.asarray(beta, dt)
  tau = jnp.asarray(discopop_tau, dt)
  metrics: dict[str, Any] = {}

  if trl0:
    delta = None
    if kinds[0] == "bco_pair":
      rewards = beta_ * jnp.concatenate([jnp.ravel(b.chosen_ratio),
                                         jnp.ravel(b.rejected_ratio)])
      # TRL 0.19 updates RunningMoments with the batch's mean reward (one value per batch);
      # an empty batch leaves it unchanged.
      new_state = (bco_update(bco_state, jnp.mean(rewards)[None]) if rewards.size
                   else bco_state)
      delta = jax.lax.stop_gradient(new_state.mean.astype(dt))
      metrics["bco_state"] = new_state
    losses = _pair_losses_trl0(kinds[0], b, beta=beta_, eps=eps, tau=tau, delta=delta)
  else:
    scores = _scores_and_delta(owner, b.chosen_ratio, b.rejected_ratio, f_divergence_type,
                               f_alpha_divergence_coef)

    def lengths():
      if chosen_mask is None and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{owner}: TRL 1.16's ipo / sigmoid_norm divide by the completion "
                         f"lengths: pass `chosen_mask` / `rejected_mask` (per-token log-probs) "
                         f"or `chosen_lengths` / `rejected_lengths` (semantics='trl0' is TRL "
                         f"0.19's IPO on the log-probs as given)")
      masks = (None, None) if b.tokens is None else b.tokens[2:]
      return (_lengths(owner, "chosen_lengths", chosen_lengths, masks[0], b.chosen.shape, dt),
              _lengths(owner, "rejected_lengths", rejected_lengths, masks[1], b.chosen.shape,
                       dt))

    pair_weight = None
    if use_weighting:
      if chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None:
        raise ValueError(f"{owner}: use_weighting (WPO) needs `chosen_log_sum_sq_probs` and "
                         f"`rejected_log_sum_sq_probs` ([B, T], see log_sum_squared_probs)")
      lp_c, lp_r, mask_c, mask_r = b.tokens
      lssp = []
      for name, value, mask in (("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs, mask_c),
                                ("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs,
                                 mask_r)):
        value = _as_float(owner, name, value)
        _check_shape(owner, name, value, [mask.shape], f"the mask's shape {mask.shape}")
        lssp.append(value.astype(dt))
      w_c, w_r = wpo_weights(lp_c, lp_r, lssp[0], lssp[1], mask_c, mask_r)
      pair_weight = w_c * w_r
    losses = None
    for kind, w in zip(kinds, weights):
      per_pair = _pair_losses_trl1(kind, b, *scores, beta=beta_, eps=eps, tau=tau,
                                   lengths=lengths)
      if pair_weight is not None:
        per_pair = per_pair * pair_weight
      term = per_pair if isinstance(w, (int, float)) and w == 1.0 else per_pair * w
      losses = term if losses is None else losses + term

  if reduction == "mean":
    loss = safe_mean(losses)
  elif reduction == "sum":
    loss = jnp.sum(losses)
  else:
    loss = losses
  metrics = {**paired_metrics(beta_ * b.chosen_ratio, beta_ * b.rejected_ratio, b.chosen,
                              b.rejected),
             **metrics}
  return loss, metrics
