"""torch.optim.Adafactor's twin (jaxopt_llm/optim/factored.py): against torch.optim for 200
steps (the parity harness's problem, and a 3-D and a 1-D leaf), against its written
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
from jaxopt_llm.optim.factored import adafactor_leaf
from jaxopt_llm.parity import optimizers as po

torch = None  # imported by the tests that compare with it (the others run without it)


@pytest.fixture
def with_torch():
  global torch
  torch = pytest.importorskip("torch")

STEPS = 200
NON_DEFAULT = dict(lr=0.05, beta2_decay=-0.5, eps=(1e-3, 1e-2), d=2.0, weight_decay=0.1)


def _ours(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0):
  return optim.adafactor(lr, beta2_decay, eps, d, weight_decay=weight_decay)


def _torch(**kw):
  return lambda ps: torch.optim.Adafactor(ps, **kw)


# ---------------------------------------------------------------------------------------------
# Against torch.optim.Adafactor


@pytest.mark.parametrize("kw", [{}, NON_DEFAULT], ids=["defaults", "non_default"])
@pytest.mark.usefixtures("with_torch")
def test_matches_torch_200_steps(kw):
  err = po.run_case(po.ParityCase(lambda: _ours(**kw), _torch(**kw)), steps=STEPS, seed=0)
  assert err <= 1e-5, f"relative error {err:.3e} after {STEPS} steps"


@pytest.mark.usefixtures("with_torch")
def test_no_further_from_float64_than_torch_fp32():
  """torch rounds ``1 - lr * wd`` to float32 before multiplying; ours is at least as close
  to a float64 run."""
  params0, noise = po.make_problem(STEPS, seed=1)
  ours = po.run_jax(_ours(**NON_DEFAULT), params0, noise)
  ref32 = po.run_torch(_torch(**NON_DEFAULT), params0, noise)
  f64 = lambda d: {k: v.astype(np.float64) for k, v in d.items()}
  ref64 = po.run_torch(_torch(**NON_DEFAULT), f64(params0), f64(noise))
  ours_err, torch_err = po.relative_error(ours, ref64), po.relative_error(ref32, ref64)
  assert ours_err <= max(1.5 * torch_err, 2e-6), (ours_err, torch_err)


# A 3-D leaf (factored over its last two dims, per leading index), a 1-D and a 0-D leaf (not
# factored), a matrix whose rows are all zero on some steps, and a tiny-gradient matrix
# (eps1 clamps there).
SHAPES = {"w3": ((3, 4, 5), 1.0), "v": ((7,), 0.5), "s": ((), 0.2), "m": ((6, 5), 1.0),
          "tiny": ((4, 3), 1e-5)}


def _problem(steps, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=sh).astype(np.float32) for k, (sh, _) in SHAPES.items()}
  noise = {k: (rng.normal(size=(steps,) + sh) * sc).astype(np.float32)
           for k, (sh, sc) in SHAPES.items()}
  noise["m"][::3, :2] = 0.0  # rows 0, 1 zero on every third step
  return params, noise


def _run_jax(tx, params, noise):
  @jax.jit
  def run(params, noise):
    def step(carry, n):
      p, s = carry
      g = jax.tree.map(lambda n_, x: n_ + 0.1 * x, n, p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, tx.init(params)), noise)[0]

  p, s = run(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, noise))
  return jax.tree.map(np.asarray, p), s


def _run_torch(make, params, noise):
  ps = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  opt = make(list(ps.values()))
  for t in range(next(iter(noise.values())).shape[0]):
    with torch.no_grad():
      for k, p in ps.items():
        p.grad = torch.from_numpy(np.asarray(noise[k][t])) + 0.1 * p.detach()
    opt.step()
  return {k: p.detach().numpy() for k, p in ps.items()}, {k: opt.state[p] for k, p in ps.items()}


@pytest.mark.parametrize("kw", [{}, NON_DEFAULT], ids=["defaults", "non_default"])
@pytest.mark.usefixtures("with_torch")
def test_3d_1d_0d_leaves_match_torch(kw):
  params, noise = _problem(STEPS)
  ours, state = _run_jax(_ours(**kw), params, noise)
  ref, ref_state = _run_torch(_torch(**kw), params, noise)
  assert po.relative_error(ours, ref) <= 1e-5
  (s,) = [x for x in state if isinstance(x, optim.ScaleByAdafactorState)]
  # The state equals torch's, key by key (the from_torch table of ScaleByAdafactorState).
  for k in ("w3", "m", "tiny"):
    assert s.variance[k] is None
    for ours_key in ("row_var", "col_var"):
      a = np.asarray(getattr(s, ours_key)[k])
      b = ref_state[k][ours_key].numpy()
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-30)
  for k in ("v", "s"):
    assert s.row_var[k] is None and s.col_var[k] is None
    np.testing.assert_allclose(np.asarray(s.variance[k]), ref_state[k]["variance"].numpy(),
                               rtol=1e-5)
  assert int(s.count) == STEPS == int(ref_state["v"]["step"])


@pytest.mark.usefixtures("with_torch")
def test_harness_detects_a_wrong_rule():
  """The comparison can fail: optax.adafactor (eps1 added to g**2, a different relative
  step and decay) is not torch's rule."""
  params, noise = _problem(STEPS)
  ref, _ = _run_torch(_torch(), params, noise)
  wrong, _ = _run_jax(optax.adafactor(), params, noise)
  assert po.relative_error(wrong, ref) > 1e-3


