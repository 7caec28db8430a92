r"""Hessian-diagonal estimators for Sophia, the every-k train-step helper, and monitors.

Sophia (Liu et al., 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training") preconditions its momentum by an EMA ``h`` of Hessian-diagonal estimates,
refreshed every ``k`` steps (k=10 in the paper). Two estimators:

* ``gauss_newton_bartlett`` (GNB, the official SophiaG's): sample labels from the model's own
  softmax, take the gradient ``g_hat`` of the mean cross-entropy on those labels, return
  ``B * g_hat**2`` with B the number of tokens. With ``J_b`` the Jacobian of token b's logits
  and ``S_b = diag(p_b) - p_b p_b^T`` the Hessian of CE in the logits, Bartlett's second
  identity (the sampled residual ``p_b - onehot(y_b)`` has mean 0 and covariance ``S_b``,
  independently over tokens) gives ``E[B * g_hat**2] = diag((1/B) sum_b J_b^T S_b J_b)``:
  the diagonal of the Gauss-Newton matrix of the mean loss. Always >= 0.
  ``gauss_newton_bartlett_fused`` is the same estimate for a model whose logits are
  ``hidden @ kernel (+ bias)``, from ``head_fn(params) -> (hidden, kernel)``: it samples the
  labels blockwise over the vocabulary (``losses.categorical_from_hidden``) and
  differentiates ``losses.fused_linear_cross_entropy``, so it never builds the ``[N, V]``
  logits either (the trainer uses it when its loss is the fused one).
* ``hutchinson``: ``u * (H u)`` with ``E[u u^T] = I`` (Rademacher or Gaussian ``u``) is an
  unbiased estimate of ``diag(H)`` for any twice-differentiable loss; it can be negative.

Both are pure functions of a closure (``logits_fn(params)`` / ``loss_fn(params)``) and the
params, jit-able, and work on any pytree of params (a dict, a Flax ``nnx.State``...). With
``axis_name`` (inside ``pmap`` / ``shard_map`` over a data axis) every device returns the same,
global estimate: the one a single device would compute on the whole batch.

The every-k recipe, inside ONE jitted train step::

  tx = optim.sophia(learning_rate, rho=0.04, weight_decay=0.1)

  @jax.jit
  def train_step(params, opt_state, batch, key, step):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    estimate = lambda p: hessian.gauss_newton_bartlett(
        lambda q: model_apply(q, batch["inputs"]), p, key, where=batch.get("mask"))
    updates, opt_state = hessian.update_every_k(
        tx, grads, opt_state, params, step=step, estimate_fn=estimate, k=10)
    return optax.apply_updates(params, updates), opt_state, loss

``update_every_k`` branches with ``lax.cond`` on ``step % k == 0``: on the other k-1 steps the
estimator's forward and backward pass is not executed at all, so they cost what an AdamW-like
step costs. The estimate is taken at the current params and folded into ``h`` after this
step's update (the official code estimates right after its step k-1, 2k-1, ...; the
difference is one step's movement of the params). Before the first estimate ``h = 0`` and the
update is ``lr * sign(m)`` (sign momentum). With ``optax.MultiSteps`` pass the estimate on
the micro-step that applies the update (MultiSteps discards the inner state of the others).
For a Flax ``nnx.Optimizer`` the same branch is an ``nnx.cond`` inside ``nnx.jit``::

  def with_estimate(opt, model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    h = hessian.gauss_newton_bartlett(lambda q: nnx.merge(graphdef, q, rest)(x), params, key)
    opt.update(model, grads, hessian=h)

  def without_estimate(opt, model):  # returns None too: cond branches must match
    opt.update(model, grads)

  nnx.cond(hessian.is_estimate_step(step, 10), with_estimate, without_estimate,
           optimizer, model)

Monitoring: ``sophia_win_rate(opt_state)`` (fraction of coordinates not clipped in the last
update), ``sophia_hessian_norm(opt_state)`` and ``sophia_hessian_rejected(opt_state)`` (the
number of non-finite estimates refused so far) find the Sophia state anywhere in an optax
state (chain, ``inject_hyperparams``, ``masked``, ``MultiSteps``, an ``nnx.Optimizer``'s
``opt_state``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm._shard_map import as_varying
from jaxopt_llm._validation import check_choice, check_int, check_scalar
from jaxopt_llm.losses.fused import fused_linear_cross_entropy
from jaxopt_llm.losses.sampling import categorical_from_hidden
from jaxopt_llm.optim.numerics import F32, is_frozen, upcast
from jaxopt_llm.optim.transforms import ScaleBySophiaState

AxisName = Optional[Union[str, Sequence[str]]]
_DISTRIBUTIONS = ("rademacher", "gaussian")


def _axis(axis_name: AxisName) -> Any:
  return tuple(axis_name) if isinstance(axis_name, (list, tuple)) else axis_name


# --------------------------------------------------------------------------------------------
# Estimators


def gauss_newton_bartlett(
    logits_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    where: Optional[jax.Array] = None,
    axis_name: AxisName = None,
    clip_norm: Optional[float] = None,
) -> Any:
  r"""Gauss-Newton-Bartlett estimate of the Hessian diagonal (Sophia's Algorithm 2).

  .. math::
    \hat y_b \sim \operatorname{softmax}(z_b),\qquad
    \hat g = \nabla_\theta \frac{1}{B}\sum_{b} \operatorname{CE}(z_b(\theta), \hat y_b),
    \qquad \hat H = B\,\hat g \odot \hat g

  with B the number of counted tokens. The labels are sampled with ``key`` from the
  (stop-gradient) softmax of the model's own logits, so :math:`\mathbb E[\hat H]` is the
  diagonal of the Gauss-Newton matrix of the mean loss, whatever the true labels.
  It costs one forward and one backward pass (a ``jax.vjp`` of ``logits_fn`` with the
  closed-form cotangent ``(softmax(z) - onehot(y_hat)) / B``), like one training step.

  The official code returns EMA(g_hat**2) and multiplies by the batch size in the optimizer;
  returning ``B * g_hat**2`` here lets ``sophia`` use ``rho * h`` (see ``scale_by_sophia``).

  Args:
    logits_fn: ``params -> logits`` of shape ``[..., V]`` (a closure over the inputs).
    params: the point at which to estimate (any pytree of float arrays).
    key: PRNG key for the label sampling. With ``axis_name`` pass the same key on every
      device: it is folded with the device index so that devices sample independently.
    where: optional boolean (or 0/1 integer) mask of shape ``logits.shape[:-1]``: True where a
      token counts (padding excluded). Default: every token counts.
    axis_name: the data-parallel axis (or axes) when called under ``pmap`` / ``shard_map``:
      the gradient and B are summed over devices, so every device returns the same global
      estimate. Devices may hold different numbers of counted tokens. The params may be
      replicated (``P()`` under ``shard_map``): the local gradient is taken with respect to
      a device-varying copy, so JAX's automatic psum for replicated inputs cannot count it
      twice.
    clip_norm: if given (> 0), ``g_hat`` is first clipped to this global L2 norm, as
      ``torch.nn.utils.clip_grad_norm_`` does (scale ``min(1, clip_norm / (|g_hat| +
      1e-6))``): the official ``train_sophiag.py`` clips the sampled-label gradient with its
      ``grad_clip`` before ``update_hessian()``. Default: no clipping.

  Returns:
    A pytree like ``params`` (float32, or wider) of estimates >= 0. All tokens masked out
    gives zeros (not NaN). A non-float (integer, bool) parameter leaf gets float32 zeros:
    it is not differentiated, and ``sophia`` keeps no curvature for it.
  """
  owner = "gauss_newton_bartlett"
  _check_clip_norm(owner, clip_norm)
  if not callable(logits_fn):
    raise ValueError(f"{owner}: `logits_fn` must be callable params -> logits, got "
                     f"{type(logits_fn).__name__}")
  axis = _axis(axis_name)
  if axis is not None:
    params = as_varying(params, axis)
  logits, vjp_fn = jax.vjp(logits_fn, params)
  if not hasattr(logits, "dtype") or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"{owner}: `logits_fn` must return a floating array [..., V], got "
                     f"{getattr(logits, 'dtype', type(logits).__name__)}")
  if logits.ndim < 1 or logits.shape[-1] < 1:
    raise ValueError(f"{owner}: `logits_fn` must return logits of shape [..., V] with V >= 1, "
                     f"got shape {logits.shape}")
  z = jax.lax.stop_gradient(upcast(logits))
  mask = _token_mask(owner, where, z.shape[:-1], "the logits' without the vocabulary axis")
  labels = jax.random.categorical(_device_key(key, axis), z, axis=-1)
  n_tokens = _count_tokens(mask, axis)
  # d(mean CE)/dz = (softmax(z) - onehot(y)) / B on counted tokens; max(B, 1) keeps an
  # all-masked batch at 0 instead of 0/0.
  scale = mask.astype(z.dtype) / jnp.maximum(n_tokens, 1.0).astype(z.dtype)
  cotangent = (jax.nn.softmax(z, axis=-1)
               - jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)) * scale[..., None]
  (grads,) = vjp_fn(cotangent.astype(logits.dtype))
  return _bartlett_estimate(grads, n_tokens, axis, clip_norm)


def gauss_newton_bartlett_fused(
    head_fn: Callable[[Any], tuple],
    params: Any,
    key: jax.Array,
    *,
    where: Optional[jax.Array] = None,
    axis_name: AxisName = None,
    clip_norm: Optional[float] = None,
    chunk_size: Optional[int] = None,
    block_size: Optional[int] = None,
) -> Any:
  r"""``gauss_newton_bartlett`` from the LM head's input: never the ``[N, V]`` logits.

  For a model whose logits are ``z = h(theta) W(theta) + b(theta)`` (hidden states times
  the head kernel, e.g. a tied embedding), the same estimate as
  :func:`gauss_newton_bartlett`:

  .. math::
    \hat y_b \sim \operatorname{softmax}(z_b),\qquad
    \hat g = \nabla_\theta \frac{1}{B}\sum_{b} \operatorname{CE}(z_b(\theta), \hat y_b),
    \qquad \hat H = B\,\hat g \odot \hat g

  (Liu et al., 2023, Algorithm 2; B the number of counted tokens), computed the way the
  fused loss computes the training loss: the labels are drawn with
  ``losses.categorical_from_hidden`` (Gumbel-max over vocabulary blocks, an exact sample of
  the softmax), and :math:`\hat g` is the gradient of
  ``losses.fused_linear_cross_entropy`` (summed over counted tokens, divided by B) pulled
  back through ``head_fn``. Peak memory is that of a fused-loss training step: an ``[N,
  block_size]`` block for the sampling, a ``[chunk_size, V]`` block for the loss. Clipping,
  ``axis_name`` and the non-float leaves follow :func:`gauss_newton_bartlett` (one shared
  helper computes the psum, the clipping and ``B * g**2`` for both).

  For the same labels the two estimators agree to float rounding (the tests check it); the
  labels themselves differ for the same key (other Gumbel noise, see
  ``categorical_from_hidden``), their distribution does not, so neither does the estimate's.

  Args:
    head_fn: ``params -> (hidden [..., d], kernel [d, V])`` or ``(hidden, kernel, bias
      [V])`` (``bias`` may be None): the LM head's input and its ``[d, V]`` kernel (Flax
      ``Dense`` layout; a tied embedding ``E [V, d]`` is ``E.T``), a closure over the inputs.
      Products run in the dtype it returns them in, with float32 accumulation.
    params: the point at which to estimate (any pytree; non-float leaves get float32 zeros).
    key: PRNG key for the label sampling (with ``axis_name``: the same key on every
      device; it is folded with the device index).
    where: optional boolean (or 0/1 integer) mask of shape ``hidden.shape[:-1]``: True where
      a token counts.
    axis_name: the data-parallel axis (or axes) under ``pmap`` / ``shard_map``: every
      device returns the global estimate (see :func:`gauss_newton_bartlett`).
    clip_norm: as in :func:`gauss_newton_bartlett` (clip ``g_hat`` to this global L2 norm).
    chunk_size: tokens per block of the fused loss (``fused_linear_cross_entropy``'s).
    block_size: vocabulary columns per block of the sampling (``categorical_from_hidden``'s).

  Returns:
    A pytree like ``params`` (float32, or wider) of estimates >= 0; zeros when no token
    counts.
  """
  owner = "gauss_newton_bartlett_fused"
  _check_clip_norm(owner, clip_norm)
  if chunk_size is not None:
    check_int(owner, "chunk_size", chunk_size, lo=1)
  if block_size is not None:
    check_int(owner, "block_size", block_size, lo=1)
  if not callable(head_fn):
    raise ValueError(f"{owner}: `head_fn` must be callable params -> (hidden, kernel[, bias]), "
                     f"got {type(head_fn).__name__}")
  axis = _axis(axis_name)
  if axis is not None:
    params = as_varying(params, axis)
  head, vjp_fn = jax.vjp(head_fn, params)
  hidden, kernel, bias = _head_parts(owner, head)
  mask = _token_mask(owner, where, hidden.shape[:-1], "hidden.shape[:-1]")
  labels = categorical_from_hidden(hidden, kernel, _device_key(key, axis), bias=bias,
                                   block_size=block_size)
  n_tokens = _count_tokens(mask, axis)

  def mean_ce(h, w, b):
    total = fused_linear_cross_entropy(h, w, labels, bias=b, where=mask, reduction="sum",
                                       chunk_size=chunk_size)
    return total / jnp.maximum(n_tokens, 1.0).astype(total.dtype)

  wrt = (0, 1) if bias is None else (0, 1, 2)
  head_grads = iter(jax.grad(mean_ce, argnums=wrt)(hidden, kernel, bias))
  # The cotangent of head_fn's output has its structure (a tuple or a list, a None bias).
  cotangent = jax.tree.map(lambda _: next(head_grads), head)
  (grads,) = vjp_fn(cotangent)
  return _bartlett_estimate(grads, n_tokens, axis, clip_norm)


def _check_clip_norm(owner: str, clip_norm: Any) -> None:
  if clip_norm is not None:
    check_scalar(owner, "clip_norm", clip_norm, lo=0.0, lo_open=True)


def _device_key(key: jax.Array, axis: Any) -> jax.Array:
  """With an axis: the key folded with the device index, so that devices sample apart."""
  return key if axis is None else jax.random.fold_in(key, jax.lax.axis_index(axis))


def _token_mask(owner: str, where: Any, shape: tuple, what: str) -> jax.Array:
  """``where`` (default: all True) as a boolean array of the tokens' ``shape``."""
  if where is None:
    return jnp.ones(shape, jnp.bool_)
  if not hasattr(where, "dtype") and not isinstance(where, (list, tuple, bool, int)):
    raise ValueError(f"{owner}: `where` must be a boolean (or integer 0/1) array, got "
                     f"{type(where).__name__} {where!r}")
  where = jnp.asarray(where)
  if not (where.dtype == jnp.bool_ or jnp.issubdtype(where.dtype, jnp.integer)):
    raise ValueError(f"{owner}: `where` must be a boolean (or integer 0/1) array, got dtype "
                     f"{where.dtype}")
  if where.shape != tuple(shape):
    raise ValueError(f"{owner}: `where` must have shape {tuple(shape)} ({what}), got "
                     f"{where.shape}")
  return where.astype(jnp.bool_)


def _count_tokens(mask: jax.Array, axis: Any) -> jax.Array:
  """B: the counted tokens (float32), summed over the devices with an axis."""
  n_tokens = jnp.sum(mask, dtype=F32)
  if axis is not None:
    n_tokens = jax.lax.psum(as_varying(n_tokens, axis), axis)
  return n_tokens


def _head_parts(owner: str, head: Any) -> tuple:
  """``(hidden, kernel, bias or None)`` from ``head_fn``'s output, checked."""
  usage = ("must return (hidden [..., d], kernel [d, V]) or (hidden, kernel, bias [V])")
  if not isinstance(head, (tuple, list)) or len(head) not in (2, 3):
    raise ValueError(f"{owner}: `head_fn` {usage}, got {type(head).__name__}")
  hidden, kernel, bias = (*head, None) if len(head) == 2 else head
  for name, x in (("hidden", hidden), ("kernel", kernel), ("bias", bias)):
    if x is None and name == "bias":
      continue
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{owner}: `head_fn` {usage} of floating arrays; its {name} is "
                       f"{getattr(x, 'dtype', type(x).__name__)}")
  if (hidden.ndim < 1 or kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]
      or kernel.shape[1] < 1 or (bias is not None and bias.shape != kernel.shape[1:])):
    shapes = tuple(x.shape for x in (hidden, kernel, bias) if x is not None)
    raise ValueError(f"{owner}: `head_fn` {usage}, got shapes {shapes}")
  return hidden, kernel, bias


