"""Sophia's Hessian estimators (Gauss-Newton-Bartlett, Hutchinson) against their closed forms
in expectation, on 8 devices with axis_name, the every-k train-step helper and the monitors."""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import losses, optim
from jaxopt_llm.optim import hessian

# Monte Carlo checks: mean of N estimates within Z standard errors of the exact value, per
# coordinate. With ~30 coordinates, P(any |z| > 5) for a correct estimator is ~2e-5.
Z = 5.0


def _within_standard_errors(samples, exact, z=Z):
  """|mean - exact| <= z * SE (SE = sample std / sqrt(N)) for every coordinate."""
  samples = np.asarray(samples, np.float64)
  mean = samples.mean(0)
  se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  return np.abs(mean - exact) <= z * se + 1e-9 * np.abs(exact).max()


def _flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                         for x in jax.tree.leaves(tree)], axis=1)


# ---------------------------------------------------------------------------------------------
# Gauss-Newton-Bartlett


def _softmax_regression(seed=0, shape=(2, 3), d=4, vocab=5):
  rng = np.random.default_rng(seed)  # numpy data: no eager XLA compiles in the tests
  x = jnp.asarray(rng.normal(size=shape + (d,)), jnp.float32)
  params = {"W": jnp.asarray(0.8 * rng.normal(size=(d, vocab)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=vocab), jnp.float32)}
  logits_fn = lambda p: x @ p["W"] + p["c"]
  return x, params, logits_fn


