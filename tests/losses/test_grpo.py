"""Tests for jaxopt_llm.losses.grpo: the GRPO loss family and group-relative advantages.

Three ways: against the written equations (float64 numpy, on-policy closed forms);
against PyTorch re-implementations of TRL 1.16.0's ``GRPOTrainer._compute_loss`` (with
``get_off_policy_mask``, ``get_gamma_weights``, ``get_high_entropy_mask``) and of the
advantage block of ``GRPOTrainer._generate_and_score_completions`` (with
``trl.trainer.utils.nanstd``), written here from TRL's source: loss, metrics and the
gradient w.r.t. the policy log-probs, fp32, 1e-5 relative; and on properties (masked
positions do not matter, +-1e4 log-ratio gaps, empty batches, bad arguments).
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_llm.losses import group_advantages, grpo_loss
from jaxopt_llm.losses.grpo import CLIPPED_LOSS_TYPES, LOSS_TYPES

B, T = 6, 5


def _inputs(seed, b=B, t=T, gap=0.3):
  rng = np.random.default_rng(seed)
  logp = -np.abs(rng.standard_normal((b, t))).astype(np.float32) - 0.1
  old = (logp + gap * rng.standard_normal((b, t))).astype(np.float32)
  ref = (logp + gap * rng.standard_normal((b, t))).astype(np.float32)
  adv = rng.standard_normal(b).astype(np.float32)
  adv[1] = 0.0
  mask = rng.random((b, t)) > 0.25
  mask[:, 0] = True
  mask[2] = False                 # an empty completion
  isr = np.exp(0.2 * rng.standard_normal((b, t))).astype(np.float32)
  sampling = (old + 0.2 * rng.standard_normal((b, t))).astype(np.float32)
  entropies = np.abs(rng.standard_normal((b, t))).astype(np.float32) * 2
  return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, isr=isr,
              sampling=sampling, entropies=entropies)


# ---------------------------------------------------------------------------------------
# PyTorch re-implementation of TRL 1.16.0 GRPOTrainer._compute_loss (one process, no
# gradient accumulation: current_gradient_accumulation_steps = steps_per_generation = 1).


def _trl_nanmin(torch, x):   # trl.trainer.utils.nanmin
  return torch.tensor(float("nan")) if torch.isnan(x).all() else torch.min(x[~torch.isnan(x)])


def _trl_nanmax(torch, x):   # trl.trainer.utils.nanmax
  return torch.tensor(float("nan")) if torch.isnan(x).all() else torch.max(x[~torch.isnan(x)])


def _trl_gamma_weights(torch, advantages, log_ratio_per_token, mask, importance_sampling_ratio,
                       k_pos, lambda_pos, k_neg, lambda_neg):
  # GRPOTrainer.get_gamma_weights (no_grad)
  with torch.no_grad():
    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(log_ratio_per_token, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
      log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
      seq_log_ratio += torch.sum(log_is_ratio, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, k_pos, k_neg)
    lambda_seq = torch.where(is_nonneg_adv, lambda_pos, lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _trl_compute_loss(torch, per_token_logps, old_per_token_logps, advantages, mask, *,
                      ref_per_token_logps=None, loss_type="dapo", epsilon_low=0.2,
                      epsilon_high=0.2, beta=0.0, delta=None, importance_sampling_level="token",
                      use_bias_correction_kl=True, max_completion_length=None,
                      num_items_in_batch=None, sapo_temperature_pos=1.0,
                      sapo_temperature_neg=1.05, vespo=(2.0, 3.0, 3.0, 2.0),
                      importance_sampling_ratio=None, off_policy_mask_threshold=None,
                      sampling_per_token_logps=None, entropies=None, top_entropy_quantile=1.0,
                      entropy_coef=0.0):
  metrics = {}
  mask = mask.to(per_token_logps.dtype)
  if top_entropy_quantile < 1.0:      # get_high_entropy_mask, one process
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
      entropy_mask = torch.zeros_like(entropies, dtype=torch.bool)
    else:
      thr = torch.quantile(local.to(entropies.dtype), 1 - top_entropy_quantile)
      entropy_mask = ((entropies * mask) >= thr) & mask.bool()
  else:
    entropy_mask = None
  if advantages.dim() == 1:
    advantages = advantages.unsqueeze(1)
  old_per_token_logps = (per_token_logps.detach() if old_per_token_logps is None
                         else old_per_token_logps)
  if off_policy_mask_threshold is not None:   # get_off_policy_mask
    sampling = (old_per_token_logps if sampling_per_token_logps is None
                else sampling_per_token_logps)
    kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
    avg_seq_kl = (kl_div * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    off_policy_mask = ((advantages >= 0) | (avg_seq_kl <= off_policy_mask_threshold)).to(
        mask.dtype)
  log_ratio = per_token_logps - old_per_token_logps
  if importance_sampling_level == "token":
    log_importance_weights = log_ratio
  else:
    log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    log_importance_weights = log_importance_weights.unsqueeze(-1)
  coef_1 = torch.exp(log_importance_weights)
  if beta != 0.0:
    per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                    - (ref_per_token_logps - per_token_logps) - 1)
    if use_bias_correction_kl:
      per_token_kl = per_token_kl * coef_1
  if loss_type == "cispo":
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
    per_token_loss = -clamped_ratios * advantages * per_token_logps
  elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
      coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
  elif loss_type == "sapo":
    temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
    soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
    per_token_loss = -soft_coef_1 * advantages
  elif loss_type == "vespo":
    phi_seq = _trl_gamma_weights(torch, advantages, log_ratio, mask,
                                 importance_sampling_ratio, *vespo)
    per_token_loss = -phi_seq * advantages * per_token_logps
  if off_policy_mask_threshold is not None:
    per_token_loss = per_token_loss * off_policy_mask
  if entropy_mask is not None:
    per_token_loss = per_token_loss * entropy_mask
  if importance_sampling_ratio is not None and loss_type != "vespo":
    per_token_loss = per_token_loss * importance_sampling_ratio
  if beta != 0.0:
    per_token_loss = per_token_loss + beta * per_token_kl
  if loss_type in ["grpo", "sapo"]:
    loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
  elif loss_type == "bnpo":
    loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
  elif loss_type == "dr_grpo":
    loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
  elif loss_type in ["cispo", "dapo", "vespo"]:
    n = mask.sum() if num_items_in_batch is None else torch.tensor(num_items_in_batch)
    loss = (per_token_loss * mask).sum() / n.clamp(min=1.0)
  elif loss_type == "luspo":
    loss = (per_token_loss * mask).sum(-1).mean()
  if entropy_coef != 0.0:
    effective_mask = mask if entropy_mask is None else mask * entropy_mask
    entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
    metrics["policy_loss"] = loss.detach()
    loss = loss - entropy_coef * entropy_loss

  def masked_seq_mean(x):
    if x.shape[1] == 1:
      return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)

  def global_masked_mean(x):
    if x.shape[1] == 1:
      s, c = x.sum(), torch.tensor(float(x.shape[0]))
    else:
      s, c = (x * mask).sum(), mask.sum().float()
    return s / c.clamp(min=1.0)

  if beta != 0.0:
    metrics["kl"] = global_masked_mean(per_token_kl)
  if entropies is not None:
    metrics["entropy"] = global_masked_mean(entropies)
  if loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
    is_low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    metrics["clip_ratio/low_mean"] = global_masked_mean(is_low.float())
    metrics["clip_ratio/high_mean"] = global_masked_mean(is_high.float())
    metrics["clip_ratio/region_mean"] = global_masked_mean((is_low | is_high).float())
    metrics["clip_ratio/low_min"] = _trl_nanmin(torch, masked_seq_mean(is_low.float()))
    metrics["clip_ratio/high_max"] = _trl_nanmax(torch, masked_seq_mean(is_high.float()))
  elif loss_type == "cispo":
    metrics["cispo_clip_ratio"] = global_masked_mean(
        ((coef_1 > epsilon_high) & (advantages > 0)).float())
  elif loss_type == "vespo":
    metrics["vespo/phi_seq_mean"] = global_masked_mean(phi_seq)
  return loss, {k: v.detach() for k, v in metrics.items()}


def _torch_run(torch, x, dtype, **kw):
  """TRL's loss, metrics and d loss / d per_token_logps in ``dtype``."""
  t = lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=dtype)  # noqa: E731
  logp = torch.tensor(np.asarray(x["logp"]), dtype=dtype, requires_grad=True)
  use = kw.pop("use", ())
  loss, metrics = _trl_compute_loss(
      torch, logp, t(x["old"]), t(x["adv"]), torch.tensor(x["mask"]).to(dtype),
      ref_per_token_logps=t(x["ref"]) if kw.get("beta", 0.0) else None,
      importance_sampling_ratio=t(x["isr"]) if "isr" in use else None,
      sampling_per_token_logps=t(x["sampling"]) if "sampling" in use else None,
      entropies=t(x["entropies"]) if "entropies" in use else None, **kw)
  loss.backward()
  return (loss.detach().numpy(), {k: v.numpy() for k, v in metrics.items()},
          logp.grad.numpy())