def _bartlett_estimate(grads: Any, n_tokens: jax.Array, axis: Any,
                       clip_norm: Optional[float]) -> Any:
  """``B * g_hat**2`` from the local gradient ``g_hat`` of the mean sampled-label CE: both
  estimators' last part (summed over devices, then clipped to ``clip_norm``)."""
  # A non-float parameter has a float0 cotangent: a float32 zero estimate, out of the norm.
  grads = jax.tree.map(lambda g: jnp.zeros(jnp.shape(g), F32) if is_frozen(g) else g, grads)
  if axis is not None:
    grads = jax.lax.psum(grads, axis)
  if clip_norm is not None:
    norm = optax.tree.norm(jax.tree.map(upcast, grads))
    factor = jnp.minimum(1.0, clip_norm / (norm + 1e-6))
    grads = jax.tree.map(lambda g: upcast(g) * factor.astype(upcast(g).dtype), grads)
  return jax.tree.map(lambda g: n_tokens.astype(upcast(g).dtype) * jnp.square(upcast(g)), grads)


def hutchinson(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    distribution: str = "rademacher",
    axis_name: AxisName = None,
) -> Any:
  r"""Hutchinson's estimate of the Hessian diagonal: :math:`u \odot (H u)`.

  With :math:`\mathbb E[u u^\top] = I`, :math:`\mathbb E[u_i (Hu)_i] = H_{ii}`. ``Hu`` is a
  Hessian-vector product by forward-over-reverse differentiation (``jax.jvp`` of
  ``jax.grad``), about the cost of two gradient evaluations. Rademacher ``u`` (entries +-1)
  has the lower variance, :math:`\sum_{j\ne i} H_{ij}^2` (exactly ``diag(H)`` when H is
  diagonal); Gaussian adds :math:`2H_{ii}^2`. Estimates can be negative: ``sophia`` treats
  negative curvature as zero.

  Args:
    loss_fn: ``params -> scalar loss`` (a closure over the batch).
    params: the point at which to estimate (any pytree of float arrays).
    key: PRNG key for ``u``. With ``axis_name`` pass the SAME key on every device: all
      devices must probe with the same ``u``.
    distribution: ``"rademacher"`` or ``"gaussian"``.
    axis_name: the data-parallel axis (or axes) under ``pmap`` / ``shard_map``: the estimate
      is averaged (``pmean``) across devices, which for a per-device *mean* loss on equal
      shards equals the single-device estimate on the whole batch. ``loss_fn`` must be the
      per-device loss (no collectives inside); replicated params are fine (see
      ``gauss_newton_bartlett``).

  Returns:
    A pytree like ``params`` (float32, or wider). A non-float (integer, bool) parameter
    leaf is not probed: its estimate is float32 zeros.
  """
  owner = "hutchinson"
  check_choice(owner, "distribution", distribution, _DISTRIBUTIONS)
  if not callable(loss_fn):
    raise ValueError(f"{owner}: `loss_fn` must be callable params -> scalar, got "
                     f"{type(loss_fn).__name__}")
  leaves, treedef = jax.tree.flatten(params)
  for leaf in leaves:
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.complexfloating):
      raise ValueError(f"{owner}: every `params` leaf must be real, got dtype "
                       f"{jnp.asarray(leaf).dtype}")
  sample = jax.random.rademacher if distribution == "rademacher" else jax.random.normal
  # A non-float leaf gets the float0 tangent JAX requires for it (no probe, no estimate);
  # the keys go to the float leaves only, so an integer leaf does not change the probes.
  trainable = [p for p in leaves if not is_frozen(p)]
  keys = iter(jax.random.split(key, max(len(trainable), 1)))
  probes = [np.zeros(jnp.shape(p), jax.dtypes.float0) if is_frozen(p)
            else sample(next(keys), jnp.shape(p), jnp.asarray(p).dtype) for p in leaves]
  u = jax.tree.unflatten(treedef, probes)
  axis = _axis(axis_name)
  if axis is not None:
    params = as_varying(params, axis)
    u = jax.tree.map(lambda x: x if is_frozen(x) else as_varying(x, axis), u)
  out = jax.eval_shape(loss_fn, params)
  if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype,
                                                                       jnp.floating):
    raise ValueError(f"{owner}: `loss_fn` must return a floating scalar, got "
                     f"{getattr(out, 'shape', type(out).__name__)} "
                     f"{getattr(out, 'dtype', '')}".rstrip())
  _, hu = jax.jvp(jax.grad(loss_fn, allow_int=True), (params,), (u,))
  est = jax.tree.map(lambda a, b: jnp.zeros(jnp.shape(a), F32) if is_frozen(a)
                     else upcast(a) * upcast(b), u, hu)
  if axis is not None:
    est = jax.lax.pmean(est, axis)
  return est