@pytest.mark.usefixtures("with_torch")
def test_learning_rate_schedule_matches_torch_lambdalr():
  """The lr caps rho_t and scales the decay: a schedule drives both, as LambdaLR does."""
  lam = lambda n: 1.0 if n < 50 else 0.2
  sched = lambda n: jnp.where(n < 50, 0.05, 0.01)
  case = po.ParityCase(lambda: optim.adafactor(sched, weight_decay=0.1),
                       _torch(lr=0.05, weight_decay=0.1), lr_lambda=lam)
  assert po.run_case(case, steps=100) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Equations


def _reference_step(p, g, state, t, lr=1e-2, tau=-0.8, eps1=None, eps2=1e-3, d=1.0):
  """torch's docstring algorithm, in float64 numpy (one leaf, no weight decay)."""
  eps1 = np.finfo(np.float32).eps if eps1 is None else eps1
  w = t ** tau
  rho = min(lr, 1 / np.sqrt(t))
  alpha = max(eps2, np.sqrt(np.mean(p * p))) * rho
  if p.ndim >= 2:
    r, c = state
    r = r + w * (np.mean(g * g, axis=-1, keepdims=True) - r)
    c = c + w * (np.mean(g * g, axis=-2, keepdims=True) - c)
    v_hat = r * c / np.maximum(np.mean(r, axis=-2, keepdims=True), eps1)
    state = (r, c)
  else:
    (v,) = state
    v = v + w * (g * g - v)
    v_hat = v
    state = (v,)
  u = g / np.sqrt(np.maximum(v_hat, eps1 * eps1))
  u_hat = u / max(1.0, np.sqrt(np.mean(u * u)) / d)
  return p - alpha * u_hat, state


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4), (5,)])
def test_matches_written_equation_over_steps(shape):
  rng = np.random.default_rng(0)
  p = rng.normal(size=shape)
  tx = optim.adafactor(0.05, -0.6, (1e-4, 1e-2), 1.5)
  params = jnp.asarray(p, jnp.float32)
  s = tx.init(params)
  state = ((np.zeros(shape[:-1] + (1,)), np.zeros(shape[:-2] + (1,) + shape[-1:]))
           if len(shape) >= 2 else (np.zeros(shape),))
  update = jax.jit(tx.update)
  for t in range(1, 6):
    g = rng.normal(size=shape) * (10.0 if t == 3 else 1.0)  # t = 3: the update is clipped
    u, s = update(jnp.asarray(g, jnp.float32), s, params)
    params = optax.apply_updates(params, u)
    p, state = _reference_step(p, g, state, t, lr=0.05, tau=-0.6, eps1=1e-4, eps2=1e-2,
                               d=1.5)
    chex.assert_trees_all_close(params, jnp.asarray(p, jnp.float32), rtol=2e-6, atol=2e-7)
  ada = s[0]
  if len(shape) >= 2:
    chex.assert_shape(ada.row_var, shape[:-1] + (1,))
    chex.assert_shape(ada.col_var, shape[:-2] + (1,) + shape[-1:])
    chex.assert_trees_all_close(ada.row_var, jnp.asarray(state[0], jnp.float32), rtol=1e-5)
    assert ada.variance is None
  else:
    chex.assert_trees_all_close(ada.variance, jnp.asarray(state[0], jnp.float32), rtol=1e-5)


