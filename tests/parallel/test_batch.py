"""``parallel.batch``: the batch split over the data axis; each process's rows of it.

Multi-process feeding itself is exercised by ``test_distributed.py``; here the single-process
behaviour and the row arithmetic (the rows of each position of the data axis).
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxopt_llm import parallel
from jaxopt_llm.parallel import batch as batch_module

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs the 8 virtual CPU devices set up in conftest.py")


def test_shard_batch_places_contiguous_rows():
  mesh = parallel.make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  out = parallel.shard_batch({"x": x, "y": np.arange(16)}, mesh)
  assert out["x"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  for s in out["x"].addressable_shards:
    assert s.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(s.data), x[s.index])


def test_shard_batch_errors():
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match=r"`batch`.*\['x'\].*\(12, 3\).*divisible.*8"):
    parallel.shard_batch({"x": np.zeros((12, 3)), "y": np.zeros(16)}, mesh)
  with pytest.raises(ValueError, match="scalar"):
    parallel.shard_batch({"x": np.float32(1.0)}, mesh)
  with pytest.raises(ValueError, match="axis"):
    parallel.shard_batch(np.zeros(16), mesh, axis="batch")


def test_process_local_slice_single_process_is_the_whole_batch():
  mesh = parallel.make_mesh(data=4, model=2)
  batch = {"x": np.arange(8 * 3).reshape(8, 3), "y": np.arange(8)}
  assert batch_module.local_data_positions(mesh) == [0, 1, 2, 3]
  out = parallel.process_local_slice(batch, mesh)
  for k in batch:
    np.testing.assert_array_equal(out[k], batch[k])
  with pytest.raises(ValueError, match=r"`global_batch`.*\(6,\).*divisible.*4"):
    parallel.process_local_slice({"y": np.arange(6)}, mesh)


class _FakeDevice:
  def __init__(self, process_index):
    self.process_index = process_index


class _FakeMesh:
  """A mesh whose devices belong to 2 processes (``process_local_slice`` reads only these)."""

  def __init__(self, owners, axis_names=("data", "model")):
    self.devices = np.vectorize(_FakeDevice, otypes=[object])(np.asarray(owners))
    self.axis_names = axis_names
    self.shape = dict(zip(axis_names, self.devices.shape))


@pytest.mark.parametrize("owners,rows_of_process_0", [
    ([[0], [0], [1], [1]], [0, 1, 2, 3]),          # 4 x 1 mesh, 2 blocks of 2 rows each
    ([[0, 0], [1, 1], [0, 0], [1, 1]], [0, 1, 4, 5]),  # interleaved: blocks 0 and 2
    ([[0, 1], [0, 1], [0, 1], [0, 1]], list(range(8))),  # model axis across processes
])
def test_process_local_slice_rows(owners, rows_of_process_0, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  mesh = _FakeMesh(owners)
  batch = {"x": np.arange(8 * 2).reshape(8, 2), "y": np.arange(8)}
  out = parallel.process_local_slice(batch, mesh)
  np.testing.assert_array_equal(out["y"], rows_of_process_0)
  np.testing.assert_array_equal(out["x"], batch["x"][rows_of_process_0])
