"""Tests for jaxopt_llm.losses._common: the rules it decides for every loss and metric.

``_common`` holds the dtype rule (``compute_dtype``), the hyperparameter checks and the
per-row softmax NLL that the token, fused and contrastive losses share, so its tests run
across the public API: float64 kept under x64, empty inputs give 0 (and zero gradients),
every hyperparameter's bad value raises naming it. (Each loss's own numerics are in its
module's tests.)
"""
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm import losses as L
from jaxopt_llm.losses import _common
from jaxopt_llm.losses.fused import default_chunk_size


def _x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.8
  return enable_x64()


def _np_nll(z, y):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(z - m).sum(-1))
  return lse - np.take_along_axis(z, np.asarray(y)[..., None], -1)[..., 0]


# ---------------------------------------------------------------------------------------
# softmax_nll itself.


def test_softmax_nll_parts_equations_and_derivatives():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((5, 6)) * 4, jnp.float32)
  y = jnp.asarray([0, 5, 2, 2, 3])
  z = z.at[2].set(z[2].at[2].set(20.0))       # a near-certain row
  z = z.at[3].set(jnp.where(jnp.arange(6) == 4, -jnp.inf, z[3]))   # a masked class
  parts = _common.softmax_nll_parts(z, y)
  zf = np.where(np.isinf(np.asarray(z)), -1e300, np.asarray(z, np.float64))
  np.testing.assert_allclose(np.asarray(parts.nll), _np_nll(zf, y), rtol=1e-5, atol=1e-7)
  lse = np.log(np.exp(zf).sum(-1))
  np.testing.assert_allclose(np.asarray(parts.lse), lse, rtol=1e-6)
  p = np.exp(zf - lse[:, None])
  np.testing.assert_allclose(np.asarray(parts.label_grad), p[np.arange(5), y] - 1,
                             rtol=1e-4, atol=1e-7)
  # Forward and reverse mode agree with the equations; the second derivative of lse is
  # diag(p) - p p^T (the custom_jvp rule is itself differentiable).
  dz = jnp.asarray(rng.standard_normal((5, 6)), jnp.float32).at[3, 4].set(0.0)
  (_, _), (t_nll, t_lse) = jax.jvp(_common.softmax_nll, (z, y),
                                   (dz, np.zeros(5, jax.dtypes.float0)))
  onehot = np.eye(6)[np.asarray(y)]
  np.testing.assert_allclose(np.asarray(t_nll), ((p - onehot) * np.asarray(dz)).sum(-1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(t_lse), (p * np.asarray(dz)).sum(-1), rtol=1e-5,
                             atol=1e-6)
  row = jnp.asarray([0.5, -1.0, 2.0])
  hess = jax.hessian(lambda r: _common.softmax_nll(r[None], jnp.asarray([1]))[1][0])(row)
  pr = np.exp(np.asarray(row, np.float64)) / np.exp(np.asarray(row, np.float64)).sum()
  np.testing.assert_allclose(np.asarray(hess), np.diag(pr) - np.outer(pr, pr), rtol=1e-5,
                             atol=1e-7)


def test_softmax_nll_special_values():
  z = jnp.asarray([[0.0, -jnp.inf, 1.0],      # a masked class: finite
                   [-jnp.inf, 0.0, 1.0],      # the label's logit is -inf: +inf
                   [jnp.nan, 0.0, 1.0],       # NaN anywhere: NaN
                   [5.0, 5.0, 5.0]])          # ties: log 3
  nll, lse = _common.softmax_nll(z, jnp.asarray([0, 0, 1, 2]))
  np.testing.assert_allclose(float(nll[0]), np.log1p(np.e), rtol=1e-6)
  assert float(nll[1]) == np.inf
  assert np.isnan(float(nll[2]))
  np.testing.assert_allclose(float(nll[3]), np.log(3.0), rtol=1e-6)
  np.testing.assert_allclose(float(lse[3]), 5.0 + np.log(3.0), rtol=1e-6)
  g = jax.grad(lambda z: _common.softmax_nll(z, jnp.asarray([0, 2]))[0].sum())(
      jnp.asarray([[0.0, -jnp.inf, 1.0], [5.0, 5.0, 5.0]]))
  assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(np.asarray(g[1]), [1 / 3, 1 / 3, -2 / 3], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# float64 under x64: computed in float64 everywhere, never silently downcast.


def test_float64_logits_shifted_by_1e9_keep_their_loss():
  """The issue's case: float32 rounds every logit of 1e9 + [0 .. 3] to 1e9 and the loss to
  log(4) - ... ; float64 keeps the exact (shift-invariant) value."""
  base = np.asarray([[0.0, 1.0, 2.0, 3.0], [2.5, -1.0, 0.5, 0.0]])
  labels = np.asarray([1, 0])
  with _x64():
    z = jnp.asarray(base + 1e9, jnp.float64)
    out = L.cross_entropy(z, jnp.asarray(labels), reduction="none")
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), _np_nll(base, labels), rtol=1e-6)
    np.testing.assert_allclose(float(out[0]), 2.4401896985611957, rtol=1e-6)


