"""Tests for jaxopt_llm.losses.preference: sequence log-probs and the DPO family.

Each loss type is checked against its written formula (float64 numpy), against a PyTorch
re-implementation of TRL's ``DPOTrainer.dpo_loss`` / ``CPOTrainer`` SimPO (values and
gradients), and on properties: the DPO gradient weight, finiteness at +-1e4 log-ratio
gaps, metrics under stop_gradient.
"""
import importlib.util
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_llm.losses import causal_lm_loss, dpo_loss, sequence_log_probs
from jaxopt_llm.losses.preference import LOSS_TYPES

IGNORE = -100
SMOOTHED = ("sigmoid", "robust", "exo_pair", "simpo")


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(jnp.asarray(actual), jnp.asarray(expected, jnp.float32),
                              rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# sequence_log_probs


def _np_seq_logps(logits, labels, *, average=False, shift=False, where=None):
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels)
  w = None if where is None else np.asarray(where, bool)
  if shift:
    z, y = z[..., :-1, :], y[..., 1:]
    w = None if w is None else w[..., 1:]
  m = z.max(-1, keepdims=True)
  logp = z - (np.log(np.exp(z - m).sum(-1, keepdims=True)) + m)
  valid = y != IGNORE
  if w is not None:
    valid &= w
  tok = np.take_along_axis(logp, np.where(valid, y, 0)[..., None], -1)[..., 0]
  tok = np.where(valid, tok, 0.0)
  total = tok.sum(-1)
  return total / np.maximum(valid.sum(-1), 1) if average else total


def _lm_batch(seed, batch=4, length=7, vocab=13, n_ignored=4):
  rng = np.random.default_rng(seed)
  logits = (2.0 * rng.standard_normal((batch, length, vocab))).astype(np.float32)
  labels = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  flat = labels.reshape(-1)
  flat[rng.choice(flat.size, size=n_ignored, replace=False)] = IGNORE
  return jnp.asarray(logits), jnp.asarray(labels)


@jax.jit
def _all_seq_logps(logits, labels, where):
  # Every (average, shift, where) variant in one program: one compilation.
  return {(average, shift, w is None): sequence_log_probs(
      logits, labels, average=average, shift=shift, where=w)
      for average in (False, True) for shift in (False, True) for w in (None, where)}


def test_sequence_log_probs_matches_equation():
  logits, labels = _lm_batch(0)
  where = np.random.default_rng(1).random(labels.shape) < 0.7
  for (average, shift, no_where), out in _all_seq_logps(logits, labels, where).items():
    w = None if no_where else where
    chex.assert_type(out, jnp.float32)
    chex.assert_shape(out, (4,))
    _close(out, _np_seq_logps(logits, labels, average=average, shift=shift, where=w))
  # Eager (labels concrete: validated on the host) gives the same.
  out = sequence_log_probs(logits, labels, average=True, shift=True, where=where)
  _close(out, _np_seq_logps(logits, labels, average=True, shift=True, where=where))


def test_sequence_log_probs_is_consistent_with_causal_lm_loss():
  # Summed over sequences, shifted log-probs are minus causal_lm_loss's "sum".
  logits, labels = _lm_batch(2)
  total = jnp.sum(sequence_log_probs(logits, labels, shift=True))
  _close(-total, causal_lm_loss(logits, labels, reduction="sum"))


def test_sequence_log_probs_extra_batch_dims_and_bf16():
  logits, labels = _lm_batch(3)
  logits4 = logits.reshape(2, 2, *logits.shape[1:])
  labels4 = labels.reshape(2, 2, -1)
  out = sequence_log_probs(logits4.astype(jnp.bfloat16), labels4, average=True)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, (2, 2))
  ref = _np_seq_logps(logits4.astype(jnp.bfloat16).astype(jnp.float32), labels4,
                      average=True)
  _close(out, ref)


def test_sequence_log_probs_fully_masked_is_zero_with_zero_grad():
  logits, labels = _lm_batch(4)
  labels = labels.at[1].set(IGNORE)
  logits = logits.at[1].set(jnp.nan)  # ignored rows' logits never leak
  for average in (False, True):
    fn = lambda z: jnp.sum(sequence_log_probs(z, labels, average=average))  # noqa: E731
    out = sequence_log_probs(logits, labels, average=average)
    assert float(out[1]) == 0.0
    g = jax.jit(jax.grad(fn))(logits)
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g[1]) == 0.0)


