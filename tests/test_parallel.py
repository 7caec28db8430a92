"""Multi-device training on 8 virtual CPU devices (conftest.py sets the XLA flag).

Three ways to be wrong are checked:
* numerics: every optimizer, under jit + ZeRO-1, jit + FSDP and pmap, ends 20 steps at the
  parameters of the single-device run (fp32, max|a - b| / max|b| <= 1e-5 per leaf);
* layout: the optimizer state really is split (each leaf's ``.sharding`` spec, and every
  device holding exactly 1/8 of each split leaf, read from ``addressable_shards``), and it
  follows the params' layout rather than a rule of its own;
* input: the mesh / batch helpers reject bad sizes with ValueErrors naming the argument.
"""
import functools
import importlib.util
from typing import NamedTuple

import flax
import flax.struct
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxopt_llm import losses, optim, parallel, schedules
from jaxopt_llm.optim import hessian

N_DEV = 8
STEPS = 20
BATCH = 64
RTOL = 1e-5
# Compile-time saver for the big combined programs (about 40% less XLA time on CPU); the
# arithmetic is the same IEEE fp32, only fewer backend optimisation passes run.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

pytestmark = pytest.mark.skipif(
    jax.device_count() < N_DEV, reason="needs the 8 virtual CPU devices set up in conftest.py")


# --------------------------------------------------------------------------------------------
# A small MLP classifier. Shapes chosen so that each case of the layout rule occurs:
# [16, 32] (split on its larger dim, 1), [32] and [32, 5] (split on dim 0), [5] and []
# (replicated: nothing divisible by 8).


def _init_params(seed=0):
  # numpy, not jax.random: eager jax ops would cost a compilation each, ten copies per run
  rng = np.random.RandomState(seed)
  f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))
  return {"l1": {"w": f32(0.3 * rng.randn(16, 32)), "b": f32(np.zeros(32))},
          "l2": {"w": f32(0.3 * rng.randn(32, 5)), "b": f32(0.1 * rng.randn(5))},
          "scale": f32(1.0)}


def _mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["l1"]["w"] + params["l1"]["b"])
  logits = params["scale"] * (h @ params["l2"]["w"] + params["l2"]["b"])
  return losses.cross_entropy(logits, batch["y"])


def _batches():
  rng = np.random.RandomState(0)
  x = rng.randn(STEPS, BATCH, 16).astype(np.float32)
  y = rng.randint(0, 5, (STEPS, BATCH)).astype(np.int32)
  return [{"x": x[t], "y": y[t]} for t in range(STEPS)]


# Every optimizer of jaxopt_llm.optim, and optax compositions around ours and optax's own.
OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.1, momentum=0.9, weight_decay=1e-3),
    "momentum": lambda: optim.momentum(0.2),
    "adagrad": lambda: optim.adagrad(0.05),
    "rmsprop": lambda: optim.rmsprop(1e-2, centered=True, momentum=0.5),
    "adam": lambda: optim.adam(1e-2),
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1, mask=optim.weight_decay_mask),
    "lion": lambda: optim.lion(1e-3, weight_decay=0.3),
    "optax_chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
    "multisteps": lambda: optax.MultiSteps(optim.adamw(1e-2), every_k_schedule=2),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optim.adamw, static_args="mask")(
        lr=schedules.warmup_cosine(2e-2, 5, STEPS), mask=optim.weight_decay_mask),
}
# Sophia needs its Hessian estimate each k steps: it runs separately (test_sophia_*).
STATEFUL = list(OPTIMIZERS)  # all of them keep per-param state (sgd through its momentum)


def _combined():
  """All optimizers at once, each on its own copy of the MLP, via ``optax.multi_transform``.

  The copies share nothing (the loss is a sum of independent terms), so each copy follows
  exactly the trajectory it would alone; one compiled program per mode instead of ten keeps
  the file fast. It also puts MaskedNodes in every state, a case the layout code must handle.
  """
  params = {name: _init_params() for name in OPTIMIZERS}
  labels = {name: jax.tree.map(lambda _, n=name: n, params[name]) for name in OPTIMIZERS}
  tx = optax.multi_transform({name: make() for name, make in OPTIMIZERS.items()}, labels)

  def loss_fn(params, batch):
    return sum(_mlp_loss(params[name], batch) for name in OPTIMIZERS)

  return params, tx, loss_fn