def _jax_run(x, **kw):
  use = kw.pop("use", ())
  opt = dict(
      ref_per_token_logps=x["ref"] if kw.get("beta", 0.0) else None,
      importance_sampling_ratio=x["isr"] if "isr" in use else None,
      sampling_per_token_logps=x["sampling"] if "sampling" in use else None,
      entropies=x["entropies"] if "entropies" in use else None)
  if "vespo" in kw:
    kp, lp, kn, ln = kw.pop("vespo")
    kw.update(vespo_k_pos=kp, vespo_lambda_pos=lp, vespo_k_neg=kn, vespo_lambda_neg=ln)

  def f(logp):
    return grpo_loss(logp, x["old"], x["adv"], x["mask"], **opt, **kw)

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]))
  return loss, metrics, grad


def _assert_parity(x, rtol=1e-5, atol=1e-7, **kw):
  torch = pytest.importorskip("torch")
  loss_t, metrics_t, grad_t = _torch_run(torch, x, torch.float32, **dict(kw))
  loss, metrics, grad = _jax_run(x, **dict(kw))
  chex.assert_type(loss, jnp.float32)
  assert set(metrics) == set(metrics_t), (sorted(metrics), sorted(metrics_t))
  np.testing.assert_allclose(loss, loss_t, rtol=rtol, atol=atol)
  for k in metrics:
    np.testing.assert_allclose(metrics[k], metrics_t[k], rtol=rtol, atol=atol, err_msg=k)
  np.testing.assert_allclose(grad, grad_t, rtol=rtol, atol=atol)
  return loss, metrics, grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_pytorch_trl_parity(loss_type, level, beta):
  x = _inputs(0)
  _assert_parity(x, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                 max_completion_length=7, epsilon_high=0.28 if loss_type != "cispo" else 1.1)