def test_first_step_by_hand():
  """p = [3, 4] (RMS = sqrt(12.5)), g = [1, -2], t = 1, defaults: beta2 = 0 so v = g**2,
  U = g / |g| = [1, -1], RMS(U) = 1 -> no clipping; rho = min(0.01, 1) = 0.01,
  alpha = sqrt(12.5) * 0.01 = 0.0353553; p' = [3 - 0.0353553, 4 + 0.0353553]."""
  tx = optim.adafactor()
  p = jnp.array([3.0, 4.0])
  u, s = tx.update(jnp.array([1.0, -2.0]), tx.init(p), p)
  chex.assert_trees_all_close(optax.apply_updates(p, u),
                              jnp.array([3 - 0.0353553, 4 + 0.0353553]), rtol=1e-6)
  chex.assert_trees_all_close(s[0].variance, jnp.array([1.0, 4.0]))


def test_weight_decay_is_decoupled_and_times_lr():
  """A zero gradient: only the decay moves p, by exactly lr * wd * p."""
  tx = optim.adafactor(0.02, weight_decay=0.5)
  p = {"w": jnp.ones((2, 3)), "b": jnp.full(3, 2.0)}
  u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
  chex.assert_trees_all_close(u, jax.tree.map(lambda x: -0.01 * x, p), rtol=1e-6)
  masked = optim.adafactor(0.02, weight_decay=0.5, mask=optim.weight_decay_mask)
  u, _ = masked.update(jax.tree.map(jnp.zeros_like, p), masked.init(p), p)
  chex.assert_trees_all_equal(u["b"], jnp.zeros(3))


def test_eps1_none_is_the_parameter_dtype_eps():
  g = jnp.array([1e-6, 0.0, 1.0])
  one = jnp.ones([], jnp.int32)
  kw = dict(learning_rate=1e-2, beta2_decay=-0.8, eps2=1e-3, d=1e9)
  for dtype in (jnp.float32, jnp.bfloat16):
    eps = float(jnp.finfo(dtype).eps)
    p = jnp.ones(3, dtype)
    a, *_ = adafactor_leaf(g.astype(dtype), p, None, None, jnp.zeros(3), one, eps1=None, **kw)
    b, *_ = adafactor_leaf(g.astype(dtype), p, None, None, jnp.zeros(3), one, eps1=eps, **kw)
    chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Properties


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(st.integers(1, 1000), st.floats(1e-3, 1.0), st.floats(1.0, 4.0),
                  st.integers(0, 2**31 - 1))
