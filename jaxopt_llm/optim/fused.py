"""The copy-free whole step: ``update_and_apply`` and the one-pass steps behind it.

``adamw`` / ``adam`` / ``adam_l2`` / ``lion`` / ``sophia`` return their reference chain
(``scale_by_* -> add_decayed_weights(mask) -> scale_by_learning_rate``, see ``aliases.py``)
with a *whole step* registered for it (``register_whole_step``; ``fused=False`` registers
none). ``update``, ``init`` and the state are the chain's own, so checkpoints, ``optax.chain``,
``inject_hyperparams``, ``MultiSteps``, ``masked`` and shardings see an ordinary chain.

``update_and_apply(tx, grads, state, params)`` runs the registered step: per parameter leaf,
in one elementwise pass, the decay, the optimizer's per-leaf formula (``adam_leaf``,
``lion_leaf``, ``sophia_leaf``, ``fold_hessian`` from ``transforms.py``, the same functions
``scale_by_*`` map over the tree), the learning-rate scaling and ``p + u``, equal bit for
bit to ``update`` + ``optax.apply_updates``. What it adds is the order of the in-place
writes, so that XLA:CPU makes no defensive copy of the optimizer state under
``donate_argnums`` (see ``gate``). That is where the CPU speed-up is: Lion, bf16/fp16-moment
Adam, and Sophia on the steps that fold in a Hessian estimate.

What the compiled CPU step looks like (``jax.jit(step, donate_argnums=(0, 1))``, read off
the optimized HLO): XLA:CPU has no multi-output fusion, so each array the step writes is its
own loop over memory.

* fp32 AdamW: m' (reads g, m), v' (reads g, v), p' (reads p, m', v'): 40 bytes per parameter
  where one fused kernel moves 28 (torch.optim.AdamW(fused=True)). optax.adamw, our chain,
  this module and a hand-written single ``jnp`` function all compile to exactly these three
  loops, so on CPU fp32 AdamW runs at optax's speed whatever the formulation.
* Lion (any dtype) and Adam with moments stored in bf16/fp16: p' must read the *old* state
  (Lion's sign uses the old momentum; Adam's step uses the float32 moments, not their
  rounded stored copies), and the state update overwrites that same donated buffer. With
  nothing ordering the two loops, XLA inserts a copy of the state into a freshly allocated
  temporary every step: Lion moves 36 bytes per parameter instead of 28, bf16 AdamW 40
  instead of 32, plus page faults on the new allocation. The whole step computes the stored
  state from the old state gated on p' (the formula called again, see ``store_after``) and
  the copy disappears. (Sophia: the Hessian EMA, read by p' and by the win rate and
  overwritten on estimate steps, likewise.)

Dropped, because it measured no faster than the chain (4M parameters, 1 and 200 leaves,
interleaved rounds): a separate one-pass ``update``; and a cache-blocked step (``fori_loop``
over blocks of each leaf): XLA:CPU runs a loop body single-threaded, slower than three
parallel loops.

On GPU, XLA's multi-output fusion can compute a leaf's p', m', v' in one kernel, so no
ordering is needed there and ``update_and_apply`` just calls update + apply_updates (by
default; not measured here, no GPU was available).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxopt_llm._validation import check_bool
from jaxopt_llm.optim import transforms
from jaxopt_llm.optim.numerics import (
    fraction_true,
    is_frozen,
    match_leaves,
    require_params,
    store,
    value_at,
)

__all__ = ["ChainLayout", "register_whole_step", "adam_step", "lion_step", "sophia_step",
           "update_and_apply", "is_fused", "state_bytes"]

# A whole step: (grads, state, params, **extra_args) -> (new_params, new_state).
WholeStep = Callable[..., tuple]

# chain update_fn -> its whole step. Weak keys: a transformation rebuilt at every step inside
# ``optax.inject_hyperparams`` leaves no trace.
_STEPS: "weakref.WeakKeyDictionary[Callable, WholeStep]" = weakref.WeakKeyDictionary()


class ChainLayout(NamedTuple):
  """Where each link's state sits in a named optimizer's chain state tuple."""
  direction: int  # scale_by_adam / scale_by_lion / scale_by_sophia
  decay: Optional[int]  # add_decayed_weights (None when the decay is a literal 0)
  learning_rate: int  # scale_by_learning_rate


def register_whole_step(tx: optax.GradientTransformation,
                        step: WholeStep) -> optax.GradientTransformation:
  """Makes ``update_and_apply(tx, ...)`` run ``step``; returns ``tx`` itself."""
  _STEPS[tx.update] = step
  return tx


# --------------------------------------------------------------------------------------------
# The decay and learning-rate links, computed inline


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


def _decay_flags(mask: Any, updates: Any, treedef: Any) -> list[bool]:
  """Per-leaf booleans: does this leaf get weight decay (``optax.masked`` semantics)."""
  if mask is None:
    return [True] * treedef.num_leaves
  # optax.masked's rule: a callable mask is a single callable (not a tree of them).
  flags = jax.tree.leaves(jax.tree.map(callable, mask))
  tree = mask(updates) if flags and all(flags) else mask
  # The mask may be a prefix of the updates: broadcast each flag over its subtree.
  full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), tree, updates)
  return [bool(f) for f in treedef.flatten_up_to(full)]


def _lr_scale(learning_rate: Any, count: Optional[jax.Array]) -> Callable:
  """``optax.scale_by_learning_rate(learning_rate)``'s per-leaf arithmetic, exactly."""
  if callable(learning_rate):
    step_size = -1 * learning_rate(count)
    return lambda d: jnp.array(step_size, dtype=d.dtype) * d
  step_size = -1 * learning_rate
  return lambda d: step_size * d


