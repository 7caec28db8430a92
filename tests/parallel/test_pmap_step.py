"""``parallel.pmap_step``: pmap training equals one device, replicas stay identical."""
import jax
import numpy as np
import pytest

from jaxopt_llm import parallel
from jaxopt_llm.optim import hessian

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs the 8 virtual CPU devices set up in conftest.py")


def _replicas_identical(tree):
  for leaf in jax.tree.leaves(tree):
    np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(leaf[0], leaf.shape))


def test_pmap_training_equals_single_device(mlp, single_run):
  ref_params, _, ref_losses = single_run
  params, tx, loss_fn = mlp.combined()
  step = parallel.make_pmap_train_step(loss_fn, tx)
  p, s = parallel.replicate(params), parallel.replicate(tx.init(params))
  got_losses = []
  for b in mlp.batches():
    p, s, loss = step(p, s, parallel.split_batch(b))
    got_losses.append(np.asarray(loss))
  got_losses = np.asarray(got_losses)
  assert np.all(got_losses == got_losses[:, :1]), "pmean-ed loss differs between replicas"
  np.testing.assert_allclose(got_losses[:, 0], ref_losses, rtol=mlp.RTOL, atol=0)
  _replicas_identical(p)  # every replica holds the same params...
  p = parallel.unreplicate(p)
  for name in mlp.OPTIMIZERS:  # ...and they are the single-device ones
    mlp.assert_matches_single(p[name], ref_params[name], name, "pmap")


def test_sophia_pmap_equals_single_device(mlp, sophia_single_run_pmap_order):
  """The library's estimator with ``axis_name``: labels per device, the estimate psum-ed."""
  tx, params, keys, steps = mlp.sophia_setup()
  library = lambda p, x, key: hessian.gauss_newton_bartlett(  # noqa: E731
      lambda q: mlp.mlp_logits(q, x), p, key, axis_name="data")
  step = parallel.make_pmap_train_step(mlp.mlp_loss, tx,
                                       update_fn=mlp.sophia_update_fn(tx, library))
  p, s = parallel.replicate(params), parallel.replicate(tx.init(params))
  for b, k, t in zip(mlp.batches(), keys, steps):
    p, s, _ = step(p, s, parallel.split_batch(b), k, t)
  _replicas_identical((p, s))
  mlp.check_sophia(parallel.unreplicate(p), parallel.unreplicate(s),
                   *sophia_single_run_pmap_order, "pmap")


def test_split_batch_and_replicate_round_trip():
  x = np.arange(32, dtype=np.float32).reshape(16, 2)
  s = parallel.split_batch(x)
  assert s.shape == (8, 2, 2)
  np.testing.assert_array_equal(np.asarray(s).reshape(16, 2), x)
  r = parallel.replicate({"w": x})
  assert r["w"].shape == (8, 16, 2)
  assert {d.id for d in r["w"].sharding.device_set} == {d.id for d in jax.devices()}
  np.testing.assert_array_equal(np.asarray(parallel.unreplicate(r)["w"]), x)


def test_split_batch_errors():
  with pytest.raises(ValueError, match=r"divisible.*8"):
    parallel.split_batch(np.zeros((12, 2)))
  with pytest.raises(ValueError, match="`n`"):
    parallel.split_batch(np.zeros((16, 2)), 9)
  with pytest.raises(ValueError, match="scalar|divisible"):
    parallel.split_batch({"x": np.float32(1.0)})


def test_replicate_and_unreplicate_errors_name_the_argument():
  with pytest.raises(ValueError, match="replicate: `devices`"):
    parallel.replicate({"w": np.ones(2)}, devices=[])
  with pytest.raises(ValueError, match="unreplicate: every leaf"):
    parallel.unreplicate({"w": np.float32(1.0)})
