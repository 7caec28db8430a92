"""Arithmetic shared by the optimizers (public-internal, like ``optax``'s ``numerics``).

Dtype policy, used by every transformation in ``jaxopt_llm.optim``: statistics are computed
in float32 (or wider when the input is wider) and only *stored* in a narrower dtype
(``mu_dtype`` / ``nu_dtype``), with ``store`` saturating instead of overflowing. The
exponential moving average ``ema`` is the one moment update of Adam (both moments), Lion
(both interpolations) and Sophia (momentum and Hessian EMA).
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


def zeros_like(params: optax.Params, dtype: Optional[Any]) -> optax.Updates:
  """Zeros shaped like ``params``, in ``dtype`` or else each leaf's compute dtype."""
  return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype=dtype or compute_dtype(p)), params)


def ema(average: jax.Array, x: jax.Array, decay: Any) -> jax.Array:
  r"""One step of an exponential moving average, in the compute dtype:
  :math:`\beta a + (1-\beta) x`."""
  return decay * upcast(average) + (1.0 - decay) * upcast(x)


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
  """``num / den``, with 0 where ``den == 0`` unless ``eps`` is a Python number > 0.

  Adam's denominator ``sqrt(v) + eps`` is 0 only when eps is 0 (or injected as an array) and
  v is 0, i.e. for an all-zero gradient history, whose step is 0 (not 0/0 = NaN as in
  torch.optim.Adam(eps=0)). With a literal eps > 0 this is a plain division. NaN stays NaN.
  """
  if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0:
    return num / den
  zero = den == 0
  return jnp.where(zero, jnp.zeros_like(num), num / jnp.where(zero, 1.0, den))


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


def map_leaves(fn: Callable[..., tuple], tree: Any, *others: Optional[Any],
               n_outputs: int) -> tuple:
  """``jax.tree.map`` for a ``fn`` returning a tuple: one output tree per tuple entry.

  ``others`` have ``tree``'s structure (or are ``None``: ``fn`` then gets ``None`` for them).
  Flattening against ``tree`` (rather than mapping to tuples and transposing) stays right
  when the params themselves are tuples.
  """
  treedef = jax.tree.structure(tree)
  n = treedef.num_leaves
  cols = [[None] * n if t is None else treedef.flatten_up_to(t) for t in others]
  outs = [fn(*args) for args in zip(treedef.flatten_up_to(tree), *cols)]
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
