"""Tests for jaxopt_llm.losses.log_probs: per-token log-probs without the logits.

Against the written equation (float64 numpy log-softmax gather on the full logits, with
masks, shift, bias, temperature and soft-cap), against ``sequence_log_probs`` and the
full-logits autodiff (values and gradients), against PyTorch's TRL 1.16
``selective_log_softmax`` convention (logits / temperature), and on bad input.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.losses import sequence_log_probs, token_log_probs_from_hidden

IGNORE = -100


def _batch(seed, b=3, t=7, d=8, v=11, n_ignored=3):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((b, t, d)).astype(np.float32)
  kernel = (rng.standard_normal((d, v)) / np.sqrt(d) * 2).astype(np.float32)
  bias = rng.standard_normal(v).astype(np.float32)
  labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
  flat = labels.reshape(-1)
  flat[rng.choice(flat.size, size=n_ignored, replace=False)] = IGNORE
  where = rng.random((b, t)) > 0.2
  return hidden, kernel, bias, labels, where


def _np_token_logps(hidden, kernel, labels, *, bias=None, temperature=1.0, cap=None,
                    where=None, shift=False):
  """The equation, float64: log_softmax(z / tau)[y], z = cap tanh(u / cap), u = h W + b."""
  h = np.asarray(hidden, np.float64)
  y = np.asarray(labels)
  w = None if where is None else np.asarray(where, bool)
  if shift:
    h, y = h[..., :-1, :], y[..., 1:]
    w = None if w is None else w[..., 1:]
  u = h @ np.asarray(kernel, np.float64)
  if bias is not None:
    u = u + np.asarray(bias, np.float64)
  z = u if cap is None else cap * np.tanh(u / cap)
  z = z / temperature
  m = z.max(-1, keepdims=True)
  logp = z - (np.log(np.exp(z - m).sum(-1, keepdims=True)) + m)
  valid = y != IGNORE
  if w is not None:
    valid &= w
  tok = np.take_along_axis(logp, np.where(valid, y, 0)[..., None], -1)[..., 0]
  return np.where(valid, tok, 0.0)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("use_where", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_equals_log_softmax_gather(shift, use_where, chunk_size):
  hidden, kernel, bias, labels, where = _batch(0)
  where = where if use_where else None
  out = token_log_probs_from_hidden(hidden, kernel, labels, bias=bias, where=where,
                                    shift=shift, chunk_size=chunk_size)
  expected = _np_token_logps(hidden, kernel, labels, bias=bias, where=where, shift=shift)
  chex.assert_shape(out, expected.shape)
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # Tokens that do not count are exactly 0.
  assert np.all(np.asarray(out)[expected == 0.0] == 0.0)


@pytest.mark.parametrize("shift", [False, True])
def test_sum_equals_sequence_log_probs_on_full_logits(shift):
  hidden, kernel, bias, labels, where = _batch(1)
  logits = jnp.asarray(hidden) @ kernel + bias
  seq = sequence_log_probs(logits, labels, shift=shift, where=where)
  tok = token_log_probs_from_hidden(hidden, kernel, labels, bias=bias, shift=shift,
                                    where=where, chunk_size=5)
  np.testing.assert_allclose(jnp.sum(tok, -1), seq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,cap", [(0.7, None), (1.3, 5.0), (1.0, 3.0)])
def test_temperature_and_soft_cap(temperature, cap):
  hidden, kernel, bias, labels, where = _batch(2)
  out = token_log_probs_from_hidden(hidden, kernel, labels, bias=bias, where=where,
                                    temperature=temperature, logit_soft_cap=cap)
  expected = _np_token_logps(hidden, kernel, labels, bias=bias, where=where,
                             temperature=temperature, cap=cap)
  np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6)


def test_gradients_match_full_logits_autodiff():
  hidden, kernel, bias, labels, where = _batch(3)
  cot = jnp.asarray(np.random.default_rng(4).standard_normal(labels.shape), jnp.float32)

  def full(h, w, b):
    z = (h @ w + b) / 0.8
    logp = jax.nn.log_softmax(z, -1)
    valid = (labels != IGNORE) & where
    tok = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, tok, 0.0) * cot)

  def fused(h, w, b):
    return jnp.sum(token_log_probs_from_hidden(h, w, labels, bias=b, where=where,
                                               temperature=0.8, chunk_size=4) * cot)

  args = tuple(jnp.asarray(x) for x in (hidden, kernel, bias))
  v_full, g_full = jax.value_and_grad(full, argnums=(0, 1, 2))(*args)
  v_fused, g_fused = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(*args)
  np.testing.assert_allclose(v_fused, v_full, rtol=1e-5)
  for a, b in zip(g_fused, g_full):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_pytorch_trl_selective_log_softmax_convention():
  # TRL 1.16 trainer/utils.py selective_log_softmax: log_softmax(logits / temperature)
  # gathered at the index (its chunked fallback path), re-written here in torch.
  torch = pytest.importorskip("torch")
  hidden, kernel, bias, labels, _ = _batch(5, n_ignored=0)
  z = torch.tensor(hidden) @ torch.tensor(kernel) + torch.tensor(bias)
  ref = torch.gather((z / 0.9).log_softmax(-1), -1,
                     torch.tensor(labels, dtype=torch.long)[..., None])[..., 0]
  out = token_log_probs_from_hidden(hidden, kernel, labels, bias=bias, temperature=0.9)
  np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_close_to_float32():
  hidden, kernel, _, labels, where = _batch(6)
  out = token_log_probs_from_hidden(jnp.asarray(hidden, jnp.bfloat16),
                                    jnp.asarray(kernel, jnp.bfloat16), labels,
                                    where=where, temperature=0.5)
  chex.assert_type(out, jnp.float32)
  expected = _np_token_logps(jnp.asarray(hidden, jnp.bfloat16).astype(np.float32),
                             jnp.asarray(kernel, jnp.bfloat16).astype(np.float32), labels,
                             where=where, temperature=0.5)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_fully_masked_is_zero_with_zero_gradient():
  hidden, kernel, _, labels, _ = _batch(7)
  where = np.zeros(labels.shape, bool)
  f = lambda h: jnp.sum(token_log_probs_from_hidden(h, kernel, labels, where=where))
  value, grad = jax.value_and_grad(f)(jnp.asarray(hidden))
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_out_of_range_label_eager_error_and_nan_under_jit():
  hidden, kernel, _, labels, _ = _batch(8, n_ignored=0)
  bad = labels.copy()
  bad[0, 0] = 999
  with pytest.raises(ValueError, match="labels"):
    token_log_probs_from_hidden(hidden, kernel, bad)
  out = jax.jit(token_log_probs_from_hidden)(hidden, kernel, bad)
  assert np.isnan(np.asarray(out)[0, 0])
  assert np.all(np.isfinite(np.asarray(out).reshape(-1)[1:]))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature="1.0"), TypeError, "temperature"),
    (dict(logit_soft_cap=0.0), ValueError, "logit_soft_cap"),
    (dict(shift="yes"), ValueError, "shift"),
    (dict(ignore_index=1.5), ValueError, "ignore_index"),
    (dict(where=np.ones((3, 6), bool)), ValueError, "where"),
])
def test_bad_arguments(kwargs, exc, match):
  hidden, kernel, _, labels, _ = _batch(9)
  with pytest.raises(exc, match=match):
    token_log_probs_from_hidden(hidden, kernel, labels, **kwargs)


def test_bad_shapes():
  hidden, kernel, _, labels, _ = _batch(10)
  with pytest.raises(ValueError, match="labels"):
    token_log_probs_from_hidden(hidden, kernel, labels[:, :-1])
  with pytest.raises(ValueError, match="hidden"):
    token_log_probs_from_hidden(hidden.astype(np.int32), kernel, labels)
  with pytest.raises(ValueError, match="kernel"):
    token_log_probs_from_hidden(hidden, kernel.T, labels)
