"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable completions.

``kto_loss`` is the loss of TRL 1.16's ``KTOTrainer._compute_loss`` (loss types ``"kto"``
and ``"apo_zero_unpaired"``) as a pure, jit-able function of per-sequence log-probs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_choice, check_real
from jaxopt_llm.losses._common import compute_dtype
from jaxopt_llm.losses._preference_common import (
    as_labels, as_logps, safe_mean, unpaired_metrics)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(
    policy_logps: jax.typing.ArrayLike,
    reference_logps: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    policy_kl_logps: jax.typing.ArrayLike | None = None,
    reference_kl_logps: jax.typing.ArrayLike | None = None,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str = "kto",
    desirable_weight: float | jax.Array = 1.0,
    undesirable_weight: float | jax.Array = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
  Optimization", eq. 7) and unpaired APO-zero, as TRL 1.16's ``KTOTrainer``.

  Each example ``i`` is one completion with a binary label: desirable (``labels[i]``
  True, TRL's "chosen") or undesirable ("rejected"). With ``rho_i = log pi(y_i) - log
  ref(y_i)`` (per-sequence log-probs: the *sum* over completion tokens, as TRL) and the
  reference point ``z`` (below)::

    kto:                desirable   w_d * (1 - sigma(beta * (rho_i - z)))
                        undesirable w_u * (1 - sigma(beta * (z - rho_i)))
    apo_zero_unpaired:  desirable   w_d * (1 - sigma(beta * rho_i))
                        undesirable w_u * sigma(beta * rho_i)
                        (D'Oosterlinck et al., 2024, "Anchored Preference
                        Optimization", the unpaired form of eq. 7)
    loss = mean_i over the whole batch (B examples, not the sum of the weights)

  ``w_d = desirable_weight``, ``w_u = undesirable_weight``. The reference point is TRL's
  batch-level KL estimate from *mismatched* pairs (each prompt with another example's
  completion; TRL's collator shifts the completions by one within the batch), passed as
  their per-sequence log-probs under the policy and the reference::

    z = max(0, stop_gradient(mean_j (policy_kl_logps_j - reference_kl_logps_j)))

  It carries no gradient (TRL computes it under ``no_grad`` and ``.detach()``\ es it);
  ``apo_zero_unpaired`` has none (``z = 0``, the KL arguments must be None). Under
  ``jit`` with a batch sharded over devices the mean is over the global batch; TRL
  averages the per-process means, the same for equal per-process batch sizes.

  Gradient (``"kto"``): ``d loss / d log pi(y_i) = -(w beta / B) s (1 - s)`` for a
  desirable example (``s = sigma(beta (rho_i - z))``) and ``+(w beta / B) s (1 - s)``
  for an undesirable one (``s = sigma(beta (z - rho_i))``): the sigmoid saturates, so
  examples far from the reference point get little weight.

  Differences from TRL: an empty batch gives 0.0 (TRL: ``nanmean`` of nothing, NaN);
  a NaN loss is not dropped (TRL's ``nanmean`` would silently skip it); ``logits/*`` and
  ``entropy`` (which need the logits) are not computed.

  Metrics (TRL's names; ``stop_gradient``; means over the batch's desirable /
  undesirable examples, 0.0 where it has none, where TRL logs nothing): ``kl`` (``z``),
  ``rewards/chosen`` / ``rewards/rejected`` (``beta * rho``), ``rewards/margins`` (their
  difference, 0.0 unless the batch has both kinds), ``logps/chosen`` /
  ``logps/rejected`` (``log pi``).

  Args:
    policy_logps: ``[B]`` (any shape) per-sequence completion log-probs under the policy,
      e.g. ``sequence_log_probs(logits, labels, shift=True)``.
    reference_logps: as above, under the frozen reference.
    labels: ``policy_logps``-shaped booleans (or 0/1): True for a desirable example.
    policy_kl_logps: per-sequence log-probs of the mismatched KL completions under the
      policy (any shape, usually ``[B]``); required for ``"kto"``.
    reference_kl_logps: the same under the reference, the shape of ``policy_kl_logps``.
    beta: ``> 0``, the inverse temperature.
    loss_type: one of :data:`KTO_LOSS_TYPES`.
    desirable_weight: ``>= 0``, weight of the desirable examples' losses.
    undesirable_weight: ``>= 0``, weight of the undesirable examples' losses.

  Returns:
    ``(loss, metrics)``: a scalar in the compute dtype (float32, float64 for float64
    inputs under x64) and a dict of scalars.
  """
  owner = "kto_loss"
  check_choice(owner, "loss_type", loss_type, KTO_LOSS_TYPES)
  check_real(owner, "beta", beta, lo=0.0, lo_open=True)
  check_real(owner, "desirable_weight", desirable_weight, lo=0.0)
  check_real(owner, "undesirable_weight", undesirable_weight, lo=0.0)
  uses_kl = loss_type == "kto"
  kl_args = {"policy_kl_logps": policy_kl_logps, "reference_kl_logps": reference_kl_logps}
  for name, value in kl_args.items():
    if uses_kl and value is None:
      raise ValueError(f"{owner}: `{name}` is required for loss_type='kto' (the KL "
                       f"reference point)")
    if not uses_kl and value is not None:
      raise ValueError(f"{owner}: `{name}` is not used by loss_type={loss_type!r}; pass "
                       f"None")

  dtype = compute_dtype(policy_logps, reference_logps, policy_kl_logps, reference_kl_logps)
  pi = as_logps(owner, "policy_logps", policy_logps, dtype)
  ref = as_logps(owner, "reference_logps", reference_logps, dtype, shape=pi.shape,
                 like="policy_logps")
  desirable = as_labels(owner, labels, pi.shape)
  if uses_kl:
    pi_kl = as_logps(owner, "policy_kl_logps", policy_kl_logps, dtype)
    ref_kl = as_logps(owner, "reference_kl_logps", reference_kl_logps, dtype,
                      shape=pi_kl.shape, like="policy_kl_logps")
    kl = jnp.maximum(jax.lax.stop_gradient(safe_mean(pi_kl - ref_kl)), 0.0)
  else:
    kl = jnp.zeros((), dtype)

  beta = jnp.asarray(beta, dtype)
  rho = pi - ref
  if loss_type == "kto":
    chosen_losses = 1.0 - jax.nn.sigmoid(beta * (rho - kl))
    rejected_losses = 1.0 - jax.nn.sigmoid(beta * (kl - rho))
  else:  # apo_zero_unpaired
    chosen_losses = 1.0 - jax.nn.sigmoid(beta * rho)
    rejected_losses = jax.nn.sigmoid(beta * rho)
  losses = jnp.where(desirable, jnp.asarray(desirable_weight, dtype) * chosen_losses,
                     jnp.asarray(undesirable_weight, dtype) * rejected_losses)
  metrics = {"kl": kl, **unpaired_metrics(beta * rho, pi, desirable)}
  return safe_mean(losses), metrics
