"""The rules of a run folder (``--out``): one run at a time, nothing lost without being asked.

* ``claim(out_dir, resume=, overwrite=, log=)``: the context a run executes in. It creates the
  folder, takes its lock (``run.lock``) and checks what the folder holds:

  - a fresh run (no ``resume``) in a folder that holds an earlier run's checkpoints (or its
    non-empty ``metrics.jsonl``) is refused (``RunDirError``, one line) unless ``overwrite``;
    with ``overwrite`` (and only then) the earlier run's outputs (``RUN_OUTPUTS``) are deleted
    first. Nothing else in the folder (the user's files, a data cache) is touched.
  - the lock is released when the run ends, however it ends (return, exception, signal).

* ``RunLock``: ``run.lock`` holds ``{"pid", "host", "started"}`` of the run that holds it, and
  the holder keeps an exclusive ``flock`` on it while it runs (the kernel drops that lock when
  the process dies, even on kill -9). A second run on the folder fails at once with one line
  naming the holder. A lock file nobody holds any more (its process died; on this host, its
  pid no longer runs or holds no ``flock``) is stale: it is taken over, with a one-line note.
  A lock file written on another host is never taken over (a file system shared between hosts
  may not share ``flock``): the line says to delete it if no run is active there. On a file
  system without ``flock`` the pid test alone decides.

* ``StopSignals``: SIGTERM / SIGINT during a run do not kill it: the step in progress
  finishes, the loop saves a checkpoint and ends with ``TrainingInterrupted`` (a
  ``SystemExit`` with the shell's code, 128 + the signal: 143 for SIGTERM, 130 for SIGINT).
  The same signal again stops at once (SIGINT: ``KeyboardInterrupt``; SIGTERM: the default
  action), without a checkpoint.

Many processes (``jax.distributed``): the lock belongs to the run: process 0 takes it and
makes every decision about the folder; the others wait for its verdict (an error on process 0
is raised, with its text, on every process) and never touch ``run.lock``. A signal that reaches
any process stops every process after the same step (``StopSignals.requested`` agrees on it
with one small all-gather per step, only when there are several processes).

This module imports no JAX at import time (a lock is cheap to take, also from a test).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import os
import shutil
import signal
import socket
import threading
from typing import Callable, Iterator, Optional

try:
  import fcntl
except ImportError:  # Windows: no flock; the pid in the lock file decides
  fcntl = None

LOCK = "run.lock"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# What a run writes into its folder, deleted by ``overwrite`` (globs, relative to the folder).
# Kept: anything else, e.g. the user's files, a data cache (``load_dataset``'s), ``wandb/``
# (W&B's own run folders, one per run id; a new run gets a new id).
RUN_OUTPUTS = (CHECKPOINTS, METRICS, "config.json", "loss_curve.png", "wandb_run_id",
               "events.out.tfevents.*")


class RunDirError(ValueError):
  """A run folder that cannot be used as asked (one line: what, and what to do)."""


class TrainingInterrupted(SystemExit):
  """The run stopped on a signal after saving a checkpoint; ``code`` is 128 + the signal.

  A ``SystemExit``: uncaught, the process exits with that code (143 for SIGTERM, 130 for
  SIGINT), as a process killed by the signal would report it; ``str(e)`` is the one-line note.
  """

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum
    self.code = 128 + signum


# ---------------------------------------------------------------------------------------
# The lock

def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _holder_text(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')}"
          + (f" since {holder['started']}" if holder.get("started") else ""))


class RunLock:
  """``run.lock`` in ``folder``: ``acquire()`` or ``RunDirError``; ``release()``; a context.

  ``log`` receives the note when a stale lock is taken over.
  """

  def __init__(self, folder: str, log: Optional[Callable[[str], None]] = None):
    self.folder = folder
    self.path = os.path.join(folder, LOCK)
    self.log = log or (lambda text: None)
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "RunLock":
    if self._fd is not None:
      return self
    host = socket.gethostname()
    for _ in range(10):  # retried only when the holder deleted the file under us
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        flocked = self._flock(fd)
        if not self._same_file(fd):
          os.close(fd)
          continue
        holder = self._read(fd)
        if holder:
          self._judge(holder, host, flocked)
        record = {"pid": os.getpid(), "host": host,
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
      except BaseException:
        os.close(fd)
        raise
      self._fd = fd
      return self
    raise RunDirError(f"{self.path}: could not take the lock (it keeps being replaced)")

  def _flock(self, fd: int) -> bool:
    """True: we hold the flock; False: the file system has no flock (decide by pid)."""
    if fcntl is None:
      return False
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      holder = self._read(fd)
      who = _holder_text(holder) if holder else "another process"
      raise RunDirError(f"{self.folder!r} is in use by another run ({who}; lock "
                        f"{self.path}): wait for it to end, or give another --out") from None
    except OSError as e:
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
      raise

  def _same_file(self, fd: int) -> bool:
    """The path still names the file we locked (a releasing holder unlinks it)."""
    try:
      return os.stat(self.path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      return False

  @staticmethod
  def _read(fd: int) -> dict:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      text = os.read(fd, 4096).decode(errors="replace").strip()
      holder = json.loads(text) if text else {}
      return holder if isinstance(holder, dict) else {"pid": None, "host": None}
    except (OSError, ValueError):
      return {"pid": None, "host": None}  # unreadable: whoever wrote it is gone (flock free)

  def _judge(self, holder: dict, host: str, flocked: bool) -> None:
    """A lock file with a holder, whose flock we could take (or that has none): stale?"""
    pid = holder.get("pid")
    if holder.get("host") not in (None, host):
      raise RunDirError(f"{self.folder!r} is locked by a run on another host "
                        f"({_holder_text(holder)}); if no run is active there, delete "
                        f"{self.path}")
    alive = isinstance(pid, int) and _pid_alive(pid)
    if alive and pid != os.getpid() and not flocked:
      raise RunDirError(f"{self.folder!r} is in use by another run ({_holder_text(holder)}; "
                        f"lock {self.path}): wait for it to end, or give another --out")
    reason = "holds no lock on it" if alive else "no longer runs"
    self.log(f"note: taking over the stale lock {self.path} ({_holder_text(holder)}, which "
             f"{reason})")

  def release(self) -> None:
    """Deletes the lock file (if it is still ours) and drops the flock."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      if self._same_file(fd):
        os.unlink(self.path)
    except OSError:
      pass
    finally:
      os.close(fd)

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------------------------
# What the folder holds

