"""Tests for jaxopt_llm.losses.bco: TRL's BCOTrainer loss with explicit running state.

BCO left TRL after 1.13.0 (``trl.experimental.bco``); the PyTorch re-implementation here
mirrors TRL 1.13.0's ``RunningMoments.update``, ``BCOTrainer.bco_loss``,
``_get_udm_weight``, ``get_batch_loss_metrics`` and ``log`` (loss, metrics, gradients
w.r.t. the policy log-probs, the running state over several steps). Also: the written
equation, the running moments against float64 numpy over all rewards seen, the state
through ``lax.scan``, finiteness at +-1e4 log-ratio gaps, the empty batch, bad arguments.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_llm.losses import BCOState, bco_init, bco_loss, bco_update

METRICS = {"delta", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected", "count/chosen", "count/rejected"}
# Jitted once per signature: eager jnp ops each compile on their own, which is slow.
_bco = jax.jit(bco_loss, static_argnames=("update",))
_update = jax.jit(bco_update)


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
  ref = (pi + rng.normal(0.0, 5.0, b)).astype(np.float32)
  labels = rng.random(b) < 0.5
  labels[0], labels[1] = True, False
  prob = rng.uniform(0.02, 0.98, b).astype(np.float32)
  return pi, ref, labels, prob


# ---------------------------------------------------------------------------------------
# The written equation (float64 numpy).


def _np_softplus(z):
  return np.logaddexp(0.0, np.asarray(z, np.float64))


def _np_bco(pi, ref, labels, delta, beta, weight=None):
  r = beta * (np.asarray(pi, np.float64) - np.asarray(ref, np.float64))
  rejected = _np_softplus(r - delta)  # -log sigma(-(r - delta))
  if weight is not None:
    rejected = rejected * weight
  return np.where(labels, _np_softplus(-(r - delta)), rejected).mean(), r


def test_bco_matches_written_formula():
  pi, ref, labels, prob = _batch(0)
  state = bco_init()
  loss, m, new = _bco(pi, ref, labels, state, beta=0.2)
  chex.assert_type(loss, jnp.float32)
  chex.assert_shape(loss, ())
  assert set(m) == METRICS
  r = 0.2 * (pi.astype(np.float64) - ref)
  # First update from mean 0, var 1, count 1e-24: the batch's mean and (population) var.
  _close(new.mean, r.mean())
  _close(new.var, r.var(), rtol=2e-5)
  _close(new.count, 8.0, rtol=0, atol=0)
  _close(m["delta"], r.mean())
  _close(loss, _np_bco(pi, ref, labels, r.mean(), 0.2)[0])
  _close(m["rewards/chosen"], r[labels].mean())
  _close(m["rewards/rejected"], r[~labels].mean())
  _close(m["rewards/margins"], r[labels].mean() - r[~labels].mean())
  _close(m["logps/chosen"], pi[labels].astype(np.float64).mean())
  _close(m["count/chosen"], labels.sum(), atol=0)
  _close(m["count/rejected"], (~labels).sum(), atol=0)
  # With UDM weights for the undesirable examples.
  loss, _, _ = _bco(pi, ref, labels, state, beta=0.2, desirable_prob=prob,
                    min_density_ratio=0.5, max_density_ratio=3.0)
  w = np.clip(prob.astype(np.float64) / (1 - prob + 1e-8), 0.5, 3.0)
  _close(loss, _np_bco(pi, ref, labels, r.mean(), 0.2, weight=w)[0])


# ---------------------------------------------------------------------------------------
# TRL 1.13.0 trl/experimental/bco/bco_trainer.py, re-implemented in torch (one process).


class _TorchRunningMoments:
  """RunningMoments (not distributed): mean/count in Python floats, var via .item()."""

  def __init__(self):
    self.mean, self.std, self.var, self.count = 0, 1, 1, 1e-24

  def update(self, xs, torch):
    xs_count = xs.numel()
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    xs_mean, xs_var = xs_mean.float(), xs_var.float()
    delta = xs_mean - self.mean
    tot_count = self.count + xs_count
    new_sum = xs_var * xs_count
    old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
    tot_sum = old_sum + new_sum
    self.mean += (delta * xs_count / tot_count).item()
    new_var = tot_sum / tot_count
    self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
    self.var = new_var.item()
    self.count = tot_count


def _torch_trl_bco(torch, running, policy_logps, reference_logps, labels, *, beta,
                   do_train, prob=None, min_ratio=0.5, max_ratio=10.0):
  """forward's chosen/rejected split + bco_loss + get_batch_loss_metrics + log."""
  F = torch.nn.functional
  chosen_idx = [i for i in range(policy_logps.shape[0]) if labels[i] is True]
  rejected_idx = [i for i in range(policy_logps.shape[0]) if labels[i] is False]
  policy_chosen_logps = policy_logps[chosen_idx, ...]
  policy_rejected_logps = policy_logps[rejected_idx, ...]
  reference_chosen_logps = reference_logps[chosen_idx, ...]
  reference_rejected_logps = reference_logps[rejected_idx, ...]
  # bco_loss
  chosen_logratios = policy_chosen_logps - reference_chosen_logps
  chosen_rewards = beta * chosen_logratios
  rejected_logratios = policy_rejected_logps - reference_rejected_logps
  rejected_rewards = beta * rejected_logratios
  if do_train:
    running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach(), torch)
  delta = torch.as_tensor(running.mean)
  chosen_losses = -F.logsigmoid(chosen_rewards - delta)
  rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
  if prob is not None:  # match_underlying_distribution, _get_udm_weight
    prob_desirable = prob[rejected_idx]
    rejected_weight = (prob_desirable / (1 - prob_desirable + 1e-8)).clamp(
        min=min_ratio, max=max_ratio)
    losses = torch.cat((torch.ones_like(chosen_losses) * chosen_losses,
                        rejected_weight * rejected_losses), dim=0)
  else:
    losses = torch.cat((chosen_losses, rejected_losses), dim=0)
  # get_batch_loss_metrics, then log()'s sum / count
  metrics = {"delta": delta.mean().item()}
  if len(chosen_rewards) > 0:
    n = len(chosen_rewards)
    metrics["rewards/chosen"] = chosen_rewards.detach().nansum().item() / n
    metrics["logps/chosen"] = policy_chosen_logps.detach().nansum().item() / n
    metrics["count/chosen"] = n
  if len(rejected_rewards) > 0:
    n = len(rejected_rewards)
    metrics["rewards/rejected"] = rejected_rewards.detach().nansum().item() / n
    metrics["logps/rejected"] = policy_rejected_logps.detach().nansum().item() / n
    metrics["count/rejected"] = n
  if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
  return losses.nanmean(), metrics


