"""Tests for jaxopt_llm.losses.cpo: TRL 1.16's CPOTrainer loss (CPO, SimPO, AlphaPO).

Checked against the written equations (float64 numpy), against a PyTorch re-implementation
of TRL 1.16.0's ``experimental.cpo.CPOTrainer`` (``cpo_loss``, ``get_batch_loss_metrics``,
``concatenated_forward`` for the recipe from logits, ``CPOConfig``'s alphapo sugar), and
on properties: monotonicity, SimPO/AlphaPO limits, finiteness at +-1e4 log-prob gaps, the
empty batch, bad arguments.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_llm.losses import causal_lm_loss, cpo_loss, sequence_log_probs
from jaxopt_llm.losses.cpo import CPO_LOSS_TYPES

METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "nll_loss"}
SMOOTHED = ("sigmoid", "simpo", "alphapo")
IGNORE = -100
# Jitted once per signature: eager jnp ops each compile on their own, which is slow.
_cpo = jax.jit(cpo_loss, static_argnames=("loss_type", "alpha", "label_smoothing",
                                          "cpo_alpha"))


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def _x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.8
  return enable_x64()


def _batch(seed, b=8, average=True):
  # Length-averaged log-probs in [-4, -0.05] (ipo/simpo/alphapo), or sums in [-60, -1].
  rng = np.random.default_rng(seed)
  lo, hi = (-4.0, -0.05) if average else (-60.0, -1.0)
  pc = rng.uniform(lo, hi, b).astype(np.float32)
  pr = rng.uniform(lo, hi, b).astype(np.float32)
  return pc, pr, np.float32(rng.uniform(0.5, 3.0))


def _config(loss_type):
  """Keyword arguments of one test configuration per loss type."""
  return dict(beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type in SMOOTHED
              else 0.0, cpo_alpha=0.7, simpo_gamma=0.4)


# ---------------------------------------------------------------------------------------
# The written equations (float64 numpy).


def _ls(z):
  return -np.logaddexp(0.0, -np.asarray(z, np.float64))


def _np_cpo(pc, pr, nll, *, beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma,
            alpha=0.0):
  pc, pr = np.asarray(pc, np.float64), np.asarray(pr, np.float64)
  if loss_type == "alphapo":
    loss_type, cpo_alpha = "simpo", 0.0
  r = (lambda l: (1 - np.exp(l) ** -alpha) / alpha) if alpha else (lambda l: l)  # noqa: E731
  h = r(pc) - r(pr)
  eps = label_smoothing
  if loss_type == "simpo":
    h = h - simpo_gamma / beta
  if loss_type in ("sigmoid", "simpo"):
    losses = -(1 - eps) * _ls(beta * h) - eps * _ls(-beta * h)
  elif loss_type == "hinge":
    losses = np.maximum(0.0, 1 - beta * h)
  else:
    losses = (h - 1 / (2 * beta)) ** 2
  return losses.mean() + cpo_alpha * float(nll), beta * r(pc), beta * r(pr)


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo_matches_written_formulas(alpha):
  pc, pr, nll = _batch(0)
  out = _all_value_and_grads(alpha)(pc, pr, nll)
  for loss_type in CPO_LOSS_TYPES:
    kw = _config(loss_type)
    (loss, m), _ = out[loss_type]
    chex.assert_type(loss, jnp.float32)
    chex.assert_shape(loss, ())
    assert set(m) == METRICS
    ref, rc, rr = _np_cpo(pc, pr, nll, alpha=alpha, **kw)
    _close(loss, ref, rtol=2e-5)
    _close(m["rewards/chosen"], rc.mean())
    _close(m["rewards/rejected"], rr.mean())
    _close(m["rewards/margins"], (rc - rr).mean())
    _close(m["rewards/accuracies"], np.mean(rc > rr))
    _close(m["logps/chosen"], pc.astype(np.float64).mean())
    _close(m["nll_loss"], 0.0 if loss_type == "alphapo" else nll)


def test_cpo_known_values():
  pc, pr = jnp.asarray([-1.0]), jnp.asarray([-3.0])  # h = 2
  nll = jnp.asarray(0.5)
  loss, _ = _cpo(pc, pr, nll, beta=0.5, loss_type="sigmoid")
  _close(loss, np.log1p(np.exp(-1.0)) + 0.5)  # -log sigma(1) + 1 * nll
  loss, _ = _cpo(pc, pr, nll, beta=0.5, loss_type="hinge", cpo_alpha=0.0)
  _close(loss, 0.0, atol=0)  # 1 - 0.5 * 2 = 0
  loss, _ = _cpo(pc, pr, nll, beta=0.5, loss_type="ipo", cpo_alpha=2.0)
  _close(loss, (2.0 - 1.0) ** 2 + 1.0)
  loss, _ = _cpo(pc, pr, None, beta=0.5, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=0.0)
  _close(loss, np.log1p(np.exp(0.0)))  # beta * (h - gamma / beta) = 0
  # AlphaPO with alpha = -1: r(l) = p - 1.
  loss, m = _cpo(pc, pr, nll, beta=1.0, loss_type="alphapo", simpo_gamma=0.0, alpha=-1.0)
  h = np.exp(-1.0) - np.exp(-3.0)
  _close(loss, np.log1p(np.exp(-h)))
  _close(m["rewards/chosen"], np.exp(-1.0) - 1.0)


# ---------------------------------------------------------------------------------------
# TRL 1.16.0 experimental/cpo/cpo_trainer.py, re-implemented in torch.


def _torch_trl_cpo(torch, policy_chosen_logps, policy_rejected_logps, policy_nll_loss, *,
                   beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha):
  """CPOConfig.__post_init__ + CPOTrainer.cpo_loss + get_batch_loss_metrics."""
  F = torch.nn.functional
  if loss_type == "alphapo":  # CPOConfig.__post_init__
    loss_type, cpo_alpha = "simpo", 0.0
  if cpo_alpha == 0:  # concatenated_forward
    policy_nll_loss = torch.tensor(0.0, dtype=policy_chosen_logps.dtype)
  if alpha != 0.0:
    chosen_probs = torch.exp(policy_chosen_logps)
    rejected_probs = torch.exp(policy_rejected_logps)
    policy_chosen_rewards = (1 - chosen_probs.pow(-alpha)) / alpha
    policy_rejected_rewards = (1 - rejected_probs.pow(-alpha)) / alpha
    logits = policy_chosen_rewards - policy_rejected_rewards
  else:
    logits = policy_chosen_logps - policy_rejected_logps
  if loss_type == "simpo":
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
  elif loss_type == "sigmoid":
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
  elif loss_type == "hinge":
    losses = torch.relu(1 - beta * logits)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  if alpha != 0.0:
    chosen_rewards = beta * policy_chosen_rewards.detach()
    rejected_rewards = beta * policy_rejected_rewards.detach()
  else:
    chosen_rewards = beta * policy_chosen_logps.detach()
    rejected_rewards = beta * policy_rejected_logps.detach()
  loss = losses.mean() + cpo_alpha * policy_nll_loss
  reward_accuracies = (chosen_rewards > rejected_rewards).float()
  metrics = {
      "rewards/chosen": chosen_rewards.mean().item(),
      "rewards/rejected": rejected_rewards.mean().item(),
      "rewards/accuracies": reward_accuracies.mean().item(),
      "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
      "logps/rejected": policy_rejected_logps.detach().mean().item(),
      "logps/chosen": policy_chosen_logps.detach().mean().item(),
      "nll_loss": policy_nll_loss.detach().mean().item(),
  }
  return loss, metrics


def _torch_run(torch, pc, pr, nll, dtype, **kw):
  ts = [torch.tensor(np.asarray(x), dtype=dtype, requires_grad=True) for x in (pc, pr)]
  loss, m = _torch_trl_cpo(torch, *ts, torch.tensor(float(nll), dtype=dtype), **kw)
  loss.backward()
  return loss.item(), m, [t.grad.numpy() for t in ts]


@functools.lru_cache(maxsize=None)
def _all_value_and_grads(alpha):
  def run(pc, pr, nll):
    out = {}
    for loss_type in CPO_LOSS_TYPES:
      fn = lambda a, b: cpo_loss(a, b, nll, alpha=alpha, **_config(loss_type))  # noqa: E731,B023
      out[loss_type] = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(pc, pr)
    return out
  return jax.jit(run)


def _no_further_than_torch32(ours, t32, t64, rtol=1e-5, atol=1e-7):
  """|ours - f64| <= max(|torch fp32 - f64|, rtol |f64|) + atol, elementwise."""
  ours, t32, t64 = (np.asarray(x, np.float64) for x in (ours, t32, t64))
  bound = np.maximum(np.abs(t32 - t64), rtol * np.abs(t64)) + atol
  assert np.all(np.abs(ours - t64) <= bound), (ours, t32, t64)


@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.5])
def test_cpo_pytorch_trl_parity_values_metrics_and_grads(alpha):
  torch = pytest.importorskip("torch")
  pc, pr, nll = _batch(1)
  ours = _all_value_and_grads(alpha)(pc, pr, nll)
  for loss_type in CPO_LOSS_TYPES:
    kw = dict(_config(loss_type), alpha=alpha)
    (loss, m), grads = ours[loss_type]
    l32, m32, g32 = _torch_run(torch, pc, pr, nll, torch.float32, **kw)
    if alpha == 0.0:  # the same formula, term for term: fp32 against fp32
      _close(loss, l32, rtol=1e-6, atol=0)
      for g, gt in zip(grads, g32):
        _close(g, gt, rtol=1e-5, atol=1e-9)
      for name, value in m32.items():
        _close(m[name], value, rtol=1e-5, atol=1e-7)
    else:
      # TRL's (1 - exp(l)**-alpha) / alpha cancels in fp32, our expm1 form does not:
      # no further from a float64 run than TRL's own fp32 run.
      l64, m64, g64 = _torch_run(torch, pc, pr, nll, torch.float64, **kw)
      _no_further_than_torch32(loss, l32, l64)
      for g, gt32, gt64 in zip(grads, g32, g64):
        _no_further_than_torch32(g, gt32, gt64)
      for name in m64:
        _no_further_than_torch32(m[name], m32[name], m64[name])


def _torch_trl_forward(torch, logits, labels, n_chosen, average):
  """CPOTrainer.concatenated_forward's NLL and get_batch_logps (decoder-only)."""
  logits_t, labels_t = torch.tensor(logits), torch.tensor(labels)
  nll = torch.nn.CrossEntropyLoss()(logits_t[:n_chosen, :-1, :].reshape(-1, logits.shape[-1]),
                                    labels_t[:n_chosen, 1:].reshape(-1))
  lab = labels_t[:, 1:].clone()
  mask = lab != -100
  lab[lab == -100] = 0
  per_token = torch.gather(logits_t[:, :-1, :].log_softmax(-1), 2, lab.unsqueeze(2)).squeeze(2)
  logps = (per_token * mask).sum(-1)
  if average:
    logps = logps / mask.sum(-1)
  return nll, logps[:n_chosen], logps[n_chosen:]


