"""Hostile-input fuzz of the public losses and metrics (issue 14): every case classified.

For each public function of ``jaxopt_llm.losses`` in cross_entropy (class ``weight=``, soft
targets) / fused / contrastive / metrics / divergence / masked_lm / combine / sampling
(``categorical_from_hidden``, checked against the Gumbel-max sample its docstring
specifies), a valid base call is perturbed with NaN, +-inf,
huge and bf16-max values, empty batches, wrong dtypes, wrong shapes, out-of-range labels
and bad hyperparameters, and run eagerly and under ``jax.jit`` (arrays traced,
hyperparameters static). Each case is classified:

  clear error      TypeError/ValueError naming the function or an argument in backticks
                   (or a checkify error), for an input that is invalid
  finite result    finite, and equal to the float64 numpy reference (rtol 1e-4; 2e-2 for
                   bf16/fp16 inputs) when the reference is defined; the gradient (where
                   there is one) finite too
  propagated       NaN/inf out because a NaN/inf went in (and the float64 reference is not
                   finite either)
  beyond float32   true values beyond the float32 range: a per-token loss > 3.4e38 gives
                   +inf (never NaN; the gradient NaN-free), or the LM head's products
                   h @ W overflow float32 (then, as for any float32 matmul, NaN/inf)
  flagged NaN      an out-of-range label under jit: NaN loss *and* NaN gradient, as
                   documented (eagerly the same label is a clear error)
  documented limit a limit the docstring states: a negative class ``weight`` under jit
                   (traced, not checked; eagerly a clear error), subnormal class weights
                   (flushed to zero by XLA: they count as 0), and a sample from a NaN /
                   -inf logit row (an integer output cannot carry NaN: the first NaN's
                   class, a -inf class never drawn)
  silent wrong     a finite value that differs from the reference, a finite value for an
                   invalid input, a NaN from finite input, a NaN-free gradient of a NaN
                   loss, a NaN gradient of a finite loss
  unreadable crash any other exception (e.g. a JAX-internal TypeError naming nothing)

  python scripts/fuzz_losses.py [--verbose] [--only NAME] [--skip NAME]

Exit status 1 if any case is silent wrong or an unreadable crash.
"""
from __future__ import annotations

import argparse
import collections
import math
import re
import sys
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxopt_llm import losses as L

IGNORE = -100
V = 5
BF16_MAX = float(jnp.finfo(jnp.bfloat16).max)


# ---------------------------------------------------------------------------------------
# float64 references, straight from the docstrings' equations.


def _lse(z):
  z = np.asarray(z, np.float64)
  with np.errstate(all="ignore"):
    m = np.max(z, -1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(z - m_safe), -1)) + m_safe[..., 0]


def _nll(z, y):
  z = np.asarray(z, np.float64)
  with np.errstate(all="ignore"):
    return _lse(z) - np.take_along_axis(z, np.asarray(y)[..., None], -1)[..., 0]


class Bad(Exception):
  """The reference's verdict: this input is invalid (a clear error is expected)."""


FMAX = float(np.finfo(np.float32).max)


class Beyond(Exception):
  """The true values leave the float32 range. ``matmul``: the logits' products overflow
  (NaN is then float32 arithmetic, like any matmul's); otherwise a per-token term is
  beyond 3.4e38: the result must be +inf or the value, never NaN."""

  def __init__(self, value, matmul=False, grad_overflows=False):
    super().__init__("beyond float32")
    self.value, self.matmul, self.grad_overflows = value, matmul, grad_overflows


def _labels_ok(y, vocab, ignore_index=IGNORE, where=None):
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise Bad("labels dtype")
  counted = y != ignore_index
  if where is not None:
    counted &= np.asarray(where)
  if np.any(counted & ((y < 0) | (y >= vocab))):
    raise Bad("label range")
  return counted


def _float(x, ndim_min=1):
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating) and x.dtype.name not in ("bfloat16",):
    raise Bad("not floating")
  if x.ndim < ndim_min:
    raise Bad("ndim")
  return x.astype(np.float64)


def _reduce(v, valid, reduction):
  if reduction == "none":
    return v
  if reduction == "sum":
    return v.sum()
  return v.sum() / max(valid.sum(), 1)


def ref_ce(z, y, ignore_index=IGNORE, label_smoothing=0.0, z_loss=0.0, reduction="mean",
           where=None):
  z = _float(z)
  if z.shape[:-1] != np.shape(y) or z.shape[-1] == 0:
    raise Bad("shape")
  if where is not None and np.shape(where) != np.shape(y):
    raise Bad("where shape")
  valid = _labels_ok(y, z.shape[-1], ignore_index, where)
  ys = np.where(valid, y, 0)
  with np.errstate(all="ignore"):
    zz = np.where(valid[..., None], z, 0.0)
    lse = _lse(zz)
    nll = _nll(zz, ys)
    loss = nll
    if label_smoothing:
      loss = (1 - label_smoothing) * nll + label_smoothing * (lse - zz.mean(-1))
    if z_loss:
      loss = loss + z_loss * lse**2
    loss = np.where(valid, loss, 0.0)
  out = _reduce(loss, valid, reduction)
  if np.any(np.abs(loss[np.isfinite(loss)]) > FMAX):
    raise Beyond(out)
  return out


class Flushed(Exception):
  """Nonzero weights all below float32's smallest normal (1.2e-38): XLA flushes subnormal
  floats to zero (CPU and GPU), so they count as 0 (documented)."""


class ValueCheck(Bad):
  """Invalid by its *values* (a negative or non-finite class weight): a clear error when the
  argument is concrete (eager); under jit it is traced and, as documented, not checked."""


def _class_weight(w, vocab):
  w = np.asarray(w)
  if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)) \
      or w.dtype == np.bool_:
    raise Bad("weight dtype")
  if w.shape != (vocab,):
    raise Bad("weight shape")
  w = w.astype(np.float64)
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueCheck("weight values")
  tiny = float(np.finfo(np.float32).tiny)
  if np.any(w > 0) and np.all(w[w > 0] < tiny):
    raise Flushed("subnormal class weights count as 0")
  return w


