"""Fast paths for AdamW / Adam / Lion / Sophia: one pass per leaf, and a copy-free step.

Two layers, both numerically identical (bit for bit, tested) to the reference chains of
``jaxopt_llm.optim.aliases`` (``scale_by_* -> add_decayed_weights(mask) ->
scale_by_learning_rate``):

1. ``fused_adam`` / ``fused_lion`` / ``fused_sophia``: an
   ``optax.GradientTransformationExtraArgs`` whose update computes, per parameter leaf and in
   one elementwise expression, the decay, the moments and the learning-rate scaling. It is
   what ``adamw``/``adam``/``adam_l2``/``lion``/``sophia`` return by default (``fused=False``
   gives the reference chain). Its state *is* the reference chain's
   state (same tuple of NamedTuples, same dtypes), so ``state[0].mu`` works, checkpoints are
   interchangeable between the two, and it composes like any transformation:
   ``optax.chain``, ``optax.inject_hyperparams`` (lr, weight_decay, betas injected; a
   callable mask through ``static_args="mask"``), ``optax.MultiSteps``, ``optax.masked``,
   ``apply_if_finite``, ``flax.nnx.Optimizer``, and sharded arrays (elementwise ops only, no
   reshape or concatenation, so every output keeps its input's sharding).

2. ``update_and_apply(tx, grads, state, params)``: the whole step, ``params + updates``
   included, with the in-place writes ordered so that XLA:CPU makes no defensive copy of the
   optimizer state under ``donate_argnums`` (see ``_gate``). This is where the CPU speed-up
   is: Lion, bf16/fp16-moment Adam, and Sophia on the steps that fold in a Hessian estimate.

What the compiled CPU step looks like (``jax.jit(step, donate_argnums=(0, 1))``, read off
the optimized HLO): XLA:CPU has no multi-output fusion, so each array the step writes is its
own loop over memory.

* fp32 AdamW: m' (reads g, m), v' (reads g, v), p' (reads p, m', v'): 40 bytes per parameter
  where one fused kernel moves 28 (torch.optim.AdamW(fused=True)). optax.adamw, our
  reference chain, this module and a hand-written single ``jnp`` function all compile to
  exactly these three loops, so on CPU fp32 AdamW runs at optax's speed whatever the
  formulation: within the optax API (``update`` returns updates, the caller adds them) no
  transformation can do better.
* Lion (any dtype) and Adam with moments stored in bf16/fp16: p' must read the *old* state
  (Lion's sign uses the old momentum; Adam's step uses the float32 moments, not their
  rounded stored copies), and the state update overwrites that same donated buffer. With
  nothing ordering the two loops, XLA inserts a copy of the state into a freshly allocated
  temporary every step: Lion moves 36 bytes per parameter instead of 28, bf16 AdamW 40
  instead of 32, plus page faults on the new allocation. ``update_and_apply`` orders the
  write after p' and the copy disappears. (Sophia: the Hessian EMA, read by p' and by the
  win rate and overwritten on estimate steps, likewise.)

Tried and dropped: a cache-blocked step (``fori_loop`` over blocks of each leaf, in-place
``dynamic_update_slice``, so m' and v' would be re-read from cache): XLA:CPU runs a loop body
single-threaded and it measured slower than the three parallel loops.

On GPU, XLA's multi-output fusion can compute a leaf's p', m', v' in one kernel, so no
ordering is needed there and ``update_and_apply`` just calls update + apply_updates (by
default; not measured here, no GPU was available).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxopt_llm.optim import transforms
from jaxopt_llm.optim.transforms import (
    _F32,
    _bias_correction,
    _increment,
    _is_static_zero,
    _safe_div,
    _store,
    _up,
)

__all__ = ["fused_adam", "fused_lion", "fused_sophia", "update_and_apply", "is_fused",
           "state_bytes"]

# update_fn -> its whole-step function (used by ``update_and_apply``). Weak keys: a
# transformation rebuilt at every step inside ``optax.inject_hyperparams`` leaves no trace.
_STEPS: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# Helpers shared by the fused transformations


def _link_count(link_state: Any) -> Optional[jax.Array]:
  """The step count held by a decay / lr link's state (a schedule's), or None."""
  leaves = jax.tree.leaves(link_state)
  return leaves[0] if leaves else None


def _tick(link_state: Any) -> Any:
  """The state a decay / lr link would return: its counters (if any) advanced by one.

  These links (``optax.add_decayed_weights``, ``optax.masked`` around it,
  ``optax.scale_by_learning_rate``) keep nothing but a schedule's step count. Checked here so
  that a future optax storing more fails loudly instead of silently diverging.
  """
  for leaf in jax.tree.leaves(link_state):
    if jnp.ndim(leaf) != 0 or not jnp.issubdtype(jnp.result_type(leaf), jnp.integer):
      raise TypeError(
          "jaxopt_llm.optim.fused: unexpected optax link state "
          f"{type(link_state).__name__} (expected step counters only); use fused=False")
  return jax.tree.map(optax.safe_increment, link_state)


def _mask_callable(mask: Any) -> bool:
  """optax.masked's rule: a callable mask is a single callable (not a tree of them)."""
  flags = jax.tree.leaves(jax.tree.map(callable, mask))
  return bool(flags) and all(flags)


