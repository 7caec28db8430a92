"""Tests for jaxopt_llm.losses.orpo: TRL 1.16's ORPOTrainer loss and its log1mexp.

Checked against the written equation (float64 numpy), against a PyTorch re-implementation
of TRL 1.16.0's ``experimental.orpo.ORPOTrainer`` (``log1mexp``, ``odds_ratio_loss``,
``get_batch_loss_metrics``, and ``concatenated_forward`` for the end-to-end recipe from
logits), and on properties: monotonicity, antisymmetry of the log-odds, finiteness at
log-probs of 0 and -1e4, the empty batch, bad arguments.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_llm.losses import causal_lm_loss, orpo_loss, sequence_log_probs
from jaxopt_llm.losses.orpo import log1mexp

METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio",
           "log_odds_chosen"}
IGNORE = -100
# Jitted once per signature: eager jnp ops each compile on their own, which is slow.
_orpo = jax.jit(orpo_loss)


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def _x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.8
  return enable_x64()


def _batch(seed, b=8):
  # Length-averaged log-probs: between -6 and -1e-3, both sides of -log 2.
  rng = np.random.default_rng(seed)
  pc = -np.exp(rng.uniform(np.log(1e-3), np.log(6.0), b)).astype(np.float32)
  pr = -np.exp(rng.uniform(np.log(1e-3), np.log(6.0), b)).astype(np.float32)
  return pc, pr, np.float32(rng.uniform(0.5, 3.0))


# ---------------------------------------------------------------------------------------
# The written equation (float64 numpy).


def _np_log1mexp(x):
  return np.log(-np.expm1(np.asarray(x, np.float64)))


def _np_orpo(pc, pr, nll, beta):
  pc, pr = np.asarray(pc, np.float64), np.asarray(pr, np.float64)
  log_odds = (pc - pr) - (_np_log1mexp(pc) - _np_log1mexp(pr))
  ratio = -np.logaddexp(0.0, -log_odds)
  return float(nll) - beta * ratio.mean(), log_odds, ratio


def test_orpo_matches_written_formula():
  pc, pr, nll = _batch(0)
  loss, m = _orpo(pc, pr, nll, beta=0.25)
  chex.assert_type(loss, jnp.float32)
  chex.assert_shape(loss, ())
  assert set(m) == METRICS
  ref, log_odds, ratio = _np_orpo(pc, pr, nll, 0.25)
  _close(loss, ref)
  _close(m["log_odds_chosen"], log_odds.mean())
  _close(m["log_odds_ratio"], ratio.mean())
  _close(m["nll_loss"], nll)
  _close(m["rewards/chosen"], 0.25 * pc.astype(np.float64).mean())
  _close(m["rewards/margins"], 0.25 * (pc.astype(np.float64) - pr).mean())
  _close(m["rewards/accuracies"], np.mean(pc > pr))


def test_orpo_known_value():
  # p_c = 1/2, p_r = 1/4: odds 1 and 1/3, log-odds ratio log 3, ratio = log(3/4).
  loss, m = _orpo(jnp.log(jnp.asarray([0.5])), jnp.log(jnp.asarray([0.25])),
                      jnp.asarray(2.0), beta=1.0)
  _close(m["log_odds_chosen"], np.log(3.0))
  _close(loss, 2.0 - np.log(0.75))


def test_log1mexp_accuracy_both_branches_and_edges():
  x = -np.concatenate([np.logspace(-7, 2, 200), [np.log(2.0)]]).astype(np.float32)
  edges = np.asarray([0.0, 0.5], np.float32)
  out, g = jax.jit(jax.vmap(jax.value_and_grad(log1mexp)))(np.concatenate([x, edges]))
  _close(out[:-2], _np_log1mexp(x), rtol=1e-5, atol=1e-12)
  x64 = x.astype(np.float64)
  # d/dx = e^x / (e^x - 1); the float32 value underflows to 0 below ~-87.
  _close(g[:-2], np.exp(x64) / np.expm1(x64), rtol=2e-5, atol=1e-37)
  # The branch point itself (a tie in jnp.minimum/maximum would halve the gradient).
  _close(g[-3], -1.0, rtol=1e-6)
  # x = 0 (probability 1): finite, zero gradient; x > 0 (not a log-prob): NaN.
  assert np.isfinite(out[-2]) and float(g[-2]) == 0.0
  assert np.isnan(out[-1])


# ---------------------------------------------------------------------------------------
# TRL 1.16.0 experimental/orpo/orpo_trainer.py, re-implemented in torch.


def _torch_log1mexp(torch, x):
  t = -0.6931471805599453
  return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _torch_trl_orpo(torch, policy_chosen_logps, policy_rejected_logps, policy_nll_loss,
                    beta):
  """ORPOTrainer.odds_ratio_loss + get_batch_loss_metrics (one process)."""
  F = torch.nn.functional
  policy_chosen_logps = policy_chosen_logps.float()
  policy_rejected_logps = policy_rejected_logps.float()
  log_odds = (policy_chosen_logps - policy_rejected_logps) - (
      _torch_log1mexp(torch, policy_chosen_logps)
      - _torch_log1mexp(torch, policy_rejected_logps))
  ratio = F.logsigmoid(log_odds)
  losses = beta * ratio
  chosen_rewards = beta * policy_chosen_logps.detach()
  rejected_rewards = beta * policy_rejected_logps.detach()
  loss = policy_nll_loss - losses.mean()
  reward_accuracies = (chosen_rewards > rejected_rewards).float()
  metrics = {
      "rewards/chosen": chosen_rewards.mean(),
      "rewards/rejected": rejected_rewards.mean(),
      "rewards/accuracies": reward_accuracies.mean(),
      "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
      "logps/rejected": policy_rejected_logps.detach().mean(),
      "logps/chosen": policy_chosen_logps.detach().mean(),
      "nll_loss": policy_nll_loss.detach().mean(),
      "log_odds_ratio": torch.mean(ratio).detach(),
      "log_odds_chosen": torch.mean(log_odds).detach(),
  }
  return loss, {k: v.item() for k, v in metrics.items()}


@jax.jit
def _value_and_grads(pc, pr, nll, beta):
  return jax.value_and_grad(lambda *a: _orpo(*a, beta=beta), argnums=(0, 1, 2),
                            has_aux=True)(pc, pr, nll)


@pytest.mark.parametrize("seed", [1, 2])
def test_orpo_pytorch_trl_parity_values_metrics_and_grads(seed):
  torch = pytest.importorskip("torch")
  pc, pr, nll = _batch(seed)
  ts = [torch.tensor(x, requires_grad=True) for x in (pc, pr, np.asarray(nll))]
  ref_loss, ref_m = _torch_trl_orpo(torch, *ts, beta=0.1)
  ref_loss.backward()
  (loss, m), grads = _value_and_grads(pc, pr, nll, 0.1)
  _close(loss, ref_loss.item(), rtol=1e-6, atol=0)
  for g, t in zip(grads, ts):
    _close(g, t.grad.numpy(), rtol=1e-5, atol=1e-10)
  assert set(m) == set(ref_m)
  for name, value in ref_m.items():
    _close(m[name], value, rtol=1e-5, atol=1e-7)


def _torch_trl_forward(torch, logits, input_ids, attention_mask, labels, n_chosen):
  """ORPOTrainer.concatenated_forward's chosen NLL and get_batch_logps(average=True)."""
  logits_t = torch.tensor(logits)
  nll_labels = torch.where(torch.tensor(attention_mask) == 1, torch.tensor(input_ids), -100)
  shift_logits = logits_t[:n_chosen, :-1, :].reshape(-1, logits.shape[-1])
  nll = torch.nn.CrossEntropyLoss()(shift_logits, nll_labels[:n_chosen, 1:].reshape(-1))
  lab = torch.tensor(labels)[:, 1:].clone()
  lg = logits_t[:, :-1, :]
  mask = lab != -100
  lab = torch.where(lab == -100, 0, lab)
  per_token = torch.gather(lg.log_softmax(-1), 2, lab.unsqueeze(2)).squeeze(2)
  logps = (per_token * mask).sum(-1) / mask.sum(-1)
  return nll, logps[:n_chosen], logps[n_chosen:]