# --------------------------------------------------------------------------------------------
# Every-k helper


def is_estimate_step(step: Any, k: int = 10) -> jax.Array:
  """``step % k == 0``: the steps on which ``update_every_k`` runs the estimator."""
  check_int("is_estimate_step", "k", k, lo=1)
  return jnp.asarray(step) % k == 0


def update_every_k(
    tx: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    params: Any,
    *,
    step: Any,
    estimate_fn: Callable[[Any], Any],
    k: int = 10,
    **extra_args: Any,
) -> tuple[Any, Any]:
  """``tx.update`` with a fresh Hessian estimate on every k-th step, for use inside jit.

  On steps with ``step % k == 0`` (0, k, 2k, ...) it returns
  ``tx.update(grads, opt_state, params, hessian=estimate_fn(params), **extra_args)``, on the
  others ``tx.update(grads, opt_state, params, **extra_args)``. The choice is a ``lax.cond``
  (or a Python ``if`` when ``step`` is a Python int), so ``estimate_fn`` is not executed on
  the other steps.

  Args:
    tx: a transformation containing ``scale_by_sophia`` (e.g. ``optim.sophia(...)``, possibly
      inside ``optax.chain`` / ``inject_hyperparams`` / ``masked``).
    grads, opt_state, params: as for ``tx.update``.
    step: the current step (int scalar, may be traced), e.g. a counter in the train state.
    estimate_fn: ``params -> hessian estimate`` (a pytree like params), typically a closure
      over the batch and a PRNG key calling ``gauss_newton_bartlett`` or ``hutchinson``.
    k: estimate every k steps, >= 1 (the paper uses 10).
    **extra_args: forwarded to ``tx.update`` on both branches.

  Returns:
    ``(updates, new_opt_state)``.
  """
  owner = "update_every_k"
  check_int(owner, "k", k, lo=1)
  if not callable(estimate_fn):
    raise ValueError(f"{owner}: `estimate_fn` must be callable params -> hessian, got "
                     f"{type(estimate_fn).__name__}")
  if "hessian" in extra_args:
    raise ValueError(f"{owner}: pass the estimator as `estimate_fn`, not `hessian`")
  if not _sophia_states(opt_state):
    raise ValueError(f"{owner}: `opt_state` contains no ScaleBySophiaState; `tx` must "
                     "contain scale_by_sophia (e.g. optim.sophia)")
  step_dtype = getattr(step, "dtype", None)
  if step_dtype is not None and not jnp.issubdtype(step_dtype, jnp.integer):
    raise ValueError(f"{owner}: `step` must be an integer, got dtype {step_dtype}")
  if isinstance(step, bool) or (step_dtype is None and not isinstance(step, int)):
    raise ValueError(f"{owner}: `step` must be an integer, got {step!r}")

  def with_estimate(g, s, p):
    return tx.update(g, s, p, hessian=estimate_fn(p), **extra_args)

  def without_estimate(g, s, p):
    return tx.update(g, s, p, **extra_args)

  if isinstance(step, int):
    branch = with_estimate if step % k == 0 else without_estimate
    return branch(grads, opt_state, params)
  if k == 1:
    return with_estimate(grads, opt_state, params)
  return jax.lax.cond(jnp.asarray(step) % k == 0, with_estimate, without_estimate,
                      grads, opt_state, params)


