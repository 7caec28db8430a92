"""Sharding plans: where the params, the optimizer state, the gradients and the batch live.

Three modes for the jit engine (``jaxopt_llm.parallel.jit_step``):

- ``"replicated"``: plain data parallelism. Every device holds the params and the whole
  optimizer state; XLA all-reduces the gradients.
- ``"zero1"`` (ZeRO stage 1, Rajbhandari et al., 2020): params replicated, every optimizer
  state leaf that mirrors a param is split over ``"data"`` along one dimension, so each of
  the n devices keeps 1/n of Adam's ``mu`` and ``nu``. The gradients are constrained to the
  same layout (a reduce-scatter instead of an all-reduce), the update runs on shards, and
  the new params are all-gathered.
- ``"fsdp"`` (fully sharded data parallel, ZeRO-3 style): params sharded like that too, and
  the state follows them leaf by leaf; XLA all-gathers a param where a matmul needs it.

Which dimension: for each leaf the *largest* dimension divisible by the data-axis size (the
first such on ties) that the leaf's own spec does not already use; a leaf with no such
dimension (scalars such as ``count``, a bias of odd length) stays replicated (``zero_spec``).

**The state follows the params.** ``opt_state_shardings`` finds the optimizer-state subtrees
that mirror the params (``mu``, ``nu``, a momentum ``trace``, ``MultiSteps``' ``acc_grads``,
...) with ``optax.tree_utils.tree_map_params``, which initialises the optimizer on a
placeholder and sees where the placeholder lands. Each mirrored leaf takes its param's
sharding (FSDP, replicated) or its param's spec plus the data axis (ZeRO-1). Leaves that are
not param mirrors (step counts, injected hyperparameters) are replicated when scalar, and
split by the largest-divisible-dimension rule otherwise. If an optimizer's ``init`` cannot run
on the placeholder, subtrees with the params' tree structure and shapes are taken as mirrors.

**Placing.** ``place_params`` and ``init_opt_state`` create the params and the state directly
in the plan's layout (no device ever holds more than its share); ``bytes_per_device``
measures what each device really holds, from the arrays' ``addressable_shards``.

References: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models" (2020); Zhao et al., "PyTorch FSDP" (2023); JAX "Distributed arrays and
automatic parallelization".
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_llm._validation import check_choice, check_int
from jaxopt_llm.parallel._common import PyTree, leaf_shape
from jaxopt_llm.parallel.mesh import DATA_AXIS, mesh_axis_size

MODES = ("replicated", "zero1", "fsdp")

__all__ = [
    "MODES", "ShardingPlan", "zero_spec", "param_shardings", "opt_state_shardings",
    "plan_shardings", "train_state_shardings", "place_params", "init_opt_state",
    "bytes_per_device",
]


def _uses(entry: Any, axis: str) -> bool:
  return entry == axis or (isinstance(entry, tuple) and axis in entry)


def _canonical(entries: Sequence[Any]) -> PartitionSpec:
  entries = list(entries)
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def zero_spec(shape: Sequence[int], axis_size: int, *, axis: str = DATA_AXIS,
              base: Optional[PartitionSpec] = None) -> PartitionSpec:
  """``base`` (default: replicated) with ``axis`` added on the largest free divisible dim.

  The chosen dimension is the largest ``d`` with ``d % axis_size == 0`` among those ``base``
  leaves unsharded (the first on ties); each device then holds ``1 / axis_size`` of the leaf.
  Without such a dimension (scalars, odd sizes) ``base`` is returned unchanged, i.e. the leaf
  is replicated over ``axis``. Also unchanged when ``base`` already uses ``axis`` or
  ``axis_size == 1``. Trailing ``None``s are dropped, so equal layouts compare equal.
  """
  check_int("zero_spec", "axis_size", axis_size, lo=1)
  if isinstance(shape, (str, bytes)) or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape):
    raise ValueError(f"zero_spec: `shape` must be a sequence of integers, got {shape!r}")
  shape = tuple(int(d) for d in shape)
  entries = list(base or ())
  if len(entries) > len(shape):
    raise ValueError(f"zero_spec: `base` {base} has more entries than the shape {shape}")
  entries += [None] * (len(shape) - len(entries))
  if axis_size == 1 or any(_uses(e, axis) for e in entries):
    return _canonical(entries)
  free = [i for i, d in enumerate(shape) if entries[i] is None and d > 0 and d % axis_size == 0]
  if free:
    best = max(free, key=lambda i: (shape[i], -i))
    entries[best] = axis
  return _canonical(entries)


def param_shardings(params: PyTree, mesh: Mesh, mode: str = "replicated", *,
                    axis: str = DATA_AXIS, base_specs: Optional[PyTree] = None) -> PyTree:
  """A ``NamedSharding`` per param: ``base_specs`` (default replicated), plus ``axis`` in FSDP.

  ``params`` may hold arrays or ``jax.ShapeDtypeStruct``s. ``base_specs``, a pytree of
  ``PartitionSpec`` with the params' structure, lays params over other mesh axes (e.g.
  ``"model"`` for tensor parallelism); the modes add the data axis on top.
  """
  owner = "param_shardings"
  check_choice(owner, "mode", mode, MODES)
  size = mesh_axis_size(owner, mesh, axis)
  if base_specs is None:
    base_specs = jax.tree.map(lambda _: PartitionSpec(), params)

  def one(p, base):
    spec = zero_spec(leaf_shape(p), size, axis=axis, base=base) if mode == "fsdp" else base
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, params, base_specs)


def _map_mirrors_by_structure(state: PyTree, params: PyTree, f: Callable,
                              other: Callable) -> PyTree:
  """Fallback for ``tree_map_params``: a subtree with the params' structure and shapes."""
  treedef = jax.tree.structure(params)
  shapes = [leaf_shape(p) for p in jax.tree.leaves(params)]

  def is_mirror(x):
    if jax.tree.structure(x) != treedef:
      return False
    return [leaf_shape(l) for l in jax.tree.leaves(x)] == shapes

  def visit(x):
    if is_mirror(x):
      return f(x)
    return jax.tree.map(other, x)

  return jax.tree.map(visit, state, is_leaf=is_mirror)


