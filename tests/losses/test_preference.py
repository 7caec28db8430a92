"""Tests for jaxopt_llm.losses.preference: log-probs and the DPO family (TRL 1.16 and 0.19).

``dpo_loss`` is checked three ways: against its written formulas (float64 numpy), against
PyTorch re-implementations of TRL's code written here from TRL's source (TRL 1.16.0
``DPOTrainer._compute_loss`` for the default ``semantics="trl1"``; TRL 0.19.1
``DPOTrainer.dpo_loss`` and ``RunningMoments`` for ``semantics="trl0"``): loss, metrics and
gradients w.r.t. the policy log-probs; and on properties (batch-order invariances,
limits, finiteness at +-1e4 log-ratio gaps, empty completions, bad arguments).
"""
import functools
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
from jaxopt_llm.losses.preference import (
    F_DIVERGENCE_LOSS_TYPES, LOSS_TYPES, TRL0_LOSS_TYPES, f_divergence_scores,
    log_sum_squared_probs, per_token_log_probs)
from jaxopt_llm.losses.bco import BCOState, bco_init

IGNORE = -100


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(jnp.asarray(actual), jnp.asarray(expected, jnp.float32),
                              rtol=rtol, atol=atol)


def _as_good_as_reference(ours, ref32, ref64, rtol=1e-5, atol=1e-7):
  """fp32 <= rtol from the fp32 reference, or no further from its float64 run than it.

  The second branch is the rule for values where fp32 rounding of the reference itself is
  the gap (saturated sigmoids, cancellations): ours may not be worse than TRL's own fp32.
  """
  ours, ref32, ref64 = (np.asarray(x, np.float64) for x in (ours, ref32, ref64))
  assert ours.shape == ref32.shape == ref64.shape
  scale = max(float(np.max(np.abs(ref64), initial=0.0)), 1e-30)
  close = np.abs(ours - ref32) <= atol + rtol * np.abs(ref32)
  as_good = np.abs(ours - ref64) <= np.abs(ref32 - ref64) + 1e-7 * scale
  assert np.all(close | as_good), (ours, ref32, ref64)


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

  @jax.jit
  def values_and_grads(z):  # both averages in one program
    return {average: jax.value_and_grad(
        lambda z: jnp.sum(sequence_log_probs(z, labels, average=average)[1]),  # noqa: B023
        )(z) for average in (False, True)}

  for average, (row, g) in values_and_grads(logits).items():
    assert float(row) == 0.0
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g[1]) == 0.0)
  # Eager (labels concrete) too.
  assert float(sequence_log_probs(logits, labels, average=True)[1]) == 0.0


def test_sequence_log_probs_pytorch_parity_trl_get_batch_logps():
  torch = pytest.importorskip("torch")
  logits, labels = _lm_batch(5)

  @jax.jit
  def values_and_vjps(z, c):  # both averages in one program
    out = {}
    for average in (False, True):
      fn = lambda z_: sequence_log_probs(z_, labels, average=average, shift=True)  # noqa
      value, vjp = jax.vjp(fn, z)
      out[average] = (value, vjp(c)[0])
    return out

  ours = values_and_vjps(logits, jnp.arange(1.0, 5.0))
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

    out, g = ours[average]
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


def test_per_token_log_probs_matches_equation_and_sums_to_sequence_log_probs():
  logits, labels = _lm_batch(7)
  where = np.random.default_rng(8).random(labels.shape) < 0.8
  lp, mask = jax.jit(lambda z, y, w: per_token_log_probs(z, y, shift=True, where=w))(
      logits, labels, where)
  chex.assert_shape((lp, mask), (4, 6))
  chex.assert_type((lp, mask), (jnp.float32, jnp.bool_))
  z = np.asarray(logits, np.float64)[:, :-1]
  y = np.asarray(labels)[:, 1:]
  want_mask = (y != IGNORE) & where[:, 1:]
  logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
      -1, keepdims=True)
  want = np.where(want_mask, np.take_along_axis(logp, np.where(want_mask, y, 0)[..., None],
                                                -1)[..., 0], 0.0)
  np.testing.assert_array_equal(mask, want_mask)
  _close(lp, want)
  _close(jnp.sum(lp, -1), sequence_log_probs(logits, labels, shift=True, where=where))


def test_log_sum_squared_probs_matches_equation_and_trl_kernel_formula():
  torch = pytest.importorskip("torch")
  logits, _ = _lm_batch(9)
  out = log_sum_squared_probs(logits)
  chex.assert_shape(out, (4, 7))
  p = np.exp(np.asarray(logits, np.float64))
  p /= p.sum(-1, keepdims=True)
  _close(out, np.log((p ** 2).sum(-1)))
  # TRL 1.16 kernels/chunked_logprob.py: log(sq_sum_exp) - 2 log(sum_exp), both taken
  # relative to the running max.
  z = torch.tensor(np.asarray(logits))
  m = z.max(-1, keepdim=True).values
  ref = torch.log(torch.exp(2 * (z - m)).sum(-1)) - 2 * torch.log(torch.exp(z - m).sum(-1))
  _close(out, ref.numpy())
  chex.assert_type(log_sum_squared_probs(logits.astype(jnp.bfloat16)), jnp.float32)
  with pytest.raises(ValueError, match="logits"):
    log_sum_squared_probs(jnp.ones((3, 4), jnp.int32))


# ---------------------------------------------------------------------------------------
# dpo_loss, TRL 1.16 semantics (the default).