@pytest.mark.parametrize("loss_type", CLIPPED_LOSS_TYPES)
def test_pytorch_trl_parity_delta_and_uncorrected_kl(loss_type):
  x = _inputs(1, gap=0.6)
  _assert_parity(x, loss_type=loss_type, delta=1.3, beta=0.1, use_bias_correction_kl=False,
                 max_completion_length=T)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo", "sapo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_pytorch_trl_parity_masks_vllm_ratio_and_entropy_bonus(loss_type, level):
  # Off-policy sequence mask (with sampler log-probs), top-entropy mask, the vLLM
  # importance-sampling ratio, the entropy bonus, and a given num_items_in_batch.
  x = _inputs(2, gap=0.5)
  _assert_parity(x, loss_type=loss_type, importance_sampling_level=level, beta=0.02,
                 off_policy_mask_threshold=0.05, top_entropy_quantile=0.4, entropy_coef=0.01,
                 num_items_in_batch=40.0, use=("isr", "sampling", "entropies"))


def test_pytorch_trl_parity_per_token_advantages_and_sapo_temperatures():
  x = _inputs(3)
  x["adv"] = np.random.default_rng(3).standard_normal((B, T)).astype(np.float32)
  for loss_type in ("grpo", "sapo", "vespo"):
    _assert_parity(x, loss_type=loss_type, sapo_temperature_pos=0.5,
                   sapo_temperature_neg=2.0, vespo=(1.5, 2.0, 2.5, 1.0))


