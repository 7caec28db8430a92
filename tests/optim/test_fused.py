"""update_and_apply (jaxopt_llm/optim/fused.py) against the reference chains.

The written equation (one step by hand), the reference (the ``fused=False`` optax chain, bit
for bit, jitted and eager; PyTorch for 200 steps is in tests/parity), and properties (state
layout, composition with optax, sharding, fp16 safety, no state copies in the compiled step).
"""
import re

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxopt_llm import optim, schedules

BF16, F16 = jnp.bfloat16, jnp.float16


def _params(dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {"dense": {"kernel": jax.random.normal(k[0], (6, 5)).astype(dtype),
                    "bias": jax.random.normal(k[1], (5,)).astype(dtype)},
          "embed": jax.random.normal(k[2], (7, 6)).astype(dtype),
          "scale": jax.random.normal(k[3], ()).astype(dtype)}


def _grad(params, t):
  """Noise of per-leaf scale plus a pull on the params; 'bias' is exactly 0 half the time."""
  keys = jax.random.split(jax.random.PRNGKey(1000 + t), 4)
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, (key, p) in enumerate(zip(keys, leaves)):
    n = jax.random.normal(key, p.shape, jnp.float32) * (10.0 ** (i - 2))
    out.append((n + 0.1 * p.astype(jnp.float32)).astype(p.dtype))
  g = treedef.unflatten(out)
  if t % 2:
    g["dense"]["bias"] = jnp.zeros_like(g["dense"]["bias"])
  return g


def _step_fn(tx, whole_step=False):
  if whole_step:
    return lambda p, s, g: optim.update_and_apply(tx, g, s, p)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return step


def _run(tx, steps, *, params=None, jit=True, whole_step=False):
  p = _params() if params is None else params
  s = tx.init(p)
  step = _step_fn(tx, whole_step)
  if jit:
    step = jax.jit(step, donate_argnums=(0, 1))
    p, s = jax.tree.map(jnp.copy, (p, s))
  for t in range(steps):
    p, s = step(p, s, _grad(p, t))
  return p, s


def _mask_tree(p):
  return {"dense": {"kernel": True, "bias": False}, "embed": True, "scale": False}


def _b1_cycle(n):
  """A b1 schedule like OneCycleLR's momentum cycle (0.85 .. 0.95)."""
  return 0.85 + 0.05 * (1 + jnp.cos(2 * jnp.pi * n / 6))


CONFIGS = {
    "adamw": lambda f: optim.adamw(1e-3, fused=f),
    "adamw_b1_schedule": lambda f: optim.adamw(1e-3, b1=_b1_cycle, weight_decay=0.1, fused=f),
    "adam_l2_bf16_b1_schedule": lambda f: optim.adam_l2(1e-3, b1=_b1_cycle, mu_dtype=BF16,
                                                        amsgrad=True, fused=f),
    "adamw_b0.95_wd0.1_maskfn": lambda f: optim.adamw(
        3e-3, b2=0.95, weight_decay=0.1, mask=optim.weight_decay_mask, fused=f),
    "adamw_mask_tree": lambda f: optim.adamw(1e-2, weight_decay=0.3, mask=_mask_tree(None),
                                             fused=f),
    "adamw_prefix_mask": lambda f: optim.adamw(
        1e-2, weight_decay=0.3, mask={"dense": False, "embed": True, "scale": True}, fused=f),
    "adamw_amsgrad": lambda f: optim.adamw(1e-3, amsgrad=True, fused=f),
    "adamw_bf16_moments": lambda f: optim.adamw(1e-3, mu_dtype=BF16, nu_dtype=BF16, fused=f),
    "adamw_fp16_nu_amsgrad": lambda f: optim.adamw(1e-3, nu_dtype=F16, amsgrad=True, fused=f),
    "adamw_schedules": lambda f: optim.adamw(
        schedules.warmup_cosine(1e-2, 5, 40), weight_decay=lambda c: 0.1 / (1.0 + c),
        fused=f),
    "adamw_eps0": lambda f: optim.adamw(1e-3, eps=0.0, fused=f),
    "adam": lambda f: optim.adam(1e-3, b1=0.8, fused=f),
    "adam_l2_mask": lambda f: optim.adam_l2(1e-3, weight_decay=0.1, mask=optim.weight_decay_mask,
                                            fused=f),
    "adam_l2_bf16": lambda f: optim.adam_l2(1e-3, mu_dtype=BF16, fused=f),
    "lion": lambda f: optim.lion(1e-4, fused=f),
    "lion_wd_maskfn": lambda f: optim.lion(3e-4, b2=0.95, weight_decay=0.1,
                                           mask=optim.weight_decay_mask, fused=f),
    "lion_bf16_schedule": lambda f: optim.lion(schedules.inverse_sqrt(1e-3, 4), mu_dtype=BF16,
                                               weight_decay=0.05, fused=f),
}


# ---------------------------------------------------------------------------------------------
# Equations


def test_fused_adamw_one_step_by_hand():
  """p=2, g=0.5, learning_rate=0.1, wd=0.5, t=1: m=0.05, v=0.00025, m_hat=0.5, v_hat=0.25,
  u = 0.5 / (0.5 + 1e-8) = 0.99999998, p' = 2 - 0.1 * (0.99999998 + 0.5 * 2) = 1.800000002."""
  tx = optim.adamw(0.1, weight_decay=0.5)
  p = jnp.array([2.0])
  u, s = tx.update(jnp.array([0.5]), tx.init(p), p)
  chex.assert_trees_all_close(s[0].mu, jnp.array([0.05]), rtol=1e-6)
  chex.assert_trees_all_close(s[0].nu, jnp.array([0.00025]), rtol=1e-6)
  chex.assert_trees_all_close(optax.apply_updates(p, u), jnp.array([1.8]), rtol=1e-7)
  assert int(s[0].count) == 1


def test_fused_lion_one_step_by_hand():
  """m=0.2, g=-1, b1=0.9: sign(0.18 - 0.1) = +1; m' = 0.99*0.2 - 0.01 = 0.188;
  p' = 1 - 0.01 * (1 + 0.1 * 1) = 0.989."""
  tx = optim.lion(0.01, weight_decay=0.1)
  p = jnp.array([1.0])
  s = tx.init(p)
  s = (s[0]._replace(mu=jnp.array([0.2])),) + s[1:]
  u, s = tx.update(jnp.array([-1.0]), s, p)
  chex.assert_trees_all_close(optax.apply_updates(p, u), jnp.array([0.989]), rtol=1e-7)
  chex.assert_trees_all_close(s[0].mu, jnp.array([0.188]), rtol=1e-6)


def test_state_bytes_per_parameter():
  p = {"w": jax.ShapeDtypeStruct((1000, 100), jnp.float32)}
  n = 100_000
  counters = 4  # one int32 count
  assert optim.state_bytes(optim.adamw(1e-3), p) == 8 * n + counters
  assert optim.state_bytes(optim.adamw(1e-3, mu_dtype=BF16, nu_dtype=BF16), p) == 4 * n + 4
  assert optim.state_bytes(optim.adamw(1e-3, amsgrad=True), p) == 12 * n + 4
  assert optim.state_bytes(optim.lion(1e-4), p) == 4 * n + 4
  assert optim.state_bytes(optim.lion(1e-4, mu_dtype=BF16), p) == 2 * n + 4
  assert optim.state_bytes(optim.sgd(1e-2), p) == 0


# ---------------------------------------------------------------------------------------------
# Against the reference chain


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_and_update_and_apply_equal_reference_chain_bitwise(name):
  """10 jitted, donated steps: update + apply_updates and update_and_apply both give the
  reference chain's params and state, bit for bit."""
  make = CONFIGS[name]
  p_r, s_r = _run(make(False), 10)
  tx = make(True)
  assert optim.is_fused(tx)
  p_f, s_f = _run(tx, 10)
  chex.assert_trees_all_equal_structs(s_f, s_r)
  chex.assert_trees_all_equal(p_f, p_r)
  chex.assert_trees_all_equal(s_f, s_r)
  p_w, s_w = _run(tx, 10, whole_step=True)
  chex.assert_trees_all_equal(p_w, p_r)
  chex.assert_trees_all_equal(s_w, s_r)


@pytest.mark.parametrize("name", ["adamw_b0.95_wd0.1_maskfn", "adamw_bf16_moments",
                                  "lion_wd_maskfn", "adam_l2_mask"])
def test_update_and_apply_equals_reference_chain_eager(name):
  make = CONFIGS[name]
  p_f, s_f = _run(make(True), 4, jit=False, whole_step=True)
  p_r, s_r = _run(make(False), 4, jit=False)
  chex.assert_trees_all_equal(p_f, p_r)
  chex.assert_trees_all_equal(s_f, s_r)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(b1=st.floats(0.0, 0.99), b2=st.floats(0.0, 0.9999), eps=st.floats(0.0, 1e-3),
                  wd=st.floats(0.0, 1.0), lr=st.floats(1e-5, 1.0), lion=st.booleans())
def test_update_and_apply_equals_reference_for_any_hyperparameters(b1, b2, eps, wd, lr, lion):
  if lion:
    make = lambda f: optim.lion(lr, b1=b1, b2=b2, weight_decay=wd, fused=f)
  else:
    make = lambda f: optim.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, fused=f)
  p_f, s_f = _run(make(True), 3, jit=False, whole_step=True)
  p_r, s_r = _run(make(False), 3, jit=False)
  chex.assert_trees_all_equal(p_f, p_r)
  chex.assert_trees_all_equal(s_f, s_r)