def _rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@functools.lru_cache(maxsize=None)
def _run(mode):
  """20 steps in ``mode``; returns (final params, final opt state, losses, plan, donated)."""
  params, tx, loss_fn = _combined()
  batches = _batches()
  if mode == "single":
    state = jax.jit(tx.init)(params)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    out = []
    for b in batches:
      params, state, loss = step(params, state, b)
      out.append(float(loss))
    return params, state, out, None, None
  if mode == "pmap":
    step = parallel.make_pmap_train_step(loss_fn, tx)
    p, s = parallel.replicate(params), parallel.replicate(tx.init(params))
    out = []
    for b in batches:
      p, s, loss = step(p, s, parallel.split_batch(b))
      out.append(np.asarray(loss))
    return p, s, out, None, None
  mesh = parallel.make_mesh()
  plan = parallel.plan_shardings(tx, params, mesh, mode)
  p = parallel.place_params(params, plan)
  s = parallel.init_opt_state(tx, p, plan)
  first = jax.tree.leaves(p)[0]
  step = parallel.make_train_step(loss_fn, tx, plan, compiler_options=FAST_COMPILE)
  out = []
  for b in batches:
    p, s, loss = step(p, s, parallel.shard_batch(b, mesh))
    out.append(float(loss))
  return p, s, out, plan, first.is_deleted()


# --------------------------------------------------------------------------------------------
# Numerics: sharded == single device


@pytest.mark.parametrize("mode", ["zero1", "fsdp", "pmap"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_training_equals_single_device(name, mode):
  ref = _run("single")[0][name]
  got = _run(mode)[0][name]
  if mode == "pmap":
    # every replica must hold the same params, and they must be the single-device ones
    for leaf in jax.tree.leaves(got):
      np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(leaf[0], leaf.shape))
    got = parallel.unreplicate(got)
  init = _init_params()
  for path, g, r, p0 in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                            jax.tree.leaves(ref), jax.tree.leaves(init)):
    where = jax.tree_util.keystr(path[0])
    assert g.shape == r.shape and g.dtype == r.dtype == jnp.float32, where
    err = _rel_err(g, r)
    assert err <= RTOL, f"{name}/{mode} {where}: rel err {err:.2e}"
  # not vacuous: the reference really moved away from the initial params
  moved = max(_rel_err(r, p0) for r, p0 in zip(jax.tree.leaves(ref), jax.tree.leaves(init)))
  assert moved > 1e-2, f"{name}: params barely moved ({moved:.1e})"


@pytest.mark.parametrize("mode", ["zero1", "fsdp", "pmap"])
def test_sharded_loss_curve_equals_single_device(mode):
  ref = np.asarray(_run("single")[2])
  got = np.asarray(_run(mode)[2])
  if mode == "pmap":
    assert np.all(got == got[:, :1]), "pmean-ed loss differs between replicas"
    got = got[:, 0]
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=0)
  assert ref[-1] < ref[0]


@pytest.mark.parametrize("mode", ["zero1", "fsdp"])
def test_jit_step_donates_and_keeps_layout(mode):
  params, state, _, plan, donated = _run(mode)
  assert donated, "the step should donate (reuse) the params it was given"
  for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(plan.params)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(plan.opt_state)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


# --------------------------------------------------------------------------------------------
# Sophia: the Hessian estimate must be averaged over the devices too

SOPHIA_K = 2  # estimate on every other step, so both branches of update_every_k run


def _mlp_logits(params, x):
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  return params["scale"] * (h @ params["l2"]["w"] + params["l2"]["b"])