def _gauss_newton_diag(x, params, where):
  """Closed form for logits = x W + c and the mean CE over counted tokens:
  GN = (1/B) sum_b J_b^T (diag(p_b) - p_b p_b^T) J_b, whose diagonal is
  W[i,v]: (1/B) sum_b x_bi^2 p_bv (1 - p_bv);  c[v]: (1/B) sum_b p_bv (1 - p_bv)."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  w = np.asarray(where, np.float64).reshape(-1)
  z = x @ np.asarray(params["W"], np.float64) + np.asarray(params["c"], np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  s = p * (1 - p) * w[:, None]
  n = w.sum()
  return {"W": (x**2).T @ s / n, "c": s.sum(0) / n}


def test_gnb_equals_gauss_newton_diagonal_in_expectation():
  """All tokens, and a mask that leaves 4 of the 6 (one jit for both: compile time)."""
  x, params, logits_fn = _softmax_regression()
  where = jnp.array([[True, True, False], [True, False, True]])
  n_samples = 4000

  @jax.jit
  def sample(key):
    keys = jax.random.split(key, n_samples)
    full = jax.vmap(lambda k: hessian.gauss_newton_bartlett(logits_fn, params, k))(keys)
    masked = jax.vmap(lambda k: hessian.gauss_newton_bartlett(logits_fn, params, k,
                                                              where=where))(keys)
    return full, masked

  for est, w in zip(sample(jax.random.PRNGKey(1)), (np.ones(x.shape[:-1]), where)):
    exact = _gauss_newton_diag(x, params, w)
    samples, exact_flat = _flat(est), np.concatenate([exact["W"].ravel(), exact["c"]])
    ok = _within_standard_errors(samples, exact_flat)
    assert ok.all(), (samples.mean(0)[~ok], exact_flat[~ok])
    assert (samples >= 0).all()
    # The check has power: the estimate without the factor B, or off by 10%, fails it.
    n_tokens = int(np.sum(w))
    assert not _within_standard_errors(samples / n_tokens, exact_flat).all()
    assert not _within_standard_errors(samples, exact_flat * 1.1).all()


def test_gnb_is_b_times_squared_gradient_of_mean_ce_on_sampled_labels():
  """Exactly (one key): the vjp shortcut equals jax.grad of our cross_entropy."""
  x, params, logits_fn = _softmax_regression(seed=3, shape=(4, 5), vocab=7)
  where = jnp.asarray(np.random.default_rng(4).random((4, 5)) < 0.7)
  key = jax.random.PRNGKey(5)

  @jax.jit
  def both(p):
    est = hessian.gauss_newton_bartlett(logits_fn, p, key, where=where)
    clipped = hessian.gauss_newton_bartlett(logits_fn, p, key, where=where, clip_norm=1e-3)
    loose = hessian.gauss_newton_bartlett(logits_fn, p, key, where=where, clip_norm=1e6)
    labels = jax.random.categorical(key, logits_fn(p), axis=-1)  # the documented sampling
    g = jax.grad(lambda q: losses.cross_entropy(logits_fn(q), labels, where=where))(p)
    return est, clipped, loose, g

  est, clipped, loose, g = both(params)
  b = float(np.sum(where))
  chex.assert_trees_all_close(est, jax.tree.map(lambda g: b * g**2, g), rtol=1e-5, atol=1e-9)
  chex.assert_trees_all_equal_shapes_and_dtypes(est, params)
  # clip_norm: g_hat scaled by clip / (|g_hat| + 1e-6) (torch's clip_grad_norm_), or untouched.
  norm = float(optax.tree.norm(g))
  assert norm > 1e-2
  factor = (1e-3 / (norm + 1e-6)) ** 2
  chex.assert_trees_all_close(clipped, jax.tree.map(lambda e: factor * e, est), rtol=1e-5)
  chex.assert_trees_all_close(loose, est, rtol=0, atol=0)


def test_gnb_all_masked_is_zero_and_bf16_logits_give_float32():
  x, params, logits_fn = _softmax_regression()
  est = jax.jit(lambda p, k: hessian.gauss_newton_bartlett(
      logits_fn, p, k, where=jnp.zeros((2, 3), bool)))(params, jax.random.PRNGKey(0))
  chex.assert_trees_all_close(est, jax.tree.map(jnp.zeros_like, params), rtol=0, atol=0)
  p16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
  est16 = jax.jit(lambda p, k: hessian.gauss_newton_bartlett(
      lambda q: x.astype(jnp.bfloat16) @ q["W"] + q["c"], p, k))(p16, jax.random.PRNGKey(0))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(est16))
  chex.assert_tree_all_finite(est16)


def test_gnb_bad_input():
  x, params, logits_fn = _softmax_regression()
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="`where` must have shape"):
    hessian.gauss_newton_bartlett(logits_fn, params, key, where=jnp.ones((3, 2), bool))
  with pytest.raises(ValueError, match="`where` must be a boolean"):
    hessian.gauss_newton_bartlett(logits_fn, params, key, where=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="`logits_fn`"):
    hessian.gauss_newton_bartlett(lambda p: jnp.ones((2, 3), jnp.int32), params, key)
  with pytest.raises(ValueError, match="`logits_fn`"):
    hessian.gauss_newton_bartlett(None, params, key)
  with pytest.raises(ValueError, match="`clip_norm`"):
    hessian.gauss_newton_bartlett(logits_fn, params, key, clip_norm=0.0)


# ---------------------------------------------------------------------------------------------
# Gauss-Newton-Bartlett from hidden states (fused): same estimate, no [N, V] logits


def _linear_head(seed=0, shape=(4, 5), d_in=3, d=4, vocab=7):
  """logits = (x A) W + c: the hidden states depend on params too (A), so the estimate is
  pulled back through head_fn, not only taken at the head."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape + (d_in,)), jnp.float32)
  params = {"A": jnp.asarray(rng.normal(size=(d_in, d)), jnp.float32),
            "W": jnp.asarray(0.8 * rng.normal(size=(d, vocab)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=vocab), jnp.float32)}
  head_fn = lambda p: (x @ p["A"], p["W"], p["c"])
  logits_fn = lambda p: x @ p["A"] @ p["W"] + p["c"]
  return x, params, head_fn, logits_fn


def _float64_gnb(x, params, labels, where):
  """B * g**2 in float64 (numpy) for logits = (x A) W + c: with r = (softmax(z) -
  onehot(y)) * mask / B, g_W = h^T r, g_c = sum_b r_b, g_A = x^T (r W^T)."""
  f64 = lambda a: np.asarray(a, np.float64)
  x = f64(x).reshape(-1, x.shape[-1])
  a, w, c = f64(params["A"]), f64(params["W"]), f64(params["c"])
  mask = f64(where).reshape(-1)
  h = x @ a
  z = h @ w + c
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  b = mask.sum()
  r = (p - np.eye(w.shape[1])[np.asarray(labels).reshape(-1)]) * mask[:, None] / b
  g = {"A": x.T @ (r @ w.T), "W": h.T @ r, "c": r.sum(0)}
  return {k: b * v**2 for k, v in g.items()}


