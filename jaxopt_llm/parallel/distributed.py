"""Many processes (many hosts): ``jax.distributed`` set up, and results brought back to hosts.

JAX runs multi-host as one process per host (or per group of devices), all running the same
program: after ``jax.distributed.initialize`` ``jax.devices()`` lists every device of every
process, a mesh spans them all, and a jitted step on global arrays runs with the collectives
crossing processes. On CPU the cross-process collectives go over gloo (TCP), so a multi-host
run can be tried on one machine: ``jaxopt_llm.parallel.launch_local`` starts the processes.

``initialize_distributed`` resolves each argument left ``None`` in this order:

- ``coordinator_address``: ``JAXOPT_LLM_COORDINATOR_ADDRESS``, then
  ``JAX_COORDINATOR_ADDRESS`` (which JAX itself reads), then a detected launcher;
- ``num_processes``: ``JAXOPT_LLM_NUM_PROCESSES``, then a detected launcher, else 1;
- ``process_id``: ``JAXOPT_LLM_PROCESS_ID``, then a detected launcher;
- ``local_device_count``: ``JAXOPT_LLM_LOCAL_DEVICE_COUNT``, else left to XLA (its default
  or ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``).

JAX reads only the coordinator address from its environment; the process count and id come
from the arguments, from our variables (``launch_local`` sets them), or from JAX's own cluster
auto-detection, which this function defers to when it detects a launcher that started more
than one process: SLURM (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
``SLURM_PROCID``, ``SLURM_LOCALID`` all set; count ``SLURM_NTASKS``) or Open MPI's
``mpirun`` (``OMPI_MCA_orte_hnp_uri`` set; count ``OMPI_COMM_WORLD_SIZE``). For other
clusters (Cloud TPU pods, Kubernetes, mpi4py) call ``jax.distributed.initialize`` directly,
which auto-detects those.

The usual multi-process step: ``initialize_distributed()`` first thing; build the same
global batch on every process and feed ``shard_batch(process_local_slice(batch, mesh),
mesh)``; read results with ``to_host`` (every process must call it, in the same order: it may
run a collective); write logs and checkpoints from ``jax.process_index() == 0`` only, or
through a library that coordinates the processes (Orbax).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxopt_llm._validation import check_int
from jaxopt_llm.parallel._common import PyTree

COORDINATOR_ADDRESS_ENV = "JAXOPT_LLM_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAXOPT_LLM_NUM_PROCESSES"
PROCESS_ID_ENV = "JAXOPT_LLM_PROCESS_ID"
LOCAL_DEVICE_COUNT_ENV = "JAXOPT_LLM_LOCAL_DEVICE_COUNT"
JAX_COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"

__all__ = [
    "initialize_distributed", "to_host", "detected_launcher_process_count",
    "COORDINATOR_ADDRESS_ENV", "NUM_PROCESSES_ENV", "PROCESS_ID_ENV", "LOCAL_DEVICE_COUNT_ENV",
]

_OWNER = "initialize_distributed"
# The variables by which JAX's own cluster detection recognises a launcher (jax/_src/clusters),
# and the one holding the number of processes it started.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"


def detected_launcher_process_count(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
  """The process count of a SLURM or Open MPI launch found in ``environ``, else ``None``.

  ``environ`` defaults to ``os.environ``. These are the launchers whose process count and id
  ``jax.distributed.initialize`` reads by itself (see the module doc).
  """
  environ = os.environ if environ is None else environ
  if all(v in environ for v in _SLURM_VARS):
    return _env_int(environ, "SLURM_NTASKS")
  if _OMPI_URI in environ and "OMPI_COMM_WORLD_SIZE" in environ:
    return _env_int(environ, "OMPI_COMM_WORLD_SIZE")
  return None


def _env_int(environ: Mapping[str, str], name: str) -> Optional[int]:
  value = environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{_OWNER}: the environment variable {name} must be an integer, "
                     f"got {value!r}") from None


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  ok = bool(sep) and bool(host) and port.isdigit() and 1 <= int(port) <= 65535
  if not ok:
    raise ValueError(f"{_OWNER}: `coordinator_address` must be 'host:port' with a port in "
                     f"[1, 65535], got {address!r}")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           local_device_count: Optional[int] = None) -> bool:
  """Joins this process to a multi-process JAX run; ``False`` (and nothing done) if alone.

  Call it first, before anything that starts a JAX backend (any array operation,
  ``jax.devices()``). Arguments left ``None`` are read from the environment as the module
  doc's table says (``launch_local`` sets ``JAXOPT_LLM_*``; a CLI passes its flags here).

  With one process (``num_processes`` 1 or unresolved and no multi-process launcher detected)
  it returns ``False`` and changes nothing. Otherwise, in order:

  1. ``jax_cpu_collectives_implementation = "gloo"``: cross-process collectives on the CPU
     backend over TCP (without it a CPU computation spanning processes fails). Only the CPU
     client reads it; GPU and TPU keep their own collectives.
  2. ``local_device_count`` (if given): ``jax_num_cpu_devices``, the number of CPU devices of
     this process. It takes precedence over ``--xla_force_host_platform_device_count`` in
     ``XLA_FLAGS`` (such as the 8 virtual devices a test parent sets and its children
     inherit; checked on jax 0.10), and is only possible before the backend starts.
  3. ``jax.distributed.initialize(coordinator_address, num_processes, process_id)``.

  Calling it again once initialised returns ``True`` without doing anything. With one process
  ``local_device_count`` is not applied either (set ``jax_num_cpu_devices`` or ``XLA_FLAGS``
  for that; ``launch_local`` sets both for its processes).

  Args:
    coordinator_address: ``"host:port"`` of process 0, which listens there; every process
      passes the same.
    num_processes: how many processes take part (>= 1).
    process_id: this process's index in ``[0, num_processes)``.
    local_device_count: number of CPU devices in this process (>= 1).

  Returns:
    ``True`` if this process is now part of a multi-process run, ``False`` for a single one.

  Raises:
    ValueError: a bad argument or environment variable (named), ``process_id`` out of
      range, or no ``coordinator_address`` / ``process_id`` for ``num_processes`` > 1 without
      a launcher that provides them.
    RuntimeError: called after a JAX backend started (from JAX).
  """
  environ = os.environ
  if coordinator_address is None:
    coordinator_address = (environ.get(COORDINATOR_ADDRESS_ENV)
                           or environ.get(JAX_COORDINATOR_ADDRESS_ENV) or None)
  if num_processes is None:
    num_processes = _env_int(environ, NUM_PROCESSES_ENV)
  if process_id is None:
    process_id = _env_int(environ, PROCESS_ID_ENV)
  if local_device_count is None:
    local_device_count = _env_int(environ, LOCAL_DEVICE_COUNT_ENV)

  launcher_count = detected_launcher_process_count(environ)
  if num_processes is not None:
    check_int(_OWNER, "num_processes", num_processes, lo=1)
  if local_device_count is not None:
    check_int(_OWNER, "local_device_count", local_device_count, lo=1)
  if process_id is not None:
    check_int(_OWNER, "process_id", process_id, lo=0)
    bound = num_processes if num_processes is not None else launcher_count
    if bound is not None and process_id >= bound:
      raise ValueError(f"{_OWNER}: `process_id` must be in [0, {bound - 1}] "
                       f"(`num_processes` = {bound}), got {process_id}")
  if coordinator_address is not None:
    _check_address(coordinator_address)

  count = num_processes if num_processes is not None else launcher_count
  if count is None or count == 1:
    return False
  if jax.distributed.is_initialized():
    return True
  if launcher_count is None:  # nothing for JAX to auto-detect: every value must be known
    if coordinator_address is None:
      raise ValueError(
          f"{_OWNER}: `coordinator_address` ('host:port' of process 0) is needed for "
          f"`num_processes` = {count} > 1; pass it or set {COORDINATOR_ADDRESS_ENV} or "
          f"{JAX_COORDINATOR_ADDRESS_ENV}")
    if process_id is None:
      raise ValueError(
          f"{_OWNER}: `process_id` (in [0, {count - 1}]) is needed for `num_processes` = "
          f"{count} > 1; pass it or set {PROCESS_ID_ENV}")

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", local_device_count)
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def to_host(tree: PyTree) -> PyTree:
  """Every leaf of ``tree`` as a host numpy array holding its *global* value, on every process.

  A leaf whose shards all live in this process (one process; or replicated leaves) is read
  directly. A leaf split across processes (a ZeRO-1 optimizer state, FSDP params, a global
  batch) is gathered with ``jax.experimental.multihost_utils.process_allgather`` (``tiled``:
  the global array, not a stack). That gather is a collective: with several processes every
  process must call ``to_host`` on the same tree at the same point. Non-array leaves (Python
  numbers) become numpy scalars.
  """
  leaves, treedef = jax.tree.flatten(tree)
  out = list(leaves)
  split = []  # positions of the leaves whose shards are spread over processes
  for i, x in enumerate(leaves):
    if not isinstance(x, jax.Array):
      out[i] = np.asarray(x)
    elif x.is_fully_addressable:
      out[i] = np.asarray(x)
    elif x.is_fully_replicated:  # every process holds it whole: no collective needed
      out[i] = np.asarray(x.addressable_data(0))
    else:
      split.append(i)
  if split:
    gathered = multihost_utils.process_allgather([leaves[i] for i in split], tiled=True)
    for i, g in zip(split, gathered):
      out[i] = np.asarray(g)
  return jax.tree.unflatten(treedef, out)