def _gnb_reference(params, x, key):
  """GNB written from the paper (Liu et al., 2023, Alg. 2): B * grad(mean CE(sampled))**2.

  Labels are sampled per device-sized chunk with ``fold_in(key, device index)``, which is how
  the library's estimator samples under ``axis_name``; so this one-device estimate equals the
  8-device one exactly, and a missing psum (a per-device estimate) would show.
  """
  z = jax.lax.stop_gradient(_mlp_logits(params, x))
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(N_DEV))
  labels = jax.vmap(jax.random.categorical)(keys, z.reshape(N_DEV, -1, z.shape[-1])).reshape(-1)
  g = jax.grad(lambda q: losses.cross_entropy(_mlp_logits(q, x), labels))(params)
  return jax.tree.map(lambda g: x.shape[0] * g * g, g)


def _sophia_update_fn(tx, estimator):
  def update_fn(grads, state, params, batch, key, step):
    return hessian.update_every_k(tx, grads, state, params, step=step, k=SOPHIA_K,
                                  estimate_fn=lambda p: estimator(p, batch["x"], key))
  return update_fn


@functools.lru_cache(maxsize=None)
def _run_sophia(mode):
  tx = optim.sophia(1e-2, rho=0.04, weight_decay=0.1)
  params = _init_params()
  keys = [jax.random.fold_in(jax.random.PRNGKey(7), t) for t in range(STEPS)]
  steps = [jnp.int32(t) for t in range(STEPS)]
  reference = _sophia_update_fn(tx, _gnb_reference)
  if mode == "single":
    step = jax.jit(lambda p, s, b, k, t: (lambda loss, g: (
        lambda u, s: (optax.apply_updates(p, u), s, loss))(*reference(g, s, p, b, k, t)))(
            *jax.value_and_grad(_mlp_loss)(p, b)), compiler_options=FAST_COMPILE)
    p, s = params, tx.init(params)
    for b, k, t in zip(_batches(), keys, steps):
      p, s, _ = step(p, s, b, k, t)
    return p, s
  if mode == "pmap":
    library = lambda p, x, key: hessian.gauss_newton_bartlett(
        lambda q: _mlp_logits(q, x), p, key, axis_name="data")
    step = parallel.make_pmap_train_step(_mlp_loss, tx,
                                         update_fn=_sophia_update_fn(tx, library))
    p, s = parallel.replicate(params), parallel.replicate(tx.init(params))
    for b, k, t in zip(_batches(), keys, steps):
      p, s, _ = step(p, s, parallel.split_batch(b), k, t)
    return p, s
  mesh = parallel.make_mesh()
  plan = parallel.plan_shardings(tx, params, mesh, mode)
  step = parallel.make_train_step(_mlp_loss, tx, plan, update_fn=reference,
                                  compiler_options=FAST_COMPILE)
  p = parallel.place_params(params, plan)
  s = parallel.init_opt_state(tx, p, plan)
  for b, k, t in zip(_batches(), keys, steps):
    p, s, _ = step(p, s, parallel.shard_batch(b, mesh), k, t)
  return p, s


@pytest.mark.parametrize("mode", ["zero1", "fsdp", "pmap"])
def test_sophia_sharded_equals_single_device(mode):
  ref, ref_state = _run_sophia("single")
  got, state = _run_sophia(mode)
  if mode == "pmap":
    got, state = parallel.unreplicate(got), parallel.unreplicate(state)
  for path, g, r in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                        jax.tree.leaves(ref)):
    err = _rel_err(g, r)
    assert err <= RTOL, f"sophia/{mode} {jax.tree_util.keystr(path[0])}: rel err {err:.2e}"
  sophia_state = ref_state[0]
  assert int(sophia_state.hessian_count) == STEPS // SOPHIA_K
  assert 0.0 < float(sophia_state.win_rate) < 1.0  # some coordinates clipped, some not
  for a, b in zip(jax.tree.leaves(state[0].hessian), jax.tree.leaves(sophia_state.hessian)):
    assert _rel_err(a, b) <= RTOL
  if mode != "pmap":
    for leaf in (*jax.tree.leaves(state[0].mu), *jax.tree.leaves(state[0].hessian)):
      assert _spec(leaf) == _expected_spec(leaf.shape)
      if _spec(leaf) != P():
        _check_split(leaf, "sophia state")


# --------------------------------------------------------------------------------------------
# Layout: the state is really split, and follows the params


