"""Arithmetic shared by the optimizers (public-internal, like ``optax``'s ``numerics``).

Dtype policy, used by every transformation in ``jaxopt_llm.optim``: statistics are computed
in float32 (or wider when the input is wider) and only *stored* in a narrower dtype
(``mu_dtype`` / ``nu_dtype``), with ``store`` saturating instead of overflowing. The
exponential moving average ``ema`` is the one moment update of Adam (both moments), Lion
(both interpolations) and Sophia (momentum and Hessian EMA).

Non-float parameters (integer or bool leaves: step counters, token ids, masks kept in the
params tree) are *frozen*, the one rule for every optimizer, in one place:

* ``zeros_like`` / ``full_like`` (every ``init``) give them no state: ``optax.MaskedNode``,
  as ``optax.masked`` does for masked-out leaves (zero bytes, checkpoint-safe);
* ``map_leaves`` (every ``update``) passes them through: direction 0, state untouched;
* ``scale_by_learning_rate`` (the last link of every named optimizer) and the fused steps
  (``update_and_apply``) return an exact 0 update in the parameter's dtype for them, so
  ``optax.apply_updates`` leaves them bit for bit unchanged even after weight decay.

Complex parameters are refused (``init`` raises naming the leaf): the moments here are
written for real numbers (``g**2``, not ``|g|**2``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

F32 = jnp.float32
INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def compute_dtype(x: jax.Array) -> jnp.dtype:
  """float32 for half-precision inputs; keeps float64 when x64 is on."""
  return jnp.promote_types(x.dtype, F32)


def upcast(x: jax.Array) -> jax.Array:
  """``x`` in its ``compute_dtype``."""
  return x.astype(compute_dtype(x))


NO_PARAMS = ("requires the current value of the parameters (weight decay, or the whole step "
             "of update_and_apply), but `params` is None: call update(updates, state, params)")


def require_params(owner: str, params: Any) -> None:
  """The "requires params" ValueError (optax's chain gives the same) when ``params`` is None."""
  if params is None:
    raise ValueError(f"{owner}: {NO_PARAMS}")


def leaf_dtype(x: Any) -> Any:
  """The dtype of a leaf: an array's, or the one ``jnp.asarray`` would give a Python number."""
  dtype = getattr(x, "dtype", None)
  return jnp.result_type(x) if dtype is None else dtype


def is_frozen(x: Any) -> bool:
  """True for a leaf that is not floating point (int, bool, ``float0``): never updated."""
  return not jnp.issubdtype(leaf_dtype(x), jnp.inexact)


def check_real_leaves(params: optax.Params) -> None:
  """A TypeError naming the first complex parameter leaf (the optimizers are real)."""
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.issubdtype(leaf_dtype(p), jnp.complexfloating):
      raise TypeError(
          f"jaxopt_llm.optim: parameter {jax.tree_util.keystr(path) or 'leaf'} is complex "
          f"({leaf_dtype(p)}); the optimizers here are written for real parameters")


def full_like(params: optax.Params, value: Any, dtype: Optional[Any]) -> optax.Updates:
  """``value`` shaped like each float leaf of ``params``, in ``dtype`` or else the leaf's
  compute dtype; ``optax.MaskedNode()`` (no state) for a non-float leaf."""
  check_real_leaves(params)
  return jax.tree.map(
      lambda p: optax.MaskedNode() if is_frozen(p)
      else jnp.full(jnp.shape(p), value, dtype=dtype or compute_dtype(jnp.asarray(p))), params)


def zeros_like(params: optax.Params, dtype: Optional[Any]) -> optax.Updates:
  """Zeros shaped like ``params``, in ``dtype`` or else each leaf's compute dtype;
  ``optax.MaskedNode()`` (no state) for a non-float leaf (see the module docstring)."""
  return full_like(params, 0, dtype)


def frozen_update(x: Any) -> jax.Array:
  """The update of a frozen leaf: exact zeros in its dtype (bool for a ``float0`` leaf),
  which ``optax.apply_updates`` adds without changing a bit."""
  dtype = leaf_dtype(x)
  if dtype == jax.dtypes.float0:
    dtype = jnp.bool_
  return jnp.zeros(jnp.shape(x), dtype)


def freeze_non_float(updates: optax.Updates, params: Optional[optax.Params]) -> optax.Updates:
  """``updates`` with an exact zero (``frozen_update``) for every leaf whose parameter (or,
  without params, whose update) is not floating point; float leaves are returned as they
  are (no op). A ``None`` update leaf stays None."""
  like = updates if params is None else params
  return jax.tree.map(
      lambda u, p: u if u is None or not is_frozen(p) else frozen_update(p),
      updates, like, is_leaf=lambda x: x is None)


def _shape_of(x: Any) -> Optional[tuple]:
  return None if isinstance(x, optax.MaskedNode) or x is None else tuple(jnp.shape(x))


def _leaf_path(treedef: Any, i: int) -> str:
  paths = jax.tree_util.tree_flatten_with_path(treedef.unflatten(range(treedef.num_leaves)))[0]
  return jax.tree_util.keystr(paths[i][0]) or "(root)"


def match_leaves(owner: str, name: str, tree: Any, like_name: str, like: Any) -> tuple:
  """``(leaves of tree, leaves of like flattened up to tree's structure)``, checked: a
  ValueError naming ``name`` when the structures differ or a leaf's shape differs from its
  counterpart in ``like`` (instead of JAX's structure error, a broadcasting error, or, worse,
  a silent broadcast in the arithmetic). ``like`` leaves may be ``MaskedNode``/None."""
  treedef = jax.tree.structure(tree)
  try:
    like_leaves = treedef.flatten_up_to(like)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{owner}: `{name}` must have the structure of the {like_name}: got "
                     f"{treedef}, the {like_name} has {jax.tree.structure(like)}") from e
  leaves = treedef.flatten_up_to(tree)
  for i, (a, b) in enumerate(zip(leaves, like_leaves)):
    sa, sb = _shape_of(a), _shape_of(b)
    if sa is not None and sb is not None and sa != sb:
      raise ValueError(f"{owner}: `{name}` leaf {_leaf_path(treedef, i)} has shape {sa}, but "
                       f"the {like_name} leaf has shape {sb}")
  return leaves, like_leaves


