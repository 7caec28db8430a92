"""torch.optim's Adadelta, ASGD and Rprop twins (jaxopt_llm/optim/classic.py): against
torch.optim for 200 steps on the parity harness's multi-leaf problem, against their written
equations, on properties, and on bad input."""
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import optim
from jaxopt_llm.optim import classic
from jaxopt_llm.parity import optimizers as po

torch = None  # imported by the tests that compare with it (the others run without it)


@pytest.fixture
def with_torch():
  global torch
  torch = pytest.importorskip("torch")

STEPS = 200


def _torch(name, **kw):
  return lambda ps: getattr(torch.optim, name)(ps, **kw)


def _f64(d):
  return {k: np.asarray(v, np.float64) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# Against torch.optim, 200 steps fp32 (defaults and a non-default configuration each)

CASES = {
    "adadelta": (lambda: optim.adadelta(), _torch("Adadelta")),
    "adadelta_lr0.5_rho0.95_eps1e-5_wd0.1": (
        lambda: optim.adadelta(0.5, 0.95, 1e-5, weight_decay=0.1),
        _torch("Adadelta", lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.1)),
    "asgd": (lambda: optim.asgd(), _torch("ASGD")),
    "asgd_lr0.05_lambd1e-3_alpha0.5_t0=50_wd0.1": (
        lambda: optim.asgd(0.05, 1e-3, 0.5, 50, weight_decay=0.1),
        _torch("ASGD", lr=0.05, lambd=1e-3, alpha=0.5, t0=50, weight_decay=0.1)),
    "rprop": (lambda: optim.rprop(), _torch("Rprop")),
    "rprop_lr1e-3_etas0.3,1.5_steps1e-4,0.1": (
        lambda: optim.rprop(1e-3, (0.3, 1.5), (1e-4, 0.1)),
        _torch("Rprop", lr=1e-3, etas=(0.3, 1.5), step_sizes=(1e-4, 0.1))),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.usefixtures("with_torch")
def test_matches_torch_200_steps(name):
  ours, ref = CASES[name]
  err = po.run_case(po.ParityCase(ours, ref), steps=STEPS, seed=0)
  assert err <= 1e-5, f"{name}: relative error {err:.3e} after {STEPS} steps"


@pytest.mark.usefixtures("with_torch")
def test_rprop_is_bitwise_torch():
  """Rprop's arithmetic is exact (products, signs, one multiply-clip per step): no rounding
  can differ, so the trajectories agree to the bit."""
  ours, ref = CASES["rprop_lr1e-3_etas0.3,1.5_steps1e-4,0.1"]
  params0, noise = po.make_problem(STEPS, seed=0)
  a, b = po.run_jax(ours(), params0, noise), po.run_torch(ref, params0, noise)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.usefixtures("with_torch")
def test_asgd_no_further_from_float64_than_torch_fp32():
  """torch rounds the factor ``1 - lambd * eta`` (~1 - 1e-6) to float32 every step, a
  systematic drift of a few 1e-6 over 200 steps; ours does not round it and must be at
  least as close to a float64 run."""
  ours, ref = CASES["asgd"]
  params0, noise = po.make_problem(STEPS, seed=1)
  a = po.run_jax(ours(), params0, noise)
  ref32 = po.run_torch(ref, params0, noise)
  ref64 = po.run_torch(ref, _f64(params0), _f64(noise))
  ours_err, torch_err = po.relative_error(a, ref64), po.relative_error(ref32, ref64)
  assert torch_err > 1e-6  # the effect this test is about is there
  assert ours_err <= max(1.5 * torch_err, 2e-6), (ours_err, torch_err)


@pytest.mark.usefixtures("with_torch")
def test_asgd_is_torch_foreach_arithmetic():
  """Our step is written p - eta (g + lambd p), as torch's foreach path writes it: against
  that path the gap is rounding only (about 1e-7 after 200 steps, 50x below the
  single-tensor path's)."""
  params0, noise = po.make_problem(STEPS, seed=0)
  ref = po.run_torch(_torch("ASGD", foreach=True), params0, noise)
  assert po.relative_error(po.run_jax(optim.asgd(), params0, noise), ref) <= 1e-6


@pytest.mark.usefixtures("with_torch")
def test_parity_harness_detects_a_wrong_rule():
  """The comparison can fail: eps outside the roots (Adadelta), eta not decaying (ASGD)."""
  params0, noise = po.make_problem(STEPS, seed=0)
  ref = po.run_torch(_torch("Adadelta", eps=1e-3), params0, noise)
  assert po.relative_error(po.run_jax(optim.adadelta(eps=1e-6), params0, noise), ref) > 1e-3
  ref = po.run_torch(_torch("ASGD", lr=0.05, lambd=1e-2), params0, noise)
  assert po.relative_error(po.run_jax(optim.sgd(0.05), params0, noise), ref) > 1e-3


@pytest.mark.parametrize("make, ref", [
    (lambda s: optim.adadelta(s, weight_decay=0.1), lambda ps: torch.optim.Adadelta(
        ps, lr=0.5, weight_decay=0.1)),
    (lambda s: optim.asgd(s, 1e-3, 0.5, 50), lambda ps: torch.optim.ASGD(
        ps, lr=0.5, lambd=1e-3, alpha=0.5, t0=50)),
])
@pytest.mark.usefixtures("with_torch")
def test_learning_rate_schedule_matches_torch_lambdalr(make, ref):
  """A schedule ``n -> lr`` drives ours as LambdaLR drives torch (ASGD reads the lr of
  step t when it computes eta for step t+1, one step late, as torch)."""
  lam = lambda n: 0.1 + 0.9 * float(np.cos(np.pi * min(n, 150) / 300.0))
  sched = lambda n: 0.5 * (0.1 + 0.9 * jnp.cos(jnp.pi * jnp.minimum(n, 150) / 300.0))
  case = po.ParityCase(lambda: make(sched), ref, lr_lambda=lam)
  assert po.run_case(case, steps=100) <= 1e-5


# ---------------------------------------------------------------------------------------------
# ASGD's averaged parameters against torch's state["ax"]


def _run_jax_state(tx, params0, noise):
  pulls = {k: np.float32(pull) for k, (_, _, pull) in po.LEAVES.items()}

  @jax.jit
  def run(params, noise):
    def step(carry, noise_t):
      p, s = carry
      g = jax.tree.map(lambda n, x, c: n + c * x, noise_t, p, pulls)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, tx.init(params)), noise)[0]

  return run(jax.tree.map(jnp.asarray, params0), jax.tree.map(jnp.asarray, noise))