def _torch_trl116(torch, per_token_logps, ref_per_token_logps, completion_mask, *,
                  loss_types, loss_weights=None, beta, label_smoothing=0.0,
                  f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                  ld_alpha=None, use_weighting=False, log_sum_sq_probs=None,
                  discopop_tau=0.05, ref_logps=None):
  """TRL 1.16.0 ``DPOTrainer._compute_loss`` from the per-token log-probs on, in torch.

  ``per_token_logps`` / ``ref_per_token_logps`` / ``log_sum_sq_probs`` are the fused LM
  head's ``[2B, T - 1]`` outputs (batch ``[chosen; rejected]``, zero where the label is
  -100); ``completion_mask`` is the collator's unshifted ``[2B, T]`` mask; ``ref_logps``
  replaces the reference forward by precomputed ``(ref_chosen, ref_rejected)``. Returns
  ``(loss, metrics)``.
  """
  F = torch.nn.functional
  shift_completion_mask = completion_mask[..., 1:]
  if ld_alpha is None:
    logps = per_token_logps.sum(dim=1)
  else:
    comp_pos = shift_completion_mask.cumsum(dim=1)
    comp_lens = shift_completion_mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    shared_logps = (per_token_logps * shared_mask).sum(dim=1)
    tail_logps = (per_token_logps * tail_mask).sum(dim=1)
    logps = shared_logps + ld_alpha * tail_logps
  chosen_logps, rejected_logps = logps.chunk(2, dim=0)
  if ref_logps is not None:
    ref_chosen_logps, ref_rejected_logps = ref_logps
  else:
    if ld_alpha is None:
      ref = ref_per_token_logps.sum(dim=1)
    else:
      ref = ((ref_per_token_logps * shared_mask).sum(dim=1)
             + ld_alpha * (ref_per_token_logps * tail_mask).sum(dim=1))
    ref_chosen_logps, ref_rejected_logps = ref.chunk(2, dim=0)

  chosen_logratios = chosen_logps - ref_chosen_logps
  rejected_logratios = rejected_logps - ref_rejected_logps
  if f_divergence_type == "reverse_kl":
    chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
  elif f_divergence_type == "forward_kl":
    chosen_scores = 1 - torch.exp(-chosen_logratios)
    rejected_scores = 1 - torch.exp(-rejected_logratios)
  elif f_divergence_type == "js_divergence":
    chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
    rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
  else:
    a = f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:
      chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    else:
      coef = 1.0 / (a - 1.0)
      t_c = torch.clamp((a - 1.0) * chosen_logratios, max=80.0)
      t_r = torch.clamp((a - 1.0) * rejected_logratios, max=80.0)
      chosen_scores = (torch.exp(t_c) - 1.0) * coef
      rejected_scores = (torch.exp(t_r) - 1.0) * coef
  delta_score = chosen_scores - rejected_scores

  eps = label_smoothing
  loss = 0.0
  for loss_type, loss_weight in zip(loss_types, loss_weights or [1.0] * len(loss_types)):
    if loss_type == "sigmoid":
      per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
      per_sequence_loss = torch.relu(1 - beta * delta_score)
    elif loss_type in ("ipo", "sigmoid_norm"):
      chosen_mask, rejected_mask = completion_mask.chunk(2, dim=0)
      chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)
      rejected_avg_score = rejected_scores / rejected_mask.sum(dim=1).clamp(min=1.0)
      d = chosen_avg_score - rejected_avg_score
      per_sequence_loss = ((d - 1 / (2 * beta)) ** 2 if loss_type == "ipo"
                           else -F.logsigmoid(beta * d))
    elif loss_type == "exo_pair":
      epsilon = torch.tensor(eps, dtype=delta_score.dtype)
      qw = torch.sigmoid(beta * delta_score)
      log_qw = F.logsigmoid(beta * delta_score)
      log_pw = torch.log1p(-epsilon)
      ql = torch.sigmoid(-beta * delta_score)
      log_ql = F.logsigmoid(-beta * delta_score)
      log_pl = torch.log(epsilon)
      per_sequence_loss = qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
    elif loss_type == "nca_pair":
      cr, rr = beta * chosen_logratios, beta * rejected_logratios
      per_sequence_loss = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    elif loss_type == "robust":
      clean = -(1 - eps) * F.logsigmoid(beta * delta_score)
      flipped = -eps * F.logsigmoid(-beta * delta_score)
      per_sequence_loss = (clean - flipped) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
      per_sequence_loss = (-F.logsigmoid(beta * chosen_logratios)
                           - F.logsigmoid(-beta * rejected_logratios))
    elif loss_type == "sppo_hard":
      per_sequence_loss = ((chosen_logratios - 0.5 / beta) ** 2
                           + (rejected_logratios + 0.5 / beta) ** 2)
    elif loss_type in ("aot", "aot_unpaired"):
      if loss_type == "aot":
        a, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
        b, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
      else:
        a, _ = torch.sort(chosen_logratios, dim=0)
        b, _ = torch.sort(rejected_logratios, dim=0)
      delta = a - b
      per_sequence_loss = (-F.logsigmoid(beta * delta) * (1 - eps)
                           - F.logsigmoid(-beta * delta) * eps)
    elif loss_type == "apo_zero":
      per_sequence_loss = ((1 - torch.sigmoid(beta * chosen_logratios))
                           + torch.sigmoid(beta * rejected_logratios))
    elif loss_type == "apo_down":
      per_sequence_loss = (torch.sigmoid(beta * chosen_logratios)
                           + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))))
    elif loss_type == "discopop":
      logits = delta_score * beta
      modulation = torch.sigmoid(logits / discopop_tau)
      per_sequence_loss = (-F.logsigmoid(logits) * (1 - modulation)
                           + torch.exp(-logits) * modulation)
    elif loss_type == "sft":
      chosen_mask, _ = shift_completion_mask.chunk(2, dim=0)
      chosen_per_token_logps, _ = per_token_logps.chunk(2, dim=0)
      batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()
      per_sequence_loss = batch_loss.expand(chosen_per_token_logps.size(0))
    else:
      raise AssertionError(loss_type)
    if use_weighting:
      completion_lengths = shift_completion_mask.sum(dim=1).clamp_min(1)
      with torch.no_grad():
        aligned = (per_token_logps - log_sum_sq_probs) * shift_completion_mask
      weights = torch.exp(aligned.sum(dim=1) / completion_lengths)
      chosen_weights, rejected_weights = weights.chunk(2, dim=0)
      per_sequence_loss = per_sequence_loss * chosen_weights * rejected_weights
    loss = loss + per_sequence_loss.mean() * loss_weight

  chosen_rewards = beta * chosen_logratios.detach()
  rejected_rewards = beta * rejected_logratios.detach()
  metrics = {
      "rewards/chosen": chosen_rewards.mean(),
      "rewards/rejected": rejected_rewards.mean(),
      "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
      "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
      "logps/chosen": chosen_logps.detach().mean(),
      "logps/rejected": rejected_logps.detach().mean(),
  }
  return loss, metrics


def _trl1_batch(seed, batch=6, length=9, start_at_zero=True, empty_rejected=True):
  """Per-token inputs as TRL 1.16 sees them: ``[2B, T]`` masks, ``[2B, T - 1]`` log-probs."""
  rng = np.random.default_rng(seed)
  n = 2 * batch
  completion_mask = np.zeros((n, length), np.int64)
  for i in range(n):
    prompt = int(rng.integers(1, 4))
    completion_mask[i, prompt:prompt + int(rng.integers(1, length + 1 - prompt))] = 1
  if start_at_zero:  # an empty prompt: the unshifted mask counts one more token
    completion_mask[1] = 0
    completion_mask[1, :4] = 1
  if empty_rejected:  # an empty completion
    completion_mask[batch + 2] = 0
  shift = completion_mask[:, 1:].astype(bool)
  logps = np.where(shift, -rng.exponential(1.0, (n, length - 1)), 0.0)
  ref = np.where(shift, logps + 0.6 * rng.standard_normal((n, length - 1)), 0.0)
  lssp = np.where(shift, -rng.exponential(0.5, (n, length - 1)) - 0.1, 0.0)
  f32 = lambda x: x.astype(np.float32)  # noqa: E731
  return dict(completion_mask=completion_mask, logps=f32(logps), ref=f32(ref),
              lssp=f32(lssp))


def _ours_kwargs(d, batch=6):
  shift = d["completion_mask"][:, 1:].astype(bool)
  lengths = d["completion_mask"].sum(1)
  return dict(chosen_mask=shift[:batch], rejected_mask=shift[batch:],
              chosen_lengths=lengths[:batch], rejected_lengths=lengths[batch:],
              chosen_log_sum_sq_probs=d["lssp"][:batch],
              rejected_log_sum_sq_probs=d["lssp"][batch:])


# (label, dpo_loss keyword arguments); TRL's config names are the same.
def _trl1_configs():
  cfgs = []
  for lt in LOSS_TYPES:
    eps = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}.get(lt, 0.0)
    cfgs.append((lt, dict(loss_type=lt, label_smoothing=eps)))
  # Each f-divergence type with one non-default f-divergence (in rotation), and sigmoid with
  # all of them.
  fdivs = ("forward_kl", "js_divergence", "alpha_divergence")
  for i, lt in enumerate(F_DIVERGENCE_LOSS_TYPES):
    eps = {"robust": 0.2, "exo_pair": 0.05}.get(lt, 0.0)
    for fd in fdivs if lt == "sigmoid" else fdivs[i % 3:i % 3 + 1]:
      cfgs.append((f"{lt}/{fd}", dict(loss_type=lt, label_smoothing=eps, f_divergence_type=fd,
                                      f_alpha_divergence_coef=0.5)))
  for a in (1.0, 2.5, -0.5):
    cfgs.append((f"sigmoid/alpha={a}", dict(loss_type="sigmoid",
                                            f_divergence_type="alpha_divergence",
                                            f_alpha_divergence_coef=a)))
  # LD-DPO and WPO: with one type, and with several (distinct weights, so a wrong term
  # shows in the total).
  cfgs.append(("sigmoid/ld", dict(loss_type="sigmoid", ld_alpha=0.3)))
  cfgs.append(("multi/ld", dict(loss_type=["ipo", "aot", "sft", "nca_pair"],
                                loss_weights=[0.7, 1.3, 0.4, 1.9], ld_alpha=0.3)))
  cfgs.append(("sigmoid/wpo", dict(loss_type="sigmoid", use_weighting=True)))
  cfgs.append(("multi/wpo", dict(loss_type=["ipo", "bco_pair", "discopop", "sigmoid_norm"],
                                 loss_weights=[0.7, 1.3, 0.4, 1.9], use_weighting=True)))
  cfgs.append(("mpo", dict(loss_type=["sigmoid", "bco_pair", "sft"],
                           loss_weights=[0.8, 0.2, 1.0])))
  cfgs.append(("multi/js/ld/wpo", dict(loss_type=["sigmoid", "ipo", "hinge"],
                                       f_divergence_type="js_divergence", ld_alpha=0.5,
                                       use_weighting=True)))
  cfgs.append(("discopop/tau", dict(loss_type="discopop", discopop_tau=0.5)))
  return cfgs