def test_sequence_log_probs_pytorch_parity_trl_get_batch_logps():
  torch = pytest.importorskip("torch")
  logits, labels = _lm_batch(5)
  for average in (False, True):
    # TRL's get_batch_logps: shift, mask by label_pad_token_id, gather log_softmax.
    z = torch.tensor(np.asarray(logits), requires_grad=True)
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    y_s, z_s = y[:, 1:].clone(), z[:, :-1, :]
    mask = y_s != IGNORE
    y_s[~mask] = 0
    per_tok = torch.gather(z_s.log_softmax(-1), 2, y_s.unsqueeze(2)).squeeze(2)
    ref = (per_tok * mask).sum(-1)
    if average:
      ref = ref / mask.sum(-1)
    cot = torch.arange(1.0, 5.0)
    (ref * cot).sum().backward()

    fn = lambda z_: sequence_log_probs(z_, labels, average=average, shift=True)  # noqa
    out = jax.jit(fn)(logits)
    g = jax.jit(lambda z, c: jax.vjp(fn, z)[1](c)[0])(logits, jnp.arange(1.0, 5.0))
    _close(out, ref.detach().numpy())
    _close(g, z.grad.numpy())


def test_sequence_log_probs_bad_input():
  logits, labels = _lm_batch(6)
  with pytest.raises(ValueError, match="labels"):
    sequence_log_probs(logits, labels.at[0, 0].set(99))
  with pytest.raises(ValueError, match="labels"):
    sequence_log_probs(logits, labels[:, :-1])
  with pytest.raises(ValueError, match="logits"):
    sequence_log_probs(logits[0, 0], labels[0, 0])
  with pytest.raises(ValueError, match="average"):
    sequence_log_probs(logits, labels, average="yes")
  with pytest.raises(ValueError, match="where"):
    sequence_log_probs(logits, labels, where=np.ones((4, 5), bool))
  # Under jit a bad label cannot raise: it gives NaN, never a silently finite value.
  out = jax.jit(sequence_log_probs)(logits, labels.at[0, 0].set(99))
  assert np.isnan(out[0]) and np.all(np.isfinite(out[1:]))


# ---------------------------------------------------------------------------------------
# dpo_loss: the formulas written out (float64 numpy).


def _ls(z):
  return -np.logaddexp(0.0, -z)


def _sig(z):
  return 0.5 * (1.0 + np.tanh(0.5 * z))


def _np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, reference_free=False, gamma=0.5):
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  if reference_free or loss_type == "simpo":
    rc, rr = np.zeros_like(rc), np.zeros_like(rr)
  rho_c, rho_r = pc - rc, pr - rr
  h = rho_c - rho_r
  z = beta * h
  if loss_type == "sigmoid":
    losses = -(1 - eps) * _ls(z) - eps * _ls(-z)
  elif loss_type == "robust":
    losses = (-(1 - eps) * _ls(z) + eps * _ls(-z)) / (1 - 2 * eps)
  elif loss_type == "hinge":
    losses = np.maximum(0.0, 1 - z)
  elif loss_type == "ipo":
    losses = (h - 1 / (2 * beta)) ** 2
  elif loss_type == "exo_pair":
    e = eps or 1e-3
    losses = _sig(z) * (_ls(z) - np.log(1 - e)) + _sig(-z) * (_ls(-z) - np.log(e))
  elif loss_type == "nca_pair":
    losses = -_ls(beta * rho_c) - 0.5 * _ls(-beta * rho_c) - 0.5 * _ls(-beta * rho_r)
  elif loss_type == "apo_zero":
    losses = 1 - _sig(beta * rho_c) + _sig(beta * rho_r)
  elif loss_type == "apo_down":
    losses = _sig(beta * rho_c) + 1 - _sig(z)
  elif loss_type == "sppo_hard":
    losses = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
  elif loss_type == "simpo":
    g = z - gamma
    losses = -(1 - eps) * _ls(g) - eps * _ls(-g)
  else:
    raise AssertionError(loss_type)
  cr, rj = beta * rho_c, beta * rho_r
  metrics = {"chosen_rewards": cr.mean(), "rejected_rewards": rj.mean(),
             "reward_accuracy": (cr > rj).mean(), "reward_margin": (cr - rj).mean()}
  return losses, metrics


def _logps(seed, batch=6, scale=20.0):
  rng = np.random.default_rng(seed)
  # Sequence log-probs are negative and of order tens; the policy is near the reference.
  rc = -scale * rng.random(batch) - 1.0
  rr = -scale * rng.random(batch) - 1.0
  pc = rc + 3.0 * rng.standard_normal(batch)
  pr = rr + 3.0 * rng.standard_normal(batch)
  return tuple(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr))