def _x64_cases():
  """(name, fn() -> (value, float64 reference)); the inputs are built inside x64."""
  rng = np.random.default_rng(1)
  base = rng.standard_normal((2, 3, 5))
  labels = np.asarray([[0, 4, -100], [2, 1, 3]])
  flat_l = labels.reshape(-1)
  valid = flat_l != -100
  nll = np.where(valid, _np_nll(base.reshape(-1, 5), np.where(valid, flat_l, 0)), 0.0)
  mean_nll = nll.sum() / valid.sum()
  flat_y0 = np.where(valid, flat_l, 0)
  w5 = np.asarray([0.5, 1.0, 2.0, 0.25, 1.5])
  soft = rng.dirichlet(np.ones(5), (2, 3))
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  shifted = lambda: jnp.asarray(base + 1e9, jnp.float64)
  lab = lambda: jnp.asarray(labels)
  feats = rng.standard_normal((3, 4))
  feats_b = feats + 1e-6 * rng.standard_normal((3, 4))   # cosines within 1e-12 of 1

  def np_info(a, b, negs, tau):
    na = a / np.linalg.norm(a, axis=-1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=-1, keepdims=True)
    nn = negs / np.linalg.norm(negs, axis=-1, keepdims=True)
    s = np.concatenate([(na * nb).sum(-1, keepdims=True), na @ nn.T], 1) / tau
    return _np_nll(s, np.zeros(len(a), int)).mean()

  def np_in_batch(a, b, tau):
    na = a / np.linalg.norm(a, axis=-1, keepdims=True)
    nb = b / np.linalg.norm(b, axis=-1, keepdims=True)
    s = na @ nb.T / tau
    return _np_nll(s, np.arange(len(a))).mean(), _np_nll(s.T, np.arange(len(a))).mean()

  p = base[0] + 1e9
  q = base[1] + 1e9
  pp = np.exp(base[0] - base[0].max(-1, keepdims=True))
  pp /= pp.sum(-1, keepdims=True)
  qq = np.exp(base[1] - base[1].max(-1, keepdims=True))
  qq /= qq.sum(-1, keepdims=True)
  hidden = rng.standard_normal((6, 3))
  kernel = rng.standard_normal((3, 5))
  y6 = np.asarray([0, 1, 2, 3, 4, -100])
  fused_ref = _np_nll(hidden @ kernel, np.where(y6 < 0, 0, y6))[:5].mean()
  return {
      "cross_entropy": lambda: (L.cross_entropy(shifted(), lab()), mean_nll),
      "causal_lm_loss": lambda: (
          L.causal_lm_loss(shifted(), jnp.asarray([[0, 4, 1], [2, 1, 3]])),
          _np_nll(base[:, :2], np.asarray([[4, 1], [1, 3]])).mean()),
      "masked_lm_loss": lambda: (L.masked_lm_loss(shifted(), lab()), mean_nll),
      "fused_linear_cross_entropy": lambda: (
          L.fused_linear_cross_entropy(jnp.asarray(hidden), jnp.asarray(kernel),
                                       jnp.asarray(y6), bias=jnp.full((5,), 1e9),
                                       chunk_size=4), fused_ref),
      "cross_entropy_weighted": lambda: (   # a float64 weight keeps float64 too
          L.cross_entropy(shifted(), lab(), weight=jnp.asarray(w5, jnp.float64)),
          (w5[flat_y0] * nll)[valid].sum() / w5[flat_y0][valid].sum()),
      "cross_entropy_soft": lambda: (
          L.cross_entropy(shifted(), jnp.asarray(soft, jnp.float64), label_smoothing=0.1),
          (-(soft * 0.9 + 0.02) * np.log(softmax(base))).sum(-1).mean()),
      "perplexity": lambda: (L.perplexity(shifted(), lab()), np.exp(mean_nll)),
      "length_normalized_score": lambda: (
          L.length_normalized_score(shifted(), lab()),
          -np.asarray([nll[:2].sum() / 2, nll[3:].sum() / 3])),
      "token_accuracy": lambda: (   # float32 rounds 1e9 + 0.5 to 1e9: a tie, argmax 0
          L.token_accuracy(jnp.asarray([[1e9, 1e9 + 0.5]]), jnp.asarray([1])), 1.0),
      "top_k_accuracy": lambda: (
          L.top_k_accuracy(jnp.asarray([[1e9 + 0.5, 1e9, 1e9 + 0.25]]), jnp.asarray([1]),
                           k=2), 0.0),
      "kl_divergence_from_logits": lambda: (
          L.kl_divergence_from_logits(jnp.asarray(p), jnp.asarray(q)),
          (pp * (np.log(pp) - np.log(qq))).sum(-1)),
      "entropy": lambda: (L.entropy(jnp.asarray(p)), -(pp * np.log(pp)).sum(-1)),
      "info_nce": lambda: (
          L.info_nce(jnp.asarray(feats), jnp.asarray(feats_b), jnp.asarray(feats[::-1]),
                     temperature=1e-7),
          np_info(feats, feats_b, feats[::-1], 1e-7)),
      "in_batch_info_nce": lambda: (
          L.in_batch_info_nce(jnp.asarray(feats), jnp.asarray(feats_b), temperature=1e-7),
          np_in_batch(feats, feats_b, 1e-7)[0]),
      "clip_loss": lambda: (
          L.clip_loss(jnp.asarray(feats), jnp.asarray(feats_b), jnp.asarray(math.log(1e7)),
                      max_logit_scale=20.0),
          0.5 * sum(np_in_batch(feats, feats_b, 1e-7))),
      "pairwise_cosine_similarity": lambda: (
          L.pairwise_cosine_similarity(jnp.asarray(feats), jnp.asarray(feats_b)),
          (feats / np.linalg.norm(feats, axis=1, keepdims=True))
          @ (feats_b / np.linalg.norm(feats_b, axis=1, keepdims=True)).T),
      "l2_normalize": lambda: (L.l2_normalize(jnp.asarray(feats_b)),
                               feats_b / np.linalg.norm(feats_b, axis=1, keepdims=True)),
      "combine_losses": lambda: (
          L.combine_losses({"a": jnp.asarray(1.0 + 1e-12), "b": (jnp.asarray(2e-12), 0.5)})[0],
          1.0 + 2e-12),
  }