@pytest.mark.parametrize("t0", [50, 1e6])
@pytest.mark.usefixtures("with_torch")
def test_asgd_averaged_params_match_torch_ax(t0):
  params0, noise = po.make_problem(STEPS, seed=0)
  holder = []

  def make(ps):
    holder.append(torch.optim.ASGD(ps, lr=0.05, lambd=1e-3, alpha=0.5, t0=t0))
    return holder[0]

  ref = po.run_torch(make, params0, noise)
  opt = holder[0]
  ref_ax = {k: opt.state[p]["ax"].numpy() for k, p in zip(ref, opt.param_groups[0]["params"])}
  ref_eta = float(opt.state[opt.param_groups[0]["params"][0]]["eta"])
  ref_mu = float(opt.state[opt.param_groups[0]["params"][0]]["mu"])
  p, s = _run_jax_state(optim.asgd(0.05, 1e-3, 0.5, t0), params0, noise)
  ax = jax.tree.map(np.asarray, optim.asgd_averaged_params(s))
  assert po.relative_error(ax, ref_ax) <= 1e-5
  assert po.relative_error(jax.tree.map(np.asarray, p), ref) <= 1e-5
  (state,) = [x for x in s if isinstance(x, optim.ScaleByAsgdState)]
  np.testing.assert_allclose(float(state.eta), ref_eta, rtol=1e-6)
  np.testing.assert_allclose(float(state.mu), ref_mu, rtol=1e-6)
  assert int(state.count) == STEPS
  if t0 == 1e6:  # no averaging yet: ax is the parameters themselves
    for k in ref:
      np.testing.assert_array_equal(ax[k], np.asarray(p[k]))
  else:  # averaging over steps 51..200 moved ax away from the last iterate
    assert po.relative_error(ax, ref) > 1e-3


