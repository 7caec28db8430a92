"""Tests for jaxopt_llm.losses.divergence: KL and entropy against float64 numpy and torch."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxopt_llm import losses
from jaxopt_llm.losses import entropy, kl_divergence_from_logits

NEG_INF = -np.inf


def _logits(seed, shape=(3, 5, 7), scale=3.0):
  return jnp.asarray(
      (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32))


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = np.max(z, -1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_kl(p_logits, q_logits):
  lp, lq = _np_log_softmax(p_logits), _np_log_softmax(q_logits)
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):
    return np.where(p > 0, p * (lp - lq), 0.0).sum(-1)


def _np_entropy(logits):
  lp = _np_log_softmax(logits)
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):
    return -np.where(p > 0, p * lp, 0.0).sum(-1)


def _np_reduce(values, rows, reduction):
  values = np.where(rows, values, 0.0)
  if reduction == "none":
    return values
  if reduction == "sum":
    return values.sum()
  return values.sum() / max(rows.sum(), 1)


def _assert_close(actual, expected, rtol=1e-6, atol=1e-6):
  expected = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), expected)
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def _masked_pair():
  """p, q logits with -inf (masked vocabulary) entries."""
  p, q = np.array(_logits(1)), np.array(_logits(2))
  p[0, :, 5:] = NEG_INF                  # same classes masked in p and q
  q[0, :, 5:] = NEG_INF
  p[1, 2, [0, 3]] = NEG_INF              # p has zeros where q does not
  p[2, 4, :6] = NEG_INF                  # p is one-hot
  return jnp.asarray(p), jnp.asarray(q)


# ---------------------------------------------------------------------------------------
# KL divergence.


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_where", [False, True])
def test_kl_matches_numpy(reduction, use_where):
  p, q = _logits(3), _logits(4)
  rows = np.random.default_rng(0).random((3, 5)) < 0.6
  if not use_where:
    rows = np.ones((3, 5), bool)
  out = kl_divergence_from_logits(p, q, where=rows if use_where else None, reduction=reduction)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, (3, 5) if reduction == "none" else ())
  _assert_close(out, _np_reduce(_np_kl(p, q), rows, reduction), rtol=1e-5)


def test_kl_matches_torch_values_and_grads():
  torch = pytest.importorskip("torch")
  p, q = _logits(5), _logits(6)
  cot = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)

  def f(a, b):
    out = kl_divergence_from_logits(a, b)
    return jnp.sum(out * cot), out

  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, q)
  p_t = torch.tensor(np.asarray(p), requires_grad=True)
  q_t = torch.tensor(np.asarray(q), requires_grad=True)
  log_p = torch.log_softmax(p_t, -1)
  log_q = torch.log_softmax(q_t, -1)
  out_t = torch.nn.functional.kl_div(log_q, log_p, log_target=True,
                                     reduction="none").sum(-1)
  (out_t * torch.tensor(cot)).sum().backward()
  _assert_close(out, out_t.detach().numpy(), rtol=1e-5)
  _assert_close(grads, (p_t.grad.numpy(), q_t.grad.numpy()), rtol=1e-5)


def test_kl_is_optax_kl_with_log_targets_and_named_apart_from_optax():
  # The docstring's optax equivalent; and no public loss reuses an optax.losses name
  # (optax's kl_divergence takes (log_predictions, targets), ours two logits).
  p, q = _logits(7), _logits(8)
  log_p, log_q = jax.nn.log_softmax(p), jax.nn.log_softmax(q)
  _assert_close(kl_divergence_from_logits(p, q),
                optax.losses.kl_divergence_with_log_targets(log_q, log_p), rtol=1e-5)
  for name in losses.__all__:
    assert not hasattr(optax.losses, name), name


def test_kl_of_identical_distributions_is_zero():
  p = _logits(7)
  _assert_close(kl_divergence_from_logits(p, p), np.zeros((3, 5)), rtol=0, atol=1e-6)
  # Shifting logits does not change the distribution.
  _assert_close(kl_divergence_from_logits(p, p + 3.0), np.zeros((3, 5)), rtol=0, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(p=hnp.arrays(np.float32, (3, 5, 7), elements=st.floats(-20, 20, width=32)),
       q=hnp.arrays(np.float32, (3, 5, 7), elements=st.floats(-20, 20, width=32)))
def test_kl_is_nonnegative(p, q):
  kl = np.asarray(kl_divergence_from_logits(p, q))
  assert np.all(np.isfinite(kl))
  assert np.all(kl >= -1e-6), kl.min()


def test_kl_masked_vocabulary_is_finite_with_finite_grads():
  p, q = _masked_pair()
  out, grads = jax.value_and_grad(
      lambda a, b: jnp.sum(kl_divergence_from_logits(a, b)), argnums=(0, 1))(p, q)
  per_row = kl_divergence_from_logits(p, q)
  chex.assert_tree_all_finite((per_row, grads))
  _assert_close(per_row, _np_kl(p, q), rtol=1e-5)
  # Masked classes get exactly zero gradient on both sides.
  np.testing.assert_array_equal(np.asarray(grads[0][0, :, 5:]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[1][0, :, 5:]), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0][1, 2, [0, 3]]), 0.0)


def test_kl_is_inf_where_q_misses_support_of_p():
  p, q = np.array(_logits(8)), np.array(_logits(9))
  q[0, 0, 2] = NEG_INF
  out = np.asarray(kl_divergence_from_logits(p, q))
  assert out[0, 0] == np.inf
  assert np.isfinite(np.delete(out.reshape(-1), 0)).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kl_where_excludes_rows_even_if_degenerate(reduction):
  p, q = np.array(_logits(10)), np.array(_logits(11))
  p[1, 1] = NEG_INF                      # not a distribution at all
  q[1, 1] = np.nan
  rows = np.ones((3, 5), bool)
  rows[1, 1] = False
  f = lambda a, b: jnp.sum(kl_divergence_from_logits(a, b, where=rows, reduction=reduction))
  out, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(p), jnp.asarray(q))
  chex.assert_tree_all_finite((out, grads))
  np.testing.assert_array_equal(np.asarray(grads[0][1, 1]), 0.0)
  p[1, 1], q[1, 1] = 0.0, 0.0
  _assert_close(out, np.sum(_np_reduce(_np_kl(p, q), rows, reduction)), rtol=1e-5)
  # All rows masked: 0 for every reduction, never NaN.
  none = np.zeros((3, 5), bool)
  chex.assert_trees_all_equal(
      jnp.sum(kl_divergence_from_logits(p, q, where=none, reduction=reduction)), jnp.float32(0.0))


# ---------------------------------------------------------------------------------------
# Entropy.


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_entropy_matches_numpy(reduction):
  logits = _logits(12)
  rows = np.random.default_rng(2).random((3, 5)) < 0.7
  out = entropy(logits, where=rows, reduction=reduction)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, (3, 5) if reduction == "none" else ())
  _assert_close(out, _np_reduce(_np_entropy(logits), rows, reduction), rtol=1e-5)


def test_entropy_uniform_and_masked_vocabulary():
  flat = jnp.zeros((3, 5, 7))
  _assert_close(entropy(flat), np.full((3, 5), np.log(7.0)))
  # Uniform over the 4 unmasked classes; one-hot rows have entropy exactly 0.
  masked = np.zeros((3, 5, 7), np.float32)
  masked[..., 4:] = NEG_INF
  masked[2, 4, 1:] = NEG_INF
  h, grad = jax.value_and_grad(lambda z: jnp.sum(entropy(z)))(jnp.asarray(masked))
  expected = np.full((3, 5), np.log(4.0))
  expected[2, 4] = 0.0
  _assert_close(entropy(masked), expected)
  chex.assert_tree_all_finite((h, grad))
  np.testing.assert_array_equal(np.asarray(grad[..., 4:]), 0.0)


def test_entropy_bf16_input_is_float32():
  logits = _logits(13).astype(jnp.bfloat16)
  out = entropy(logits)
  chex.assert_type(out, jnp.float32)
  _assert_close(out, _np_entropy(np.asarray(logits.astype(jnp.float32))), rtol=1e-5)


def test_divergence_bad_input():
  p = _logits(14)
  with pytest.raises(ValueError, match="`q_logits`"):
    kl_divergence_from_logits(p, p[..., :-1])
  with pytest.raises(ValueError, match="`q_logits`"):
    kl_divergence_from_logits(p, p[0])
  with pytest.raises(ValueError, match="`p_logits`"):
    kl_divergence_from_logits(jnp.zeros((3, 7), jnp.int32), p[0])
  with pytest.raises(ValueError, match="`reduction`"):
    kl_divergence_from_logits(p, p, reduction="batchmean")
  with pytest.raises(ValueError, match="`where`"):
    kl_divergence_from_logits(p, p, where=jnp.ones((3, 5, 7), bool))
  with pytest.raises(ValueError, match="`reduction`"):
    entropy(p, reduction="avg")
  with pytest.raises(ValueError, match="`logits`"):
    entropy(jnp.zeros((3, 7), jnp.int32))
  with pytest.raises(ValueError, match="`where`"):
    entropy(p, where=jnp.ones((3,), bool))
