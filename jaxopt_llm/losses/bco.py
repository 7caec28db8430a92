"""BCO: Binary Classifier Optimization on unpaired desirable / undesirable completions.

``bco_loss`` is the loss of TRL's ``BCOTrainer`` (TRL 1.13.0, the last release with it:
``trl.experimental.bco``; removed in 1.14) as a pure, jit-able function. TRL keeps the
reward shift ``delta`` as a running mean inside the trainer (``RunningMoments``); here it
is explicit caller state: a :class:`BCOState` goes in and the updated one comes out.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm._validation import check_real, is_concrete
from jaxopt_llm.losses._common import compute_dtype
from jaxopt_llm.losses._preference_common import (
    as_labels, as_logps, safe_mean, unpaired_metrics)

# TRL's RunningMoments starts with count = 1e-24 (not 0), so the first update needs no
# special case: it gives mean = the batch mean and var ~= the batch variance.
INITIAL_COUNT = 1e-24
# TRL's density-ratio guard: p / (1 - p + 1e-8).
UDM_EPSILON = 1e-8


class BCOState(NamedTuple):
  """The running moments of the implicit rewards (TRL's ``RunningMoments``).

  ``mean`` is BCO's reward shift ``delta``. TRL also stores ``std = sqrt(var * count /
  (count - 1))``, which no loss reads; it is left out.
  """
  mean: jax.Array   # scalar
  var: jax.Array    # scalar, population variance of all rewards seen
  count: jax.Array  # scalar, number of rewards seen (+ 1e-24)


def bco_init(dtype: Any = jnp.float32) -> BCOState:
  """TRL's fresh ``RunningMoments``: ``mean = 0``, ``var = 1``, ``count = 1e-24``."""
  return BCOState(mean=jnp.zeros((), dtype), var=jnp.ones((), dtype),
                  count=jnp.asarray(INITIAL_COUNT, dtype))


def bco_update(state: BCOState, rewards: jax.typing.ArrayLike) -> BCOState:
  r"""One ``RunningMoments.update``: merges a batch's moments into the running ones.

  With ``n`` the number of ``rewards``, ``m``/``v`` their mean and population variance
  and ``d = m - mean``, ``N = count + n`` (Chan et al.'s parallel-variance merge)::

    mean' = mean + d n / N
    var'  = (var count + d**2 count n / N + v n) / N
    count' = N

  An empty batch leaves the state unchanged (TRL's would turn NaN). No gradient flows
  (TRL updates under ``no_grad``). Computes in at least float32 and returns the state in
  its own dtype, so it can be carried through ``lax.scan``/a jitted loop unchanged.
  """
  owner = "bco_update"
  if not isinstance(state, BCOState):
    raise ValueError(f"{owner}: `state` must be a BCOState (see bco_init), got "
                     f"{type(state).__name__}")
  xs = jnp.asarray(rewards)
  if not jnp.issubdtype(xs.dtype, jnp.floating):
    raise ValueError(f"{owner}: `rewards` must be a floating array, got dtype {xs.dtype}")
  if xs.size == 0:
    return state
  dtype = compute_dtype(xs, state.mean)
  xs = jax.lax.stop_gradient(xs.astype(dtype).reshape(-1))
  mean, var, count = (jnp.asarray(s, dtype) for s in state)
  n = float(xs.size)
  xs_mean = jnp.mean(xs)
  xs_var = jnp.mean(jnp.square(xs - xs_mean))
  delta = xs_mean - mean
  total = count + n
  old_sum = var * count + jnp.square(delta) * count * n / total
  new_sum = xs_var * n
  out = BCOState(mean=mean + delta * n / total, var=(old_sum + new_sum) / total,
                 count=total)
  return BCOState(*(jnp.asarray(o, jnp.asarray(s).dtype) for o, s in zip(out, state)))


