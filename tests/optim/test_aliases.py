"""The named optimizers: equations of the chains, properties, optax naming and composition
(inject_hyperparams, masks, schedules, MultiSteps, apply_if_finite, Flax NNX), Sophia's
update rule against numpy, and bad input."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import losses, optim, schedules

KEY = jax.random.PRNGKey(0)
F32 = np.float32


def _params():
  k1, k2, k3 = jax.random.split(KEY, 3)
  return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,)),
          "s": jax.random.normal(k3, ())}


def _grads(t):
  return jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(100 + t), p.shape), _params())


def _run(opt, steps=5, params=None):
  params = _params() if params is None else params
  state = opt.init(params)
  history = []
  for t in range(steps):
    g = _grads(t)
    u, state = opt.update(g, state, params)
    params = optax.apply_updates(params, u)
    history.append((g, u))
  return params, state, history


def _like(params, seed, scale=1.0, positive=False):
  rng = np.random.default_rng(seed)
  def one(x):
    v = scale * rng.normal(size=x.shape)
    return jnp.asarray(np.abs(v) if positive else v, jnp.float32)
  return jax.tree.map(one, params)


# ---------------------------------------------------------------------------------------------
# Equations


def test_lion_step_is_exactly_lr_per_coordinate():
  lr = 1e-3
  p = _params()
  new_p, _, _ = _run(optim.lion(lr), steps=1, params=p)
  delta = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)), new_p, p)
  for d in jax.tree.leaves(delta):
    np.testing.assert_allclose(d, lr, rtol=1e-3)


def test_momentum_first_step_is_sgd_then_ema():
  beta, lr = 0.9, 0.1
  opt = optim.momentum(lr, beta=beta)
  state = opt.init(jnp.zeros(2))
  g1, g2 = jnp.array([1.0, -1.0]), jnp.array([3.0, 0.0])
  u1, state = opt.update(g1, state)
  chex.assert_trees_all_close(u1, -lr * g1)                       # buffer starts at g1
  u2, state = opt.update(g2, state)
  chex.assert_trees_all_close(u2, -lr * (beta * g1 + (1 - beta) * g2), rtol=1e-6)


def test_plain_sgd_keeps_no_state():
  state = optim.sgd(0.1).init(_params())
  assert sum(x.size for x in jax.tree.leaves(state)) <= 2  # counts only


def test_adamw_decay_is_decoupled_and_adam_l2_is_coupled():
  """Zero gradient: AdamW still decays by lr*wd*p; Adam-L2's decay goes through Adam."""
  p = jnp.array([2.0])
  lr, wd = 0.1, 0.5
  u, _ = optim.adamw(lr, weight_decay=wd).update(jnp.zeros(1), optim.adamw(lr).init(p), p)
  chex.assert_trees_all_close(u, -lr * wd * p)
  opt = optim.adam_l2(lr, weight_decay=wd)
  u, _ = opt.update(jnp.zeros(1), opt.init(p), p)
  # g' = wd * p = 1.0 -> the first Adam step is sign-like: 1 / (1 + eps)
  chex.assert_trees_all_close(u, -lr * jnp.ones(1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("make", [optim.adamw, optim.lion, optim.sgd, optim.momentum,
                                  optim.adagrad, optim.rmsprop, optim.adam, optim.adam_l2])
def test_negated_gradients_mirror_updates(make):
  opt = make(1e-2, weight_decay=0.0) if make not in (optim.adam,) else make(1e-2)
  g = _grads(3)
  zeros = jax.tree.map(jnp.zeros_like, g)
  u1, _ = opt.update(g, opt.init(zeros), zeros)
  u2, _ = opt.update(jax.tree.map(jnp.negative, g), opt.init(zeros), zeros)
  chex.assert_trees_all_close(u1, jax.tree.map(jnp.negative, u2), rtol=1e-6)


@pytest.mark.parametrize("make", [optim.adamw, optim.lion, optim.adam, optim.rmsprop,
                                  optim.adagrad, optim.momentum])
def test_zero_gradient_fp16_params_never_nan(make):
  p = {"w": jnp.ones((3, 2), jnp.float16), "b": jnp.zeros(2, jnp.bfloat16)}
  opt = make(1e-3)
  state = opt.init(p)
  for _ in range(3):
    u, state = opt.update(jax.tree.map(jnp.zeros_like, p), state, p)
    p = optax.apply_updates(p, u)
  for leaf in jax.tree.leaves((p, state)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  chex.assert_trees_all_equal_dtypes(
      p, {"w": jnp.ones(1, jnp.float16), "b": jnp.ones(1, jnp.bfloat16)})


def test_state_dtypes_bf16_moments_fp32_math():
  p = _params()
  opt32 = optim.adamw(1e-3)
  opt16 = optim.adamw(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
  s16 = opt16.init(p)
  chex.assert_trees_all_equal_dtypes(s16[0].mu, jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))
  chex.assert_trees_all_equal_dtypes(s16[0].nu, jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))
  p32, _, _ = _run(opt32, steps=10)
  p16, s16, hist = _run(opt16, steps=10)
  chex.assert_trees_all_equal_dtypes(p16, p)  # params stay fp32
  chex.assert_trees_all_close(p16, p32, atol=3e-4)
  lion16 = optim.lion(1e-3, mu_dtype="bfloat16")
  chex.assert_trees_all_equal_dtypes(
      lion16.init(p)[0].mu, jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))


# ---------------------------------------------------------------------------------------------
# optax naming and composition


def test_arguments_optax_orders_differently_are_keyword_only():
  """A positional argument means what optax's does in that position, or is refused."""
  assert optim.adamw(learning_rate=1e-3) is not None
  for build in (lambda: optim.adamw(1e-3, 0.9, 0.999, 1e-8, 0.1),   # optax: eps_root
                lambda: optim.lion(1e-4, 0.9, 0.99, 0.1),            # optax: mu_dtype
                lambda: optim.adagrad(1e-2, 0.1),         # optax: initial_accumulator_value
                lambda: optim.rmsprop(1e-2, 0.9),                    # optax: decay
                lambda: optim.sgd(0.1, 0.9, True),                   # optax: nesterov
                lambda: optim.sophia(1e-4, 0.965, 0.99, 0.04)):      # optax.contrib: eps
    with pytest.raises(TypeError):
      build()
  # the shared positions mean the same: (learning_rate, b1, b2, eps)
  p = _params()
  a, b = optim.adam(1e-3, 0.8, 0.95, 1e-6), optim.adam(1e-3, b1=0.8, b2=0.95, eps=1e-6)
  chex.assert_trees_all_equal(a.update(_grads(0), a.init(p), p), b.update(_grads(0), b.init(p), p))


@pytest.mark.parametrize("make, kw", [
    (optim.adamw, dict(weight_decay=0.1)), (optim.lion, dict(weight_decay=0.1)),
    (optim.sophia, dict(rho=0.05)), (optim.sgd, dict(momentum=0.9)),
])
def test_inject_hyperparams_learning_rate_keyword_and_schedule(make, kw):
  """optax's convention: ``inject_hyperparams(f)(learning_rate=...)`` and
  ``state.hyperparams["learning_rate"]``, with a float or a schedule."""
  p = _params()
  sched = optax.linear_schedule(1e-2, 0.0, 4)
  for value, expect in ((1e-2, [1e-2] * 3), (sched, [1e-2, 1e-2, 7.5e-3])):
    tx = optax.inject_hyperparams(make)(learning_rate=value, **kw)
    state = tx.init(p)
    seen = []
    for t in range(3):  # the state shows the value the previous update used
      seen.append(float(state.hyperparams["learning_rate"]))
      _, state = jax.jit(tx.update)(_grads(t), state, p)
    np.testing.assert_allclose(seen, expect, rtol=1e-6)
  # the injected value is the one used: lr 0 gives a zero step
  tx = optax.inject_hyperparams(make)(learning_rate=1e-2, **kw)
  state = tx.init(p)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u, _ = tx.update(_grads(0), state, p)
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_weight_decay_mask_skips_biases_and_scales():
  p = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2)}
  mask = optim.weight_decay_mask(p)
  assert mask == {"kernel": True, "bias": False, "scale": False}
  opt = optim.adamw(0.1, weight_decay=0.5, mask=optim.weight_decay_mask)
  u, _ = opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)
  chex.assert_trees_all_close(u["bias"], jnp.zeros(2))
  chex.assert_trees_all_close(u["kernel"], -0.05 * jnp.ones((2, 2)))