# --------------------------------------------------------------------------------------------
# Monitoring


def _sophia_states(opt_state: Any) -> list[ScaleBySophiaState]:
  is_sophia = lambda x: isinstance(x, ScaleBySophiaState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_sophia) if is_sophia(s)]


def _require_states(owner: str, opt_state: Any) -> list[ScaleBySophiaState]:
  states = _sophia_states(opt_state)
  if not states:
    raise ValueError(f"{owner}: `opt_state` contains no ScaleBySophiaState (was the optimizer "
                     "built with optim.sophia / scale_by_sophia?)")
  return states


def sophia_win_rate(opt_state: Any) -> jax.Array:
  """Fraction of coordinates NOT clipped (``|m| < rho*max(h,0) + eps``) in the last update.

  Found anywhere inside ``opt_state``; several Sophia states (e.g. ``multi_transform``) are
  averaged weighted by their number of coordinates. 0 before the first update. The paper
  tunes ``rho`` so that this stays roughly in 0.1-0.5; 0 means Sophia is sign momentum
  (no estimate yet, or ``rho`` too small), 1 means it never clips.

  Raises:
    ValueError: when ``opt_state`` holds no ``ScaleBySophiaState``.
  """
  states = _require_states("sophia_win_rate", opt_state)
  total, weighted = 0, jnp.zeros([], F32)
  for s in states:
    n = sum(x.size for x in jax.tree.leaves(s.mu))
    (rate,) = jax.tree.leaves(s.win_rate)  # also unwraps an nnx OptState variable
    weighted = weighted + n * jnp.asarray(rate, F32)
    total += n
  return weighted / max(total, 1)