def _neg_logp(z):
  with np.errstate(all="ignore"):
    return _lse(z)[..., None] - z


def _zero_safe(a, b):
  """a * b with 0 wherever a == 0 (even at b = inf), the documented rule."""
  with np.errstate(all="ignore"):
    return np.where(a == 0, 0.0, a * b)


def ref_ce_weight(z, y, weight, label_smoothing=0.1, reduction="mean", ignore_index=IGNORE):
  """torch's F.cross_entropy(weight=w, label_smoothing=eps), the docstring's equation."""
  z = _float(z)
  if z.shape[:-1] != np.shape(y) or z.shape[-1] == 0:
    raise Bad("shape")
  valid = _labels_ok(y, z.shape[-1], ignore_index)
  w = _class_weight(weight, z.shape[-1])
  if reduction == "mean" and w.max() > 0:
    w = w / w.max()  # the weighted mean is scale-free: its true value is this one's
  ys = np.where(valid, y, 0)
  eps, vocab = label_smoothing, z.shape[-1]
  with np.errstate(all="ignore"):
    zz = np.where(valid[..., None], z, 0.0)
    nlp = _neg_logp(zz)
    w_y = w[ys]
    nll = np.take_along_axis(nlp, ys[..., None], -1)[..., 0]
    loss = (1 - eps) * _zero_safe(w_y, nll) + eps * np.sum(_zero_safe(w / vocab, nlp), -1)
    loss = np.where(valid, loss, 0.0)
    if reduction == "none":
      out = loss
    elif reduction == "sum":
      out = loss.sum()
    else:
      wsum = np.sum(np.where(valid, w_y, 0.0))
      out = loss.sum() / wsum if wsum != 0 else 0.0
    # A per-token term beyond float32 (the weighted loss, or -log p of a weighted class
    # itself, e.g. 6.8e38 at bf16-max logits): +inf is the documented result; the gradient
    # w.r.t. `weight` is made of these terms, beyond too.
    terms = np.concatenate([loss.reshape(-1), np.where(
        valid[..., None] & (w > 0), nlp, 0.0).reshape(-1)])
    if np.any(np.abs(terms[np.isfinite(terms)]) > FMAX):
      raise Beyond(out, grad_overflows=True)
    return out


def ref_ce_soft(z, q, weight=None, label_smoothing=0.0, reduction="mean", where=None,
                ignore_index=IGNORE):
  """Soft targets: -sum_c w_c q'_c log p_c, q' = q (1 - eps) + eps / V; the mean divides by
  the number of counted tokens (torch's rule, weights or not)."""
  z = _float(z)
  q = np.asarray(q)
  if not (np.issubdtype(q.dtype, np.floating) or q.dtype.name == "bfloat16"):
    raise Bad("soft labels must be floating here")  # integer labels of this shape: invalid
  q = q.astype(np.float64)
  if q.shape != z.shape or z.shape[-1] == 0 or z.ndim < 1:
    raise Bad("shape")
  if ignore_index >= 0:
    raise Bad("ignore_index with soft targets")
  vocab = z.shape[-1]
  w = np.ones(vocab) if weight is None else _class_weight(weight, vocab)
  valid = np.ones(z.shape[:-1], bool) if where is None else np.asarray(where, bool)
  with np.errstate(all="ignore"):
    nlp = _neg_logp(np.where(valid[..., None], z, 0.0))
    qq = np.where(valid[..., None], q, 0.0)
    qs = qq * (1 - label_smoothing) + label_smoothing / vocab
    loss = np.sum(_zero_safe(w * qs, nlp), -1)
    loss = np.where(valid, loss, 0.0)
    # d loss / d z = (sum_c a_c) softmax(z) - a with a = w q': beyond float32 when the
    # targets are (the gradients w.r.t. q and w are -log p and the loss terms).
    a = np.where(valid[..., None], w * qs, 0.0)
    grad_z = a.sum(-1, keepdims=True) * np.exp(-nlp) - a
    rows_ok = np.all(np.isfinite(z) & np.isfinite(q), -1, keepdims=True) & valid[..., None]
    grad_over = bool(np.any(rows_ok & ~(np.abs(grad_z) <= FMAX)))
  if np.any(np.abs(loss[np.isfinite(loss)]) > FMAX) or grad_over:
    raise Beyond(loss.sum() if reduction != "none" else loss, grad_overflows=True)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  return loss.sum() / max(valid.sum(), 1)


SAMPLE_KEY = jax.random.PRNGKey(3)


def ref_categorical(h, w, bias=None, **kw):
  """The Gumbel-max sample the docstring specifies: argmax_c (z_c + G_c), z = h W + b in
  float64, G[:, c] = gumbel(fold_in(key, c), (N,)) (float32, as the function draws it)."""
  h, w = _float(h), _float(w, 2)
  if w.ndim != 2 or w.shape[0] != h.shape[-1] or w.shape[1] < 1:
    raise Bad("kernel shape")
  if bias is not None:
    bias = _float(bias)
    if bias.shape != (w.shape[1],):
      raise Bad("bias shape")
  bs = kw.get("block_size")
  if bs is not None and (isinstance(bs, bool) or not isinstance(bs, (int, np.integer))
                         or bs < 1):
    raise Bad("block_size")
  n = int(np.prod(h.shape[:-1]))
  if n == 0:
    return np.zeros(h.shape[:-1])
  with np.errstate(all="ignore"):
    z = h.reshape(n, -1) @ w + (0.0 if bias is None else bias)
  if np.any(np.abs(z[np.isfinite(z)]) > FMAX):
    raise Beyond(None, matmul=True)
  g = np.stack([np.asarray(jax.random.gumbel(jax.random.fold_in(SAMPLE_KEY, c), (n,),
                                             jnp.float32), np.float64)
                for c in range(w.shape[1])], axis=1)
  v = z + g
  # jnp.argmax's rule: the first NaN wins; else the first maximum. A -inf row: class 0.
  out = np.where(np.isnan(v).any(1), np.argmax(np.isnan(v), 1), np.argmax(
      np.where(np.isnan(v), -np.inf, v), 1))
  return out.reshape(h.shape[:-1]).astype(np.float64)