def test_lr_and_weight_decay_accept_schedules():
  p = jnp.array([1.0])
  lr_s = schedules.constant_with_warmup(0.1, 4)
  wd_s = lambda step: 0.5 * (step + 1)
  opt = optim.adamw(lr_s, weight_decay=wd_s)
  state = opt.init(p)
  for t in range(3):
    u, state = opt.update(jnp.zeros(1), state, p)
    chex.assert_trees_all_close(u, -lr_s(t) * wd_s(t) * p, rtol=1e-6)


def test_inject_hyperparams_under_jit():
  opt = optax.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1)
  p = _params()
  state = opt.init(p)

  @jax.jit
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  p1, state = step(p, state, _grads(0))
  ref, _, _ = _run(optim.adamw(1e-3, weight_decay=0.1), steps=1)
  chex.assert_trees_all_close(p1, ref, rtol=1e-6)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  p2, _ = step(p1, state, _grads(1))
  chex.assert_trees_all_close(p2, jax.tree.map(lambda x: x * (1 - 0.0), p1))  # lr 0: no change
  opt2 = optax.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9)
  p3, _ = jax.jit(lambda p, s, g: opt2.update(g, s, p))(p, opt2.init(p), _grads(0))
  chex.assert_trees_all_close(p3, jax.tree.map(lambda g: -0.1 * g, _grads(0)), rtol=1e-6)