@pytest.mark.parametrize("name", sorted(_x64_cases()))
def test_float64_inputs_are_computed_in_float64(name):
  """Each case's float32 evaluation is far off (logits 1e9 + O(1), cosines within 1e-12
  of each other at temperature 1e-7, 1 + 1e-12): only float64 math meets rtol 1e-6."""
  with _x64():
    out, ref = _x64_cases()[name]()
    assert out.dtype == jnp.float64, out.dtype
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-9)


def test_x64_does_not_leak():
  assert jnp.asarray(1.0).dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# Empty inputs: 0 (perplexity 1) with zero gradients, never NaN.


def _empty_cases():
  z = jnp.zeros((0, 5))
  y = jnp.zeros((0,), jnp.int32)
  feats = jnp.zeros((0, 4))
  return {
      "cross_entropy": (lambda z: L.cross_entropy(z, y), z, 0.0),
      "cross_entropy_sum": (lambda z: L.cross_entropy(z, y, reduction="sum"), z, 0.0),
      "cross_entropy_weighted": (lambda z: L.cross_entropy(z, y, weight=jnp.ones(5)), z,
                                 0.0),
      "cross_entropy_soft": (lambda z: L.cross_entropy(z, jnp.zeros((0, 5))), z, 0.0),
      "causal_lm_loss": (lambda z: L.causal_lm_loss(z, jnp.zeros((2, 0), jnp.int32)),
                         jnp.zeros((2, 0, 5)), 0.0),
      "causal_lm_loss_T1": (lambda z: L.causal_lm_loss(z, jnp.zeros((2, 1), jnp.int32)),
                            jnp.zeros((2, 1, 5)), 0.0),
      "masked_lm_loss": (lambda z: L.masked_lm_loss(z, y), z, 0.0),
      "fused_linear_cross_entropy": (
          lambda h: L.fused_linear_cross_entropy(h, jnp.ones((4, 5)), y), feats, 0.0),
      "kl_divergence_from_logits": (
          lambda z: L.kl_divergence_from_logits(z, z, reduction="mean"), z, 0.0),
      "entropy": (lambda z: L.entropy(z, reduction="mean"), z, 0.0),
      "perplexity": (lambda z: L.perplexity(z, y), z, 1.0),
      "token_accuracy": (lambda z: L.token_accuracy(z, y), z, 0.0),
      "top_k_accuracy": (lambda z: L.top_k_accuracy(z, y, 2), z, 0.0),
      "length_normalized_score": (
          lambda z: jnp.sum(L.length_normalized_score(z, jnp.zeros((0, 3), jnp.int32))),
          jnp.zeros((0, 3, 5)), 0.0),
      "info_nce": (lambda a: L.info_nce(a, a, jnp.ones((3, 4))), feats, 0.0),
      "in_batch_info_nce": (lambda a: L.in_batch_info_nce(a, a), feats, 0.0),
      "in_batch_info_nce_symmetric": (lambda a: L.in_batch_info_nce(a, a, symmetric=True),
                                      feats, 0.0),
      "clip_loss": (lambda a: L.clip_loss(a, a), feats, 0.0),
  }