def test_step_rms_is_at_most_alpha(t, lr, d, seed):
  """RMS(u) <= d * max(eps2, RMS(p)) * min(lr, 1/sqrt(t)) for any gradient: the update
  clipping bounds RMS(U) by d, so the step is relative to the parameters' scale (what
  Adafactor is about). A gradient with RMS(U) > d is clipped to exactly that bound."""
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(4, 5)) * 10.0 ** rng.uniform(-6, 6), jnp.float32)
  r, c = jnp.asarray(rng.random((4, 1)), jnp.float32), jnp.asarray(rng.random((1, 5)),
                                                                    jnp.float32)
  u, *_ = adafactor_leaf(g, p, r, c, None, jnp.asarray(t, jnp.int32), learning_rate=lr,
                         beta2_decay=-0.8, eps1=None, eps2=1e-3, d=d)
  alpha = max(1e-3, float(jnp.sqrt(jnp.mean(p * p)))) * min(lr, 1 / np.sqrt(t))
  rms_u = float(jnp.sqrt(jnp.mean(u * u)))
  assert rms_u <= d * alpha * (1 + 1e-5)
  # zero history and a small averaging weight 1/t: v ~ g**2 / t, RMS(U) ~ sqrt(t) > d
  big, *_ = adafactor_leaf(g, p, 0 * r, 0 * c, None, jnp.asarray(10**4, jnp.int32),
                           learning_rate=lr, beta2_decay=-1.0, eps1=1e-30, eps2=1e-3, d=d)
  alpha = max(1e-3, float(jnp.sqrt(jnp.mean(p * p)))) * min(lr, 1e-2)
  np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(big * big))), d * alpha, rtol=1e-5)


def test_eps1_zero_never_gives_nan():
  """eps1 = 0 with an all-zero row (and a g**2 that underflows): torch computes
  rsqrt(0) * 0 = NaN there; ours steps by 0."""
  tx = optim.adafactor(eps=(0.0, 1e-3))
  p = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  g = {"w": jnp.ones((3, 4)).at[0].set(0.0), "b": jnp.array([0.0, 1e-30, 1.0, 2.0])}
  s = tx.init(p)
  update = jax.jit(tx.update)
  for _ in range(2):
    u, s = update(g, s, p)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((u, s)))
    chex.assert_trees_all_equal(u["w"][0], jnp.zeros(4))
    assert float(u["b"][0]) == 0.0


def test_overflowed_squared_gradient_steps_by_zero_never_nan():
  """Fuzz finding: |g| > 1.8e19 makes g**2 (so a row/column statistic and their mean) inf in
  float32; torch's lerp gives inf - inf * 0 = NaN at the first step and the factored
  estimate inf / inf = NaN, so the whole leaf moved by NaN. Ours keeps the statistics at
  +inf (an exact value beyond float32) and steps those coordinates by 0, as Adam does; a
  coordinate whose own statistic is finite keeps a finite step, and a NaN gradient still
  propagates."""
  p = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.asarray([0.5, -0.25, 2.0])}
  huge = {"w": jnp.full((2, 3), 1e30), "b": jnp.asarray([1e30, -3e38, 0.5])}
  tx = optim.adafactor(weight_decay=0.0)
  s = tx.init(p)
  update = jax.jit(tx.update)
  for _ in range(3):  # the first step (weight 1) and later ones (start already inf)
    u, s = update(huge, s, p)
    assert not any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves((u, s)))
    chex.assert_trees_all_equal(u["w"], jnp.zeros((2, 3)))
    chex.assert_trees_all_equal(u["b"][:2], jnp.zeros(2))
    assert float(jnp.abs(u["b"][2])) > 0  # its own g**2 is finite: it still moves
  assert bool(jnp.all(jnp.isposinf(s[0].row_var["w"])))
  # One huge row: every column statistic overflows too, so the whole factored leaf steps
  # by 0 (inf / inf); another leaf is independent and moves.
  g = {"w": jnp.ones((2, 3)).at[0].set(1e30), "b": jnp.ones(3)}
  u, _ = tx.update(g, tx.init(p), p)
  chex.assert_trees_all_equal(jnp.abs(u["w"]), jnp.zeros((2, 3)))
  assert bool(jnp.all(u["b"] != 0)) and bool(jnp.all(jnp.isfinite(u["b"])))
  # A NaN gradient is not hidden.
  u, _ = tx.update({"w": jnp.ones((2, 3)).at[0, 0].set(jnp.nan), "b": jnp.ones(3)},
                   tx.init(p), p)
  assert bool(jnp.isnan(u["w"][0, 0]))