def test_inject_hyperparams_with_callable_mask():
  opt = optax.inject_hyperparams(optim.adamw, static_args="mask")(
      learning_rate=0.1, weight_decay=0.5, mask=optim.weight_decay_mask)
  p = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  u, _ = opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)
  chex.assert_trees_all_close(u["bias"], jnp.zeros(2))


def test_multisteps_equals_mean_gradient():
  k = 4
  p = _params()
  opt = optax.MultiSteps(optim.adamw(1e-2), every_k_schedule=k)
  state = opt.init(p)
  grads = [_grads(t) for t in range(k)]
  for g in grads:
    u, state = opt.update(g, state, p)
  mean_g = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
  ref = optim.adamw(1e-2)
  u_ref, _ = ref.update(mean_g, ref.init(p), p)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-5, atol=1e-8)


def test_clip_by_global_norm_in_chain():
  opt = optax.chain(optax.clip_by_global_norm(1.0), optim.sgd(1.0))
  g = jax.tree.map(lambda x: 100.0 * x, _grads(0))
  u, _ = opt.update(g, opt.init(g))
  np.testing.assert_allclose(float(optax.tree.norm(u)), 1.0, rtol=1e-5)


def test_apply_if_finite_skips_nan_step_and_keeps_state():
  opt = optax.apply_if_finite(optim.adamw(1e-2), max_consecutive_errors=3)
  p = _params()
  state = opt.init(p)
  u, state = opt.update(_grads(0), state, p)
  p = optax.apply_updates(p, u)
  bad = jax.tree.map(
      lambda g: g.at[..., 0].set(jnp.nan) if g.ndim else jnp.full_like(g, jnp.nan), _grads(1))
  u_bad, state_bad = opt.update(bad, state, p)
  for leaf in jax.tree.leaves(u_bad):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  chex.assert_trees_all_equal(state_bad.inner_state, state.inner_state)
  assert int(state_bad.notfinite_count) == 1


@pytest.mark.parametrize("make", [optim.sgd, optim.momentum, optim.adagrad, optim.rmsprop,
                                  optim.adam, optim.adam_l2, optim.adamw, optim.lion])