@pytest.mark.parametrize("name", sorted(_empty_cases()))
def test_empty_input_gives_zero_and_zero_gradient(name):
  f, x, expected = _empty_cases()[name]
  for g in (f, jax.jit(f)):
    value, grad = jax.value_and_grad(g)(x)
    assert float(value) == expected
    assert grad.shape == x.shape and not np.isnan(np.asarray(grad)).any()


# ---------------------------------------------------------------------------------------
# Every hyperparameter of every public loss/metric: a bad value raises naming it.

_Z = np.zeros((2, 3), np.float32)
_Y = np.asarray([0, 2])
_F = np.ones((2, 4), np.float32)

_CALLS = {
    "cross_entropy": lambda **kw: L.cross_entropy(_Z, _Y, **kw),
    "causal_lm_loss": lambda **kw: L.causal_lm_loss(_Z[None], _Y[None], **kw),
    "masked_lm_loss": lambda **kw: L.masked_lm_loss(_Z, _Y, **kw),
    "fused_linear_cross_entropy": lambda **kw: L.fused_linear_cross_entropy(
        _F, np.ones((4, 3), np.float32), _Y, **kw),
    "kl_divergence_from_logits": lambda **kw: L.kl_divergence_from_logits(_Z, _Z, **kw),
    "entropy": lambda **kw: L.entropy(_Z, **kw),
    "perplexity": lambda **kw: L.perplexity(_Z, _Y, **kw),
    "token_accuracy": lambda **kw: L.token_accuracy(_Z, _Y, **kw),
    "top_k_accuracy": lambda **kw: L.top_k_accuracy(_Z, _Y, **{"k": 1, **kw}),
    "length_normalized_score": lambda **kw: L.length_normalized_score(_Z, _Y, **kw),
    "info_nce": lambda **kw: L.info_nce(_F, _F, _F, **kw),
    "in_batch_info_nce": lambda **kw: L.in_batch_info_nce(_F, _F, **kw),
    "clip_loss": lambda **kw: L.clip_loss(_F, _F, **kw),
    "pairwise_cosine_similarity": lambda **kw: L.pairwise_cosine_similarity(_F, _F, **kw),
    "l2_normalize": lambda **kw: L.l2_normalize(_F, **kw),
    "mask_tokens": lambda **kw: L.mask_tokens(
        _Y, jax.random.key(0), **{"mask_token_id": 1, "vocab_size": 3, **kw}),
    "combine_losses": lambda **kw: L.combine_losses({"a": 1.0}, {"a": kw["weight"]}),
    "default_chunk_size": lambda **kw: default_chunk_size(
        **{"num_tokens": 4, "vocab_size": 3, **kw}),
}