def _ours_all(cfgs, beta):
  """One jitted program with every configuration (one compilation)."""
  def run(x_c, x_r, ref_c, ref_r, kw):
    out = {}
    for label, cfg in cfgs:
      def f(x_c, x_r):
        return dpo_loss(x_c, x_r, ref_c, ref_r, beta=beta, **kw, **cfg)  # noqa: B023
      (loss, m), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x_c, x_r)
      out[label] = (loss, m, g)
    return out
  return jax.jit(run)


_PARITY_BETA = 0.5
# Shared by the parity and the huge-gap tests: compiled once.
_ALL_TRL1 = _ours_all(_trl1_configs(), _PARITY_BETA)


def _torch_trl1_run(torch, d, cfg, beta, dtype, precomputed_ref=False, batch=6):
  cm = torch.tensor(d["completion_mask"])
  shift = cm[:, 1:].bool()
  x = torch.tensor(d["logps"], dtype=dtype, requires_grad=True)
  per_token = x.masked_fill(~shift, 0.0)  # the fused LM head's masked_fill
  ref = torch.tensor(d["ref"], dtype=dtype)
  lssp = torch.tensor(d["lssp"], dtype=dtype)
  ref_logps = ref.sum(1).chunk(2) if precomputed_ref else None
  kw = dict(cfg)
  lt = kw.pop("loss_type")
  loss, m = _torch_trl116(torch, per_token, ref, cm, loss_types=[lt] if isinstance(lt, str)
                          else lt, beta=beta, log_sum_sq_probs=lssp, ref_logps=ref_logps,
                          **kw)
  loss.backward()
  g = x.grad.numpy()
  return (loss.item(), {k: v.item() for k, v in m.items()}, (g[:batch], g[batch:]))


@pytest.mark.parametrize("precomputed_ref", [False, True])
def test_dpo_trl116_parity_loss_metrics_grads(precomputed_ref):
  torch = pytest.importorskip("torch")
  d = _trl1_batch(0)
  beta, batch = _PARITY_BETA, 6
  cfgs = _trl1_configs()
  if precomputed_ref:  # TRL's precompute_ref_log_probs: [B] reference log-probs
    cfgs = [(lab, c) for lab, c in cfgs if lab in ("sigmoid", "ipo", "aot", "sft", "mpo",
                                                   "sigmoid/wpo", "discopop/tau")]
    ref_c, ref_r = d["ref"].sum(1)[:batch], d["ref"].sum(1)[batch:]
    run = _ours_all(cfgs, beta)
  else:
    ref_c, ref_r = d["ref"][:batch], d["ref"][batch:]
    run = _ALL_TRL1
  ours = run(d["logps"][:batch], d["logps"][batch:], ref_c, ref_r, _ours_kwargs(d))
  for label, cfg in cfgs:
    l32, m32, g32 = _torch_trl1_run(torch, d, cfg, beta, torch.float32, precomputed_ref)
    l64, m64, g64 = _torch_trl1_run(torch, d, cfg, beta, torch.float64, precomputed_ref)
    loss, m, g = ours[label]
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)
    _as_good_as_reference(loss, l32, l64)
    assert set(m) == set(m32), label
    for k in m:
      _as_good_as_reference(m[k], m32[k], m64[k])
    for ours_g, r32, r64 in zip(g, g32, g64):
      _as_good_as_reference(ours_g, r32, r64)
    assert np.any(np.asarray(g[0]) != 0), label


def test_dpo_trl116_default_lengths_are_the_mask_sums():
  # Without an empty prompt, the shifted mask counts what TRL's unshifted one counts.
  torch = pytest.importorskip("torch")
  d = _trl1_batch(1, start_at_zero=False)
  kw = _ours_kwargs(d)
  for lt in ("ipo", "sigmoid_norm"):
    ours = dpo_loss(d["logps"][:6], d["logps"][6:], d["ref"][:6], d["ref"][6:],
                    loss_type=lt, chosen_mask=kw["chosen_mask"],
                    rejected_mask=kw["rejected_mask"])[0]
    ref, _ = _torch_trl116(torch, torch.tensor(d["logps"]), torch.tensor(d["ref"]),
                           torch.tensor(d["completion_mask"]), loss_types=[lt], beta=0.1)
    _close(ours, ref.item())
  # With it (row 1 starts at position 0), the default differs from TRL: the explicit
  # lengths are what reproduce it.
  d = _trl1_batch(1, start_at_zero=True)
  kw = _ours_kwargs(d)
  args = (d["logps"][:6], d["logps"][6:], d["ref"][:6], d["ref"][6:])
  masks = dict(chosen_mask=kw["chosen_mask"], rejected_mask=kw["rejected_mask"])
  default = dpo_loss(*args, loss_type="ipo", **masks)[0]
  explicit = dpo_loss(*args, loss_type="ipo", chosen_lengths=kw["chosen_lengths"],
                      rejected_lengths=kw["rejected_lengths"], **masks)[0]
  ref, _ = _torch_trl116(torch, torch.tensor(d["logps"]), torch.tensor(d["ref"]),
                         torch.tensor(d["completion_mask"]), loss_types=["ipo"], beta=0.1)
  _close(explicit, ref.item())
  assert abs(float(default) - ref.item()) > 1e-4


# The written formulas (float64 numpy), sequence level.


def _ls(z):
  return -np.logaddexp(0.0, -z)


def _sig(z):
  return 0.5 * (1.0 + np.tanh(0.5 * z))


def _np_trl1(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, fdiv="reverse_kl", alpha=0.5,
             tau=0.05, len_c=None, len_r=None):
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  clr, rlr = pc - rc, pr - rr

  def score(u):
    if fdiv == "reverse_kl":
      return u
    if fdiv == "forward_kl":
      return 1 - np.exp(np.minimum(-u, 80.0))
    if fdiv == "js_divergence":
      return np.log(2) + _ls(u)
    return (np.exp(np.minimum((alpha - 1) * u, 80.0)) - 1) / (alpha - 1)

  sc, sr = score(clr), score(rlr)
  d = sc - sr
  z = beta * d
  if loss_type == "sigmoid":
    return -_ls(z)
  if loss_type == "hinge":
    return np.maximum(0.0, 1 - z)
  if loss_type in ("ipo", "sigmoid_norm"):
    dn = sc / np.maximum(len_c, 1) - sr / np.maximum(len_r, 1)
    return (dn - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -_ls(beta * dn)
  if loss_type == "exo_pair":
    return _sig(z) * (_ls(z) - np.log1p(-eps)) + _sig(-z) * (_ls(-z) - np.log(eps))
  if loss_type == "nca_pair":
    return -_ls(beta * clr) - 0.5 * _ls(-beta * clr) - 0.5 * _ls(-beta * rlr)
  if loss_type == "robust":
    return (-(1 - eps) * _ls(z) + eps * _ls(-z)) / (1 - 2 * eps)
  if loss_type == "bco_pair":
    return -_ls(beta * clr) - _ls(-beta * rlr)
  if loss_type == "sppo_hard":
    return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
  if loss_type in ("aot", "aot_unpaired"):
    g = (np.sort(pc - pr) - np.sort(rc - rr) if loss_type == "aot"
         else np.sort(clr) - np.sort(rlr))
    return -(1 - eps) * _ls(beta * g) - eps * _ls(-beta * g)
  if loss_type == "apo_zero":
    return 1 - _sig(beta * clr) + _sig(beta * rlr)
  if loss_type == "apo_down":
    return _sig(beta * clr) + 1 - _sig(beta * (clr - rlr))
  if loss_type == "discopop":
    m = _sig(z / tau)
    # exp(-z) * m as one exponential (finite where exp(-z) alone overflows)
    return -_ls(z) * (1 - m) + np.exp(-z + _ls(z / tau))
  raise AssertionError(loss_type)


def _logps(seed, batch=6, scale=20.0):
  rng = np.random.default_rng(seed)
  # Sequence log-probs are negative and of order tens; the policy is near the reference.
  rc = -scale * rng.random(batch) - 1.0
  rr = -scale * rng.random(batch) - 1.0
  pc = rc + 3.0 * rng.standard_normal(batch)
  pr = rr + 3.0 * rng.standard_normal(batch)
  return tuple(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr))