def ref_causal(z, ids, where=None, **kw):
  z = _float(z, 2)
  if z.shape[:-1] != np.shape(ids):
    raise Bad("shape")
  w = None if where is None else np.asarray(where)[..., 1:]
  return ref_ce(z[..., :-1, :], np.asarray(ids)[..., 1:], where=w, **kw)


def ref_fused(h, w, y, bias=None, logit_soft_cap=None, **kw):
  h, w = _float(h), _float(w)
  if w.ndim != 2 or w.shape[0] != h.shape[-1] or w.shape[1] < 1:
    raise Bad("kernel shape")
  z = h @ w
  bound = np.abs(h) @ np.abs(w)
  if bias is not None:
    b = _float(bias)
    if b.shape != (w.shape[1],):
      raise Bad("bias shape")
    z = z + b
    bound = bound + np.abs(b)
  if np.any(bound[np.isfinite(bound)] > FMAX / 4):
    raise Beyond(None, matmul=True)
  if logit_soft_cap is not None:
    z = logit_soft_cap * np.tanh(z / logit_soft_cap)
  return ref_ce(z, y, **kw)


def _log_softmax(z):
  # (z - m) - log sum exp(z - m): z - _lse(z) would round lse at |z| ~ 1e38 (float64 too).
  with np.errstate(all="ignore"):
    m = np.max(z, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (z - m) - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


def ref_kl(p, q, where=None, reduction="none"):
  p, q = _float(p), _float(q)
  if p.shape != q.shape:
    raise Bad("shape")
  rows = np.ones(p.shape[:-1], bool) if where is None else np.asarray(where, bool)
  with np.errstate(all="ignore"):
    lp, lq = _log_softmax(p), _log_softmax(q)
    pp = np.exp(lp)
    kl = np.sum(np.where(pp > 0, pp * (lp - lq), 0.0), -1)
  kl = np.where(rows, kl, 0.0)
  out = _reduce(kl, rows, reduction)
  if np.any(np.abs(kl[np.isfinite(kl)]) > FMAX):
    # d KL / d p_logits carries the same log p - log q > 3.4e38: beyond float32 too.
    raise Beyond(out, grad_overflows=True)
  return out


def ref_entropy(z, where=None, reduction="none"):
  z = _float(z)
  rows = np.ones(z.shape[:-1], bool) if where is None else np.asarray(where, bool)
  with np.errstate(all="ignore"):
    lp = _log_softmax(z)
    h = -np.sum(np.where(np.exp(lp) > 0, np.exp(lp) * lp, 0.0), -1)
  return _reduce(np.where(rows, h, 0.0), rows, reduction)


def ref_perplexity(z, y, ignore_index=IGNORE, where=None):
  return np.exp(ref_ce(z, y, ignore_index=ignore_index, where=where))


def _acc(z, y, correct_fn, ignore_index=IGNORE, where=None):
  z = _float(z)
  if z.shape[:-1] != np.shape(y):
    raise Bad("shape")
  valid = _labels_ok(y, z.shape[-1], ignore_index, where)
  ys = np.where(valid, y, 0)
  hits = correct_fn(z, ys).astype(np.float64)
  hits = np.where(np.isnan(z).any(-1), np.nan, hits)
  return _reduce(np.where(valid, hits, 0.0), valid, "mean")


def ref_token_accuracy(z, y, **kw):
  return _acc(z, y, lambda z, y: np.argmax(z, -1) == y, **kw)


def ref_top_k(z, y, k, **kw):
  def correct(z, y):
    z_y = np.take_along_axis(z, y[..., None], -1)
    return np.sum(z > z_y, -1) < k
  return _acc(z, y, correct, **kw)


def ref_length_normalized(z, y, ignore_index=IGNORE, where=None, alpha=1.0):
  z = _float(z, 2)
  if z.shape[:-1] != np.shape(y) or np.ndim(y) < 1:
    raise Bad("shape")
  valid = _labels_ok(y, z.shape[-1], ignore_index, where)
  ys = np.where(valid, y, 0)
  with np.errstate(all="ignore"):
    lp = np.where(valid, -_nll(np.where(valid[..., None], z, 0.0), ys), 0.0)
  n = valid.sum(-1)
  return lp.sum(-1) / np.maximum(n, 1) ** alpha


def _normalize(x, eps=1e-8):
  x = _float(x)
  with np.errstate(all="ignore"):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def ref_info_nce(q, p, n, temperature=0.07, reduction="mean", eps=1e-8):
  q, p, n = _float(q, 2), _float(p, 2), _float(n, 2)
  if q.ndim != 2 or p.shape != q.shape or n.ndim not in (2, 3) or n.shape[-1] != q.shape[1] \
     or (n.ndim == 3 and n.shape[0] != q.shape[0]):
    raise Bad("shape")
  qn, pn, nn = _normalize(q, eps), _normalize(p, eps), _normalize(n, eps)
  pos = (qn * pn).sum(-1, keepdims=True)
  neg = np.einsum("bd,bkd->bk", qn, nn) if nn.ndim == 3 else qn @ nn.T
  s = np.concatenate([pos, neg], -1) / temperature
  loss = _nll(s, np.zeros(len(q), int))
  return _reduce(loss, np.ones(len(q), bool), reduction)


def ref_in_batch(a, b, temperature=0.07, symmetric=False, eps=1e-8):
  a, b = _float(a, 2), _float(b, 2)
  if a.ndim != 2 or a.shape != b.shape:
    raise Bad("shape")
  if len(a) == 0:
    return 0.0
  s = _normalize(a, eps) @ _normalize(b, eps).T / temperature
  y = np.arange(len(a))
  l1 = _nll(s, y).mean()
  return 0.5 * (l1 + _nll(s.T, y).mean()) if symmetric else l1


def ref_clip(a, b, logit_scale=math.log(1 / 0.07), max_logit_scale=math.log(100.0), eps=1e-8):
  t = math.exp(min(float(logit_scale), max_logit_scale))
  return ref_in_batch(a, b, temperature=1 / t, symmetric=True, eps=eps)


def ref_pairwise(a, b, eps=1e-8):
  a, b = _float(a, 2), _float(b, 2)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise Bad("shape")
  return _normalize(a, eps) @ _normalize(b, eps).T


def ref_l2(x, axis=-1, eps=1e-8):
  x = _float(x)
  with np.errstate(all="ignore"):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def ref_combine(a, b, wa=1.0, wb=0.5):
  a, b = _float(a, 0), _float(b, 0)
  if a.ndim or b.ndim:
    raise Bad("shape")
  return a * wa + b * wb


# ---------------------------------------------------------------------------------------
# The functions, their base inputs and what can be perturbed.


def _rng(seed=0):
  return np.random.default_rng(seed)


def _base_tokens():
  r = _rng(1)
  z = (2 * r.standard_normal((2, 3, V))).astype(np.float32)
  y = r.integers(0, V, (2, 3)).astype(np.int32)
  y[1, 2] = IGNORE
  return z, y


class Spec:
  def __init__(self, name, arrays, call, ref, *, floats, labels=(), hypers=None,
               grad=True, empty=None, label_index=1, extras=(), nonfinite_documented=None):
    self.name, self.arrays, self.call, self.ref = name, arrays, call, ref
    # Further (description, arrays, hyper kwargs, kind) cases of this function.
    self.extras = extras
    # For an integer output (a sample): what a NaN/inf input gives, as documented.
    self.nonfinite_documented = nonfinite_documented
    self.label_index = label_index   # a counted target (causal_lm_loss drops position 0)
    self.floats, self.labels = floats, labels
    self.hypers = hypers or {}
    self.grad = grad
    self.empty = empty


REAL_BAD = ["0.1", [0.1, 0.2], float("nan"), None, float("inf")]
INT_BAD = ["3", 1.5, True]
FLAG_BAD = ["yes", 2]


def specs():
  z, y = _base_tokens()
  r = _rng(2)
  h = r.standard_normal((6, 4)).astype(np.float32)
  w = (r.standard_normal((4, V)) / 2).astype(np.float32)
  b = r.standard_normal(V).astype(np.float32)
  yf = r.integers(0, V, 6).astype(np.int32)
  yf[5] = IGNORE
  f3 = r.standard_normal((3, 4)).astype(np.float32)
  g3 = (f3 + 0.5 * r.standard_normal((3, 4))).astype(np.float32)
  negs = r.standard_normal((3, 2, 4)).astype(np.float32)
  ce_h = {"label_smoothing": REAL_BAD + [1.5, -0.1], "z_loss": REAL_BAD + [-1.0],
          "ignore_index": INT_BAD, "reduction": ["avg", 1], "validate": FLAG_BAD}
  ce_ok = [dict(), dict(label_smoothing=0.1, z_loss=1e-3), dict(reduction="none"),
           dict(reduction="sum", label_smoothing=1.0)]
  # Class weights (torch's weight=) and soft targets (class probabilities).
  cw = np.asarray([0.5, 2.0, 1.0, 0.0, 3.0], np.float32)
  q = np.asarray(jax.nn.softmax(jnp.asarray(2 * r.standard_normal((2, 3, V)), jnp.float32)))
  wb = dict(logits=z, labels=y, weight=cw)
  weight_extras = [
      ("weight negative", {"weight": _set_first(cw, -1.0)}, {}, "value_check"),
      ("weight all zero", {"weight": np.zeros(V, np.float32)}, {}, "ok"),
      ("weight zero but label class", {"weight": np.where(np.arange(V) == y[0, 0], 1.0, 0.0)
                                       .astype(np.float32)}, {}, "ok"),
      ("weight huge 1e30", {"weight": cw * np.float32(1e30)}, {}, "ok"),
      ("weight float32 max", {"weight": np.full(V, FMAX, np.float32)}, {}, "ok"),
      ("weight tiny 1e-30", {"weight": np.full(V, 1e-30, np.float32)}, {}, "ok"),
      ("weight subnormal 1e-40", {"weight": np.full(V, 1e-40, np.float32)}, {}, "ok"),
      ("weight int32", {"weight": np.asarray([1, 2, 0, 3, 1], np.int32)}, {}, "ok"),
      ("weight list", {"weight": [1.0] * V}, {}, "ok"),
      ("weight float64", {"weight": cw.astype(np.float64)}, {}, "ok"),
      ("weight [V,1]", {"weight": cw[:, None]}, {}, "shape"),
      ("weight [1]", {"weight": cw[:1]}, {}, "shape"),
      ("weight -inf logit zero-weight class", {"logits": np.where(
          np.arange(V) == 3, -np.inf, z).astype(np.float32)}, {}, "nonfinite"),
  ]
  soft_extras = [
      ("labels negative prob", {"labels": _set_first(q, -0.5)}, {}, "ok"),
      ("labels sum 2", {"labels": q * 2}, {}, "ok"),
      ("labels all zero", {"labels": np.zeros_like(q)}, {}, "ok"),
      ("labels one-hot", {"labels": np.eye(V, dtype=np.float32)[np.abs(y) % V]}, {}, "ok"),
      ("labels prob 0 at -inf logit", {
          "logits": np.where(np.arange(V) == 0, -np.inf, z).astype(np.float32),
          "labels": np.where(np.arange(V) == 0, 0.0, q).astype(np.float32)}, {}, "nonfinite"),
      ("labels prob > 0 at -inf logit", {
          "logits": np.where(np.arange(V) == 0, -np.inf, z).astype(np.float32)}, {},
       "nonfinite"),
      ("labels [..., V] int", {"labels": (q > 0.2).astype(np.int32)}, {}, "shape"),
      ("labels float [...]", {"labels": y.astype(np.float32)}, {}, "shape"),
  ]
  sample_extras = [
      ("block_size=1", {}, {"block_size": 1}, "ok"),
      ("block_size=2", {}, {"block_size": 2}, "ok"),
      ("block_size=3", {}, {"block_size": 3}, "ok"),
      ("block_size=V+7", {}, {"block_size": V + 7}, "ok"),
      ("block_size=None", {}, {"block_size": None}, "ok"),
      ("block_size=np.int64(2)", {}, {"block_size": np.int64(2)}, "ok"),
      ("bias -inf at class 1", {"bias": np.where(np.arange(V) == 1, -np.inf, b)
                                .astype(np.float32)}, {}, "nonfinite"),
      ("bias all -inf", {"bias": np.full(V, -np.inf, np.float32)}, {}, "nonfinite"),
      ("hidden 3-D", {"hidden": h.reshape(2, 3, 4)}, {}, "ok"),
      ("hidden 1-D (one token)", {"hidden": h[0]}, {}, "ok"),
      ("bias None", {"bias": None}, {}, "ok"),
      ("kernel V=1", {"kernel": w[:, :1], "bias": b[:1]}, {}, "ok"),
      ("kernel V=0", {"kernel": w[:, :0], "bias": b[:0]}, {}, "shape"),
      ("hidden x64 array", {"hidden": h.astype(np.float64)}, {}, "ok"),
  ]
  return [
      Spec("cross_entropy", dict(logits=z, labels=y),
           lambda a, **k: L.cross_entropy(a["logits"], a["labels"], **k), ref_ce,
           floats=["logits"], labels=[("labels", V)], hypers=ce_h, empty=dict(
               logits=z[:0], labels=y[:0])),
      Spec("cross_entropy[smoothing,z_loss]", dict(logits=z, labels=y),
           lambda a, **k: L.cross_entropy(a["logits"], a["labels"], label_smoothing=0.1,
                                          z_loss=1e-3, **k),
           lambda z, y, **k: ref_ce(z, y, label_smoothing=0.1, z_loss=1e-3, **k),
           floats=["logits"], labels=[("labels", V)]),
      Spec("cross_entropy[where]", dict(logits=z, labels=y,
                                        where=np.asarray([[1, 0, 1], [1, 1, 0]], bool)),
           lambda a, **k: L.cross_entropy(a["logits"], a["labels"], where=a["where"],
                                          reduction="none", **k),
           lambda z, y, where, **k: ref_ce(z, y, where=where, reduction="none", **k),
           floats=["logits"], labels=[("labels", V)], label_index=0),
      Spec("cross_entropy[weight]", dict(logits=z, labels=y, weight=cw),
           lambda a, **k: L.cross_entropy(a["logits"], a["labels"], weight=a["weight"],
                                          label_smoothing=0.1, **k),
           ref_ce_weight, floats=["logits", "weight"], labels=[("labels", V)],
           hypers={"reduction": ["avg"], "validate": FLAG_BAD},
           empty=dict(logits=z[:0], labels=y[:0], weight=cw), extras=weight_extras),
      Spec("cross_entropy[weight,none]", dict(logits=z, labels=y, weight=cw),
           lambda a, **k: L.cross_entropy(a["logits"], a["labels"], weight=a["weight"],
                                          label_smoothing=0.1, reduction="none", **k),
           lambda z, y, weight, **k: ref_ce_weight(z, y, weight, reduction="none", **k),
           floats=["weight"], extras=weight_extras),
      Spec("cross_entropy[soft]", dict(logits=z, labels=q),
           lambda a, **k: L.cross_entropy(a["logits"], a["labels"], **k), ref_ce_soft,
           floats=["logits", "labels"],
           hypers={"ignore_index": [0, 3, "1", 1.5], "reduction": ["avg"],
                   "label_smoothing": [-0.1, 1.5]},
           empty=dict(logits=z[:0], labels=q[:0]), extras=soft_extras),
      Spec("cross_entropy[soft,weight,smooth,where]",
           dict(logits=z, labels=q, weight=cw, where=np.asarray([[1, 0, 1], [1, 1, 0]], bool)),
           lambda a, **k: L.cross_entropy(a["logits"], a["labels"], weight=a["weight"],
                                          where=a["where"], label_smoothing=0.2, **k),
           lambda z, q, weight, where, **k: ref_ce_soft(z, q, weight, 0.2, where=where, **k),
           floats=["logits", "labels", "weight"], extras=weight_extras),
      Spec("categorical_from_hidden", dict(hidden=h, kernel=w, bias=b),
           lambda a, **k: L.categorical_from_hidden(a["hidden"], a["kernel"], SAMPLE_KEY,
                                                    bias=a["bias"], **k),
           ref_categorical, floats=["hidden", "kernel", "bias"], grad=False,
           hypers={"block_size": [0, -1, 1.5, "2", True, [2]]},
           empty=dict(hidden=h[:0], kernel=w, bias=b), extras=sample_extras,
           nonfinite_documented="a NaN logit row gets its first NaN's class, a -inf class is "
                                "never drawn (documented; the output is integer)"),
      Spec("causal_lm_loss", dict(logits=z, input_ids=np.abs(y) % V),
           lambda a, **k: L.causal_lm_loss(a["logits"], a["input_ids"], **k), ref_causal,
           floats=["logits"], labels=[("input_ids", V)],
           hypers={"label_smoothing": REAL_BAD, "z_loss": REAL_BAD, "reduction": ["avg"],
                   "validate": FLAG_BAD, "bogus": [1]},
           empty=dict(logits=z[:0], input_ids=y[:0])),
      Spec("masked_lm_loss", dict(logits=z, labels=y),
           lambda a, **k: L.masked_lm_loss(a["logits"], a["labels"], **k), ref_ce,
           floats=["logits"], labels=[("labels", V)], hypers=ce_h,
           empty=dict(logits=z[:0], labels=y[:0])),
      Spec("fused_linear_cross_entropy", dict(hidden=h, kernel=w, labels=yf, bias=b),
           lambda a, **k: L.fused_linear_cross_entropy(
               a["hidden"], a["kernel"], a["labels"], bias=a["bias"], chunk_size=4, **k),
           lambda h, w, y, bias, **k: ref_fused(h, w, y, bias=bias, **k),
           floats=["hidden", "kernel", "bias"], labels=[("labels", V)],
           hypers={**ce_h, "logit_soft_cap": ["30", [1.0, 2.0], 0.0, -1.0, float("nan")]},
           empty=dict(hidden=h[:0], kernel=w, labels=yf[:0], bias=b)),
      Spec("fused_linear_cross_entropy[none,softcap]",
           dict(hidden=h, kernel=w, labels=yf, bias=b),
           lambda a, **k: L.fused_linear_cross_entropy(
               a["hidden"], a["kernel"], a["labels"], bias=a["bias"], chunk_size=4,
               reduction="none", logit_soft_cap=3.0, label_smoothing=0.1, z_loss=1e-3, **k),
           lambda h, w, y, bias, **k: ref_fused(h, w, y, bias=bias, reduction="none",
                                                logit_soft_cap=3.0, label_smoothing=0.1,
                                                z_loss=1e-3, **k),
           floats=["hidden", "kernel", "bias"], labels=[("labels", V)]),
      Spec("kl_divergence_from_logits", dict(p_logits=z, q_logits=z[::-1].copy()),
           lambda a, **k: L.kl_divergence_from_logits(a["p_logits"], a["q_logits"],
                                                      **{"reduction": "mean", **k}),
           lambda p, q, **k: ref_kl(p, q, **{"reduction": "mean", **k}),
           floats=["p_logits", "q_logits"], hypers={"reduction": ["avg", None]},
           empty=dict(p_logits=z[:0], q_logits=z[:0])),
      Spec("entropy", dict(logits=z),
           lambda a, **k: L.entropy(a["logits"], **k), ref_entropy, floats=["logits"],
           hypers={"reduction": ["avg", None]}, empty=dict(logits=z[:0])),
      Spec("perplexity", dict(logits=z, labels=y),
           lambda a, **k: L.perplexity(a["logits"], a["labels"], **k), ref_perplexity,
           floats=["logits"], labels=[("labels", V)], hypers={"ignore_index": INT_BAD},
           grad=False,   # a metric: exp(mean CE) has no useful gradient at overflow
           empty=dict(logits=z[:0], labels=y[:0])),
      Spec("token_accuracy", dict(logits=z, labels=y),
           lambda a, **k: L.token_accuracy(a["logits"], a["labels"], **k),
           ref_token_accuracy, floats=["logits"], labels=[("labels", V)], grad=False,
           hypers={"ignore_index": INT_BAD}, empty=dict(logits=z[:0], labels=y[:0])),
      Spec("top_k_accuracy", dict(logits=z, labels=y),
           lambda a, **k: L.top_k_accuracy(a["logits"], a["labels"], **{"k": 2, **k}),
           lambda z, y, **k: ref_top_k(z, y, **{"k": 2, **k}), floats=["logits"],
           labels=[("labels", V)], grad=False,
           hypers={"k": INT_BAD + [0, None], "ignore_index": INT_BAD},
           empty=dict(logits=z[:0], labels=y[:0])),
      Spec("length_normalized_score", dict(logits=z, labels=y),
           lambda a, **k: L.length_normalized_score(a["logits"], a["labels"], **k),
           ref_length_normalized, floats=["logits"], labels=[("labels", V)],
           hypers={"alpha": REAL_BAD + [-1.0], "ignore_index": INT_BAD},
           empty=dict(logits=z[:0], labels=y[:0])),
      Spec("info_nce", dict(query=f3, positive=g3, negatives=negs),
           lambda a, **k: L.info_nce(a["query"], a["positive"], a["negatives"], **k),
           ref_info_nce, floats=["query", "positive", "negatives"],
           hypers={"temperature": REAL_BAD + [0.0, -1.0], "reduction": ["avg"],
                   "eps": REAL_BAD + [0.0]},
           empty=dict(query=f3[:0], positive=g3[:0], negatives=negs[:0])),
      Spec("in_batch_info_nce", dict(a=f3, b=g3),
           lambda a, **k: L.in_batch_info_nce(a["a"], a["b"], **k), ref_in_batch,
           floats=["a", "b"], hypers={"temperature": REAL_BAD + [0.0],
                                      "symmetric": FLAG_BAD, "eps": REAL_BAD},
           empty=dict(a=f3[:0], b=g3[:0])),
      Spec("clip_loss", dict(a=f3, b=g3),
           lambda a, **k: L.clip_loss(a["a"], a["b"], **k), ref_clip, floats=["a", "b"],
           hypers={"logit_scale": REAL_BAD, "max_logit_scale": REAL_BAD, "eps": REAL_BAD},
           empty=dict(a=f3[:0], b=g3[:0])),
      Spec("pairwise_cosine_similarity", dict(a=f3, b=g3),
           lambda a, **k: L.pairwise_cosine_similarity(a["a"], a["b"], **k), ref_pairwise,
           floats=["a", "b"], hypers={"eps": REAL_BAD + [0.0]},
           empty=dict(a=f3[:0], b=g3[:0])),
      Spec("l2_normalize", dict(x=f3),
           lambda a, **k: L.l2_normalize(a["x"], **k), ref_l2, floats=["x"],
           hypers={"eps": REAL_BAD + [0.0], "axis": ["1", 1.5, 7, None]},
           empty=dict(x=f3[:0])),
      Spec("combine_losses", dict(a=np.float32(1.5), b=np.float32(2.0)),
           lambda a, **k: L.combine_losses({"a": a["a"], "b": (a["b"], k.get("w", 0.5))},
                                           {} if "wa" not in k else {"a": k["wa"]})[0],
           lambda a, b, **k: ref_combine(a, b, wa=k.get("wa", 1.0), wb=k.get("w", 0.5)),
           floats=["a", "b"], hypers={"w": REAL_BAD, "wa": REAL_BAD}),
  ]


# ---------------------------------------------------------------------------------------
# Perturbations.


def _set_first(x, value, index=0):
  x = np.array(x, copy=True)
  if x.size > index:
    x.reshape(-1)[index] = value
  return x


def perturbations(spec):
  """(description, arrays, hyper kwargs, kind); kind in {"ok", "nonfinite", "invalid",
  "label", "lowp"}."""
  base = spec.arrays
  yield "base", base, {}, "ok"
  for name in spec.floats:
    for desc, val in (("NaN", np.nan), ("+inf", np.inf), ("-inf", -np.inf)):
      yield f"{name}[0]={desc}", {**base, name: _set_first(base[name], val)}, {}, "nonfinite"
    yield f"{name}[0]=1e30", {**base, name: _set_first(base[name], 1e30)}, {}, "ok"
    yield f"{name}*1e4", {**base, name: base[name] * np.float32(1e4)}, {}, "ok"
    big = np.where(np.asarray(base[name]) >= 0, BF16_MAX, -BF16_MAX)
    yield f"{name}=+-bf16max", {**base, name: jnp.asarray(big, jnp.bfloat16)}, {}, "ok"
    for dt in ("bfloat16", "float16"):
      yield f"{name} {dt}", {**base, name: jnp.asarray(base[name], dt)}, {}, "lowp"
    yield f"{name} int32", {**base, name: np.asarray(base[name]).astype(np.int32)}, {}, \
        "invalid"
    yield f"{name} bool", {**base, name: np.asarray(base[name]) > 0}, {}, "invalid"
    yield f"{name} complex", {**base, name: np.asarray(base[name]).astype(np.complex64)}, \
        {}, "invalid"
    x = np.asarray(base[name])
    if x.ndim >= 1:
      yield f"{name} last axis -1", {**base, name: x[..., :-1]}, {}, "shape"
      yield f"{name} extra axis", {**base, name: x[None]}, {}, "shape"
      yield f"{name} scalar", {**base, name: x.reshape(-1)[:1].reshape(())}, {}, "shape"
    else:
      yield f"{name} vector", {**base, name: np.stack([x, x])}, {}, "shape"
  for name, vocab in spec.labels:
    y = np.asarray(base[name])
    for val in (vocab, -1, 2**31 - 1, -2**31):
      i = spec.label_index
      yield f"{name}[{i}]={val}", {**base, name: _set_first(y, val, i)}, {}, "label"
    yield f"{name} float", {**base, name: y.astype(np.float32)}, {}, "invalid"
    yield f"{name} uint8", {**base, name: np.where(y < 0, 0, y).astype(np.uint8)}, {}, "ok"
    yield f"{name} all ignored", {**base, name: np.full_like(y, IGNORE)}, {}, "ok"
    yield f"{name} shape -1", {**base, name: y[..., :-1]}, {}, "shape"
  if spec.empty is not None:
    yield "empty", spec.empty, {}, "ok"
  for desc, changes, hyper, kind in spec.extras:
    yield desc, {**base, **changes}, hyper, kind
  for hname, values in spec.hypers.items():
    for v in values:
      yield f"{hname}={v!r}", base, {hname: v}, "hyper"


# ---------------------------------------------------------------------------------------
# Running and classifying.

_NAMED = re.compile(r"`[^`]+`")


def _clear(exc, spec_name):
  if isinstance(exc, checkify.JaxRuntimeError):
    return True
  if not isinstance(exc, (TypeError, ValueError, NotImplementedError)):
    return False
  msg = str(exc)
  owner = spec_name.split("[")[0]
  return bool(_NAMED.search(msg)) and (owner in msg or "unexpected keyword" in msg) \
      or "unexpected keyword argument" in msg


def _reference(spec, arrays, hyper):
  kw = {k: v for k, v in hyper.items()}
  args = [None if a is None else np.asarray(jnp.asarray(a).astype(jnp.float32)) if
          jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else np.asarray(a)
          for a in arrays.values()]
  return spec.ref(*args, **kw)


def _finite(x):
  return bool(np.all(np.isfinite(np.asarray(x, np.float64))))


def _has_nan(x):
  return bool(np.any(np.isnan(np.asarray(x, np.float64))))


def run_case(spec, desc, arrays, hyper, kind, mode):
  """Returns (category, detail)."""
  names = list(arrays)

  def f(*xs):
    return spec.call(dict(zip(names, xs)), **hyper)

  fn = jax.jit(f) if mode == "jit" else f
  xs = [a if a is None or isinstance(a, jax.Array) else jnp.asarray(a)
        for a in arrays.values()]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      out = fn(*xs)
      out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    except Exception as exc:  # noqa: BLE001 - classifying every failure is the point
      if _clear(exc, spec.name):
        if kind in ("invalid", "shape", "hyper", "label", "value_check") or (
            kind == "ok" and "bf16max" in desc and False):
          return "clear error", type(exc).__name__
        # A clear error for an input the reference can compute: acceptable only if the
        # reference agrees it is invalid.
        try:
          _reference(spec, arrays, hyper)
        except Bad:
          return "clear error", type(exc).__name__
        except Exception:
          return "clear error", type(exc).__name__
        return "silent wrong", f"rejected a valid input: {exc}"
      return "unreadable crash", f"{type(exc).__name__}: {str(exc)[:200]}"

    beyond = None
    try:
      ref = _reference(spec, arrays, hyper)
      ref = np.asarray(ref, np.float64)
    except Beyond as e:
      beyond, ref = e, None
    except Flushed as e:
      return "documented limit", f"{e}: got {out}"
    except ValueCheck as e:
      if mode == "eager":
        return "silent wrong", f"accepted an invalid concrete input ({e}); got {out}"
      # Traced: the values are unknown when the function is traced (documented).
      if not _finite(out) and any(not _finite(np.asarray(jnp.asarray(x).astype(jnp.float32)))
                                  for x in xs if x is not None and jnp.issubdtype(
                                      jnp.asarray(x).dtype, jnp.floating)):
        return "propagated", "traced non-finite weight"
      return "documented limit", f"traced {e} not checked (documented): {out}"
    except Bad as e:
      if kind == "label" and mode == "jit":
        ref = None   # out-of-range label under jit: NaN expected
      else:
        return "silent wrong", f"accepted an invalid input ({e}); got {out}"
    except Exception as e:  # reference cannot say (e.g. hyperparameter of another kind)
      if kind == "hyper":
        return "silent wrong", f"accepted hyperparameter {hyper}; got {out}"
      ref = None

    # Gradient, where defined: of sum(out) with respect to the float inputs.
    grad = None
    if spec.grad:
      fl = [i for i, n in enumerate(names) if n in spec.floats and xs[i] is not None
            and jnp.issubdtype(xs[i].dtype, jnp.floating)]
      if fl:
        def scalar(*all_xs):
          return jnp.sum(f(*all_xs).astype(jnp.float32))
        g = jax.grad(scalar, argnums=tuple(fl))
        g = jax.jit(g) if mode == "jit" else g
        try:
          grad = [np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64)
                  for t in g(*xs)]
        except Exception as exc:  # noqa: BLE001
          return "unreadable crash", f"gradient: {type(exc).__name__}: {str(exc)[:200]}"

  if kind == "label" and mode == "jit":
    if _has_nan(out) and (grad is None or all(_has_nan(t) for t in grad)):
      return "flagged NaN", ""
    return "silent wrong", f"bad label under jit: value {out}, grad NaN-free"
  if kind == "hyper":
    return "silent wrong", f"accepted hyperparameter {hyper}; got {out}"
  if kind == "value_check":
    return "silent wrong", f"accepted an invalid value; got {out}"

  if beyond is not None:
    if beyond.matmul:
      return "beyond float32", "logits overflow float32 (h @ W products > 3.4e38)"
    grad_nan = grad is not None and any(_has_nan(t) for t in grad)
    if _has_nan(out) or (grad_nan and not beyond.grad_overflows):
      return "silent wrong", f"NaN where the true value overflows (never NaN): {out}"
    if not _finite(out) or np.allclose(out, beyond.value, rtol=1e-4):
      return "beyond float32", "+inf: a per-token true value beyond 3.4e38"
    return "silent wrong", f"got {out}, reference {beyond.value}"
  nonfinite_in = any(not _finite(np.asarray(jnp.asarray(x).astype(jnp.float32)))
                     for x in xs if x is not None and
                     jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating))
  if spec.nonfinite_documented and nonfinite_in and ref is not None and _finite(out) and \
      out.shape == np.shape(ref) and np.array_equal(out, ref):
    return "documented limit", spec.nonfinite_documented
  if _has_nan(out):
    if nonfinite_in and (ref is None or not _finite(ref)):
      return "propagated", "NaN"
    return "silent wrong", f"NaN from finite input (reference {ref})"
  if not _finite(out):   # +-inf without NaN
    if ref is not None and _finite(ref) and np.max(np.abs(ref)) < 3e38:
      return "silent wrong", f"inf where the reference is {ref}"
    if nonfinite_in:
      return "propagated", "inf"
    if grad is not None and any(_has_nan(t) for t in grad):
      return "silent wrong", f"inf (true value {ref}) with a NaN gradient"
    # Finite inputs, reference inf or within 1% of the float32 maximum: a true value (or a
    # per-token term of it) beyond float32.
    return "beyond float32", "+inf: the true value (or a per-token term) beyond 3.4e38"
  # Finite result.
  if ref is not None:
    if not _finite(ref):
      if nonfinite_in:
        # A limit the reference cannot take (e.g. -inf logits of a masked class).
        return "finite result", "reference undefined, input non-finite"
      return "silent wrong", f"finite {out} where the reference is {ref}"
    tol = 2e-2 if kind == "lowp" else 1e-4
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    if out.shape != ref.shape or not np.allclose(out, ref, rtol=tol, atol=tol * 1e-2 * scale):
      return "silent wrong", f"got {out}, reference {ref}"
  if grad is not None and any(_has_nan(t) for t in grad):
    if nonfinite_in:
      return "propagated", "NaN gradient of non-finite input"
    return "silent wrong", "NaN gradient of a finite loss"
  return "finite result", ""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--verbose", action="store_true", help="print every case")
  parser.add_argument("--only", default=None, help="run only specs whose name contains this")
  parser.add_argument("--skip", default=None,
                      help="skip the specs whose name contains this (e.g. fused)")
  args = parser.parse_args(argv)
  counts = collections.Counter()
  per_fn = collections.defaultdict(collections.Counter)
  bad = []
  for spec in specs():
    if args.only and args.only not in spec.name:
      continue
    if args.skip and args.skip in spec.name:
      continue
    for desc, arrays, hyper, kind in perturbations(spec):
      for mode in ("eager", "jit"):
        try:
          cat, detail = run_case(spec, desc, arrays, hyper, kind, mode)
        except Exception:  # noqa: BLE001 - a bug of this script, reported as such
          cat, detail = "unreadable crash", "fuzz harness: " + traceback.format_exc(limit=2)
        counts[cat] += 1
        per_fn[spec.name][cat] += 1
        line = f"{cat:<17} {spec.name:<40} {mode:<5} {desc:<28} {detail}"
        if cat in ("silent wrong", "unreadable crash"):
          bad.append(line)
        if args.verbose:
          print(line)
  cats = ["clear error", "finite result", "propagated", "flagged NaN", "beyond float32",
          "documented limit", "silent wrong", "unreadable crash"]
  print(f"\n{'function':<40} " + " ".join(f"{c[:13]:>13}" for c in cats))
  for name, c in per_fn.items():
    print(f"{name:<40} " + " ".join(f"{c[k]:>13}" for k in cats))
  total = sum(counts.values())
  print(f"\n{total} cases: " + ", ".join(f"{counts[c]} {c}" for c in cats))
  if bad:
    print("\nNot OK:")
    print("\n".join(bad))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