def test_cpo_recipe_from_logits_matches_trl_forward():
  # The docstring's recipe: sequence_log_probs (summed for sigmoid/hinge, averaged for
  # ipo/simpo/alphapo) and causal_lm_loss on the chosen completion labels for the NLL.
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  b, t, v = 3, 9, 11
  logits = rng.normal(0.0, 2.0, (2 * b, t, v)).astype(np.float32)
  labels = rng.integers(0, v, (2 * b, t)).astype(np.int64)
  labels[:, :3] = IGNORE
  labels[2, -2:] = labels[5, -3:] = IGNORE

  @jax.jit
  def recipe(logits, labels):
    out = {}
    for loss_type in CPO_LOSS_TYPES:
      logps = sequence_log_probs(logits, labels, shift=True,
                                 average=loss_type in ("ipo", "simpo", "alphapo"))
      nll = causal_lm_loss(logits[:b], labels[:b])
      out[loss_type] = cpo_loss(logps[:b], logps[b:], nll, **_config(loss_type))[0]
    return out

  ours = recipe(logits, labels)
  for loss_type in CPO_LOSS_TYPES:
    nll, pc, pr = _torch_trl_forward(torch, logits, labels, b,
                                     average=loss_type in ("ipo", "simpo", "alphapo"))
    ref, _ = _torch_trl_cpo(torch, pc, pr, nll, alpha=0.0, **_config(loss_type))
    _close(ours[loss_type], ref.item(), rtol=2e-6, atol=0)


