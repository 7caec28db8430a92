"""Sophia (official SophiaG rule): equations, PyTorch reference parity, robustness, monitors,
optax composition (chain, inject_hyperparams, masks, MultiSteps) and bad input."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import optim, schedules

F32 = np.float32


def _params():
  # numpy data: eager jax.random calls would each compile an XLA program.
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=3), jnp.float32),
          "s": jnp.asarray(rng.normal(), jnp.float32)}


def _like(params, seed, scale=1.0, positive=False):
  rng = np.random.default_rng(seed)
  def one(x):
    v = scale * rng.normal(size=x.shape)
    return jnp.asarray(np.abs(v) if positive else v, jnp.float32)
  return jax.tree.map(one, params)


# ---------------------------------------------------------------------------------------------
# Equations


def test_one_step_by_hand():
  """b1=0.9, rho=0.5, eps=0, lr=0.1, wd=0.5 (decay factor 0.95), b2=0.9:

  m1    = 0.9*m0 + 0.1*g          = [0.14, -0.01, -0.16, 0, 0.30]
  denom = 0.5*max(h0, 0)          = [0.5, 0.1, 2.0, 0, 0]
  dir   = sign(m1)*min(|m1|/denom, 1) = [0.28, -0.1, -0.08, 0 (0/0: sign 0), 1 (h<0: clipped)]
  p1    = 0.95*p - 0.1*dir        = [0.922, -1.89, 0.483, 2.85, 0.85]
  win   = #{|m1| < denom} / 5     = 3/5
  h1    = 0.9*h0 + 0.1*H          = [1.1, 0.18, 3.7, 0.5, -0.6]
  """
  tx = optim.sophia(0.1, b1=0.9, b2=0.9, rho=0.5, weight_decay=0.5, eps=0.0)
  p = jnp.array([1.0, -2.0, 0.5, 3.0, 1.0])
  state = tx.init(p)
  sophia_state = state[0]._replace(mu=jnp.array([0.1, 0.1, -0.2, 0.0, 0.3]),
                                   hessian=jnp.array([1.0, 0.2, 4.0, 0.0, -1.0]))
  state = (sophia_state,) + tuple(state[1:])
  g = jnp.array([0.5, -1.0, 0.2, 0.0, 0.3])
  u, new = tx.update(g, state, p, hessian=jnp.array([2.0, 0.0, 1.0, 5.0, 3.0]))
  chex.assert_trees_all_close(new[0].mu, jnp.array([0.14, -0.01, -0.16, 0.0, 0.30]),
                              rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(optax.apply_updates(p, u),
                              jnp.array([0.922, -1.89, 0.483, 2.85, 0.85]), rtol=1e-6)
  chex.assert_trees_all_close(new[0].hessian, jnp.array([1.1, 0.18, 3.7, 0.5, -0.6]),
                              rtol=1e-6)
  chex.assert_trees_all_close(new[0].win_rate, jnp.float32(0.6))
  assert int(new[0].count) == 1 and int(new[0].hessian_count) == 1
  chex.assert_trees_all_close(optim.sophia_win_rate(new), jnp.float32(0.6))
  chex.assert_trees_all_close(optim.sophia_hessian_norm(new),
                              jnp.float32(np.linalg.norm([1.1, 0.18, 3.7, 0.5, -0.6])),
                              rtol=1e-6)


def _numpy_sophia(p, grads, estimates, lr, b1, b2, rho, wd, eps):
  """The official rule in float64 numpy, with the documented max(h, 0)."""
  m = {k: np.zeros_like(v) for k, v in p.items()}
  h = {k: np.zeros_like(v) for k, v in p.items()}
  history = []
  for g, est in zip(grads, estimates):
    for k in p:
      p[k] = p[k] * (1 - lr * wd)
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      ratio = np.minimum(np.abs(m[k]) / (rho * np.maximum(h[k], 0) + eps), 1.0)
      p[k] = p[k] - lr * np.sign(m[k]) * ratio
      if est is not None:
        h[k] = b2 * h[k] + (1 - b2) * est[k]
    history.append(({k: v.copy() for k, v in p.items()}, {k: v.copy() for k, v in m.items()},
                    {k: v.copy() for k, v in h.items()}))
  return history


def test_matches_equation_over_steps_and_folds_only_given_estimates():
  lr, b1, b2, rho, wd, eps = 0.05, 0.8, 0.7, 0.3, 0.2, 1e-12
  tx = optim.sophia(lr, b1=b1, b2=b2, rho=rho, weight_decay=wd, eps=eps)
  params = _params()
  grads = [_like(params, 10 + t) for t in range(8)]
  # Estimates on steps 0, 3, 6 (mixed sign, as Hutchinson gives), none on the others.
  estimates = [_like(params, 50 + t, scale=3.0) if t % 3 == 0 else None for t in range(8)]
  expect = _numpy_sophia(jax.tree.map(lambda x: np.asarray(x, np.float64), params),
                         [jax.tree.map(lambda x: np.asarray(x, np.float64), g) for g in grads],
                         [None if e is None else jax.tree.map(np.asarray, e) for e in estimates],
                         lr, b1, b2, rho, wd, eps)
  state = tx.init(params)
  update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, hessian=e))
  for t in range(8):
    h_before = state[0].hessian
    u, state = update(grads[t], state, params, estimates[t])
    params = optax.apply_updates(params, u)
    p_ref, m_ref, h_ref = expect[t]
    chex.assert_trees_all_close(params, p_ref, rtol=2e-6, atol=2e-7)
    chex.assert_trees_all_close(state[0].mu, m_ref, rtol=2e-6, atol=1e-7)
    chex.assert_trees_all_close(state[0].hessian, h_ref, rtol=2e-6, atol=1e-7)
    if estimates[t] is None:
      chex.assert_trees_all_equal(state[0].hessian, h_before)  # bit-for-bit unchanged
  assert int(state[0].count) == 8 and int(state[0].hessian_count) == 3


def test_estimate_is_folded_after_the_step():
  """The step that receives an estimate still uses the old EMA (h=0: a pure sign step)."""
  tx = optim.sophia(0.1, weight_decay=0.0)
  p = jnp.array([1.0, 1.0])
  state = tx.init(p)
  u1, state = tx.update(jnp.array([0.3, -1e-4]), state, p, hessian=jnp.array([1e6, 1e6]))
  chex.assert_trees_all_close(u1, jnp.array([-0.1, 0.1]))
  u2, state = tx.update(jnp.array([0.3, -1e-4]), state, p)
  # Now h = 0.01 * 1e6 = 1e4: |m| / (0.04 * 1e4) is far below 1, no longer clipped.
  assert float(jnp.max(jnp.abs(u2))) < 1e-3
  chex.assert_trees_all_close(state[0].win_rate, jnp.float32(1.0))


@pytest.mark.parametrize("absent", ["missing", "none"])
def test_sign_momentum_before_first_estimate(absent):
  tx = optim.sophia(0.01, weight_decay=0.0)
  params = _params()
  state = tx.init(params)
  kw = {} if absent == "missing" else {"hessian": None}
  for t in range(3):
    u, state = tx.update(_like(params, t), state, params, **kw)
    expect = jax.tree.map(lambda m: -0.01 * jnp.sign(m), state[0].mu)
    chex.assert_trees_all_close(u, expect, rtol=0, atol=0)
  chex.assert_trees_all_equal(state[0].hessian, jax.tree.map(jnp.zeros_like, params))
  assert int(state[0].hessian_count) == 0
  assert float(optim.sophia_win_rate(state)) == 0.0
  assert float(optim.sophia_hessian_norm(state)) == 0.0


# ---------------------------------------------------------------------------------------------
# PyTorch reference (official SophiaG rule, written from the paper in parity/reference.py)

def _torch():
  return pytest.importorskip("torch")


def test_reference_one_step_by_hand():
  """The torch reference on the same hand-computed numbers (h >= 0 entries only)."""
  torch = _torch()
  from jaxopt_llm.parity.reference import SophiaGReference
  p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
  opt = SophiaGReference([p], lr=0.1, betas=(0.9, 0.9), rho=0.5, weight_decay=0.5, eps=0.0)
  opt.update_hessian([torch.tensor([1.0, 0.2, 4.0])])  # h = 0.1 * H
  opt.state[p]["hessian"].mul_(10.0)  # h = [1.0, 0.2, 4.0]
  opt.state[p]["exp_avg"].copy_(torch.tensor([0.1, 0.1, -0.2]))
  p.grad = torch.tensor([0.5, -1.0, 0.2])
  opt.step()
  np.testing.assert_allclose(p.detach().numpy(), [0.922, -1.89, 0.483], rtol=1e-6)
  with pytest.raises(ValueError, match="estimates"):
    opt.update_hessian([])


@pytest.mark.parametrize("name", ["sophia_lr2^-7_wd2^-3", "sophia_b0.9,0.95_rho0.1_bs512_k5"])
def test_matches_torch_reference_200_steps(name):
  _torch()
  from jaxopt_llm.parity import optimizers as po
  case = po.hessian_cases()[name]
  params0, noise = po.make_problem(200, seed=0)
  ours, rates = po.run_jax_hessian(case, params0, noise, with_win_rates=True)
  ref = po.run_torch_hessian(case, params0, noise)
  err = po.relative_error(ours, ref)
  assert err <= 1e-5, f"{name}: relative error {err:.3e} after 200 steps"
  # Both branches of the rule were exercised: many clipped and many unclipped coordinates.
  assert rates.min() < 0.15 and rates.max() > 0.7, rates


def test_parity_harness_detects_a_wrong_rule():
  """The comparison can fail: the batch size applied twice (once in the estimate, once
  more on our side) differs visibly from the reference."""
  _torch()
  import dataclasses
  from jaxopt_llm.parity import optimizers as po
  case = po.hessian_cases()["sophia_b0.9,0.95_rho0.1_bs512_k5"]
  params0, noise = po.make_problem(200, seed=0)
  ref = po.run_torch_hessian(case, params0, noise)
  wrong_bs = dataclasses.replace(case, scale=case.scale * case.bs)
  assert po.relative_error(po.run_jax_hessian(wrong_bs, params0, noise), ref) > 1e-3


# ---------------------------------------------------------------------------------------------
# Robustness: negative / zero / extreme / non-finite curvature


def _direction(m, h, rho=0.04, eps=1e-15):
  tx = optim.scale_by_sophia(b1=0.0, rho=rho, eps=eps)  # b1=0: m = g exactly
  state = tx.init(m)._replace(hessian=h)
  u, new = tx.update(m, state)
  return u, new.win_rate


def test_negative_and_zero_curvature_give_a_full_clipped_step():
  m = jnp.array([0.3, -0.3, 0.3, 0.0, 1e-30, -2.0])
  h = jnp.array([-5.0, -1e-30, 0.0, 0.0, 0.0, -jnp.inf])
  u, rate = _direction(m, h)
  # |m| below eps=1e-15 is not clipped: m=0 moves by 0, m=1e-30 by 1e-30/1e-15.
  chex.assert_trees_all_close(u, jnp.array([1.0, -1.0, 1.0, 0.0, 1e-15, -1.0]), rtol=1e-6,
                              atol=0)
  chex.assert_trees_all_close(rate, jnp.float32(2 / 6))


def test_eps_zero_never_divides_zero_by_zero():
  u, _ = _direction(jnp.zeros(4), jnp.array([0.0, -1.0, 1.0, jnp.inf]), eps=0.0)
  chex.assert_tree_all_finite(u)
  chex.assert_trees_all_close(u, jnp.zeros(4), rtol=0, atol=0)


def test_infinite_and_nan_curvature_stay_finite_and_visible_in_the_norm():
  u, _ = _direction(jnp.array([0.5, 0.5, -0.5]), jnp.array([jnp.inf, jnp.nan, 1e38]))
  chex.assert_tree_all_finite(u)
  chex.assert_trees_all_close(u, jnp.array([0.0, 1.0, -0.5 / (0.04 * 1e38)]), rtol=1e-6)
  tx = optim.sophia(0.1)
  p = jnp.ones(3)
  state = tx.init(p)
  _, state = tx.update(jnp.ones(3), state, p, hessian=jnp.array([1.0, jnp.nan, 1.0]))
  u, state = tx.update(jnp.ones(3), state, p)
  chex.assert_tree_all_finite(u)
  assert not np.isfinite(float(optim.sophia_hessian_norm(state)))


_extreme = st.one_of(
    st.floats(-2.0**126, 2.0**126, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 3e38, -3e38, np.inf, -np.inf]))

# One compiled update for every example: the hyperparameters are injected state.
_INJ = optax.inject_hyperparams(optim.sophia)(lr=0.01, b1=0.0, rho=0.04, eps=1e-15,
                                              weight_decay=0.1)
_INJ_UPDATE = jax.jit(_INJ.update)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    m=st.lists(st.floats(-2.0**100, 2.0**100, width=32), min_size=8, max_size=8),
    h=st.lists(_extreme, min_size=8, max_size=8),
    eps=st.sampled_from([0.0, 1e-15, 1e-8]),
    rho=st.sampled_from([0.0, 0.04, 10.0]),
    decay=st.sampled_from([0.0, 0.1]))
def test_step_is_finite_bounded_and_official_where_h_nonnegative(m, h, eps, rho, decay):
  lr = 0.01
  m, h = np.asarray(m, F32), np.asarray(h, F32)
  p = jnp.linspace(-2.0, 2.0, 8)
  state = _INJ.init(p)
  state.hyperparams.update(rho=jnp.float32(rho), eps=jnp.float32(eps),
                           weight_decay=jnp.float32(decay))
  inner = state.inner_state
  state = state._replace(
      inner_state=(inner[0]._replace(hessian=jnp.asarray(h)),) + tuple(inner[1:]))
  u, new = _INJ_UPDATE(jnp.asarray(m), state, p)  # b1=0: m = g
  u = np.asarray(u)
  assert np.all(np.isfinite(u))
  assert np.all(np.abs(u) <= lr * (1 + decay * np.abs(np.asarray(p))) * (1 + 1e-6))
  assert 0.0 <= float(optim.sophia_win_rate(new)) <= 1.0
  # XLA flushes float32 subnormals to zero (FTZ); the numpy reference must do the same.
  ftz = lambda x: np.where(np.abs(x) < np.finfo(F32).tiny, F32(0), x)
  with np.errstate(all="ignore"):
    official = np.sign(ftz(m)) * np.minimum(np.abs(ftz(m)) / (F32(rho) * ftz(h) + F32(eps)),
                                            F32(1))
  direction = -(u / lr) - decay * np.asarray(p)
  ok = (h >= 0) & np.isfinite(official)
  np.testing.assert_allclose(direction[ok], official[ok], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Composition: optax types, chain, inject_hyperparams, masks, MultiSteps, schedules, dtypes


def test_is_extra_args_transformation_and_chains():
  tx = optim.sophia(1e-2)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert isinstance(optim.scale_by_sophia(), optax.GradientTransformationExtraArgs)
  chained = optax.chain(optax.clip_by_global_norm(1.0), optim.sophia(1e-2))
  params = _params()
  state = chained.init(params)
  est = _like(params, 3, positive=True)
  _, state = chained.update(_like(params, 1), state, params, hessian=est)
  chex.assert_trees_all_close(optim.sophia_hessian_norm(state),
                              0.01 * optax.tree.norm(est), rtol=1e-6)


def test_inject_hyperparams_matches_and_lr_can_change():
  params = _params()
  plain = optim.sophia(1e-2, rho=0.05, weight_decay=0.2)
  inj = optax.inject_hyperparams(optim.sophia)(lr=1e-2, rho=0.05, weight_decay=0.2)
  s1, s2 = plain.init(params), inj.init(params)
  for t in range(4):
    g, e = _like(params, t), _like(params, 20 + t, positive=True)
    u1, s1 = plain.update(g, s1, params, hessian=e)
    u2, s2 = jax.jit(lambda g, s, p, e: inj.update(g, s, p, hessian=e))(g, s2, params, e)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(optim.sophia_win_rate(s1), optim.sophia_win_rate(s2))
  s2.hyperparams["lr"] = jnp.zeros_like(s2.hyperparams["lr"])
  u, _ = inj.update(_like(params, 9), s2, params)
  chex.assert_trees_all_close(u, jax.tree.map(jnp.zeros_like, params))


def test_weight_decay_mask():
  p = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  tx = optim.sophia(0.1, weight_decay=0.5, mask=optim.weight_decay_mask)
  state = tx.init(p)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
  chex.assert_trees_all_close(u["kernel"], jnp.full((2, 2), -0.05))  # lr * wd * p
  chex.assert_trees_all_close(u["bias"], jnp.zeros(2))
  inj = optax.inject_hyperparams(optim.sophia, static_args="mask")(
      lr=0.1, weight_decay=0.5, mask=optim.weight_decay_mask)
  u2, _ = inj.update(jax.tree.map(jnp.zeros_like, p), inj.init(p), p)
  chex.assert_trees_all_close(u2, u)


def test_inside_optax_masked_with_a_full_hessian_tree():
  """optax.masked does not mask extra args: the full-size estimate must still be accepted."""
  p = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
  tx = optax.masked(optim.scale_by_sophia(), {"kernel": True, "bias": False})
  state = tx.init(p)
  est = {"kernel": jnp.full((2, 3), 100.0), "bias": jnp.full((3,), 7.0)}
  g = {"kernel": jnp.full((2, 3), 0.5), "bias": jnp.full((3,), 0.25)}
  u, state = tx.update(g, state, p, hessian=est)
  chex.assert_trees_all_close(u["bias"], g["bias"])  # passed through untouched
  chex.assert_trees_all_close(state.inner_state.hessian["kernel"], jnp.full((2, 3), 1.0))
  assert isinstance(state.inner_state.hessian["bias"], optax.MaskedNode)
  chex.assert_trees_all_close(optim.sophia_hessian_norm(state), jnp.sqrt(6.0), rtol=1e-6)
  # win rate counts the 6 masked-in coordinates only: m=0.0175 < 0.04*0 + eps? no -> 0.
  assert float(optim.sophia_win_rate(state)) == 0.0


def test_monitors_find_state_in_multisteps_and_reject_other_optimizers():
  params = _params()
  tx = optax.MultiSteps(optim.sophia(1e-2), every_k_schedule=2)
  state = tx.init(params)
  e = _like(params, 5, positive=True)
  for _ in range(2):  # the estimate given on the emitting micro-step is kept
    _, state = tx.update(_like(params, 1), state, params, hessian=e)
  assert int(state.inner_opt_state[0].hessian_count) == 1
  chex.assert_trees_all_close(optim.sophia_hessian_norm(state), 0.01 * optax.tree.norm(e),
                              rtol=1e-6)
  assert 0.0 <= float(optim.sophia_win_rate(state)) <= 1.0
  adam_state = optim.adamw(1e-3).init(params)
  for fn in (optim.sophia_win_rate, optim.sophia_hessian_norm):
    with pytest.raises(ValueError, match="ScaleBySophiaState"):
      fn(adam_state)


def test_win_rate_weighted_over_several_sophia_states():
  p = {"a": jnp.ones(3), "b": jnp.ones(1)}
  tx = optax.multi_transform({"x": optim.scale_by_sophia(), "y": optim.scale_by_sophia()},
                             {"a": "x", "b": "y"})
  state = tx.init(p)
  # "a": h large -> 3 coordinates not clipped; "b": h = 0 -> clipped.
  est = {"a": jnp.full(3, 1e6), "b": jnp.zeros(1)}
  _, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p, hessian=est)
  _, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
  chex.assert_trees_all_close(optim.sophia_win_rate(state), jnp.float32(0.75))


def test_lr_and_weight_decay_accept_schedules():
  lr = schedules.warmup_cosine(0.1, 2, 10)
  tx = optim.sophia(lr, weight_decay=lambda t: 0.5 * jnp.ones([]))
  p = jnp.ones(2)
  state = tx.init(p)
  u0, state = tx.update(jnp.ones(2), state, p)
  chex.assert_trees_all_close(u0, jnp.zeros(2))  # lr(0) = 0
  u1, state = tx.update(jnp.ones(2), state, p)
  chex.assert_trees_all_close(u1, -0.05 * (1.0 + 0.5) * jnp.ones(2), rtol=1e-6)


def test_state_dtypes_bf16_storage_fp32_math():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params())
  tx = optim.sophia(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].mu))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].hessian))
  assert state[0].win_rate.dtype == jnp.float32
  g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _like(params, 1))
  u, state = tx.update(g, state, params, hessian=_like(params, 2, positive=True))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].hessian))
  default = optim.sophia(1e-2).init(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(default[0].hessian))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs,arg", [
    ({"b1": 1.0}, "b1"), ({"b1": -0.1}, "b1"), ({"b2": 1.0}, "b2"), ({"rho": -0.1}, "rho"),
    ({"eps": -1e-8}, "eps"), ({"lr": -1.0}, "lr"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"rho": float("nan")}, "rho"),
])
def test_invalid_hyperparameters_raise_naming_the_argument(kwargs, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    optim.sophia(**{"lr": 1e-3, **kwargs})
  if arg not in ("lr", "weight_decay"):
    with pytest.raises(ValueError, match=f"scale_by_sophia: `{arg}`"):
      optim.scale_by_sophia(**kwargs)


def test_bad_hessian_argument_raises():
  params = _params()
  tx = optim.sophia(1e-3)
  state = tx.init(params)
  g = _like(params, 0)
  with pytest.raises(ValueError, match="shape"):
    tx.update(g, state, params, hessian={**params, "b": jnp.ones(())})  # would broadcast
  with pytest.raises(ValueError, match="structure"):
    tx.update(g, state, params, hessian={"w": params["w"]})