def _max_errors(tree, exact):
  return {k: float(np.max(np.abs(np.asarray(tree[k], np.float64) - exact[k]))) for k in exact}


def test_gnb_fused_equals_the_unfused_estimate_for_the_same_labels(monkeypatch):
  x, params, head_fn, logits_fn = _linear_head()
  where = jnp.asarray(np.random.default_rng(1).random((4, 5)) < 0.7)
  key = jax.random.PRNGKey(5)
  # The fused estimator's labels: the blockwise sampler with the same key.
  labels = losses.categorical_from_hidden(*head_fn(params)[:2], key, bias=params["c"],
                                          block_size=3)
  fused = jax.jit(lambda p, clip: hessian.gauss_newton_bartlett_fused(
      head_fn, p, key, where=where, clip_norm=clip, chunk_size=6, block_size=3),
      static_argnums=1)
  est = fused(params, None)
  chex.assert_trees_all_equal_shapes_and_dtypes(est, params)
  # Against the written equation in float64: B * g**2 on those labels. The fp32 reference
  # (jax.grad of our cross_entropy on the full logits) rounds too, the A-gradient sums
  # cancelling terms: the fused estimate must be no further from float64 than it (x2), and
  # within 1e-6 of each leaf's scale.
  exact = _float64_gnb(x, params, labels, where)
  g = jax.jit(jax.grad(lambda q: losses.cross_entropy(logits_fn(q), labels, where=where)))(
      params)
  b = float(np.sum(where))
  reference32 = jax.tree.map(lambda g: b * g**2, g)
  err, ref_err = _max_errors(est, exact), _max_errors(reference32, exact)
  for k in exact:
    scale = np.max(np.abs(exact[k]))
    assert err[k] <= max(2 * ref_err[k], 1e-6 * scale), (k, err[k], ref_err[k], scale)
  chex.assert_trees_all_close(est, reference32, rtol=2e-5, atol=1e-6)
  # Against the unfused estimator given the same labels (its sampler replaced), with and
  # without clipping: one formula for B * g**2, clipping and the psum.
  monkeypatch.setattr(jax.random, "categorical", lambda k, z, axis=-1: labels)
  for clip in (None, 1e-3):
    unfused = jax.jit(lambda p: hessian.gauss_newton_bartlett(
        logits_fn, p, key, where=where, clip_norm=clip))(params)
    scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(unfused))
    chex.assert_trees_all_close(fused(params, clip), unfused, rtol=2e-5, atol=1e-6 * scale)
  assert float(optax.tree.norm(g)) > 1e-2   # the 1e-3 clip was active


def test_gnb_fused_equals_gauss_newton_diagonal_in_expectation():
  """The sampler and the estimate together: E[B g**2] = diag(GN) (closed form)."""
  x, params, logits_fn = _softmax_regression()
  where = jnp.array([[True, True, False], [True, False, True]])
  head_fn = lambda p: [x, p["W"], p["c"]]   # a list works as a tuple does

  @jax.jit
  def sample(key):
    return jax.vmap(lambda k: hessian.gauss_newton_bartlett_fused(
        head_fn, params, k, where=where, block_size=2))(jax.random.split(key, 4000))

  samples = _flat(sample(jax.random.PRNGKey(1)))
  exact = _gauss_newton_diag(x, params, where)
  exact_flat = np.concatenate([exact["W"].ravel(), exact["c"]])
  ok = _within_standard_errors(samples, exact_flat)
  assert ok.all(), (samples.mean(0)[~ok], exact_flat[~ok])
  assert (samples >= 0).all()
  assert not _within_standard_errors(samples, exact_flat * 1.1).all()


