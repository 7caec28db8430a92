"""Feeding the batch: the global batch split over the data axis, on one or many processes.

``shard_batch`` places a batch with each leaf's leading (batch) dimension split over the
``"data"`` mesh axis: row block i (of ``B / n`` rows, n the axis size) goes to the devices at
position i of the axis. On one process the batch given is the global batch. On several
(after ``initialize_distributed``) each process holds only its own devices' blocks, so each
passes *its* rows, and ``jax.make_array_from_process_local_data`` assembles the global array
without any process ever holding the whole of it on device.

A deterministic multi-process input pipeline: every process builds the same global batch
from the same seed and keeps its rows with ``process_local_slice``::

  batch = make_global_batch(seed, step)                          # same on every process
  batch = shard_batch(process_local_slice(batch, mesh), mesh)    # each feeds its rows

which gives the same global array, hence the same training run, as one process feeding the
whole batch to the same number of devices. (A pipeline that reads only its own rows, as a
large-scale one would, passes those to ``shard_batch`` directly.)
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_llm.parallel._common import PyTree, leaf_shape
from jaxopt_llm.parallel.mesh import DATA_AXIS, mesh_axis_size

__all__ = ["shard_batch", "process_local_slice", "local_data_positions"]


def local_data_positions(mesh: Mesh, axis: str = DATA_AXIS) -> list[int]:
  """The positions along ``axis`` of this process's devices in ``mesh`` (sorted, distinct).

  Row block i of a batch split over ``axis`` lives on the devices at position i, so these are
  the blocks this process feeds. One process: every position.
  """
  k = mesh.axis_names.index(axis)
  me = jax.process_index()
  return sorted({index[k] for index, device in np.ndenumerate(mesh.devices)
                 if device.process_index == me})


def _check_leaf(owner: str, arg: str, path: Any, x: Any, divisor: int,
                what: str) -> tuple[int, ...]:
  shape = leaf_shape(x)
  where = jax.tree_util.keystr(path) or "the batch"
  if not shape:
    raise ValueError(f"{owner}: every leaf of `{arg}` needs a leading batch dimension; "
                     f"{where} is a scalar")
  if shape[0] % divisor:
    raise ValueError(
        f"{owner}: the batch size of `{arg}` ({where} has shape {shape}) must be divisible "
        f"by {what}, {divisor}")
  return shape


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: str = DATA_AXIS) -> PyTree:
  """Each leaf's leading (batch) dimension split over ``axis`` of ``mesh``.

  Single process: ``batch`` is the global batch. Many processes: ``batch`` is this process's
  rows (``process_local_slice`` of the global batch), and the global batch is the blocks of
  all processes in mesh order; assembled with ``jax.make_array_from_process_local_data``.

  Raises:
    ValueError: a leaf is a scalar, or its batch dimension is not divisible by the size of
      ``axis`` (many processes: by this process's number of positions on ``axis``).
  """
  owner = "shard_batch"
  size = mesh_axis_size(owner, mesh, axis)
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  local = jax.process_count() > 1
  # Each process feeds its own positions of the axis: its rows must split evenly over them.
  divisor = len(local_data_positions(mesh, axis)) if local else size
  what = (f"this process's share of the {axis!r} mesh axis" if local
          else f"the size of the {axis!r} mesh axis")

  def one(path, x):
    _check_leaf(owner, "batch", path, x, divisor, what)
    if local:
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(one, batch)


def process_local_slice(global_batch: PyTree, mesh: Mesh, *, axis: str = DATA_AXIS) -> PyTree:
  """This process's rows of ``global_batch``, as ``shard_batch`` expects them (host numpy).

  The leading dimension B is cut in ``n`` blocks of ``B / n`` rows (n the size of ``axis``);
  the result is the concatenation of the blocks at ``local_data_positions(mesh, axis)``.
  One process: the whole batch. Two processes with 4 devices each on an 8-device data axis:
  rows ``[0, B/2)`` on process 0 and ``[B/2, B)`` on process 1.

  Raises:
    ValueError: a leaf is a scalar or B is not divisible by the size of ``axis``.
  """
  owner = "process_local_slice"
  size = mesh_axis_size(owner, mesh, axis)
  positions = local_data_positions(mesh, axis)
  what = f"the size of the {axis!r} mesh axis"

  def one(path, x):
    shape = _check_leaf(owner, "global_batch", path, x, size, what)
    x = np.asarray(x)
    rows = shape[0] // size
    if positions == list(range(positions[0], positions[-1] + 1)):  # contiguous: a view
      return x[positions[0] * rows:(positions[-1] + 1) * rows]
    return np.concatenate([x[i * rows:(i + 1) * rows] for i in positions])

  return jax.tree_util.tree_map_with_path(one, global_batch)