def _eps_for(loss_type):
  return 0.1 if loss_type in SMOOTHED else 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_matches_written_formula(loss_type):
  pc, pr, rc, rr = _logps(0)
  for eps in {0.0, _eps_for(loss_type)}:
    for beta in (0.1, 0.5):
      ref_losses, ref_metrics = _np_dpo(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                        eps=eps)
      loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                               label_smoothing=eps)
      chex.assert_type(loss, jnp.float32)
      chex.assert_shape(loss, ())
      _close(loss, ref_losses.mean())
      none, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                         label_smoothing=eps, reduction="none")
      chex.assert_shape(none, (6,))
      _close(none, ref_losses)
      total, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                          label_smoothing=eps, reduction="sum")
      _close(total, ref_losses.sum())
      if loss_type != "simpo":
        assert set(metrics) == set(ref_metrics)
        for k in metrics:
          chex.assert_shape(metrics[k], ())
          _close(metrics[k], ref_metrics[k])


def test_dpo_known_values():
  # At h = 0 DPO is log 2 whatever beta; IPO is 1 / (4 beta^2); hinge is 1.
  z = jnp.zeros(4)
  assert float(dpo_loss(z, z, z, z, beta=0.3)[0]) == pytest.approx(math.log(2), rel=1e-6)
  assert float(dpo_loss(z, z, z, z, beta=0.5, loss_type="ipo")[0]) == pytest.approx(1.0)
  assert float(dpo_loss(z, z, z, z, loss_type="hinge")[0]) == pytest.approx(1.0)
  loss, m = dpo_loss(z, z, z, z)
  # policy == reference: rewards 0 and a tie counts as wrong (TRL's strict >).
  assert float(m["reward_accuracy"]) == 0.0 and float(m["reward_margin"]) == 0.0


# ---------------------------------------------------------------------------------------
# dpo_loss vs a PyTorch re-implementation of TRL's formulas.


def _torch_trl(torch, pc, pr, rc, rr, *, beta, loss_type, eps, reference_free, gamma):
  """TRL DPOTrainer.dpo_loss (and CPOTrainer simpo), re-written here in torch."""
  F = torch.nn.functional
  if loss_type == "simpo":
    logits = (pc - pr) - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    return losses.mean()
  if reference_free:
    rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
  chosen_lr, rejected_lr = pc - rc, pr - rr
  logits = (pc - pr) - (rc - rr)
  if loss_type == "sigmoid":
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
  elif loss_type == "robust":
    losses = (-F.logsigmoid(beta * logits) * (1 - eps)
              + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
  elif loss_type == "exo_pair":
    e = eps if eps != 0 else 1e-3
    losses = (beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - e)) + (
        -beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(e))
  elif loss_type == "hinge":
    losses = torch.relu(1 - beta * logits)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  elif loss_type == "sppo_hard":
    losses = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
  elif loss_type == "nca_pair":
    cr, rj = chosen_lr * beta, rejected_lr * beta
    losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rj)
  elif loss_type == "apo_zero":
    losses = (1 - F.sigmoid(beta * chosen_lr)) + F.sigmoid(beta * rejected_lr)
  elif loss_type == "apo_down":
    losses = F.sigmoid(beta * chosen_lr) + (1 - F.sigmoid(beta * (chosen_lr - rejected_lr)))
  else:
    raise AssertionError(loss_type)
  return losses.mean()


def _all_types_value_and_grads(beta, gamma, reference_free):
  """One jitted program for every loss type (one compilation instead of ten)."""
  def all_types(*x):
    return {lt: jax.value_and_grad(
        lambda *x: dpo_loss(*x, beta=beta, loss_type=lt, label_smoothing=_eps_for(lt),
                            reference_free=reference_free, simpo_gamma=gamma)[0],
        argnums=(0, 1, 2, 3))(*x) for lt in LOSS_TYPES}
  return jax.jit(all_types)