def _expected_spec(shape, n=N_DEV):
  """The rule, written independently: largest dim divisible by n (first on ties), else P()."""
  best = None
  for i, d in enumerate(shape):
    if d % n == 0 and d > 0 and (best is None or d > shape[best]):
      best = i
  if best is None:
    return P()
  return P(*([None] * best + ["data"]))


def _spec(leaf):
  return P(*leaf.sharding.spec)


def _check_split(leaf, where):
  """Every device holds exactly 1/8 of the leaf, and the 8 pieces are disjoint."""
  shards = leaf.addressable_shards
  assert len(shards) == N_DEV, where
  for s in shards:
    assert s.data.nbytes * N_DEV == leaf.nbytes, (where, s.data.shape, leaf.shape)
  starts = {tuple(sl.start or 0 for sl in s.index) for s in shards}
  assert len(starts) == N_DEV, f"{where}: shards overlap"


@pytest.mark.parametrize("mode", ["zero1", "fsdp"])
@pytest.mark.parametrize("name", STATEFUL)
def test_opt_state_is_really_sharded(name, mode):
  _, state, _, _, _ = _run(mode)
  sub = state.inner_states[name].inner_state
  n_split = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(sub):
    where = f"{name}{jax.tree_util.keystr(path)}"
    want = _expected_spec(leaf.shape)
    assert _spec(leaf) == want, (where, leaf.shape, leaf.sharding.spec)
    if want == P():
      assert leaf.sharding.is_fully_replicated, where
    else:
      _check_split(leaf, where)
      n_split += 1
  assert n_split >= 3, f"{name}: only {n_split} state leaves split"
  # bytes per device: the split leaves cost 1/8 each, the rest in full
  per_dev = parallel.bytes_per_device(sub)
  total_split = sum(l.nbytes for l in jax.tree.leaves(sub) if _spec(l) != P())
  total_rest = sum(l.nbytes for l in jax.tree.leaves(sub) if _spec(l) == P())
  assert set(per_dev.values()) == {total_split // N_DEV + total_rest}, per_dev


def test_zero1_params_replicated_fsdp_params_split():
  p_zero, _, _, _, _ = _run("zero1")
  p_fsdp, _, _, _, _ = _run("fsdp")
  for leaf in jax.tree.leaves(p_zero):
    assert leaf.sharding.is_fully_replicated
  for path, leaf in jax.tree_util.tree_leaves_with_path(p_fsdp):
    assert _spec(leaf) == _expected_spec(leaf.shape), jax.tree_util.keystr(path)
    if _spec(leaf) != P():
      _check_split(leaf, jax.tree_util.keystr(path))


def test_adamw_zero1_specs_written_out():
  """The equation-level check: AdamW's mu and nu leaf by leaf, count replicated."""
  params = _init_params()
  mesh = parallel.make_mesh()
  tx = optim.adamw(1e-3)
  plan = parallel.plan_shardings(tx, params, mesh, "zero1")
  want = {"l1": {"w": P(None, "data"), "b": P("data")},
          "l2": {"w": P("data"), "b": P()}, "scale": P()}
  adam_state = plan.opt_state[0]
  assert adam_state.count.spec == P()
  assert adam_state.nu_max is None
  for moment in (adam_state.mu, adam_state.nu):
    assert jax.tree.map(lambda s: s.spec, moment) == want
  assert all(s.spec == P() for s in jax.tree.leaves(plan.params))
  assert jax.tree.map(lambda s: s.spec, plan.grads) == want
  state = parallel.init_opt_state(tx, parallel.place_params(params, plan), plan)
  # 1/8 of mu and nu of l1.w (2 x 512 floats), l1.b (2 x 32), l2.w (2 x 160); all of l2.b
  # (2 x 5), scale (2 x 1) and count (one int32).
  want_bytes = 4 * (2 * (512 + 32 + 160) // 8 + 2 * (5 + 1) + 1)
  assert set(parallel.bytes_per_device(state).values()) == {want_bytes}
  replicated = parallel.plan_shardings(tx, params, mesh, "replicated")
  state_r = parallel.init_opt_state(tx, parallel.place_params(params, replicated), replicated)
  assert set(parallel.bytes_per_device(state_r).values()) == {
      4 * (2 * (512 + 32 + 160 + 5 + 1) + 1)}


def _tp_setup():
  """Two params of one shape with different tensor-parallel specs on a 4 x 2 mesh."""
  mesh = parallel.make_mesh(data=4, model=2)
  params = {"a": jnp.ones((8, 16)), "b": jnp.ones((8, 16)), "bias": jnp.ones((6,))}
  base = {"a": P(None, "model"), "b": P("model", None), "bias": P()}
  # FSDP / ZeRO add "data" on the largest dim that is free and divisible by 4.
  split = {"a": P("data", "model"), "b": P("model", "data"), "bias": P()}
  return mesh, params, base, split


FOLLOW_OPTIMIZERS = {
    "adamw": lambda: optim.adamw(1e-3),
    "lion": lambda: optim.lion(1e-4),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(1e-3)),
    "multisteps": lambda: optax.MultiSteps(optim.lion(1e-4), every_k_schedule=4),
    "inject": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    "masked": lambda: optax.masked(optim.adam(), {"a": True, "b": False, "bias": True}),
    "optax_lion": lambda: optax.lion(1e-4),
}


@pytest.mark.parametrize("name", list(FOLLOW_OPTIMIZERS))
@pytest.mark.parametrize("mode", ["replicated", "zero1", "fsdp"])
def test_state_follows_param_layout(name, mode):
  """Mirrors of a param take *its* layout (two same-shaped params differ), scalars replicated."""
  mesh, params, base, split = _tp_setup()
  tx = FOLLOW_OPTIMIZERS[name]()
  plan = parallel.plan_shardings(tx, params, mesh, mode, base_specs=base)
  want_params = split if mode == "fsdp" else base
  assert jax.tree.map(lambda s: s.spec, plan.params) == want_params
  want_state = base if mode == "replicated" else split
  shapes = jax.eval_shape(tx.init, params)
  n_mirrors = 0
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(shapes),
                              jax.tree.leaves(plan.opt_state)):
    keys = [getattr(k, "key", None) for k in path]
    where = jax.tree_util.keystr(path)
    if leaf.shape == ():
      assert sh.spec == P(), where
    else:
      param = next(k for k in reversed(keys) if k in params)
      assert sh.spec == want_state[param], (where, sh.spec)
      n_mirrors += 1
  assert n_mirrors >= 2, name