def _per_leaf(layout: ChainLayout, learning_rate: Any, weight_decay: Any, mask: Any,
              grads: Any, state: tuple, params: Any, state_trees: Sequence[Any],
              leaf: Callable, frozen: Optional[Callable] = None) -> tuple:
  """Runs ``leaf(g, wd, scale, p, *state_leaves)`` on every leaf of ``grads``.

  ``wd`` is this step's weight decay for a decayed leaf, else None; ``scale`` the lr link's
  arithmetic. Returns ``(treedef, outputs per leaf, chain state with the decay and lr links
  advanced)``. A non-float parameter leaf (its state is ``optax.MaskedNode``, see
  ``numerics``) is not stepped: its output is ``frozen(p, *state_leaves)``, by default
  ``(p, *state_leaves)`` (the parameter and its empty state, unchanged).
  """
  new_state = list(state)
  wd = None
  if layout.decay is not None:
    count = _link_count(state[layout.decay])
    wd = weight_decay(count) if callable(weight_decay) else weight_decay
    new_state[layout.decay] = _tick(state[layout.decay])
  scale = _lr_scale(learning_rate, _link_count(state[layout.learning_rate]))
  new_state[layout.learning_rate] = _tick(state[layout.learning_rate])
  treedef = jax.tree.structure(grads)
  n = treedef.num_leaves
  flags = _decay_flags(mask, grads, treedef) if wd is not None else [False] * n
  cols = [[None] * n if t is None else match_leaves(
      "update_and_apply", "grads", grads, what, t)[1]
          for what, t in zip(("params", *["optimizer state (from init)"] * len(state_trees)),
                             (params, *state_trees))]
  frozen = frozen or (lambda p, *st: (p, *st))

  def one(g, on, p, *st):
    if is_frozen(p) or any(isinstance(x, optax.MaskedNode) for x in st):
      return frozen(p, *st)
    return leaf(g, wd if on else None, scale, p, *st)

  outs = [one(*args) for args in zip(treedef.flatten_up_to(grads), flags, *cols)]
  return treedef, outs, new_state


def _direction_state(state: Any, layout: ChainLayout, state_type: type) -> Any:
  """``state[layout.direction]``, after checking ``state`` is the chain's state (a TypeError
  naming ``state`` for None or another optimizer's state)."""
  n = layout.learning_rate + 1
  if (not isinstance(state, tuple) or hasattr(state, "_fields") or len(state) != n
      or not isinstance(state[layout.direction], state_type)):
    raise TypeError(f"update_and_apply: `state` must be the state this optimizer's "
                    f"init(params) returned (a tuple of {n} link states), got "
                    f"{type(state).__name__}")
  return state[layout.direction]


def _apply(p: jax.Array, u: jax.Array) -> jax.Array:
  """``optax.apply_updates`` for one leaf, exactly."""
  return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)


def _column(treedef: Any, outs: list, i: int) -> Any:
  return treedef.unflatten([o[i] for o in outs])


# --------------------------------------------------------------------------------------------
# Ordering the in-place writes


