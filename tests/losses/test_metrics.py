"""Tests for jaxopt_llm.losses.metrics: hand-built cases, float64 numpy, masking."""
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.losses import (
    length_normalized_score, perplexity, token_accuracy, top_k_accuracy)

IGNORE = -100


def _logits(seed, shape=(3, 5, 7), scale=3.0):
  return jnp.asarray(
      (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32))


def _labels(seed, shape=(3, 5), vocab=7, n_ignored=2):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, vocab, size=shape).astype(np.int32)
  flat = labels.reshape(-1)
  flat[rng.choice(flat.size, size=n_ignored, replace=False)] = IGNORE
  return jnp.asarray(labels)


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = np.max(z, -1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _assert_close(actual, expected, rtol=1e-6, atol=1e-6):
  expected = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), expected)
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def _hand_case():
  """2 sequences x 3 tokens, V = 4, with known argmax / ranks."""
  logits = jnp.array([
      [[4.0, 1.0, 0.0, 0.0],    # argmax 0
       [0.0, 3.0, 2.0, 1.0],    # argmax 1, ranks: 1 > 2 > 3 > 0
       [0.0, 0.0, 0.0, 5.0]],   # argmax 3
      [[1.0, 2.0, 3.0, 4.0],    # argmax 3, ranks: 3 > 2 > 1 > 0
       [2.0, 2.0, 0.0, 0.0],    # tie: argmax 0
       [9.0, 9.0, 9.0, 9.0]],   # all tied (ignored below)
  ])
  labels = jnp.array([[0, 2, 3],
                      [0, 1, IGNORE]])
  return logits, labels


def test_token_accuracy_hand_built():
  logits, labels = _hand_case()
  # Counted: (0,0) hit, (0,1) miss, (0,2) hit, (1,0) miss, (1,1) tie lost to class 0.
  _assert_close(token_accuracy(logits, labels), 2 / 5)
  where = jnp.array([[True, False, True], [False, True, True]])
  _assert_close(token_accuracy(logits, labels, where=where), 2 / 3)
  _assert_close(token_accuracy(logits, labels.at[0, 1].set(1)), 3 / 5)


def test_top_k_accuracy_hand_built_and_ties():
  logits, labels = _hand_case()
  # Ranks of the labels: (0,0) 0, (0,1) 1, (0,2) 0, (1,0) 3, (1,1) 0 (tie counts).
  for k, expected in [(1, 3 / 5), (2, 4 / 5), (3, 4 / 5), (4, 1.0), (100, 1.0)]:
    out = top_k_accuracy(logits, labels, k)
    chex.assert_type(out, jnp.float32)
    _assert_close(out, expected)
  # The tie is where top-1 and argmax accuracy differ (documented).
  tie_logits, tie_labels = logits[1:, 1:2], labels[1:, 1:2]
  _assert_close(top_k_accuracy(tie_logits, tie_labels, 1), 1.0)
  _assert_close(token_accuracy(tie_logits, tie_labels), 0.0)


def test_top1_equals_token_accuracy_without_ties():
  logits, labels = _logits(15), _labels(15)
  labels = labels.at[0, :3].set(jnp.argmax(logits[0, :3], -1))   # a few hits
  chex.assert_trees_all_equal(top_k_accuracy(logits, labels, 1),
                              token_accuracy(logits, labels))
  assert 0.0 < float(token_accuracy(logits, labels)) < 1.0


def test_perplexity_matches_numpy():
  logits, labels = _logits(16), _labels(16)
  where = np.random.default_rng(3).random((3, 5)) < 0.8
  lp = _np_log_softmax(logits)
  valid = (np.asarray(labels) != IGNORE) & where
  nll = -np.take_along_axis(lp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  out = perplexity(logits, labels, where=where)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, ())
  _assert_close(out, np.exp(nll[valid].mean()), rtol=1e-5)
  # Uniform predictions have perplexity V.
  _assert_close(perplexity(jnp.zeros((3, 5, 7)), labels), 7.0, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_length_normalized_score_matches_numpy(alpha):
  logits, labels = _logits(17), _labels(17, n_ignored=3)
  labels = labels.at[2].set(IGNORE)          # an empty sequence scores 0
  lp = _np_log_softmax(logits)
  valid = np.asarray(labels) != IGNORE
  tok = np.where(valid, np.take_along_axis(lp, np.where(valid, labels, 0)[..., None],
                                           -1)[..., 0], 0.0)
  n = valid.sum(-1)
  expected = np.where(n > 0, tok.sum(-1) / np.maximum(n, 1) ** alpha, 0.0)
  out = length_normalized_score(logits, labels, alpha=alpha)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, (3,))
  _assert_close(out, expected, rtol=1e-5)
  assert float(out[2]) == 0.0
  if alpha == 0.0:    # the plain sum of log-probs
    _assert_close(out[0], tok[0].sum(), rtol=1e-5)
  if alpha == 1.0:    # the mean log-prob
    _assert_close(out[0], tok[0][valid[0]].mean(), rtol=1e-5)


def test_metrics_all_ignored_are_not_nan():
  logits = _logits(18)
  labels = jnp.full((3, 5), IGNORE, jnp.int32)
  chex.assert_trees_all_equal(
      (perplexity(logits, labels), token_accuracy(logits, labels),
       top_k_accuracy(logits, labels, 3), length_normalized_score(logits, labels)),
      (jnp.float32(1.0), jnp.float32(0.0), jnp.float32(0.0), jnp.zeros(3, jnp.float32)))
  # The same through `where`.
  none = jnp.zeros((3, 5), bool)
  ok = jnp.zeros((3, 5), jnp.int32)
  chex.assert_trees_all_equal(
      (perplexity(logits, ok, where=none), token_accuracy(logits, ok, where=none)),
      (jnp.float32(1.0), jnp.float32(0.0)))
  # ...and with zero gradient, never NaN.
  grad = jax.grad(lambda z: jnp.sum(length_normalized_score(z, labels)))(logits)
  chex.assert_trees_all_equal(grad, jnp.zeros_like(logits))


def test_metrics_jit_equals_eager_and_float32():
  logits, labels = _logits(19).astype(jnp.bfloat16), _labels(19)
  fns = [perplexity, token_accuracy, partial(top_k_accuracy, k=2),
         partial(length_normalized_score, alpha=0.5)]
  for fn in fns:
    eager = fn(logits, labels)
    chex.assert_type(eager, jnp.float32)
    _assert_close(jax.jit(fn)(logits, labels), eager, rtol=1e-6, atol=1e-6)


def test_metrics_bad_input():
  logits, labels = _logits(20), _labels(20)
  for k in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="`k`"):
      top_k_accuracy(logits, labels, k)
  with pytest.raises(ValueError, match="`alpha`"):
    length_normalized_score(logits, labels, alpha=-1.0)
  with pytest.raises(ValueError, match="`labels`"):
    length_normalized_score(logits[0, 0], labels[0, 0])
  fns = [perplexity, token_accuracy, partial(top_k_accuracy, k=2), length_normalized_score]
  for fn in fns:
    with pytest.raises(ValueError, match="`labels`"):
      fn(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="`labels`"):
      fn(logits, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="`where`"):
      fn(logits, labels, where=jnp.ones((3,), bool))
    # Out-of-range labels: an eager error, NaN under jit (never a wrong finite value).
    bad = labels.at[1, 1].set(7)
    with pytest.raises(ValueError, match=r"`labels`.*\[0, 7\).*7"):
      fn(logits, bad)
    assert np.isnan(np.asarray(jax.jit(fn)(logits, bad))).any()