def bco_loss(
    policy_logps: jax.typing.ArrayLike,
    reference_logps: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    state: BCOState,
    *,
    beta: float | jax.Array = 0.1,
    update: bool = True,
    desirable_prob: jax.typing.ArrayLike | None = None,
    min_density_ratio: float | jax.Array = 0.5,
    max_density_ratio: float | jax.Array = 10.0,
) -> tuple[jax.Array, dict[str, jax.Array], BCOState]:
  r"""BCO (Jung et al., 2024, "Binary Classifier Optimization for Large Language Model
  Alignment"), as TRL 1.13's ``BCOTrainer.bco_loss`` / ``get_batch_loss_metrics``.

  Each example ``i`` is one completion, desirable (``labels[i]`` True, TRL's "chosen")
  or undesirable. With ``r_i = beta (log pi(y_i) - log ref(y_i))`` (per-sequence
  log-probs: the *sum* over completion tokens, as TRL) and the reward shift ``delta``::

    state'  = bco_update(state, r)   if update   (all B rewards, desirable and not)
            = state                  otherwise   (TRL's do_train=False, evaluation)
    delta   = stop_gradient(state'.mean)          (includes this batch, as in TRL)
    desirable:    -log sigma(r_i - delta)
    undesirable:  -log sigma(-(r_i - delta)) * w_i
    loss    = mean_i over the whole batch

  ``w_i = 1`` unless ``desirable_prob`` is given: then BCO's underlying-distribution
  matching (UDM) weights the undesirable examples by the density ratio of their
  prompts, ``w_i = clip(p_i / (1 - p_i + 1e-8), min_density_ratio,
  max_density_ratio)``, with ``p_i`` the probability that prompt ``i`` comes from the
  desirable set. TRL fits that classifier (a scikit-learn logistic regression on prompt
  embeddings) once, before training; here the caller runs it and passes ``p`` (entries
  of desirable examples are ignored). It carries no gradient.

  Gradient: ``d loss / d log pi(y_i) = -(beta / B) sigma(-(r_i - delta))`` for a
  desirable example, ``+(beta w_i / B) sigma(r_i - delta)`` for an undesirable one
  (``delta`` is held fixed, as in TRL).

  Differences from TRL: an empty batch gives 0.0 and leaves the state as it is (TRL:
  NaN); a NaN loss is not dropped (TRL's ``nanmean``); the state is in float32 (TRL
  accumulates ``mean`` and ``count`` in Python floats); ``logits/*`` are not computed.

  Metrics (TRL's logged names; ``stop_gradient``; 0.0 where the batch has no example of
  a kind, where TRL logs nothing): ``delta``, ``rewards/chosen`` / ``rewards/rejected``
  (mean ``r`` of the desirable / undesirable examples), ``rewards/margins`` (0.0 unless
  the batch has both kinds), ``logps/chosen`` / ``logps/rejected``, and ``count/chosen``
  / ``count/rejected`` (TRL logs sums and counts and divides at logging time; with the
  counts, means over several steps can be weighted the same way).

  Args:
    policy_logps: ``[B]`` (any shape) per-sequence completion log-probs under the policy.
    reference_logps: as above, under the frozen reference.
    labels: ``policy_logps``-shaped booleans (or 0/1): True for a desirable example.
    state: the running moments, :func:`bco_init` at the start of training.
    beta: ``> 0``, the inverse temperature.
    update: update the running moments with this batch's rewards (training) or not.
    desirable_prob: optional ``policy_logps``-shaped UDM classifier probabilities.
    min_density_ratio: ``>= 0``, the lower clip of the density ratio.
    max_density_ratio: ``>= min_density_ratio``, the upper clip.

  Returns:
    ``(loss, metrics, new_state)``: a scalar in the compute dtype (float32, float64 for
    float64 inputs under x64), a dict of scalars and the updated :class:`BCOState`.
  """
  owner = "bco_loss"
  check_real(owner, "beta", beta, lo=0.0, lo_open=True)
  if not isinstance(update, (bool, np.bool_)):  # check_choice would take 1 == True
    raise ValueError(f"{owner}: `update` must be True or False, got {update!r}")
  check_real(owner, "min_density_ratio", min_density_ratio, lo=0.0)
  check_real(owner, "max_density_ratio", max_density_ratio, lo=0.0)
  bounds = (min_density_ratio, max_density_ratio)
  if (all(is_concrete(b) and np.ndim(b) == 0 for b in bounds)
      and float(min_density_ratio) > float(max_density_ratio)):
    raise ValueError(f"{owner}: `min_density_ratio` ({min_density_ratio!r}) must be <= "
                     f"`max_density_ratio` ({max_density_ratio!r})")
  if not isinstance(state, BCOState):
    raise ValueError(f"{owner}: `state` must be a BCOState (see bco_init), got "
                     f"{type(state).__name__}")

  dtype = compute_dtype(policy_logps, reference_logps, desirable_prob)
  pi = as_logps(owner, "policy_logps", policy_logps, dtype)
  ref = as_logps(owner, "reference_logps", reference_logps, dtype, shape=pi.shape,
                 like="policy_logps")
  desirable = as_labels(owner, labels, pi.shape)
  beta = jnp.asarray(beta, dtype)

  rewards = beta * (pi - ref)
  new_state = bco_update(state, rewards) if update else state
  delta = jax.lax.stop_gradient(jnp.asarray(new_state.mean, dtype))
  chosen_losses = -jax.nn.log_sigmoid(rewards - delta)
  rejected_losses = -jax.nn.log_sigmoid(-(rewards - delta))
  if desirable_prob is not None:
    p = jax.lax.stop_gradient(as_logps(owner, "desirable_prob", desirable_prob, dtype,
                                       shape=pi.shape, like="policy_logps"))
    weight = jnp.clip(p / (1.0 - p + UDM_EPSILON), jnp.asarray(min_density_ratio, dtype),
                      jnp.asarray(max_density_ratio, dtype))
    rejected_losses = weight * rejected_losses
  losses = jnp.where(desirable, chosen_losses, rejected_losses)

  metrics = {"delta": delta, **unpaired_metrics(rewards, pi, desirable),
             "count/chosen": jnp.sum(desirable, dtype=dtype),
             "count/rejected": jnp.sum(~desirable, dtype=dtype)}
  return safe_mean(losses), metrics, new_state