_SEQ_TYPES = tuple(lt for lt in LOSS_TYPES if lt != "sft")
_EPS1 = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}


def _np_metrics(pc, pr, rc, rr, beta):
  cr = beta * (np.asarray(pc, np.float64) - rc)
  rj = beta * (np.asarray(pr, np.float64) - rr)
  return {"rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
          "rewards/accuracies": (cr > rj).mean(), "rewards/margins": (cr - rj).mean(),
          "logps/chosen": np.mean(pc), "logps/rejected": np.mean(pr)}


@pytest.mark.parametrize("fdiv", ["reverse_kl", "js_divergence", "alpha_divergence"])
def test_dpo_trl116_matches_written_formula(fdiv):
  pc, pr, rc, rr = _logps(0)
  len_c, len_r = np.arange(1, 7), np.array([3, 0, 2, 5, 1, 4])
  beta = 0.3
  for lt in _SEQ_TYPES:
    if fdiv != "reverse_kl" and lt not in F_DIVERGENCE_LOSS_TYPES:
      continue
    eps = _EPS1.get(lt, 0.0)
    kw = dict(beta=beta, loss_type=lt, label_smoothing=eps, f_divergence_type=fdiv,
              f_alpha_divergence_coef=0.4)
    if lt in ("ipo", "sigmoid_norm"):
      kw.update(chosen_lengths=len_c, rejected_lengths=len_r)
    want = _np_trl1(pc, pr, rc, rr, beta=beta, loss_type=lt, eps=eps, fdiv=fdiv, alpha=0.4,
                    len_c=len_c, len_r=len_r)
    none, _ = dpo_loss(pc, pr, rc, rr, reduction="none", **kw)
    chex.assert_shape(none, (6,))
    _close(none, want, rtol=2e-5)
    loss, m = dpo_loss(pc, pr, rc, rr, **kw)
    _close(loss, want.mean(), rtol=2e-5)
    _close(dpo_loss(pc, pr, rc, rr, reduction="sum", **kw)[0], want.sum(), rtol=2e-5)
    want_m = _np_metrics(pc, pr, rc, rr, beta)
    assert set(m) == set(want_m)
    for k in m:
      chex.assert_shape(m[k], ())
      _close(m[k], want_m[k])


def test_dpo_trl116_known_values():
  z = jnp.zeros(4)
  assert float(dpo_loss(z, z, z, z, beta=0.3)[0]) == pytest.approx(math.log(2), rel=1e-6)
  assert float(dpo_loss(z, z, z, z, loss_type="hinge")[0]) == pytest.approx(1.0)
  assert float(dpo_loss(z, z, z, z, loss_type="bco_pair")[0]) == pytest.approx(2 * math.log(2))
  ones = jnp.ones(4)
  assert float(dpo_loss(z, z, z, z, beta=0.5, loss_type="ipo", chosen_lengths=ones,
                        rejected_lengths=ones)[0]) == pytest.approx(1.0)
  # discopop at 0: log 2 * (1 - 1/2) + 1 * 1/2.
  assert float(dpo_loss(z, z, z, z, loss_type="discopop")[0]) == pytest.approx(
      0.5 * math.log(2) + 0.5, rel=1e-6)
  _, m = dpo_loss(z, z, z, z)
  assert float(m["rewards/accuracies"]) == 0.0 and float(m["rewards/margins"]) == 0.0


def test_f_divergence_scores_limits():
  u = jnp.linspace(-5.0, 5.0, 11)
  _close(f_divergence_scores(u, "alpha_divergence", 1.0), u)
  _close(f_divergence_scores(u, "alpha_divergence", 1.0 + 1e-3), u, rtol=1e-2, atol=2e-2)
  # forward_kl is the alpha = 0 member of the alpha family (clamped alike).
  _close(f_divergence_scores(u, "forward_kl"), f_divergence_scores(u, "alpha_divergence", 0.0))
  _close(f_divergence_scores(u, "js_divergence"), np.log(2 * np.exp(u) / (1 + np.exp(u))))
  _close(f_divergence_scores(u, "reverse_kl"), u)
  big = f_divergence_scores(jnp.asarray([-1e4, 1e4]), "forward_kl")
  assert np.all(np.isfinite(big))
  with pytest.raises(ValueError, match="f_divergence_type"):
    f_divergence_scores(u, "kl")


def test_dpo_trl116_batch_order_properties():
  # Paired types are per pair: permuting the batch permutes the losses. aot is a function
  # of the sorted batch: permuting pairs leaves it unchanged, and aot_unpaired does not
  # even need the pairs (permute chosen and rejected independently).
  pc, pr, rc, rr = _logps(5, batch=8)
  perm = np.random.default_rng(0).permutation(8)
  perm2 = np.random.default_rng(1).permutation(8)
  for lt in ("sigmoid", "nca_pair", "bco_pair", "apo_down"):
    a = dpo_loss(pc, pr, rc, rr, loss_type=lt, reduction="none")[0]
    b = dpo_loss(pc[perm], pr[perm], rc[perm], rr[perm], loss_type=lt, reduction="none")[0]
    _close(b, a[perm])
  aot = dpo_loss(pc, pr, rc, rr, loss_type="aot", label_smoothing=0.1)[0]
  _close(dpo_loss(pc[perm], pr[perm], rc[perm], rr[perm], loss_type="aot",
                  label_smoothing=0.1)[0], aot)
  un = dpo_loss(pc, pr, rc, rr, loss_type="aot_unpaired")[0]
  _close(dpo_loss(pc[perm], pr[perm2], rc[perm], rr[perm2], loss_type="aot_unpaired")[0], un)
  # ...whereas paired aot does see the pairing.
  assert abs(float(dpo_loss(pc[perm], pr[perm2], rc[perm], rr[perm2], loss_type="aot")[0])
             - float(dpo_loss(pc, pr, rc, rr, loss_type="aot")[0])) > 1e-4


