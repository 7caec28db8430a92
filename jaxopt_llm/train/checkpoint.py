"""Checkpoints with Orbax: the whole ``TrainState`` plus JSON metadata, checksummed.

A checkpoint holds two items under ``<directory>/<step>/``:

* ``state``: the ``TrainState`` pytree (params, optimizer state with the spike guard's
  window and counters, step counters, the RNG key), written with ``StandardSave`` and read back
  with ``StandardRestore`` into the structure of a freshly initialised state (so NamedTuple
  optimizer states, MultiSteps accumulators etc. come back as the same types);
* ``extra``: JSON: the data iterator position (``BatchIterator.state()``), the run config and
  the last evaluation;

and ``MANIFEST`` (``jaxopt_llm.sha256.json``): the size and SHA-256 of every other file of the
step folder, written atomically (a temporary file renamed into place) after Orbax has finished
the checkpoint. A checkpoint is *intact* when its manifest exists and every file it lists has
its size and checksum (``check_intact``); ``restore`` refuses any other, and
``latest_intact_step`` walks back from the newest checkpoint to the newest intact one (a
truncated file, one flipped bit, a checkpoint cut short before its manifest: all fall back,
in one line). ``restore_latest_intact`` is that for readers (``jaxopt-llm sample``).

Arrays are stored bit-for-bit, so ``train 2N`` and ``train N; save; restore into a fresh
model/optimizer; train N`` give identical arrays (tests/train/test_checkpoint.py).

Many processes: every process calls ``save`` / ``restore`` with its (sharded) global arrays;
Orbax coordinates them (each writes its own shards, process 0 the metadata and the JSON), so
the directory must be one that all processes see. Once Orbax has finished (all processes'
files are written), process 0 checksums every file of the step folder, whichever process wrote
it; on restore process 0 verifies and every process restores the step it chose. Saving is
synchronous (the state is small; asynchronous saves would need ``wait_until_finished``
before every read of the directory).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxopt_llm.train.files import atomic_write, sha256_file
from jaxopt_llm.train.run_dir import RunDirError, checkpoint_steps, lead_says

MANIFEST = "jaxopt_llm.sha256.json"
CORRUPT = "corrupt"   # <directory>/corrupt/<step>: damaged checkpoints a resume moved aside


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # an optional dependency: the [train] extra
    raise ImportError("checkpoints need orbax-checkpoint: pip install 'jaxopt_llm[train]'") \
        from e
  return ocp


def _no_numpy_scalars(tree: Any) -> Any:
  """NumPy scalars (np.int32(3)) as 0-d arrays: Orbax refuses np.generic leaves."""
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, tree)


class CheckpointError(RunDirError):
  """No checkpoint (or no intact one) where one is needed: one line."""


# ---------------------------------------------------------------------------------------
# Checksums

def file_digests(step_dir: str) -> dict[str, dict]:
  """``{relative path: {"bytes", "sha256"}}`` of every file under ``step_dir`` but the
  manifest (and its temporary file)."""
  out = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir).replace(os.sep, "/")
      if rel == MANIFEST or rel.startswith(MANIFEST + ".tmp"):
        continue
      out[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
  return out


def write_manifest(step_dir: str) -> None:
  """Records every file of ``step_dir`` in its ``MANIFEST``, atomically and durably."""
  text = json.dumps({"format": 1, "files": file_digests(step_dir)}, indent=0, sort_keys=True)
  atomic_write(os.path.join(step_dir, MANIFEST), lambda f: f.write(text + "\n"), "w",
               sync_dir=True)


def check_intact(step_dir: str) -> Optional[str]:
  """None when every file ``step_dir``'s manifest lists has its size and checksum, else
  why not (a few words: the first file that differs, or the missing manifest)."""
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      files = json.load(f)["files"]
  except FileNotFoundError:
    return "no checksum manifest (cut short while saving?)"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable checksum manifest ({type(e).__name__})"
  for rel, want in sorted(files.items()):
    path = os.path.join(step_dir, *rel.split("/"))
    try:
      size = os.path.getsize(path)
      if size != want["bytes"]:
        return f"{rel}: {size} bytes, {want['bytes']} expected"
      if sha256_file(path) != want["sha256"]:
        return f"{rel}: checksum mismatch"
    except FileNotFoundError:
      return f"{rel}: missing"
    except OSError as e:
      return f"{rel}: unreadable ({e.strerror or e})"
  return None


# ---------------------------------------------------------------------------------------
# The checkpointer

class Checkpointer:
  """Keeps the ``max_to_keep`` most recent checkpoints of one run in ``directory``.

  ``create=False`` (a reader): the directory must exist; nothing is created.
  """

  def __init__(self, directory: str, max_to_keep: int = 2, *, create: bool = True):
    self.directory = os.path.abspath(directory)
    self._max_to_keep = max_to_keep
    self._create = create
    self._manager = self._open()

  def _open(self):
    ocp = _ocp()
    if not self._create and not os.path.isdir(self.directory):
      raise CheckpointError(f"no checkpoint folder {self.directory!r}")
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep,
                                             create=self._create,
                                             enable_async_checkpointing=False))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, state: Any, extra: dict) -> int:
    """Saves ``state`` (a pytree with an int ``step`` field) and JSON-able ``extra`` under
    ``state.step``, then its checksum manifest; a step already saved is kept as it is.
    Returns the step."""
    ocp = _ocp()
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      # A resumed run that ends where it started: the state at a step is deterministic,
      # so the existing checkpoint already holds it.
      return step
    state = _no_numpy_scalars(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    self._manager.wait_until_finished()
    if jax.process_index() == 0:  # every process's files are in place: Orbax finalised
      write_manifest(self.step_dir(step))
    return step

  def latest_intact_step(self, log: Optional[Callable[[str], None]] = None, *,
                         set_aside: bool = False) -> Optional[int]:
    """The newest step whose files verify (None if there is no checkpoint at all);
    ``CheckpointError`` if there are checkpoints and none is intact.

    Skipping damaged checkpoints is said in one line (to ``log``). ``set_aside=True`` (a
    run about to continue from the intact one, and write those steps again) moves the
    damaged newer ones to ``<directory>/corrupt/``. Many processes: process 0 decides.
    """
    log = log or (lambda text: None)
    text = ""
    if jax.process_index() == 0:
      text = self._choose_intact(log, set_aside)
    if set_aside and jax.process_count() > 1:
      multihost_utils.sync_global_devices("jaxopt_llm.Checkpointer.set_aside")
    if set_aside:
      self._manager.reload()
    text = lead_says(text)
    if text.startswith("error:"):
      raise CheckpointError(text[len("error:"):])
    return int(text) if text else None

  def _choose_intact(self, log: Callable[[str], None], set_aside: bool) -> str:
    """Process 0's part of ``latest_intact_step``: the step as text, "" or "error:...""."""
    steps = checkpoint_steps(self.directory)
    if not steps:
      return ""
    damaged = []
    for step in reversed(steps):
      why = check_intact(self.step_dir(step))
      if why is None:
        break
      damaged.append((step, why))
    else:
      detail = "; ".join(f"step {s}: {why}" for s, why in damaged)
      return f"error:no intact checkpoint in {self.directory} ({detail})"
    if damaged:
      moved = ""
      if set_aside:
        places = [self._set_aside(s) for s, _ in damaged]
        moved = f"; moved to {', '.join(places)}"
      detail = "; ".join(f"step {s}: {why}" for s, why in damaged)
      log(f"checkpoint{'s' if len(damaged) > 1 else ''} "
          f"{', '.join(str(s) for s, _ in damaged)} damaged ({detail}): using step {step}"
          f" instead{moved}")
    return str(step)

  def _set_aside(self, step: int) -> str:
    target = os.path.join(self.directory, CORRUPT, str(step))
    n = 1
    while os.path.exists(target):
      target = os.path.join(self.directory, CORRUPT, f"{step}.{n}")
      n += 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(self.step_dir(step), target)
    return os.path.relpath(target, os.path.dirname(self.directory))

  def restore(self, target: Any, step: Optional[int] = None, *,
              verify: bool = True) -> tuple[Any, dict]:
    """Restores into ``target``'s structure, dtypes and shardings; returns (state, extra).

    ``step=None``: the latest. ``verify``: ``CheckpointError`` unless the step is intact.
    """
    ocp = _ocp()
    step = self._existing(step)
    if verify:
      why = lead_says((check_intact(self.step_dir(step)) or "")
                      if jax.process_index() == 0 else "")
      if why:
        raise CheckpointError(f"checkpoint {self.step_dir(step)} is damaged: {why}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _no_numpy_scalars(target))
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    return out["state"], dict(out["extra"])

  def extra(self, step: Optional[int] = None) -> dict:
    """Only the JSON item (data position, config) of a checkpoint: cheap, no arrays read."""
    ocp = _ocp()
    step = self._existing(step)
    out = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
    return dict(out["extra"])

  def _existing(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    return step

  def close(self) -> None:
    self._manager.close()


def restore_latest_intact(directory: str, target: Any,
                          log: Optional[Callable[[str], None]] = None
                          ) -> tuple[Any, dict, int]:
  """``(state, extra, step)`` of the newest intact checkpoint in ``directory``, restored into
  ``target``'s structure (a full ``TrainState``, e.g. ``build_program(cfg).init(seed)``).

  ``step`` is the checkpoint's (``state.step``: micro-batches; ``state.opt_step`` counts
  optimizer steps). Damaged newer checkpoints are skipped with one line to ``log`` (nothing
  is moved or deleted); ``CheckpointError`` (one line) if there is no intact checkpoint.
  """
  ckpt = Checkpointer(directory, create=False)
  try:
    step = ckpt.latest_intact_step(log)
    if step is None:
      raise CheckpointError(f"no checkpoint in {ckpt.directory}")
    state, extra = ckpt.restore(target, step, verify=False)  # just verified
    return state, extra, step
  finally:
    ckpt.close()