def test_gnb_fused_no_bias_bf16_all_masked_and_bad_input():
  x, params, head_fn, _ = _linear_head(seed=2)
  key = jax.random.PRNGKey(0)
  no_bias = {"A": params["A"], "W": params["W"]}
  # (hidden, kernel) or (hidden, kernel, None): the same estimate.
  p16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)

  @jax.jit   # one compilation for the four
  def run():
    two = hessian.gauss_newton_bartlett_fused(lambda p: (x @ p["A"], p["W"]), no_bias, key)
    three = hessian.gauss_newton_bartlett_fused(lambda p: (x @ p["A"], p["W"], None),
                                                no_bias, key)
    zero = hessian.gauss_newton_bartlett_fused(head_fn, params, key,
                                               where=jnp.zeros((4, 5), bool))
    est16 = hessian.gauss_newton_bartlett_fused(
        lambda q: (x.astype(jnp.bfloat16) @ q["A"], q["W"], q["c"]), p16, key)
    return two, three, zero, est16

  two, three, zero, est16 = run()
  chex.assert_trees_all_close(two, three, rtol=0, atol=0)
  assert float(optax.tree.norm(two)) > 0
  chex.assert_trees_all_close(zero, jax.tree.map(jnp.zeros_like, params), rtol=0, atol=0)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(est16))
  chex.assert_tree_all_finite(est16)

  gnb = functools.partial(hessian.gauss_newton_bartlett_fused, params=params, key=key)
  with pytest.raises(ValueError, match="`head_fn` must be callable"):
    gnb(None)
  with pytest.raises(ValueError, match="`head_fn` must return"):
    gnb(lambda p: x @ p["A"] @ p["W"])
  with pytest.raises(ValueError, match="`head_fn` must return.*shapes"):
    gnb(lambda p: (x @ p["A"], p["W"].T))
  with pytest.raises(ValueError, match="`head_fn` must return.*hidden is int32"):
    gnb(lambda p: (jnp.ones((2, 4), jnp.int32), p["W"]))
  with pytest.raises(ValueError, match="`where` must have shape"):
    gnb(head_fn, where=jnp.ones((5, 4), bool))
  with pytest.raises(ValueError, match="`where` must be a boolean"):
    gnb(head_fn, where=jnp.ones((4, 5)))
  with pytest.raises(ValueError, match="`clip_norm`"):
    gnb(head_fn, clip_norm=0.0)
  for name in ("chunk_size", "block_size"):
    with pytest.raises(ValueError, match=f"`{name}`"):
      gnb(head_fn, **{name: 0})


_SHAPE_RE = re.compile(r"\b(?:f|bf|s|u|pred)\d*\[([\d,]*)\]")


def test_gnb_fused_compiles_without_a_tokens_by_vocab_buffer():
  n, d, v = 16384, 16, 32768     # one float32 [N, V] array = 2 GiB
  spec = (jax.ShapeDtypeStruct((n, d), jnp.float32),
          {"W": jax.ShapeDtypeStruct((d, v), jnp.float32)},
          jax.ShapeDtypeStruct((2,), jnp.uint32))
  full = n * v * 4
  fused = jax.jit(lambda x, p, k: hessian.gauss_newton_bartlett_fused(
      lambda q: (x, q["W"]), p, k)).lower(*spec).compile()
  unfused = jax.jit(lambda x, p, k: hessian.gauss_newton_bartlett(
      lambda q: x @ q["W"], p, k)).lower(*spec).compile()
  assert unfused.memory_analysis().temp_size_in_bytes >= full   # the measurement can tell
  assert fused.memory_analysis().temp_size_in_bytes < full / 8
  biggest = max(int(np.prod([int(s) for s in m.split(",") if s]))
                for m in _SHAPE_RE.findall(fused.as_text()))
  assert biggest < n * v // 8


# ---------------------------------------------------------------------------------------------
# Hutchinson


