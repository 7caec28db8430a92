"""Shared test setup.

Multi-device code is tested on 8 virtual CPU devices: XLA reads the flag when jax is first
imported, so it is set here, before any test module imports jax. Single-device tests are
unaffected (they run on device 0).

On CI (CI=true) the PyTorch parity tests must run, never be skipped: a missing torch is an
error there, not a skip.
"""
import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()

if os.environ.get("CI", "").lower() == "true":
  import torch  # noqa: F401  (fails loudly if the dev extra did not install it)