@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_pytorch_trl_parity_values_and_grads(reference_free):
  torch = pytest.importorskip("torch")
  pc, pr, rc, rr = _logps(1)
  beta, gamma = 0.2, 0.7
  ours = _all_types_value_and_grads(beta, gamma, reference_free)(pc, pr, rc, rr)
  for loss_type in LOSS_TYPES:
    ts = [torch.tensor(np.asarray(x), requires_grad=True) for x in (pc, pr, rc, rr)]
    ref = _torch_trl(torch, *ts, beta=beta, loss_type=loss_type,
                     eps=_eps_for(loss_type), reference_free=reference_free, gamma=gamma)
    ref.backward()
    loss, grads = ours[loss_type]
    _close(loss, ref.item(), rtol=2e-6)
    for g, t in zip(grads, ts):
      _close(g, np.zeros(6) if t.grad is None else t.grad.numpy(), rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Gradients and properties.


def test_dpo_gradient_weight_is_beta_sigmoid_of_reward_gap():
  # L = -mean_i log sigma(r_c^i - r_r^i), r = beta * (log pi - log ref); so
  # dL/d log pi(y_c^i) = -(beta / B) * sigma(r_r^i - r_c^i) and the opposite for
  # log pi(y_r^i); each reference log-prob enters with the opposite sign of its policy's.
  pc, pr, rc, rr = _logps(2)
  beta = 0.25
  grads = jax.jit(jax.grad(lambda *x: dpo_loss(*x, beta=beta)[0], argnums=(0, 1, 2, 3)))(
      pc, pr, rc, rr)
  r_c = beta * (np.asarray(pc, np.float64) - np.asarray(rc))
  r_r = beta * (np.asarray(pr, np.float64) - np.asarray(rr))
  weight = beta * _sig(r_r - r_c) / 6
  _close(grads[0], -weight)
  _close(grads[1], weight)
  _close(grads[2], weight)
  _close(grads[3], -weight)
  # A wrongly ranked pair gets a larger weight than a correctly ranked one.
  order = np.argsort(r_c - r_r)
  assert np.all(np.diff(-np.asarray(grads[0])[order]) <= 0)


def test_dpo_finite_at_huge_log_ratio_gaps():
  big = jnp.asarray([1e4, -1e4, 0.0, 5e3, -5e3, 1.0], jnp.float32)
  zero = jnp.zeros(6)
  fn = _all_types_value_and_grads(0.1, 0.5, False)
  for args in [(big, zero, zero, zero), (zero, big, zero, zero), (zero, zero, big, -big),
               (big, -big, zero, zero)]:
    for loss_type, (loss, grads) in fn(*args).items():
      assert np.isfinite(loss), (loss_type, args)
      for g in grads:
        assert np.all(np.isfinite(g)), (loss_type, args, g)
      ref, _ = _np_dpo(*args, beta=0.1, loss_type=loss_type, eps=_eps_for(loss_type))
      _close(loss, ref.mean(), rtol=1e-5)


@jax.jit
def _sigmoid_losses_and_grads(h, beta):
  z = jnp.zeros_like(h)
  out = {}
  for eps in (0.0, 0.1, 0.3):
    fn = lambda x: dpo_loss(x, z, z, z, beta=beta, label_smoothing=eps,  # noqa: E731
                            reduction="none")
    losses, m = fn(h)
    grads = jax.grad(lambda x: jnp.mean(fn(x)[0]))(h)
    out[eps] = (losses, m, grads)
  return out


def _check_sigmoid_properties(h, beta, eps, losses, m, grads):
  h = np.asarray(h, np.float64)
  assert np.all(np.isfinite(losses)) and np.all(np.asarray(losses) >= 0)
  assert np.all(np.isfinite(grads))
  # cDPO is the CE against the soft label 1 - eps, so the loss falls in h up to
  # beta * h = log((1 - eps) / eps) and rises after (plain DPO: falls everywhere).
  z_star = np.inf if eps == 0.0 else math.log((1 - eps) / eps)
  z = beta * h
  far = np.abs(z - z_star) > 1e-3
  g = np.asarray(grads)
  assert np.all(g[far & (z < z_star)] <= 0) and np.all(g[far & (z > z_star)] >= 0)
  _close(m["reward_margin"], beta * np.mean(h), rtol=1e-5, atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(h=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=6,
                  max_size=6),
       beta=st.floats(0.01, 2.0))
def test_dpo_sigmoid_properties(h, beta):
  h = jnp.asarray(h, jnp.float32)
  for eps, (losses, m, grads) in _sigmoid_losses_and_grads(h, beta).items():
    _check_sigmoid_properties(h, beta, eps, losses, m, grads)


def test_metrics_are_stop_gradient():
  pc, pr, rc, rr = _logps(3)
  jac = jax.jit(jax.jacrev(lambda *x: dpo_loss(*x)[1], argnums=(0, 1, 2, 3)))(
      pc, pr, rc, rr)
  assert set(jac) == {"chosen_rewards", "rejected_rewards", "reward_accuracy",
                      "reward_margin"}
  for name, g in jac.items():
    for gi in g:
      assert np.all(np.asarray(gi) == 0.0), name


def test_reference_free_and_simpo_need_no_reference():
  pc, pr, rc, rr = _logps(4)
  z = jnp.zeros_like(pc)
  a = dpo_loss(pc, pr, None, None, reference_free=True)
  b = dpo_loss(pc, pr, z, z)
  c = dpo_loss(pc, pr, rc, rr, reference_free=True)
  chex.assert_trees_all_close(a, b, c)
  # SimPO with gamma = 0 is reference-free DPO (on length-averaged log-probs).
  s = dpo_loss(pc, pr, loss_type="simpo", simpo_gamma=0.0, beta=2.0)
  chex.assert_trees_all_close(s, dpo_loss(pc, pr, z, z, beta=2.0))
  # A positive margin gamma raises the loss.
  s1 = dpo_loss(pc, pr, loss_type="simpo", simpo_gamma=1.0, beta=2.0)
  assert float(s1[0]) > float(s[0])


def test_dpo_end_to_end_from_logits_and_under_jit():
  # Policy/ref logits -> sequence_log_probs -> dpo_loss, jitted with a traced beta.
  rng = np.random.default_rng(5)
  B, T, V = 4, 6, 9
  pol = jnp.asarray(rng.standard_normal((2 * B, T, V)), jnp.float32)
  ref = jnp.asarray(rng.standard_normal((2 * B, T, V)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, V, (2 * B, T)), jnp.int32)
  labels = ids.at[:, :2].set(IGNORE)  # the prompt does not count

  @jax.jit
  def step(pol, beta):
    def loss_fn(pol):
      lp = sequence_log_probs(pol, labels, shift=True)
      lr = sequence_log_probs(ref, labels, shift=True)
      return dpo_loss(lp[:B], lp[B:], lr[:B], lr[B:], beta=beta)
    return jax.value_and_grad(loss_fn, has_aux=True)(pol)

  (loss, m), g = step(pol, 0.1)
  lp = _np_seq_logps(pol, labels, shift=True)
  lr = _np_seq_logps(ref, labels, shift=True)
  ref_losses, ref_m = _np_dpo(lp[:B], lp[B:], lr[:B], lr[B:], beta=0.1, loss_type="sigmoid")
  _close(loss, ref_losses.mean())
  _close(m["reward_accuracy"], ref_m["reward_accuracy"])
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  # Position 0 predicts prompt token 1 (ignored); the last position predicts nothing.
  assert np.all(np.asarray(g[:, 0]) == 0.0) and np.all(np.asarray(g[:, -1]) == 0.0)


def test_dpo_empty_batch_is_zero_not_nan():
  e = jnp.zeros((0,))
  loss, m = dpo_loss(e, e, e, e)
  assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values())


