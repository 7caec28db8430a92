r"""Muon: momentum orthogonalised by Newton-Schulz, the twin of ``torch.optim.Muon`` (torch 2.13).

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/; Liu et al., 2025,
"Muon is Scalable for LLM Training", arXiv:2502.16982) replaces each 2-D gradient's momentum by
an approximately orthogonal matrix with the same singular vectors, then steps along it. What
torch 2.13's ``torch/optim/_muon.py`` computes per parameter (``muon_leaf``), and therefore
what ``muon`` computes:

.. math::
  B_t = \operatorname{lerp}(B_{t-1}, g_t, 1-\mu) = \mu B_{t-1} + (1-\mu) g_t \\
  \tilde B_t = \operatorname{lerp}(g_t, B_t, \mu) = (1-\mu) g_t + \mu B_t
  \ \text{(nesterov)}\quad\text{else}\quad \tilde B_t = B_t \\
  O_t = \mathrm{NS}^{(a,b,c)}_k(\tilde B_t; \varepsilon) \\
  \theta_t = \theta_{t-1} - \gamma\lambda\,\theta_{t-1} - \gamma\, r(A, B)\, O_t

with :math:`r(A, B) = \sqrt{\max(1, A/B)}` (``adjust_lr_fn=None`` or ``"original"``, Keller
Jordan's) or :math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``, Moonshot's: the update's RMS
matches AdamW's, so AdamW's learning rate and weight decay can be reused), for an
:math:`A \times B` parameter. The buffer is an EMA (torch's code uses ``lerp``; torch's
docstring writes :math:`B_t = \mu B_{t-1} + g_t`, which is not what its code does: the code is
followed here). The weight decay uses the unadjusted :math:`\gamma`, the step the adjusted one.

``newton_schulz`` is torch's ``_zeropower_via_newtonschulz`` operation for operation: the input
is rounded to ``ns_dtype`` (bfloat16 by default: torch calls ``grad.bfloat16()``), transposed
when it has more rows than columns, divided by its Frobenius norm clamped below at ``eps``, then
``ns_steps`` times

.. math::
  A = X X^\top,\qquad B = bA + cA^2,\qquad X \leftarrow aX + BX

rounded as torch's CPU kernels round (read off torch 2.13 and checked bit for bit): each
product accumulated in float32, ``addmm``'s ``beta * C`` added to ``alpha * (M @ N)`` by a
fused multiply-add, then one rounding to ``ns_dtype``. So the bfloat16 roundings are torch's,
step for step. ``ns_dtype=jnp.float32`` runs the same iteration without them (for
comparison: it is further from torch than the bfloat16 default). The momentum ``lerp`` and
the parameter update (``param.mul_``, ``param.add_(O, alpha=-lr)``) are rounded as torch's
FMA kernels round them too (``numerics.fma``): on CPU, 100 steps of ``muon`` stay within a
few float32 ulps of ``torch.optim.Muon``'s parameters (``tests/optim/test_orthogonalized.py``).

**Only 2-D parameters**: like ``torch.optim.Muon``, ``muon`` raises a ValueError naming the
first float leaf that is not a matrix. Biases, norm scales and scalars need another optimizer,
and so (Keller Jordan's and Moonshot's recommendation, also torch's docstring) do the
embeddings and the output head, although they are matrices. ``muon_with_adamw`` does that split
(``optax.partition`` with ``muon_labels``); or write it yourself::

  tx = optax.partition({"muon": optim.muon(0.02), "adamw": optim.adamw(3e-4)},
                       optim.muon_labels)

Integer and bool leaves are left unchanged with no state (the library's rule); they are
labelled ``"adamw"`` by ``muon_labels``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import optax

from jaxopt_llm._validation import (
    check_bool,
    check_choice,
    check_float_dtype,
    check_int,
    check_scalar,
    check_schedule,
)
from jaxopt_llm.optim import aliases
from jaxopt_llm.optim.numerics import (
    check_real_leaves,
    check_state,
    check_updates_like,
    compute_dtype,
    fma,
    frozen_update,
    is_frozen,
    lerp,
    map_leaves,
    require_params,
    store_tree,
    upcast,
    value_at,
    zeros_like,
)

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

DEFAULT_NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch's (Keller Jordan's) a, b, c
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
MAX_NS_STEPS = 99  # torch: "Number of steps must be less than 100"
MUON_LABEL, ADAMW_LABEL = "muon", "adamw"
# The default ns_dtype, as a dtype instance: the scalar type jnp.bfloat16 is callable, and
# optax.inject_hyperparams would take it for a schedule.
BFLOAT16 = jnp.dtype(jnp.bfloat16)
# Path components (regular expressions, matched in full, case-insensitively) whose 2-D
# leaves go to AdamW in ``muon_labels``: embeddings (flax ``Embed.embedding``, ``wte``'s
# ``embedding``, ``embed_tokens``) and output heads (``head``, ``lm_head``).
DEFAULT_ADAMW_PATHS = (r".*embed.*", r"(lm_)?head")


class ScaleByMuonState(NamedTuple):
  """State of ``scale_by_muon`` (and of ``muon``'s first link), field by field against
  ``torch.optim.Muon``'s per-parameter state:

  * ``count``: int32, the number of updates applied so far. torch's Muon keeps no step
    count (nothing to convert; set it to the number of steps taken, for schedules).
  * ``momentum_buffer``: ``state[p]["momentum_buffer"]``, the EMA :math:`B_t` of the
    gradients, one per 2-D float parameter (float32 by default, ``mu_dtype`` if given;
    ``optax.MaskedNode()`` for a non-float leaf). torch creates it at the first step with
    zeros, the value ``init`` gives.
  """
  count: chex.Array
  momentum_buffer: optax.Updates


def adjusted_lr_ratio(shape: Sequence[int], adjust_lr_fn: Optional[str]) -> float:
  r"""torch's ``_adjust_lr`` as a factor of the learning rate, for a parameter of ``shape``
  ``(A, B)``: :math:`\sqrt{\max(1, A/B)}` (None or ``"original"``) or
  :math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``). A Python float (exact, as torch's)."""
  check_choice("muon", "adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)
  a, b = shape[:2]
  if adjust_lr_fn is None or adjust_lr_fn == "original":
    return math.sqrt(max(1, a / b))
  return 0.2 * math.sqrt(max(a, b))


def _dot(x: jax.Array, y: jax.Array, acc: Any) -> jax.Array:
  # Products of ns_dtype numbers, accumulated in `acc` (float32 for bfloat16): what torch's
  # bfloat16 matmul does. HIGHEST: a float32 ns_dtype is never run as TF32 on a GPU. On CPU
  # the operands are widened first (exact: a bfloat16 number is a float32 number, and so
  # are the products): older XLA CPU runtimes (jax 0.7) cannot run bf16 x bf16 -> f32; on
  # GPU/TPU the bfloat16 operands go to the matrix units as they are.
  if jax.default_backend() == "cpu":
    x, y = x.astype(acc), y.astype(acc)
  return jnp.matmul(x, y, preferred_element_type=acc, precision=jax.lax.Precision.HIGHEST)


def newton_schulz(
    x: jax.Array,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    ns_steps: int = 5,
    eps: float = 1e-7,
    *,
    ns_dtype: Any = BFLOAT16,
) -> jax.Array:
  r"""torch's ``_zeropower_via_newtonschulz``: ``x`` (2-D) made approximately orthogonal.

  .. math::
    X_0 = \frac{G}{\max(\lVert G\rVert_F, \varepsilon)}\ (G^\top\ \text{when rows > cols}),
    \qquad X_{j+1} = aX_j + (bA_j + cA_j^2)X_j,\quad A_j = X_j X_j^\top

  returned transposed back, in ``ns_dtype``. Each step acts on the singular values of
  :math:`X` as the quintic :math:`p(s) = as + bs^3 + cs^5` (the singular vectors stay), so
  after ``ns_steps`` steps the singular values are :math:`p^{k}(s_i / \lVert G\rVert_F)`:
  with torch's coefficients (chosen for a steep slope at 0, not for convergence) they land
  roughly in [0.7, 1.2] ("S' ~ Uniform(0.5, 1.5)" in torch's docstring) unless they started
  tiny compared with the largest.

  Rounded as torch rounds: ``x`` is cast to ``ns_dtype`` (torch: ``grad.bfloat16()``), the
  norm is accumulated in float32 and rounded to ``ns_dtype``, the division is done in float32
  and rounded, and every product (``X X^T``, the two ``addmm``) is accumulated in float32;
  ``addmm(C, M, N, beta, alpha)`` is ``fma(beta, C, alpha * (M @ N))`` in float32, rounded
  once to ``ns_dtype``. Only the order of the float32 accumulation inside a product may differ
  from torch's BLAS (it did not, bit for bit, on the shapes tested). With ``eps = 0`` an
  all-zero ``x`` gives zeros (not 0/0 = NaN, as torch would). ``ns_dtype=float32`` (or
  float64 under x64): the same iteration, accumulated at that precision.
  """
  check_newton_schulz_args("newton_schulz", ns_coefficients, eps, ns_steps, ns_dtype)
  if not hasattr(x, "ndim") or x.ndim != 2:
    raise ValueError(f"newton_schulz: `x` must be a 2-D matrix, got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  a, b, c = ns_coefficients
  dtype = jnp.dtype(ns_dtype)
  acc = compute_dtype(jnp.zeros([], dtype))
  X = x.astype(dtype)
  tall = x.shape[0] > x.shape[1]
  if tall:
    X = X.T
  norm = jnp.sqrt(jnp.sum(jnp.square(X.astype(acc)))).astype(dtype)
  norm = jnp.maximum(norm, jnp.asarray(eps, dtype)).astype(acc)
  X = jnp.where(norm == 0, 0, X.astype(acc) / jnp.where(norm == 0, 1, norm)).astype(dtype)

  def step(_, X):
    gram = _dot(X, X.T, acc).astype(dtype)
    # addmm(C, M, N, beta, alpha) = fma(beta, C, alpha * (M @ N)), then one rounding.
    update = fma(b, gram.astype(acc), c * _dot(gram, gram, acc)).astype(dtype)
    return fma(a, X.astype(acc), _dot(update, X, acc)).astype(dtype)

  # A loop, not unrolled: ns_steps copies of the step per leaf would slow compilation.
  X = jax.lax.fori_loop(0, ns_steps, step, X)
  return X.T if tall else X


def muon_leaf(g: jax.Array, buf: jax.Array, *, momentum: Any, nesterov: bool,
              ns_coefficients: Sequence[float], ns_steps: int, eps: float,
              ns_dtype: Any) -> tuple:
  r"""torch.optim.Muon's direction on one 2-D leaf: ``(O, B')``.

  :math:`B' = \operatorname{lerp}(B, g, 1-\mu)`; :math:`O = \mathrm{NS}(\operatorname{lerp}(g,
  B', \mu))` (nesterov) or :math:`\mathrm{NS}(B')`, in ``g``'s dtype (its values are
  ``ns_dtype`` numbers). ``lerp`` is torch's, rounded as torch rounds it (``numerics.lerp``).
  The shape adjustment, the learning rate and the weight decay are the next link's
  (``muon_update_leaf``).
  """
  g32 = upcast(g)
  buf1 = lerp(buf, g32, 1 - momentum)
  u = lerp(g32, buf1, momentum) if nesterov else buf1
  o = newton_schulz(u, ns_coefficients, ns_steps, eps, ns_dtype=ns_dtype)
  return o.astype(g.dtype), buf1


def muon_update_leaf(o: jax.Array, p: jax.Array, *, learning_rate: Any, weight_decay: Any,
                     adjust_lr_fn: Optional[str]) -> jax.Array:
  r"""torch.optim.Muon's parameter update on one leaf, as an additive update:
  :math:`\theta' - \theta` with

  .. math::
    \theta' = \operatorname{fma}\big(O,\ -\gamma r(A, B),\ \theta(1 - \gamma\lambda)\big)

  torch's ``param.mul_(1 - lr*wd)`` then ``param.add_(O, alpha=-adjusted_lr)``, with its
  roundings: both factors computed in Python (double) precision when the learning rate and
  decay are Python numbers, then rounded to float32; the multiply-add rounded once (torch's
  CPU kernel is an FMA, ``numerics.fma``). ``theta' - theta`` is exact whenever
  :math:`\theta'` is within a factor 2 of :math:`\theta` (Sterbenz), so
  ``optax.apply_updates`` lands on torch's :math:`\theta'` bit for bit.
  """
  ratio = adjusted_lr_ratio(jnp.shape(p), adjust_lr_fn)
  p32 = upcast(p)
  dtype = p32.dtype
  alpha = -(learning_rate * ratio)
  factor = 1 - learning_rate * weight_decay
  new = fma(upcast(o).astype(dtype), jnp.asarray(alpha, dtype),
            p32 * jnp.asarray(factor, dtype))
  return (new - p32).astype(p.dtype)


def check_matrices(owner: str, params: optax.Params) -> None:
  """A ValueError naming the first float leaf of ``params`` that is not 2-D (Muon's rule,
  as torch.optim.Muon's constructor); non-float leaves are skipped (never updated)."""
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not is_frozen(p) and len(jnp.shape(p)) != 2:
      raise ValueError(
          f"{owner}: parameter {jax.tree_util.keystr(path) or '(root)'} has shape "
          f"{tuple(jnp.shape(p))}; Muon (like torch.optim.Muon) only optimizes 2-D matrices. "
          f"Give the other parameters (biases, norm scales, and usually embeddings and the "
          f"output head) to another optimizer: jaxopt_llm.optim.muon_with_adamw(...), or "
          f"optax.partition({{'muon': muon(...), 'adamw': adamw(...)}}, muon_labels)")


def check_newton_schulz_args(owner: str, ns_coefficients: Any, eps: Any, ns_steps: Any,
                             ns_dtype: Any) -> None:
  """The arguments of ``newton_schulz`` (and of Muon's): a TypeError or ValueError naming
  the first bad one."""
  if isinstance(ns_coefficients, (str, bytes)) or not isinstance(ns_coefficients, Sequence) \
      or len(ns_coefficients) != 3:
    raise ValueError(f"{owner}: `ns_coefficients` must be a tuple of 3 numbers (a, b, c), got "
                     f"{ns_coefficients!r}")
  for i, v in enumerate(ns_coefficients):
    check_scalar(owner, f"ns_coefficients[{i}]", v)
  check_scalar(owner, "eps", eps, lo=0.0)
  if isinstance(ns_steps, jax.core.Tracer):
    raise TypeError(f"{owner}: `ns_steps` must be a Python int (the number of Newton-Schulz "
                    f"steps is static); with optax.inject_hyperparams pass "
                    f"static_args=('ns_steps',)")
  check_int(owner, "ns_steps", ns_steps, lo=0)
  if ns_steps > MAX_NS_STEPS:
    raise ValueError(f"{owner}: `ns_steps` must be less than 100 (torch.optim.Muon's limit), "
                     f"got {ns_steps!r}")
  if isinstance(ns_dtype, jax.core.Tracer):
    raise TypeError(f"{owner}: `ns_dtype` must be a dtype, got a traced value; with "
                    f"optax.inject_hyperparams pass static_args=('ns_dtype',) (a scalar type "
                    f"such as jnp.float32 is callable, so it is taken for a schedule)")
  if ns_dtype is None:
    raise TypeError(f"{owner}: `ns_dtype` must be a floating dtype such as jnp.bfloat16 "
                    f"(torch's) or jnp.float32, got None")
  check_float_dtype(owner, "ns_dtype", ns_dtype)


def _check_hyperparameters(owner: str, momentum, nesterov, ns_coefficients, eps, ns_steps,
                           ns_dtype, mu_dtype) -> None:
  if callable(momentum):  # a schedule: torch's OneCycleLR / CyclicLR cycle Muon's momentum
    check_schedule(owner, "momentum", momentum, lo=0.0, hi=1.0)
  else:
    check_scalar(owner, "momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
  check_bool(owner, "nesterov", nesterov)
  check_newton_schulz_args(owner, ns_coefficients, eps, ns_steps, ns_dtype)
  check_float_dtype(owner, "mu_dtype", mu_dtype)


def scale_by_muon(
    momentum: ScalarOrSchedule = 0.95,
    *,
    nesterov: bool = True,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    ns_dtype: Any = BFLOAT16,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Muon's direction (``muon_leaf``): the Newton-Schulz orthogonalised momentum.

  .. math::
    B_t = \mu B_{t-1} + (1-\mu) g_t,\qquad
    O_t = \mathrm{NS}^{(a,b,c)}_k\big((1-\mu) g_t + \mu B_t\big)
    \ \text{(nesterov; else}\ \mathrm{NS}(B_t))

  torch.optim.Muon's arithmetic and roundings (see the module docstring and
  ``newton_schulz``). The shape adjustment :math:`r(A, B)` is not applied here: torch
  applies it to the learning rate, and so does the next link of ``muon``,
  ``scale_by_adjusted_learning_rate``. Every float parameter must be 2-D (``init`` raises
  naming the leaf); see ``muon_labels``.

  Args:
    momentum: :math:`\mu`, in [0, 1), or a schedule ``step -> mu`` evaluated at the number
      of updates applied so far (torch's OneCycleLR and CyclicLR cycle Muon's momentum;
      ``jaxopt_llm.from_torch`` passes it so).
    nesterov: use :math:`\operatorname{lerp}(g_t, B_t, \mu)` instead of :math:`B_t`.
    ns_coefficients: :math:`(a, b, c)` of the quintic Newton-Schulz step.
    eps: lower clamp of the Frobenius norm that normalises the input of Newton-Schulz, >= 0.
    ns_steps: number of Newton-Schulz steps, 0 to 99.
    ns_dtype: dtype Newton-Schulz runs in: bfloat16 (torch's) or float32 (no rounding).
    mu_dtype: storage dtype of the momentum buffer (default float32; computed in float32).
  """
  owner = "scale_by_muon"
  _check_hyperparameters(owner, momentum, nesterov, ns_coefficients, eps, ns_steps,
                         ns_dtype, mu_dtype)
  coefficients = tuple(float(v) for v in ns_coefficients)

  def init_fn(params):
    check_matrices(owner, params)
    return ScaleByMuonState(count=jnp.zeros([], jnp.int32),
                            momentum_buffer=zeros_like(params, mu_dtype))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByMuonState)
    del params
    mu = value_at(momentum, state.count)
    direction, buf = map_leaves(
        lambda g, b: muon_leaf(g, b, momentum=mu, nesterov=nesterov,
                               ns_coefficients=coefficients, ns_steps=ns_steps, eps=eps,
                               ns_dtype=ns_dtype),
        updates, state.momentum_buffer, n_outputs=2, owner=owner)
    return direction, ScaleByMuonState(
        count=optax.safe_increment(state.count),
        momentum_buffer=store_tree(buf, mu_dtype, state.momentum_buffer))

  return optax.GradientTransformation(init_fn, update_fn)


def _check_mask_leaves(owner: str, tree: Any, what: str) -> None:
  for leaf in jax.tree.leaves(tree):
    if not (isinstance(leaf, bool) or getattr(leaf, "dtype", None) == bool):
      raise TypeError(f"{owner}: `mask` must be None, a callable params -> pytree of bools, or "
                      f"a pytree of bools; {what} a leaf {type(leaf).__name__} {leaf!r}")


def _mask_leaves(owner: str, mask: Any, params: Any) -> list:
  """One bool per leaf of ``params`` (``mask`` may be a prefix tree or a callable)."""
  treedef = jax.tree.structure(params)
  if mask is None:
    return [True] * treedef.num_leaves
  tree = mask(params) if callable(mask) else mask
  _check_mask_leaves(owner, tree, "the callable returned one with" if callable(mask) else "got")
  try:
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: m, p), tree, params)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{owner}: `mask` must have the parameters' structure (or a prefix of "
                     f"it): got {jax.tree.structure(tree)}, the params have {treedef}") from e
  return [bool(m) for m in treedef.flatten_up_to(full)]


class ScaleByAdjustedLearningRateState(NamedTuple):
  """State of ``scale_by_adjusted_learning_rate``: ``count`` (int32), the number of updates
  applied so far, at which the learning rate and weight decay schedules are evaluated (torch
  keeps the learning rate in its param group, no count)."""
  count: chex.Array


def scale_by_adjusted_learning_rate(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    adjust_lr_fn: Optional[str] = None,
    mask: Any = None,
) -> optax.GradientTransformation:
  r"""torch.optim.Muon's parameter update from a direction :math:`O` (``muon_update_leaf``):

  .. math::
    \theta \leftarrow \theta(1 - \gamma_t\lambda) - \gamma_t\, r(A, B)\, O

  returned as the additive update for ``optax.apply_updates``, rounded as torch rounds it, so
  that the parameters land on torch's bit for bit. :math:`r(A, B)` is ``adjusted_lr_ratio``
  (``adjust_lr_fn``: None / ``"original"`` or ``"match_rms_adamw"``) for an
  :math:`A \times B` parameter; the weight decay :math:`\lambda` is decoupled and multiplies
  the unadjusted :math:`\gamma_t`; ``mask`` (a pytree of bools, a prefix of one, or a
  callable ``params -> such a pytree``) selects the decayed parameters. Needs ``params``.
  Non-float parameters get an exact 0 update.
  """
  owner = "scale_by_adjusted_learning_rate"
  check_schedule(owner, "learning_rate", learning_rate, lo=0.0)
  check_schedule(owner, "weight_decay", weight_decay, lo=0.0)
  check_choice(owner, "adjust_lr_fn", adjust_lr_fn, ADJUST_LR_FNS)
  if mask is not None and not callable(mask):
    _check_mask_leaves(owner, mask, "got")

  def init_fn(params):
    del params
    return ScaleByAdjustedLearningRateState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    check_state(owner, state, ScaleByAdjustedLearningRateState)
    require_params(owner, params)
    check_updates_like(owner, updates, params)
    check_matrices(owner, params)  # r(A, B) needs a matrix: a clear error, not an unpacking one
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    wd = weight_decay(state.count) if callable(weight_decay) else weight_decay
    treedef = jax.tree.structure(params)
    decayed = _mask_leaves(owner, mask, params)
    out = [frozen_update(p) if is_frozen(p) else
           muon_update_leaf(o, p, learning_rate=lr, weight_decay=wd if m else 0.0,
                            adjust_lr_fn=adjust_lr_fn)
           for o, p, m in zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(params),
                              decayed)]
    return (treedef.unflatten(out),
            ScaleByAdjustedLearningRateState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: ScalarOrSchedule = 1e-3,
    *,
    weight_decay: ScalarOrSchedule = 0.1,
    momentum: ScalarOrSchedule = 0.95,
    nesterov: bool = True,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: Optional[str] = None,
    mask: Any = None,
    ns_dtype: Any = BFLOAT16,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""torch.optim.Muon (torch 2.13), defaults, arithmetic and roundings included.

  .. math::
    \theta \leftarrow \theta(1 - \gamma_t\lambda) - \gamma_t\, r(A, B)\, O_t

  with :math:`O_t` the Newton-Schulz orthogonalised (Nesterov) momentum (``scale_by_muon``),
  :math:`r(A, B)` torch's learning-rate adjustment (``adjust_lr_fn``) and :math:`\lambda`
  the decoupled weight decay (torch: ``p.mul_(1 - lr*wd)`` before the step), multiplied by
  the unadjusted learning rate. Returns ``optax.chain(scale_by_muon,
  scale_by_adjusted_learning_rate)``; its state is ``(ScaleByMuonState(count,
  momentum_buffer), ScaleByAdjustedLearningRateState(count))``. The decay and the step are
  one link, not the ``add_decayed_weights`` + ``scale_by_learning_rate`` pair of the other
  optimizers, so that they round as torch's do: with bfloat16 Newton-Schulz a float32 ulp
  in a parameter can flip a bfloat16 rounding, and the flips grow (measured on the parity
  problem of ``tests/optim/test_orthogonalized.py``: 1.6e-3 relative after 100 steps with the pair,
  2e-9 with this link).

  Every float parameter must be 2-D: ``init`` raises a ValueError naming the first one that
  is not. Use ``muon_with_adamw`` (or ``optax.partition`` with ``muon_labels``) for a whole
  model. Newton-Schulz runs in bfloat16 as torch's does (``ns_dtype``); torch's example
  learning rate is 0.02 with the default ``adjust_lr_fn``; with ``"match_rms_adamw"`` AdamW's
  learning rate and weight decay carry over.

  Every argument after ``learning_rate`` is keyword-only: ``optax.contrib.muon``'s second
  positional argument is its ``ns_coeffs`` (torch's is ``weight_decay``). ``mask`` selects
  the decayed parameters, as in ``adamw``.
  """
  owner = "muon"
  check_schedule(owner, "learning_rate", learning_rate, lo=0.0)
  check_schedule(owner, "weight_decay", weight_decay, lo=0.0)
  if mask is not None and not callable(mask):
    _check_mask_leaves(owner, mask, "got")
  chain = optax.chain(
      scale_by_muon(momentum, nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                    ns_steps=ns_steps, ns_dtype=ns_dtype, mu_dtype=mu_dtype),
      scale_by_adjusted_learning_rate(learning_rate, weight_decay, adjust_lr_fn=adjust_lr_fn,
                                      mask=mask))

  def init_fn(params):
    check_real_leaves(params)
    check_matrices(owner, params)
    return chain.init(params)

  def update_fn(updates, state, params=None):
    if not isinstance(state, tuple) or hasattr(state, "_fields") or len(state) != 2:
      raise TypeError(f"{owner}: `state` must be the state this optimizer's init(params) "
                      f"returned (a tuple of 2 link states), got {type(state).__name__}")
    require_params(owner, params)
    return chain.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def muon_labels(params: optax.Params, *,
                adamw_paths: Sequence[str] = DEFAULT_ADAMW_PATHS) -> Any:
  """``"muon"`` for every 2-D float leaf, ``"adamw"`` for the others: the labels for
  ``optax.partition({"muon": ..., "adamw": ...}, muon_labels)``.

  A 2-D leaf also goes to AdamW when a component of its path matches (in full, ignoring
  case) one of the regular expressions ``adamw_paths``: by default embeddings (``.*embed.*``:
  flax's ``Embed.embedding``, ``embed_tokens``, ...) and output heads (``head``,
  ``lm_head``), which Keller Jordan's notes and Moonshot's recipe leave to AdamW (an
  embedding row is not a linear map of the activations; the head is trained better by
  AdamW). Pass ``adamw_paths=()`` to give every matrix to Muon, or your own names (e.g.
  ``(r".*embed.*", r"(lm_)?head", "wpe")``). Tensors with more than 2 dimensions (conv
  kernels, stacked layers) go to AdamW, as torch.optim.Muon refuses them; non-float leaves
  too (neither changes them).

  Called by ``optax.partition`` on the params at ``init`` and on the updates at ``update``:
  both have the same structure, shapes and float-ness.
  """
  patterns = [re.compile(p, re.IGNORECASE) for p in adamw_paths]

  def label(path, p):
    if is_frozen(p) or len(jnp.shape(p)) != 2:
      return ADAMW_LABEL
    names = [_key_name(k) for k in path]
    if any(pat.fullmatch(n) for pat in patterns for n in names):
      return ADAMW_LABEL
    return MUON_LABEL

  return jax.tree_util.tree_map_with_path(label, params)


def _checked_labels(owner: str, labels: Any) -> Any:
  """``labels``: a callable ``params -> pytree of "muon"/"adamw"`` (what it returns is
  checked when called) or such a pytree; a TypeError naming ``labels`` otherwise."""

  def check(tree, what):
    leaves = jax.tree.leaves(tree)
    bad = [x for x in leaves if not (isinstance(x, str) and x in (MUON_LABEL, ADAMW_LABEL))]
    if bad or not leaves:
      raise TypeError(f"{owner}: `labels` must be a pytree of {MUON_LABEL!r} / {ADAMW_LABEL!r} "
                      f"like the params, or a callable params -> such a pytree; {what} "
                      f"{bad[0] if bad else tree!r}")
    return tree

  if callable(labels):
    return lambda params: check(labels(params), "the callable returned")
  return check(labels, "got")


def muon_with_adamw(
    learning_rate: ScalarOrSchedule = 1e-3,
    *,
    weight_decay: ScalarOrSchedule = 0.1,
    momentum: ScalarOrSchedule = 0.95,
    nesterov: bool = True,
    ns_coefficients: Sequence[float] = DEFAULT_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: Optional[str] = None,
    ns_dtype: Any = BFLOAT16,
    mu_dtype: Optional[Any] = None,
    adamw_learning_rate: ScalarOrSchedule = 1e-3,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.999,
    adamw_eps: float = 1e-8,
    adamw_weight_decay: ScalarOrSchedule = 0.01,
    adamw_mask: Any = None,
    labels: Union[Any, Callable[[optax.Params], Any]] = muon_labels,
) -> optax.GradientTransformation:
  """Muon for the hidden matrices, AdamW (``jaxopt_llm.optim.adamw``) for everything else.

  ``optax.partition({"muon": muon(learning_rate, ...), "adamw": adamw(adamw_learning_rate,
  ...)}, labels)``: the torch recipe of two optimizers (``torch.optim.Muon`` on the 2-D
  hidden weights, ``torch.optim.AdamW`` on the rest) as one transformation. ``labels`` is
  ``muon_labels`` by default (2-D float leaves, except embeddings and heads, to Muon), or
  any pytree / callable giving ``"muon"`` or ``"adamw"`` per leaf. The two learning rates
  are separate (torch's example: Muon 0.02, AdamW 3e-4); with
  ``adjust_lr_fn="match_rms_adamw"`` Muon's update has AdamW's RMS and one learning rate
  (and weight decay) may serve both. The ``adamw_*`` arguments are ``adamw``'s (torch's
  AdamW defaults); ``adamw_mask`` selects its decayed leaves. The state is the partition's
  (``inner_states["muon"]``, ``["adamw"]``); ``update`` first checks it and the updates'
  structure against ``params``, naming ``state`` / ``updates`` (optax.partition itself
  fails there with an AttributeError or a pytree error).
  """
  owner = "muon_with_adamw"
  # adamw's own checks would name `b1`, not `adamw_b1`: checked here first, by their names.
  check_schedule(owner, "adamw_learning_rate", adamw_learning_rate, lo=0.0)
  check_schedule(owner, "adamw_weight_decay", adamw_weight_decay, lo=0.0)
  check_scalar(owner, "adamw_b1", adamw_b1, lo=0.0, hi=1.0, hi_open=True)
  check_scalar(owner, "adamw_b2", adamw_b2, lo=0.0, hi=1.0, hi_open=True)
  check_scalar(owner, "adamw_eps", adamw_eps, lo=0.0)
  if adamw_mask is not None and not callable(adamw_mask):
    try:
      _check_mask_leaves(owner, adamw_mask, "got")
    except TypeError as e:
      raise TypeError(str(e).replace("`mask`", "`adamw_mask`")) from None
  labels = _checked_labels(owner, labels)
  muon_tx = muon(learning_rate, weight_decay=weight_decay, momentum=momentum,
                 nesterov=nesterov, ns_coefficients=ns_coefficients, eps=eps,
                 ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype,
                 mu_dtype=mu_dtype)
  adamw_tx = aliases.adamw(adamw_learning_rate, adamw_b1, adamw_b2, adamw_eps,
                           weight_decay=adamw_weight_decay, mask=adamw_mask)
  inner = optax.partition({MUON_LABEL: muon_tx, ADAMW_LABEL: adamw_tx}, labels)

  def update_fn(updates, state, params=None):
    # optax.partition's own failures on a foreign state or mismatched updates are an
    # AttributeError / a pytree error naming nothing: check first, naming the argument.
    if not hasattr(state, "inner_states") or not isinstance(state.inner_states, dict) or \
        set(state.inner_states) != {MUON_LABEL, ADAMW_LABEL}:
      raise TypeError(f"{owner}: `state` must be the state that {owner}(...).init(params) "
                      f"returned, got {type(state).__name__}")
    check_updates_like(owner, updates, params)
    return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update_fn)
