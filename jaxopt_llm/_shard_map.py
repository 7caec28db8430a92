"""Helpers for code that may run inside ``jax.shard_map``: which mesh axes a value varies over.

``shard_map`` tracks, for every value, the mesh axes over which it differs between devices
("varying manual axes"). Loop carries must vary over the same axes as their updates, and a
gradient taken with respect to a replicated (non-varying) input is summed over the devices by
JAX itself. The two functions here let the fused cross-entropy and Sophia's estimators keep
those rules. Outside ``shard_map`` every value varies over no axis and ``as_varying`` returns
its input unchanged.

One home for what used to be two copies (``losses/fused.py``, ``optim/hessian.py``) that read
different attributes of the abstract value.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax


def varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` varies inside ``shard_map`` (empty elsewhere)."""
  aval = jax.typeof(x)
  # jax >= 0.9 describes them as a ManualAxisType; jax 0.7-0.8 as the ``vma`` set.
  kind = getattr(aval, "manual_axis_type", None)
  if kind is not None:
    return frozenset(kind.varying)
  return frozenset(getattr(aval, "vma", ()))


def tree_varying_axes(*trees: Any) -> frozenset:
  """The union of ``varying_axes`` over every leaf of ``trees``."""
  return frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(trees)))


def as_varying(tree: Any, axes: Any) -> Any:
  """Every leaf of ``tree`` marked as device-varying over ``axes`` (where it is not already).

  ``axes``: one axis name or an iterable of them. A no-op outside ``shard_map`` and under
  ``pmap`` (which does not track varying axes).
  """
  if isinstance(axes, str) or not isinstance(axes, Iterable):
    axes = (axes,)
  axes = tuple(axes)

  def one(x):
    missing = tuple(sorted(a for a in axes if a not in varying_axes(x)))
    if not missing:
      return x
    # jax >= 0.8 spells the cast ``pcast(..., to="varying")``; jax 0.7 had ``pvary``.
    if hasattr(jax.lax, "pcast"):
      return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)

  return jax.tree.map(one, tree)
