"""Multi-device training: a device mesh, a sharded batch, and sharded params / optimizer state.

Two engines, both generic over a ``loss_fn(params, batch) -> loss`` and any
``optax.GradientTransformation`` (ours, optax's, and compositions such as ``optax.chain``,
``optax.MultiSteps`` and ``optax.inject_hyperparams``):

* **jit + NamedSharding** (``plan_shardings``, ``make_train_step``, ``shard_step``). The mesh
  has two named axes, ``("data", "model")``: ``"data"`` splits the batch (and, with ZeRO or
  FSDP, the optimizer state / params), ``"model"`` is left for tensor parallelism (size 1 unless
  asked for; give params ``base_specs`` that use it). Three modes:

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
  dimension (scalars such as ``count``, a bias of odd length) stays replicated.

* **pmap** (``make_pmap_train_step``, ``replicate``, ``unreplicate``, ``split_batch``): the
  classic data-parallel step. Each device takes ``batch / n`` examples; the gradients and the
  loss are averaged with ``lax.pmean`` over ``axis_name`` before the optimizer update, so every
  replica applies the same update and the params stay identical. (Since JAX 0.8 ``pmap``
  itself runs on ``jit`` + ``shard_map``; prefer the jit engine for new code.)

**The state follows the params.** ``opt_state_shardings`` finds the optimizer-state subtrees
that mirror the params (``mu``, ``nu``, a momentum ``trace``, ``MultiSteps``' ``acc_grads``,
...) with ``optax.tree_utils.tree_map_params``, which initialises the optimizer on a
placeholder and sees where the placeholder lands. Each mirrored leaf takes its param's
sharding (FSDP, replicated) or its param's spec plus the data axis (ZeRO-1). Leaves that are
not param mirrors (step counts, injected hyperparameters) are replicated when scalar, and
split by the largest-divisible-dimension rule otherwise. If an optimizer's ``init`` cannot run
on the placeholder, subtrees with the params' tree structure and shapes are taken as mirrors.

**Averaging beyond the gradient.** Anything else computed from the batch inside the step must
be averaged too. Sophia's Hessian estimators (``jaxopt_llm.optim.hessian``) take an
``axis_name`` argument for that: under ``pmap`` pass the step's ``axis_name`` (and the same
PRNG key on every device) from the ``update_fn`` hook, e.g.::

  def update_fn(grads, opt_state, params, batch, key, step):
    estimate = lambda p: hessian.gauss_newton_bartlett(
        lambda q: logits_fn(q, batch), p, key, axis_name="data")
    return hessian.update_every_k(tx, grads, opt_state, params, step=step,
                                  estimate_fn=estimate, k=10)

  step_fn = make_pmap_train_step(loss_fn, tx, update_fn=update_fn)
  params, opt_state, loss = step_fn(params, opt_state, split_batch(batch), key, step)

Under ``jit`` with a sharded global batch the estimators need no ``axis_name``: the
computation is already global (and with ``jax_threefry_partitionable``, the default, the
sampled labels are the same as on one device). Token losses with masks
(``ignore_index``) are means over *valid* tokens: under pmap the mean of per-device means
equals the global mean only when every device has the same number of valid tokens; otherwise
return a sum from ``loss_fn`` and divide by a ``lax.psum`` of the counts. The jit engine has
no such caveat.

**Equal up to rounding.** A sharded step sums the gradient in another order than one device
(differences ~1e-7 relative). Optimizers that normalise per coordinate amplify that where a
gradient is near zero: Adam's ``m / sqrt(v)`` and, most of all, the ``sign`` in Lion and
Sophia, which moves a parameter whose true gradient is 0 by ``+-lr`` on rounding noise alone.
(A transformer's attention *key bias* is such a parameter: softmax ignores a shift shared by
all keys, so its gradient is exactly 0 in theory and noise in practice; it never changes the
model's output.) Compare sharded and single-device runs on losses, or on params whose
gradients are not near zero.

**Many hosts.** Call ``jax.distributed.initialize()`` first on every process; ``jax.devices()``
then lists every device of every host and ``make_mesh`` spans them all. ``shard_batch`` takes
each process's *local* slice of the batch on multi-process runs (via
``jax.make_array_from_process_local_data``). Tested here on 8 virtual CPU devices of one
process only.

References: JAX "Distributed arrays and automatic parallelization" and "Introduction to
parallel programming" guides; Rajbhandari et al., "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models" (2020); Zhao et al., "PyTorch FSDP" (2023).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxopt_llm._validation import check_choice, check_int

DATA_AXIS = "data"
MODEL_AXIS = "model"
MODES = ("replicated", "zero1", "fsdp")

PyTree = Any
LossFn = Callable[..., Any]
UpdateFn = Callable[..., tuple[Any, Any]]

__all__ = [
    "DATA_AXIS", "MODEL_AXIS", "MODES", "ShardingPlan",
    "make_mesh", "zero_spec", "param_shardings", "opt_state_shardings", "plan_shardings",
    "train_state_shardings", "shard_batch", "place_params", "init_opt_state", "shard_step",
    "make_train_step", "bytes_per_device",
    "replicate", "unreplicate", "split_batch", "make_pmap_train_step",
]


# --------------------------------------------------------------------------------------------
# Mesh


def make_mesh(devices: Union[None, int, Sequence[Any]] = None, *, data: Optional[int] = None,
              model: int = 1) -> Mesh:
  """A ``("data", "model")`` mesh of shape ``(data, model)``.

  Args:
    devices: ``None`` for every device (``jax.devices()``, all hosts after
      ``jax.distributed.initialize``), an int n for the first n of them, or a list of devices.
    data: size of the data axis; default ``len(devices) // model``. With ``devices=None`` the
      first ``data * model`` devices are used.
    model: size of the model (tensor-parallel) axis, default 1.

  Raises:
    ValueError: more devices requested than exist, or ``data * model`` not equal to the
      number of devices given.
  """
  owner = "make_mesh"
  check_int(owner, "model", model, lo=1)
  if data is not None:
    check_int(owner, "data", data, lo=1)
  available = jax.devices()
  if devices is None:
    if data is None:
      devs = list(available)
    else:
      if data * model > len(available):
        raise ValueError(
            f"{owner}: `data` * `model` = {data} * {model} = {data * model} devices requested, "
            f"but only {len(available)} exist")
      devs = list(available[:data * model])
  elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if devices < 1 or devices > len(available):
      raise ValueError(
          f"{owner}: `devices` must be in [1, {len(available)}] (the number of devices that "
          f"exist), got {devices}")
    devs = list(available[:devices])
  else:
    devs = list(devices)
    if not devs:
      raise ValueError(f"{owner}: `devices` must not be empty")
    if len(set(devs)) != len(devs):
      raise ValueError(f"{owner}: `devices` lists a device twice: {devs}")
  n = len(devs)
  if data is None:
    if n % model:
      raise ValueError(
          f"{owner}: `model` = {model} must divide the number of devices, {n}")
    data = n // model
  if data * model != n:
    raise ValueError(
        f"{owner}: `data` * `model` = {data} * {model} = {data * model} must equal the number "
        f"of devices, {n}")
  # jax.make_mesh orders the devices for the physical topology (ICI rings on TPU, NVLink
  # islands on GPU); Auto axes let XLA propagate shardings we do not pin.
  return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devs)


def _axis_size(owner: str, mesh: Mesh, axis: str) -> int:
  if axis not in mesh.axis_names:
    raise ValueError(f"{owner}: `axis` must be one of the mesh axes {mesh.axis_names}, "
                     f"got {axis!r}")
  return int(mesh.shape[axis])


# --------------------------------------------------------------------------------------------
# Partition specs


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


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
  size = _axis_size(owner, mesh, axis)
  if base_specs is None:
    base_specs = jax.tree.map(lambda _: PartitionSpec(), params)

  def one(p, base):
    spec = zero_spec(_shape(p), size, axis=axis, base=base) if mode == "fsdp" else base
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, params, base_specs)


def _map_mirrors_by_structure(state: PyTree, params: PyTree, f: Callable,
                              other: Callable) -> PyTree:
  """Fallback for ``tree_map_params``: a subtree with the params' structure and shapes."""
  treedef = jax.tree.structure(params)
  shapes = [_shape(p) for p in jax.tree.leaves(params)]

  def is_mirror(x):
    if jax.tree.structure(x) != treedef:
      return False
    return [_shape(l) for l in jax.tree.leaves(x)] == shapes

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
  size = _axis_size(owner, mesh, axis)
  if params_sharding is None:
    params_sharding = param_shardings(params, mesh, mode, axis=axis)
  if opt_state is None:
    opt_state = jax.eval_shape(optimizer.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def other(leaf):
    shape = _shape(leaf)
    if mode == "replicated" or not shape:
      return replicated
    return NamedSharding(mesh, zero_spec(shape, size, axis=axis))

  def mirror(leaf, param, sharding):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    if _shape(leaf) != _shape(param):  # e.g. factored second moments: not a copy of the param
      return other(leaf)
    if mode == "zero1":
      return NamedSharding(sharding.mesh, zero_spec(_shape(leaf), size, axis=axis,
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
  size = _axis_size(owner, mesh, axis)
  p_sh = param_shardings(params, mesh, mode, axis=axis, base_specs=base_specs)
  s_sh = opt_state_shardings(optimizer, params, mesh, mode, params_sharding=p_sh, axis=axis)
  if mode == "zero1":
    g_sh = jax.tree.map(
        lambda p, s: NamedSharding(mesh, zero_spec(_shape(p), size, axis=axis, base=s.spec)),
        params, p_sh)
  else:
    g_sh = p_sh
  return ShardingPlan(mesh=mesh, mode=mode, axis=axis, params=p_sh, opt_state=s_sh,
                      grads=g_sh, batch=NamedSharding(mesh, PartitionSpec(axis)),
                      replicated=NamedSharding(mesh, PartitionSpec()))


def train_state_shardings(state: Any, plan: ShardingPlan) -> Any:
  """Shardings for a whole train state: ``plan``'s for its params and opt_state, else replicated.

  ``state`` is any container with ``params`` and ``opt_state`` fields: a NamedTuple (e.g.
  ``jaxopt_llm.train.loop.TrainState``), a ``flax.struct`` dataclass (Flax's
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
# Placing data


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: str = DATA_AXIS) -> PyTree:
  """Each leaf's leading (batch) dimension split over ``axis`` of ``mesh``.

  Single process: ``batch`` is the global batch. Many processes: ``batch`` is this process's
  local slice, and the global batch is their concatenation in process order.

  Raises:
    ValueError: a leaf is a scalar, or its batch dimension is not divisible by the size of
      ``axis``.
  """
  owner = "shard_batch"
  size = _axis_size(owner, mesh, axis)
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  local = jax.process_count() > 1
  # Each process feeds its own devices: its slice must split evenly over them.
  divisor = size // jax.process_count() if local and size % jax.process_count() == 0 else size
  what = (f"this process's share of the {axis!r} mesh axis" if local
          else f"the size of the {axis!r} mesh axis")

  def one(path, x):
    shape = _shape(x)
    where = jax.tree_util.keystr(path) or "the batch"
    if not shape:
      raise ValueError(f"{owner}: every leaf of `batch` needs a leading batch dimension; "
                       f"{where} is a scalar")
    if shape[0] % divisor:
      raise ValueError(
          f"{owner}: the batch size of `batch` ({where} has shape {shape}) must be divisible "
          f"by {what}, {divisor}")
    if local:
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map_with_path(one, batch)


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


# --------------------------------------------------------------------------------------------
# jit + shardings


def shard_step(step_fn: Callable, plan: ShardingPlan, *, donate: bool = True,
               compiler_options: Optional[dict] = None) -> Callable:
  """``jit`` of any ``step_fn(params, opt_state, batch, *rest) -> (params, opt_state, aux)``.

  ``params`` and ``opt_state`` enter and leave in ``plan``'s layout (donated, so the old
  buffers are reused, unless ``donate=False``), ``batch`` split over the data axis, ``rest``
  (a PRNG key, a step number, ...) and ``aux`` (loss, metrics) replicated. The way to run an
  existing train step on many devices: its body is unchanged, the batch is global, and XLA
  inserts the collectives (gradient all-reduce or reduce-scatter, param all-gather).
  ``compiler_options`` go to ``jax.jit`` (e.g. ``{"xla_backend_optimization_level": 0}``
  trades step speed for compile time in tests).
  """
  cache: dict[int, Callable] = {}

  def get(n_rest: int) -> Callable:
    if n_rest not in cache:
      cache[n_rest] = jax.jit(
          step_fn,
          in_shardings=(plan.params, plan.opt_state, plan.batch) + (plan.replicated,) * n_rest,
          out_shardings=(plan.params, plan.opt_state, plan.replicated),
          donate_argnums=(0, 1) if donate else (),
          compiler_options=compiler_options)
    return cache[n_rest]

  def stepped(params, opt_state, batch, *rest):
    return get(len(rest))(params, opt_state, batch, *rest)

  stepped.lower = lambda params, opt_state, batch, *rest: get(len(rest)).lower(
      params, opt_state, batch, *rest)
  return stepped


def _loss_and_grads(loss_fn: LossFn, has_aux: bool, params: PyTree, batch: PyTree):
  out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
  return out, grads


def _update(optimizer: optax.GradientTransformation, update_fn: Optional[UpdateFn],
            grads: PyTree, opt_state: PyTree, params: PyTree, batch: PyTree, rest: tuple):
  if update_fn is None:
    return optimizer.update(grads, opt_state, params)
  return update_fn(grads, opt_state, params, batch, *rest)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    plan: ShardingPlan, *, has_aux: bool = False, donate: bool = True,
                    update_fn: Optional[UpdateFn] = None,
                    compiler_options: Optional[dict] = None) -> Callable:
  """A jitted ``step(params, opt_state, batch, *rest) -> (params, opt_state, loss)``.

  One step of ``params <- params + optimizer.update(grad loss_fn(params, batch))`` on the
  global ``batch`` (from ``shard_batch``), laid out by ``plan`` (see ``shard_step``).
  With ``has_aux`` the loss function returns ``(loss, aux)`` and the step returns it so.

  ``update_fn(grads, opt_state, params, batch, *rest) -> (updates, opt_state)`` replaces the
  plain ``optimizer.update(grads, opt_state, params)`` when the update needs more: Sophia's
  ``hessian.update_every_k`` with an estimator over ``batch``, extra arguments of an
  ``optax.GradientTransformationExtraArgs``. ``rest`` (e.g. a PRNG key and the step number)
  is passed through from the step's call.
  """

  def step(params, opt_state, batch, *rest):
    out, grads = _loss_and_grads(loss_fn, has_aux, params, batch)
    # In ZeRO-1 this pins the gradient to the state's layout: XLA reduce-scatters it instead
    # of all-reducing, and the optimizer arithmetic runs on 1/n of each leaf per device.
    grads = jax.lax.with_sharding_constraint(grads, plan.grads)
    updates, opt_state = _update(optimizer, update_fn, grads, opt_state, params, batch, rest)
    params = optax.apply_updates(params, updates)
    return params, opt_state, out

  return shard_step(step, plan, donate=donate, compiler_options=compiler_options)


# --------------------------------------------------------------------------------------------
# pmap


def _pmap_devices(devices: Optional[Sequence[Any]]) -> list:
  return list(jax.local_devices() if devices is None else devices)


def _stacked_sharding(devices: Sequence[Any], axis_name: str) -> NamedSharding:
  """The layout pmap gives its outputs: slice i of the leading axis on device i.

  Same mesh axis name as the step's ``axis_name``: pmap keys its compiled program on the
  input shardings, so any other layout costs a second compilation at step 2.
  """
  return NamedSharding(Mesh(np.array(devices), (axis_name,)), PartitionSpec(axis_name))


def replicate(tree: PyTree, devices: Optional[Sequence[Any]] = None, *,
              axis_name: str = DATA_AXIS) -> PyTree:
  """One copy of every leaf per device, stacked on a new leading axis (for ``pmap``).

  ``axis_name`` should be the step's (it names the layout, see ``make_pmap_train_step``).
  """
  devs = _pmap_devices(devices)
  n = len(devs)
  # Broadcasting on the host is a view: each device receives one copy, the host makes none.
  sharding = _stacked_sharding(devs, axis_name)

  def one(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x, (n,) + x.shape), sharding)

  return jax.tree.map(one, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """The first replica of every leaf (the inverse of ``replicate``)."""
  return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: PyTree, n: Optional[int] = None, *,
                devices: Optional[Sequence[Any]] = None, axis_name: str = DATA_AXIS) -> PyTree:
  """Each leaf's leading dimension ``B`` reshaped to ``(n, B // n)``, slice i on device i.

  ``n`` defaults to the number of ``devices`` (default ``jax.local_devices()``); the slices
  are placed where ``pmap`` expects them, so the step moves no data between devices.

  Raises:
    ValueError: ``n`` < 1 or not the number of devices, a scalar leaf, or ``B`` not divisible
      by ``n``.
  """
  owner = "split_batch"
  devs = _pmap_devices(devices)
  if n is None:
    n = len(devs)
  check_int(owner, "n", n, lo=1)
  if n != len(devs):
    if n > len(jax.local_devices()):
      raise ValueError(f"{owner}: `n` = {n} is more than the {len(jax.local_devices())} local "
                       "devices")
    devs = devs[:n] if devices is None else devs
    if n != len(devs):
      raise ValueError(f"{owner}: `n` = {n} must equal the number of `devices`, {len(devs)}")
  sharding = _stacked_sharding(devs, axis_name)

  def one(path, x):
    shape = _shape(x)
    where = jax.tree_util.keystr(path) or "the batch"
    if not shape or shape[0] % n:
      raise ValueError(
          f"{owner}: the batch size of `batch` ({where} has shape {shape}) must be divisible "
          f"by the number of devices, {n}")
    return jax.device_put(np.reshape(np.asarray(x), (n, shape[0] // n) + shape[1:]), sharding)

  return jax.tree_util.tree_map_with_path(one, batch)


def make_pmap_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                         axis_name: str = DATA_AXIS, devices: Optional[Sequence[Any]] = None,
                         has_aux: bool = False, donate: bool = True,
                         update_fn: Optional[UpdateFn] = None) -> Callable:
  r"""A ``pmap``-ed ``step(params, opt_state, batch, *rest) -> (params, opt_state, loss)``.

  ``params`` and ``opt_state`` are replicated (``replicate``), ``batch`` is split
  (``split_batch``), ``rest`` is broadcast to every device. On each device:

  .. math::
    g = \operatorname{pmean}_{axis}\ \nabla_p\, \text{loss\_fn}(p, \text{batch}_i),\qquad
    p \leftarrow p + \text{optimizer.update}(g)

  so the update equals the single-device one on the whole batch (when ``loss_fn`` is a mean
  over equally many items per device; see the module doc for masked token losses). The loss
  (and ``aux``, with ``has_aux``) is ``pmean``-ed too.

  ``update_fn(grads, opt_state, params, batch, *rest) -> (updates, opt_state)``, as in
  ``make_train_step``, runs per device on the device's ``batch`` slice and the averaged
  ``grads``: anything it estimates from the batch must be averaged over ``axis_name`` itself,
  e.g. pass ``axis_name`` (and the same key on every device) to Sophia's Hessian estimator;
  the module docstring has the recipe.
  """

  def step(params, opt_state, batch, *rest):
    out, grads = _loss_and_grads(loss_fn, has_aux, params, batch)
    grads = jax.lax.pmean(grads, axis_name)
    out = jax.lax.pmean(out, axis_name)
    updates, opt_state = _update(optimizer, update_fn, grads, opt_state, params, batch, rest)
    params = optax.apply_updates(params, updates)
    return params, opt_state, out

  cache: dict[int, Callable] = {}

  def stepped(params, opt_state, batch, *rest):
    n_rest = len(rest)
    if n_rest not in cache:
      cache[n_rest] = jax.pmap(
          step, axis_name=axis_name, devices=devices,
          in_axes=(0, 0, 0) + (None,) * n_rest,
          donate_argnums=(0, 1) if donate else ())
    return cache[n_rest](params, opt_state, batch, *rest)

  return stepped
