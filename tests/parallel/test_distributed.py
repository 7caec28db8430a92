"""``parallel.distributed``: a real 2-process run over gloo equals the 1-process 8-device run.

``launch_local`` starts ``_distributed_child.py`` twice on 127.0.0.1, 4 CPU devices each;
together they train 10 ZeRO-1 AdamW steps on an 8-device mesh, each process feeding its own
rows (``process_local_slice``). This process runs the child's ``train()`` on its own 8 devices
(conftest.py) for the reference. Loss curve, final params and AdamW's ``mu`` (split across
the two processes, gathered with ``to_host``) must agree to 1e-5 relative (measured: 2e-7).
The children start with an inherited 8-device ``XLA_FLAGS``: ``initialize_distributed``'s
``local_device_count`` must win over it (the child asserts 2 processes x 4 devices).
"""
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

from jaxopt_llm import parallel
from jaxopt_llm.parallel import distributed

CHILD = pathlib.Path(__file__).with_name("_distributed_child.py")
RTOL = 1e-5


def _child_module():
  spec = importlib.util.spec_from_file_location("distributed_child", CHILD)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the 8 CPU devices of conftest.py")
def test_two_processes_train_like_one(tmp_path):
  child = _child_module()
  results = parallel.launch_local([sys.executable, str(CHILD), str(tmp_path / "out")], 2,
                                  local_device_count=4, timeout=240)
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} failed:\n{r.stdout}\n{r.stderr[-4000:]}"
  runs = [dict(np.load(tmp_path / f"out.{i}.npz")) for i in range(2)]
  ref = child.train()
  assert bool(ref["mu_split"]) and all(bool(run["mu_split"]) for run in runs)
  assert ref["loss"][-1] < ref["loss"][0]  # it trains
  for i, run in enumerate(runs):
    assert sorted(run) == sorted(ref)
    for key in ref:
      assert run[key].shape == ref[key].shape, (i, key)
      err = _rel_err(run[key], ref[key])
      assert err <= RTOL, f"process {i} {key}: rel err {err:.2e}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_processes=2, process_id=2, coordinator_address="127.0.0.1:1234"), "process_id"),
    (dict(num_processes=2, process_id=-1, coordinator_address="127.0.0.1:1234"), "process_id"),
    (dict(num_processes=2, process_id=0), "coordinator_address"),
    (dict(num_processes=2, coordinator_address="127.0.0.1:1234"), "process_id"),
    (dict(num_processes=0), "num_processes"),
    (dict(num_processes=2, process_id=0, coordinator_address="127.0.0.1"),
     "coordinator_address"),
    (dict(num_processes=2, process_id=0, coordinator_address="h:99999"), "coordinator_address"),
    (dict(num_processes=2, process_id=0, coordinator_address="h:1", local_device_count=0),
     "local_device_count"),
])
def test_initialize_distributed_errors(kwargs, match, monkeypatch):
  for name in (distributed.COORDINATOR_ADDRESS_ENV, distributed.NUM_PROCESSES_ENV,
               distributed.PROCESS_ID_ENV, distributed.LOCAL_DEVICE_COUNT_ENV,
               "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match=match):
    parallel.initialize_distributed(**kwargs)


def test_initialize_distributed_single_process_does_nothing(monkeypatch):
  monkeypatch.delenv("SLURM_JOB_ID", raising=False)
  monkeypatch.delenv("OMPI_MCA_orte_hnp_uri", raising=False)
  monkeypatch.delenv(distributed.NUM_PROCESSES_ENV, raising=False)
  assert parallel.initialize_distributed() is False
  assert parallel.initialize_distributed(num_processes=1, process_id=0) is False
  monkeypatch.setenv(distributed.NUM_PROCESSES_ENV, "1")
  assert parallel.initialize_distributed(local_device_count=2) is False
  assert not jax.distributed.is_initialized() and jax.process_count() == 1
  monkeypatch.setenv(distributed.NUM_PROCESSES_ENV, "two")
  with pytest.raises(ValueError, match=distributed.NUM_PROCESSES_ENV):
    parallel.initialize_distributed()


def test_launcher_detection():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
  assert distributed.detected_launcher_process_count(slurm) == 4
  assert distributed.detected_launcher_process_count({**slurm, "SLURM_NTASKS": "1"}) == 1
  del slurm["SLURM_LOCALID"]  # JAX's detector needs all five
  assert distributed.detected_launcher_process_count(slurm) is None
  ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "3"}
  assert distributed.detected_launcher_process_count(ompi) == 3
  assert distributed.detected_launcher_process_count({}) is None


def test_to_host_single_process():
  mesh = parallel.make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  tree = {"x": parallel.shard_batch(x, mesh), "n": 3, "s": jax.numpy.float32(2.0)}
  out = parallel.to_host(tree)
  assert isinstance(out["x"], np.ndarray) and isinstance(out["s"], np.ndarray)
  np.testing.assert_array_equal(out["x"], x)
  assert out["n"] == 3 and out["s"] == 2.0