def test_dpo_trl116_combination_ld_and_wpo_identities():
  d = _trl1_batch(2)
  kw = _ours_kwargs(d)
  args = (d["logps"][:6], d["logps"][6:], d["ref"][:6], d["ref"][6:])
  masks = dict(chosen_mask=kw["chosen_mask"], rejected_mask=kw["rejected_mask"])
  one = lambda **k: float(dpo_loss(*args, **masks, **k)[0])  # noqa: E731
  # MPO is the weighted sum of its parts.
  mpo = one(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
  parts = 0.8 * one(loss_type="sigmoid") + 0.2 * one(loss_type="bco_pair") + one(
      loss_type="sft")
  assert mpo == pytest.approx(parts, rel=1e-6)
  # sft is the chosen tokens' mean NLL.
  lp_c = np.asarray(d["logps"][:6], np.float64)
  assert one(loss_type="sft") == pytest.approx(-lp_c[kw["chosen_mask"]].mean(), rel=1e-6)
  # LD-DPO: alpha = 1 is plain DPO; alpha = 0 keeps only each pair's shared length.
  assert one(ld_alpha=1.0) == pytest.approx(one(), rel=1e-6)
  ld0 = dpo_loss(*args, **masks, ld_alpha=0.0, reduction="none")[1]
  m_c, m_r = kw["chosen_mask"], kw["rejected_mask"]
  shared = np.minimum(m_c.sum(1), m_r.sum(1))[:, None]
  keep_c = m_c & (np.cumsum(m_c, 1) <= shared)
  _close(ld0["logps/chosen"], np.where(keep_c, lp_c, 0).sum(1).mean())
  # WPO with log sum p^2 == log p gives weights 1.
  same = dpo_loss(*args, **masks, use_weighting=True, chosen_log_sum_sq_probs=args[0],
                  rejected_log_sum_sq_probs=args[1])[0]
  assert float(same) == pytest.approx(one(), rel=1e-6)


def test_dpo_trl116_finite_at_huge_log_ratio_gaps():
  # Every configuration of the parity test (all types, f-divergences, LD, WPO, MPO) on
  # per-token log-probs where one token of the policy or of the reference is -1e4: log-ratio
  # gaps of -1e4 and +1e4. Loss, metrics and gradients stay finite, the single-type
  # reverse-KL losses equal their written formulas, and wherever TRL's own float64 run is
  # finite, loss and gradients are as close to it as TRL's float32 run. (ipo of
  # forward_kl / alpha_divergence scores, ((e^80 - 1) / n)**2, overflows in float32 as in
  # TRL: left out.)
  torch = pytest.importorskip("torch")
  d = _trl1_batch(0)
  kw = _ours_kwargs(d)
  # Multiples of 1/64: every float32 sum with -1e4 is then exact, in any order.
  lp, ref = (np.round(d[k] * 64) / 64 for k in ("logps", "ref"))
  shift = d["completion_mask"][:, 1:].astype(bool)
  checked = 0
  first = np.argmax(shift, axis=1)  # a counted token of each (non-empty) row
  rows = np.arange(12)[shift.any(1)]

  def put(x, which):
    x = x.copy()
    x[rows[which], first[rows[which]]] = -1e4
    return x
  even, odd = rows % 2 == 0, rows % 2 == 1
  cases = [(put(lp, even), put(ref, odd)), (put(lp, odd), ref), (lp, put(ref, even)),
           (put(lp, rows < 6), put(ref, rows >= 6))]
  len_c, len_r = kw["chosen_lengths"], kw["rejected_lengths"]
  for x, r in cases:
    out = _ALL_TRL1(x[:6], x[6:], r[:6], r[6:], kw)
    for label, (loss, m, g) in out.items():
      if label == "ipo/forward_kl":
        continue
      assert np.isfinite(loss), label
      assert all(np.isfinite(v) for v in m.values()), label
      assert all(np.all(np.isfinite(gi)) for gi in g), label
      if label in LOSS_TYPES and label != "sft":  # the written formula, float64
        seq = [np.where(shift, v, 0).astype(np.float64).sum(1) for v in (x, r)]
        want = _np_trl1(seq[0][:6], seq[0][6:], seq[1][:6], seq[1][6:], beta=_PARITY_BETA,
                        loss_type=label, eps=_EPS1.get(label, 0.0), len_c=len_c,
                        len_r=len_r)
        _close(loss, want.mean())
      # Where TRL's own float64 run is finite: as close as TRL's float32 run (its
      # 1 - sigmoid(.) cancellations and fp32 sums of -1e4 are the gap here).
      cfg = dict(_trl1_configs())[label]
      d_huge = dict(d, logps=x, ref=r)
      l64, m64, g64 = _torch_trl1_run(torch, d_huge, cfg, _PARITY_BETA, torch.float64)
      if not np.isfinite(l64) or not all(np.all(np.isfinite(gi)) for gi in g64):
        continue  # e.g. TRL's discopop exp(-x) * sigma(x / tau) = inf * 0
      l32, m32, g32 = _torch_trl1_run(torch, d_huge, cfg, _PARITY_BETA, torch.float32)
      _as_good_as_reference(loss, l32, l64)
      for ours_g, r32, r64 in zip(g, g32, g64):
        _as_good_as_reference(ours_g, r32, r64)
      checked += 1
  assert checked > 100
  assert any(abs(float(out[lt][0])) > 1e3 for lt in ("sigmoid", "hinge"))  # really huge


def test_dpo_trl116_empty_completions_and_empty_batch():
  # Fully masked completions: sft and the lengths floor at 1, WPO weights are 1; no NaN.
  T = 5
  lp = jnp.asarray(-np.random.default_rng(0).random((3, T)), jnp.float32)
  empty = np.zeros((3, T), bool)
  full = np.ones((3, T), bool)
  zero_mask = dict(chosen_mask=empty, rejected_mask=empty)

  @jax.jit
  def all_types(x):
    out = {}
    for lt in LOSS_TYPES:
      kw = dict(loss_type=lt, label_smoothing=_EPS1.get(lt, 0.0), **zero_mask)
      if lt not in ("aot", "aot_unpaired", "sft"):
        kw.update(use_weighting=True, chosen_log_sum_sq_probs=lp,
                  rejected_log_sum_sq_probs=lp)
      out[lt] = jax.value_and_grad(lambda x: dpo_loss(x, x, lp, lp, **kw),  # noqa: B023
                                   has_aux=True)(x)
    return out

  for lt, ((loss, m), g) in all_types(lp).items():
    assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values()), lt
    assert np.all(np.asarray(g) == 0.0), lt
  assert float(dpo_loss(lp, lp, lp, lp, loss_type="sft", **zero_mask)[0]) == 0.0
  # sft with some chosen tokens: their mean only.
  mask = empty.copy()
  mask[0, :2] = True
  assert float(dpo_loss(lp, lp, lp, lp, loss_type="sft", chosen_mask=mask,
                        rejected_mask=full)[0]) == pytest.approx(-float(lp[0, :2].mean()))
  e = jnp.zeros((0,))
  for lt in _SEQ_TYPES:
    kw = dict(loss_type=lt, label_smoothing=_EPS1.get(lt, 0.0))
    if lt in ("ipo", "sigmoid_norm"):
      kw.update(chosen_lengths=e, rejected_lengths=e)
    loss, m = dpo_loss(e, e, e, e, **kw)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in m.values()), lt
  e2 = jnp.zeros((0, T))
  loss, m = dpo_loss(e2, e2, e2, e2, loss_type="sft", chosen_mask=e2 > 0,
                     rejected_mask=e2 > 0)
  assert float(loss) == 0.0


def test_dpo_trl116_under_jit_with_traced_hyperparameters():
  d = _trl1_batch(3)
  kw = _ours_kwargs(d)
  args = (d["logps"][:6], d["logps"][6:], d["ref"][:6], d["ref"][6:])

  @jax.jit
  def f(beta, ld_alpha, tau, w):
    return dpo_loss(*args, beta=beta, ld_alpha=ld_alpha, discopop_tau=tau,
                    loss_type=["discopop", "sigmoid"], loss_weights=[w, 1.0], **kw)[0]

  eager = dpo_loss(*args, beta=0.2, ld_alpha=0.4, discopop_tau=0.3,
                   loss_type=["discopop", "sigmoid"], loss_weights=[0.7, 1.0], **kw)[0]
  _close(f(0.2, 0.4, 0.3, 0.7), eager)


