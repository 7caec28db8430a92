"""``parallel.jit_step``: jit + ZeRO-1 / FSDP training equals one device, in place and donated.

Every optimizer of ``conftest.OPTIMIZERS`` runs at once (one ``multi_transform`` program per
mode); Sophia runs with its Hessian estimator in ``update_fn``; the fused cross-entropy runs
on a batch split over the devices with ignored tokens spread unevenly (the jit engine's
global-mean claim).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxopt_llm import losses, parallel

MODES = ["zero1", "fsdp"]

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs the 8 virtual CPU devices set up in conftest.py")


_RUNS = {}


def _run(mlp, mode):
  """STEPS steps in ``mode``: (final params, final opt state, losses, plan, donated)."""
  if mode in _RUNS:
    return _RUNS[mode]
  params, tx, loss_fn = mlp.combined()
  mesh = parallel.make_mesh()
  plan = parallel.plan_shardings(tx, params, mesh, mode)
  p = parallel.place_params(params, plan)
  s = parallel.init_opt_state(tx, p, plan)
  first = jax.tree.leaves(p)[0]
  step = parallel.make_train_step(loss_fn, tx, plan, compiler_options=mlp.FAST_COMPILE)
  out = []
  for b in mlp.batches():
    p, s, loss = step(p, s, parallel.shard_batch(b, mesh))
    out.append(float(loss))
  _RUNS[mode] = p, s, out, plan, first.is_deleted()
  return _RUNS[mode]


@pytest.mark.parametrize("mode", MODES)
def test_sharded_training_equals_single_device(mlp, single_run, mode):
  ref_params, _, ref_losses = single_run
  params, _, got_losses, _, _ = _run(mlp, mode)
  for name in mlp.OPTIMIZERS:
    mlp.assert_matches_single(params[name], ref_params[name], name, mode)
  np.testing.assert_allclose(got_losses, ref_losses, rtol=mlp.RTOL, atol=0)
  assert ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("mode", MODES)
def test_step_donates_and_keeps_layout(mlp, mode):
  params, state, _, plan, donated = _run(mlp, mode)
  assert donated, "the step should donate (reuse) the params it was given"
  for leaf, sh in zip(jax.tree.leaves(params), jax.tree.leaves(plan.params)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(plan.opt_state)):
    assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


@pytest.mark.parametrize("mode", MODES)
def test_sophia_sharded_equals_single_device(mlp, sophia_single_run, mode):
  """The estimator runs on the global batch: no ``axis_name``, same labels as one device."""
  tx, params, keys, steps = mlp.sophia_setup()
  mesh = parallel.make_mesh()
  plan = parallel.plan_shardings(tx, params, mesh, mode)
  step = parallel.make_train_step(mlp.mlp_loss, tx, plan,
                                  update_fn=mlp.sophia_update_fn(tx, mlp.gnb_reference),
                                  compiler_options=mlp.FAST_COMPILE)
  p = parallel.place_params(params, plan)
  s = parallel.init_opt_state(tx, p, plan)
  for b, k, t in zip(mlp.batches(), keys, steps):
    p, s, _ = step(p, s, parallel.shard_batch(b, mesh), k, t)
  mlp.check_sophia(p, s, *sophia_single_run, mode)
  for leaf in (*jax.tree.leaves(s[0].mu), *jax.tree.leaves(s[0].hessian)):
    assert mlp.spec(leaf) == mlp.expected_spec(leaf.shape)
    if mlp.spec(leaf) != P():
      mlp.check_split(leaf, "sophia state")


def test_fused_ce_under_sharded_jit_equals_unsharded():
  """Ignored tokens spread unevenly over the shards: still the mean over valid tokens."""
  rng = np.random.RandomState(4)
  hidden = jnp.asarray(rng.randn(32, 8).astype(np.float32))
  kernel = jnp.asarray(0.3 * rng.randn(8, 24).astype(np.float32))
  labels = rng.randint(0, 24, 32).astype(np.int32)
  labels[::5] = -100

  def loss(hidden, kernel, labels):
    return losses.fused_linear_cross_entropy(hidden, kernel, labels, chunk_size=8)

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  ref, (gh_ref, gk_ref) = grad_fn(hidden, kernel, labels)
  mesh = parallel.make_mesh()
  sh = parallel.shard_batch({"h": hidden, "y": labels}, mesh)
  kernel_r = jax.device_put(kernel, NamedSharding(mesh, P()))
  got, (gh, gk) = grad_fn(sh["h"], kernel_r, sh["y"])
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(gk_ref), rtol=1e-5, atol=1e-7)
  ce = losses.cross_entropy(hidden @ kernel, labels)
  np.testing.assert_allclose(float(got), float(ce), rtol=1e-5)