@pytest.mark.parametrize("udm", [False, True])
def test_bco_pytorch_trl_parity_over_several_steps(udm):
  torch = pytest.importorskip("torch")
  running = _TorchRunningMoments()
  state = bco_init()
  value_and_grad = jax.jit(
      jax.value_and_grad(
          lambda p, *a, **k: bco_loss(p, *a, **k)[::2], has_aux=True),
      static_argnames=("update",))
  # Training steps of varying composition (all desirable, all undesirable), then an
  # evaluation step that must not move the running mean.
  for step, (seed, mix, do_train) in enumerate(
      [(1, None, True), (2, True, True), (3, False, True), (4, None, True),
       (5, None, False)]):
    pi, ref, labels, prob = _batch(seed)
    if mix is not None:
      labels = np.full_like(labels, mix)
    t_pi = torch.tensor(pi, requires_grad=True)
    ref_loss, ref_m = _torch_trl_bco(
        torch, running, t_pi, torch.tensor(ref), [bool(x) for x in labels], beta=0.1,
        do_train=do_train, prob=torch.tensor(prob) if udm else None, max_ratio=4.0)
    ref_loss.backward()
    kw = dict(desirable_prob=prob, max_density_ratio=4.0) if udm else {}
    (loss, new_state), grad = value_and_grad(pi, ref, labels, state, beta=0.1,
                                             update=do_train, **kw)
    _, m, _ = _bco(pi, ref, labels, state, beta=0.1, update=do_train, **kw)
    state = new_state
    _close(loss, ref_loss.item(), rtol=1e-5, atol=0)
    _close(grad, t_pi.grad.numpy(), rtol=1e-5, atol=1e-10)
    _close(state.mean, running.mean, rtol=1e-5, atol=1e-7)
    _close(state.var, running.var, rtol=1e-5, atol=0)
    _close(state.count, running.count, rtol=1e-7, atol=0)
    for name in METRICS:
      if name in ref_m:
        _close(m[name], ref_m[name], rtol=1e-5, atol=1e-6)
      else:  # TRL logs nothing for a kind the batch lacks; we give 0.0.
        assert float(m[name]) == 0.0, (step, name)