def gate(deps: Sequence[jax.Array], x: Optional[jax.Array]) -> Optional[jax.Array]:
  """``x``, readable only once every array of ``deps`` exists (a dependency XLA keeps).

  Under ``donate_argnums`` XLA writes a new optimizer state into the old state's buffer.
  When the old state is also read by the loop that computes the new params and nothing
  orders the two loops, XLA first copies the old state to a freshly allocated temporary (an
  extra read and write of the array, plus page faults, every step). Feeding the state
  update with ``x`` selected on a scalar of each dep that is always 0 but that XLA cannot
  prove to be (``min(isnan(dep[0]), 0)``) orders the write after the reads and the copy
  disappears. Exact: the select always returns ``x``. It gates the *input*, so the
  arithmetic that follows (and how XLA contracts it into FMAs) is the reference's.
  """
  if x is None:
    return None
  for dep in deps:
    if dep.size:
      first = lax.slice(dep, (0,) * dep.ndim, (1,) * dep.ndim).reshape(())
      zero = jnp.minimum((first != first).astype(jnp.int32), 0)
      x = jnp.where(zero == 0, x, jnp.zeros_like(x))
  return x


def store_after(deps: Sequence[jax.Array], new: jax.Array, dtype: Any,
                formula: Callable[[tuple], jax.Array], old: tuple, *,
                keep_nonzero: bool = False, direction_reads_old: bool = False) -> jax.Array:
  """``store(new, dtype)``, with its in-place write ordered after ``deps``.

  A state leaf stored in the dtype it is computed in is the very array p' read: XLA writes
  it first and p' reads it, nothing to order. When p' read the *old* state instead (the
  leaf is stored narrower than computed, or ``direction_reads_old``: Lion's sign), the
  stored copy is ``formula`` (the optimizer's per-leaf formula) applied to the old state
  leaves ``old`` gated on ``deps``: computed once more, written last.
  """
  if not direction_reads_old and jnp.dtype(dtype) == new.dtype:
    return store(new, dtype, keep_nonzero=keep_nonzero)
  return store(formula(tuple(gate(deps, x) for x in old)), dtype, keep_nonzero=keep_nonzero)


# --------------------------------------------------------------------------------------------
# The one-pass steps (their arithmetic: transforms.adam_leaf / lion_leaf / sophia_leaf)


def adam_step(layout: ChainLayout, learning_rate: Any, weight_decay: Any, mask: Any, *,
              coupled: bool, b1: Any, b2: Any, eps: Any, amsgrad: bool,
              mu_dtype: Optional[Any], nu_dtype: Optional[Any]) -> WholeStep:
  """Adam / AdamW / Adam-L2's whole step: decay (before the moments when ``coupled``),
  ``adam_leaf``, lr, ``p + u``; stored moments written after p'. A schedule ``b1`` is
  evaluated at the state's count, as ``scale_by_adam`` does."""

  def step(grads, state, params, **extra_args):
    del extra_args
    adam = _direction_state(state, layout, transforms.ScaleByAdamState)
    b1_t = value_at(b1, adam.count)
    count = optax.safe_increment(adam.count)

    def leaf(g, wd, scale, p, m, v, vm):
      if coupled and wd is not None:
        g = g + wd * p
      formula = lambda old: transforms.adam_leaf(g, *old, count, b1=b1_t, b2=b2, eps=eps)
      d, m1, v1, vm1 = formula((m, v, vm))
      if wd is not None and not coupled:
        d = d + wd * p
      p1 = _apply(p, scale(d))
      old = (m, v, vm)
      m_s = store_after([p1], m1, mu_dtype or m.dtype, lambda o: formula(o)[1], old)
      vm_s = None if vm is None else store_after(
          [p1], vm1, nu_dtype or vm.dtype, lambda o: formula(o)[3], old, keep_nonzero=True)
      # max(vm, v') reads the old v too: with amsgrad, v is written after v_max as well.
      v_s = store_after([p1] if vm is None else [p1, vm_s], v1, nu_dtype or v.dtype,
                        lambda o: formula(o)[2], old, keep_nonzero=True)
      return p1, m_s, v_s, vm_s

    treedef, outs, new_state = _per_leaf(layout, learning_rate, weight_decay, mask, grads,
                                         state, params, (adam.mu, adam.nu, adam.nu_max), leaf)
    new_state[layout.direction] = transforms.ScaleByAdamState(
        count=count, mu=_column(treedef, outs, 1), nu=_column(treedef, outs, 2),
        nu_max=_column(treedef, outs, 3) if amsgrad else None)
    return _column(treedef, outs, 0), tuple(new_state)

  return step