def test_state_of_other_matrix_shapes_is_a_clear_error():
  """Fuzz finding: a state from params of another row count crashed with a broadcasting
  TypeError naming nothing."""
  tx = optim.adafactor()
  p = {"w": jnp.ones((2, 3))}
  for other in ({"w": jnp.ones((3, 3))}, {"w": jnp.ones((2, 4))}):
    with pytest.raises(ValueError, match="adafactor: `state` was built by init for other"):
      tx.update(p, tx.init(other), p)


# ---------------------------------------------------------------------------------------------
# Robustness


def test_int_leaves_pass_through():
  params = {"w": jnp.ones((2, 3)), "step": jnp.array(7, jnp.int32), "ids": jnp.arange(3)}
  grads = {"w": jnp.full((2, 3), 0.5), "step": jnp.array(1, jnp.int32),
           "ids": jnp.ones(3, jnp.int32)}
  tx = optim.adafactor(weight_decay=0.1)
  s = tx.init(params)
  assert isinstance(s[0].row_var["ids"], optax.MaskedNode)
  for _ in range(3):
    u, s = jax.jit(tx.update)(grads, s, params)
    params = optax.apply_updates(params, u)
  chex.assert_trees_all_equal(params["step"], jnp.array(7, jnp.int32))
  chex.assert_trees_all_equal(params["ids"], jnp.arange(3))
  assert not np.allclose(params["w"], 1.0)


def test_requires_params_and_its_own_state():
  tx = optim.scale_by_adafactor()
  p = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="params"):
    tx.update(p, tx.init(p))
  with pytest.raises(TypeError, match="state"):
    tx.update(p, optim.scale_by_rprop().init(p), p)
  with pytest.raises(ValueError, match="state"):
    tx.update(p, tx.init({"w": jnp.ones(6)}), p)


def test_inject_hyperparams_and_bf16():
  params = {"w": jnp.ones((2, 3), jnp.bfloat16)}
  grads = {"w": jnp.full((2, 3), 0.5, jnp.bfloat16)}
  tx = optax.inject_hyperparams(optim.adafactor)(learning_rate=0.01)
  u, s = jax.jit(tx.update)(grads, tx.init(params), params)
  assert u["w"].dtype == jnp.bfloat16
  assert s.inner_state[0].row_var["w"].dtype == jnp.float32
  u_ref, _ = optim.adafactor(0.01).update(grads, optim.adafactor(0.01).init(params), params)
  chex.assert_trees_all_equal(u, u_ref)


@pytest.mark.parametrize("build, match, err", [
    (lambda: optim.adafactor(beta2_decay=0.5), "beta2_decay", ValueError),
    (lambda: optim.adafactor(d=0.5), "`d`", ValueError),
    (lambda: optim.adafactor(eps=(-1.0, 1e-3)), r"eps\[0\]", ValueError),
    (lambda: optim.adafactor(eps=(None, "1e-3")), r"eps\[1\]", TypeError),
    (lambda: optim.adafactor(eps=1e-3), "eps", TypeError),
    (lambda: optim.adafactor(learning_rate=-1.0), "learning_rate", ValueError),
    (lambda: optim.adafactor(weight_decay=-1.0), "weight_decay", ValueError),
    (lambda: optim.adafactor(weight_decay=lambda n: jnp.nan), "weight_decay", ValueError),
    (lambda: optim.adafactor().init({"z": jnp.ones(2, jnp.complex64)}), "complex", TypeError),
])
def test_bad_hyperparameters_name_the_argument(build, match, err):
  with pytest.raises(err, match=match):
    build()
