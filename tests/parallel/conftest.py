"""Shared setup of the parallel tests: a small MLP, its batches, and the single-device runs.

Three ways to be wrong are checked across tests/parallel:
* numerics: every optimizer, under jit + ZeRO-1, jit + FSDP and pmap, ends ``STEPS`` steps
  at the parameters of the single-device run (fp32, max|a - b| / max|b| <= 1e-5 per leaf),
  and so do two processes against one (test_distributed.py);
* layout: the optimizer state really is split (each leaf's ``.sharding`` spec, and every
  device holding exactly 1/8 of each split leaf, read from ``addressable_shards``), and it
  follows the params' layout rather than a rule of its own;
* input: the mesh / batch / launcher helpers reject bad sizes with ValueErrors naming the
  argument.

Helpers reach the test modules as the ``mlp`` fixture (test modules cannot import each
other or this file under ``--import-mode=importlib``); the single-device reference runs are
session fixtures, computed once for the jit and the pmap tests.
"""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxopt_llm import losses, optim, schedules
from jaxopt_llm.optim import hessian

N_DEV = 8
STEPS = 10
BATCH = 32
RTOL = 1e-5
SOPHIA_K = 2  # estimate on every other step, so both branches of update_every_k run
# Compile-time saver for the big combined programs (about 40% less XLA time on CPU); the
# arithmetic is the same IEEE fp32, only fewer backend optimisation passes run.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# A small MLP classifier. Shapes chosen so that each case of the layout rule occurs:
# [16, 32] (split on its larger dim, 1), [32] and [32, 5] (split on dim 0), [5] and []
# (replicated: nothing divisible by 8).


def init_params(seed=0):
  # numpy, not jax.random: eager jax ops would cost a compilation each
  rng = np.random.RandomState(seed)
  f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
  return {"l1": {"w": f32(0.3 * rng.randn(16, 32)), "b": f32(np.zeros(32))},
          "l2": {"w": f32(0.3 * rng.randn(32, 5)), "b": f32(0.1 * rng.randn(5))},
          "scale": f32(1.0)}


def mlp_logits(params, x):
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  return params["scale"] * (h @ params["l2"]["w"] + params["l2"]["b"])


def mlp_loss(params, batch):
  return losses.cross_entropy(mlp_logits(params, batch["x"]), batch["y"])


def batches():
  rng = np.random.RandomState(0)
  x = rng.randn(STEPS, BATCH, 16).astype(np.float32)
  y = rng.randint(0, 5, (STEPS, BATCH)).astype(np.int32)
  return [{"x": x[t], "y": y[t]} for t in range(STEPS)]


# Every optimizer family of jaxopt_llm.optim, and optax compositions around ours and optax's
# own. The learning rate is positional (its keyword is being renamed to learning_rate).
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
        schedules.warmup_cosine(2e-2, 3, STEPS), mask=optim.weight_decay_mask),
}


def combined():
  """All optimizers at once, each on its own copy of the MLP, via ``optax.multi_transform``.

  The copies share nothing (the loss is a sum of independent terms), so each copy follows
  exactly the trajectory it would alone; one compiled program per mode instead of ten keeps
  the tests fast. It also puts MaskedNodes in every state, a case the layout code must handle.
  """
  params = {name: init_params() for name in OPTIMIZERS}
  labels = {name: jax.tree.map(lambda _, n=name: n, params[name]) for name in OPTIMIZERS}
  tx = optax.multi_transform({name: make() for name, make in OPTIMIZERS.items()}, labels)

  def loss_fn(params, batch):
    return sum(mlp_loss(params[name], batch) for name in OPTIMIZERS)

  return params, tx, loss_fn


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def expected_spec(shape, n=N_DEV):
  """The layout rule, written independently: largest dim divisible by n (first on ties)."""
  best = None
  for i, d in enumerate(shape):
    if d % n == 0 and d > 0 and (best is None or d > shape[best]):
      best = i
  if best is None:
    return P()
  return P(*([None] * best + ["data"]))


def spec(leaf):
  return P(*leaf.sharding.spec)


def check_split(leaf, where):
  """Every device holds exactly 1/8 of the leaf, and the 8 pieces are disjoint."""
  shards = leaf.addressable_shards
  assert len(shards) == N_DEV, where
  for s in shards:
    assert s.data.nbytes * N_DEV == leaf.nbytes, (where, s.data.shape, leaf.shape)
  starts = {tuple(sl.start or 0 for sl in s.index) for s in shards}
  assert len(starts) == N_DEV, f"{where}: shards overlap"


def assert_matches_single(got, ref, name, mode):
  """Every leaf of ``got`` within RTOL of ``ref``, and ``ref`` really moved from the init."""
  init = init_params()
  for path, g, r in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                        jax.tree.leaves(ref)):
    where = jax.tree_util.keystr(path[0])
    assert g.shape == r.shape and g.dtype == r.dtype == jnp.float32, where
    err = rel_err(g, r)
    assert err <= RTOL, f"{name}/{mode} {where}: rel err {err:.2e}"
  moved = max(rel_err(r, p0) for r, p0 in zip(jax.tree.leaves(ref), jax.tree.leaves(init)))
  assert moved > 1e-2, f"{name}: params barely moved ({moved:.1e})"