def test_dpo_trl116_bf16_inputs_compute_in_float32():
  pc, pr, rc, rr = (x.astype(jnp.bfloat16) for x in _logps(7))
  loss, m = dpo_loss(pc, pr, rc, rr)
  chex.assert_type((loss, m["rewards/chosen"]), jnp.float32)
  f32 = [jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)]
  _close(loss, dpo_loss(*f32)[0])


def test_dpo_trl116_bad_arguments():
  pc, pr, rc, rr = _logps(6)
  mask = np.ones((6, 4), bool)
  tok = jnp.zeros((6, 4))
  cases = [
      (dict(loss_type="kto"), ValueError, "loss_type"),
      (dict(loss_type="simpo"), ValueError, "cpo_loss"),
      (dict(loss_type="aot_pair"), ValueError, "aot_unpaired"),
      (dict(loss_type=[]), ValueError, "loss_type"),
      (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights"),
      (dict(loss_weights=["1"]), TypeError, "loss_weights"),
      (dict(beta=0.0), ValueError, "beta"),
      (dict(beta=float("nan")), ValueError, "beta"),
      (dict(beta="0.1"), TypeError, "beta"),
      (dict(label_smoothing=0.1), ValueError, "semantics='trl0'"),
      (dict(label_smoothing=0.6, loss_type="robust"), ValueError, "label_smoothing"),
      (dict(label_smoothing=0.5, loss_type="robust"), ValueError, "label_smoothing"),
      (dict(loss_type="exo_pair"), ValueError, "label_smoothing"),
      (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing"),
      (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
      (dict(f_divergence_type="js_divergence", loss_type="nca_pair"), ValueError,
       "f_divergence_type"),
      (dict(f_alpha_divergence_coef="a"), TypeError, "f_alpha_divergence_coef"),
      (dict(ld_alpha=1.5), ValueError, "ld_alpha"),
      (dict(ld_alpha=0.5), ValueError, "per-token"),
      (dict(loss_type="sft"), ValueError, "per-token"),
      (dict(use_weighting=True), ValueError, "per-token"),
      (dict(use_weighting="yes"), ValueError, "use_weighting"),
      (dict(loss_type="ipo"), ValueError, "chosen_lengths"),
      (dict(loss_type="sigmoid_norm", chosen_lengths=np.ones(6)), ValueError,
       "chosen_lengths"),
      (dict(loss_type="ipo", chosen_lengths=np.ones(5), rejected_lengths=np.ones(6)),
       ValueError, "chosen_lengths"),
      (dict(loss_type="ipo", chosen_lengths=-np.ones(6), rejected_lengths=np.ones(6)),
       ValueError, "chosen_lengths"),
      (dict(discopop_tau=0.0, loss_type="discopop"), ValueError, "discopop_tau"),
      (dict(reference_free=True), ValueError, "reference_free"),
      (dict(bco_state=bco_init()), ValueError, "bco_state"),
      (dict(semantics="trl2"), ValueError, "semantics"),
      (dict(reduction="avg"), ValueError, "reduction"),
      (dict(chosen_mask=mask), ValueError, "rejected_mask"),
      (dict(chosen_mask=mask, rejected_mask=mask), ValueError, "policy_chosen_logps"),
  ]
  for kw, err, match in cases:
    with pytest.raises(err, match=match):
      dpo_loss(pc, pr, rc, rr, **kw)
  with pytest.raises(ValueError, match="reference_chosen_logps"):
    dpo_loss(pc, pr, None, rr)
  with pytest.raises(ValueError, match="policy_rejected_logps"):
    dpo_loss(pc, pr[:3], rc, rr)
  with pytest.raises(ValueError, match="reference_rejected_logps"):
    dpo_loss(pc, pr, rc, rr.astype(jnp.int32))
  with pytest.raises(ValueError, match="label_smoothing"):
    jax.jit(lambda e: dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=e))(0.1)
  # Per-token inputs.
  with pytest.raises(ValueError, match="chosen_mask"):
    dpo_loss(tok, tok, tok, tok, chosen_mask=tok, rejected_mask=mask)
  with pytest.raises(ValueError, match="reference_chosen_logps"):
    dpo_loss(tok, tok, tok[:, :3], tok, chosen_mask=mask, rejected_mask=mask)
  with pytest.raises(ValueError, match="both"):
    dpo_loss(tok, tok, tok, rr, chosen_mask=mask, rejected_mask=mask)
  with pytest.raises(ValueError, match="chosen_log_sum_sq_probs"):
    dpo_loss(tok, tok, tok, tok, chosen_mask=mask, rejected_mask=mask, use_weighting=True)
  with pytest.raises(ValueError, match="rejected_log_sum_sq_probs"):
    dpo_loss(tok, tok, tok, tok, chosen_mask=mask, rejected_mask=mask, use_weighting=True,
             chosen_log_sum_sq_probs=tok, rejected_log_sum_sq_probs=tok[:, :2])
  for lt in ("aot", "sft"):
    with pytest.raises(ValueError, match="use_weighting"):
      dpo_loss(tok, tok, tok, tok, chosen_mask=mask, rejected_mask=mask, use_weighting=True,
               loss_type=lt, chosen_log_sum_sq_probs=tok, rejected_log_sum_sq_probs=tok)


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


def test_metrics_are_stop_gradient():
  pc, pr, rc, rr = _logps(3)
  jac = jax.jit(jax.jacrev(lambda *x: dpo_loss(*x)[1], argnums=(0, 1, 2, 3)))(
      pc, pr, rc, rr)
  assert set(jac) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                      "rewards/margins", "logps/chosen", "logps/rejected"}
  for name, g in jac.items():
    for gi in g:
      assert np.all(np.asarray(gi) == 0.0), name


@settings(max_examples=15, deadline=None)
@given(h=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=4, max_size=4),
       beta=st.floats(0.01, 2.0), tau=st.floats(0.01, 0.9))
def test_dpo_trl116_monotone_types_fall_with_the_margin(h, beta, tau):
  # sigmoid, hinge, robust (eps < 0.5), discopop (tau < 1... not monotone in general, so
  # only checked finite) and bco_pair fall (weakly) as the chosen log-ratio rises.
  h = jnp.asarray(h, jnp.float32)
  z = jnp.zeros_like(h)
  grads = _monotone_grads(h, z, beta, tau)
  for lt, (losses, g) in grads.items():
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(g)), lt
    if lt != "discopop":
      assert np.all(np.asarray(g) <= 0), (lt, g)