def _quadratic(seed=0):
  """L = 0.5 v^T A v + b^T v over a two-leaf pytree (7 coordinates, coupled across leaves);
  A symmetric and indefinite, so diag(A) has both signs."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(7, 7)).astype(np.float32)
  a = (a + a.T) / 2
  b = rng.normal(size=7).astype(np.float32)
  params = {"x": jnp.asarray(rng.normal(size=3), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}

  def loss_fn(p):
    v = jnp.concatenate([p["x"], p["y"].ravel()])
    return 0.5 * v @ (jnp.asarray(a) @ v) + jnp.asarray(b) @ v

  return a, params, loss_fn


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_equals_hessian_diagonal_in_expectation(distribution):
  a, params, loss_fn = _quadratic()
  est = jax.jit(lambda key: jax.vmap(lambda k: hessian.hutchinson(
      loss_fn, params, k, distribution=distribution))(jax.random.split(key, 4000)))(
          jax.random.PRNGKey(2))
  samples = _flat(est)
  exact = np.diag(a).astype(np.float64)
  ok = _within_standard_errors(samples, exact)
  assert ok.all(), (samples.mean(0), exact)
  assert not _within_standard_errors(samples, exact + 0.1).all()
  if distribution == "rademacher":
    # Var[u_i (Au)_i] = sum_{j != i} A_ij^2 exactly for Rademacher probes.
    var = (a.astype(np.float64) ** 2).sum(1) - np.diag(a).astype(np.float64) ** 2
    np.testing.assert_allclose(samples.var(0), var, rtol=0.15)


def test_hutchinson_rademacher_is_exact_for_a_diagonal_hessian():
  d = jnp.array([2.0, -1.0, 0.0, 5.5])
  loss_fn = lambda p: 0.5 * jnp.sum(d * p["v"] ** 2) + jnp.sum(jnp.sin(p["s"]))
  params = {"v": jnp.ones(4), "s": jnp.array(0.3)}
  estimate = jax.jit(lambda k: hessian.hutchinson(loss_fn, params, k))
  for seed in range(3):
    chex.assert_trees_all_close(estimate(jax.random.PRNGKey(seed)),
                                {"v": d, "s": -jnp.sin(0.3)}, rtol=1e-6)


def test_hutchinson_matches_jax_hessian_on_a_nonquadratic_loss():
  rng = np.random.default_rng(7)
  m = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  loss_fn = lambda p: jnp.sum(jnp.exp(0.3 * m @ p)) + 0.1 * jnp.sum(p**4)
  p = jnp.asarray(rng.normal(size=4), jnp.float32)

  @jax.jit
  def run(key):
    est = jax.vmap(lambda k: hessian.hutchinson(loss_fn, p, k))(jax.random.split(key, 4000))
    return est, jnp.diag(jax.hessian(loss_fn)(p))

  est, exact = run(jax.random.PRNGKey(8))
  exact = np.asarray(exact, np.float64)
  assert _within_standard_errors(np.asarray(est), exact).all()


def test_hutchinson_bad_input():
  _, params, loss_fn = _quadratic()
  with pytest.raises(ValueError, match="`distribution`"):
    hessian.hutchinson(loss_fn, params, jax.random.PRNGKey(0), distribution="uniform")
  with pytest.raises(ValueError, match="must be real"):
    hessian.hutchinson(lambda p: 0.0, {"z": jnp.ones(3, jnp.complex64)}, jax.random.PRNGKey(0))


@pytest.mark.parametrize("estimator", ["gnb", "gnb_fused", "hutchinson"])
def test_integer_leaves_get_a_zero_estimate_and_sophia_keeps_no_curvature_for_them(estimator):
  """Non-float parameter leaves are not differentiated (before: hutchinson refused them,
  GNB crashed on their float0 cotangent); the float leaves' estimate is unchanged."""
  key = jax.random.PRNGKey(0)
  x = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)
  floats = {"w": jnp.linspace(-0.5, 0.5, 12).reshape(3, 4)}
  mixed = {**floats, "n": jnp.array(2, jnp.int32), "ids": jnp.array([3, 1])}
  logits = lambda q: x @ q["w"]
  loss = lambda q: -jnp.mean(jax.nn.log_softmax(logits(q))[:, 0])
  if estimator == "gnb":
    est = lambda q: hessian.gauss_newton_bartlett(logits, q, key)
  elif estimator == "gnb_fused":
    est = lambda q: hessian.gauss_newton_bartlett_fused(lambda r: (x, r["w"]), q, key)
  else:
    est = lambda q: hessian.hutchinson(loss, q, key)
  e_f, e_m = jax.jit(est)(floats), jax.jit(est)(mixed)  # one compiler: the same rounding
  chex.assert_trees_all_close(e_m["w"], e_f["w"], rtol=1e-6)
  chex.assert_trees_all_equal(e_m["n"], jnp.zeros((), jnp.float32))
  chex.assert_trees_all_equal(e_m["ids"], jnp.zeros(2, jnp.float32))
  tx = optim.sophia(1e-2)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, mixed), tx.init(mixed), mixed, hessian=e_m)
  assert isinstance(state[0].hessian["n"], optax.MaskedNode)


