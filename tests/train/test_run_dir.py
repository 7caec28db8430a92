"""The run-folder rules: the lock (live holder refused, stale lock taken over, released),
what a fresh run refuses and what ``overwrite`` deletes (and keeps), the stop signals."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxopt_llm.train import run_dir
from jaxopt_llm.train.run_dir import RunDirError, RunLock


def _holder(folder):
  """A live process holding ``folder``'s lock (it prints 'held' once it has it)."""
  code = textwrap.dedent(f"""
      import sys, time
      from jaxopt_llm.train.run_dir import RunLock
      lock = RunLock({str(folder)!r}).acquire()
      print("held", flush=True)
      time.sleep(120)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_live_holder_is_refused_then_its_stale_lock_taken_over(tmp_path):
  proc = _holder(tmp_path)
  try:
    notes = []
    with pytest.raises(RunDirError, match=rf"in use by another run \(pid {proc.pid} on "):
      RunLock(str(tmp_path), notes.append).acquire()
    assert notes == []
    with open(tmp_path / run_dir.LOCK) as f:
      assert json.load(f)["pid"] == proc.pid  # untouched by the refused attempt
  finally:
    proc.kill()  # SIGKILL: no cleanup, the lock file stays behind
    proc.wait()
  assert os.path.exists(tmp_path / run_dir.LOCK)
  notes = []
  with RunLock(str(tmp_path), notes.append) as lock:
    assert lock.held
    assert len(notes) == 1 and "stale lock" in notes[0] and str(proc.pid) in notes[0]
    with open(tmp_path / run_dir.LOCK) as f:
      assert json.load(f)["pid"] == os.getpid()
    # a second lock in this very process is refused too (the flock is per open file)
    with pytest.raises(RunDirError, match="in use"):
      RunLock(str(tmp_path)).acquire()
  assert not os.path.exists(tmp_path / run_dir.LOCK)  # released: the file is gone


def test_a_lock_of_a_dead_pid_or_of_another_host(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  assert dead.wait() == 0
  path = tmp_path / run_dir.LOCK
  path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  notes = []
  with RunLock(str(tmp_path), notes.append):
    assert "no longer runs" in notes[0] and str(dead.pid) in notes[0]
  # A lock written on another host is never taken over: it may be a live run there.
  path.write_text(json.dumps({"pid": 1, "host": "elsewhere.invalid"}))
  with pytest.raises(RunDirError, match="another host.*elsewhere.invalid.*delete"):
    RunLock(str(tmp_path)).acquire()
  assert json.loads(path.read_text())["host"] == "elsewhere.invalid"


def _earlier_run(folder):
  """A folder as a finished run leaves it, plus the user's own files and a data cache."""
  (folder / "checkpoints" / "4" / "state").mkdir(parents=True)
  (folder / "checkpoints" / "4" / "state" / "d").write_bytes(b"arrays")
  (folder / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
  for name in ("config.json", "loss_curve.png", "wandb_run_id",
               "events.out.tfevents.1.host.000", "notes.txt"):
    (folder / name).write_text(name)
  (folder / "data_cache").mkdir()
  (folder / "data_cache" / "x.bin").write_bytes(b"tokens")


def _files(folder):
  return sorted(os.path.relpath(os.path.join(r, f), folder)
                for r, _, fs in os.walk(folder) for f in fs)


def test_a_fresh_run_refuses_an_earlier_run_unless_overwrite(tmp_path):
  _earlier_run(tmp_path)
  before = _files(tmp_path)
  with pytest.raises(RunDirError, match=r"holds checkpoints of an earlier run \(up to step 4\): "
                     r"continue it with --resume, replace it with --overwrite"):
    with run_dir.claim(str(tmp_path), log=print):
      pass
  assert _files(tmp_path) == before  # nothing deleted, no lock left behind
  with run_dir.claim(str(tmp_path), resume=True):  # resume is what the folder is for
    assert os.path.exists(tmp_path / run_dir.LOCK)
  assert _files(tmp_path) == before
  with pytest.raises(RunDirError, match="exclude each other"):
    with run_dir.claim(str(tmp_path), resume=True, overwrite=True):
      pass

  notes = []
  with run_dir.claim(str(tmp_path), overwrite=True, log=notes.append):
    pass
  # only what a run writes is gone; the user's file, the data cache (and wandb/) stay
  assert _files(tmp_path) == ["data_cache/x.bin", "notes.txt"]
  assert len(notes) == 1 and "checkpoints" in notes[0] and "metrics.jsonl" in notes[0]
  with run_dir.claim(str(tmp_path)):  # now a fresh run may start
    pass

  # metrics.jsonl alone (the checkpoints deleted by hand) is an earlier run too; empty is not
  (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 0}\n')
  with pytest.raises(RunDirError, match="metrics.jsonl of an earlier run"):
    with run_dir.claim(str(tmp_path)):
      pass
  (tmp_path / "metrics.jsonl").write_text("")
  with run_dir.claim(str(tmp_path)):
    pass


def test_out_dir_that_is_a_file(tmp_path):
  path = tmp_path / "f"
  path.write_text("mine")
  with pytest.raises(RunDirError, match="is a file, not a folder"):
    with run_dir.claim(str(path)):
      pass
  assert path.read_text() == "mine"


def test_stop_signals_ask_once_then_stop_at_once():
  notes = []
  with run_dir.StopSignals(log=notes.append) as stop:
    assert stop.requested() == 0
    os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes: no KeyboardInterrupt
    for _ in range(100):
      pass
    assert stop.signum == signal.SIGINT
    # the handler itself writes nothing: it may have interrupted a print to the same stream
    # ("reentrant call inside BufferedWriter"); the loop's requested() says it, once
    assert notes == []
    assert stop.requested() == signal.SIGINT
    assert stop.requested() == signal.SIGINT
    assert len(notes) == 1 and "SIGINT: finishing the current step" in notes[0]
    with pytest.raises(KeyboardInterrupt):  # the second one: Python's own handler
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(100):
        pass
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  e = run_dir.TrainingInterrupted(signal.SIGTERM, "stopped")
  assert isinstance(e, SystemExit) and e.code == 143 and str(e) == "stopped"