# ---------------------------------------------------------------------------------------
# Properties.


def _losses_and_grads(alpha):
  def run(pc, pr, beta):
    out = {}
    for loss_type in CPO_LOSS_TYPES:
      fn = lambda a, b: cpo_loss(a, b, None, beta=beta, loss_type=loss_type,  # noqa: E731,B023
                                 cpo_alpha=0.0, alpha=alpha)[0]
      out[loss_type] = jax.value_and_grad(fn, argnums=(0, 1))(pc, pr)
    return out
  return jax.jit(run)


_PROPERTY_FNS = {a: _losses_and_grads(a) for a in (0.0, 0.3, -0.7)}


@settings(max_examples=15, deadline=None)
@given(pc=st.lists(st.floats(-20.0, 0.0, width=32), min_size=4, max_size=4),
       pr=st.lists(st.floats(-20.0, 0.0, width=32), min_size=4, max_size=4),
       alpha=st.sampled_from(sorted(_PROPERTY_FNS)), beta=st.floats(0.05, 2.0))
def test_cpo_properties(pc, pr, alpha, beta):
  pc, pr = np.asarray(pc, np.float32), np.asarray(pr, np.float32)
  out = _PROPERTY_FNS[alpha](pc, pr, beta)
  for loss_type, (loss, (gc, gr)) in out.items():
    assert np.isfinite(loss) and float(loss) >= 0.0, loss_type
    assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr)), loss_type
    if loss_type != "ipo":  # a likelier chosen lowers the loss, a likelier rejected raises
      assert np.all(np.asarray(gc) <= 0) and np.all(np.asarray(gr) >= 0), loss_type
    # A pair's gradients are equal and opposite in h (alpha = 0: the log-probs enter
    # only through h = l_c - l_r).
    if alpha == 0.0:
      _close(gc, -np.asarray(gr), rtol=1e-6, atol=0)


