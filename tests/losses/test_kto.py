"""Tests for jaxopt_llm.losses.kto: TRL 1.16's KTOTrainer loss (kto, apo_zero_unpaired).

Checked against the written equation (float64 numpy), against a PyTorch re-implementation
of TRL 1.16.0's ``KTOTrainer._compute_loss`` (loss, metrics, gradients w.r.t. the policy
log-probs) and on properties: the detached, clamped KL reference point, the loss bounds,
finiteness at +-1e4 log-ratio gaps, the empty batch, bad arguments.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_llm.losses import kto_loss
from jaxopt_llm.losses.kto import KTO_LOSS_TYPES

METRICS = {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected"}
# Jitted once per signature: eager jnp ops each compile on their own, which is slow.
_kto = jax.jit(kto_loss, static_argnames=("loss_type",))


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def _x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.8
  return enable_x64()


def _batch(seed, b=8, scale=20.0):
  rng = np.random.default_rng(seed)
  pi = (-scale * rng.random(b) - 1.0).astype(np.float32)
  ref = (pi + rng.normal(0.0, 3.0, b)).astype(np.float32)
  labels = rng.random(b) < 0.5
  labels[0], labels[1] = True, False
  kl_pi = (-scale * rng.random(b) - 1.0).astype(np.float32)
  # Mostly positive mean KL (the usual case), so the clamp does not hide the term.
  kl_ref = (kl_pi - np.abs(rng.normal(1.0, 2.0, b))).astype(np.float32)
  return pi, ref, labels, kl_pi, kl_ref


def _kwargs(loss_type, beta, dw, uw):
  return dict(beta=beta, loss_type=loss_type, desirable_weight=dw, undesirable_weight=uw)


def _kl_args(loss_type, kl_pi, kl_ref):
  return (kl_pi, kl_ref) if loss_type == "kto" else (None, None)


# ---------------------------------------------------------------------------------------
# The written equation (float64 numpy).


def _sig(z):
  return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))  # no overflow warning


def _np_kto(pi, ref, labels, kl_pi, kl_ref, *, beta, loss_type, dw, uw):
  pi, ref = np.asarray(pi, np.float64), np.asarray(ref, np.float64)
  rho = pi - ref
  if loss_type == "kto":
    z = max(np.mean(np.asarray(kl_pi, np.float64) - np.asarray(kl_ref, np.float64)), 0.0)
    losses = np.where(labels, dw * (1 - _sig(beta * (rho - z))),
                      uw * (1 - _sig(beta * (z - rho))))
  else:
    z = 0.0
    losses = np.where(labels, dw * (1 - _sig(beta * rho)), uw * _sig(beta * rho))
  return losses.mean(), z


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_kto_matches_written_formula(loss_type):
  pi, ref, labels, kl_pi, kl_ref = _batch(0)
  kw = _kwargs(loss_type, 0.3, 1.5, 0.75)
  loss, m = _kto(pi, ref, labels, *_kl_args(loss_type, kl_pi, kl_ref), **kw)
  chex.assert_type(loss, jnp.float32)
  chex.assert_shape(loss, ())
  assert set(m) == METRICS
  ref_loss, z = _np_kto(pi, ref, labels, kl_pi, kl_ref, beta=0.3, loss_type=loss_type,
                        dw=1.5, uw=0.75)
  _close(loss, ref_loss)
  _close(m["kl"], z)
  r = 0.3 * (pi.astype(np.float64) - ref)
  _close(m["rewards/chosen"], r[labels].mean())
  _close(m["rewards/rejected"], r[~labels].mean())
  _close(m["rewards/margins"], r[labels].mean() - r[~labels].mean())
  _close(m["logps/chosen"], pi[labels].astype(np.float64).mean())
  _close(m["logps/rejected"], pi[~labels].astype(np.float64).mean())


def test_kto_known_value():
  # One desirable example, rho = 2, KL = 1, beta = 1: loss = 1 - sigma(1).
  loss, m = _kto(jnp.asarray([-1.0]), jnp.asarray([-3.0]), jnp.asarray([True]),
                     jnp.asarray([-2.0, -4.0]), jnp.asarray([-3.0, -5.0]), beta=1.0)
  _close(loss, 1.0 - _sig(1.0))
  _close(m["kl"], 1.0)


# ---------------------------------------------------------------------------------------
# TRL 1.16.0 KTOTrainer._compute_loss, re-implemented in torch (one process: the
# accelerator gathers are identities). Mirrors trl/trainer/kto_trainer.py lines ~1442-1533.


def _torch_trl_kto(torch, completion_logps, ref_completion_logps, label, KL_logps,
                   ref_KL_logps, *, beta, loss_type, desirable_weight, undesirable_weight):
  F = torch.nn.functional
  device = completion_logps.device
  bool_labels = torch.as_tensor(label, dtype=torch.bool, device=device)
  num_chosen = bool_labels.sum()
  num_rejected = len(bool_labels) - num_chosen
  chosen_idx = torch.nonzero(bool_labels, as_tuple=False).view(-1)
  rejected_idx = torch.nonzero(~bool_labels, as_tuple=False).view(-1)
  chosen_logps = completion_logps.index_select(0, chosen_idx)
  rejected_logps = completion_logps.index_select(0, rejected_idx)
  ref_chosen_logps = ref_completion_logps.index_select(0, chosen_idx)
  ref_rejected_logps = ref_completion_logps.index_select(0, rejected_idx)
  if loss_type != "apo_zero_unpaired":  # calculate_KL
    kl = (KL_logps - ref_KL_logps).mean().detach()
    kl = kl.mean().clamp(min=0)
  else:
    kl = torch.zeros(1, dtype=completion_logps.dtype)
  if chosen_logps.shape[0] != 0 or ref_chosen_logps.shape[0] != 0:
    chosen_logratios = chosen_logps - ref_chosen_logps
    if loss_type == "kto":
      chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    elif loss_type == "apo_zero_unpaired":
      chosen_losses = 1 - F.sigmoid(beta * chosen_logratios)
    chosen_rewards = beta * chosen_logratios.detach()
  else:
    chosen_losses = torch.Tensor([]).to(completion_logps)
    chosen_rewards = torch.Tensor([]).to(completion_logps)
  if rejected_logps.shape[0] != 0 or ref_rejected_logps.shape[0] != 0:
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "kto":
      rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    elif loss_type == "apo_zero_unpaired":
      rejected_losses = F.sigmoid(beta * rejected_logratios)
    rejected_rewards = beta * rejected_logratios.detach()
  else:
    rejected_losses = torch.Tensor([]).to(completion_logps)
    rejected_rewards = torch.Tensor([]).to(completion_logps)
  losses = torch.cat((desirable_weight * chosen_losses,
                      undesirable_weight * rejected_losses), 0)
  metrics = {"kl": kl.item()}
  if num_chosen > 0:
    metrics["rewards/chosen"] = chosen_rewards.nansum().item() / num_chosen.item()
    metrics["logps/chosen"] = chosen_logps.detach().nansum().item() / num_chosen.item()
  if num_rejected > 0:
    metrics["rewards/rejected"] = rejected_rewards.nansum().item() / num_rejected.item()
    metrics["logps/rejected"] = rejected_logps.detach().nansum().item() / num_rejected.item()
  if num_chosen > 0 and num_rejected > 0:
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
  return losses.nanmean(), metrics


@jax.jit
def _all_value_and_grads(pi, ref, labels, kl_pi, kl_ref):
  out = {}
  for loss_type in KTO_LOSS_TYPES:
    kw = _kwargs(loss_type, 0.2, 1.3, 0.7)
    fn = lambda p: kto_loss(p, ref, labels, *_kl_args(loss_type, kl_pi, kl_ref), **kw)  # noqa: E731,B023
    out[loss_type] = jax.value_and_grad(fn, has_aux=True)(pi)
  return out


@pytest.mark.parametrize("label_mix", ["mixed", "all_chosen", "all_rejected"])
def test_kto_pytorch_trl_parity_values_metrics_and_grads(label_mix):
  torch = pytest.importorskip("torch")
  pi, ref, labels, kl_pi, kl_ref = _batch(1)
  if label_mix != "mixed":
    labels = np.full_like(labels, label_mix == "all_chosen")
  ours = _all_value_and_grads(pi, ref, labels, kl_pi, kl_ref)
  for loss_type in KTO_LOSS_TYPES:
    t_pi = torch.tensor(pi, requires_grad=True)
    ref_loss, ref_m = _torch_trl_kto(
        torch, t_pi, torch.tensor(ref), labels.tolist(), torch.tensor(kl_pi),
        torch.tensor(kl_ref), beta=0.2, loss_type=loss_type, desirable_weight=1.3,
        undesirable_weight=0.7)
    ref_loss.backward()
    (loss, m), grad = ours[loss_type]
    _close(loss, ref_loss.item(), rtol=1e-5, atol=0)
    _close(grad, t_pi.grad.numpy(), rtol=1e-5, atol=1e-9)
    for name in METRICS:
      if name in ref_m:
        _close(m[name], ref_m[name], rtol=1e-5, atol=1e-6)
      else:  # TRL logs nothing for a kind the batch lacks; we give 0.0.
        assert float(m[name]) == 0.0, name


# ---------------------------------------------------------------------------------------
# The KL reference point and other properties.


def test_kl_is_detached_and_clamped_at_zero():
  pi, ref, labels, kl_pi, kl_ref = _batch(2)
  # Gradient w.r.t. the KL log-probs is exactly zero (TRL: no_grad + detach).
  g = jax.jit(jax.grad(lambda a, b: _kto(pi, ref, labels, a, b)[0], argnums=(0, 1)))(
      kl_pi, kl_ref)
  for gi in g:
    assert np.all(np.asarray(gi) == 0.0)
  # A negative KL estimate is clamped to 0: the loss equals the one with KL exactly 0.
  neg, m = _kto(pi, ref, labels, kl_ref, kl_pi)  # swapped: mean KL < 0
  assert float(m["kl"]) == 0.0
  zero, _ = _kto(pi, ref, labels, kl_pi, kl_pi)
  _close(neg, zero, rtol=0, atol=0)
  # The KL batch may have its own size (e.g. fewer mismatched pairs).
  loss, m = _kto(pi, ref, labels, kl_pi[:3], kl_ref[:3])
  _close(m["kl"], max(np.mean(kl_pi[:3].astype(np.float64) - kl_ref[:3]), 0.0))


@jax.jit
def _losses_and_grads(rho, labels, z, beta):
  zeros = jnp.zeros_like(rho)
  out = {}
  for loss_type in KTO_LOSS_TYPES:
    kl = (jnp.full((2,), z), jnp.zeros(2)) if loss_type == "kto" else (None, None)
    fn = lambda p: kto_loss(p, zeros, labels, *kl, beta=beta, loss_type=loss_type)[0]  # noqa: E731,B023
    out[loss_type] = jax.value_and_grad(fn)(rho)
  return out


@settings(max_examples=15, deadline=None)
@given(rho=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=6,
                    max_size=6),
       bits=st.lists(st.booleans(), min_size=6, max_size=6),
       z=st.floats(0.0, 50.0, width=32), beta=st.floats(0.01, 2.0))
def test_kto_properties(rho, bits, z, beta):
  rho = np.asarray(rho, np.float32)
  labels = np.asarray(bits)
  for loss_type, (loss, grad) in _losses_and_grads(rho, labels, z, beta).items():
    g = np.asarray(grad)
    # Each per-example loss is a sigmoid in [0, 1] (weights 1): so is the mean.
    assert 0.0 <= float(loss) <= 1.0 + 1e-6 and np.all(np.isfinite(g))
    # Raising a desirable example's log-prob never raises the loss; an undesirable's
    # never lowers it.
    assert np.all(g[labels] <= 0.0) and np.all(g[~labels] >= 0.0), loss_type
    ref_loss, _ = _np_kto(rho, np.zeros_like(rho), labels, np.full(2, z), np.zeros(2),
                          beta=beta, loss_type=loss_type, dw=1.0, uw=1.0)
    _close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_kto_finite_at_huge_log_ratio_gaps():
  big = jnp.asarray([1e4, -1e4, 0.0, 5e3, -5e3, 1.0], jnp.float32)
  zero = jnp.zeros(6)
  labels = jnp.asarray([True, True, True, False, False, False])
  for args in [(big, zero), (zero, big), (-big, big)]:
    out = _losses_and_grads(args[0] - args[1], labels, 1e4, 1.0)
    for loss_type, (loss, grad) in out.items():
      assert np.isfinite(loss) and np.all(np.isfinite(grad)), (loss_type, args)
    kl = (jnp.full((6,), 1e4), -jnp.full((6,), 1e4))
    loss, m = _kto(*args, labels, *kl, beta=1.0)
    assert np.isfinite(loss) and all(np.isfinite(v) for v in m.values())


def test_kto_empty_batch_is_zero_not_nan():
  e = jnp.zeros((0,), jnp.float32)
  for loss_type in KTO_LOSS_TYPES:
    kl = (e, e) if loss_type == "kto" else (None, None)
    fn = lambda p: _kto(p, e, jnp.zeros((0,), bool), *kl, loss_type=loss_type)  # noqa: E731,B023
    (loss, m), g = jax.value_and_grad(fn, has_aux=True)(e)
    assert float(loss) == 0.0 and g.shape == (0,)
    assert all(float(v) == 0.0 for v in m.values()), m


def test_kto_jit_bf16_and_x64():
  pi, ref, labels, kl_pi, kl_ref = _batch(3)
  eager = kto_loss(pi, ref, labels, kl_pi, kl_ref)
  jitted = jax.jit(lambda *a: kto_loss(*a))(pi, ref, labels, kl_pi, kl_ref)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
  bf = [jnp.asarray(x, jnp.bfloat16) for x in (pi, ref, kl_pi, kl_ref)]
  loss, m = _kto(bf[0], bf[1], labels, bf[2], bf[3])
  chex.assert_type([loss, *m.values()], jnp.float32)
  with _x64():
    args = [jnp.asarray(x, jnp.float64) for x in (pi, ref, kl_pi, kl_ref)]
    loss, m = _kto(args[0], args[1], labels, args[2], args[3])
    chex.assert_type([loss, *m.values()], jnp.float64)
    _close(loss, _np_kto(pi, ref, labels, kl_pi, kl_ref, beta=0.1, loss_type="kto",
                         dw=1.0, uw=1.0)[0], rtol=1e-12, atol=0)


def test_kto_bad_arguments():
  pi, ref, labels, kl_pi, kl_ref = _batch(4)
  ok = (pi, ref, labels, kl_pi, kl_ref)
  with pytest.raises(ValueError, match="loss_type"):
    kto_loss(*ok, loss_type="kto_pair")
  with pytest.raises(ValueError, match="beta"):
    kto_loss(*ok, beta=0.0)
  with pytest.raises(TypeError, match="beta"):
    kto_loss(*ok, beta="0.1")
  with pytest.raises(ValueError, match="desirable_weight"):
    kto_loss(*ok, desirable_weight=-1.0)
  with pytest.raises(ValueError, match="undesirable_weight"):
    kto_loss(*ok, undesirable_weight=float("nan"))
  with pytest.raises(ValueError, match="policy_kl_logps"):
    kto_loss(pi, ref, labels)
  with pytest.raises(ValueError, match="not used"):
    kto_loss(*ok, loss_type="apo_zero_unpaired")
  with pytest.raises(ValueError, match="reference_logps"):
    kto_loss(pi, ref[:3], labels, kl_pi, kl_ref)
  with pytest.raises(ValueError, match="reference_kl_logps"):
    kto_loss(pi, ref, labels, kl_pi, kl_ref[:3])
  with pytest.raises(ValueError, match="labels"):
    kto_loss(pi, ref, labels[:3], kl_pi, kl_ref)
  with pytest.raises(ValueError, match="labels"):
    kto_loss(pi, ref, labels.astype(np.float32), kl_pi, kl_ref)
  with pytest.raises(ValueError, match="labels"):
    kto_loss(pi, ref, labels.astype(np.int32) * 2, kl_pi, kl_ref)
  with pytest.raises(ValueError, match="policy_logps"):
    kto_loss(np.arange(8), ref, labels, kl_pi, kl_ref)
  # Integer 0/1 labels are the same as booleans.
  chex.assert_trees_all_close(_kto(pi, ref, labels.astype(np.int32), kl_pi, kl_ref),
                              _kto(*ok))


def test_kto_vmaps_over_batches():
  batches = [_batch(s) for s in (5, 6, 7)]
  stacked = [np.stack(x) for x in zip(*batches)]
  losses, ms = jax.jit(jax.vmap(kto_loss))(*stacked)
  for k, b in enumerate(batches):
    loss, m = _kto(*b)
    _close(losses[k], loss, rtol=1e-6, atol=0)
    _close(ms["kl"][k], m["kl"], rtol=1e-6, atol=0)