def test_on_policy_default_old_is_stop_gradient_of_policy():
  torch = pytest.importorskip("torch")
  x = _inputs(4)
  for loss_type in LOSS_TYPES:
    kw = dict(loss_type=loss_type, max_completion_length=T)
    logp = torch.tensor(x["logp"], requires_grad=True)
    lt, _ = _trl_compute_loss(torch, logp, None, torch.tensor(x["adv"]),
                              torch.tensor(x["mask"]).float(), **kw)
    lt.backward()
    f = lambda lp: grpo_loss(lp, None, x["adv"], x["mask"], **kw)[0]  # noqa: E731
    loss, grad = jax.value_and_grad(f)(jnp.asarray(x["logp"]))
    np.testing.assert_allclose(loss, lt.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, logp.grad.numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# the written equations (float64 numpy), on-policy: rho = 1, so l_t = -A (clipped types).


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo"])
def test_on_policy_equations(loss_type):
  x = _inputs(5)
  a = x["adv"].astype(np.float64)[:, None]
  m = x["mask"].astype(np.float64)
  n = m.sum(-1, keepdims=True)
  scale = 2.0 / np.where(a > 0, 1.0, 1.05) if loss_type == "sapo" else 1.0
  per = -scale * a * m                       # l_t; sapo: -(4/tau) sigmoid(0) A
  expected = {
      "grpo": (per.sum(-1, keepdims=True) / np.maximum(n, 1)).mean(),
      "sapo": (per.sum(-1, keepdims=True) / np.maximum(n, 1)).mean(),
      "bnpo": per.sum() / m.sum(),
      "dapo": per.sum() / m.sum(),
      "dr_grpo": per.sum() / (B * 9),
      "luspo": per.sum(-1).mean(),
  }[loss_type]
  f = lambda lp: grpo_loss(lp, None, x["adv"], x["mask"], loss_type=loss_type,  # noqa: E731
                           max_completion_length=9)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # d l_t / d log pi_t = -A rho = -A on-policy (sapo: -(4/tau) sigmoid'(0) tau A = -A).
  weight = {"grpo": 1 / np.maximum(n, 1) / B, "sapo": 1 / np.maximum(n, 1) / B,
            "bnpo": 1 / m.sum(), "dapo": 1 / m.sum(), "dr_grpo": 1 / (B * 9),
            "luspo": 1 / B}[loss_type]
  np.testing.assert_allclose(grad, -a * m * weight, rtol=1e-6, atol=1e-9)
  if loss_type in CLIPPED_LOSS_TYPES:
    for k in ("low_mean", "high_mean", "region_mean", "low_min", "high_max"):
      assert float(metrics[f"clip_ratio/{k}"]) == 0.0


def test_clipped_surrogate_equation_off_policy():
  # l = -min(rho A, clip(rho, 1 - eps_l, 1 + eps_h) A), dapo aggregation, float64 numpy.
  x = _inputs(6, gap=0.5)
  lp, old = x["logp"].astype(np.float64), x["old"].astype(np.float64)
  a = x["adv"].astype(np.float64)[:, None]
  m = x["mask"]
  rho = np.exp(lp - old)
  per = -np.minimum(rho * a, np.clip(rho, 0.8, 1.3) * a)
  loss, metrics = grpo_loss(lp.astype(np.float32), old.astype(np.float32), x["adv"], m,
                            epsilon_low=0.2, epsilon_high=0.3)
  np.testing.assert_allclose(loss, np.where(m, per, 0).sum() / m.sum(), rtol=1e-5)
  low = (rho < 0.8) & (a < 0)
  np.testing.assert_allclose(metrics["clip_ratio/low_mean"], low[m].mean(), rtol=1e-6)


def test_k3_kl_and_bias_correction_equations():
  x = _inputs(7)
  lp, ref, old = (x[k].astype(np.float64) for k in ("logp", "ref", "old"))
  m = x["mask"]
  d = ref - lp
  k3 = np.exp(d) - d - 1
  for corrected, kl in ((False, k3), (True, k3 * np.exp(lp - old))):
    _, metrics = grpo_loss(x["logp"], x["old"], x["adv"], m, beta=0.1,
                           ref_per_token_logps=x["ref"], use_bias_correction_kl=corrected)
    np.testing.assert_allclose(metrics["kl"], kl[m].mean(), rtol=1e-5)


def test_cispo_caps_the_ratio_itself_and_sequence_level_is_a_masked_mean():
  x = _inputs(8, gap=1.0)
  lp, old = x["logp"].astype(np.float64), x["old"].astype(np.float64)
  m = x["mask"]
  rho = np.exp(lp - old)
  loss, _ = grpo_loss(x["logp"], x["old"], x["adv"], m, loss_type="cispo", epsilon_high=1.5)
  per = -np.minimum(rho, 1.5) * x["adv"][:, None] * lp
  np.testing.assert_allclose(loss, np.where(m, per, 0).sum() / m.sum(), rtol=1e-5)
  # GSPO: one ratio per completion, exp(mean_t r_t) over its counted tokens.
  seq = np.where(m, lp - old, 0).sum(-1) / np.maximum(m.sum(-1), 1)
  loss, _ = grpo_loss(x["logp"], x["old"], x["adv"], m, loss_type="grpo",
                      importance_sampling_level="sequence", epsilon_low=10.0,
                      epsilon_high=10.0)   # no clipping: l_t = -exp(w) A
  expected = (-np.exp(seq) * x["adv"] * (m.sum(-1) > 0)).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_bias_corrected_kl_changes_the_gradient_on_policy():
  # TRL's documented behaviour: rho == 1 in value but it is differentiable.
  x = _inputs(9)
  g = {}
  for corrected in (False, True):
    f = lambda lp: grpo_loss(lp, None, np.zeros(B, np.float32), x["mask"], beta=1.0,  # noqa
                             ref_per_token_logps=x["ref"], use_bias_correction_kl=corrected)[0]
    g[corrected] = np.asarray(jax.grad(f)(jnp.asarray(x["logp"])))
  d = (x["ref"] - x["logp"]).astype(np.float64)
  n = x["mask"].sum()
  np.testing.assert_allclose(g[False], np.where(x["mask"], 1 - np.exp(d), 0) / n, rtol=1e-4,
                             atol=1e-7)
  # d/dlogp [exp(logp - old) k3(d)] on-policy = k3 + (1 - e^d).
  np.testing.assert_allclose(g[True], np.where(x["mask"], np.exp(d) - d - 1 + 1 - np.exp(d), 0)
                             / n, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------
# properties


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), loss_type=st.sampled_from(LOSS_TYPES),
       level=st.sampled_from(["token", "sequence"]), beta=st.sampled_from([0.0, 0.1]))