def test_jit_with_donation_equals_eager(make):
  opt = make(1e-2)
  p = _params()

  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  jstep = jax.jit(step, donate_argnums=(0, 1))
  pe, se = p, opt.init(p)
  pj, sj = jax.tree.map(jnp.copy, p), opt.init(p)
  for t in range(3):
    pe, se = step(pe, se, _grads(t))
    pj, sj = jstep(pj, sj, _grads(t))
  chex.assert_trees_all_close(pe, pj, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Sophia


def test_sophia_one_step_by_hand():
  """b1=0.9, rho=0.5, eps=0, learning_rate=0.1, wd=0.5 (decay factor 0.95), b2=0.9:

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


def test_sophia_matches_equation_over_steps_and_folds_only_given_estimates():
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


_extreme = st.one_of(
    st.floats(-2.0**126, 2.0**126, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 3e38, -3e38, np.inf, -np.inf]))


_INJ = optax.inject_hyperparams(optim.sophia)(learning_rate=0.01, b1=0.0, rho=0.04, eps=1e-15,
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


def test_sophia_inject_hyperparams_matches_and_lr_can_change():
  params = _params()
  plain = optim.sophia(1e-2, rho=0.05, weight_decay=0.2)
  inj = optax.inject_hyperparams(optim.sophia)(learning_rate=1e-2, rho=0.05, weight_decay=0.2)
  s1, s2 = plain.init(params), inj.init(params)
  for t in range(4):
    g, e = _like(params, t), _like(params, 20 + t, positive=True)
    u1, s1 = plain.update(g, s1, params, hessian=e)
    u2, s2 = jax.jit(lambda g, s, p, e: inj.update(g, s, p, hessian=e))(g, s2, params, e)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-8)
  chex.assert_trees_all_close(optim.sophia_win_rate(s1), optim.sophia_win_rate(s2))
  s2.hyperparams["learning_rate"] = jnp.zeros_like(s2.hyperparams["learning_rate"])
  u, _ = inj.update(_like(params, 9), s2, params)
  chex.assert_trees_all_close(u, jax.tree.map(jnp.zeros_like, params))


def test_sophia_weight_decay_mask():
  p = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  tx = optim.sophia(0.1, weight_decay=0.5, mask=optim.weight_decay_mask)
  state = tx.init(p)
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), state, p)
  chex.assert_trees_all_close(u["kernel"], jnp.full((2, 2), -0.05))  # lr * wd * p
  chex.assert_trees_all_close(u["bias"], jnp.zeros(2))
  inj = optax.inject_hyperparams(optim.sophia, static_args="mask")(
      learning_rate=0.1, weight_decay=0.5, mask=optim.weight_decay_mask)
  u2, _ = inj.update(jax.tree.map(jnp.zeros_like, p), inj.init(p), p)
  chex.assert_trees_all_close(u2, u)


def test_sophia_lr_and_weight_decay_accept_schedules():
  lr = schedules.warmup_cosine(0.1, 2, 10)
  tx = optim.sophia(lr, weight_decay=lambda t: 0.5 * jnp.ones([]))
  p = jnp.ones(2)
  state = tx.init(p)
  u0, state = tx.update(jnp.ones(2), state, p)
  chex.assert_trees_all_close(u0, jnp.zeros(2))  # lr(0) = 0
  u1, state = tx.update(jnp.ones(2), state, p)
  chex.assert_trees_all_close(u1, -0.05 * (1.0 + 0.5) * jnp.ones(2), rtol=1e-6)


def test_sophia_state_dtypes_bf16_storage_fp32_math():
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


def test_sophia_bad_hessian_argument_raises():
  params = _params()
  tx = optim.sophia(1e-3)
  state = tx.init(params)
  g = _like(params, 0)
  with pytest.raises(ValueError, match="shape"):
    tx.update(g, state, params, hessian={**params, "b": jnp.ones(())})  # would broadcast
  with pytest.raises(ValueError, match="structure"):
    tx.update(g, state, params, hessian={"w": params["w"]})


# ---------------------------------------------------------------------------------------------
# Flax NNX (the train extra; skipped without flax)


def _tiny_lm(vocab, dim, seed):
  """Embed -> LayerNorm -> Linear, as a Flax NNX module (the train extra's flax)."""
  nnx = pytest.importorskip("flax.nnx")

  class TinyLM(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(vocab, dim, rngs=rngs)
      self.norm = nnx.LayerNorm(dim, rngs=rngs)
      self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
      return self.head(self.norm(self.embed(tokens)))

  return nnx, TinyLM(nnx.Rngs(seed))


@pytest.mark.parametrize("make_tx", [
    lambda s: optim.adamw(s, b2=0.95, weight_decay=0.1, mask=optim.weight_decay_mask),
    lambda s: optim.lion(s, weight_decay=0.1),
    lambda s: optim.momentum(s),
])
def test_nnx_optimizer_train_step_lowers_loss(make_tx):
  vocab = 16
  nnx, model = _tiny_lm(vocab, 32, 0)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   make_tx(schedules.warmup_cosine(3e-2, 5, 60, min_lr=3e-3)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # a deterministic next-token rule the model can learn: t -> (3 t + 1) mod vocab
  tokens = (jnp.arange(8 * 12).reshape(8, 12) * 7) % vocab
  tokens = tokens.at[:, 1:].set((3 * tokens[:, :-1] + 1) % vocab)

  @nnx.jit
  def train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(lambda m: losses.causal_lm_loss(m(tokens), tokens))(model)
    optimizer.update(model, grads)
    return loss

  first = float(train_step(model, optimizer, tokens))
  for _ in range(59):
    last = float(train_step(model, optimizer, tokens))
  assert last < 0.5 * first, (first, last)


def test_nnx_step_equals_functional_optax_step():
  nnx, model = _tiny_lm(8, 8, 1)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.adamw(1e-2, weight_decay=0.1)
  tokens = jnp.arange(16).reshape(2, 8) % 8

  def loss_of(params):
    return losses.causal_lm_loss(nnx.merge(graphdef, params)(tokens), tokens)

  grads = jax.grad(loss_of)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads_nnx = nnx.grad(lambda m: losses.causal_lm_loss(m(tokens), tokens))(model)
  optimizer.update(model, grads_nnx)
  chex.assert_trees_all_close(nnx.state(model, nnx.Param), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("build, arg", [
    (lambda: optim.adamw(-1e-3), "learning_rate"),
    (lambda: optim.adamw(float("nan")), "learning_rate"),
    (lambda: optim.adamw(1e-3, b1=1.0), "b1"),
    (lambda: optim.adamw(1e-3, b2=-0.1), "b2"),
    (lambda: optim.adamw(1e-3, eps=-1.0), "eps"),
    (lambda: optim.adamw(1e-3, weight_decay=-0.1), "weight_decay"),
    (lambda: optim.lion(1e-4, b1=1.5), "b1"),
    (lambda: optim.lion(-1.0), "learning_rate"),
    (lambda: optim.sgd(-0.1), "learning_rate"),
    (lambda: optim.sgd(0.1, momentum=1.0), "momentum"),
    (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda: optim.momentum(0.1, beta=-0.5), "beta"),
    (lambda: optim.adagrad(0.1, lr_decay=-1.0), "lr_decay"),
    (lambda: optim.rmsprop(0.1, alpha=1.0), "alpha"),
    (lambda: optim.adam_l2(1e-3, weight_decay=-1.0), "weight_decay"),
    # b1 / momentum schedules: their values are checked like the numbers ([0, 1))
    (lambda: optim.adamw(1e-3, b1=lambda n: 1.0), "b1"),
    (lambda: optim.adam(1e-3, b1=lambda n: 0.9 + 0.001 * n), "b1"),  # reaches 1 at 100
    (lambda: optim.adam_l2(1e-3, b1=lambda n: float("nan")), "b1"),
    (lambda: optim.sgd(0.1, momentum=lambda n: -0.1), "momentum"),
    (lambda: optim.momentum(0.1, beta=lambda n: 1.0), "beta"),
    (lambda: optim.rmsprop(0.1, momentum=lambda n: 1.5), "momentum"),
])
def test_invalid_hyperparameters_raise_naming_the_argument(build, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    build()


@pytest.mark.parametrize("kwargs,arg", [
    ({"b1": 1.0}, "b1"), ({"b1": -0.1}, "b1"), ({"b2": 1.0}, "b2"), ({"rho": -0.1}, "rho"),
    ({"eps": -1e-8}, "eps"), ({"learning_rate": -1.0}, "learning_rate"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"rho": float("nan")}, "rho"),
])
def test_sophia_invalid_hyperparameters_raise_naming_the_argument(kwargs, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    optim.sophia(**{"learning_rate": 1e-3, **kwargs})
  if arg not in ("learning_rate", "weight_decay"):
    with pytest.raises(ValueError, match=f"scale_by_sophia: `{arg}`"):
      optim.scale_by_sophia(**kwargs)


# ---------------------------------------------------------------------------------------------
# Hardening (issue 14): params, non-float leaves, state dtypes, eps = 0, momentum's buffer


NEEDS_PARAMS = {
    "adamw": lambda: optim.adamw(1e-3), "adam_l2": lambda: optim.adam_l2(1e-3),
    "lion": lambda: optim.lion(1e-3, weight_decay=0.1), "sophia": lambda: optim.sophia(1e-3),
    "sgd": lambda: optim.sgd(0.1, weight_decay=0.1),
    "adagrad": lambda: optim.adagrad(0.1, weight_decay=0.1),
    "nadam": lambda: optim.nadam(weight_decay=0.1),
    "radam": lambda: optim.radam(weight_decay=0.1, decoupled_weight_decay=True),
    "adamax": lambda: optim.adamax(weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(NEEDS_PARAMS))
def test_update_without_params_is_the_requires_params_error(name):
  tx = NEEDS_PARAMS[name]()
  p = _params()
  state = tx.init(p)
  with pytest.raises(ValueError, match="requires the current value of"):
    tx.update(p, state)
  with pytest.raises(ValueError, match="update_and_apply: requires the current value of"):
    optim.update_and_apply(tx, p, state, None)
  with pytest.raises(ValueError, match="update_and_apply: requires the current value of"):
    jax.jit(lambda g, s: optim.update_and_apply(tx, g, s, None))(p, state)


def test_update_and_apply_without_params_even_without_decay():
  tx = optim.adam(1e-3)
  with pytest.raises(ValueError, match="requires"):
    optim.update_and_apply(tx, _params(), tx.init(_params()), None)


ALL = {
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.5),
    "adamw_amsgrad_bf16": lambda: optim.adamw(1e-2, weight_decay=0.5, amsgrad=True,
                                              mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "adam": lambda: optim.adam(1e-2),
    "adam_l2": lambda: optim.adam_l2(1e-2, weight_decay=0.5),
    "lion": lambda: optim.lion(1e-2, weight_decay=0.5),
    "sophia": lambda: optim.sophia(1e-2, weight_decay=0.5),
    "sgd": lambda: optim.sgd(0.1, weight_decay=0.5),
    "sgd_nesterov": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.5),
    "momentum": lambda: optim.momentum(0.1, weight_decay=0.5, buffer_init="zero"),
    "adagrad": lambda: optim.adagrad(0.1, weight_decay=0.5),
    "rmsprop": lambda: optim.rmsprop(0.1, weight_decay=0.5, centered=True, momentum=0.5),
    "schedule": lambda: optim.adamw(schedules.warmup_cosine(1e-2, 2, 10), weight_decay=0.5),
    "adamw_b1_schedule": lambda: optim.adamw(
        1e-2, b1=lambda n: 0.9 - 0.01 * jnp.minimum(n, 5), weight_decay=0.5),
    "sgd_momentum_schedule": lambda: optim.sgd(
        0.1, momentum=lambda n: 0.5 + 0.1 * jnp.minimum(n, 3), weight_decay=0.5),
    "nadam": lambda: optim.nadam(1e-2, weight_decay=0.5),
    "radam": lambda: optim.radam(1e-2, weight_decay=0.5, decoupled_weight_decay=True),
    "adamax": lambda: optim.adamax(1e-2, weight_decay=0.5),
}


def _mixed():
  floats = _params()
  ints = {"step": jnp.array(7, jnp.int32), "ids": jnp.array([7, 1, 0, -3], jnp.int32),
          "flag": jnp.array([True, False]), "small": jnp.array([1, 2], jnp.int8)}
  return floats, {**floats, **ints}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", sorted(ALL))
def test_non_float_leaves_pass_through_unchanged_with_no_state(name, fused):
  """Before: AdamW turned an int 7 into 6 after one step (weight decay, then the cast back);
  ones became 0. Now integer and bool leaves are never changed and hold no state, and the
  float leaves step exactly as if the others were not there."""
  tx = ALL[name]()
  floats, mixed = _mixed()
  assert optim.state_bytes(tx, mixed) == optim.state_bytes(tx, floats)
  s_f, s_m = tx.init(floats), tx.init(mixed)
  p_f, p_m = floats, mixed
  for t in range(3):
    g = _grads(t)
    g_mixed = {**g, **{k: jnp.ones_like(v) for k, v in mixed.items() if k not in g}}
    kw = {"hessian": jax.tree.map(jnp.abs, g_mixed)} if name == "sophia" else {}
    if fused:
      p_f, s_f = optim.update_and_apply(tx, g, s_f, p_f, **{
          k: {n: v[n] for n in g} for k, v in kw.items()})
      p_m, s_m = optim.update_and_apply(tx, g_mixed, s_m, p_m, **kw)
    else:
      u_f, s_f = tx.update(g, s_f, p_f, **{k: {n: v[n] for n in g} for k, v in kw.items()})
      u_m, s_m = tx.update(g_mixed, s_m, p_m, **kw)
      for k in mixed:
        if k not in floats:
          assert not np.any(np.asarray(u_m[k])), (k, u_m[k])
      p_f, p_m = optax.apply_updates(p_f, u_f), optax.apply_updates(p_m, u_m)
  for k, v in mixed.items():
    if k in floats:
      chex.assert_trees_all_equal(p_m[k], p_f[k])
    else:
      chex.assert_trees_all_equal(p_m[k], v)  # same values, same dtype
  if name == "sophia":  # the win rate counts the float coordinates only
    assert float(optim.sophia_win_rate(s_m)) == float(optim.sophia_win_rate(s_f))


def test_float0_gradients_of_integer_leaves():
  """jax.grad(..., allow_int=True) gives float0 gradients for integer inputs."""
  p = {"w": jnp.ones(3), "n": jnp.array(3, jnp.int32)}
  loss = lambda p: jnp.sum(p["w"] ** 2) * p["n"]
  g = jax.grad(loss, allow_int=True)(p)
  assert g["n"].dtype == jax.dtypes.float0
  for make in (lambda: optim.adamw(1e-2), lambda: optim.sgd(0.1, weight_decay=0.1),
               lambda: optim.lion(1e-2, weight_decay=0.1)):
    tx = make()
    u, _ = tx.update(g, tx.init(p), p)
    new = optax.apply_updates(p, u)
    assert int(new["n"]) == 3 and new["n"].dtype == jnp.int32
    new_fused, _ = optim.update_and_apply(tx, g, tx.init(p), p)
    chex.assert_trees_all_equal(new_fused, new)


def test_building_block_alone_gives_a_zero_direction_for_integer_leaves():
  p = {"w": jnp.ones(2), "i": jnp.array([5, 6])}
  tx = optim.scale_by_adam()
  state = tx.init(p)
  assert isinstance(state.mu["i"], optax.MaskedNode)
  u, state = tx.update({"w": jnp.ones(2), "i": jnp.array([1, 1])}, state)
  assert u["i"].dtype == p["i"].dtype and not np.any(np.asarray(u["i"]))
  assert isinstance(state.nu["i"], optax.MaskedNode)


def test_complex_parameters_are_refused_naming_the_leaf():
  with pytest.raises(TypeError, match=r"\['z'\] is complex"):
    optim.adamw(1e-3).init({"w": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)})


@pytest.mark.parametrize("build, arg", [
    (lambda d: optim.adamw(1e-3, mu_dtype=d), "mu_dtype"),
    (lambda d: optim.adamw(1e-3, nu_dtype=d), "nu_dtype"),
    (lambda d: optim.adam(1e-3, mu_dtype=d), "mu_dtype"),
    (lambda d: optim.lion(1e-3, mu_dtype=d), "mu_dtype"),
    (lambda d: optim.sophia(1e-3, nu_dtype=d), "nu_dtype"),
    (lambda d: optim.scale_by_momentum(0.9, mu_dtype=d), "mu_dtype"),
])
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64])
def test_non_float_state_dtype_is_refused_naming_the_argument(build, arg, dtype):
  """Before: mu_dtype=jnp.int8 was accepted and rounded every moment to an integer."""
  with pytest.raises(ValueError, match=f"`{arg}` must be a floating dtype"):
    build(dtype)


EPS0 = {
    "rmsprop": lambda: optim.rmsprop(0.1, eps=0.0),
    "rmsprop_momentum": lambda: optim.rmsprop(0.1, eps=0.0, momentum=0.9),
    "adagrad": lambda: optim.adagrad(0.1, eps=0.0),
    "adagrad_lr_decay": lambda: optim.adagrad(0.1, eps=0.0, lr_decay=0.1),
    "adam": lambda: optim.adam(0.1, eps=0.0),
    "adamw_amsgrad": lambda: optim.adamw(0.1, eps=0.0, amsgrad=True, weight_decay=0.0),
    "sophia": lambda: optim.sophia(0.1, eps=0.0, weight_decay=0.0),
    "lion": lambda: optim.lion(0.1),
}


@pytest.mark.parametrize("name", sorted(EPS0))
def test_eps_zero_zero_gradient_step_is_exactly_zero(name):
  """Before: rmsprop(eps=0) / adagrad(eps=0) with a zero gradient gave NaN params (0/0).
  A zero gradient entry now steps by exactly 0 while the others step as usual."""
  tx = EPS0[name]()
  p = {"w": jnp.array([1.0, 2.0, -3.0])}
  g = {"w": jnp.array([0.0, 0.5, 0.0])}
  state = tx.init(p)
  for _ in range(3):
    u, state = tx.update(g, state, p)
    chex.assert_tree_all_finite(u)
    assert float(u["w"][0]) == 0.0 and float(u["w"][2]) == 0.0
    assert float(u["w"][1]) < 0.0
  if name in ("adam", "adamw_amsgrad", "sophia", "lion"):
    new, _ = optim.update_and_apply(tx, g, tx.init(p), p)
    chex.assert_tree_all_finite(new)


def test_eps_zero_nonzero_gradient_matches_the_equation():
  # rmsprop, first step, eps = 0: s = (1 - a) g^2, u = g / sqrt(s) = sign(g) / sqrt(1 - a)
  tx = optim.rmsprop(0.1, alpha=0.99, eps=0.0)
  p = jnp.array([1.0, 1.0])
  u, _ = tx.update(jnp.array([0.5, 0.0]), tx.init(p), p)
  chex.assert_trees_all_close(u, jnp.array([-0.1 / np.sqrt(0.01), 0.0]), rtol=1e-6)
  tx = optim.adagrad(0.1, eps=0.0)
  u, _ = tx.update(jnp.array([-2.0, 0.0]), tx.init(p), p)
  chex.assert_trees_all_close(u, jnp.array([0.1, 0.0]), rtol=1e-6)


def test_centered_rmsprop_needs_eps():
  with pytest.raises(ValueError, match="`eps` must be > 0 with centered=True"):
    optim.rmsprop(0.1, eps=0.0, centered=True)


def test_momentum_buffer_init_zero_is_the_course_notes_ema_by_hand():
  r"""buffer_init="zero": v_0 = 0, v_t = beta v_{t-1} + (1 - beta) g_t, p -= lr v_t."""
  beta, lr = 0.9, 0.1
  gs = [np.array([1.0, -2.0], F32), np.array([3.0, 0.5], F32), np.array([-1.0, 4.0], F32)]
  for init, v in (("zero", np.zeros(2, F32)), ("grad", None)):
    tx = optim.momentum(lr, beta=beta, buffer_init=init)
    p = jnp.zeros(2)
    state = tx.init(p)
    for t, g in enumerate(gs):
      if v is None:  # "grad" (PyTorch): v_1 = g_1
        v = g.copy()
      else:
        v = beta * v + (1 - beta) * g
      u, state = tx.update(jnp.asarray(g), state, p)
      chex.assert_trees_all_close(u, -lr * v, rtol=1e-6, atol=0)
      if t == 0:  # the first step: 10x smaller with "zero"
        np.testing.assert_allclose(np.asarray(u), -lr * (1 - beta if init == "zero" else 1) * g,
                                   rtol=1e-6)
  with pytest.raises(ValueError, match="`buffer_init`"):
    optim.momentum(lr, buffer_init="zeros")


def test_momentum_buffer_init_grad_matches_torch_sgd():
  torch = pytest.importorskip("torch")
  beta, lr = 0.9, 0.05
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(3, 4)).astype(F32)
  gs = rng.normal(size=(6, 3, 4)).astype(F32)
  w = torch.tensor(p0, requires_grad=True)
  opt = torch.optim.SGD([w], lr=lr, momentum=beta, dampening=beta)
  tx = optim.momentum(lr, beta=beta, buffer_init="grad")
  p = jnp.asarray(p0)
  state = tx.init(p)
  for g in gs:
    w.grad = torch.tensor(g)
    opt.step()
    u, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, u)
    np.testing.assert_allclose(np.asarray(p), w.detach().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(ALL))
def test_wrong_grads_or_state_is_a_clear_error(name):
  """Before: a gradient leaf of shape (1,) for a (3,) parameter was silently broadcast by
  plain SGD, other shapes / structures / states crashed inside JAX or optax.chain."""
  tx = ALL[name]()
  p = _params()
  state = tx.init(p)
  kw = {"hessian": None} if name == "sophia" else {}
  bad_shape = {**_grads(0), "b": jnp.ones(1)}
  for call in (lambda g, s: tx.update(g, s, p, **kw),
               lambda g, s: optim.update_and_apply(tx, g, s, p)):
    with pytest.raises(ValueError, match=r"`(updates|grads)` leaf \['b'\] has shape \(1,\)"):
      call(bad_shape, state)
    with pytest.raises(ValueError, match="`(updates|grads)` must have the structure"):
      call({"w": _grads(0)["w"]}, state)
    with pytest.raises(TypeError, match="`state` must be"):
      call(_grads(0), None)
    with pytest.raises(TypeError, match="`state` must be"):
      call(_grads(0), optim.scale_by_lion().init(p))


def test_a_callable_mask_must_return_bools():
  tx = optim.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: 0.5, p))
  with pytest.raises(TypeError, match="adamw: `mask` .* the callable returned"):
    tx.update(_params(), tx.init(_params()), _params())


