"""``parallel.sharding``: the layout rule, the state following the params, real bytes per device.

Layouts are read from the arrays the plan creates (``init_opt_state``: jit with
``out_shardings``), so each check compiles only an ``init``; ``test_jit_step.py`` checks
that a train step keeps these layouts.
"""
from typing import NamedTuple

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxopt_llm import optim, parallel

N_DEV = 8

pytestmark = pytest.mark.skipif(
    jax.device_count() < N_DEV, reason="needs the 8 virtual CPU devices set up in conftest.py")


def _placed(mlp, mode):
  """The combined optimizers' params and state, created in ``mode``'s layout."""
  params, tx, _ = mlp.combined()
  plan = parallel.plan_shardings(tx, params, parallel.make_mesh(), mode)
  p = parallel.place_params(params, plan)
  return p, parallel.init_opt_state(tx, p, plan)


@pytest.mark.parametrize("mode", ["zero1", "fsdp"])
def test_opt_state_is_really_sharded(mlp, mode):
  params, state = _placed(mlp, mode)
  for name in mlp.OPTIMIZERS:  # all of them keep per-param state (sgd through its momentum)
    sub = state.inner_states[name].inner_state
    n_split = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(sub):
      where = f"{name}{jax.tree_util.keystr(path)}"
      want = mlp.expected_spec(leaf.shape)
      assert mlp.spec(leaf) == want, (where, leaf.shape, leaf.sharding.spec)
      if want == P():
        assert leaf.sharding.is_fully_replicated, where
      else:
        mlp.check_split(leaf, where)
        n_split += 1
    assert n_split >= 3, f"{name}: only {n_split} state leaves split"
    # bytes per device: the split leaves cost 1/8 each, the rest in full
    per_dev = parallel.bytes_per_device(sub)
    total_split = sum(l.nbytes for l in jax.tree.leaves(sub) if mlp.spec(l) != P())
    total_rest = sum(l.nbytes for l in jax.tree.leaves(sub) if mlp.spec(l) == P())
    assert set(per_dev.values()) == {total_split // N_DEV + total_rest}, (name, per_dev)
  # ZeRO-1 keeps the params whole on every device; FSDP splits them by the same rule.
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    where = jax.tree_util.keystr(path)
    if mode == "zero1":
      assert leaf.sharding.is_fully_replicated, where
    else:
      assert mlp.spec(leaf) == mlp.expected_spec(leaf.shape), where
      if mlp.spec(leaf) != P():
        mlp.check_split(leaf, where)


def test_adamw_zero1_specs_written_out(mlp):
  """The equation-level check: AdamW's mu and nu leaf by leaf, count replicated."""
  params = mlp.init_params()
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
    "masked": lambda: optax.masked(optim.adam(1e-3), {"a": True, "b": False, "bias": True}),
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


def test_non_mirror_state_uses_the_shape_rule(mlp):
  """Adafactor's factored moments have other shapes than the params: split where divisible."""
  params = {"w": jnp.ones((16, 24)), "v": jnp.ones((40,))}
  mesh = parallel.make_mesh()
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=8)
  shapes = jax.eval_shape(tx.init, params)
  sh = parallel.opt_state_shardings(tx, params, mesh, "zero1")
  for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(sh)):
    assert s.spec == mlp.expected_spec(leaf.shape), (jax.tree_util.keystr(path), leaf.shape)
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


def test_plan_errors(mlp):
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="mode"):
    parallel.plan_shardings(optim.adam(1e-3), mlp.init_params(), mesh, "zero3")
  with pytest.raises(ValueError, match="axis"):
    parallel.plan_shardings(optim.adam(1e-3), mlp.init_params(), mesh, axis="batch")


class _LoopState(NamedTuple):
  step: jax.Array
  params: dict
  opt_state: tuple
  rng: jax.Array


class _FlaxState:
  step: jax.Array
  params: dict
  opt_state: tuple
  rng: jax.Array


def test_train_state_shardings_for_a_whole_train_state(mlp):
  flax_struct = pytest.importorskip("flax.struct")  # the train extra; the core needs no flax
  params = mlp.init_params()
  tx = optim.adamw(1e-3)
  plan = parallel.plan_shardings(tx, params, parallel.make_mesh(), "zero1")
  state = _LoopState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0))
  for tree in (state, state._asdict(), flax_struct.dataclass(_FlaxState)(**state._asdict())):
    sh = parallel.train_state_shardings(tree, plan)
    get = (lambda t, k: t[k]) if isinstance(tree, dict) else getattr
    assert get(sh, "params") == plan.params and get(sh, "opt_state") == plan.opt_state
    assert get(sh, "step") == plan.replicated and get(sh, "rng") == plan.replicated
    placed = jax.device_put(tree, sh)  # the structures match leaf for leaf
    assert mlp.spec(get(placed, "opt_state")[0].mu["l1"]["w"]) == P(None, "data")
  with pytest.raises(ValueError, match="opt_state"):
    parallel.train_state_shardings({"params": params}, plan)


@pytest.mark.parametrize("shape, size, match", [
    ((8, 16), 0, "`axis_size`"), ((8, 16), 2.0, "`axis_size`"), ("3", 2, "`shape`"),
    ((8.0, 16), 2, "`shape`")])
def test_zero_spec_bad_arguments_name_them(shape, size, match):
  with pytest.raises(ValueError, match=match):
    parallel.zero_spec(shape, size)