@jax.jit
def _monotone_grads(h, z, beta, tau):
  out = {}
  for lt, eps in (("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.2), ("bco_pair", 0.0),
                  ("discopop", 0.0)):
    fn = lambda x: dpo_loss(x, z, z, z, beta=beta, loss_type=lt,  # noqa: E731,B023
                            label_smoothing=eps, discopop_tau=tau, reduction="none")[0]
    out[lt] = (fn(h), jax.grad(lambda x: jnp.sum(fn(x)))(h))  # noqa: B023
  return out


# ---------------------------------------------------------------------------------------
# dpo_loss, semantics="trl0": TRL 0.19's DPOTrainer.dpo_loss.

SMOOTHED0 = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
TRL0_PLAIN = tuple(lt for lt in TRL0_LOSS_TYPES if lt != "bco_pair")


def _np_dpo(pc, pr, rc, rr, *, beta, loss_type, eps=0.0, reference_free=False, delta=0.0,
            tau=0.05):
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  if reference_free:
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
  elif loss_type == "bco_pair":
    losses = -_ls(beta * rho_c - delta) - _ls(-(beta * rho_r - delta))
  elif loss_type in ("aot", "aot_pair"):
    g = (np.sort(pc - pr) - np.sort(rc - rr) if loss_type == "aot"
         else np.sort(rho_c) - np.sort(rho_r))
    losses = -(1 - eps) * _ls(beta * g) - eps * _ls(-beta * g)
  elif loss_type == "discopop":
    m = _sig(z / tau)
    losses = -_ls(z) * (1 - m) + np.exp(-z + _ls(z / tau))
  else:
    raise AssertionError(loss_type)
  return losses, _np_metrics(pc, pr, rc, rr, beta)


def _eps_for(loss_type):
  return 0.1 if loss_type in SMOOTHED0 else 0.0


@pytest.mark.parametrize("loss_type", TRL0_PLAIN)
def test_dpo_trl0_matches_written_formula(loss_type):
  pc, pr, rc, rr = _logps(0)
  for eps in {0.0, _eps_for(loss_type)}:
    for beta in (0.1, 0.5):
      ref_losses, ref_metrics = _np_dpo(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                        eps=eps)
      kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, semantics="trl0")
      loss, metrics = dpo_loss(pc, pr, rc, rr, **kw)
      chex.assert_type(loss, jnp.float32)
      chex.assert_shape(loss, ())
      _close(loss, ref_losses.mean())
      none, _ = dpo_loss(pc, pr, rc, rr, reduction="none", **kw)
      chex.assert_shape(none, (6,))
      _close(none, ref_losses)
      total, _ = dpo_loss(pc, pr, rc, rr, reduction="sum", **kw)
      _close(total, ref_losses.sum())
      assert set(metrics) == set(ref_metrics)
      for k in metrics:
        chex.assert_shape(metrics[k], ())
        _close(metrics[k], ref_metrics[k])


def test_dpo_trl0_known_values():
  # At h = 0 DPO is log 2 whatever beta; IPO is 1 / (4 beta^2); hinge is 1.
  z = jnp.zeros(4)
  t0 = dict(semantics="trl0")
  assert float(dpo_loss(z, z, z, z, beta=0.3, **t0)[0]) == pytest.approx(math.log(2),
                                                                          rel=1e-6)
  assert float(dpo_loss(z, z, z, z, beta=0.5, loss_type="ipo", **t0)[0]) == pytest.approx(1.0)
  assert float(dpo_loss(z, z, z, z, loss_type="hinge", **t0)[0]) == pytest.approx(1.0)
  _, m = dpo_loss(z, z, z, z, **t0)
  # policy == reference: rewards 0 and a tie counts as wrong (TRL's strict >).
  assert float(m["rewards/accuracies"]) == 0.0 and float(m["rewards/margins"]) == 0.0


class _TorchRunningMoments:
  """TRL 0.19.1 trainer/utils.py RunningMoments (single process), python-float state."""

  def __init__(self):
    self.mean, self.std, self.var, self.count = 0.0, 1.0, 1.0, 1e-24

  def update(self, xs):
    import torch
    xs_count = xs.numel()
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    xs_mean, xs_var = xs_mean.float(), xs_var.float()
    delta = xs_mean - self.mean
    tot_count = self.count + xs_count
    new_sum = xs_var * xs_count
    old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
    tot_sum = old_sum + new_sum
    self.mean += (delta * xs_count / tot_count).item()
    new_var = tot_sum / tot_count
    self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
    self.var = new_var.item()
    self.count = tot_count


def _torch_trl019(torch, pc, pr, rc, rr, *, beta, loss_type, eps, reference_free,
                  running=None, tau=0.05):
  """TRL 0.19.1 DPOTrainer.dpo_loss (reverse KL), re-written here in torch."""
  F = torch.nn.functional
  chosen_logratios = pc - (not reference_free) * rc
  rejected_logratios = pr - (not reference_free) * rr
  logratios = pc - pr
  ref_logratios = torch.zeros(1) if reference_free else rc - rr
  logits = logratios - ref_logratios
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
  elif loss_type == "bco_pair":
    # (TRL 0.19 recomputes the log-ratios here with the reference, whatever reference_free.)
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    rewards = torch.cat((chosen_rewards, rejected_rewards), 0).mean().detach()
    running.update(rewards)
    delta = running.mean
    losses = -F.logsigmoid(beta * (pc - rc) - delta) - F.logsigmoid(-(beta * (pr - rr) - delta))
  elif loss_type == "sppo_hard":
    a, b = pc - rc, pr - rr
    losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
  elif loss_type == "nca_pair":
    cr, rj = (pc - rc) * beta, (pr - rr) * beta
    losses = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rj)
  elif loss_type in ("aot_pair", "aot"):
    if loss_type == "aot_pair":
      a, _ = torch.sort(pc - rc, dim=0)
      b, _ = torch.sort(pr - rr, dim=0)
    else:
      a, _ = torch.sort(pc - pr, dim=0)
      b, _ = torch.sort(rc - rr, dim=0)
    delta = a - b
    losses = (-F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps)
  elif loss_type == "apo_zero":
    losses = (1 - F.sigmoid(beta * chosen_logratios)) + F.sigmoid(beta * rejected_logratios)
  elif loss_type == "apo_down":
    losses = F.sigmoid(beta * chosen_logratios) + (
        1 - F.sigmoid(beta * (chosen_logratios - rejected_logratios)))
  elif loss_type == "discopop":
    lg = ((pc - pr) - (rc - rr)) * beta
    m = torch.sigmoid(lg / tau)
    losses = -F.logsigmoid(lg) * (1 - m) + torch.exp(-lg) * m
  else:
    raise AssertionError(loss_type)
  return losses.mean()


@functools.lru_cache(maxsize=None)
def _all_trl0_types_value_and_grads(beta, reference_free):
  """One jitted program for every TRL 0.19 loss type (one compilation)."""
  types = [lt for lt in TRL0_PLAIN if not (reference_free and lt in
                                           ("nca_pair", "sppo_hard", "aot", "aot_pair",
                                            "discopop"))]

  def all_types(*x):
    return {lt: jax.value_and_grad(
        lambda *x: dpo_loss(*x, beta=beta, loss_type=lt, label_smoothing=_eps_for(lt),
                            reference_free=reference_free, semantics="trl0")[0],
        argnums=(0, 1, 2, 3))(*x) for lt in types}
  return jax.jit(all_types), types


@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_trl0_pytorch_trl019_parity_values_and_grads(reference_free):
  # With reference_free, TRL 0.19 still reads the reference in nca_pair, sppo_hard, aot*,
  # discopop and bco_pair (we zero it everywhere, documented): those are compared without.
  torch = pytest.importorskip("torch")
  pc, pr, rc, rr = _logps(1)
  beta = 0.2
  fn, types = _all_trl0_types_value_and_grads(beta, reference_free)
  ours = fn(pc, pr, rc, rr)
  for loss_type in types:
    ts = [torch.tensor(np.asarray(x), requires_grad=True) for x in (pc, pr, rc, rr)]
    ref = _torch_trl019(torch, *ts, beta=beta, loss_type=loss_type,
                        eps=_eps_for(loss_type), reference_free=reference_free)
    ref.backward()
    loss, grads = ours[loss_type]
    _close(loss, ref.item(), rtol=2e-6)
    for g, t in zip(grads, ts):
      _close(g, np.zeros(6) if t.grad is None else t.grad.numpy(), rtol=2e-5, atol=1e-7)


def test_dpo_trl0_bco_pair_running_mean_matches_trl019_over_steps():
  torch = pytest.importorskip("torch")
  beta = 0.3
  state = bco_init()
  running = _TorchRunningMoments()
  fn = jax.jit(jax.value_and_grad(
      lambda pc, pr, rc, rr, s: dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair",
                                         semantics="trl0", bco_state=s),
      has_aux=True))
  for seed in range(4):
    pc, pr, rc, rr = _logps(10 + seed)
    (loss, m), g = fn(pc, pr, rc, rr, state)
    ts = [torch.tensor(np.asarray(x), requires_grad=True) for x in (pc, pr, rc, rr)]
    ref = _torch_trl019(torch, *ts, beta=beta, loss_type="bco_pair", eps=0.0,
                        reference_free=False, running=running)
    ref.backward()
    _close(loss, ref.item(), rtol=2e-6)
    _close(g, ts[0].grad.numpy(), rtol=2e-5, atol=1e-7)
    state = m["bco_state"]
    assert isinstance(state, BCOState)
    _close(state.mean, running.mean, rtol=2e-6)
    _close(state.count, running.count)
    # the written formula with the new mean
    want, _ = _np_dpo(pc, pr, rc, rr, beta=beta, loss_type="bco_pair",
                      delta=running.mean)
    _close(loss, want.mean())