# ---------------------------------------------------------------------------------------------
# Many devices: with axis_name every device returns the global estimate

N_DEV = 8


def _sharded_lm(seed=0, per_device=3, d=4, vocab=5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N_DEV, per_device, d)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, vocab, (N_DEV, per_device)), jnp.int32)
  params = {"W": jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=vocab), jnp.float32)}
  return x, labels, params


def _needs_devices():
  if jax.device_count() < N_DEV:
    pytest.skip(f"needs {N_DEV} devices (tests/conftest.py sets them up)")


def _on_devices(mode, fn, replicated, sharded):
  """Runs ``fn(*replicated, *sharded)`` per device over axis "data" (sharded args split on
  their leading axis) with pmap or with jit(shard_map); returns one result per device."""
  n_rep = len(replicated)
  if mode == "pmap":
    out = jax.pmap(fn, axis_name="data", in_axes=(None,) * n_rep + (0,) * len(sharded))(
        *replicated, *sharded)
    return jax.tree.map(np.asarray, out)
  mesh = jax.make_mesh((N_DEV,), ("data",))
  spec = jax.sharding.PartitionSpec
  # Each device sees a leading axis of 1; the replicated params come in with spec P().
  squeeze = lambda *args: fn(*args[:n_rep], *(a[0] for a in args[n_rep:]))
  expand = lambda *args: jax.tree.map(lambda v: v[None], squeeze(*args))
  run = jax.shard_map(expand, mesh=mesh, in_specs=(spec(),) * n_rep + (spec("data"),) *
                      len(sharded), out_specs=spec("data"))
  put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec("data")))
  return jax.tree.map(np.asarray, jax.jit(run)(*replicated, *(put(a) for a in sharded)))


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_gnb_with_axis_name_equals_the_global_estimate(mode):
  _needs_devices()
  x, _, params = _sharded_lm()
  # Unequal numbers of counted tokens per device (one device has none).
  where = jnp.asarray(np.random.default_rng(0).random((N_DEV, 3)) < 0.6).at[2].set(False)
  key = jax.random.PRNGKey(11)

  def per_device(p, k, xs, ws):
    return hessian.gauss_newton_bartlett(lambda q: xs @ q["W"] + q["c"], p, k, where=ws,
                                         axis_name="data")

  out = _on_devices(mode, per_device, (params, key), (x, where))
  # Reference on one device: device i samples its labels with fold_in(key, i); the gradient
  # is that of the mean CE over all counted tokens of the whole batch.
  @jax.jit
  def reference(p):
    logits = x @ p["W"] + p["c"]
    labels = jax.vmap(lambda i, z: jax.random.categorical(jax.random.fold_in(key, i), z,
                                                          axis=-1))(jnp.arange(N_DEV), logits)
    return jax.grad(lambda q: losses.cross_entropy(x @ q["W"] + q["c"], labels,
                                                   where=where))(p)

  g = reference(params)
  b = float(np.sum(where))
  expect = jax.tree.map(lambda g: b * g**2, g)
  for i in range(N_DEV):
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[i], out), expect, rtol=2e-5,
                                atol=1e-8)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_gnb_fused_with_axis_name_equals_the_global_estimate(mode):
  _needs_devices()
  x, _, params = _sharded_lm(seed=2)
  where = jnp.asarray(np.random.default_rng(1).random((N_DEV, 3)) < 0.6).at[5].set(False)
  key = jax.random.PRNGKey(13)

  def per_device(p, k, xs, ws):
    return hessian.gauss_newton_bartlett_fused(lambda q: (xs, q["W"], q["c"]), p, k,
                                               where=ws, axis_name="data", block_size=2)

  out = _on_devices(mode, per_device, (params, key), (x, where))

  @jax.jit
  def reference(p):  # device i samples with fold_in(key, i); the mean CE of the whole batch
    labels = jax.vmap(lambda i, xs: losses.categorical_from_hidden(
        xs, p["W"], jax.random.fold_in(key, i), bias=p["c"]))(jnp.arange(N_DEV), x)
    return jax.grad(lambda q: losses.cross_entropy(x @ q["W"] + q["c"], labels,
                                                   where=where))(p)

  g = reference(params)
  expect = jax.tree.map(lambda g: float(np.sum(where)) * g**2, g)
  for i in range(N_DEV):
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[i], out), expect, rtol=2e-5,
                                atol=1e-8)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_hutchinson_with_axis_name_equals_single_device_on_whole_batch(mode):
  _needs_devices()
  x, labels, params = _sharded_lm(seed=1)
  key = jax.random.PRNGKey(12)
  loss = lambda p, xs, ys: losses.cross_entropy(xs @ p["W"] + p["c"], ys)

  def per_device(p, xs, ys):
    return hessian.hutchinson(lambda q: loss(q, xs, ys), p, key, axis_name="data")

  out = _on_devices(mode, per_device, (params,), (x, labels))
  whole = jax.jit(lambda p: hessian.hutchinson(
      lambda q: loss(q, x.reshape(-1, 4), labels.reshape(-1)), p, key))(params)
  for i in range(N_DEV):
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[i], out), whole, rtol=2e-5,
                                atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The every-k helper


