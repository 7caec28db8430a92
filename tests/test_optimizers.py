"""Optimizers against their written equations, on properties, in optax compositions, on bad input."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import optim, schedules
from jaxopt_llm.optim import transforms

KEY = jax.random.PRNGKey(0)


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
  # Second step shows the order: sign(0.9*0.01 - 0.1*0.05) = +1 with the old m,
  # while the new m (0.99*0.01 - 0.01*0.05 > 0) would agree; the third gradient flips one.


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


def test_sgd_nesterov_equation():
  mu = 0.9
  opt = optim.scale_by_momentum(mu, nesterov=True)
  state = opt.init(jnp.zeros(1))
  u1, state = opt.update(jnp.array([1.0]), state)   # b = 1, u = 1 + 0.9
  u2, state = opt.update(jnp.array([2.0]), state)   # b = 0.9 + 2 = 2.9, u = 2 + 0.9*2.9
  chex.assert_trees_all_close(u1, jnp.array([1.9]), rtol=1e-6)
  chex.assert_trees_all_close(u2, jnp.array([2.0 + 0.9 * 2.9]), rtol=1e-6)


def test_plain_sgd_keeps_no_state():
  state = optim.sgd(0.1).init(_params())
  assert sum(x.size for x in jax.tree.leaves(state)) <= 2  # counts only


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


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(scale=st.floats(1e-3, 1e3))
def test_adam_direction_is_scale_invariant(scale):
  g = _grads(0)
  opt = optim.scale_by_adam(eps=0.0)
  u1, _ = opt.update(g, opt.init(g))
  u2, _ = opt.update(jax.tree.map(lambda x: scale * x, g), opt.init(g))
  chex.assert_trees_all_close(u1, u2, rtol=1e-5)


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
  chex.assert_trees_all_equal_dtypes(p, {"w": jnp.ones(1, jnp.float16), "b": jnp.ones(1, jnp.bfloat16)})


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


def test_default_state_dtype_follows_params():
  p = {"a": jnp.ones(2, jnp.float32), "h": jnp.ones(2, jnp.bfloat16)}
  s = optim.scale_by_adam().init(p)
  # moments of half-precision params are kept in float32 unless told otherwise
  assert s.mu["a"].dtype == jnp.float32 and s.mu["h"].dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Composition with optax


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
  opt = optax.inject_hyperparams(optim.adamw)(lr=1e-3, weight_decay=0.1)
  p = _params()
  state = opt.init(p)

  @jax.jit
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  p1, state = step(p, state, _grads(0))
  ref, _, _ = _run(optim.adamw(1e-3, weight_decay=0.1), steps=1)
  chex.assert_trees_all_close(p1, ref, rtol=1e-6)
  state.hyperparams["lr"] = jnp.asarray(0.0)
  p2, _ = step(p1, state, _grads(1))
  chex.assert_trees_all_close(p2, jax.tree.map(lambda x: x * (1 - 0.0), p1))  # lr 0: no change
  opt2 = optax.inject_hyperparams(optim.sgd)(lr=0.1, momentum=0.9)
  p3, _ = jax.jit(lambda p, s, g: opt2.update(g, s, p))(p, opt2.init(p), _grads(0))
  chex.assert_trees_all_close(p3, jax.tree.map(lambda g: -0.1 * g, _grads(0)), rtol=1e-6)


def test_inject_hyperparams_with_callable_mask():
  opt = optax.inject_hyperparams(optim.adamw, static_args="mask")(
      lr=0.1, weight_decay=0.5, mask=optim.weight_decay_mask)
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
  bad = jax.tree.map(lambda g: g.at[..., 0].set(jnp.nan) if g.ndim else jnp.full_like(g, jnp.nan), _grads(1))
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
# Bad input


@pytest.mark.parametrize("build, arg", [
    (lambda: optim.adamw(-1e-3), "lr"),
    (lambda: optim.adamw(float("nan")), "lr"),
    (lambda: optim.adamw(1e-3, b1=1.0), "b1"),
    (lambda: optim.adamw(1e-3, b2=-0.1), "b2"),
    (lambda: optim.adamw(1e-3, eps=-1.0), "eps"),
    (lambda: optim.adamw(1e-3, weight_decay=-0.1), "weight_decay"),
    (lambda: optim.lion(1e-4, b1=1.5), "b1"),
    (lambda: optim.lion(-1.0), "lr"),
    (lambda: optim.sgd(-0.1), "lr"),
    (lambda: optim.sgd(0.1, momentum=1.0), "momentum"),
    (lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda: optim.momentum(0.1, beta=-0.5), "beta"),
    (lambda: optim.adagrad(0.1, lr_decay=-1.0), "lr_decay"),
    (lambda: optim.rmsprop(0.1, alpha=1.0), "alpha"),
    (lambda: optim.adam_l2(1e-3, weight_decay=-1.0), "weight_decay"),
])
def test_invalid_hyperparameters_raise_naming_the_argument(build, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    build()
