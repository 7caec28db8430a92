"""``parallel.launch_local``: environment of the processes, failure and timeout handling.

The commands are plain Python (no JAX), so these run in well under a second; the real JAX
run is ``test_distributed.py``.
"""
import json
import subprocess
import sys
import time

import pytest

from jaxopt_llm import parallel
from jaxopt_llm.parallel import distributed, launch

SHOW_ENV = ("import json, os; print(json.dumps({k: os.environ.get(k) for k in "
            "['JAXOPT_LLM_COORDINATOR_ADDRESS', 'JAXOPT_LLM_NUM_PROCESSES', "
            "'JAXOPT_LLM_PROCESS_ID', 'JAXOPT_LLM_LOCAL_DEVICE_COUNT', 'XLA_FLAGS', "
            "'JAX_PLATFORMS', 'EXTRA']}))")


def test_each_process_gets_its_place(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1")
  results = parallel.launch_local([sys.executable, "-c", SHOW_ENV], 3, local_device_count=4,
                                  env={"EXTRA": "x"}, timeout=60)
  envs = [json.loads(r.stdout) for r in results]
  assert [r.returncode for r in results] == [0, 0, 0]
  assert [e[distributed.PROCESS_ID_ENV] for e in envs] == ["0", "1", "2"]
  address = envs[0][distributed.COORDINATOR_ADDRESS_ENV]
  host, port = address.rsplit(":", 1)
  assert host == "127.0.0.1" and 0 < int(port) < 65536
  for e in envs:
    assert e[distributed.COORDINATOR_ADDRESS_ENV] == address
    assert e[distributed.NUM_PROCESSES_ENV] == "3"
    assert e[distributed.LOCAL_DEVICE_COUNT_ENV] == "4"
    # the inherited device count is replaced, other flags kept
    assert e["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
    assert e["JAX_PLATFORMS"] == "cpu" and e["EXTRA"] == "x"
  # two launches never share a port
  again = parallel.launch_local([sys.executable, "-c", SHOW_ENV], 1, local_device_count=1)
  assert json.loads(again[0].stdout)[distributed.COORDINATOR_ADDRESS_ENV] != address


FAIL_ONE = ("import os, sys, time\n"
            "if os.environ['JAXOPT_LLM_PROCESS_ID'] == '1':\n"
            "  print('boom', file=sys.stderr); sys.exit(3)\n"
            "time.sleep(120)\n")


def test_one_failure_stops_the_others():
  start = time.monotonic()
  results = parallel.launch_local([sys.executable, "-c", FAIL_ONE], 2, local_device_count=1,
                                  timeout=100)
  assert time.monotonic() - start < 30  # not the 120 s sleep, nor the timeout
  assert results[1].returncode == 3 and "boom" in results[1].stderr
  assert results[0].returncode < 0  # stopped by a signal
  with pytest.raises(subprocess.CalledProcessError) as info:
    parallel.launch_local([sys.executable, "-c", FAIL_ONE], 2, local_device_count=1,
                          timeout=100, check=True)
  assert info.value.returncode == 3


def test_timeout_stops_everything():
  start = time.monotonic()
  with pytest.raises(subprocess.TimeoutExpired) as info:
    parallel.launch_local([sys.executable, "-c", "print('up', flush=True); "
                           "import time; time.sleep(120)"], 2, local_device_count=1,
                          timeout=1.5)
  assert time.monotonic() - start < 30
  assert "process 1 stdout:\nup" in info.value.output


@pytest.mark.parametrize("kwargs,match", [
    (dict(argv=[], num_processes=2, local_device_count=1), "argv"),
    (dict(argv="python x.py", num_processes=2, local_device_count=1), "argv"),
    (dict(argv=["x"], num_processes=0, local_device_count=1), "num_processes"),
    (dict(argv=["x"], num_processes=2, local_device_count=0), "local_device_count"),
    (dict(argv=["x"], num_processes=2, local_device_count=1, timeout=0), "timeout"),
])
def test_launch_local_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    parallel.launch_local(**kwargs)


PORT_TAKEN = ("import os, sys, time\n"
              "if os.environ['JAXOPT_LLM_COORDINATOR_ADDRESS'].endswith(':1'):\n"
              "  if os.environ['JAXOPT_LLM_PROCESS_ID'] == '0':\n"
              "    print('add_port.cc:83] Failed to add port to server', file=sys.stderr)\n"
              "    sys.exit(1)\n"
              "  time.sleep(120)\n"
              "print('ran on', os.environ['JAXOPT_LLM_COORDINATOR_ADDRESS'])\n")


def test_port_taken_meanwhile_is_retried_with_another(monkeypatch):
  """The coordinator's port was free when picked but taken before process 0 bound it."""
  ports = iter([1, 1, 4321])
  monkeypatch.setattr(launch, "free_port", lambda host="127.0.0.1": next(ports))
  results = parallel.launch_local([sys.executable, "-c", PORT_TAKEN], 2, local_device_count=1,
                                  timeout=60)
  assert [r.returncode for r in results] == [0, 0]
  assert all(r.stdout == "ran on 127.0.0.1:4321\n" for r in results)