def test_orpo_recipe_from_logits_matches_trl_forward():
  # The docstring's recipe: sequence_log_probs(average=True, shift=True) for the
  # log-probs, causal_lm_loss over the attended chosen tokens for the NLL.
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  b, t, v, prompt = 3, 9, 11, 3
  logits = rng.normal(0.0, 2.0, (2 * b, t, v)).astype(np.float32)
  input_ids = rng.integers(0, v, (2 * b, t)).astype(np.int64)
  attention_mask = np.ones((2 * b, t), np.int64)
  attention_mask[1, -2:] = attention_mask[4, -3:] = 0
  labels = np.where(attention_mask == 1, input_ids, IGNORE)
  labels[:, :prompt] = IGNORE
  nll_t, pc_t, pr_t = _torch_trl_forward(torch, logits, input_ids, attention_mask, labels, b)
  ref_loss, _ = _torch_trl_orpo(torch, pc_t, pr_t, nll_t, beta=0.1)

  @jax.jit
  def recipe(logits, labels, input_ids, attention_mask):
    logps = sequence_log_probs(logits, labels, shift=True, average=True)
    nll = causal_lm_loss(logits[:b], input_ids[:b], where=attention_mask[:b])
    return logps, nll, _orpo(logps[:b], logps[b:], nll)[0]

  logps, nll, loss = recipe(logits, labels, input_ids, attention_mask)
  _close(nll, nll_t.item(), rtol=1e-6, atol=0)
  _close(logps, torch.cat([pc_t, pr_t]).numpy(), rtol=1e-6, atol=0)
  _close(loss, ref_loss.item(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------
# Properties.


@jax.jit
def _loss_and_grads(pc, pr):
  return jax.value_and_grad(lambda a, b: _orpo(a, b, 0.0, beta=1.0), argnums=(0, 1),
                            has_aux=True)(pc, pr)


@settings(max_examples=20, deadline=None)
@given(pc=st.lists(st.floats(-30.0, 0.0, width=32), min_size=4, max_size=4),
       pr=st.lists(st.floats(-30.0, 0.0, width=32), min_size=4, max_size=4))
def test_orpo_properties(pc, pr):
  pc, pr = np.asarray(pc, np.float32), np.asarray(pr, np.float32)
  (loss, m), (gc, gr) = _loss_and_grads(pc, pr)
  assert np.isfinite(loss) and float(loss) >= 0.0  # -log sigma >= 0 with nll = 0
  assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
  # A likelier chosen completion lowers the loss, a likelier rejected one raises it.
  assert np.all(np.asarray(gc) <= 0.0) and np.all(np.asarray(gr) >= 0.0)
  # Swapping chosen and rejected negates the log-odds.
  (_, m_swapped), _ = _loss_and_grads(pr, pc)
  _close(m_swapped["log_odds_chosen"], -m["log_odds_chosen"], rtol=1e-5, atol=1e-4)
  inner = (pc < -1e-6) & (pr < -1e-6)  # away from the clamped l = 0 (exact: -inf)
  if inner.all():
    _, log_odds, _ = _np_orpo(pc, pr, 0.0, 1.0)
    _close(m["log_odds_chosen"], log_odds.mean(), rtol=1e-5, atol=1e-4)


def test_orpo_equal_logps_give_log_half():
  pc = jnp.asarray([-0.1, -1.0, -5.0])
  _, m = _orpo(pc, pc, 0.0)
  _close(m["log_odds_chosen"], 0.0, atol=0)
  _close(m["log_odds_ratio"], -np.log(2.0), rtol=1e-6)
  assert float(m["rewards/accuracies"]) == 0.0  # ties count as wrong


def test_orpo_finite_at_zero_and_huge_logps():
  # l = 0 (an empty completion's floored average, or probability 1), l = -1e4.
  vals = jnp.asarray([0.0, -1e4, -1e-30, -5e3, -0.5, 0.0], jnp.float32)
  other = jnp.asarray([-1e4, 0.0, -1e4, 0.0, -1e4, 0.0], jnp.float32)
  for a, b in [(vals, other), (other, vals)]:
    (loss, m), grads = _loss_and_grads(a, b)
    assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values())
    for g in grads:
      assert np.all(np.isfinite(g))


def test_orpo_empty_batch_gives_the_nll():
  e = jnp.zeros((0,), jnp.float32)
  (loss, m), grads = jax.value_and_grad(lambda a: _orpo(a, e, 1.5), has_aux=True)(e)
  assert float(loss) == 1.5 and grads.shape == (0,)
  assert all(np.isfinite(v) for v in m.values())


def test_orpo_dtypes():
  pc, pr, nll = _batch(4)
  loss, m = _orpo(jnp.asarray(pc, jnp.bfloat16), jnp.asarray(pr, jnp.bfloat16), nll)
  chex.assert_type([loss, *m.values()], jnp.float32)
  with _x64():
    loss, m = _orpo(jnp.asarray(pc, jnp.float64), jnp.asarray(pr, jnp.float64),
                        jnp.asarray(nll, jnp.float64), beta=0.1)
    chex.assert_type([loss, *m.values()], jnp.float64)
    _close(loss, _np_orpo(pc, pr, nll, 0.1)[0], rtol=1e-12, atol=0)


def test_orpo_bad_arguments():
  pc, pr, nll = _batch(5)
  with pytest.raises(ValueError, match="beta"):
    orpo_loss(pc, pr, nll, beta=-0.1)
  with pytest.raises(TypeError, match="beta"):
    orpo_loss(pc, pr, nll, beta="0.1")
  with pytest.raises(ValueError, match="policy_rejected_logps"):
    orpo_loss(pc, pr[:3], nll)
  with pytest.raises(ValueError, match="nll_loss"):
    orpo_loss(pc, pr, jnp.ones(3))
  with pytest.raises(ValueError, match="nll_loss"):
    orpo_loss(pc, pr, 1)
  with pytest.raises(ValueError, match="policy_chosen_logps"):
    orpo_loss(np.arange(8), pr, nll)


def test_orpo_vmaps_over_batches():
  batches = [_batch(s) for s in (6, 7, 8)]
  stacked = [np.stack(x) for x in zip(*batches)]
  losses, ms = jax.jit(jax.vmap(orpo_loss))(*stacked)
  for k, b in enumerate(batches):
    loss, m = _orpo(*b)
    _close(losses[k], loss, rtol=1e-6, atol=0)
    _close(ms["log_odds_chosen"][k], m["log_odds_chosen"], rtol=1e-6, atol=0)