def test_state_follows_params_when_init_rejects_the_placeholder():
  """An init that indexes the params cannot run on optax's placeholder: structural fallback."""
  mesh, params, base, split = _tp_setup()

  def init(p):
    return (jnp.zeros([], jnp.int32), {k: jnp.zeros_like(p[k]) for k in ("a", "b", "bias")})

  tx = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
  with pytest.raises(TypeError):
    optax.tree_utils.tree_map_params(tx, lambda x: x, tx.init(params))
  sh = parallel.opt_state_shardings(
      tx, params, mesh, "fsdp",
      params_sharding=parallel.param_shardings(params, mesh, "fsdp", base_specs=base))
  assert sh[0].spec == P()
  assert jax.tree.map(lambda s: s.spec, sh[1]) == split


def test_non_mirror_state_uses_the_shape_rule():
  """Adafactor's factored moments have other shapes than the params: split where divisible."""
  params = {"w": jnp.ones((16, 24)), "v": jnp.ones((40,))}
  mesh = parallel.make_mesh()
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=8)
  shapes = jax.eval_shape(tx.init, params)
  sh = parallel.opt_state_shardings(tx, params, mesh, "zero1")
  for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(sh)):
    assert s.spec == _expected_spec(leaf.shape), (jax.tree_util.keystr(path), leaf.shape)
  assert any(s.spec != P() for s in jax.tree.leaves(sh))


@hypothesis.settings(deadline=None, max_examples=60)
@hypothesis.given(shape=st.lists(st.integers(0, 40), max_size=4),
                  size=st.sampled_from([1, 2, 3, 4, 8]))