def test_second_moment_overflow_steps_by_zero_never_nan():
  """|g| > 1.8e19: g**2 overflows float32 (as in torch.optim): that coordinate steps by 0,
  the others as usual, and nothing is NaN (inf / inf in Adam's bias-corrected ratio,
  inf - inf in centered RMSprop, before)."""
  p = jnp.ones(3)
  g = jnp.array([jnp.finfo(jnp.float32).max, 1e30, 1.0])
  for tx in (optim.adam(1e-2), optim.rmsprop(1e-2, centered=True, momentum=0.9),
             optim.adagrad(1e-2)):
    u, _ = tx.update(g, tx.init(p), p)
    assert np.all(np.isfinite(np.asarray(u)))
    assert float(u[0]) == 0.0 and float(u[1]) == 0.0 and float(u[2]) < 0.0


# ---------------------------------------------------------------------------------------------
# b1 / momentum as a schedule (torch's OneCycleLR / CyclicLR cycle_momentum; torch parity in
# tests/optim/test_adam_variants.py)


def test_b1_and_momentum_schedules_are_checked_naming_argument_and_step():
  with pytest.raises(ValueError, match="adam: `b1` is a schedule that gives 1.0 at step 100"):
    optim.adam(1e-3, b1=lambda n: jnp.minimum(0.9 + 0.001 * n, 1.0))
  with pytest.raises(TypeError, match="sgd: `momentum` is a schedule that returned str"):
    optim.sgd(0.1, momentum=lambda n: "0.9")
  # b1 of Lion and Sophia stays a number (torch's schedulers do not cycle them)
  with pytest.raises(TypeError, match="lion: `b1` must be a number, not a callable"):
    optim.lion(1e-4, b1=lambda n: 0.9)


def test_momentum_schedule_by_hand():
  """SGD momentum with mu_n: b_1 = g_1, b_2 = mu_1 b_1 + g_2, b_3 = mu_2 b_2 + g_3 (mu read
  at the number of updates already applied); ``momentum(beta=schedule)``: the EMA with the
  current beta, b_t = beta_t b_{t-1} + (1 - beta_t) g_t."""
  mus = [0.5, 0.7, 0.9]
  sched = lambda n: jnp.asarray(mus)[n]
  gs = [jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 4.0]), jnp.asarray([-1.0, 1.0])]
  p = jnp.zeros(2)
  for tx, ema in [(optim.sgd(1.0, momentum=sched), False),
                  (optim.momentum(1.0, beta=sched), True)]:
    s = tx.init(p)
    b = None
    for t, g in enumerate(gs):
      u, s = tx.update(g, s, p)
      mu = mus[t]
      b = np.asarray(g) if b is None else mu * b + (1 - mu if ema else 1.0) * np.asarray(g)
      np.testing.assert_allclose(np.asarray(u), -b, rtol=1e-6)