def test_masked_positions_do_not_matter(seed, loss_type, level, beta):
  x = _inputs(seed, gap=0.4)
  kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta,
            max_completion_length=T)
  junk = {k: np.where(x["mask"], x[k], np.float32(v))
          for k, v in (("logp", np.nan), ("old", np.inf), ("ref", -np.inf))}

  def f(lp, old, ref):
    return grpo_loss(lp, old, x["adv"], x["mask"], ref_per_token_logps=ref, **kw)

  (l1, m1), g1 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]), x["old"], x["ref"])
  (l2, m2), g2 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(junk["logp"]), junk["old"],
                                                     junk["ref"])
  assert np.isfinite(l1)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  chex.assert_trees_all_close(m2, m1, rtol=1e-6)
  np.testing.assert_array_equal(g2, g1)
  assert np.all(np.asarray(g1)[~x["mask"]] == 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_log_ratio_gaps_of_1e4_are_finite_and_nan_free(loss_type, level):
  # Every token's old log-prob is 1e4 away from the policy's, up in some completions and
  # down in others; advantages of both signs.
  x = _inputs(10)
  sign = np.broadcast_to(np.where(np.arange(B) % 2 == 0, 1.0, -1.0)[:, None],
                         (B, T)).astype(np.float32)
  for gap in (1e4, -1e4):
    old = x["logp"] - gap * sign
    # A > 0 where the ratio is huge (clipped or gated), A < 0 where it is tiny: the
    # loss is finite. (rho huge with A < 0 is the documented +inf, tested below.)
    adv = np.where(sign[:, 0] * gap > 0, 1.0, -1.0).astype(np.float32)
    f = lambda lp: grpo_loss(lp, old, adv, x["mask"], loss_type=loss_type,  # noqa: E731
                             importance_sampling_level=level, beta=0.1,
                             ref_per_token_logps=x["logp"], max_completion_length=T,
                             epsilon_high=5.0 if loss_type == "cispo" else 0.2)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]))
    assert np.isfinite(loss), (gap, loss)
    assert np.all(np.isfinite(np.asarray(grad))), (gap, grad)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics)), metrics


def test_overflowing_values_are_inf_never_nan():
  x = _inputs(11)
  adv = -np.ones(B, np.float32)
  old = x["logp"] - 1e4             # rho = e^1e4, A < 0: -rho A = +inf, the true value
  f = lambda lp, **kw: grpo_loss(lp, old, adv, x["mask"], **kw)[0]  # noqa: E731
  loss, grad = jax.value_and_grad(f)(jnp.asarray(x["logp"]))
  assert np.isposinf(loss) and not np.any(np.isnan(np.asarray(grad)))
  # delta caps it: finite, gradient 0 where capped.
  loss, grad = jax.value_and_grad(lambda lp: f(lp, delta=2.0))(jnp.asarray(x["logp"]))
  assert np.isfinite(loss) and np.all(np.asarray(grad) == 0.0)
  np.testing.assert_allclose(loss, 2.0, rtol=1e-6)   # -min(2 * -1, 1.2 * -1) = 2
  # The k3 KL: log ref - log pi = +1e4 is e^1e4 (inf); -1e4 is finite (1e4 - 1).
  for gap, finite in ((1e4, False), (-1e4, True)):
    g = lambda lp: grpo_loss(lp, None, np.zeros(B, np.float32), x["mask"], beta=1.0,  # noqa
                             ref_per_token_logps=x["logp"] + gap)[0]
    loss, grad = jax.value_and_grad(g)(jnp.asarray(x["logp"]))
    assert bool(np.isfinite(loss)) == finite
    assert not np.any(np.isnan(np.asarray(grad)))
    if finite:
      np.testing.assert_allclose(loss, 1e4 - 1, rtol=1e-6)


def test_bias_corrected_kl_with_overflowing_ratio_and_zero_kl_is_zero():
  x = _inputs(12)
  for gap in (1e4, -1e4, 200.0):
    f = lambda lp: grpo_loss(lp, lp - gap, np.zeros(B, np.float32), x["mask"],  # noqa
                             beta=1.0, ref_per_token_logps=x["logp"])
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]))
    assert float(loss) == 0.0 and float(metrics["kl"]) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))