def check_updates_like(owner: str, updates: Any, params: Any) -> None:
  """``updates`` and ``params`` have one structure and per-leaf shapes (ValueError naming
  the first difference); nothing to check when ``params`` is None."""
  if params is not None:
    match_leaves(owner, "updates", updates, "params", params)


def check_state(owner: str, state: Any, state_type: type) -> None:
  """A TypeError naming ``state`` unless it is ``state_type`` (what ``init`` returned):
  instead of an AttributeError on None or another transformation's state."""
  if not isinstance(state, state_type):
    raise TypeError(f"{owner}: `state` must be the {state_type.__name__} that "
                    f"{owner}(...).init(params) returned, got {type(state).__name__}")


def all_finite(tree: Any) -> jax.Array:
  """True when every entry of every floating leaf of ``tree`` is finite (NaN/inf: False).

  Tested in each leaf's own dtype (a float64 1e300 is finite; cast to float32 it would not
  be). Integer and bool leaves are always finite; no leaves: True.
  """
  ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf_dtype(x), jnp.inexact)]
  out = jnp.asarray(True)
  for o in ok:
    out = out & o
  return out


def ema(average: jax.Array, x: jax.Array, decay: Any) -> jax.Array:
  r"""One step of an exponential moving average, in the compute dtype:
  :math:`\beta a + (1-\beta) x`."""
  return decay * upcast(average) + (1.0 - decay) * upcast(x)