def _tiny_problem():
  x, params, logits_fn = _softmax_regression(seed=9)
  labels = jnp.array([[0, 1, 2], [3, 4, 0]])
  loss_fn = lambda p: losses.cross_entropy(logits_fn(p), labels)
  return params, logits_fn, loss_fn


def test_update_every_k_runs_the_estimator_only_on_every_kth_step():
  params, logits_fn, loss_fn = _tiny_problem()
  tx = optim.sophia(1e-2)
  calls = []

  def estimate(p, key, step):
    jax.debug.callback(lambda s: calls.append(int(s)), step)
    return hessian.gauss_newton_bartlett(logits_fn, p, key)

  @jax.jit
  def train_step(p, s, key, step):
    grads = jax.grad(loss_fn)(p)
    updates, s = hessian.update_every_k(tx, grads, s, p, step=step, k=10,
                                        estimate_fn=lambda q: estimate(q, key, step))
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  keys = jax.random.split(jax.random.PRNGKey(0), 25)
  for t in range(25):
    p, s = train_step(p, s, keys[t], jnp.int32(t))
  jax.effects_barrier()
  assert calls == [0, 10, 20]
  assert int(s[0].hessian_count) == 3 and int(s[0].count) == 25

  # Same result as calling tx.update by hand with the estimate on those steps only.
  @functools.partial(jax.jit, static_argnums=3)
  def by_hand(p, s, key, with_estimate):
    kw = {"hessian": hessian.gauss_newton_bartlett(logits_fn, p, key)} if with_estimate else {}
    u, s = tx.update(jax.grad(loss_fn)(p), s, p, **kw)
    return optax.apply_updates(p, u), s

  p2, s2 = params, tx.init(params)
  for t in range(25):
    p2, s2 = by_hand(p2, s2, keys[t], t % 10 == 0)
  chex.assert_trees_all_close(p, p2, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(s[0].hessian, s2[0].hessian, rtol=1e-5, atol=1e-9)


def test_update_every_k_python_step_and_k1():
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optim.sophia(1e-2))
  s = tx.init(params)
  g = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  est = lambda p: jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), p)

  def boom(p):
    raise AssertionError("estimator called on a non-estimate step")

  # A Python int step is a Python branch (also inside jit, where it is static).
  every = jax.jit(lambda s, step, k, fn: hessian.update_every_k(
      tx, g, s, params, step=step, estimate_fn=fn, k=k)[1], static_argnums=(1, 2, 3))
  s1 = every(s, 3, 10, boom)
  assert int(s1[1][0].hessian_count) == 0
  s1 = every(s1, 20, 10, est)
  assert int(s1[1][0].hessian_count) == 1
  s1 = jax.jit(lambda s, step: hessian.update_every_k(tx, g, s, params, step=step,
                                                      estimate_fn=est, k=1)[1])(s1, jnp.int32(7))
  assert int(s1[1][0].hessian_count) == 2
  chex.assert_trees_all_close(s1[1][0].hessian["b"], jnp.full(3, 100.0 * (1 - 0.99**2)),
                              rtol=1e-6)
  assert hessian.is_estimate_step(jnp.arange(6), k=3).tolist() == [True, False, False] * 2


