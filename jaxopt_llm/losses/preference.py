"""Preference-optimisation losses: sequence log-probabilities and the DPO family.

``sequence_log_probs`` turns a model's logits into the per-sequence log-likelihoods the
losses consume (with ``cross_entropy``'s masking); ``dpo_loss`` implements DPO and the
variants of TRL's ``DPOTrainer.dpo_loss`` (and SimPO from TRL's ``CPOTrainer``) as pure,
jit-able functions. Every log-sigmoid is ``jax.nn.log_sigmoid`` (a softplus), so the
loss and its gradients stay finite for any finite log-ratio, e.g. gaps of +-1e4.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_choice, check_real, is_concrete
from jaxopt_llm.losses._common import (
    REDUCTIONS, sequence_targets, token_log_probs, validated_targets)

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "apo_zero",
              "apo_down", "sppo_hard", "simpo")
# Types whose formula has a label-smoothing term; any other type rejects a nonzero one
# rather than silently ignoring it.
_SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo")
# TRL's exo_pair replaces label_smoothing == 0 (where log(eps) would be -inf) by this.
EXO_DEFAULT_EPSILON = 1e-3


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

  ``logits`` is ``[..., T, V]`` and ``labels`` ``[..., T]``; a token counts when
  ``label != ignore_index`` and ``where`` is True there (exactly as in
  :func:`~jaxopt_llm.losses.cross_entropy`; for DPO set the prompt and padding labels to
  ``ignore_index`` so only the completion counts). Per token ``log p(y_t) = z_{y_t} -
  logsumexp(z)`` in float32, whatever the input dtype. Then::

    out = sum_t log p(y_t)                        (average=False; TRL's DPO)
    out = sum_t log p(y_t) / max(n_counted, 1)    (average=True; IPO in TRL, SimPO)

  A sequence with no counted token gives 0.0 (with zero gradient), never NaN.

  ``shift=True`` is for causal LMs whose ``logits[..., t, :]`` predict token ``t + 1``:
  it scores ``labels[..., 1:]`` with ``logits[..., :-1, :]`` (and shifts ``where`` the
  same way), like :func:`~jaxopt_llm.losses.causal_lm_loss` and TRL's
  ``get_batch_logps``. With ``shift=False`` the caller has aligned them.

  Out-of-range labels are handled as in ``cross_entropy``: ValueError when eager, NaN
  (or a checkify error with ``validate=True``) under ``jit``.

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
  owner = "sequence_log_probs"
  check_choice(owner, "average", average, (True, False))
  check_choice(owner, "shift", shift, (True, False))
  logits, labels, where = sequence_targets(owner, logits, labels, where,
                                           labels_name="labels", shift=shift)
  t = validated_targets(owner, logits, labels, ignore_index=ignore_index, where=where,
                        validate=validate)
  log_p, _ = token_log_probs(t)
  if not average:
    return jnp.sum(log_p, axis=-1)
  # Per sequence, the same safe mean as cross_entropy's reduction="mean".
  count = jnp.sum(t.valid, axis=-1, dtype=jnp.float32)
  return jnp.sum(log_p, axis=-1) / jnp.maximum(count, 1.0)


def _as_logps(owner: str, name: str, x: Any, shape: tuple[int, ...] | None) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{owner}: `{name}` must be a floating array, got dtype {x.dtype}")
  if shape is not None and x.shape != shape:
    raise ValueError(f"{owner}: `{name}` must have the shape of policy_chosen_logps "
                     f"{shape}, got {x.shape}")
  return x.astype(jnp.float32)


def _smoothed_sigmoid(z: jax.Array, eps: float) -> jax.Array:
  """``-(1 - eps) log sigma(z) - eps log sigma(-z)``; the eps term is skipped at 0."""
  loss = -jax.nn.log_sigmoid(z)
  if eps:
    loss = (1.0 - eps) * loss - eps * jax.nn.log_sigmoid(-z)
  return loss


def dpo_loss(
    policy_chosen_logps: jax.typing.ArrayLike,
    policy_rejected_logps: jax.typing.ArrayLike,
    reference_chosen_logps: jax.typing.ArrayLike | None = None,
    reference_rejected_logps: jax.typing.ArrayLike | None = None,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    simpo_gamma: float | jax.Array = 0.5,
    reduction: str = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Direct Preference Optimization and its variants, with TRL's reward metrics.

  Inputs are per-example sequence log-probabilities (see :func:`sequence_log_probs`) of
  the chosen (preferred) and rejected completions under the policy ``pi`` and the frozen
  reference ``ref``. Notation (``beta > 0``, ``eps = label_smoothing``)::

    rho_c = log pi(y_c) - log ref(y_c)        rho_r = log pi(y_r) - log ref(y_r)
    h     = rho_c - rho_r                      (TRL's ``logits``)
    ls(z) = log sigma(z)                       (jax.nn.log_sigmoid)

  ``reference_free=True`` sets ``log ref = 0`` everywhere (the reference arguments may
  then be None). Per-example losses by ``loss_type`` (TRL ``DPOTrainer`` names):

  * ``"sigmoid"``: DPO (Rafailov et al., 2023, eq. 7) with the conservative cDPO
    smoothing (Mitchell, 2023, "A note on DPO with noisy preferences"):
    ``-(1 - eps) ls(beta h) - eps ls(-beta h)``.
  * ``"robust"``: rDPO (Chowdhury et al., 2024, "Provably Robust DPO", eq. 8):
    ``(-(1 - eps) ls(beta h) + eps ls(-beta h)) / (1 - 2 eps)``, needs ``eps < 0.5``.
  * ``"hinge"``: SLiC (Zhao et al., 2023, "SLiC-HF"): ``relu(1 - beta h)``.
  * ``"ipo"``: IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences", eq. 17, ``tau = beta``): ``(h - 1 / (2 beta))**2``.
    TRL feeds IPO *length-averaged* log-probs (``sequence_log_probs(...,
    average=True)``); pass those to match it.
  * ``"exo_pair"``: EXO (Ji et al., 2024, "Towards Efficient Exact Optimization of
    Language Model Alignment", eq. 16), with ``eps`` its label smoothing (TRL uses
    ``1e-3`` when ``eps == 0``, and so do we):
    ``sigma(beta h) (ls(beta h) - log(1 - eps)) + sigma(-beta h) (ls(-beta h) - log eps)``.
  * ``"nca_pair"``: NCA (Chen et al., 2024, "Noise Contrastive Alignment of Language
    Models with Explicit Rewards"), with ``r_c = beta rho_c``, ``r_r = beta rho_r``:
    ``-ls(r_c) - ls(-r_c) / 2 - ls(-r_r) / 2``.
  * ``"apo_zero"`` / ``"apo_down"``: APO (D'Oosterlinck et al., 2024, "Anchored
    Preference Optimization", eqs. 7 and 8):
    ``(1 - sigma(beta rho_c)) + sigma(beta rho_r)`` and
    ``sigma(beta rho_c) + (1 - sigma(beta h))``.
  * ``"sppo_hard"``: SPPO with hard win/lose probabilities (Wu et al., 2024,
    "Self-Play Preference Optimization", eq. 4.7):
    ``(rho_c - 1 / (2 beta))**2 + (rho_r + 1 / (2 beta))**2``.
  * ``"simpo"``: SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6; TRL ``CPOTrainer(loss_type="simpo")``): reference-free
    with a target margin ``gamma = simpo_gamma``, on length-averaged log-probs
    (``sequence_log_probs(..., average=True)``), with cDPO smoothing:
    ``-(1 - eps) ls(beta g) - eps ls(-beta g)``, ``g = log pi(y_c) - log pi(y_r) -
    gamma / beta``. The reference arguments are ignored (may be None).

  Differences from TRL: ``reference_free`` zeroes the reference in every type (TRL
  ignores it in ``nca_pair`` and ``sppo_hard`` and in the reward metrics). TRL's
  stateful ``bco_pair`` (a running reward mean) and ``aot`` variants are not provided.

  Gradient (``"sigmoid"``, ``eps = 0``, mean over ``B``): ``d loss / d log pi(y_c^i) =
  -beta sigma(r_r^i - r_c^i) / B`` and ``d loss / d log pi(y_r^i) = +beta sigma(r_r^i -
  r_c^i) / B``: each pair is weighted by how wrongly the implicit reward ranks it.

  Metrics (means over the batch, computed under ``stop_gradient``), TRL's
  ``rewards/*``: ``chosen_rewards = mean(beta rho_c)``, ``rejected_rewards = mean(beta
  rho_r)``, ``reward_accuracy = mean(beta rho_c > beta rho_r)`` (ties count as wrong, so
  it is 0.0 when policy == reference), ``reward_margin = mean(beta (rho_c - rho_r))``.
  For ``"simpo"`` the rewards are ``beta log pi`` (TRL's CPO).

  Args:
    policy_chosen_logps: ``[B]`` (any shape, the same for all four) float.
    policy_rejected_logps: as above.
    reference_chosen_logps: as above, or None with ``reference_free`` / ``"simpo"``.
    reference_rejected_logps: as above, or None with ``reference_free`` / ``"simpo"``.
    beta: ``> 0``, the KL-penalty strength (inverse temperature).
    loss_type: one of :data:`LOSS_TYPES`.
    label_smoothing: ``eps`` in ``[0, 0.5]`` (``[0, 0.5)`` for ``"robust"``); must be 0
      for types without a smoothing term.
    reference_free: treat the reference log-probs as 0.
    simpo_gamma: SimPO's target reward margin (``"simpo"`` only).
    reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"``.

  Returns:
    ``(loss, metrics)``: a float32 scalar (or per-example array for
    ``reduction="none"``) and a dict of float32 scalars.
  """
  owner = "dpo_loss"
  check_choice(owner, "loss_type", loss_type, LOSS_TYPES)
  check_choice(owner, "reduction", reduction, REDUCTIONS)
  check_choice(owner, "reference_free", reference_free, (True, False))
  check_real(owner, "beta", beta, lo=0.0, lo_open=True)
  check_real(owner, "simpo_gamma", simpo_gamma)
  # A Python float: it picks formula branches (e.g. exo's eps == 0 rule) at trace time.
  if not is_concrete(label_smoothing):
    raise ValueError(f"{owner}: `label_smoothing` must be a Python float (it selects the "
                     f"formula at trace time), got a traced value")
  check_real(owner, "label_smoothing", label_smoothing, lo=0.0, hi=0.5,
             hi_open=loss_type == "robust")
  label_smoothing = float(label_smoothing)
  if label_smoothing and loss_type not in _SMOOTHED:
    raise ValueError(f"{owner}: `label_smoothing` is only used by loss_type in "
                     f"{_SMOOTHED}; got {label_smoothing!r} with loss_type={loss_type!r}")

  pc = _as_logps(owner, "policy_chosen_logps", policy_chosen_logps, None)
  pr = _as_logps(owner, "policy_rejected_logps", policy_rejected_logps, pc.shape)
  no_reference = reference_free or loss_type == "simpo"
  refs = {"reference_chosen_logps": reference_chosen_logps,
          "reference_rejected_logps": reference_rejected_logps}
  if no_reference:
    rc = rr = jnp.zeros_like(pc)
  else:
    for name, value in refs.items():
      if value is None:
        raise ValueError(f"{owner}: `{name}` is required unless reference_free=True or "
                         f"loss_type='simpo'")
    rc = _as_logps(owner, "reference_chosen_logps", reference_chosen_logps, pc.shape)
    rr = _as_logps(owner, "reference_rejected_logps", reference_rejected_logps, pc.shape)

  beta = jnp.asarray(beta, jnp.float32)
  eps = label_smoothing
  rho_c = pc - rc
  rho_r = pr - rr
  h = rho_c - rho_r
  if loss_type == "sigmoid":
    losses = _smoothed_sigmoid(beta * h, eps)
  elif loss_type == "robust":
    losses = ((1.0 - eps) * -jax.nn.log_sigmoid(beta * h)
              + eps * jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - beta * h)
  elif loss_type == "ipo":
    losses = jnp.square(h - 1.0 / (2.0 * beta))
  elif loss_type == "exo_pair":
    e = eps if eps else EXO_DEFAULT_EPSILON
    z = beta * h
    # sigma(z) * ls(z) is finite: as z -> -inf, sigma(z) -> 0 faster than ls(z) -> -inf,
    # and jax's sigmoid/log_sigmoid never produce inf or NaN for finite z.
    losses = (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-e))
              + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - math.log(e)))
  elif loss_type == "nca_pair":
    r_c, r_r = beta * rho_c, beta * rho_r
    losses = (-jax.nn.log_sigmoid(r_c) - 0.5 * jax.nn.log_sigmoid(-r_c)
              - 0.5 * jax.nn.log_sigmoid(-r_r))
  elif loss_type == "apo_zero":
    losses = (1.0 - jax.nn.sigmoid(beta * rho_c)) + jax.nn.sigmoid(beta * rho_r)
  elif loss_type == "apo_down":
    losses = jax.nn.sigmoid(beta * rho_c) + (1.0 - jax.nn.sigmoid(beta * h))
  elif loss_type == "sppo_hard":
    half = 0.5 / beta
    losses = jnp.square(rho_c - half) + jnp.square(rho_r + half)
  else:  # simpo (h = log pi(y_c) - log pi(y_r): the reference is zeroed above)
    gamma = jnp.asarray(simpo_gamma, jnp.float32)
    losses = _smoothed_sigmoid(beta * h - gamma, eps)

  # max(n, 1): an empty batch gives 0.0 losses and metrics, not 0/0 = NaN.
  def mean(x):
    return jnp.sum(x) / max(x.size, 1)

  if reduction == "mean":
    loss = mean(losses)
  elif reduction == "sum":
    loss = jnp.sum(losses)
  else:
    loss = losses
  chosen_rewards = jax.lax.stop_gradient(beta * rho_c)
  rejected_rewards = jax.lax.stop_gradient(beta * rho_r)
  metrics = {
      "chosen_rewards": mean(chosen_rewards),
      "rejected_rewards": mean(rejected_rewards),
      "reward_accuracy": mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "reward_margin": mean(chosen_rewards - rejected_rewards),
  }
  return loss, metrics