def lion_step(layout: ChainLayout, learning_rate: Any, weight_decay: Any, mask: Any, *,
              b1: Any, b2: Any, mu_dtype: Optional[Any]) -> WholeStep:
  """Lion's whole step: ``lion_leaf``, decay, lr, ``p + u``; the momentum written after p'
  (the sign read the old one)."""

  def step(grads, state, params, **extra_args):
    del extra_args
    lion = _direction_state(state, layout, transforms.ScaleByLionState)

    def leaf(g, wd, scale, p, m):
      formula = lambda old: transforms.lion_leaf(g, *old, b1=b1, b2=b2)
      d, m1 = formula((m,))
      if wd is not None:
        d = d + wd * p
      p1 = _apply(p, scale(d))
      return p1, store_after([p1], m1, mu_dtype or m.dtype, lambda o: formula(o)[1], (m,),
                             direction_reads_old=True)

    treedef, outs, new_state = _per_leaf(layout, learning_rate, weight_decay, mask, grads,
                                         state, params, (lion.mu,), leaf)
    new_state[layout.direction] = transforms.ScaleByLionState(
        count=optax.safe_increment(lion.count), mu=_column(treedef, outs, 1))
    return _column(treedef, outs, 0), tuple(new_state)

  return step


def sophia_step(layout: ChainLayout, learning_rate: Any, weight_decay: Any, mask: Any, *,
                b1: Any, b2: Any, rho: Any, eps: Any, mu_dtype: Optional[Any]) -> WholeStep:
  """Sophia's whole step: ``sophia_leaf``, decay, lr, ``p + u``, the win rate; then the
  momentum (if stored narrower) and, given an estimate, ``fold_hessian``, both written
  after p' and the win rate (which read the old values)."""

  def step(grads, state, params, hessian=None, **extra_args):
    del extra_args
    so = _direction_state(state, layout, transforms.ScaleBySophiaState)

    def leaf(g, wd, scale, p, m, h):
      formula = lambda old: transforms.sophia_leaf(g, *old, b1=b1, rho=rho, eps=eps)
      d, m1, kept = formula((m, h))
      if wd is not None:
        d = d + wd * p
      return _apply(p, scale(d)), m1, kept, formula, m, h

    def frozen(p, m, h):  # a non-float parameter: unchanged, no state, not in the win rate
      return p, m, None, None, m, h

    treedef, outs, new_state = _per_leaf(layout, learning_rate, weight_decay, mask, grads,
                                         state, params, (so.mu, so.hessian), leaf, frozen)
    win_rate = fraction_true([o[2] for o in outs if o[2] is not None])
    mu = [m1 if f is None else
          store_after([p1, win_rate], m1, mu_dtype or m.dtype, lambda o, f=f: f(o)[1], (m, h))
          for p1, m1, _, f, m, h in outs]
    h_new = so.hessian
    if hessian is not None:
      h_new = treedef.unflatten([o[5] if o[3] is None else gate([o[0], win_rate], o[5])
                                 for o in outs])
    h_new, h_count, h_rejected = transforms.fold_counted(so, hessian, b2, h_new)
    new_state[layout.direction] = transforms.ScaleBySophiaState(
        count=optax.safe_increment(so.count), mu=treedef.unflatten(mu), hessian=h_new,
        hessian_count=h_count, hessian_rejected=h_rejected, win_rate=win_rate)
    return _column(treedef, outs, 0), tuple(new_state)

  return step


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

  which is what it runs unless ``tx`` has a registered whole step (``adamw``, ``adam``,
  ``adam_l2``, ``lion``, ``sophia`` as returned, not wrapped; see ``is_fused``) and
  ``ordered`` (default: on the CPU backend). Then, owning ``p + u``, it orders the in-place
  writes so that XLA makes no defensive copy of the state under ``donate_argnums``: Lion's
  sign reads the old momentum, and Adam with bf16/fp16 moments recomputes them in float32
  for the step, so with plain ``update`` + ``apply_updates`` XLA:CPU copies those moments to
  a fresh buffer every step (see the module docstring). fp32 AdamW compiles to the same
  loops either way.

  Use it in the jitted step, params and state donated::

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
      grads = jax.grad(loss_fn)(params, batch)
      return update_and_apply(tx, grads, opt_state, params)

  Extra arguments are forwarded (Sophia's ``hessian=``). Under a multi-device sharding the
  ordering reads one element of each new parameter array (a tiny transfer); pass
  ``ordered=False`` to skip it.
  """
  require_params("update_and_apply", params)
  if ordered is not None:
    check_bool("update_and_apply", "ordered", ordered)
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