def test_zero_spec_property(shape, size):
  spec = parallel.zero_spec(shape, size)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = [i for i, e in enumerate(entries) if e is not None]
  divisible = [d for d in shape if d > 0 and d % size == 0]
  if size == 1 or not divisible:
    assert used == [], (shape, size, spec)
  else:
    (i,) = used
    assert entries[i] == "data" and shape[i] % size == 0 and shape[i] == max(divisible)
    assert shape.index(shape[i]) == i  # first of equals


def test_zero_spec_respects_base_and_existing_axis():
  assert parallel.zero_spec((8, 16), 4, base=P(None, "model")) == P("data", "model")
  assert parallel.zero_spec((8, 16), 4, base=P("data")) == P("data")  # already split
  assert parallel.zero_spec((6, 16), 4, base=P(None, "model")) == P(None, "model")
  with pytest.raises(ValueError, match="base"):
    parallel.zero_spec((8,), 4, base=P("data", None, "model"))


# --------------------------------------------------------------------------------------------
# Mesh and batch helpers


def test_make_mesh_shapes():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 8, "model": 1}
  mesh = parallel.make_mesh(data=4, model=2)
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  mesh = parallel.make_mesh(4)
  assert dict(mesh.shape) == {"data": 4, "model": 1} and mesh.devices.size == 4
  mesh = parallel.make_mesh(jax.devices()[2:4])
  assert set(mesh.devices.flat) == set(jax.devices()[2:4])


@pytest.mark.parametrize("kwargs,match", [
    (dict(devices=9), "devices"),
    (dict(devices=0), "devices"),
    (dict(data=16), "16 devices requested"),
    (dict(data=4, model=4), "requested"),
    (dict(devices=8, data=3), "must equal the number of devices"),
    (dict(model=3), "model"),
    (dict(model=0), "model"),
    (dict(devices=[jax.devices()[0]] * 2), "twice"),
])
def test_make_mesh_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh(**kwargs)


def test_shard_batch_places_contiguous_rows():
  mesh = parallel.make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  out = parallel.shard_batch({"x": x, "y": np.arange(16)}, mesh)
  assert out["x"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  for s in out["x"].addressable_shards:
    assert s.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(s.data), x[s.index])


def test_batch_errors():
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match=r"`batch`.*\['x'\].*\(12, 3\).*divisible.*8"):
    parallel.shard_batch({"x": np.zeros((12, 3)), "y": np.zeros(16)}, mesh)
  with pytest.raises(ValueError, match="scalar"):
    parallel.shard_batch({"x": np.float32(1.0)}, mesh)
  with pytest.raises(ValueError, match="axis"):
    parallel.shard_batch(np.zeros(16), mesh, axis="batch")
  with pytest.raises(ValueError, match=r"divisible.*8"):
    parallel.split_batch(np.zeros((12, 2)))
  with pytest.raises(ValueError, match="`n`"):
    parallel.split_batch(np.zeros((16, 2)), 9)
  with pytest.raises(ValueError, match="mode"):
    parallel.plan_shardings(optim.adam(), _init_params(), mesh, "zero3")


class _LoopState(NamedTuple):
  step: jax.Array
  params: dict
  opt_state: tuple
  rng: jax.Array


def test_train_state_shardings_for_a_whole_train_state():
  params = _init_params()
  tx = optim.adamw(1e-3)
  plan = parallel.plan_shardings(tx, params, parallel.make_mesh(), "zero1")
  state = _LoopState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0))
  for tree in (state, state._asdict(), flax.struct.dataclass(_FlaxState)(**state._asdict())):
    sh = parallel.train_state_shardings(tree, plan)
    get = (lambda t, k: t[k]) if isinstance(tree, dict) else getattr
    assert get(sh, "params") == plan.params and get(sh, "opt_state") == plan.opt_state
    assert get(sh, "step") == plan.replicated and get(sh, "rng") == plan.replicated
    placed = jax.device_put(tree, sh)  # the structures match leaf for leaf
    assert _spec(get(placed, "opt_state")[0].mu["l1"]["w"]) == P(None, "data")
  with pytest.raises(ValueError, match="opt_state"):
    parallel.train_state_shardings({"params": params}, plan)


class _FlaxState:
  step: jax.Array
  params: dict
  opt_state: tuple
  rng: jax.Array