def test_dpo_bad_arguments():
  pc, pr, rc, rr = _logps(6)
  with pytest.raises(ValueError, match="loss_type"):
    dpo_loss(pc, pr, rc, rr, loss_type="kto")
  for beta in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="beta"):
      dpo_loss(pc, pr, rc, rr, beta=beta)
  for eps in (-0.1, 0.6):
    with pytest.raises(ValueError, match="label_smoothing"):
      dpo_loss(pc, pr, rc, rr, label_smoothing=eps)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=0.1)
  with pytest.raises(ValueError, match="reference_chosen_logps"):
    dpo_loss(pc, pr, None, rr)
  with pytest.raises(ValueError, match="policy_rejected_logps"):
    dpo_loss(pc, pr[:3], rc, rr)
  with pytest.raises(ValueError, match="reference_rejected_logps"):
    dpo_loss(pc, pr, rc, rr.astype(jnp.int32))
  with pytest.raises(ValueError, match="reduction"):
    dpo_loss(pc, pr, rc, rr, reduction="avg")
  with pytest.raises(ValueError, match="label_smoothing"):
    jax.jit(lambda e: dpo_loss(pc, pr, rc, rr, label_smoothing=e))(0.1)


def test_dpo_toy_example_learns_the_preference(capsys):
  path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "dpo_toy.py"
  spec = importlib.util.spec_from_file_location("dpo_toy_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  h = module.main(["--steps", "20", "--sft-steps", "60", "--eval-every", "20"])
  # Step 0: policy == reference, every reward 0 (a tie is not a win).
  assert h["reward_accuracy"][0] == 0.0 and h["loss"][0] == pytest.approx(math.log(2))
  assert h["reward_accuracy"][-1] >= 0.9 and h["loss"][-1] < 0.6
  assert h["reward_margin"][-1] > 0.0
  assert "reward accuracy" in capsys.readouterr().out