def _split(a: jax.Array) -> tuple:
  # Veltkamp's split: a = hi + lo exactly, each with half of a's significand.
  t = (2.0 ** ((jnp.finfo(a.dtype).nmant + 2) // 2) + 1) * a
  hi = t - (t - a)
  return hi, a - hi


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  r""":math:`ab + c` rounded once, as a fused multiply-add (the CPU kernels of torch round
  ``lerp`` and ``add(..., alpha=)`` so), in the common float dtype of the arguments.

  XLA offers no FMA operation and its CPU backend rounds ``a*b + c`` twice, 1 ulp off in
  about half the entries. Emulated here without a wider type: the product exactly as
  ``p + e`` (Dekker's TwoProduct, Veltkamp splitting), ``c + p`` exactly as ``s + r``
  (Knuth's TwoSum), then ``s + (r + e)``: torch's FMA result, bit for bit, except in rare
  double-rounding ties. Where a step of that overflows (|a| or |b| near the dtype's max) or
  is not finite, the plain ``a*b + c``. About 20 elementwise operations.
  """
  dtype = jnp.result_type(a, b, c)
  a, b, c = (jnp.asarray(x, dtype) for x in (a, b, c))
  p = a * b
  ah, al = _split(a)
  bh, bl = _split(b)
  e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
  s = c + p
  bb = s - c
  r = (c - (s - bb)) + (p - bb)
  out = s + (r + e)
  return jnp.where(jnp.isfinite(out), out, p + c)


def lerp(start: jax.Array, end: jax.Array, weight: Any) -> jax.Array:
  r"""``torch.lerp(start, end, weight)``'s arithmetic, in the compute dtype, bit for bit.

  :math:`s + w(e - s)` for :math:`|w| < 0.5`, else :math:`e + (w - 1)(e - s)` (torch's
  ``is_lerp_weight_small`` branch, ATen's vectorised ``lerp``), the multiply-add rounded once
  (``fma``), the weight taken in the compute dtype as torch's opmath does. Which form applies
  is decided when the weight is a Python number, else per value (a traced ``momentum``).
  """
  dtype = jnp.promote_types(compute_dtype(jnp.asarray(start)), compute_dtype(jnp.asarray(end)))
  s, e = jnp.asarray(start, dtype), jnp.asarray(end, dtype)
  w = jnp.asarray(weight, dtype)
  if isinstance(weight, (int, float)) and not isinstance(weight, bool):
    return fma(w, e - s, s) if abs(weight) < 0.5 else fma(w - 1, e - s, e)
  small = fma(w, e - s, s)
  large = fma(w - 1, e - s, e)
  return jnp.where(jnp.abs(w) < 0.5, small, large)


def store(x: jax.Array, dtype: Any, *, keep_nonzero: bool = False) -> jax.Array:
  """``x.astype(dtype)`` that saturates instead of overflowing to inf (fp16 state storage).

  With ``keep_nonzero`` (second moments, which are >= 0) a positive value that would round
  to zero is stored as the smallest positive number of ``dtype`` instead: in fp16 (and so
  for ``nu_dtype=float16``) any v < 6e-8 underflows, while the first moment m it pairs with
  may not, and m / (sqrt(0) + eps) then overflows the fp16 update. A no-op (no extra op)
  when ``dtype`` is ``x``'s own dtype, i.e. for the default fp32 state.
  """
  dtype = jnp.dtype(dtype)
  if (dtype == x.dtype or not jnp.issubdtype(dtype, jnp.floating)
      or not jnp.issubdtype(x.dtype, jnp.floating)):
    return x.astype(dtype)
  # Only a narrower exponent range (fp16, not bf16) needs the guards: no extra ops for bf16.
  to, frm = jnp.finfo(dtype), jnp.finfo(x.dtype)
  if to.maxexp < frm.maxexp:
    x = jnp.clip(x, -float(to.max), float(to.max))
  y = x.astype(dtype)
  if keep_nonzero and to.minexp > frm.minexp:
    tiny = jnp.asarray(to.smallest_subnormal, dtype)
    y = jnp.where((y == 0) & (x > 0), tiny, y)
  return y


def store_tree(tree: optax.Updates, dtype: Optional[Any], like: optax.Updates, *,
               keep_nonzero: bool = False) -> optax.Updates:
  """``store`` for every leaf, in ``dtype`` or else the dtype the leaf had in ``like``."""
  return jax.tree.map(
      lambda t, l: store(t, dtype or l.dtype, keep_nonzero=keep_nonzero), tree, like)


def safe_div(num: jax.Array, den: jax.Array, eps: Any) -> jax.Array:
  """``num / den`` for a denominator ``sqrt(second moment) + eps``, with 0 where ``den`` is
  0 (possible only when eps is 0 or injected as an array) or ``+inf``.

  ``den == 0``: an all-zero gradient history, whose step is 0 (not 0/0 = NaN as in
  torch.optim.Adam(eps=0), RMSprop(eps=0), Adagrad(eps=0)). ``den == inf``: the second
  moment overflowed (g**2 > float32 max, i.e. |g| > 1.8e19): the step is 0, as
  ``finite / inf`` gives in torch.optim, also when the bias-corrected numerator overflowed
  too (inf / inf would be NaN). Elsewhere it is the plain division, bit for bit. NaN stays
  NaN.
  """
  q = num / den if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0 \
      else num / jnp.where(den == 0, 1.0, den)
  return jnp.where((den == 0) | (den == jnp.inf), jnp.zeros_like(q), q)


def bias_correction(b: Any, count: jax.Array) -> jax.Array:
  """1 - b**t for the step ``count`` (int), accurate in float32 for b close to 1.

  Computed as -expm1(t * log b) with log b taken in float64 when b is a Python number: in
  float32, 1 - 0.999**1 loses 1e-5 of its value to cancellation (PyTorch does this sum in
  double, so the float32 form would cost us parity).
  """
  t = count.astype(F32)
  if isinstance(b, (int, float)):
    if b == 0:
      return jnp.ones([], F32)
    log_b = jnp.asarray(math.log(b), F32)
  else:
    log_b = jnp.log(jnp.asarray(b, F32))
  return -jnp.expm1(t * log_b)


def is_static_zero(x: Any) -> bool:
  """True only for a Python number equal to 0.

  Arrays (e.g. from ``optax.inject_hyperparams``) never count as zero, so the structure of a
  chain built at ``init`` equals the one built again inside ``update``.
  """
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def value_at(value: Any, count: jax.Array) -> Any:
  """A hyperparameter that may be a schedule (``b1``, ``momentum``), at step ``count``.

  ``count`` is the number of updates already applied (int32), as optax passes to a
  learning-rate schedule. A number (or array) is returned as it is, so a Python float keeps
  its exact arithmetic; a schedule returning a Python float (``optax.constant_schedule``)
  therefore gives bit for bit the float's result.
  """
  return value(count) if callable(value) else value


def map_leaves(fn: Callable[..., tuple], tree: Any, *others: Optional[Any],
               n_outputs: int, owner: str = "jaxopt_llm.optim") -> tuple:
  """``jax.tree.map`` for a ``fn`` returning a tuple: one output tree per tuple entry.

  ``others`` have ``tree``'s structure (or are ``None``: ``fn`` then gets ``None`` for them).
  Flattening against ``tree`` (rather than mapping to tuples and transposing) stays right
  when the params themselves are tuples.

  A leaf whose state (any of ``others``) is ``optax.MaskedNode`` belongs to a non-float
  parameter (see ``zeros_like``): ``fn`` is not called; its first output (the direction) is
  ``frozen_update(leaf)`` and every other output ``MaskedNode`` (the state stays empty).

  Raises ValueError (prefixed with ``owner``) when ``tree`` (the updates) and the state
  differ in structure or in a leaf's shape (a state built by ``init`` for other params).
  """
  treedef = jax.tree.structure(tree)
  n = treedef.num_leaves
  leaves = treedef.flatten_up_to(tree)
  cols = [[None] * n if t is None else
          match_leaves(owner, "updates", tree, "optimizer state (from init)", t)[1]
          for t in others]

  def one(x, *state):
    if any(isinstance(s, optax.MaskedNode) for s in state):
      return (frozen_update(x), *[optax.MaskedNode()] * (n_outputs - 1))
    return fn(x, *state)

  outs = [one(*args) for args in zip(leaves, *cols)]
  return tuple(treedef.unflatten([o[i] for o in outs]) for i in range(n_outputs))


def fraction_true(masks: list[jax.Array]) -> jax.Array:
  """The fraction of True entries over all ``masks`` (float32; 0 when there are none).

  Counted in int32, exact up to 2**31 - 1 entries (a float32 sum stops counting ones
  exactly past 2**24). Beyond that the per-array counts, each exact, are added in float32.
  """
  total = sum(m.size for m in masks)
  if total == 0:
    return jnp.zeros([], F32)
  counts = [jnp.sum(m, dtype=jnp.int32) for m in masks]
  if total > INT32_MAX:
    counts = [c.astype(F32) for c in counts]
  return sum(counts).astype(F32) / F32(total)