def test_asgd_averaged_params_found_anywhere():
  params = {"a": jnp.ones(3), "b": jnp.full(2, 2.0), "i": jnp.arange(2)}
  grads = {"a": jnp.ones(3), "b": jnp.ones(2), "i": jnp.zeros(2, jnp.int32)}
  tx = optax.multi_transform({"x": optim.asgd(0.1), "y": optim.asgd(0.2)},
                             {"a": "x", "b": "y", "i": "x"})
  s = tx.init(params)
  u, s = tx.update(grads, s, params)
  new = optax.apply_updates(params, u)
  ax = optim.asgd_averaged_params(s)
  assert isinstance(ax["i"], optax.MaskedNode)
  chex.assert_trees_all_equal(ax["a"], new["a"])
  chex.assert_trees_all_equal(ax["b"], new["b"])
  filled = optim.asgd_averaged_params(s, params)
  chex.assert_trees_all_equal(filled["i"], params["i"])
  inj = optax.inject_hyperparams(optim.asgd)(learning_rate=0.1)
  s2 = inj.init(params)
  _, s2 = inj.update(grads, s2, params)
  chex.assert_trees_all_close(optim.asgd_averaged_params(s2)["a"], new["a"])
  with pytest.raises(ValueError, match="no ScaleByAsgdState"):
    optim.asgd_averaged_params(optim.adadelta().init(params))


# ---------------------------------------------------------------------------------------------
# Equations


def test_adadelta_one_step_by_hand():
  """v=0.2, a=0.1, g=0.5, rho=0.9, eps=1e-6, lr=1:

  v' = 0.9*0.2 + 0.1*0.25 = 0.205
  delta = sqrt(0.100001) / sqrt(0.205001) * 0.5 = 0.3162293 / 0.4527703 * 0.5 = 0.3492163
  a' = 0.9*0.1 + 0.1*delta**2 = 0.1021952
  """
  tx = optim.scale_by_adadelta()
  s = tx.init(jnp.zeros(1))._replace(square_avg=jnp.array([0.2]), acc_delta=jnp.array([0.1]))
  u, s = tx.update(jnp.array([0.5]), s)
  delta = np.sqrt(0.100001) / np.sqrt(0.205001) * 0.5
  chex.assert_trees_all_close(s.square_avg, jnp.array([0.205]), rtol=1e-6)
  chex.assert_trees_all_close(u, jnp.array([delta]), rtol=1e-6)
  chex.assert_trees_all_close(s.acc_delta, jnp.array([0.09 + 0.1 * delta**2]), rtol=1e-6)
  assert int(s.count) == 1


def test_adadelta_matches_equation_over_steps():
  rho, eps, lr = 0.8, 1e-4, 0.7
  tx = optim.adadelta(lr, rho, eps)
  rng = np.random.default_rng(0)
  p = rng.normal(size=(3, 4))
  v, a = np.zeros_like(p), np.zeros_like(p)
  params, s = jnp.asarray(p, jnp.float32), None
  s = tx.init(params)
  for _ in range(6):
    g = rng.normal(size=p.shape)
    u, s = tx.update(jnp.asarray(g, jnp.float32), s, params)
    params = optax.apply_updates(params, u)
    v = rho * v + (1 - rho) * g * g
    delta = np.sqrt(a + eps) / np.sqrt(v + eps) * g
    a = rho * a + (1 - rho) * delta * delta
    p = p - lr * delta
  chex.assert_trees_all_close(params, jnp.asarray(p, jnp.float32), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s[0].acc_delta, jnp.asarray(a, jnp.float32), rtol=1e-5)