_REAL_BAD = ["0.1", [0.1, 0.2], float("nan"), None]
_INT_BAD = ["3", 1.5, True, None]
_FLAG_BAD = ["yes", 2, None]
# Per-class weights (V = 3 here): a string, wrong shapes, bool, negative, non-finite.
_WEIGHT_BAD = ["1.0", np.ones(2), np.ones((1, 3)), np.ones(3, bool), [1.0, -1.0, 1.0],
               [1.0, np.nan, 1.0], [np.inf, 1.0, 1.0]]
_HYPER = {
    # function: {argument: bad values}
    "cross_entropy": {"label_smoothing": _REAL_BAD + [1.5], "z_loss": _REAL_BAD + [-1.0],
                      "ignore_index": _INT_BAD, "reduction": ["avg", 1],
                      "validate": _FLAG_BAD, "weight": _WEIGHT_BAD},
    "causal_lm_loss": {"label_smoothing": _REAL_BAD, "z_loss": _REAL_BAD,
                       "ignore_index": _INT_BAD, "reduction": ["avg"], "validate": _FLAG_BAD,
                       "weight": _WEIGHT_BAD},
    "masked_lm_loss": {"label_smoothing": _REAL_BAD, "z_loss": _REAL_BAD,
                       "ignore_index": _INT_BAD, "reduction": ["avg"], "validate": _FLAG_BAD,
                       "weight": _WEIGHT_BAD},
    "fused_linear_cross_entropy": {
        "label_smoothing": _REAL_BAD + [-0.1], "z_loss": _REAL_BAD,
        "ignore_index": _INT_BAD, "reduction": ["avg"], "chunk_size": ["3", 1.5, True, 0],
        "logit_soft_cap": ["30", [30.0, 30.0], float("nan"), 0.0], "validate": _FLAG_BAD},
    "kl_divergence_from_logits": {"reduction": ["avg", None]},
    "entropy": {"reduction": ["avg", None]},
    "perplexity": {"ignore_index": _INT_BAD},
    "token_accuracy": {"ignore_index": _INT_BAD},
    "top_k_accuracy": {"k": _INT_BAD + [0], "ignore_index": _INT_BAD},
    "length_normalized_score": {"alpha": _REAL_BAD + [-1.0], "ignore_index": _INT_BAD},
    "info_nce": {"temperature": _REAL_BAD + [0.0], "reduction": ["avg"],
                 "eps": _REAL_BAD + [0.0]},
    "in_batch_info_nce": {"temperature": _REAL_BAD + [-1.0], "symmetric": _FLAG_BAD,
                          "eps": _REAL_BAD},
    "clip_loss": {"logit_scale": _REAL_BAD, "max_logit_scale": _REAL_BAD,
                  "eps": _REAL_BAD},
    "pairwise_cosine_similarity": {"eps": _REAL_BAD + [0.0]},
    "l2_normalize": {"eps": _REAL_BAD + [-1.0], "axis": ["1", 1.0, 5, None]},
    "mask_tokens": {"mask_token_id": _INT_BAD + [-1], "vocab_size": _INT_BAD + [0],
                    "mask_prob": _REAL_BAD + [1.5], "replace_prob": _REAL_BAD,
                    "random_prob": _REAL_BAD, "ignore_index": _INT_BAD},
    "combine_losses": {"weight": _REAL_BAD},
    "default_chunk_size": {"num_tokens": _INT_BAD + [-1], "vocab_size": _INT_BAD + [0],
                           "backend": [3]},
}


