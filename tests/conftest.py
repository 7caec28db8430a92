"""Shared test setup.

Multi-device code is tested on 8 virtual CPU devices: XLA reads the flag when jax is first
imported, so it is set here, before any test module imports jax. Single-device tests are
unaffected (they run on device 0).

On CI (CI=true) the PyTorch parity tests must run, never be skipped: a missing torch is an
error there, not a skip.
"""
import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
# The suite is dominated by compiling many small programs: the backend's -O0 compiles them
# ~25% faster. It is a code-generation level, not a numerics switch (XLA:CPU has no
# fast-math by default at any level), and the whole suite, bitwise tests included (fused vs
# chain, torch-exact Muon), passes at both levels; `JAXOPT_LLM_TEST_OPT=1` keeps the
# default level.
_COMPILE_FLAG = "--xla_backend_optimization_level=0"
for _flag in (_DEVICES_FLAG, _COMPILE_FLAG):
  if _flag == _COMPILE_FLAG and os.environ.get("JAXOPT_LLM_TEST_OPT") == "1":
    continue
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

if os.environ.get("CI", "").lower() == "true":
  import torch  # noqa: F401  (fails loudly if the dev extra did not install it)