def test_weighted_k3_log_domain_branch():
  from jaxopt_llm.losses.grpo import k3_kl, weighted_k3_kl
  # plain; e^d overflows, result finite; e^w overflows, result finite; results beyond
  # float32 (inf); tiny d (series); 0.
  d = jnp.asarray([0.5, 100.0, -0.5, -100.0, 3.0, 1e-3, -2e-5, 0.0, 0.09, -0.11])
  w = jnp.asarray([0.3, -95.0, 89.0, 95.0, 90.0, 1.0, 0.0, 200.0, 0.0, 0.0])
  out = weighted_k3_kl(d, w)
  dd, ww = np.asarray(d, np.float64), np.asarray(w, np.float64)
  with np.errstate(divide="ignore", over="ignore"):
    expected = np.exp(ww + np.log(np.expm1(dd) - dd)).astype(np.float32)
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  assert np.isinf(out[3]) and np.isinf(out[4]) and np.isfinite(out[2])
  with np.errstate(over="ignore"):
    np.testing.assert_allclose(k3_kl(d), (np.expm1(dd) - dd).astype(np.float32), rtol=1e-5)
  gd, gw = jax.grad(lambda d, w: jnp.sum(weighted_k3_kl(d, w)), argnums=(0, 1))(d, w)
  # d/dw = the value; d/dd = e^w expm1(d); 0 where the value is +inf or 0.
  with np.errstate(over="ignore"):
    exp_gd = np.where(np.isinf(expected) | (expected == 0), 0.0, np.exp(ww) * np.expm1(dd))
  np.testing.assert_allclose(gw, np.where(np.isinf(expected), 0.0, expected), rtol=1e-5)
  np.testing.assert_allclose(gd, exp_gd.astype(np.float32), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_batches_give_zero_never_nan(loss_type):
  x = _inputs(13)
  kw = dict(loss_type=loss_type, beta=0.1, max_completion_length=T)
  mask = np.zeros((B, T), bool)
  f = lambda lp: grpo_loss(lp, x["old"], x["adv"], mask, ref_per_token_logps=x["ref"],  # noqa
                           entropies=x["entropies"], top_entropy_quantile=0.5,
                           entropy_coef=0.1, **kw)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(x["logp"]))
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  # TRL's vespo/phi_seq_mean averages over all completions, empty ones too (phi(1) = 1).
  assert all(float(v) == (1.0 if k == "vespo/phi_seq_mean" else 0.0)
             for k, v in metrics.items()), metrics
  # No completions at all.
  empty = np.zeros((0, T), np.float32)
  loss, metrics = grpo_loss(empty, empty, np.zeros(0, np.float32), empty.astype(bool), **kw,
                            ref_per_token_logps=empty)
  assert float(loss) == 0.0
  assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))


def test_num_items_in_batch_is_the_global_token_count():
  x = _inputs(14)
  local, _ = grpo_loss(x["logp"], x["old"], x["adv"], x["mask"], loss_type="dapo")
  n = x["mask"].sum()
  glob, _ = grpo_loss(x["logp"], x["old"], x["adv"], x["mask"], loss_type="dapo",
                      num_items_in_batch=4 * n)
  np.testing.assert_allclose(glob, local / 4, rtol=1e-6)
  # bnpo ignores it (its normaliser is the local count).
  bnpo, _ = grpo_loss(x["logp"], x["old"], x["adv"], x["mask"], loss_type="bnpo",
                      num_items_in_batch=4 * n)
  np.testing.assert_allclose(bnpo, local, rtol=1e-6)


def test_jit_matches_eager_and_traced_hyperparameters():
  x = _inputs(15, gap=0.5)
  eager = grpo_loss(x["logp"], x["old"], x["adv"], x["mask"], beta=0.05, epsilon_high=0.28,
                    ref_per_token_logps=x["ref"])

  @jax.jit
  def run(lp, beta, eps_h):
    return grpo_loss(lp, x["old"], x["adv"], x["mask"], beta=beta, epsilon_high=eps_h,
                     ref_per_token_logps=x["ref"])

  traced = run(x["logp"], 0.05, 0.28)
  chex.assert_trees_all_close(traced, eager, rtol=1e-5)


def test_vmap_over_a_leading_axis():
  xs = [_inputs(s) for s in (16, 17)]
  stack = lambda k: np.stack([x[k] for x in xs])  # noqa: E731
  f = lambda lp, old, adv, m: grpo_loss(lp, old, adv, m, loss_type="grpo")[0]  # noqa: E731
  out = jax.vmap(f)(stack("logp"), stack("old"), stack("adv"), stack("mask"))
  for i, x in enumerate(xs):
    np.testing.assert_allclose(out[i], f(x["logp"], x["old"], x["adv"], x["mask"]), rtol=1e-6)


