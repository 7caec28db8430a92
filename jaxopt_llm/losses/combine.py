"""Weighted sum of named losses, keeping each part for logging.

Training objectives are often ``CE + 1e-4 * z_loss + 0.01 * aux`` (or DPO + an SFT term):
``combine_losses`` adds them up and returns the parts alongside, in one jit-able call.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxopt_llm._validation import check_scalar, is_concrete
from jaxopt_llm.losses._common import compute_dtype


def combine_losses(
    losses: Mapping[str, Any],
    weights: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""``total = sum_k w_k * L_k``, returned with every unweighted ``L_k``.

  Each entry of ``losses`` is either ``name: (loss, weight)`` or ``name: loss``; a bare
  loss takes its weight from ``weights[name]`` when given, else 1.0::

    total, parts = combine_losses({"ce": ce, "z": (z, 1e-4), "aux": (aux, 0.01)})
    # total = ce + 1e-4 * z + 0.01 * aux;  parts = {"ce": ce, "z": z, "aux": aux}

  Losses must be scalars (any floating dtype; summed in float32, or float64 when any
  loss is float64). Weights may be Python
  numbers or (traced) scalar arrays, e.g. a schedule value, so the call jit-compiles and
  ``jax.grad`` of ``total`` is ``sum_k w_k * grad L_k``. A concrete weight of 0 (e.g. a
  Python 0.0) drops the term from ``total`` statically, so a disabled, possibly inf/NaN
  auxiliary loss cannot poison it through ``0 * inf``; the part is still reported. Sums
  follow the mapping's order.

  Args:
    losses: mapping name -> scalar loss, or name -> ``(loss, weight)``.
    weights: optional mapping name -> weight for the bare losses; naming a loss that
      already carries a weight, or one not in ``losses``, is an error.

  Returns:
    ``(total, parts)``: a scalar and a dict name -> scalar (the unweighted losses, in
    the order given), all in that dtype.
  """
  owner = "combine_losses"
  if not isinstance(losses, Mapping) or not losses:
    raise ValueError(f"{owner}: `losses` must be a non-empty mapping name -> loss or "
                     f"(loss, weight), got {type(losses).__name__}")
  weights = dict(weights or {})
  unknown = set(weights) - set(losses)
  if unknown:
    raise ValueError(f"{owner}: `weights` names unknown loss(es) {sorted(unknown)}")
  entries = {}
  for name, entry in losses.items():
    if isinstance(entry, tuple):
      if len(entry) != 2:
        raise ValueError(f"{owner}: `losses[{name!r}]` must be a loss or a (loss, weight) "
                         f"pair, got a tuple of length {len(entry)}")
      if name in weights:
        raise ValueError(f"{owner}: `weights[{name!r}]` given but `losses[{name!r}]` "
                         f"already has a weight")
      value, weight = entry
    else:
      value, weight = entry, weights.get(name, 1.0)
    if isinstance(value, (str, bytes)) or value is None:
      raise ValueError(f"{owner}: `losses[{name!r}]` must be a floating scalar, got "
                       f"{type(value).__name__}")
    value = jnp.asarray(value)
    if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.floating):
      raise ValueError(f"{owner}: `losses[{name!r}]` must be a floating scalar, got "
                       f"dtype {value.dtype} shape {value.shape}")
    check_scalar(owner, f"weights[{name!r}]", weight)
    entries[name] = (value, weight)
  dtype = compute_dtype(*(v for v, _ in entries.values()))
  total = jnp.zeros((), dtype)
  parts = {}
  for name, (value, weight) in entries.items():
    value = value.astype(dtype)
    parts[name] = value
    if is_concrete(weight) and float(weight) == 0.0:
      continue
    total = total + jnp.asarray(weight, dtype) * value
  return total, parts