# ---------------------------------------------------------------------------------------------
# The compiled step: no copy of the optimizer state


def _big_copies(tx, whole_step, n=4096):
  p = {"w": jnp.ones((n,)), "k": jnp.ones((64, n // 64))}
  s = tx.init(p)
  step = jax.jit(_step_fn(tx, whole_step), donate_argnums=(0, 1))
  hlo = step.lower(p, s, p).compile().as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  return len(re.findall(rf"\[({n}|64,{n // 64})\]\S* copy\(", entry))


@pytest.mark.parametrize("make", [
    lambda: optim.lion(1e-4, weight_decay=0.1),
    lambda: optim.adamw(1e-3, mu_dtype=BF16, nu_dtype=BF16),
    lambda: optim.adamw(1e-3, nu_dtype=F16, amsgrad=True),
    lambda: optim.adamw(1e-3),
    lambda: optim.adamw(1e-3, b1=_b1_cycle, mu_dtype=BF16, nu_dtype=BF16),
])
def test_update_and_apply_makes_no_state_copies_on_cpu(make):
  """Donated state must be updated in place: XLA copies it when two loops read the old
  value and nothing orders the in-place write after them (update + apply_updates does copy
  for Lion and low-precision moments; see fused.py)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the ordering is a CPU-only concern")
  assert _big_copies(make(), whole_step=True) == 0


def test_plain_update_copies_lion_state_which_update_and_apply_avoids():
  """Documents why update_and_apply exists (if XLA ever stops copying here, fine: this
  test then only says that our path is no worse)."""
  if jax.default_backend() != "cpu":
    pytest.skip("CPU only")
  tx = optim.lion(1e-4, weight_decay=0.1)
  assert _big_copies(tx, whole_step=True) <= _big_copies(tx, whole_step=False)


def test_update_and_apply_falls_back_for_other_transformations():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  assert not optim.is_fused(tx)
  assert not optim.is_fused(optim.adamw(1e-3, fused=False))
  p = _params()
  s = tx.init(p)
  g = _grad(p, 0)
  p1, s1 = optim.update_and_apply(tx, g, s, p)
  u, s2 = tx.update(g, s, p)
  chex.assert_trees_all_equal(p1, optax.apply_updates(p, u))
  chex.assert_trees_all_equal(s1, s2)
  tx = optim.lion(1e-3, weight_decay=0.1)
  s = tx.init(p)
  a = optim.update_and_apply(tx, g, s, p, ordered=False)
  b = optim.update_and_apply(tx, g, s, p, ordered=True)
  chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Composition


def test_state_layout_is_the_reference_chains():
  p = _params()
  for name, make in CONFIGS.items():
    a, b = make(True).init(p), make(False).init(p)
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    chex.assert_trees_all_equal(a, b)
  # e.g. a reference-chain checkpoint restores into the fused optimizer and vice versa
  assert isinstance(optim.adamw(1e-3).init(p)[0], optim.ScaleByAdamState)


def test_inside_chain_with_clipping():
  make = lambda f: optax.chain(optax.clip_by_global_norm(0.5), optim.adamw(1e-2, fused=f))
  chex.assert_trees_all_equal(_run(make(True), 8), _run(make(False), 8))


def test_inject_hyperparams_lr_weight_decay_and_betas():
  def make(f):
    return optax.inject_hyperparams(optim.adamw, static_args="mask")(
        learning_rate=1e-2, b2=0.95, weight_decay=0.1, mask=optim.weight_decay_mask, fused=f)
  tx = make(True)
  p = _params()
  s = tx.init(p)
  chex.assert_trees_all_equal(_run(tx, 6), _run(make(False), 6))
  # a changed injected lr takes effect: lr 0 leaves only... nothing (decay is lr-scaled)
  s.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u, _ = jax.jit(tx.update)(_grad(p, 0), s, p)
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  # b1 injected (an array), and b1 a schedule inside inject_hyperparams (a static argument)
  make_b1 = lambda f: optax.inject_hyperparams(optim.adamw)(learning_rate=1e-2, b1=0.8,
                                                            fused=f)
  chex.assert_trees_all_equal(_run(make_b1(True), 4), _run(make_b1(False), 4))
  make_sched = lambda f: optax.inject_hyperparams(optim.adam, static_args="b1")(
      learning_rate=1e-2, b1=_b1_cycle, fused=f)
  chex.assert_trees_all_equal(_run(make_sched(True), 4), _run(make_sched(False), 4))
  lion = lambda f: optax.inject_hyperparams(optim.lion)(
      learning_rate=1e-3, weight_decay=0.2, fused=f)
  chex.assert_trees_all_equal(_run(lion(True), 6), _run(lion(False), 6))


def test_multisteps_and_apply_if_finite():
  make = lambda f: optax.MultiSteps(optim.adamw(1e-2, fused=f), every_k_schedule=3)
  chex.assert_trees_all_equal(_run(make(True), 9), _run(make(False), 9))
  tx = optax.apply_if_finite(optim.lion(1e-3), max_consecutive_errors=2)
  p = _params()
  s = tx.init(p)
  bad = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), _grad(p, 0))
  u, s2 = tx.update(bad, s, p)
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert int(s2.notfinite_count) == 1


def test_wrapped_in_optax_masked():
  """Frozen leaves (MaskedNode inside optax.masked) pass through untouched."""
  make = lambda f: optax.masked(optim.adamw(1e-2, weight_decay=0.1, fused=f), _mask_tree)
  pf, sf = _run(make(True), 4)
  pr, sr = _run(make(False), 4)
  chex.assert_trees_all_equal((pf, sf), (pr, sr))


def test_sharded_params_keep_their_sharding_and_values():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (virtual) devices")
  mesh = Mesh(np.array(devices[:8]).reshape(4, 2), ("data", "model"))
  p = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 8)),
       "b": jax.random.normal(jax.random.PRNGKey(1), (8,))}
  specs = {"w": P("data", "model"), "b": P("model")}
  shard = lambda tree: jax.tree.map(
      lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree, specs)
  for make, whole in ((lambda: optim.adamw(1e-2, weight_decay=0.1), False),
                      (lambda: optim.lion(1e-3), True),
                      (lambda: optim.adamw(1e-2, mu_dtype=BF16, nu_dtype=BF16), True)):
    tx = make()
    step = jax.jit(_step_fn(tx, whole))
    ps, ss = shard(p), tx.init(shard(p))
    pr, sr = p, tx.init(p)
    for t in range(3):
      g = jax.tree.map(lambda x: jnp.cos(3.0 * x), p if t == 0 else pr)
      ps, ss = step(ps, ss, shard(g))
      pr, sr = step(pr, sr, g)
    chex.assert_trees_all_close(ps, pr, rtol=1e-6, atol=1e-7)
    for k in p:
      assert ps[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), ps[k].ndim), k
    assert ss[0].mu["w"].sharding.is_equivalent_to(NamedSharding(mesh, specs["w"]), 2)


# ---------------------------------------------------------------------------------------------
# fp16 safety


@pytest.mark.parametrize("kw", [
    dict(), dict(nu_dtype=F16), dict(mu_dtype=F16, nu_dtype=F16),
    dict(mu_dtype=F16, nu_dtype=F16, amsgrad=True), dict(eps=0.0), dict(eps=0.0, nu_dtype=F16),
])
def test_fp16_zero_and_tiny_gradients_never_give_nan_or_inf(kw):
  """fp16 params/grads. Tiny gradients make v underflow in fp16 storage while m does not;
  then zero gradients: m / (sqrt(v) + eps) must stay finite, as must everything else."""
  p = {"w": jnp.linspace(-1, 1, 12, dtype=F16).reshape(3, 4), "b": jnp.zeros(4, F16)}
  tx = optim.adamw(1e-3, **kw)
  for whole in (False, True):
    step = jax.jit(_step_fn(tx, whole))
    q, s = p, tx.init(p)
    for t in range(12):
      g = jax.tree.map(lambda x: jnp.full_like(x, 2e-3 if t < 2 else 0.0), q)
      q, s = step(q, s, g)
      for leaf in jax.tree.leaves((q, s)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32))), (kw, t)
    # the step stays Adam-sized: |delta p| <= lr * (a few) + decay
    delta = np.abs(np.asarray(q["w"], np.float32) - np.asarray(p["w"], np.float32))
    assert delta.max() < 12 * 1e-3 * 10, (kw, delta.max())
    chex.assert_trees_all_equal_dtypes(q, p)


def test_lion_fp16_zero_gradient_is_a_zero_step():
  p = {"w": jnp.ones((3, 2), F16)}
  tx = optim.lion(1e-3, mu_dtype=F16)
  q, s = optim.update_and_apply(tx, {"w": jnp.zeros((3, 2), F16)}, tx.init(p), p)
  chex.assert_trees_all_equal(q, p)


# ---------------------------------------------------------------------------------------------
# Sophia


def _run_sophia(tx, steps, *, whole_step=False, jit=True, k=3):
  """Hessian estimate (|g| * 50, a positive stand-in) passed every k steps, as
  ``hessian.update_every_k`` does."""
  def step(p, s, g, h):
    kw = {} if h is None else {"hessian": h}
    if whole_step:
      return optim.update_and_apply(tx, g, s, p, **kw)
    u, s = tx.update(g, s, p, **kw)
    return optax.apply_updates(p, u), s
  plain = lambda p, s, g: step(p, s, g, None)
  if jit:
    plain, step = (jax.jit(plain, donate_argnums=(0, 1)), jax.jit(step, donate_argnums=(0, 1)))
  p = _params()
  s = tx.init(p)
  p, s = jax.tree.map(jnp.copy, (p, s))
  for t in range(steps):
    g = _grad(p, t)
    if t % k == 0:
      p, s = step(p, s, g, jax.tree.map(lambda x: 50.0 * jnp.abs(x), g))
    else:
      p, s = plain(p, s, g)
  return p, s


@pytest.mark.parametrize("kw", [dict(), dict(mask=optim.weight_decay_mask, mu_dtype=BF16,
                                             nu_dtype=BF16, rho=0.1)])
def test_fused_sophia_equals_reference_chain_bitwise(kw):
  make = lambda f: optim.sophia(1e-3, fused=f, **kw)
  ref = _run_sophia(make(False), 12)
  assert optim.is_fused(make(True))
  chex.assert_trees_all_equal(_run_sophia(make(True), 12), ref)
  chex.assert_trees_all_equal(_run_sophia(make(True), 12, whole_step=True), ref)
  chex.assert_trees_all_equal(_run_sophia(make(True), 4, jit=False),
                              _run_sophia(make(False), 4, jit=False))
  assert 0.0 < float(ref[1][0].win_rate) < 1.0  # both branches of the clip were exercised


def test_fused_sophia_update_and_apply_makes_no_state_copies():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU only")
  n = 4096
  for tx in (optim.sophia(1e-3), optim.sophia(1e-3, mu_dtype=BF16, nu_dtype=BF16)):
    p = {"w": jnp.ones((n,)), "k": jnp.ones((64, n // 64))}
    step = jax.jit(lambda p, s, g: optim.update_and_apply(tx, g, s, p, hessian=g),
                   donate_argnums=(0, 1))
    hlo = step.lower(p, tx.init(p), p).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    assert not re.findall(rf"\[({n}|64,{n // 64})\]\S* copy\(", entry)