@jax.jit
def _trl0_sigmoid_losses_and_grads(h, beta):
  z = jnp.zeros_like(h)
  out = {}
  for eps in (0.0, 0.1, 0.3):
    fn = lambda x: dpo_loss(x, z, z, z, beta=beta, label_smoothing=eps,  # noqa: E731
                            semantics="trl0", reduction="none")
    losses, m = fn(h)
    grads = jax.grad(lambda x: jnp.mean(fn(x)[0]))(h)
    out[eps] = (losses, m, grads)
  return out


@settings(max_examples=20, deadline=None)
@given(h=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=6,
                  max_size=6),
       beta=st.floats(0.01, 2.0))
def test_dpo_trl0_cdpo_sigmoid_properties(h, beta):
  h = jnp.asarray(h, jnp.float32)
  for eps, (losses, m, grads) in _trl0_sigmoid_losses_and_grads(h, beta).items():
    hh = np.asarray(h, np.float64)
    assert np.all(np.isfinite(losses)) and np.all(np.asarray(losses) >= 0)
    assert np.all(np.isfinite(grads))
    # cDPO is the CE against the soft label 1 - eps, so the loss falls in h up to
    # beta * h = log((1 - eps) / eps) and rises after (plain DPO: falls everywhere).
    z_star = np.inf if eps == 0.0 else math.log((1 - eps) / eps)
    z = beta * hh
    far = np.abs(z - z_star) > 1e-3
    g = np.asarray(grads)
    assert np.all(g[far & (z < z_star)] <= 0) and np.all(g[far & (z > z_star)] >= 0)
    _close(m["rewards/margins"], beta * np.mean(hh), rtol=1e-5, atol=1e-3)


def test_dpo_trl0_finite_at_huge_log_ratio_gaps():
  big = jnp.asarray([1e4, -1e4, 0.0, 5e3, -5e3, 1.0], jnp.float32)
  zero = jnp.zeros(6)
  fn, types = _all_trl0_types_value_and_grads(0.2, False)  # the parity test's program
  for args in [(big, zero, zero, zero), (zero, big, zero, zero), (zero, zero, big, -big),
               (big, -big, zero, zero)]:
    for loss_type, (loss, grads) in fn(*args).items():
      assert np.isfinite(loss), (loss_type, args)
      for g in grads:
        assert np.all(np.isfinite(g)), (loss_type, args, g)
      ref, _ = _np_dpo(*args, beta=0.2, loss_type=loss_type, eps=_eps_for(loss_type))
      _close(loss, ref.mean(), rtol=1e-5)


def test_dpo_trl0_reference_free_and_ipo_on_averaged_log_probs():
  pc, pr, rc, rr = _logps(4)
  z = jnp.zeros_like(pc)
  t0 = dict(semantics="trl0")
  a = dpo_loss(pc, pr, None, None, reference_free=True, **t0)
  b = dpo_loss(pc, pr, z, z, **t0)
  c = dpo_loss(pc, pr, rc, rr, reference_free=True, **t0)
  chex.assert_trees_all_close(a, b, c)
  # TRL 1.16's IPO on per-token inputs = TRL 0.19's IPO on length-averaged log-probs
  # when chosen and rejected have equal lengths (the averages then differ by 1 / n).
  d = _trl1_batch(4, start_at_zero=False, empty_rejected=False)
  kw = _ours_kwargs(d)
  lp, ref = d["logps"], d["ref"]
  m = d["completion_mask"][:, 1:].astype(bool)
  m[6:] = m[:6]  # same lengths in each pair
  lp, ref = np.where(m, lp, 0), np.where(m, ref, 0)
  n = m.sum(1)
  new = dpo_loss(lp[:6], lp[6:], ref[:6], ref[6:], loss_type="ipo", chosen_mask=m[:6],
                 rejected_mask=m[6:])[0]
  avg = [x.sum(1) / n for x in (lp, ref)]
  old = dpo_loss(avg[0][:6], avg[0][6:], avg[1][:6], avg[1][6:], loss_type="ipo", **t0)[0]
  del kw
  _close(new, old)


def test_dpo_trl0_bad_arguments():
  pc, pr, rc, rr = _logps(6)
  t0 = dict(semantics="trl0")
  cases = [
      (dict(loss_type="sft"), "loss_type"),
      (dict(loss_type="aot_unpaired"), "loss_type"),
      (dict(loss_type=["sigmoid", "hinge"]), "one loss type"),
      (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
      (dict(ld_alpha=0.5), "ld_alpha"),
      (dict(use_weighting=True), "use_weighting"),
      (dict(loss_type="bco_pair"), "bco_state"),
      (dict(bco_state=bco_init()), "bco_state"),
      (dict(loss_type="bco_pair", bco_state=(0.0, 1.0)), "BCOState"),
      (dict(label_smoothing=-0.1), "label_smoothing"),
      (dict(label_smoothing=0.6), "label_smoothing"),
      (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
      (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
      (dict(reference_free="yes"), "reference_free"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      dpo_loss(pc, pr, rc, rr, **t0, **kw)
  with pytest.raises(ValueError, match="reference_chosen_logps"):
    dpo_loss(pc, pr, None, rr, **t0)


# ---------------------------------------------------------------------------------------
# End to end.


def test_dpo_end_to_end_from_logits_and_under_jit():
  # Policy/ref logits -> per-token log-probs -> dpo_loss (TRL 1.16 IPO, length-normalised),
  # jitted with a traced beta.
  rng = np.random.default_rng(5)
  B, T, V = 4, 6, 9
  pol = jnp.asarray(rng.standard_normal((2 * B, T, V)), jnp.float32)
  ref = jnp.asarray(rng.standard_normal((2 * B, T, V)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, V, (2 * B, T)), jnp.int32)
  labels = ids.at[:, :2].set(IGNORE)  # the prompt does not count

  @jax.jit
  def step(pol, beta):
    def loss_fn(pol):
      lp, mask = per_token_log_probs(pol, labels, shift=True)
      lr, _ = per_token_log_probs(ref, labels, shift=True)
      return dpo_loss(lp[:B], lp[B:], lr[:B], lr[B:], beta=beta, loss_type="ipo",
                      chosen_mask=mask[:B], rejected_mask=mask[B:])
    return jax.value_and_grad(loss_fn, has_aux=True)(pol)

  (loss, m), g = step(pol, 0.1)
  lp = _np_seq_logps(pol, labels, shift=True)
  lr = _np_seq_logps(ref, labels, shift=True)
  n = T - 2
  want = _np_trl1(lp[:B] / n, lp[B:] / n, lr[:B] / n, lr[B:] / n, beta=0.1, loss_type="ipo",
                  len_c=np.ones(B), len_r=np.ones(B))
  _close(loss, want.mean(), rtol=2e-5)
  _close(m["rewards/accuracies"], _np_metrics(lp[:B], lp[B:], lr[:B], lr[B:], 0.1)[
      "rewards/accuracies"])
  assert np.all(np.isfinite(g)) and np.any(g != 0)
  # Position 0 predicts prompt token 1 (ignored); the last position predicts nothing.
  assert np.all(np.asarray(g[:, 0]) == 0.0) and np.all(np.asarray(g[:, -1]) == 0.0)


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