def _hyper_cases():
  for fn, args in _HYPER.items():
    for arg, values in args.items():
      for i, value in enumerate(values):
        yield pytest.param(fn, arg, value, id=f"{fn}-{arg}-{i}")


@pytest.mark.parametrize("fn,arg,value", list(_hyper_cases()))
def test_bad_hyperparameter_raises_naming_it(fn, arg, value):
  name = "weights['a']" if fn == "combine_losses" else arg
  with pytest.raises((TypeError, ValueError), match=f"`{re.escape(name)}`"):
    _CALLS[fn](**{arg: value})


def test_every_public_loss_and_metric_of_these_modules_is_covered():
  owned = {"cross_entropy", "causal_lm_loss", "fused_linear_cross_entropy",
           "kl_divergence_from_logits", "entropy", "perplexity", "token_accuracy",
           "top_k_accuracy", "length_normalized_score", "combine_losses", "info_nce",
           "in_batch_info_nce", "clip_loss", "pairwise_cosine_similarity", "l2_normalize",
           "mask_tokens", "masked_lm_loss"}
  assert owned <= set(L.__all__)
  assert owned <= set(_HYPER) and owned <= set(_CALLS)
  assert owned - {"mask_tokens", "pairwise_cosine_similarity", "l2_normalize",
                  "combine_losses"} <= {k.split("_sum")[0].split("_T1")[0].replace(
                      "_symmetric", "") for k in _empty_cases()}


# ---------------------------------------------------------------------------------------
# combine_token_loss / reduce_masked / smoothing_term: the per-token formula and the
# (weighted) mean that cross_entropy and the fused loss share.


def test_combine_token_loss_equation_and_term_switches():
  rng = np.random.default_rng(3)
  nll, smooth, lse = (jnp.asarray(rng.uniform(0.1, 3.0, 6), jnp.float32) for _ in range(3))
  w_y = jnp.asarray(rng.uniform(0.0, 2.0, 6), jnp.float32)
  valid = jnp.asarray([True, True, False, True, True, False])
  out = _common.combine_token_loss(nll, smooth, lse, valid, label_smoothing=0.2,
                                   z_loss=1e-2, target_weight=w_y)
  ref = np.where(valid, 0.8 * w_y * nll + 0.2 * smooth + 1e-2 * lse**2, 0.0)
  chex.assert_type(out, jnp.float32)
  chex.assert_trees_all_close(out, jnp.asarray(ref, jnp.float32), rtol=1e-6)
  # None leaves a term out (smooth may then be None); target_weight=None is w_y = 1.
  chex.assert_trees_all_close(
      _common.combine_token_loss(nll, None, lse, valid, label_smoothing=None, z_loss=None),
      jnp.where(valid, nll, 0.0))
  # token_loss is the unweighted case with smoothing_term.
  z = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 6))
  nll_z, lse_z = _common.softmax_nll(z, y)
  log_p = _common.masked_log_probs(nll_z, valid, jnp.zeros(6, bool))
  chex.assert_trees_all_close(
      _common.token_loss(z, log_p, lse_z, valid, label_smoothing=0.3, z_loss=1e-3),
      jnp.where(valid, 0.7 * nll_z + 0.3 * (lse_z - z.mean(-1)) + 1e-3 * lse_z**2, 0.0),
      rtol=1e-6)


