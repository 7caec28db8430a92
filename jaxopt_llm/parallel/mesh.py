"""The device mesh: two named axes, ``("data", "model")``.

``"data"`` splits the batch (and, with ZeRO or FSDP, the optimizer state / params);
``"model"`` is left for tensor parallelism (size 1 unless asked for; give params
``base_specs`` that use it, see ``jaxopt_llm.parallel.sharding``). After
``initialize_distributed`` (or ``jax.distributed.initialize``) ``jax.devices()`` lists every
device of every process, and ``make_mesh()`` spans them all.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxopt_llm._validation import check_int

DATA_AXIS = "data"
MODEL_AXIS = "model"

__all__ = ["DATA_AXIS", "MODEL_AXIS", "make_mesh", "mesh_axis_size"]


def make_mesh(devices: Union[None, int, Sequence[Any]] = None, *, data: Optional[int] = None,
              model: int = 1) -> Mesh:
  """A ``("data", "model")`` mesh of shape ``(data, model)``.

  Args:
    devices: ``None`` for every device (``jax.devices()``, all processes after
      ``initialize_distributed``), an int n for the first n of them, or a list of devices.
    data: size of the data axis; default ``len(devices) // model``. With ``devices=None`` the
      first ``data * model`` devices are used.
    model: size of the model (tensor-parallel) axis, default 1.

  Raises:
    ValueError: more devices requested than exist, or ``data * model`` not equal to the
      number of devices given.
  """
  owner = "make_mesh"
  check_int(owner, "model", model, lo=1)
  if data is not None:
    check_int(owner, "data", data, lo=1)
  available = jax.devices()
  if devices is None:
    if data is None:
      devs = list(available)
    else:
      if data * model > len(available):
        raise ValueError(
            f"{owner}: `data` * `model` = {data} * {model} = {data * model} devices requested, "
            f"but only {len(available)} exist")
      devs = list(available[:data * model])
  elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if devices < 1 or devices > len(available):
      raise ValueError(
          f"{owner}: `devices` must be in [1, {len(available)}] (the number of devices that "
          f"exist), got {devices}")
    devs = list(available[:devices])
  else:
    devs = list(devices)
    if not devs:
      raise ValueError(f"{owner}: `devices` must not be empty")
    if len(set(devs)) != len(devs):
      raise ValueError(f"{owner}: `devices` lists a device twice: {devs}")
  n = len(devs)
  if data is None:
    if n % model:
      raise ValueError(
          f"{owner}: `model` = {model} must divide the number of devices, {n}")
    data = n // model
  if data * model != n:
    raise ValueError(
        f"{owner}: `data` * `model` = {data} * {model} = {data * model} must equal the number "
        f"of devices, {n}")
  # jax.make_mesh orders the devices for the physical topology (ICI rings on TPU, NVLink
  # islands on GPU); Auto axes let XLA propagate shardings we do not pin.
  return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devs)


def mesh_axis_size(owner: str, mesh: Mesh, axis: str) -> int:
  """The size of ``axis`` in ``mesh``; a ValueError naming ``owner``'s ``axis`` if absent."""
  if axis not in mesh.axis_names:
    raise ValueError(f"{owner}: `axis` must be one of the mesh axes {mesh.axis_names}, "
                     f"got {axis!r}")
  return int(mesh.shape[axis])
