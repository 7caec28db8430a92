"""Shared test setup.

On CI (CI=true) the PyTorch parity tests must run, never be skipped: a missing torch is an
error there, not a skip.
"""
import os

if os.environ.get("CI", "").lower() == "true":
  import torch  # noqa: F401  (fails loudly if the dev extra did not install it)