def test_combine_token_loss_zero_coefficients_infinite_and_bad_terms():
  """A zero coefficient (eps == 1, w_y == 0, z_loss == 0: traced) of an infinite term is
  0 with finite gradients, never 0 * inf = NaN; a bad label's NaN is kept."""
  inf = jnp.inf
  nll = jnp.asarray([inf, inf, 2.0, jnp.nan])
  smooth = jnp.asarray([1.0, 1.0, inf, 1.0])
  lse = jnp.asarray([1.0, 1.0, 1.0, 1.0])
  valid = jnp.ones(4, bool)

  @jax.jit
  def f(nll, eps, w_y, zl):
    return _common.combine_token_loss(nll, smooth, lse, valid, label_smoothing=eps,
                                      z_loss=zl, target_weight=w_y)

  out = f(nll, 1.0, jnp.ones(4), 0.0)                # eps == 1: nll's term out
  np.testing.assert_array_equal(np.asarray(out)[:2], [1.0, 1.0])
  assert np.isinf(float(out[2])) and np.isnan(float(out[3]))
  out = f(nll, 0.0, jnp.asarray([0.0, 1.0, 1.0, 0.0]), 0.0)   # w_y == 0, eps == 0
  assert float(out[0]) == 0.0 and np.isinf(float(out[1])) and float(out[2]) == 2.0
  assert np.isnan(float(out[3]))                     # 0 * NaN stays NaN
  g = jax.grad(lambda n: jnp.sum(f(n, 1.0, jnp.ones(4), 0.0)[:2]))(nll)
  assert np.isfinite(np.asarray(g)).all()
  # zero_safe_mul: value and derivatives of the product (x w.r.t. coef where finite).
  gc, gx = jax.grad(lambda c, x: jnp.sum(_common.zero_safe_mul(c, x)), (0, 1))(
      jnp.asarray([0.0, 0.0, 2.0]), jnp.asarray([inf, 3.0, 3.0]))
  np.testing.assert_array_equal(np.asarray(gc), [0.0, 3.0, 3.0])
  np.testing.assert_array_equal(np.asarray(gx), [0.0, 0.0, 2.0])


def test_reduce_masked_weighted_mean():
  values = jnp.asarray([1.0, 2.0, 0.0, 4.0])
  valid = jnp.asarray([True, True, False, True])
  w = jnp.asarray([0.5, 2.0, 9.0, 1.5])
  chex.assert_trees_all_close(_common.reduce_masked(values, valid, "mean", w),
                              jnp.float32(7.0 / 4.0))   # / (0.5 + 2 + 1.5)
  chex.assert_trees_all_close(_common.reduce_masked(values, valid, "mean"),
                              jnp.float32(7.0 / 3.0))
  chex.assert_trees_all_close(_common.reduce_masked(values, valid, "sum", w),
                              jnp.float32(7.0))
  assert _common.reduce_masked(values, valid, "none", w) is values
  # Zero weight sum: 0.0 with zero gradient (torch: NaN), jitted too; NaN stays NaN.
  f = jax.jit(jax.value_and_grad(
      lambda v, w: _common.reduce_masked(v, valid, "mean", w), (0, 1)))
  out, (gv, gw) = f(values, jnp.asarray([0.0, 0.0, 9.0, 0.0]))
  assert float(out) == 0.0 and not np.asarray(gv).any() and not np.asarray(gw).any()
  out, _ = f(values.at[0].set(jnp.nan), jnp.asarray([0.0, 0.0, 9.0, 0.0]))
  assert np.isnan(float(out))
  out, _ = f(values, jnp.asarray([jnp.nan, 1.0, 1.0, 1.0]))   # a NaN weight: NaN
  assert np.isnan(float(out))


def test_smoothing_term_weighted_equation():
  rng = np.random.default_rng(4)
  z = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32).at[1, 2].set(-jnp.inf)
  w = jnp.asarray([1.0, 0.5, 0.0, 2.0, 1.0])
  lse = jax.nn.logsumexp(z, axis=-1)
  out = _common.smoothing_term(z, lse, w)
  zf = np.where(np.isinf(np.asarray(z)), -1e30, np.asarray(z, np.float64))
  lse64 = np.log(np.exp(zf).sum(-1))
  ref = (np.asarray(w) * (lse64[:, None] - zf) * (np.asarray(w) > 0)).sum(-1) / 5
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6)   # finite at the -inf logit
  np.testing.assert_allclose(np.asarray(_common.smoothing_term(z[::2], lse[::2])),
                             lse64[::2] - zf[::2].mean(-1), rtol=1e-6)
