"""CPO: Contrastive Preference Optimization, with its SimPO and AlphaPO variants.

``cpo_loss`` is the loss of TRL 1.16's ``experimental.cpo.CPOTrainer`` (``cpo_loss`` and
``get_batch_loss_metrics``, with ``CPOConfig``'s ``loss_type="alphapo"`` sugar) as a pure,
jit-able function of per-sequence log-probs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_choice, check_real, is_concrete
from jaxopt_llm.losses._common import compute_dtype, is_concrete_zero
from jaxopt_llm.losses._preference_common import (
    as_logps, as_scalar_loss, paired_metrics, safe_mean)
from jaxopt_llm.losses.preference import smoothed_sigmoid_loss

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# Types with a label-smoothing term; the others reject a nonzero one (TRL warns and
# ignores it) rather than silently ignoring it.
_SMOOTHED = ("sigmoid", "simpo", "alphapo")


def alphapo_reward(logps: jax.Array, alpha: float) -> jax.Array:
  r"""AlphaPO's reward shape ``r = (1 - p**(-alpha)) / alpha`` with ``p = exp(logps)``.

  Computed as ``-expm1(-alpha * logps) / alpha``: the same number as TRL's
  ``(1 - exp(logps).pow(-alpha)) / alpha`` without its cancellation for small ``alpha``
  or the underflow of ``exp(logps)``. ``alpha -> 0`` gives ``logps``. For ``alpha > 0``
  the reward is exponential in ``-logps`` and overflows once ``alpha * |logps|`` exceeds
  ~88 (float32; ~709 in float64), as in TRL: use length-averaged log-probs (as TRL does
  for ``"simpo"`` / ``"alphapo"``).
  """
  return -jnp.expm1(-alpha * logps) / alpha


def cpo_loss(
    policy_chosen_logps: jax.typing.ArrayLike,
    policy_rejected_logps: jax.typing.ArrayLike,
    nll_loss: jax.typing.ArrayLike | None = None,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | jax.Array = 0.0,
    cpo_alpha: float | jax.Array = 1.0,
    simpo_gamma: float | jax.Array = 0.5,
    alpha: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""CPO (Xu et al., 2024, "Contrastive Preference Optimization: Pushing the Boundaries
  of LLM Performance in Machine Translation", eq. 3), SimPO (Meng et al., 2024, "SimPO:
  Simple Preference Optimization with a Reference-Free Reward", eq. 6) and AlphaPO
  (Gupta et al., 2025, "AlphaPO: Reward Shape Matters for LLM Alignment"), as TRL 1.16's
  ``CPOTrainer``.

  Reference-free. With ``l_c = log pi(y_c)``, ``l_r = log pi(y_r)`` per-sequence
  log-probs, ``eps = label_smoothing`` and ``ls = log sigma``::

    r(l)  = l                                  (alpha == 0)
          = (1 - exp(l)**(-alpha)) / alpha     (alpha != 0, AlphaPO's reward shape)
    h     = r(l_c) - r(l_r)                    (TRL's ``logits``)
    sigmoid:  -(1 - eps) ls(beta h) - eps ls(-beta h)
    hinge:    relu(1 - beta h)
    ipo:      (h - 1 / (2 beta))**2
    simpo:    the sigmoid loss of h - simpo_gamma / beta  (= beta h - simpo_gamma)
    loss  = mean_i losses_i + cpo_alpha * nll_loss

  ``loss_type="alphapo"`` is TRL's ``CPOConfig`` sugar: ``"simpo"`` with ``cpo_alpha``
  set to 0 (whatever is passed), to be combined with ``alpha != 0``; ``alpha`` applies
  to every type. TRL feeds ``"ipo"``, ``"simpo"`` and ``"alphapo"`` *length-averaged*
  log-probs (``sequence_log_probs(..., shift=True, average=True)``) and ``"sigmoid"`` /
  ``"hinge"`` summed ones (``average=False``): pass those to match it.

  ``nll_loss`` is TRL's ``policy_nll_loss``, the behaviour-cloning term: the mean
  next-token cross-entropy over the *chosen completions'* tokens (prompt tokens are
  ``-100`` in TRL's labels), e.g. ``causal_lm_loss(chosen_logits, chosen_labels)`` with
  the prompt and padding labels set to ``-100``. It is passed precomputed (a scalar); it
  may be None when ``cpo_alpha`` is 0 (always for ``"alphapo"``), where TRL does not
  compute it and the term is left out of the graph (metric ``nll_loss`` = 0).

  Gradient (``"sigmoid"``, ``eps = 0``, ``alpha = 0``): ``d loss / d l_c = -(beta / B)
  sigma(-beta h)``, the opposite for ``l_r``.

  Differences from TRL: a nonzero ``label_smoothing`` with ``"hinge"``/``"ipo"`` is an
  error (TRL warns and ignores it); AlphaPO's reward uses ``expm1`` (see
  :func:`alphapo_reward`); an empty batch gives 0.0 (plus ``cpo_alpha * nll_loss``)
  rather than NaN; ``logits/*`` (which need the logits) are not computed.

  Metrics (TRL's names, batch means, ``stop_gradient``): ``rewards/chosen`` /
  ``rewards/rejected`` (``beta * r(l)``), ``rewards/accuracies`` (ties are wrong),
  ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``nll_loss``.

  Args:
    policy_chosen_logps: ``[B]`` (any shape) per-sequence log-probs (see above).
    policy_rejected_logps: as above, the shape of ``policy_chosen_logps``.
    nll_loss: scalar chosen-completion cross-entropy, or None when ``cpo_alpha`` is 0.
    beta: ``> 0``, the inverse temperature (IPO's regulariser tau for ``"ipo"``).
    loss_type: one of :data:`CPO_LOSS_TYPES`.
    label_smoothing: ``eps`` in ``[0, 0.5]``; a concrete 0 for ``"hinge"`` and ``"ipo"``.
    cpo_alpha: ``>= 0``, the weight of the NLL (behaviour-cloning) term.
    simpo_gamma: SimPO's target reward margin (``"simpo"``/``"alphapo"`` only).
    alpha: AlphaPO's reward-shape parameter, a Python float (it selects the formula at
      trace time, as TRL's ``if self.alpha != 0``).

  Returns:
    ``(loss, metrics)``: a scalar in the compute dtype (float32, float64 for float64
    inputs under x64) and a dict of scalars.
  """
  owner = "cpo_loss"
  check_choice(owner, "loss_type", loss_type, CPO_LOSS_TYPES)
  check_real(owner, "beta", beta, lo=0.0, lo_open=True)
  check_real(owner, "label_smoothing", label_smoothing, lo=0.0, hi=0.5)
  check_real(owner, "cpo_alpha", cpo_alpha, lo=0.0)
  check_real(owner, "simpo_gamma", simpo_gamma)
  if not is_concrete(alpha):
    raise ValueError(f"{owner}: `alpha` must be a Python float (it selects the reward "
                     f"formula at trace time), got a traced value")
  check_real(owner, "alpha", alpha)
  alpha = float(alpha)
  if loss_type not in _SMOOTHED and not is_concrete_zero(label_smoothing):
    raise ValueError(f"{owner}: `label_smoothing` is only used by loss_type in "
                     f"{_SMOOTHED}; loss_type={loss_type!r} needs a concrete 0, got "
                     f"{label_smoothing!r}")
  if loss_type == "alphapo":  # TRL's CPOConfig.__post_init__
    loss_type, cpo_alpha = "simpo", 0.0
  use_nll = not is_concrete_zero(cpo_alpha)
  if use_nll and nll_loss is None:
    raise ValueError(f"{owner}: `nll_loss` is required unless cpo_alpha == 0 (got "
                     f"cpo_alpha={cpo_alpha!r})")

  dtype = compute_dtype(policy_chosen_logps, policy_rejected_logps,
                        nll_loss if use_nll else None)
  pc = as_logps(owner, "policy_chosen_logps", policy_chosen_logps, dtype)
  pr = as_logps(owner, "policy_rejected_logps", policy_rejected_logps, dtype,
                shape=pc.shape, like="policy_chosen_logps")
  nll = (as_scalar_loss(owner, "nll_loss", nll_loss, dtype) if use_nll
         else jnp.zeros((), dtype))
  beta = jnp.asarray(beta, dtype)

  if alpha != 0.0:
    r_c, r_r = alphapo_reward(pc, alpha), alphapo_reward(pr, alpha)
  else:
    r_c, r_r = pc, pr
  h = r_c - r_r
  if loss_type in ("sigmoid", "simpo"):
    if loss_type == "simpo":
      h = h - jnp.asarray(simpo_gamma, dtype) / beta
    eps = (label_smoothing if isinstance(label_smoothing, (int, float))
           else jnp.asarray(label_smoothing, dtype))
    losses = smoothed_sigmoid_loss(beta * h, eps)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - beta * h)
  else:  # ipo
    losses = jnp.square(h - 1.0 / (2.0 * beta))

  loss = safe_mean(losses)
  if use_nll:
    loss = loss + jnp.asarray(cpo_alpha, dtype) * nll
  metrics = paired_metrics(beta * r_c, beta * r_r, pc, pr)
  metrics["nll_loss"] = jax.lax.stop_gradient(nll)
  return loss, metrics
