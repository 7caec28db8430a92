"""Checkpoints with Orbax: the whole ``TrainState`` plus JSON metadata, for exact resumption.

A checkpoint holds two items under ``<directory>/<step>/``:

* ``state``: the ``TrainState`` pytree (params, optimizer state with the spike guard's
  window and counters, step counters, the RNG key), written with ``StandardSave`` and read back
  with ``StandardRestore`` into the structure of a freshly initialised state (so NamedTuple
  optimizer states, MultiSteps accumulators etc. come back as the same types);
* ``extra``: JSON: the data iterator position (``BatchIterator.state()``), the run config and
  the last evaluation.

Arrays are stored bit-for-bit, so ``train 2N`` and ``train N; save; restore into a fresh
model/optimizer; train N`` give identical arrays (tests/train/test_checkpoint.py).

Many processes: every process calls ``save`` / ``restore`` with its (sharded) global arrays;
Orbax coordinates them (each writes its own shards, process 0 the metadata and the JSON), so
the directory must be one that all processes see. Saving is
synchronous (the state is small; asynchronous saves would need ``wait_until_finished``
before every read of the directory).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # an optional dependency: the [train] extra
    raise ImportError("checkpoints need orbax-checkpoint: pip install 'jaxopt_llm[train]'") \
        from e
  return ocp


class Checkpointer:
  """Keeps the ``max_to_keep`` most recent checkpoints of one run in ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    ocp = _ocp()
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, state: Any, extra: dict) -> int:
    """Saves ``state`` (a pytree with an int ``step`` field) and JSON-able ``extra`` under
    ``state.step``; a step that is already saved is kept as it is. Returns the step."""
    ocp = _ocp()
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      # A resumed run that ends where it started: the state at a step is deterministic,
      # so the existing checkpoint already holds it.
      return step
    # NumPy scalars (np.int32(3)) as 0-d arrays: orbax < 0.11.2x refuses np.generic leaves.
    state = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    self._manager.wait_until_finished()
    return step

  def restore(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores into ``target``'s structure, dtypes and shardings; returns (state, extra)."""
    ocp = _ocp()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    return out["state"], dict(out["extra"])

  def extra(self, step: Optional[int] = None) -> dict:
    """Only the JSON item (data position, config) of a checkpoint: cheap, no arrays read."""
    ocp = _ocp()
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(out["extra"])

  def clear(self) -> None:
    """Deletes every checkpoint of this directory (a fresh run in an old output folder).

    Many processes: process 0 deletes, the others wait for it (a barrier on both sides, so
    no process still reads the old directory or already writes the new one)."""
    self._manager.close()
    multihost_utils.sync_global_devices("jaxopt_llm.Checkpointer.clear:start")
    if jax.process_index() == 0:
      shutil.rmtree(self.directory, ignore_errors=True)
    multihost_utils.sync_global_devices("jaxopt_llm.Checkpointer.clear:done")
    self.__init__(self.directory, self._max_to_keep)

  def close(self) -> None:
    self._manager.close()