# Sophia: the Hessian estimate must be averaged over the devices too.


def gnb_reference(params, x, key, per_device=False):
  """GNB written from the paper (Liu et al., 2023, Alg. 2): B * grad(mean CE(sampled))**2.

  Labels are sampled per device-sized chunk with ``fold_in(key, device index)``, which is how
  the library's estimator samples under ``axis_name``; so this one-device estimate equals the
  8-device one exactly, and a missing psum (a per-device estimate) would show.
  ``per_device=True`` takes the mean gradient as pmap does, the mean of the per-chunk ones.
  """
  z = jax.lax.stop_gradient(mlp_logits(params, x))
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(N_DEV))
  labels = jax.vmap(jax.random.categorical)(keys, z.reshape(N_DEV, -1, z.shape[-1])).reshape(-1)
  ce = lambda q, b: losses.cross_entropy(mlp_logits(q, b["x"]), b["y"])  # noqa: E731
  g = mean_gradient(ce, params, {"x": x, "y": labels}, per_device)
  return jax.tree.map(lambda g: x.shape[0] * g * g, g)


def mean_gradient(loss_fn, params, batch, per_device):
  """The batch-mean loss's gradient; ``per_device``: in pmap's order, the mean over the
  ``N_DEV`` chunks of each chunk's gradient (the same number, summed in another order)."""
  if not per_device:
    return jax.grad(loss_fn)(params, batch)
  chunks = jax.tree.map(lambda a: a.reshape((N_DEV, -1) + a.shape[1:]), batch)
  grads = jax.vmap(lambda b: jax.grad(loss_fn)(params, b))(chunks)
  return jax.tree.map(lambda g: jnp.mean(g, 0), grads)


def sophia_update_fn(tx, estimator):
  def update_fn(grads, state, params, batch, key, step):
    return hessian.update_every_k(tx, grads, state, params, step=step, k=SOPHIA_K,
                                  estimate_fn=lambda p: estimator(p, batch["x"], key))
  return update_fn


def sophia_setup():
  """(optimizer, params, per-step PRNG keys, per-step step numbers)."""
  tx = optim.sophia(1e-2, rho=0.04, weight_decay=0.1)
  keys = [jax.random.fold_in(jax.random.PRNGKey(7), t) for t in range(STEPS)]
  return tx, init_params(), keys, [jnp.int32(t) for t in range(STEPS)]


def check_sophia(got, state, ref, ref_state, mode):
  for path, g, r in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got),
                        jax.tree.leaves(ref)):
    err = rel_err(g, r)
    assert err <= RTOL, f"sophia/{mode} {jax.tree_util.keystr(path[0])}: rel err {err:.2e}"
  sophia_state = ref_state[0]
  assert int(sophia_state.hessian_count) == STEPS // SOPHIA_K
  assert 0.0 < float(sophia_state.win_rate) < 1.0  # some coordinates clipped, some not
  for a, b in zip(jax.tree.leaves(state[0].hessian), jax.tree.leaves(sophia_state.hessian)):
    assert rel_err(a, b) <= RTOL


@pytest.fixture(scope="session")
def mlp():
  """The helpers above, for the test modules."""
  return types.SimpleNamespace(**{k: v for k, v in globals().items()
                                  if k.isidentifier() and not k.startswith("_")})


@pytest.fixture(scope="session")
def single_run():
  """The combined optimizers, ``STEPS`` steps on one device: (params, opt state, losses)."""
  params, tx, loss_fn = combined()
  state = jax.jit(tx.init)(params)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  out = []
  for b in batches():
    params, state, loss = step(params, state, b)
    out.append(float(loss))
  return params, state, out


def sophia_one_device(per_device: bool):
  """Sophia with the reference GNB estimator on one device: (params, opt state)."""
  tx, params, keys, steps = sophia_setup()
  update = sophia_update_fn(tx, functools.partial(gnb_reference, per_device=per_device))

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(p, s, b, k, t):
    g = mean_gradient(mlp_loss, p, b, per_device)
    u, s = update(g, s, p, b, k, t)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for b, k, t in zip(batches(), keys, steps):
    p, s = step(p, s, b, k, t)
  return p, s


@pytest.fixture(scope="session")
def sophia_single_run():
  return sophia_one_device(per_device=False)


@pytest.fixture(scope="session")
def sophia_single_run_pmap_order():
  """The same run with pmap's order of summing the gradients. Sophia divides by a Hessian
  estimate, which magnifies rounding: on this problem the summation order alone moves a bias
  by ~1e-5 relative (the tolerance), so pmap is compared with a run summing in its order."""
  return sophia_one_device(per_device=True)