def test_float64_kept_under_x64_and_bf16_upcast():
  x = _inputs(18)
  loss, _ = grpo_loss(jnp.asarray(x["logp"], jnp.bfloat16), None,
                      jnp.asarray(x["adv"], jnp.bfloat16), x["mask"])
  chex.assert_type(loss, jnp.float32)
  enable_x64 = getattr(jax, "enable_x64", None)
  if enable_x64 is None:   # jax < 0.8
    from jax.experimental import enable_x64
  with enable_x64(True):
    lp, old = (x[k].astype(np.float64) for k in ("logp", "old"))
    loss, metrics = grpo_loss(lp, old, x["adv"].astype(np.float64), x["mask"], beta=0.1,
                              ref_per_token_logps=x["ref"].astype(np.float64))
    chex.assert_type(loss, jnp.float64)
    rho = np.exp(lp - old)
    a = x["adv"].astype(np.float64)[:, None]
    per = -np.minimum(rho * a, np.clip(rho, 0.8, 1.2) * a)
    d = x["ref"].astype(np.float64) - lp
    per = per + 0.1 * rho * (np.exp(d) - d - 1)
    m = x["mask"]
    np.testing.assert_allclose(loss, per[m].sum() / m.sum(), rtol=1e-12)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
    (dict(epsilon_low=-0.1), ValueError, "epsilon_low"),
    (dict(epsilon_high="0.2"), TypeError, "epsilon_high"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=0.1), ValueError, "ref_per_token_logps"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
    (dict(sapo_temperature_pos=0.0), ValueError, "sapo_temperature_pos"),
    (dict(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=0.5), ValueError, "entropies"),
    (dict(entropy_coef=0.1), ValueError, "entropies"),
    (dict(num_items_in_batch=-1.0), ValueError, "num_items_in_batch"),
    (dict(use_bias_correction_kl="yes"), ValueError, "use_bias_correction_kl"),
    (dict(ref_per_token_logps=np.zeros((B, T + 1), np.float32)), ValueError,
     "ref_per_token_logps"),
    (dict(entropies=np.zeros((B, T), np.int32)), ValueError, "entropies"),
])
def test_bad_arguments(kwargs, exc, match):
  x = _inputs(19)
  with pytest.raises(exc, match=match):
    grpo_loss(x["logp"], x["old"], x["adv"], x["mask"], **kwargs)


def test_bad_shapes_and_dtypes():
  x = _inputs(20)
  with pytest.raises(ValueError, match="per_token_logps"):
    grpo_loss(x["logp"][0], None, x["adv"], x["mask"][0])
  with pytest.raises(ValueError, match="advantages"):
    grpo_loss(x["logp"], None, x["adv"][:-1], x["mask"])
  with pytest.raises(ValueError, match="completion_mask"):
    grpo_loss(x["logp"], None, x["adv"], x["mask"].astype(np.float32))
  with pytest.raises(ValueError, match="completion_mask"):
    grpo_loss(x["logp"], None, x["adv"], x["mask"][:, :-1])
  with pytest.raises(ValueError, match="old_per_token_logps"):
    grpo_loss(x["logp"], x["old"][:, :-1], x["adv"], x["mask"])


# ---------------------------------------------------------------------------------------
# group_advantages vs a PyTorch re-implementation of TRL 1.16.0's advantage block


def _trl_nanstd(torch, tensor, dim=None, keepdim=False):   # trl.trainer.utils.nanstd
  mean = torch.nanmean(tensor, dim=dim, keepdim=True)
  variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
  count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
  correction = count / (count - 1)
  correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
  variance *= correction
  std = torch.sqrt(variance)
  if keepdim:
    return std
  if dim is None:
    return std.squeeze()
  return std.squeeze(dim)


def _trl_advantages(torch, rewards_per_func, num_generations, scale_rewards, reward_weights,
                    multi_objective_aggregation):
  # GRPOTrainer._generate_and_score_completions, from `unscorable_mask` to the metrics.
  unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
  if multi_objective_aggregation == "sum_then_normalize":
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped = mean_grouped.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
      if num_generations > 1:
        std_rewards = _trl_nanstd(torch, rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
      else:
        std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
      if rewards.numel() > 1:
        std_rewards = _trl_nanstd(torch, rewards).expand_as(rewards)
      else:
        std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped
    if scale_rewards != "none":
      advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
  else:
    k = rewards_per_func.shape[1]
    grouped = rewards_per_func.view(-1, num_generations, k)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = (_trl_nanstd(torch, grouped, dim=1, keepdim=True) if num_generations > 1
             else torch.zeros_like(mean_k))
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, k)
    rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    std_rewards = (_trl_nanstd(torch, rewards).expand_as(rewards) if rewards.numel() > 1
                   else torch.zeros_like(rewards))
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
  advantages = torch.nan_to_num(advantages, nan=0.0)
  rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
  rewards[unscorable_mask] = torch.nan
  metrics = {"reward": torch.nanmean(rewards), "reward_std": _trl_nanstd(torch, rewards),
             "frac_reward_zero_std": is_std_zero.float().mean()}
  return advantages, metrics


