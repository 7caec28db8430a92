"""The scale_by_* building blocks (and their per-leaf formulas) against their written
equations, on properties and on robustness; Sophia's direction on extreme curvature."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import optim

KEY = jax.random.PRNGKey(0)


def _params():
  k1, k2, k3 = jax.random.split(KEY, 3)
  return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,)),
          "s": jax.random.normal(k3, ())}


def _grads(t):
  return jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(100 + t), p.shape), _params())


# ---------------------------------------------------------------------------------------------
# Equations


def test_adam_one_step_by_hand():
  """m=0.1, v=0.2, g=0.5, step t=1 (b1=0.9, b2=0.999, eps=1e-8, lr=1e-3), by hand:

  m1 = 0.9*0.1 + 0.1*0.5 = 0.14           m_hat = 0.14 / (1 - 0.9)    = 1.4
  v1 = 0.999*0.2 + 0.001*0.25 = 0.20005   v_hat = 0.20005 / 0.001     = 200.05
  u  = 1.4 / (sqrt(200.05) + 1e-8) = 1.4 / 14.1439032802 = 0.0989825772
  p  = 1 - 1e-3 * 0.0989825772 = 0.9999010174
  """
  opt = optax.chain(optim.scale_by_adam(), optax.scale_by_learning_rate(1e-3))
  p = jnp.array([1.0])
  state = opt.init(p)
  adam_state = state[0]._replace(mu=jnp.array([0.1]), nu=jnp.array([0.2]))
  u, new_state = opt.update(jnp.array([0.5]), (adam_state, state[1]), p)
  chex.assert_trees_all_close(new_state[0].mu, jnp.array([0.14]), rtol=1e-6)
  chex.assert_trees_all_close(new_state[0].nu, jnp.array([0.20005]), rtol=1e-6)
  chex.assert_trees_all_close(u, jnp.array([-1e-3 * 0.0989825772]), rtol=1e-6)
  chex.assert_trees_all_close(optax.apply_updates(p, u), jnp.array([0.9999010174]), rtol=1e-7)
  assert int(new_state[0].count) == 1


def test_adam_scheduled_b1_by_hand():
  """b1_t read at the number of updates applied, and used everywhere at step t as torch does
  after OneCycleLR rewrote betas[0]: m_t = b1_t m + (1 - b1_t) g, m_hat = m_t / (1 - b1_t**t)
  (the *current* b1 in the bias correction)."""
  b1s = [0.95, 0.85, 0.9]
  opt = optim.scale_by_adam(b1=lambda n: jnp.asarray(b1s)[n], b2=0.99)
  gs = [np.array([0.5, -1.0]), np.array([2.0, 0.1]), np.array([-1.0, 3.0])]
  s = opt.init(jnp.zeros(2))
  m = v = np.zeros(2)
  for t, g in enumerate(gs, start=1):
    u, s = opt.update(jnp.asarray(g, jnp.float32), s)
    b1 = b1s[t - 1]
    m, v = b1 * m + (1 - b1) * g, 0.99 * v + 0.01 * g * g
    want = m / (1 - b1 ** t) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(u), want, rtol=2e-6)


def test_adam_matches_equation_over_steps():
  b1, b2, eps = 0.8, 0.95, 1e-6
  opt = optim.scale_by_adam(b1, b2, eps)
  p = _params()
  state = opt.init(p)
  m = jax.tree.map(np.zeros_like, p)
  v = jax.tree.map(np.zeros_like, p)
  for t in range(1, 6):
    g = _grads(t)
    u, state = opt.update(g, state)
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * np.asarray(g), m, g)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * np.asarray(g) ** 2, v, g)
    expect = jax.tree.map(
        lambda m, v: (m / (1 - b1**t)) / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps), m, v)
    chex.assert_trees_all_close(u, expect, rtol=2e-6, atol=1e-7)
  chex.assert_trees_all_close(state.mu, m, rtol=2e-6)
  chex.assert_trees_all_close(state.nu, v, rtol=2e-6)


def test_amsgrad_uses_running_max():
  opt = optim.scale_by_adam(0.0, 0.5, 0.0, amsgrad=True)
  state = opt.init(jnp.zeros(1))
  _, state = opt.update(jnp.array([4.0]), state)   # v = 8, max 8
  u, state = opt.update(jnp.array([1.0]), state)   # v = 4.5, max 8
  # u = g / (sqrt(max_v) / sqrt(1 - 0.25))
  chex.assert_trees_all_close(u, jnp.array([1.0 / (np.sqrt(8.0) / np.sqrt(0.75))]), rtol=1e-6)
  chex.assert_trees_all_close(state.nu_max, jnp.array([8.0]))


def test_lion_matches_official_order():
  b1, b2 = 0.9, 0.99
  opt = optim.scale_by_lion(b1, b2)
  state = opt.init(jnp.zeros(3))
  m = np.zeros(3, np.float32)
  for g in ([1.0, -2.0, 0.0], [-0.05, 1.0, 0.0], [-2.0, -1.0, 0.0]):
    g = np.asarray(g, np.float32)
    u, state = opt.update(jnp.asarray(g), state)
    np.testing.assert_array_equal(np.asarray(u), np.sign(b1 * m + (1 - b1) * g))  # old m
    m = b2 * m + (1 - b2) * g
    chex.assert_trees_all_close(state.mu, m, rtol=1e-6)


def test_sgd_nesterov_equation():
  mu = 0.9
  opt = optim.scale_by_momentum(mu, nesterov=True)
  state = opt.init(jnp.zeros(1))
  u1, state = opt.update(jnp.array([1.0]), state)   # b = 1, u = 1 + 0.9
  u2, state = opt.update(jnp.array([2.0]), state)   # b = 0.9 + 2 = 2.9, u = 2 + 0.9*2.9
  chex.assert_trees_all_close(u1, jnp.array([1.9]), rtol=1e-6)
  chex.assert_trees_all_close(u2, jnp.array([2.0 + 0.9 * 2.9]), rtol=1e-6)


def test_adagrad_equation():
  opt = optim.scale_by_adagrad(initial_accumulator_value=0.5, eps=1e-10, lr_decay=0.1)
  state = opt.init(jnp.zeros(1))
  s = 0.5
  for t, g in enumerate([2.0, -1.0, 0.5], start=1):
    u, state = opt.update(jnp.array([g]), state)
    s += g * g
    chex.assert_trees_all_close(u, jnp.array([g / (np.sqrt(s) + 1e-10) / (1 + (t - 1) * 0.1)]),
                                rtol=1e-6)


def test_rmsprop_centered_equation():
  a, eps = 0.9, 1e-8
  opt = optim.scale_by_rmsprop(alpha=a, eps=eps, centered=True)
  state = opt.init(jnp.zeros(1))
  s = gbar = 0.0
  for g in [2.0, -1.0, 0.5]:
    u, state = opt.update(jnp.array([g]), state)
    s = a * s + (1 - a) * g * g
    gbar = a * gbar + (1 - a) * g
    chex.assert_trees_all_close(u, jnp.array([g / (np.sqrt(s - gbar**2) + eps)]), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Properties


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(scale=st.floats(1e-3, 1e3))
def test_adam_direction_is_scale_invariant(scale):
  g = _grads(0)
  opt = optim.scale_by_adam(eps=0.0)
  u1, _ = opt.update(g, opt.init(g))
  u2, _ = opt.update(jax.tree.map(lambda x: scale * x, g), opt.init(g))
  chex.assert_trees_all_close(u1, u2, rtol=1e-5)


def test_default_state_dtype_follows_params():
  p = {"a": jnp.ones(2, jnp.float32), "h": jnp.ones(2, jnp.bfloat16)}
  s = optim.scale_by_adam().init(p)
  # moments of half-precision params are kept in float32 unless told otherwise
  assert s.mu["a"].dtype == jnp.float32 and s.mu["h"].dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Sophia: negative / zero / extreme / non-finite curvature, masks, bad estimates


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


def test_infinite_and_nan_curvature_give_finite_steps():
  u, _ = _direction(jnp.array([0.5, 0.5, -0.5]), jnp.array([jnp.inf, jnp.nan, 1e38]))
  chex.assert_tree_all_finite(u)
  chex.assert_trees_all_close(u, jnp.array([0.0, 1.0, -0.5 / (0.04 * 1e38)]), rtol=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_hessian_estimate_is_refused_and_counted(bad, fused):
  """Before: one NaN estimate stayed in h for ever (Sophia silently became sign momentum),
  an inf froze every later step. Now h is unchanged, hessian_count does not move and
  hessian_rejected counts it; a later finite estimate is folded in as usual."""
  tx = optim.sophia(0.1, b2=0.5, weight_decay=0.0, fused=fused)
  p = {"a": jnp.ones(3), "b": jnp.ones(2)}
  g = {"a": jnp.ones(3), "b": jnp.ones(2)}
  good = {"a": jnp.full(3, 2.0), "b": jnp.full(2, 4.0)}

  def step(g, s, p, **kw):
    if fused:
      return optim.update_and_apply(tx, g, s, p, **kw)
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s

  state = tx.init(p)
  p, state = step(g, state, p, hessian=good)
  so = state[0]
  chex.assert_trees_all_close(so.hessian, {"a": jnp.full(3, 1.0), "b": jnp.full(2, 2.0)})
  assert int(so.hessian_count) == 1 and int(so.hessian_rejected) == 0
  poisoned = {"a": jnp.array([1.0, bad, 1.0]), "b": jnp.full(2, 4.0)}
  p, state = step(g, state, p, hessian=poisoned)
  so = state[0]
  chex.assert_trees_all_equal(so.hessian, {"a": jnp.full(3, 1.0), "b": jnp.full(2, 2.0)})
  assert int(so.hessian_count) == 1 and int(so.hessian_rejected) == 1
  assert int(optim.sophia_hessian_rejected(state)) == 1
  assert np.isfinite(float(optim.sophia_hessian_norm(state)))
  p, state = step(g, state, p, hessian=good)  # a finite estimate later: folded in
  so = state[0]
  chex.assert_trees_all_close(so.hessian, {"a": jnp.full(3, 1.5), "b": jnp.full(2, 3.0)})
  assert int(so.hessian_count) == 2 and int(so.hessian_rejected) == 1
  u, _ = tx.update(g, state, p)
  chex.assert_tree_all_finite(u)
  assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(u))  # not frozen


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


def test_building_blocks_bad_input_and_keyword_only_arguments():
  with pytest.raises(ValueError, match="scale_by_sophia: `rho`"):
    optim.scale_by_sophia(rho=-1.0)
  with pytest.raises(ValueError, match="scale_by_rmsprop: `momentum`"):
    optim.scale_by_rmsprop(momentum=1.0)
  with pytest.raises(ValueError, match="scale_by_rmsprop: `momentum` is a schedule"):
    optim.scale_by_rmsprop(momentum=lambda n: 1.0)
  with pytest.raises(ValueError, match="scale_by_adam: `b1` is a schedule"):
    optim.scale_by_adam(b1=lambda n: -0.5)
  with pytest.raises(ValueError, match="scale_by_momentum: `dampening` is a schedule"):
    optim.scale_by_momentum(dampening=lambda n: 2.0)
  with pytest.raises(TypeError):  # optax.contrib.scale_by_sophia's 3rd positional is eps
    optim.scale_by_sophia(0.9, 0.99, 0.04)
