"""The trainer's two file primitives: a file's SHA-256, and an atomic, durable write.

Shared by the data cache (``data.py``), the checkpoint manifests (``checkpoint.py``) and the
run's logs and config (``writers.py``), so a checksum or a half-written file means the same
everywhere.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any, Callable

CHUNK = 1 << 20


def sha256_file(path: str) -> str:
  """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb", *,
                 sync_dir: bool = False) -> None:
  """Creates or replaces ``path`` with what ``write(f)`` writes, all or nothing.

  The bytes go to ``PATH.tmp.<pid>.<random>`` (in the same folder, created if missing),
  are flushed to disk, then renamed over ``path``: a reader sees the old file or the new
  one, never half of one, and a crash leaves at most the temporary file (removed on any
  error here). ``sync_dir`` also flushes the folder, so the rename itself survives a power
  cut (checkpoint manifests).
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  if sync_dir:
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