def test_split_batch_and_replicate_round_trip():
  x = np.arange(32, dtype=np.float32).reshape(16, 2)
  s = parallel.split_batch(x)
  assert s.shape == (8, 2, 2)
  np.testing.assert_array_equal(np.asarray(s).reshape(16, 2), x)
  r = parallel.replicate({"w": x})
  assert r["w"].shape == (8, 16, 2)
  assert {d.id for d in r["w"].sharding.device_set} == {d.id for d in jax.devices()}
  np.testing.assert_array_equal(np.asarray(parallel.unreplicate(r)["w"]), x)


# --------------------------------------------------------------------------------------------
# Losses that must be right when the batch is split (run when their modules exist)


def _have(module):
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


@pytest.mark.skipif(not _have("jaxopt_llm.losses.contrastive"),
                    reason="jaxopt_llm.losses.contrastive not written yet (issue 5)")
def test_global_negative_info_nce_under_pmap_and_shard_map():
  from jaxopt_llm.losses.contrastive import in_batch_info_nce
  rng = np.random.RandomState(3)
  a = jnp.asarray(rng.randn(32, 6).astype(np.float32))
  b = jnp.asarray(rng.randn(32, 6).astype(np.float32))
  mesh = parallel.make_mesh()

  def local(a, b, symmetric):
    # pmean is a no-op if the loss already averages over the axis; needed if it does not
    return jax.lax.pmean(in_batch_info_nce(a, b, temperature=0.1, symmetric=symmetric,
                                           axis_name="data"), "data")

  for symmetric in (False, True):
    single = lambda a: in_batch_info_nce(a, b, temperature=0.1, symmetric=symmetric)
    ref, g_ref = jax.jit(jax.value_and_grad(single))(a)
    sharded = jax.shard_map(functools.partial(local, symmetric=symmetric), mesh=mesh,
                            in_specs=(P("data"), P("data")), out_specs=P())
    # value and gradient: the gradient reaches every example through the gathered negatives
    got, g = jax.jit(jax.value_and_grad(lambda a: sharded(a, b)))(a)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-7)
    # local-only negatives give another (smaller-denominator) loss: the check can fail
    local_only = jax.jit(jax.vmap(lambda a, b: in_batch_info_nce(
        a, b, temperature=0.1, symmetric=symmetric)))(a.reshape(8, 4, 6), b.reshape(8, 4, 6))
    assert abs(float(jnp.mean(local_only)) - float(ref)) > 1e-3
  # and under pmap (symmetric: both towers gathered)
  got = jax.pmap(functools.partial(local, symmetric=True), axis_name="data")(
      a.reshape(8, 4, 6), b.reshape(8, 4, 6))
  np.testing.assert_allclose(np.asarray(got), np.full(8, float(ref)), rtol=1e-6)


@pytest.mark.skipif(not _have("jaxopt_llm.losses.fused"),
                    reason="jaxopt_llm.losses.fused not written yet (issue 4)")
def test_fused_ce_under_sharded_jit_equals_unsharded():
  from jaxopt_llm.losses.fused import fused_linear_cross_entropy
  rng = np.random.RandomState(4)
  hidden = jnp.asarray(rng.randn(64, 16).astype(np.float32))
  kernel = jnp.asarray(0.3 * rng.randn(16, 40).astype(np.float32))
  labels = rng.randint(0, 40, 64).astype(np.int32)
  labels[::7] = -100  # some ignored tokens, unevenly spread over the shards

  def loss(hidden, kernel, labels):
    return fused_linear_cross_entropy(hidden, kernel, labels, chunk_size=8)

  ref, (gh_ref, gk_ref) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
      hidden, kernel, labels)
  mesh = parallel.make_mesh()
  sh = parallel.shard_batch({"h": hidden, "y": labels}, mesh)
  kernel_r = jax.device_put(kernel, NamedSharding(mesh, P()))
  got, (gh, gk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(sh["h"], kernel_r, sh["y"])
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(gk_ref), rtol=1e-5, atol=1e-7)
  ce = losses.cross_entropy(hidden @ kernel, labels)
  np.testing.assert_allclose(float(got), float(ce), rtol=1e-5)