def test_simpo_and_alphapo_limits():
  pc, pr, nll = _batch(5)

  @jax.jit
  def variants(pc, pr, nll):
    return {
        "simpo_gamma0": cpo_loss(pc, pr, nll, loss_type="simpo", simpo_gamma=0.0),
        "sigmoid": cpo_loss(pc, pr, nll, loss_type="sigmoid"),
        "alphapo": cpo_loss(pc, pr, nll, loss_type="alphapo", alpha=0.2),
        "simpo_no_nll": cpo_loss(pc, pr, None, loss_type="simpo", cpo_alpha=0.0, alpha=0.2),
        "alpha_tiny": cpo_loss(pc, pr, nll, loss_type="alphapo", alpha=1e-6),
        "alpha_zero": cpo_loss(pc, pr, nll, loss_type="alphapo", alpha=0.0),
    }

  out = variants(pc, pr, nll)
  # SimPO with gamma = 0 is the sigmoid loss (on the same log-probs).
  _close(out["simpo_gamma0"][0], out["sigmoid"][0], rtol=1e-6, atol=0)
  # alphapo = simpo without the NLL term (cpo_alpha forced to 0, as TRL's config).
  chex.assert_trees_all_close(out["alphapo"], out["simpo_no_nll"])
  # alpha -> 0 recovers the log-prob reward.
  _close(out["alpha_tiny"][0], out["alpha_zero"][0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("alpha", [0.0, -0.5])
def test_cpo_finite_at_huge_log_prob_gaps(alpha):
  big = jnp.asarray([-1e4, 0.0, -5e3, -1.0, -1e4, 0.0], jnp.float32)
  other = jnp.asarray([0.0, -1e4, 0.0, -1e4, -1e4, 0.0], jnp.float32)
  fn = _all_value_and_grads(alpha)
  for a, b in [(big, other), (other, big)]:
    for loss_type, ((loss, m), grads) in fn(a, b, jnp.float32(1.0)).items():
      assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values()), loss_type
      for g in grads:
        assert np.all(np.isfinite(g)), (loss_type, g)
      if alpha == 0.0:
        ref, _, _ = _np_cpo(a, b, 1.0, alpha=alpha, **_config(loss_type))
        _close(loss, ref, rtol=1e-5)


def test_cpo_empty_batch_gives_the_nll_term():
  e = jnp.zeros((0,), jnp.float32)
  for loss_type in CPO_LOSS_TYPES:
    fn = lambda a: _cpo(a, e, jnp.float32(2.0), **_config(loss_type))  # noqa: E731,B023
    (loss, m), g = jax.value_and_grad(fn, has_aux=True)(e)
    _close(loss, 0.0 if loss_type == "alphapo" else 1.4, atol=0)
    assert g.shape == (0,) and all(np.isfinite(v) for v in m.values())


def test_cpo_nll_term_left_out_when_cpo_alpha_is_zero():
  pc, pr, _ = _batch(6)
  # A NaN NLL with cpo_alpha = 0 does not leak (TRL does not compute it then).
  a, m = _cpo(pc, pr, jnp.float32(jnp.nan), cpo_alpha=0.0)
  b, _ = _cpo(pc, pr, None, cpo_alpha=0.0)
  _close(a, b, atol=0)
  assert float(m["nll_loss"]) == 0.0
  g = jax.grad(lambda n: _cpo(pc, pr, n, cpo_alpha=0.5)[0])(jnp.float32(1.0))
  _close(g, 0.5, atol=0)


def test_cpo_dtypes():
  pc, pr, nll = _batch(7)
  loss, m = _cpo(jnp.asarray(pc, jnp.bfloat16), jnp.asarray(pr, jnp.bfloat16),
                 jnp.asarray(nll, jnp.bfloat16))
  chex.assert_type([loss, *m.values()], jnp.float32)
  with _x64():
    kw = dict(_config("simpo"), alpha=0.25)
    loss, m = _cpo(jnp.asarray(pc, jnp.float64), jnp.asarray(pr, jnp.float64),
                   jnp.asarray(nll, jnp.float64), **kw)
    chex.assert_type([loss, *m.values()], jnp.float64)
    _close(loss, _np_cpo(pc, pr, nll, **kw)[0], rtol=1e-12, atol=0)


def test_cpo_bad_arguments():
  pc, pr, nll = _batch(8)
  with pytest.raises(ValueError, match="loss_type"):
    cpo_loss(pc, pr, nll, loss_type="kto_pair")
  with pytest.raises(ValueError, match="beta"):
    cpo_loss(pc, pr, nll, beta=0.0)
  with pytest.raises(TypeError, match="beta"):
    cpo_loss(pc, pr, nll, beta="0.1")
  with pytest.raises(ValueError, match="label_smoothing"):
    cpo_loss(pc, pr, nll, label_smoothing=0.6)
  for loss_type in ("hinge", "ipo"):
    with pytest.raises(ValueError, match="label_smoothing"):
      cpo_loss(pc, pr, nll, loss_type=loss_type, label_smoothing=0.1)
  with pytest.raises(ValueError, match="cpo_alpha"):
    cpo_loss(pc, pr, nll, cpo_alpha=-1.0)
  with pytest.raises(ValueError, match="nll_loss"):
    cpo_loss(pc, pr, None)
  with pytest.raises(ValueError, match="nll_loss"):
    cpo_loss(pc, pr, jnp.ones(2))
  with pytest.raises(TypeError, match="simpo_gamma"):
    cpo_loss(pc, pr, nll, simpo_gamma="0.5")
  with pytest.raises(ValueError, match="alpha"):
    cpo_loss(pc, pr, nll, alpha=float("inf"))
  with pytest.raises(ValueError, match="alpha"):
    jax.jit(lambda a: cpo_loss(pc, pr, nll, alpha=a))(0.1)
  with pytest.raises(ValueError, match="policy_rejected_logps"):
    cpo_loss(pc, pr[:2], nll)


def test_cpo_vmaps_over_batches():
  batches = [_batch(s) for s in (9, 10, 11)]
  stacked = [np.stack(x) for x in zip(*batches)]
  kw = _config("simpo")
  losses, ms = jax.jit(jax.vmap(lambda *a: cpo_loss(*a, alpha=0.25, **kw)))(*stacked)
  for k, b in enumerate(batches):
    loss, m = _cpo(*b, alpha=0.25, **kw)
    _close(losses[k], loss, rtol=1e-6, atol=0)
    _close(ms["rewards/margins"][k], m["rewards/margins"], rtol=1e-6, atol=0)