# ---------------------------------------------------------------------------------------
# The running state.


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_running_moments_are_the_moments_of_everything_seen(sizes, seed):
  # However the stream is split into batches, the state is the mean / population variance
  # of all rewards so far (up to the 1e-24 initial count).
  rng = np.random.default_rng(seed)
  xs = rng.normal(3.0, 2.0, sum(sizes)).astype(np.float32)
  state = bco_init()
  start = 0
  for n in sizes:
    state = bco_update(state, xs[start:start + n])
    start += n
  x64 = xs.astype(np.float64)
  _close(state.mean, x64.mean(), rtol=1e-5, atol=1e-6)
  _close(state.var, x64.var(), rtol=1e-4, atol=1e-5)
  _close(state.count, xs.size, rtol=0, atol=0)


def test_state_through_scan_keeps_dtype_and_update_false_keeps_state():
  pis, refs = (np.stack([_batch(s)[i] for s in range(4)]) for i in (0, 1))
  labels = np.stack([_batch(s)[2] for s in range(4)])

  def step(state, batch):
    loss, _, state = bco_loss(*batch, state)
    return state, loss

  state, losses = jax.jit(lambda s: jax.lax.scan(step, s, (pis, refs, labels)))(bco_init())
  assert isinstance(state, BCOState)
  chex.assert_type(list(state), jnp.float32)
  r = 0.1 * (pis.astype(np.float64) - refs)
  _close(state.mean, r.mean())
  # Each step's loss uses the mean *after* its own update (TRL's order).
  for k in range(4):
    _close(losses[k], _np_bco(pis[k], refs[k], labels[k], r[:k + 1].mean(), 0.1)[0])
  _, m, same = _bco(pis[0], refs[0], labels[0], state, update=False)
  chex.assert_trees_all_equal(same, state)
  _close(m["delta"], state.mean, rtol=0, atol=0)


def test_delta_carries_no_gradient():
  # d loss / d log pi_i with delta held fixed: -beta sigma(-(r - delta)) / B (desirable),
  # +beta w sigma(r - delta) / B (undesirable).
  pi, ref, labels, _ = _batch(6)
  beta = 0.3
  grad = jax.jit(jax.grad(lambda p: bco_loss(p, ref, labels, bco_init(), beta=beta)[0]))(pi)
  r = beta * (pi.astype(np.float64) - ref)
  s = 1 / (1 + np.exp(-(r - r.mean())))
  _close(grad, np.where(labels, -beta * (1 - s), beta * s) / 8, rtol=1e-5, atol=1e-9)
  jac = jax.jit(jax.jacrev(lambda p: bco_loss(p, ref, labels, bco_init())[1]))(pi)
  for name, g in jac.items():
    assert np.all(np.asarray(g) == 0.0), name


def test_bco_finite_at_huge_log_ratio_gaps():
  big = jnp.asarray([1e4, -1e4, 0.0, 5e3, -5e3, 1.0], jnp.float32)
  zero = jnp.zeros(6)
  labels = jnp.asarray([True, False, True, False, True, False])
  prob = jnp.asarray([0.0, 1.0, 0.5, 1.0, 0.0, 0.99], jnp.float32)
  vg = jax.jit(jax.value_and_grad(
      lambda p, r, s, q: bco_loss(p, r, labels, s, beta=1.0, desirable_prob=q)[0]))
  state = BCOState(*(jnp.asarray(x, jnp.float32) for x in (5e3, 1e7, 100.0)))
  for a, b in [(big, zero), (zero, big), (-big, big)]:
    for s in (bco_init(), state):
      loss, g = vg(a, b, s, prob)
      assert np.isfinite(loss) and np.all(np.isfinite(g)), (a, b, s)