def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """The steps saved in ``checkpoint_dir`` (its numbered folders), ascending."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n)))


def earlier_run(out_dir: str) -> Optional[str]:
  """What an earlier run left in ``out_dir`` that a fresh run would lose, or None."""
  steps = checkpoint_steps(os.path.join(out_dir, CHECKPOINTS))
  if steps:
    return f"checkpoints of an earlier run (up to step {steps[-1]})"
  metrics = os.path.join(out_dir, METRICS)
  if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
    return f"the {METRICS} of an earlier run"
  return None


def remove_run_outputs(out_dir: str) -> list[str]:
  """Deletes ``RUN_OUTPUTS`` in ``out_dir`` (never the lock); returns the names removed."""
  removed = []
  for pattern in RUN_OUTPUTS:
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), pattern))):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
      removed.append(os.path.basename(path))
  return removed


def _prepare(out_dir: str, resume: bool, overwrite: bool, log: Callable[[str], None]
             ) -> RunLock:
  """Process 0's part of ``claim``: the folder, the lock, the refusal or the cleanup."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise RunDirError(f"output folder {out_dir!r} is a file, not a folder")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise RunDirError(f"cannot create the output folder {out_dir!r}: "
                      f"{e.strerror or e}") from None
  lock = RunLock(out_dir, log).acquire()
  try:
    if not resume:
      found = earlier_run(out_dir)
      if found and not overwrite:
        raise RunDirError(f"{out_dir!r} holds {found}: continue it with --resume, replace it "
                          "with --overwrite, or give another --out")
      if overwrite:
        removed = remove_run_outputs(out_dir)
        if removed:
          log(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {out_dir}")
  except BaseException:
    lock.release()
    raise
  return lock


@contextlib.contextmanager
def claim(out_dir: Optional[str], *, resume: bool = False, overwrite: bool = False,
          log: Optional[Callable[[str], None]] = None) -> Iterator[Optional[RunLock]]:
  """The run-folder rules around a run (see the module doc); ``out_dir=None``: nothing.

  Many processes: process 0 decides and holds the lock; every process raises its error.
  """
  if resume and overwrite:
    raise RunDirError("`resume` and `overwrite` exclude each other: continue the run, or "
                      "delete it and start afresh")
  if out_dir is None:
    yield None
    return
  log = log or (lambda text: None)
  lock, error = None, None
  if _process_index() == 0:
    try:
      lock = _prepare(out_dir, resume, overwrite, log)
    except Exception as e:  # noqa: BLE001  (raised below, after the others heard of it)
      error = e
  error_text = lead_says((str(error) or type(error).__name__) if error is not None else "")
  try:
    if error is not None:
      raise error
    if error_text:
      raise RunDirError(error_text)
    yield lock
  finally:
    if lock is not None:
      lock.release()


def _process_index() -> int:
  import jax
  return jax.process_index()


def lead_says(text: str, max_bytes: int = 4096) -> str:
  """``text`` of process 0, on every process (one process: ``text`` itself)."""
  import jax
  if jax.process_count() == 1:
    return text
  import numpy as np
  from jax.experimental import multihost_utils
  buf = np.zeros(max_bytes, np.uint8)
  raw = text.encode()[:max_bytes]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")


# ---------------------------------------------------------------------------------------
# Signals

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """While active (a context), SIGTERM / SIGINT ask the loop to stop after the current step.

  ``requested()`` returns the signal number (every process the same, at the same step) or
  0. Handlers are installed only in the main thread (elsewhere Python allows none) and for
  signals that are not ignored (``nohup``), and the previous ones come back on exit.
  ``enabled=False``: nothing is installed.
  """

  def __init__(self, enabled: bool = True, log: Optional[Callable[[str], None]] = None):
    self.enabled = enabled  # every process of a run must agree: it decides the all-gather
    self._install = enabled and threading.current_thread() is threading.main_thread()
    self.log = log or (lambda text: None)
    self.signum = 0
    self._announced = False
    self._previous: dict = {}

  def _handle(self, signum: int, frame) -> None:
    if self.signum:  # the second one: stop now, as if we were not here
      previous = self._previous.get(signum, signal.SIG_DFL)
      signal.signal(signum, previous)
      if callable(previous):
        previous(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    # Only a flag here: the handler may interrupt a print, and writing to the same stream
    # from inside it raises "reentrant call". requested() says it, outside the handler.
    self.signum = signum

  def requested(self) -> int:
    """The signal that asks to stop (0: none); with many processes, any process's. The first
    time it is seen, says in one line what happens next."""
    import jax
    signum = self.signum
    if self.enabled and jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      flags = np.asarray(multihost_utils.process_allgather(np.asarray([signum], np.int32)))
      signum = int(flags.max())
    if signum and not self._announced:
      self._announced = True
      self.log(f"{signal.Signals(signum).name}: finishing the current step, then saving a "
               f"checkpoint (send it again to stop at once, without one)")
    return signum

  def __enter__(self) -> "StopSignals":
    if self._install:
      for s in _SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # ignored (nohup, a background job)
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