def test_asgd_matches_equation_over_steps():
  """p_t = p(1 - lambd eta_{t-1}) - eta_{t-1} g; eta_t = lr / (1 + lambd lr t)**alpha;
  mu_t = 1 / max(1, t - t0); ax averages from step t0 + 2 on (mu_{t-1} < 1)."""
  lr, lambd, alpha, t0 = 0.1, 0.05, 0.75, 2
  tx = optim.asgd(lr, lambd, alpha, t0)
  rng = np.random.default_rng(1)
  p = rng.normal(size=5)
  params = jnp.asarray(p, jnp.float32)
  s = tx.init(params)
  eta, mu, ax = lr, 1.0, np.zeros(5)
  for t in range(1, 8):
    g = rng.normal(size=5)
    u, s = tx.update(jnp.asarray(g, jnp.float32), s, params)
    params = optax.apply_updates(params, u)
    p = p * (1 - lambd * eta) - eta * g
    ax = p.copy() if mu == 1 else ax + mu * (p - ax)
    eta = lr / (1 + lambd * lr * t) ** alpha
    mu = 1 / max(1, t - t0)
    chex.assert_trees_all_close(params, jnp.asarray(p, jnp.float32), rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(optim.asgd_averaged_params(s), jnp.asarray(ax, jnp.float32),
                                rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(s[0].eta, jnp.float32(eta), rtol=1e-6)
    chex.assert_trees_all_close(s[0].mu, jnp.float32(mu), rtol=1e-7)
    chex.assert_type(s[0].eta, jnp.float32)


def test_rprop_sign_rules_by_hand():
  """prev = [1, 1, 0, -2], g = [2, -3, 5, -1], step sizes 0.1 (etas 0.5, 1.2):

  sign(g*prev) = [+, -, 0, +]  ->  step = [0.12, 0.05, 0.1, 0.12]
  g' = [2, 0, 5, -1] (zeroed where the sign flipped)  ->  u = [0.12, 0, 0.1, -0.12]
  """
  tx = optim.scale_by_rprop(0.1)
  s = tx.init(jnp.zeros(4))._replace(prev=jnp.array([1.0, 1.0, 0.0, -2.0]))
  u, s = tx.update(jnp.array([2.0, -3.0, 5.0, -1.0]), s)
  chex.assert_trees_all_close(s.step_size, jnp.array([0.12, 0.05, 0.1, 0.12]), rtol=1e-6)
  chex.assert_trees_all_close(u, jnp.array([0.12, 0.0, 0.1, -0.12]), rtol=1e-6)
  chex.assert_trees_all_equal(s.prev, jnp.array([2.0, 0.0, 5.0, -1.0]))
  # the next step after a flip: prev = 0 there, so factor 1 (no second shrink)
  u, s = tx.update(jnp.array([1.0, 4.0, 1.0, 1.0]), s)
  chex.assert_trees_all_close(s.step_size, jnp.array([0.144, 0.05, 0.12, 0.06]), rtol=1e-6)
  chex.assert_trees_all_close(u, jnp.array([0.144, 0.05, 0.12, 0.0]), rtol=1e-6)


def test_rprop_clips_step_sizes():
  tx = optim.scale_by_rprop(1.0, (0.5, 2.0), (0.3, 1.5))
  s = tx.init(jnp.zeros(2))
  for g in ([1.0, 1.0], [1.0, -1.0], [1.0, 1.0], [1.0, -1.0]):
    _, s = tx.update(jnp.array(g), s)
  # first step: prev = 0 -> factor 1; then 2 -> 1.5 (clip) ... second entry: 1 -> 0.5 -> 0.5
  # (prev zeroed) -> 0.3 (clip)
  chex.assert_trees_all_close(s.step_size, jnp.array([1.5, 0.3]))


# ---------------------------------------------------------------------------------------------
# Properties


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(st.lists(st.floats(-10, 10, width=32), min_size=4, max_size=4),
                  st.floats(1e-4, 1.0), st.integers(1, 5))
def test_rprop_moves_by_its_step_size_within_bounds(gs, lr, steps):
  lo, hi = 1e-3, 2.0
  tx = optim.rprop(lr, (0.5, 1.2), (lo, hi))
  params = jnp.zeros(4)
  s = tx.init(params)
  g = jnp.asarray(gs, jnp.float32)
  for t in range(steps):
    g_t = g * (-1.0) ** t
    u, s = tx.update(g_t, s, params)
    st_size = s[0].step_size
    assert bool(jnp.all(jnp.isfinite(u)))
    if t > 0:
      assert bool(jnp.all((st_size >= np.float32(lo)) & (st_size <= np.float32(hi))))
    # |u| is the step size where the gradient kept its sign, 0 where it flipped or is 0
    moved = jnp.abs(u)
    assert bool(jnp.all((moved == 0) | (moved == st_size)))


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-6]))
def test_zero_gradients_never_give_nan(rho, eps):
  """eps = 0 with a zero gradient: torch's Adadelta computes 0/0 = NaN, ours a 0 step."""
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for tx in (optim.adadelta(1.0, rho, eps), optim.asgd(), optim.rprop()):
    s = tx.init(params)
    for _ in range(2):
      u, s = tx.update(zeros, s, params)
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((u, s)))


def test_asgd_without_decay_is_sgd_with_its_step_size():
  """lambd = 0 and alpha = 0: eta = lr for ever, ASGD is plain SGD (bitwise)."""
  params0, noise = po.make_problem(50, seed=0)
  a = po.run_jax(optim.asgd(0.05, 0.0, 0.0), params0, noise)
  b = po.run_jax(optim.sgd(0.05), params0, noise)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------------------------------