def _rewards(seed, n=12, k=1, binary=False, nans=True):
  rng = np.random.default_rng(seed)
  r = (rng.integers(0, 2, (n, k)) if binary else rng.standard_normal((n, k))).astype(np.float32)
  if binary:
    r[:4] = 1.0                   # a group with identical rewards: std 0
  if nans:
    r[5, :] = np.nan              # an unscorable completion
    if k > 1:
      r[7, 0] = np.nan            # one function did not score it
  return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [4, 1, 2])
@pytest.mark.parametrize("binary", [False, True])
def test_group_advantages_pytorch_trl_parity(scale, group_size, binary):
  torch = pytest.importorskip("torch")
  r = _rewards(group_size, binary=binary)
  adv_t, metrics_t = _trl_advantages(torch, torch.tensor(r), group_size, scale,
                                     torch.ones(1), "sum_then_normalize")
  adv, metrics = group_advantages(r[:, 0], group_size, scale_rewards=scale)
  chex.assert_shape(adv, (12,))
  np.testing.assert_allclose(adv, adv_t.numpy(), rtol=1e-5, atol=1e-6)
  for k, v in metrics_t.items():
    np.testing.assert_allclose(metrics[k], v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_group_advantages_multiple_reward_functions_parity(aggregation):
  torch = pytest.importorskip("torch")
  r = _rewards(3, k=3)
  w = np.asarray([1.0, 0.5, 2.0], np.float32)
  adv_t, metrics_t = _trl_advantages(torch, torch.tensor(r), 3, "group", torch.tensor(w),
                                     aggregation)
  adv, metrics = group_advantages(r, 3, reward_weights=w,
                                  multi_objective_aggregation=aggregation)
  np.testing.assert_allclose(adv, adv_t.numpy(), rtol=1e-5, atol=1e-6)
  for k, v in metrics_t.items():
    np.testing.assert_allclose(metrics[k], v.numpy(), rtol=1e-5, atol=1e-7, err_msg=k)


def test_group_advantages_equation():
  # Sample std (ddof=1) of each group, 1e-4 added to the std; unscorable -> 0.
  r = np.asarray([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, np.nan], np.float32)
  adv, metrics = group_advantages(r, 4)
  g1 = r[:4].astype(np.float64)
  expected1 = (g1 - g1.mean()) / (g1.std(ddof=1) + 1e-4)
  np.testing.assert_allclose(adv[:4], expected1, rtol=1e-6)
  np.testing.assert_array_equal(adv[4:], 0.0)       # identical rewards and the NaN one
  np.testing.assert_allclose(metrics["frac_reward_zero_std"], 0.5)
  np.testing.assert_allclose(metrics["reward"], np.nanmean(r), rtol=1e-6)
  none, _ = group_advantages(r, 4, scale_rewards=False)
  np.testing.assert_allclose(none[:4], g1 - g1.mean(), rtol=1e-6)
  same, _ = group_advantages(r, 4, scale_rewards=True)
  np.testing.assert_allclose(same, adv)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), g=st.sampled_from([2, 3, 4]),
       scale=st.sampled_from(["group", "batch", "none"]))
def test_group_advantages_properties(seed, g, scale):
  rng = np.random.default_rng(seed)
  r = rng.standard_normal(4 * g).astype(np.float32)
  adv, _ = group_advantages(r, g, scale_rewards=scale)
  adv = np.asarray(adv).reshape(-1, g)
  assert np.all(np.isfinite(adv))
  np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-4)   # zero mean within each group
  # Shift invariance: adding a constant per group changes nothing.
  shifted = r.reshape(-1, g) + rng.standard_normal((4, 1)).astype(np.float32)
  adv2, _ = group_advantages(shifted.reshape(-1), g, scale_rewards=scale)
  if scale != "batch":
    np.testing.assert_allclose(np.asarray(adv2).reshape(-1, g), adv, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(group_size=5), ValueError, "group_size"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(group_size=2.0), ValueError, "group_size"),
    (dict(scale_rewards="std"), ValueError, "scale_rewards"),
    (dict(multi_objective_aggregation="mean"), ValueError, "multi_objective_aggregation"),
    (dict(reward_weights=np.ones(2)), ValueError, "reward_weights"),
])
def test_group_advantages_bad_arguments(kwargs, exc, match):
  kwargs = {"group_size": 4, **kwargs}
  with pytest.raises(exc, match=match):
    group_advantages(np.zeros(12, np.float32), **kwargs)
  with pytest.raises(ValueError, match="rewards"):
    group_advantages(np.zeros((2, 2, 3)), 2)


def test_grpo_toy_example_reward_rises(capsys):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "grpo_toy.py"
  spec = importlib.util.spec_from_file_location("grpo_toy_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  h = module.main(["--steps", "60", "--print-every", "30"])
  # Random digits: 0.1 per position; the mean sampled reward of steps 31-60 is well above.
  assert h["reward"][0] < 0.2 and h["reward"][-1] > h["reward"][0] + 0.1, h
  assert "count up" in capsys.readouterr().out