def sophia_hessian_norm(opt_state: Any) -> jax.Array:
  """Global L2 norm of the Hessian EMA ``h`` of every Sophia state inside ``opt_state``.

  0 before the first estimate. Non-finite estimates are refused (``h`` unchanged, see
  ``sophia_hessian_rejected``), so this stays finite unless the finite estimates themselves
  overflow the storage dtype.

  Raises:
    ValueError: when ``opt_state`` holds no ``ScaleBySophiaState``.
  """
  states = _require_states("sophia_hessian_norm", opt_state)
  leaves = [x for s in states for x in jax.tree.leaves(s.hessian)]
  return optax.tree.norm(leaves).astype(F32)


def sophia_hessian_rejected(opt_state: Any) -> jax.Array:
  """How many Hessian estimates were refused for a NaN or an infinity (int32, summed over
  every Sophia state inside ``opt_state``; each refusal left ``h`` unchanged).

  Anything but 0 means the estimator overflowed or the model produced non-finite logits on
  an estimate step: worth a look even though the optimizer carried on.

  Raises:
    ValueError: when ``opt_state`` holds no ``ScaleBySophiaState``.
  """
  states = _require_states("sophia_hessian_rejected", opt_state)
  total = jnp.zeros([], jnp.int32)
  for s in states:
    (n,) = jax.tree.leaves(s.hessian_rejected)  # also unwraps an nnx OptState variable
    total = total + jnp.asarray(n, jnp.int32)
  return total


__all__ = [
    "gauss_newton_bartlett", "gauss_newton_bartlett_fused", "hutchinson", "update_every_k",
    "is_estimate_step",
    "sophia_win_rate", "sophia_hessian_norm", "sophia_hessian_rejected",
]
