"""The pmap engine: the classic data-parallel step, one replica per device.

``make_pmap_train_step``, ``replicate``, ``unreplicate``, ``split_batch``. Each device takes
``batch / n`` examples; the gradients and the loss are averaged with ``lax.pmean`` over
``axis_name`` before the optimizer update, so every replica applies the same update and the
params stay identical. (Since JAX 0.8 ``pmap`` itself runs on ``jit`` + ``shard_map``; prefer
the jit engine, ``jaxopt_llm.parallel.jit_step``, for new code.) pmap spans this process's
devices only (``jax.local_devices()``).

**Averaging beyond the gradient.** Anything else computed from the batch inside the step must
be averaged too. Sophia's Hessian estimators (``jaxopt_llm.optim.hessian``) take an
``axis_name`` argument for that: pass the step's ``axis_name`` (and the same PRNG key on
every device) from the ``update_fn`` hook, e.g.::

  def update_fn(grads, opt_state, params, batch, key, step):
    estimate = lambda p: hessian.gauss_newton_bartlett(
        lambda q: logits_fn(q, batch), p, key, axis_name="data")
    return hessian.update_every_k(tx, grads, opt_state, params, step=step,
                                  estimate_fn=estimate, k=10)

  step_fn = make_pmap_train_step(loss_fn, tx, update_fn=update_fn)
  params, opt_state, loss = step_fn(params, opt_state, split_batch(batch), key, step)

Token losses with masks (``ignore_index``) are means over *valid* tokens: the mean of
per-device means equals the global mean only when every device has the same number of valid
tokens; otherwise return a sum from ``loss_fn`` and divide by a ``lax.psum`` of the counts.
The jit engine has no such caveat.

References: JAX "Introduction to parallel programming".
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_llm._validation import check_int
from jaxopt_llm.parallel._common import LossFn, PyTree, UpdateFn, gradient_step, leaf_shape
from jaxopt_llm.parallel.mesh import DATA_AXIS

__all__ = ["replicate", "unreplicate", "split_batch", "make_pmap_train_step"]


def _pmap_devices(devices: Optional[Sequence[Any]], owner: str = "replicate") -> list:
  devs = list(jax.local_devices() if devices is None else devices)
  if not devs:
    raise ValueError(f"{owner}: `devices` must name at least one device, got {devices!r}")
  return devs


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

  def first(x):
    if np.ndim(x) == 0:
      raise ValueError("unreplicate: every leaf must have a leading replica axis (the output "
                       f"of `replicate` or of a pmapped step), got a scalar {x!r}")
    return x[0]

  return jax.tree.map(first, tree)


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
  devs = _pmap_devices(devices, owner)
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
    shape = leaf_shape(x)
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

  def make_global(out, grads):
    return jax.lax.pmean(out, axis_name), jax.lax.pmean(grads, axis_name)

  step = gradient_step(loss_fn, optimizer, has_aux=has_aux, update_fn=update_fn,
                       make_global=make_global)
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