def test_bco_empty_batch_is_zero_and_keeps_state():
  e = jnp.zeros((0,), jnp.float32)
  state = BCOState(*(jnp.asarray(x, jnp.float32) for x in (1.5, 2.0, 10.0)))
  loss, m, new = _bco(e, e, jnp.zeros((0,), bool), state)
  assert float(loss) == 0.0
  chex.assert_trees_all_equal(new, state)
  assert float(m["delta"]) == 1.5
  assert all(np.isfinite(v) for v in m.values())


def test_bco_dtypes():
  pi, ref, labels, _ = _batch(7)
  loss, m, state = _bco(jnp.asarray(pi, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16),
                        labels, bco_init())
  chex.assert_type([loss, *m.values(), *state], jnp.float32)
  with _x64():
    loss, m, state = _bco(jnp.asarray(pi, jnp.float64), jnp.asarray(ref, jnp.float64),
                          labels, bco_init(jnp.float64))
    chex.assert_type([loss, *m.values(), *state], jnp.float64)
    r = 0.1 * (pi.astype(np.float64) - ref)
    _close(loss, _np_bco(pi, ref, labels, r.mean(), 0.1)[0], rtol=1e-12, atol=0)
    # A float32 state stays float32 (a stable scan carry), computed in float64.
    _, _, s32 = _bco(jnp.asarray(pi, jnp.float64), jnp.asarray(ref, jnp.float64), labels,
                     bco_init())
    chex.assert_type(list(s32), jnp.float32)


def test_bco_bad_arguments():
  pi, ref, labels, prob = _batch(8)
  s = bco_init()
  with pytest.raises(ValueError, match="beta"):
    bco_loss(pi, ref, labels, s, beta=0.0)
  with pytest.raises(TypeError, match="beta"):
    bco_loss(pi, ref, labels, s, beta="0.1")
  with pytest.raises(ValueError, match="update"):
    bco_loss(pi, ref, labels, s, update=1)
  with pytest.raises(ValueError, match="state"):
    bco_loss(pi, ref, labels, (0.0, 1.0, 1e-24))
  with pytest.raises(ValueError, match="state"):
    bco_update((0.0, 1.0, 1e-24), pi)
  with pytest.raises(ValueError, match="rewards"):
    bco_update(s, np.arange(3))
  with pytest.raises(ValueError, match="min_density_ratio"):
    bco_loss(pi, ref, labels, s, desirable_prob=prob, min_density_ratio=-1.0)
  with pytest.raises(ValueError, match="max_density_ratio"):
    bco_loss(pi, ref, labels, s, desirable_prob=prob, min_density_ratio=5.0,
             max_density_ratio=2.0)
  with pytest.raises(ValueError, match="desirable_prob"):
    bco_loss(pi, ref, labels, s, desirable_prob=prob[:3])
  with pytest.raises(ValueError, match="reference_logps"):
    bco_loss(pi, ref[:3], labels, s)
  with pytest.raises(ValueError, match="labels"):
    bco_loss(pi, ref, labels.astype(np.float32), s)
  with pytest.raises(ValueError, match="policy_logps"):
    bco_loss(np.arange(8), ref, labels, s)


def test_bco_vmaps_over_batches_and_states():
  batches = [_batch(s)[:3] for s in (9, 10, 11)]
  states = [bco_init(), BCOState(*(jnp.asarray(x, jnp.float32) for x in (1.0, 2.0, 5.0))),
            BCOState(*(jnp.asarray(x, jnp.float32) for x in (-3.0, 0.5, 40.0)))]
  stacked = [np.stack(x) for x in zip(*batches)]
  stacked_states = jax.tree.map(lambda *x: jnp.stack(x), *states)
  losses, ms, new = jax.jit(jax.vmap(bco_loss))(*stacked, stacked_states)
  for k, (b, s) in enumerate(zip(batches, states)):
    loss, m, n = _bco(*b, s)
    _close(losses[k], loss, rtol=1e-6, atol=0)
    _close(ms["delta"][k], m["delta"], rtol=1e-6, atol=0)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[k], new), n, rtol=1e-6)  # noqa: B023
