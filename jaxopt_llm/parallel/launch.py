"""Start a multi-process JAX run on this machine: N copies of a command, CPU devices, gloo.

``launch_local(argv, num_processes, local_device_count=...)`` is the one-machine stand-in for
a cluster launcher (SLURM's ``srun``, ``mpirun``): it picks a free TCP port on 127.0.0.1 for
the coordinator, starts ``num_processes`` copies of ``argv``, each told its place through the
environment variables that ``initialize_distributed`` reads, and waits for them::

  # train.py
  from jaxopt_llm import parallel
  parallel.initialize_distributed()          # reads JAXOPT_LLM_* set by launch_local
  ...

  # launch.py (or a test)
  results = parallel.launch_local([sys.executable, "train.py"], 2, local_device_count=4)
  print(results[0].stdout)

The processes run on the CPU backend (``JAX_PLATFORMS=cpu`` unless ``env`` says otherwise)
with ``local_device_count`` devices each, so 2 x 4 devices behave as two 4-device hosts. Each
process's output is captured in an anonymous temporary file (no pipe can fill up and block
it, no fixed path is shared between concurrent launches), and everything it starts is killed
if one process fails, on timeout, or on an interrupt: safe under pytest-xdist. The port is
free when picked; if something takes it before process 0 binds it (the coordinator then
fails at once), the launch is repeated with another port, up to 3 times.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
from typing import Mapping, Optional, Sequence

from jaxopt_llm._validation import check_int, check_real
from jaxopt_llm.parallel.distributed import (
    COORDINATOR_ADDRESS_ENV, LOCAL_DEVICE_COUNT_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)

__all__ = ["launch_local", "free_port"]

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_POLL_S = 0.05
_GRACE_S = 5.0  # between SIGTERM and SIGKILL when stopping the others
_PORT_ATTEMPTS = 3
_PORT_TAKEN = "Failed to add port to server"  # the coordinator's message (jax 0.10, gRPC)


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port on ``host`` that nothing listens on now (the OS picks it; may be reused later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return int(s.getsockname()[1])


def _child_env(base: Mapping[str, str], address: str, num_processes: int, process_id: int,
               local_device_count: int) -> dict:
  env = dict(base)
  # Replace, not add to, an inherited device-count flag (a test parent's 8 virtual devices):
  # the process gets exactly `local_device_count` CPU devices even where nothing calls
  # initialize_distributed (one process) or on a jax whose jax_num_cpu_devices loses to it.
  flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={local_device_count}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  env[COORDINATOR_ADDRESS_ENV] = address
  env[NUM_PROCESSES_ENV] = str(num_processes)
  env[PROCESS_ID_ENV] = str(process_id)
  env[LOCAL_DEVICE_COUNT_ENV] = str(local_device_count)
  # The coordinator (process 0) listens on loopback only, not JAX's default of every interface.
  env["JAX_COORDINATOR_BIND_ADDRESS"] = address
  return env


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + _GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _read(f) -> str:
  f.seek(0)
  return f.read().decode("utf-8", errors="replace")


def _run_once(argv: list[str], num_processes: int, local_device_count: int,
              base: Mapping[str, str], cwd: Optional[str], deadline: Optional[float],
              timeout: Optional[float]) -> list[subprocess.CompletedProcess]:
  address = f"127.0.0.1:{free_port()}"
  procs: list[subprocess.Popen] = []
  outs, errs = [], []
  try:
    for i in range(num_processes):
      outs.append(tempfile.TemporaryFile())
      errs.append(tempfile.TemporaryFile())
      procs.append(subprocess.Popen(
          argv, stdin=subprocess.DEVNULL, stdout=outs[-1], stderr=errs[-1], cwd=cwd,
          env=_child_env(base, address, num_processes, i, local_device_count)))
    while True:
      status = [p.poll() for p in procs]  # every process, every time: poll() records exits
      if all(s is not None for s in status) or any(s not in (None, 0) for s in status):
        break  # all done, or one failed: the rest are stopped below
      if deadline is not None and time.monotonic() > deadline:
        _stop(procs)
        report = "\n".join(f"--- process {i} stdout:\n{_read(o)}\n--- process {i} stderr:\n"
                           f"{_read(e)}" for i, (o, e) in enumerate(zip(outs, errs)))
        raise subprocess.TimeoutExpired(shlex.join(argv), timeout, output=report)
      time.sleep(_POLL_S)
  finally:
    _stop(procs)  # a no-op for processes that ended; kills the rest on failure or interrupt
    results = [subprocess.CompletedProcess(argv, p.returncode, _read(o), _read(e))
               for p, o, e in zip(procs, outs, errs)]
    for f in (*outs, *errs):
      f.close()
  return results


def launch_local(argv: Sequence[str], num_processes: int, *, local_device_count: int,
                 env: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
                 cwd: Optional[str] = None,
                 check: bool = False) -> list[subprocess.CompletedProcess]:
  """Runs ``num_processes`` copies of ``argv`` as one multi-process JAX run on 127.0.0.1.

  Process i gets, on top of ``os.environ`` and ``env``:

  - ``JAXOPT_LLM_COORDINATOR_ADDRESS=127.0.0.1:<free port>`` (the same for all; process 0
    serves it, bound to loopback via ``JAX_COORDINATOR_BIND_ADDRESS``),
  - ``JAXOPT_LLM_NUM_PROCESSES=num_processes``, ``JAXOPT_LLM_PROCESS_ID=i``,
  - ``JAXOPT_LLM_LOCAL_DEVICE_COUNT=local_device_count``, and ``XLA_FLAGS`` with
    ``--xla_force_host_platform_device_count=local_device_count`` replacing any inherited one,
  - ``JAX_PLATFORMS=cpu`` unless ``env`` or ``os.environ`` sets it.

  The command must call ``initialize_distributed()`` (which reads those) before using JAX.
  ``examples/pjit_zero1.py --processes 2`` is a complete example.
  If a process exits with a non-zero status, the others are stopped (SIGTERM, then SIGKILL
  after 5 s): a JAX process waiting for a dead peer would otherwise wait minutes.

  Args:
    argv: the command, e.g. ``[sys.executable, "train.py", "--steps", "10"]``.
    num_processes: how many processes (>= 1).
    local_device_count: CPU devices per process (>= 1).
    env: extra environment variables for every process.
    timeout: seconds for the whole run; ``None`` waits as long as it takes.
    cwd: working directory of the processes.
    check: raise ``subprocess.CalledProcessError`` (of the first failed process) instead of
      returning when one fails.

  Returns:
    One ``subprocess.CompletedProcess`` per process, in process order, with ``stdout`` and
    ``stderr`` as text. A process stopped because another failed has a negative
    ``returncode`` (the signal).

  Raises:
    ValueError: bad ``argv``, ``num_processes``, ``local_device_count`` or ``timeout``.
    subprocess.TimeoutExpired: the run took longer than ``timeout``; every process was
      stopped, and the exception's ``output`` holds what each printed.
  """
  owner = "launch_local"
  if isinstance(argv, str) or not list(argv):
    raise ValueError(f"{owner}: `argv` must be a non-empty list of strings (the command and "
                     f"its arguments), got {argv!r}")
  argv = [str(a) for a in argv]
  check_int(owner, "num_processes", num_processes, lo=1)
  check_int(owner, "local_device_count", local_device_count, lo=1)
  if timeout is not None:
    check_real(owner, "timeout", timeout, lo=0.0, lo_open=True)
  base = {**os.environ, **(env or {})}
  deadline = None if timeout is None else time.monotonic() + timeout
  for _ in range(_PORT_ATTEMPTS):
    results = _run_once(argv, num_processes, local_device_count, base, cwd, deadline, timeout)
    # The port was free when picked, but something took it before process 0 bound it: the
    # coordinator fails at once with this message; try again with another port.
    if not (results[0].returncode and _PORT_TAKEN in results[0].stderr):
      break
  if check:
    # The first process that failed by itself (positive status), not one stopped after it.
    failed = sorted((r for r in results if r.returncode), key=lambda r: r.returncode < 0)
    if failed:
      failed[0].check_returncode()
  return results