def opt_state_shardings(optimizer: optax.GradientTransformation, params: PyTree, mesh: Mesh,
                        mode: str = "replicated", *, params_sharding: Optional[PyTree] = None,
                        axis: str = DATA_AXIS, opt_state: Optional[PyTree] = None) -> PyTree:
  """A ``NamedSharding`` per optimizer-state leaf, following the params' shardings.

  A state leaf that mirrors a param (same place in a params-shaped subtree, same shape) gets
  the param's sharding in ``"replicated"`` and ``"fsdp"`` modes, and the param's spec plus
  ``axis`` (``zero_spec``) in ``"zero1"``. Other leaves: replicated if scalar or in
  ``"replicated"`` mode, else ``zero_spec`` of their shape.

  Args:
    optimizer: the transformation whose ``init`` built (or will build) the state.
    params: the params (arrays or ``ShapeDtypeStruct``s).
    mesh: from ``make_mesh``.
    mode: one of ``MODES``.
    params_sharding: the params' shardings; default ``param_shardings(params, mesh, mode)``.
    axis: the data axis.
    opt_state: the state, or its ``jax.eval_shape``; default ``eval_shape(optimizer.init)``.
  """
  owner = "opt_state_shardings"
  check_choice(owner, "mode", mode, MODES)
  size = mesh_axis_size(owner, mesh, axis)
  if params_sharding is None:
    params_sharding = param_shardings(params, mesh, mode, axis=axis)
  if opt_state is None:
    opt_state = jax.eval_shape(optimizer.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def other(leaf):
    shape = leaf_shape(leaf)
    if mode == "replicated" or not shape:
      return replicated
    return NamedSharding(mesh, zero_spec(shape, size, axis=axis))

  def mirror(leaf, param, sharding):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    # e.g. factored second moments: not a copy of the param
    if leaf_shape(leaf) != leaf_shape(param):
      return other(leaf)
    if mode == "zero1":
      return NamedSharding(sharding.mesh, zero_spec(leaf_shape(leaf), size, axis=axis,
                                                    base=sharding.spec))
    return sharding

  try:
    return optax.tree_utils.tree_map_params(
        optimizer, mirror, opt_state, params, params_sharding,
        transform_non_params=lambda subtree: jax.tree.map(other, subtree),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  except (TypeError, AttributeError, KeyError, IndexError):  # init rejects the placeholder
    return _map_mirrors_by_structure(
        opt_state, params,
        lambda sub: jax.tree.map(mirror, sub, params, params_sharding), other)


class ShardingPlan(NamedTuple):
  """Where everything of a jit train step lives. Build with ``plan_shardings``.

  Attributes:
    mesh: the device mesh.
    mode: ``"replicated"``, ``"zero1"`` or ``"fsdp"``.
    axis: the data axis.
    params: a ``NamedSharding`` per param.
    opt_state: a ``NamedSharding`` per optimizer-state leaf.
    grads: the layout the gradients are constrained to before the update (the params' layout
      plus the data axis in ZeRO-1, so the update runs on shards).
    batch: leading dimension split over the data axis.
    replicated: the fully replicated sharding (scalars, metrics).
  """
  mesh: Mesh
  mode: str
  axis: str
  params: PyTree
  opt_state: PyTree
  grads: PyTree
  batch: NamedSharding
  replicated: NamedSharding


def plan_shardings(optimizer: optax.GradientTransformation, params: PyTree, mesh: Mesh,
                   mode: str = "replicated", *, axis: str = DATA_AXIS,
                   base_specs: Optional[PyTree] = None) -> ShardingPlan:
  """Shardings of params, optimizer state, gradients and batch for ``mode`` (see module doc)."""
  owner = "plan_shardings"
  check_choice(owner, "mode", mode, MODES)
  size = mesh_axis_size(owner, mesh, axis)
  p_sh = param_shardings(params, mesh, mode, axis=axis, base_specs=base_specs)
  s_sh = opt_state_shardings(optimizer, params, mesh, mode, params_sharding=p_sh, axis=axis)
  if mode == "zero1":
    g_sh = jax.tree.map(
        lambda p, s: NamedSharding(mesh, zero_spec(leaf_shape(p), size, axis=axis,
                                                   base=s.spec)),
        params, p_sh)
  else:
    g_sh = p_sh
  return ShardingPlan(mesh=mesh, mode=mode, axis=axis, params=p_sh, opt_state=s_sh,
                      grads=g_sh, batch=NamedSharding(mesh, PartitionSpec(axis)),
                      replicated=NamedSharding(mesh, PartitionSpec()))


def train_state_shardings(state: Any, plan: ShardingPlan) -> Any:
  """Shardings for a whole train state: ``plan``'s for its params and opt_state, else replicated.

  ``state`` is any container with ``params`` and ``opt_state`` fields: a NamedTuple (e.g.
  ``jaxopt_llm.train.step.TrainState``), a ``flax.struct`` dataclass (Flax's
  ``TrainState``), or a dict. Every other leaf (step counters, PRNG keys, loss statistics)
  is replicated. Use as ``jax.jit(step, in_shardings=(sh, plan.batch), out_shardings=(sh,
  plan.replicated), donate_argnums=0)`` with ``sh = train_state_shardings(state, plan)``.
  """
  fields = dict(params=plan.params, opt_state=plan.opt_state)
  if isinstance(state, dict):
    missing = [k for k in fields if k not in state]
    placed = {**state, **fields}
  else:
    missing = [k for k in fields if not hasattr(state, k)]
    if hasattr(state, "_replace"):
      placed = None if missing else state._replace(**fields)
    elif hasattr(state, "replace"):
      placed = None if missing else state.replace(**fields)
    else:
      raise ValueError("train_state_shardings: `state` must be a NamedTuple, a flax.struct "
                       f"dataclass or a dict, got {type(state).__name__}")
  if missing:
    raise ValueError(f"train_state_shardings: `state` has no field(s) {missing}")
  return jax.tree.map(lambda x: x if isinstance(x, NamedSharding) else plan.replicated, placed)


# --------------------------------------------------------------------------------------------
# Placing


def place_params(params: PyTree, plan: ShardingPlan) -> PyTree:
  """A copy of ``params`` in ``plan.params``' layout, safe to donate to a train step.

  ``jax.device_put`` may hand back arrays that share a buffer with ``params`` (a replicated
  layout reuses the shard already on the right device); donating those to a step would
  delete the caller's ``params``. The copy here never aliases its input.
  """
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=plan.params)(params)


def init_opt_state(optimizer: optax.GradientTransformation, params: PyTree,
                   plan: ShardingPlan) -> PyTree:
  """``optimizer.init(params)`` created directly in ``plan.opt_state``'s layout.

  Under ``jit`` with ``out_shardings`` each device only ever allocates its own shard, so a
  ZeRO-1 / FSDP state never exists in full on one device.
  """
  return jax.jit(optimizer.init, out_shardings=plan.opt_state)(params)


def bytes_per_device(tree: PyTree) -> dict:
  """``{device: bytes}`` held by the arrays of ``tree`` (from their ``addressable_shards``)."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