def test_update_every_k_bad_input():
  params, _, loss_fn = _tiny_problem()
  g = jax.grad(loss_fn)(params)
  tx = optim.sophia(1e-2)
  s = tx.init(params)
  est = lambda p: p
  with pytest.raises(ValueError, match="`k`"):
    hessian.update_every_k(tx, g, s, params, step=0, estimate_fn=est, k=0)
  with pytest.raises(ValueError, match="`step`"):
    hessian.update_every_k(tx, g, s, params, step=1.0, estimate_fn=est)
  with pytest.raises(ValueError, match="`step`"):
    hessian.update_every_k(tx, g, s, params, step=jnp.float32(1.0), estimate_fn=est)
  with pytest.raises(ValueError, match="`estimate_fn`"):
    hessian.update_every_k(tx, g, s, params, step=0, estimate_fn=None)
  with pytest.raises(ValueError, match="estimate_fn"):
    hessian.update_every_k(tx, g, s, params, step=0, estimate_fn=est, hessian=params)
  adam = optim.adamw(1e-3)
  with pytest.raises(ValueError, match="ScaleBySophiaState"):
    hessian.update_every_k(adam, g, adam.init(params), params, step=0, estimate_fn=est)


def test_flax_nnx_optimizer_every_k_with_nnx_cond():
  """The recipe in the module docstring: nnx.Optimizer + nnx.cond inside nnx.jit."""
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(4, 5, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)
  y = jnp.array([[0, 1, 2], [3, 4, 0]])
  opt = nnx.Optimizer(model, optim.sophia(1e-2), wrt=nnx.Param)
  estimates = []

  @nnx.jit
  def step(model, opt, key, t):
    grads = nnx.grad(lambda m: losses.cross_entropy(m(x), y))(model)

    def with_estimate(o, m):
      graphdef, params, rest = nnx.split(m, nnx.Param, ...)
      h = hessian.gauss_newton_bartlett(lambda q: nnx.merge(graphdef, q, rest)(x), params, key)
      jax.debug.callback(lambda n: estimates.append(float(n)), optax.tree.norm(h))
      o.update(m, grads, hessian=h)

    def without_estimate(o, m):  # both branches must return the same (None)
      o.update(m, grads)

    nnx.cond(hessian.is_estimate_step(t, 3), with_estimate, without_estimate, opt, model)

  before = np.asarray(model.kernel[...])
  for t in range(7):
    step(model, opt, jax.random.PRNGKey(t), jnp.int32(t))
  jax.effects_barrier()
  assert not np.allclose(before, np.asarray(model.kernel[...]))
  assert len(estimates) == 3 and all(e > 0 for e in estimates)  # steps 0, 3, 6
  (count,) = jax.tree.leaves(opt.opt_state[0].hessian_count)
  assert int(count) == 3
  assert float(optim.sophia_hessian_norm(opt.opt_state)) > 0.0
  assert 0.0 <= float(optim.sophia_win_rate(opt.opt_state)) <= 1.0

def _params_like_sophia():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=3), jnp.float32)}


def _rand_like(params, seed, positive=False):
  rng = np.random.default_rng(seed)
  one = lambda x: jnp.asarray(np.abs(rng.normal(size=x.shape)) if positive
                              else rng.normal(size=x.shape), jnp.float32)
  return jax.tree.map(one, params)


# ---------------------------------------------------------------------------------------------
# Monitors
def test_monitors_find_state_in_multisteps_and_reject_other_optimizers():
  params = _params_like_sophia()
  tx = optax.MultiSteps(optim.sophia(1e-2), every_k_schedule=2)
  state = tx.init(params)
  e = _rand_like(params, 5, positive=True)
  for _ in range(2):  # the estimate given on the emitting micro-step is kept
    _, state = tx.update(_rand_like(params, 1), state, params, hessian=e)
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