# Robustness: non-float leaves, params required, jit, masks, bad hyperparameters


@pytest.mark.parametrize("make", [lambda: optim.adadelta(weight_decay=0.1),
                                  lambda: optim.asgd(weight_decay=0.1), lambda: optim.rprop()])
def test_int_leaves_pass_through(make):
  params = {"w": jnp.ones((2, 3)), "step": jnp.array(7, jnp.int32), "ids": jnp.arange(3)}
  grads = {"w": jnp.full((2, 3), 0.5), "step": jnp.array(1, jnp.int32),
           "ids": jnp.ones(3, jnp.int32)}
  tx = make()
  s = tx.init(params)
  assert not any(x.dtype == jnp.int32 and x.shape == (3,) for x in jax.tree.leaves(s))
  for _ in range(3):
    u, s = jax.jit(tx.update)(grads, s, params)
    params = optax.apply_updates(params, u)
  chex.assert_trees_all_equal(params["step"], jnp.array(7, jnp.int32))
  chex.assert_trees_all_equal(params["ids"], jnp.arange(3))
  assert params["ids"].dtype == jnp.int32
  assert not np.allclose(params["w"], 1.0)


def test_asgd_requires_params():
  tx = optim.asgd()
  s = tx.init(jnp.ones(2))
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(2), s)


def test_weight_decay_mask():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  grads = jax.tree.map(jnp.zeros_like, params)
  for tx in (optim.adadelta(weight_decay=0.5, mask=optim.weight_decay_mask),
             optim.asgd(weight_decay=0.5, lambd=0.0, mask=optim.weight_decay_mask)):
    u, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.max(jnp.abs(u["w"]))) > 0
    chex.assert_trees_all_equal(u["b"], jnp.zeros(2))


def test_inject_hyperparams():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 0.5)}
  for name, lr in (("adadelta", 0.5), ("asgd", 0.05), ("rprop", 0.01)):
    tx = optax.inject_hyperparams(getattr(optim, name))(learning_rate=lr)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    u_ref, _ = getattr(optim, name)(lr).update(grads, getattr(optim, name)(lr).init(params),
                                               params)
    chex.assert_trees_all_close(u, u_ref, rtol=1e-6)


@pytest.mark.parametrize("build, match, err", [
    (lambda: optim.adadelta(rho=1.5), "rho", ValueError),
    (lambda: optim.adadelta(eps=-1.0), "eps", ValueError),
    (lambda: optim.adadelta(learning_rate="1"), "learning_rate", TypeError),
    (lambda: optim.adadelta(weight_decay=-0.1), "weight_decay", ValueError),
    (lambda: optim.adadelta(weight_decay=0.1, mask=lambda p: 1.0).init({"a": jnp.ones(2)}),
     "mask", TypeError),
    (lambda: optim.asgd(lambd=-1.0), "lambd", ValueError),
    (lambda: optim.asgd(alpha="0.75"), "alpha", TypeError),
    (lambda: optim.asgd(t0=float("nan")), "t0", ValueError),
    (lambda: optim.asgd(learning_rate=-0.1), "learning_rate", ValueError),
    (lambda: optim.asgd(learning_rate=lambda n: -0.1), "learning_rate", ValueError),
    (lambda: optim.rprop(etas=(1.5, 1.2)), r"etas\[0\]", ValueError),
    (lambda: optim.rprop(etas=(0.5, 0.9)), r"etas\[1\]", ValueError),
    (lambda: optim.rprop(etas=0.5), "etas", TypeError),
    (lambda: optim.rprop(step_sizes=(1.0, 0.1)), "step_sizes", ValueError),
    (lambda: optim.rprop(step_sizes=(-1.0, 0.1)), r"step_sizes\[0\]", ValueError),
    (lambda: optim.rprop(learning_rate=lambda n: 0.1), "initial step size", TypeError),
    (lambda: optim.scale_by_rprop(learning_rate=None), "learning_rate", TypeError),
])
def test_bad_hyperparameters_name_the_argument(build, match, err):
  with pytest.raises(err, match=match):
    build()


def test_wrong_state_is_refused():
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match="state"):
    optim.scale_by_adadelta().update(params, optim.scale_by_rprop().init(params))
  with pytest.raises(ValueError, match="shape"):
    tx = optim.scale_by_rprop()
    tx.update({"w": jnp.ones(4)}, tx.init(params))
