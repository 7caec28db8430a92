"""The trainer's file primitives: SHA-256 of a file, all-or-nothing writes."""
import glob
import hashlib

import pytest

from jaxopt_llm.train import files


def test_sha256_file_equals_hashlib_across_block_boundaries(tmp_path):
  data = bytes(range(256)) * (files.CHUNK // 256 + 3)  # more than one block
  path = tmp_path / "x.bin"
  path.write_bytes(data)
  assert files.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
  path = tmp_path / "sub" / "f.txt"
  files.atomic_write(str(path), lambda f: f.write("one\n"), "w")  # creates the folder
  assert path.read_text() == "one\n"

  def fails(f):
    f.write("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    files.atomic_write(str(path), fails, "w")
  assert path.read_text() == "one\n"  # the old file, untouched
  assert not glob.glob(str(tmp_path / "sub" / "*.tmp.*"))  # no temporary left behind
  files.atomic_write(str(path), lambda f: f.write(b"two"), sync_dir=True)
  assert path.read_bytes() == b"two"