def _decay_flags(mask: Any, updates: Any, treedef: Any) -> list[bool]:
  """Per-leaf booleans: does this leaf get weight decay (``optax.masked`` semantics)."""
  if mask is None:
    return [True] * treedef.num_leaves
  tree = mask(updates) if _mask_callable(mask) else mask
  # The mask may be a prefix of the updates: broadcast each flag over its subtree.
  full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), tree, updates)
  return [bool(f) for f in treedef.flatten_up_to(full)]


def _lr_scale(lr: Any, lr_count: Optional[jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """``optax.scale_by_learning_rate(lr)``'s per-leaf arithmetic, exactly."""
  if callable(lr):
    step_size = -1 * lr(lr_count)
    return lambda d: jnp.array(step_size, dtype=d.dtype) * d
  step_size = -1 * lr
  return lambda d: step_size * d


class _Layout(NamedTuple):
  """Where each link's state sits in the reference chain's state tuple."""
  main: int  # scale_by_adam / scale_by_lion
  decay: Optional[int]  # add_decayed_weights (None when the decay is a literal 0)
  lr: int  # scale_by_learning_rate


def _chain(direction, lr, weight_decay, mask, *, decay_first: bool):
  """The reference chain and where its links' states live."""
  has_decay = not _is_static_zero(weight_decay)
  decay = [optax.add_decayed_weights(weight_decay, mask)] if has_decay else []
  parts = [*decay, direction] if decay_first else [direction, *decay]
  chain = optax.chain(*parts, optax.scale_by_learning_rate(lr))
  if not has_decay:
    return chain, _Layout(main=0, decay=None, lr=1)
  return chain, (_Layout(main=1, decay=0, lr=2) if decay_first
                 else _Layout(main=0, decay=1, lr=2))


def _links(layout: _Layout, weight_decay: Any, lr: Any, state: tuple, params: Any):
  """Decay value, lr scaling and the advanced decay / lr link states for this step."""
  new_links = list(state)
  wd = None
  if layout.decay is not None:
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    count = _link_count(state[layout.decay])
    wd = weight_decay(count) if callable(weight_decay) else weight_decay
    new_links[layout.decay] = _tick(state[layout.decay])
  scale = _lr_scale(lr, _link_count(state[layout.lr]))
  new_links[layout.lr] = _tick(state[layout.lr])
  return wd, scale, new_links


def _apply(p: jax.Array, u: jax.Array) -> jax.Array:
  """``optax.apply_updates`` for one leaf, exactly."""
  return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def _gate(dep: jax.Array, x: jax.Array) -> jax.Array:
  """``x``, readable only once ``dep`` exists (a data dependency XLA cannot remove).

  Under ``donate_argnums`` XLA writes a new optimizer state into the old state's buffer.
  When the old state is also read by the loop that computes the new params and nothing
  orders the two loops, XLA first copies the old state to a freshly allocated temporary (an
  extra read and write of the array, plus page faults, every step). Feeding the state
  update with ``x`` selected on a scalar of the new params that is always 0 but that XLA
  cannot prove to be (``min(isnan(p'[0]), 0)``) orders the write after the read and the copy
  disappears. Exact: the select always returns ``x``. It gates the *input*, so the
  arithmetic that follows (and how XLA contracts it into FMAs) is the reference's.
  """
  if dep.size == 0:
    return x
  first = lax.slice(dep, (0,) * dep.ndim, (1,) * dep.ndim).reshape(())
  zero = jnp.minimum((first != first).astype(jnp.int32), 0)
  return jnp.where(zero == 0, x, jnp.zeros_like(x))


def _leaves(treedef: Any, tree: Any, n: int) -> list:
  return [None] * n if tree is None else treedef.flatten_up_to(tree)


# --------------------------------------------------------------------------------------------
# Adam family


def fused_adam(
    lr: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Any = 0.0,
    mask: Any = None,
    *,
    coupled: bool = False,
    amsgrad: bool = False,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam / AdamW / Adam-L2 as one transformation: a single elementwise pass per leaf.

  Equals ``optax.chain(scale_by_adam(b1, b2, eps, amsgrad=..., mu_dtype=..., nu_dtype=...),
  add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))`` (decay first when
  ``coupled``) bit for bit, and has that chain's state. Per leaf, with
  :math:`c_1 = 1-b_1^t`, :math:`c_2 = 1-b_2^t`:

  .. math::
    g' = g + wd_t\,p\ \text{(coupled)},\quad m = b_1 m + (1-b_1) g',\quad
    v = b_2 v + (1-b_2) g'^2 \\
    u = -lr_t\left(\frac{m / c_1}{\sqrt{v}/\sqrt{c_2} + \epsilon} + wd_t\,p\
        \text{(decoupled)}\right)

  Use ``jaxopt_llm.optim.adamw`` / ``adam`` / ``adam_l2`` (which return this and validate
  ``lr`` and ``weight_decay``) rather than calling it directly.
  """
  # scale_by_adam validates b1, b2, eps; the chain provides init (hence the state layout).
  direction = transforms.scale_by_adam(b1, b2, eps, amsgrad=amsgrad, mu_dtype=mu_dtype,
                                       nu_dtype=nu_dtype)
  reference, layout = _chain(direction, lr, weight_decay, mask, decay_first=coupled)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)

  def run(updates, state, params, whole_step: bool):
    adam = state[layout.main]
    count = _increment(adam.count)
    t = count.astype(_F32)
    bc1 = _bias_correction(b1, t)
    bc2_sqrt = jnp.sqrt(_bias_correction(b2, t))
    wd, scale, new_links = _links(layout, weight_decay, lr, state, params)
    treedef = jax.tree.structure(updates)
    n = treedef.num_leaves
    flags = _decay_flags(mask, updates, treedef) if wd is not None else [False] * n
    cols = zip(treedef.flatten_up_to(updates), _leaves(treedef, params, n),
               treedef.flatten_up_to(adam.mu), treedef.flatten_up_to(adam.nu),
               _leaves(treedef, adam.nu_max if amsgrad else None, n), flags)
    mom1 = lambda m, g: b1 * _up(m) + (1.0 - b1) * _up(g)
    mom2 = lambda v, g: b2 * _up(v) + (1.0 - b2) * jnp.square(_up(g))
    outs = []
    for g, p, m, v, vm, decay_on in cols:
      # The reference chain's arithmetic, op for op and in its order.
      if coupled and decay_on:
        g = g + wd * p
      m1 = mom1(m, g)
      v1 = mom2(v, g)
      vm1 = jnp.maximum(_up(vm), v1) if amsgrad else None
      d = _safe_div(m1 / bc1, jnp.sqrt(vm1 if amsgrad else v1) / bc2_sqrt + eps, eps)
      d = d.astype(g.dtype)
      if decay_on and not coupled:
        d = d + wd * p
      u = scale(d)
      mu_dt, nu_dt = mu_dtype or m.dtype, nu_dtype or v.dtype
      m_s = _store(m1, mu_dt)
      v_s = _store(v1, nu_dt, keep_nonzero=True)
      vm_s = _store(vm1, nu_dtype or vm.dtype, keep_nonzero=True) if amsgrad else None
      if not whole_step:
        outs.append((u, m_s, v_s, vm_s))
        continue
      p1 = _apply(p, u)
      # A moment stored narrower than it is computed cannot be read back by p' (the rounding
      # would change the step), so p' recomputes it from the old moment, which then has two
      # readers: compute the stored copy from the old moment gated on p' (see _gate).
      if mu_dt != m1.dtype:
        m_s = _store(mom1(_gate(p1, m), g), mu_dt)
      if nu_dt != v1.dtype:
        if amsgrad:  # max(vm, v') recomputes v' from the old v too: gate v on vm' as well
          vm_s = _store(jnp.maximum(_up(_gate(p1, vm)), mom2(_gate(p1, v), g)),
                        nu_dtype or vm.dtype, keep_nonzero=True)
        v_s = _store(mom2(_gate(vm_s if amsgrad else p1, v), g), nu_dt, keep_nonzero=True)
      outs.append((p1, m_s, v_s, vm_s))
    unflat = lambda i: treedef.unflatten([o[i] for o in outs])
    new_links[layout.main] = transforms.ScaleByAdamState(
        count=count, mu=unflat(1), nu=unflat(2), nu_max=unflat(3) if amsgrad else None)
    return unflat(0), tuple(new_links)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return run(updates, state, params, False)

  _STEPS[update_fn] = lambda grads, state, params, **_: run(grads, state, params, True)
  return optax.GradientTransformationExtraArgs(reference.init, update_fn)


# --------------------------------------------------------------------------------------------
# Lion


def fused_lion(
    lr: Any,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: Any = 0.0,
    mask: Any = None,
    *,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lion as one transformation, bit for bit equal to (and with the state of)
  ``optax.chain(scale_by_lion(b1, b2), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(lr))``:

  .. math::
    u = -lr_t\left(\operatorname{sign}(b_1 m + (1-b_1) g) + wd_t\,p\right),\qquad
    m \leftarrow b_2 m + (1-b_2) g

  Use ``jaxopt_llm.optim.lion`` (which returns this) rather than calling it directly.
  """
  direction = transforms.scale_by_lion(b1, b2, mu_dtype=mu_dtype)
  reference, layout = _chain(direction, lr, weight_decay, mask, decay_first=False)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def run(updates, state, params, whole_step: bool):
    lion = state[layout.main]
    wd, scale, new_links = _links(layout, weight_decay, lr, state, params)
    treedef = jax.tree.structure(updates)
    n = treedef.num_leaves
    flags = _decay_flags(mask, updates, treedef) if wd is not None else [False] * n
    cols = zip(treedef.flatten_up_to(updates), _leaves(treedef, params, n),
               treedef.flatten_up_to(lion.mu), flags)
    outs = []
    for g, p, m, decay_on in cols:
      d = jnp.sign(b1 * _up(m) + (1.0 - b1) * _up(g)).astype(g.dtype)
      m1 = _store(b2 * _up(m) + (1.0 - b2) * _up(g), mu_dtype or m.dtype)
      if decay_on:
        d = d + wd * p
      u = scale(d)
      if whole_step:
        p1 = _apply(p, u)
        # The sign read the old m: compute the stored m' from m gated on p' (see _gate).
        m1 = _store(b2 * _up(_gate(p1, m)) + (1.0 - b2) * _up(g), mu_dtype or m.dtype)
        outs.append((p1, m1))
      else:
        outs.append((u, m1))
    unflat = lambda i: treedef.unflatten([o[i] for o in outs])
    new_links[layout.main] = transforms.ScaleByLionState(
        count=_increment(lion.count), mu=unflat(1))
    return unflat(0), tuple(new_links)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return run(updates, state, params, False)

  _STEPS[update_fn] = lambda grads, state, params, **_: run(grads, state, params, True)
  return optax.GradientTransformationExtraArgs(reference.init, update_fn)


# --------------------------------------------------------------------------------------------
# Sophia


def fused_sophia(
    lr: Any,
    b1: float = 0.965,
    b2: float = 0.99,
    rho: float = 0.04,
    weight_decay: Any = 0.1,
    eps: float = 1e-15,
    mask: Any = None,
    *,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Sophia as one transformation, bit for bit equal to (and with the state of)
  ``optax.chain(scale_by_sophia(b1, b2, rho, eps, ...), add_decayed_weights(weight_decay,
  mask), scale_by_learning_rate(lr))``, extra argument ``hessian=`` included:

  .. math::
    m \leftarrow b_1 m + (1-b_1) g,\quad
    u = -lr_t\left(\operatorname{sign}(m)\min\!\left(\frac{|m|}{\rho\max(h, 0) + \epsilon},
    1\right) + wd_t\,p\right),\quad h \leftarrow b_2 h + (1-b_2) \hat H\ \text{(after)}

  The Hessian fold (only on steps that pass ``hessian``) is ``scale_by_sophia``'s own code,
  called for its new ``h`` alone (under jit the rest of that call is dead code).
  Use ``jaxopt_llm.optim.sophia`` (which returns this) rather than calling it directly.
  """
  direction = transforms.scale_by_sophia(b1, b2, rho, eps, mu_dtype=mu_dtype,
                                         nu_dtype=nu_dtype)
  reference, layout = _chain(direction, lr, weight_decay, mask, decay_first=False)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  f32 = _F32

  def run(updates, state, params, whole_step: bool, hessian):
    so = state[layout.main]
    wd, scale, new_links = _links(layout, weight_decay, lr, state, params)
    treedef = jax.tree.structure(updates)
    n = treedef.num_leaves
    flags = _decay_flags(mask, updates, treedef) if wd is not None else [False] * n
    cols = zip(treedef.flatten_up_to(updates), _leaves(treedef, params, n),
               treedef.flatten_up_to(so.mu), treedef.flatten_up_to(so.hessian), flags)
    mom = lambda m, g: b1 * _up(m) + (1.0 - b1) * _up(g)
    outs, kept = [], []
    for g, p, m, h, decay_on in cols:
      m1 = mom(m, g)
      dvec, k = transforms._sophia_direction(m1, _up(h), rho, eps)
      kept.append(k)
      d = dvec.astype(g.dtype)
      if decay_on:
        d = d + wd * p
      u = scale(d)
      m_s = _store(m1, mu_dtype or m.dtype)
      outs.append([_apply(p, u) if whole_step else u, m_s, m, g])
    total = sum(k.size for k in kept)
    win_rate = (sum(jnp.sum(k, dtype=f32) for k in kept) / max(total, 1)
                if kept else jnp.zeros([], f32))
    win_rate = jnp.asarray(win_rate, f32)
    if whole_step:
      for o in outs:
        p1, m_s, m, g = o
        if m_s.dtype != _up(g).dtype:
          # p' and the win rate recompute m' from the old m: store it after both.
          o[1] = _store(mom(_gate(win_rate, _gate(p1, m)), g), m_s.dtype)
    unflat = lambda i: treedef.unflatten([o[i] for o in outs])
    if hessian is None:
      h_new, h_count = so.hessian, so.hessian_count
    else:
      src = so
      if whole_step:
        # h is read by p' and by the win rate: fold the estimate in after both.
        dep = [o[0] for o in outs]
        hs = [_gate(win_rate, _gate(d, h)) for d, h in zip(dep, treedef.flatten_up_to(
            so.hessian))]
        src = so._replace(hessian=treedef.unflatten(hs))
      _, folded = direction.update(updates, src, None, hessian=hessian)
      h_new, h_count = folded.hessian, folded.hessian_count
    new_links[layout.main] = transforms.ScaleBySophiaState(
        count=_increment(so.count), mu=unflat(1), hessian=h_new, hessian_count=h_count,
        win_rate=win_rate)
    return unflat(0), tuple(new_links)

  def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
    del extra_args
    return run(updates, state, params, False, hessian)

  _STEPS[update_fn] = (lambda grads, state, params, hessian=None, **_:
                       run(grads, state, params, True, hessian))
  return optax.GradientTransformationExtraArgs(reference.init, update_fn)


# --------------------------------------------------------------------------------------------
# The whole step


def is_fused(tx: optax.GradientTransformation) -> bool:
  """True when ``update_and_apply`` has an ordered whole-step path for ``tx``."""
  return getattr(tx, "update", None) in _STEPS


def update_and_apply(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    state: optax.OptState,
    params: optax.Params,
    *,
    ordered: Optional[bool] = None,
    **extra_args: Any,
) -> tuple[optax.Params, optax.OptState]:
  """One optimizer step, ``params + updates`` included: returns ``(new_params, new_state)``.

  Equal, bit for bit, to::

    updates, state = tx.update(grads, state, params, **extra_args)
    params = optax.apply_updates(params, updates)

  which is what it runs unless ``tx`` is one of our fused transformations (``adamw``,
  ``adam``, ``adam_l2``, ``lion``, ``sophia`` as returned, not wrapped; see ``is_fused``)
  and ``ordered`` (default: on the CPU backend). Then, owning ``p + u``, it orders the in-place writes so that XLA
  makes no defensive copy of the state under ``donate_argnums``: Lion's sign reads the old
  momentum, and Adam with bf16/fp16 moments recomputes them in float32 for the step, so
  with plain ``update`` + ``apply_updates`` XLA:CPU copies those moments to a fresh buffer
  every step (see the module docstring). fp32 AdamW compiles to the same loops either way.

  Use it in the jitted step, params and state donated::

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
      grads = jax.grad(loss_fn)(params, batch)
      return update_and_apply(tx, grads, opt_state, params)

  Extra arguments are forwarded (Sophia's ``hessian=``). Under a multi-device sharding the
  ordering reads one element of each new parameter array (a tiny transfer); pass
  ``ordered=False`` to skip it.
  """
  if ordered is None:
    ordered = jax.default_backend() == "cpu"
  step = _STEPS.get(getattr(tx, "update", None)) if ordered else None
  if step is None:
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state
  return step(grads, state, params, **extra_args)


# --------------------------------------------------------------------------------------------
# Memory


def state_bytes(tx: optax.GradientTransformation, params: optax.Params) -> int:
  """Bytes of optimizer state ``tx.init(params)`` allocates (computed abstractly, no memory).

  ``params`` may hold arrays or ``jax.ShapeDtypeStruct``s.
  """
  shapes = jax.eval_shape(tx.init, params)
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
