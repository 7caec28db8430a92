"""NAdam, RAdam, Adamax (jaxopt_llm/optim/adam_variants.py) and b1 / momentum schedules.

Three ways: the written equations (one or two steps by hand in float64 numpy, RAdam's
rectification term against its float64 definition), the reference (torch.optim for 200 steps
fp32 on the parity harness's multi-leaf problem; a varying b1 / momentum against torch whose
``param_groups[0]`` is rewritten by hand before every step, as OneCycleLR does; the state
against torch's per-parameter state keys the docstrings name), and properties (scale
invariance with eps = 0, non-float leaves, no NaN from eps = 0, bad hyperparameters named).
"""
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import optim
from jaxopt_llm.optim import adam_variants
from jaxopt_llm.parity import optimizers as po

STEPS = 200


def _torch():
  return pytest.importorskip("torch")


def _t(name, **kw):
  def build(ps):
    return getattr(_torch().optim, name)(ps, **kw)
  return build


# name -> (ours, torch), defaults and non-default configurations.
CASES = {
    "nadam": (lambda: optim.nadam(), _t("NAdam")),
    "nadam_b0.95_wd0.1_md1e-2": (
        lambda: optim.nadam(1e-3, b2=0.95, weight_decay=0.1, momentum_decay=1e-2),
        _t("NAdam", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, momentum_decay=1e-2)),
    "nadam_decoupled_wd0.1": (
        lambda: optim.nadam(1e-3, weight_decay=0.1, decoupled_weight_decay=True),
        _t("NAdam", lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)),
    "radam": (lambda: optim.radam(), _t("RAdam")),
    "radam_b0.99_wd0.1": (
        lambda: optim.radam(3e-3, b2=0.99, weight_decay=0.1),
        _t("RAdam", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    "radam_decoupled_wd0.1": (
        lambda: optim.radam(3e-3, weight_decay=0.1, decoupled_weight_decay=True),
        _t("RAdam", lr=3e-3, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamax": (lambda: optim.adamax(), _t("Adamax")),
    "adamax_b0.8_eps1e-6_wd0.1": (
        lambda: optim.adamax(1e-3, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1),
        _t("Adamax", lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
}


# ---------------------------------------------------------------------------------------------
# The reference: torch.optim, 200 steps, fp32


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_200_steps(name):
  _torch()
  ours, ref = CASES[name]
  params0, noise = po.make_problem(STEPS, seed=0)
  err = po.relative_error(po.run_jax(ours(), params0, noise),
                          po.run_torch(ref, params0, noise))
  assert err <= 1e-5, f"{name}: relative error {err:.3e} after {STEPS} steps"


@pytest.mark.parametrize("name", ["nadam_decoupled_wd0.1"])
def test_no_further_from_float64_than_torch_fp32(name):
  """The decoupled case is the furthest from torch fp32 (4.7e-6; torch rounds ``1 - lr*wd``
  to float32): ours must be at least as close to torch's float64 run."""
  _torch()
  ours, ref = CASES[name]
  params0, noise = po.make_problem(STEPS, seed=1)
  f64 = lambda d: {k: v.astype(np.float64) for k, v in d.items()}
  ref64 = po.run_torch(ref, f64(params0), f64(noise))
  ours_err = po.relative_error(po.run_jax(ours(), params0, noise), ref64)
  torch_err = po.relative_error(po.run_torch(ref, params0, noise), ref64)
  assert ours_err <= max(1.5 * torch_err, 2e-6), (ours_err, torch_err)


@pytest.mark.parametrize("wrong, name", [
    (lambda: optim.nadam(momentum_decay=0.04), "nadam"),
    (lambda: optim.radam(3e-3, weight_decay=0.1), "radam_decoupled_wd0.1"),
    (lambda: optim.adamax(eps=1e-3), "adamax"),
])
def test_the_comparison_can_fail(wrong, name):
  """A neighbouring rule (another momentum decay, the other weight decay, eps of the wrong
  size) is visibly far from torch."""
  _torch()
  params0, noise = po.make_problem(STEPS, seed=0)
  err = po.relative_error(po.run_jax(wrong(), params0, noise),
                          po.run_torch(CASES[name][1], params0, noise))
  assert err > 1e-4, err


# ---------------------------------------------------------------------------------------------
# The state: field by field, torch's per-parameter state keys (for from_torch)

STATE_KEYS = {  # our field -> torch's state key, as each state's docstring names it
    "nadam": {"mu": "exp_avg", "nu": "exp_avg_sq", "mu_product": "mu_product",
              "count": "step"},
    "radam": {"mu": "exp_avg", "nu": "exp_avg_sq", "count": "step"},
    "adamax": {"mu": "exp_avg", "nu": "exp_inf", "count": "step"},
}


def _torch_state(make, params0, noise):
  torch = _torch()
  params = {k: torch.tensor(v, requires_grad=True) for k, v in params0.items()}
  opt = make(list(params.values()))
  for t in range(next(iter(noise.values())).shape[0]):
    with torch.no_grad():
      for k, p in params.items():
        p.grad = torch.from_numpy(np.asarray(noise[k][t])) + po.LEAVES[k][2] * p.detach()
    opt.step()
  return {k: opt.state[p] for k, p in params.items()}


def _jax_state(tx, params0, noise):
  pulls = {k: np.float32(v[2]) for k, v in po.LEAVES.items()}
  p = jax.tree.map(jnp.asarray, params0)
  s = tx.init(p)
  update = jax.jit(tx.update)
  for t in range(next(iter(noise.values())).shape[0]):
    g = {k: noise[k][t] + pulls[k] * p[k] for k in p}
    u, s = update(g, s, p)
    p = optax.apply_updates(p, u)
  return s[0]  # the direction link: chain(scale_by_*, scale_by_learning_rate)


@pytest.mark.parametrize("name", sorted(STATE_KEYS))
def test_state_fields_equal_torch_state_keys(name):
  _torch()
  params0, noise = po.make_problem(20, seed=0)
  ref = _torch_state(CASES[name][1], params0, noise)
  ours = _jax_state(CASES[name][0](), params0, noise)
  doc = type(ours).__doc__
  assert list(type(ours)._fields)[0] == "count"
  assert set(type(ours)._fields) == set(STATE_KEYS[name])
  for field, key in STATE_KEYS[name].items():
    assert f"``{field}``: torch ``state[\"{key}\"]``" in doc, (field, key)
    for leaf, st in ref.items():
      theirs = st[key].detach().numpy()
      mine = getattr(ours, field)
      mine = mine if field in ("count", "mu_product") else mine[leaf]
      np.testing.assert_allclose(np.asarray(mine, np.float64), theirs.astype(np.float64),
                                 rtol=2e-5, atol=1e-7 * max(1.0, np.abs(theirs).max()),
                                 err_msg=f"{name}.{field} vs torch {key} ({leaf})")


# ---------------------------------------------------------------------------------------------
# The written equations


def _g(seed, shape=(4, 3)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _direction(tx, grads):
  p = jnp.zeros_like(grads[0])
  s = tx.init(p)
  out = []
  for g in grads:
    u, s = tx.update(jnp.asarray(g), s, p)
    out.append(np.asarray(u, np.float64))
  return out, s


def test_nadam_two_steps_by_hand():
  b1, b2, eps, psi = 0.9, 0.99, 1e-8, 4e-3
  grads = [_g(0), _g(1)]
  out, state = _direction(adam_variants.scale_by_nadam(b1, b2, eps, momentum_decay=psi), grads)
  m = v = np.zeros((4, 3))
  prod = 1.0
  for t, (g, u) in enumerate(zip(grads, out), start=1):
    g = g.astype(np.float64)
    mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
    prod *= mu
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    den = np.sqrt(v / (1 - b2 ** t)) + eps
    want = (1 - mu) / (1 - prod) * g / den + mu_next / (1 - prod * mu_next) * m / den
    np.testing.assert_allclose(u, want, rtol=2e-6)
  chex.assert_type(state.mu_product, jnp.float32)
  np.testing.assert_allclose(float(state.mu_product), prod, rtol=1e-6)
  chex.assert_trees_all_close(state.mu, m, rtol=1e-6)


def test_radam_rectification_equals_its_float64_definition():
  """rho_t from the cancellation-free form vs torch's float64 formula, for every step up to
  20000 and several b2 (the float32 closed form would be ~5e-5 off at t = 6)."""
  t = np.arange(1, 20001)
  for b2 in (0.9, 0.99, 0.999, 0.9999):
    bc1, bc2, rectify, rect = jax.vmap(
        lambda c: adam_variants.radam_scalars(0.9, b2, c))(jnp.asarray(t, jnp.int32))
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
    want = np.sqrt(np.maximum((rho - 4) * (rho - 2) * rho_inf
                              / ((rho_inf - 4) * (rho_inf - 2) * rho), 0.0))
    np.testing.assert_array_equal(np.asarray(rectify), rho > 5)
    on = rho > 5
    np.testing.assert_allclose(np.asarray(rect)[on], want[on], rtol=3e-6, err_msg=str(b2))
    np.testing.assert_allclose(np.asarray(bc2), 1 - b2 ** t, rtol=2e-6)
  # b2 <= 2/3: rho_inf <= 5, never rectified (momentum SGD with bias correction)
  assert not bool(adam_variants.radam_scalars(0.9, 0.5, jnp.asarray(10 ** 6))[2])


def test_radam_steps_by_hand_before_and_after_rectification():
  b1, b2, eps = 0.9, 0.999, 1e-8
  grads = [_g(i) for i in range(8)]
  out, _ = _direction(adam_variants.scale_by_radam(b1, b2, eps), grads)
  m = v = np.zeros((4, 3))
  rho_inf = 2 / (1 - b2) - 1
  for t, (g, u) in enumerate(zip(grads, out), start=1):
    g = g.astype(np.float64)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    rho = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
    if rho > 5:
      r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
      want = m_hat * r * math.sqrt(1 - b2 ** t) / (np.sqrt(v) + eps)
    else:
      want = m_hat
    assert (rho > 5) == (t >= 6)
    np.testing.assert_allclose(u, want, rtol=2e-6, atol=1e-6 * np.abs(want).max(),
                               err_msg=f"step {t}")


def test_adamax_two_steps_by_hand():
  b1, b2, eps = 0.9, 0.999, 1e-8
  grads = [_g(0), _g(1)]
  out, state = _direction(adam_variants.scale_by_adamax(b1, b2, eps), grads)
  m = u_inf = np.zeros((4, 3))
  for t, (g, u) in enumerate(zip(grads, out), start=1):
    g = g.astype(np.float64)
    m = b1 * m + (1 - b1) * g
    u_inf = np.maximum(b2 * u_inf, np.abs(g) + eps)
    np.testing.assert_allclose(u, m / u_inf / (1 - b1 ** t), rtol=1e-6)
  chex.assert_trees_all_close(state.nu, u_inf, rtol=1e-6)


def test_named_optimizers_one_step_with_weight_decay_by_hand():
  """Coupled decay enters the gradient; decoupled is ``p - lr (u + wd p)``."""
  p = jnp.asarray(_g(3)) + 2.0
  g = jnp.asarray(_g(4))
  lr, wd = 1e-2, 0.5
  for build, scale in [(optim.nadam, adam_variants.scale_by_nadam),
                       (optim.radam, adam_variants.scale_by_radam)]:
    coupled = build(lr, weight_decay=wd)
    decoupled = build(lr, weight_decay=wd, decoupled_weight_decay=True)
    d = scale()
    u_c, _ = coupled.update(g, coupled.init(p), p)
    u_d, _ = decoupled.update(g, decoupled.init(p), p)
    want_c, _ = d.update(g + wd * p, d.init(p), p)
    want_d, _ = d.update(g, d.init(p), p)
    chex.assert_trees_all_close(u_c, -lr * want_c, rtol=1e-6)
    chex.assert_trees_all_close(u_d, -lr * (want_d + wd * p), rtol=1e-6)
  a = optim.adamax(lr, weight_decay=wd)
  d = adam_variants.scale_by_adamax()
  chex.assert_trees_all_close(a.update(g, a.init(p), p)[0],
                              -lr * d.update(g + wd * p, d.init(p), p)[0], rtol=1e-6)


def test_defaults_are_torchs():
  torch = _torch()
  import inspect
  for ours, theirs in [(optim.nadam, torch.optim.NAdam), (optim.radam, torch.optim.RAdam),
                       (optim.adamax, torch.optim.Adamax)]:
    ps, ts = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    assert ps["learning_rate"].default == ts["lr"].default
    assert (ps["b1"].default, ps["b2"].default) == ts["betas"].default
    for k in ("eps", "weight_decay", "momentum_decay", "decoupled_weight_decay"):
      if k in ts:
        assert ps[k].default == ts[k].default, (ours.__name__, k)


# ---------------------------------------------------------------------------------------------
# Properties


VARIANTS = {"nadam": optim.nadam, "radam": optim.radam, "adamax": optim.adamax}


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(c=st.floats(1e-3, 1e3), seed=st.integers(0, 100),
                  name=st.sampled_from(sorted(VARIANTS)))
def test_scale_invariant_and_odd_with_eps_zero(name, c, seed):
  """With eps = 0 every rule is invariant to a positive rescaling of all gradients and odd
  in the gradient: u(c g) = u(g), u(-g) = -u(g). (RAdam's first 5 steps, rho_t <= 5, are
  momentum SGD: linear, u(c g) = c u(g).)"""
  run = _scan_jitted(name)
  grads = [jnp.asarray(_g(seed + i)) for i in range(7)]
  base = run(jnp.stack(grads))
  linear = 5 if name == "radam" else 0
  base_c = base.at[:linear].multiply(c)
  chex.assert_trees_all_close(run(c * jnp.stack(grads)), base_c, rtol=2e-4, atol=1e-9)
  chex.assert_trees_all_close(run(-jnp.stack(grads)), -base, rtol=1e-6)


_RUNNERS = {}


def _scan_jitted(name):
  """One compiled 7-step run per optimizer (eps = 0), shared by the hypothesis examples."""
  if name not in _RUNNERS:
    tx = VARIANTS[name](1e-2, eps=0.0)
    _RUNNERS[name] = jax.jit(lambda gs: _scan(tx, gs))
  return _RUNNERS[name]


def _scan(tx, grads):
  p = jnp.zeros(grads.shape[1:])

  def step(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (p + u, s), u

  return jax.lax.scan(step, (p, tx.init(p)), grads)[1]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_zero_gradients_with_eps_zero_give_zero_steps_not_nan(name):
  tx = VARIANTS[name](1e-2, eps=0.0)
  out = _scan(tx, jnp.zeros((3, 4)))
  chex.assert_tree_all_finite(out)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_non_float_leaves_pass_through_and_state_dtypes(name):
  params = {"w": jnp.ones((3,), jnp.bfloat16), "step": jnp.asarray(7, jnp.int32),
            "mask": jnp.asarray([True, False])}
  tx = VARIANTS[name](1e-2, weight_decay=0.1, mu_dtype=jnp.bfloat16)
  s = tx.init(params)
  inner = s[1]
  assert isinstance(inner.mu["step"], optax.MaskedNode)
  assert inner.mu["w"].dtype == jnp.bfloat16 and inner.nu["w"].dtype == jnp.float32
  grads = {"w": jnp.ones((3,), jnp.bfloat16), "step": jnp.asarray(0, jnp.int32),
           "mask": jnp.asarray([False, False])}
  u, s = jax.jit(tx.update)(grads, s, params)
  new = optax.apply_updates(params, u)
  assert new["step"] == 7 and new["step"].dtype == jnp.int32
  np.testing.assert_array_equal(new["mask"], params["mask"])
  assert new["w"].dtype == jnp.bfloat16 and bool(jnp.all(new["w"] < 1))


def test_bad_hyperparameters_name_the_argument():
  one = lambda n: 1.0
  for build, kw, arg in [
      (optim.nadam, {"b1": 1.0}, "b1"), (optim.nadam, {"b1": "0.9"}, "b1"),
      (optim.nadam, {"b1": one}, "b1"), (optim.radam, {"b1": lambda n: -0.1}, "b1"),
      (optim.adamax, {"b1": lambda n: float("nan")}, "b1"),
      (optim.nadam, {"b2": 1.0}, "b2"), (optim.radam, {"b2": lambda n: 0.9}, "b2"),
      (optim.nadam, {"momentum_decay": -1e-3}, "momentum_decay"),
      (optim.nadam, {"decoupled_weight_decay": 1}, "decoupled_weight_decay"),
      (optim.radam, {"decoupled_weight_decay": "True"}, "decoupled_weight_decay"),
      (optim.adamax, {"eps": -1.0}, "eps"), (optim.radam, {"mu_dtype": jnp.int32}, "mu_dtype"),
      (optim.adamax, {"learning_rate": "1e-3"}, "learning_rate"),
      (optim.nadam, {"weight_decay": -0.1}, "weight_decay"),
  ]:
    with pytest.raises((TypeError, ValueError), match=f"{build.__name__}: `{arg}`"):
      build(**kw)


def test_radam_b2_must_be_concrete_under_inject_hyperparams():
  tx = optax.inject_hyperparams(optim.radam)(learning_rate=1e-3, b1=0.9)
  p = jnp.ones(3)
  s = tx.init(p)
  tx.update(p, s, p)  # b1 injected (an array) is fine
  with pytest.raises(TypeError, match="`b2` must be a concrete number"):
    bad = optax.inject_hyperparams(optim.radam)(learning_rate=1e-3, b2=0.99)
    jax.jit(bad.init)(p)


# ---------------------------------------------------------------------------------------------
# b1 / momentum as a schedule (torch's OneCycleLR / CyclicLR cycle_momentum)


def cycling(lo=0.85, hi=0.95, period=40):
  """A cosine cycle between ``lo`` and ``hi``, like OneCycleLR's momentum."""
  return lambda n: lo + (hi - lo) * 0.5 * (1 + jnp.cos(2 * jnp.pi * n / period))


SCHEDULED = {  # name -> (ours(schedule), torch(ps), the param_group key torch cycles)
    "adam": (lambda s: optim.adam(1e-3, b1=s), _t("Adam", lr=1e-3), "betas"),
    "adamw": (lambda s: optim.adamw(1e-3, b1=s, weight_decay=0.1),
              _t("AdamW", lr=1e-3, weight_decay=0.1), "betas"),
    "adam_l2_amsgrad": (lambda s: optim.adam_l2(1e-3, b1=s, weight_decay=0.1, amsgrad=True),
                        _t("Adam", lr=1e-3, weight_decay=0.1, amsgrad=True), "betas"),
    "nadam": (lambda s: optim.nadam(2e-3, b1=s), _t("NAdam", lr=2e-3), "betas"),
    "radam": (lambda s: optim.radam(3e-3, b1=s), _t("RAdam", lr=3e-3), "betas"),
    "adamax": (lambda s: optim.adamax(2e-3, b1=s), _t("Adamax", lr=2e-3), "betas"),
    "sgd_nesterov_wd": (lambda s: optim.sgd(0.05, momentum=s, nesterov=True, weight_decay=0.1),
                        _t("SGD", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
                        "momentum"),
    "rmsprop_momentum": (lambda s: optim.rmsprop(1e-3, momentum=s),
                         _t("RMSprop", lr=1e-3, momentum=0.9), "momentum"),
}


def run_torch_cycled(make, key, values, params0, noise):
  """``po.run_torch`` with ``param_groups[0][key]`` rewritten before every step (betas[0]
  for the Adam family, momentum for SGD / RMSprop), as OneCycleLR does."""
  torch = _torch()
  params = {k: torch.tensor(v, requires_grad=True) for k, v in params0.items()}
  opt = make(list(params.values()))
  group = opt.param_groups[0]
  for t in range(next(iter(noise.values())).shape[0]):
    if key == "betas":
      group["betas"] = (values[t], group["betas"][1])
    else:
      group["momentum"] = values[t]
    with torch.no_grad():
      for k, p in params.items():
        p.grad = torch.from_numpy(np.asarray(noise[k][t])) + po.LEAVES[k][2] * p.detach()
    opt.step()
  return {k: p.detach().numpy() for k, p in params.items()}


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_scheduled_b1_or_momentum_matches_torch_rewritten_by_hand(name):
  ours, ref, key = SCHEDULED[name]
  steps = 100
  sched = cycling()
  values = [float(sched(jnp.asarray(n, jnp.int32))) for n in range(steps)]
  params0, noise = po.make_problem(steps, seed=2)
  got = po.run_jax(ours(sched), params0, noise)
  want = run_torch_cycled(ref, key, values, params0, noise)
  err = po.relative_error(got, want)
  assert err <= 1e-5, f"{name}: {err:.3e}"
  if name == "nadam":  # ... and the schedule matters: its mean value is visibly different
    const = po.run_jax(ours(0.9), params0, noise)
    assert po.relative_error(const, want) > 10 * max(err, 1e-6)


CONSTANT = {
    "adamw": lambda b: optim.adamw(1e-3, b1=b, weight_decay=0.1),
    "nadam": lambda b: optim.nadam(b1=b, weight_decay=0.1),
    "radam": lambda b: optim.radam(b1=b, weight_decay=0.1, decoupled_weight_decay=True),
    "adamax": lambda b: optim.adamax(b1=b),
    "sgd": lambda b: optim.sgd(0.05, momentum=b, nesterov=True),
    "momentum": lambda b: optim.momentum(0.05, beta=b),
    "rmsprop": lambda b: optim.rmsprop(1e-3, momentum=b, centered=True),
}


@pytest.mark.parametrize("name", sorted(CONSTANT))
def test_constant_schedule_equals_the_float_bitwise(name):
  """optax.constant_schedule returns the Python float itself: the same arithmetic (3 eager
  steps, params and state compared bit for bit)."""
  params0, noise = po.make_problem(3, seed=3)
  make = CONSTANT[name]

  def run(tx):
    p = jax.tree.map(jnp.asarray, params0)
    s = tx.init(p)
    for t in range(3):
      u, s = tx.update({k: jnp.asarray(noise[k][t]) + 0.1 * p[k] for k in p}, s, p)
      p = optax.apply_updates(p, u)
    return p, s

  chex.assert_trees_all_equal(run(make(0.9)), run(make(optax.constant_schedule(0.9))))
  # A schedule returning a float32 *array* computes 1 - b1 in float32 (1 ulp of b1 apart):
  # not bitwise, but as close as float32 arithmetic allows.
  chex.assert_trees_all_close(run(make(0.9)), run(make(optax.linear_schedule(0.9, 0.9, 1))),
                              rtol=1e-5, atol=1e-7)


def test_b1_schedule_is_evaluated_at_the_number_of_updates_applied():
  seen = []
  tx = optim.adam(1e-3, b1=lambda n: (seen.append(n), 0.9)[1], fused=False)
  seen.clear()  # the build-time check evaluated it too
  p = jnp.ones(2)
  s = tx.init(p)
  for _ in range(3):
    _, s = tx.update(p, s, p)
  assert [int(n) for n in seen] == [0, 1, 2]
