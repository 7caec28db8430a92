"""Tests for jaxopt_llm.losses.cross_entropy: equations, PyTorch parity, properties."""
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.experimental import checkify

from jaxopt_llm.losses import causal_lm_loss, cross_entropy

IGNORE = -100


def _np_cross_entropy(logits, labels, *, ignore_index=IGNORE, label_smoothing=0.0,
                      z_loss=0.0, reduction="mean", where=None):
  """float64 reference written straight from the docstring's equations."""
  z = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  labels = np.asarray(labels)
  m = z.max(-1, keepdims=True)
  lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
  valid = labels != ignore_index
  if where is not None:
    valid &= np.asarray(where)
  z_y = np.take_along_axis(z, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  nll = lse - z_y
  smooth = lse - z.mean(-1)
  loss = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2
  loss = np.where(valid, loss, 0.0)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  return loss.sum() / max(valid.sum(), 1)


def _batch(seed, shape=(3, 5), vocab=7, scale=3.0, n_ignored=2):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal(shape + (vocab,))).astype(np.float32)
  labels = rng.integers(0, vocab, size=shape).astype(np.int32)
  flat = labels.reshape(-1)
  flat[rng.choice(flat.size, size=n_ignored, replace=False)] = IGNORE
  return jnp.asarray(logits), jnp.asarray(labels)


def _assert_close(actual, expected, rtol=1e-6, atol=1e-6):
  chex.assert_trees_all_close(actual, jnp.asarray(expected, jnp.float32), rtol=rtol,
                              atol=atol)


# ---------------------------------------------------------------------------------------
# 1. Equation.


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.2, 0.0), (0.0, 1e-3),
                                                    (0.3, 1e-2), (1.0, 0.0)])
def test_matches_numpy_reference(reduction, label_smoothing, z_loss):
  logits, labels = _batch(0)
  out = cross_entropy(logits, labels, label_smoothing=label_smoothing, z_loss=z_loss,
                      reduction=reduction)
  ref = _np_cross_entropy(logits, labels, label_smoothing=label_smoothing, z_loss=z_loss,
                          reduction=reduction)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, labels.shape if reduction == "none" else ())
  _assert_close(out, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_where_is_like_ignore_index(reduction):
  logits, labels = _batch(1, n_ignored=1)
  where = np.random.default_rng(1).random(labels.shape) < 0.6
  out = cross_entropy(logits, labels, where=where, label_smoothing=0.1, z_loss=1e-3,
                      reduction=reduction)
  ref = _np_cross_entropy(logits, labels, where=where, label_smoothing=0.1, z_loss=1e-3,
                          reduction=reduction)
  _assert_close(out, ref)
  # Same result as writing ignore_index into the masked positions.
  relabelled = jnp.where(jnp.asarray(where), labels, IGNORE)
  _assert_close(out, cross_entropy(logits, relabelled, label_smoothing=0.1, z_loss=1e-3,
                                   reduction=reduction))


def test_custom_ignore_index_inside_vocab():
  # A pad id inside [0, V) is a valid ignore_index (as in PyTorch).
  logits, labels = _batch(2, n_ignored=0)
  labels = labels.at[0, :2].set(3)
  out = cross_entropy(logits, labels, ignore_index=3, reduction="none")
  _assert_close(out, _np_cross_entropy(logits, labels, ignore_index=3, reduction="none"))
  assert float(out[0, 0]) == 0.0


@pytest.mark.parametrize("label_dtype", [jnp.uint8, jnp.int16, jnp.uint32])
def test_narrow_and_unsigned_label_dtypes(label_dtype):
  logits, labels = _batch(4, n_ignored=0)
  labels = labels.at[0, 0].set(255)     # the pad id of this test
  out = cross_entropy(logits, labels.astype(label_dtype), ignore_index=255,
                      reduction="none")
  _assert_close(out, _np_cross_entropy(logits, labels, ignore_index=255, reduction="none"))
  with pytest.raises(ValueError, match="`labels`.*254"):
    cross_entropy(logits, labels.at[0, 1].set(254).astype(label_dtype), ignore_index=255)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_inputs_compute_in_float32(dtype, reduction):
  logits, labels = _batch(3)
  logits = logits.astype(dtype)
  out = cross_entropy(logits, labels, label_smoothing=0.1, reduction=reduction)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, labels.shape if reduction == "none" else ())
  # The reference uses the same (rounded) logits, upcast: nothing else is lost.
  _assert_close(out, _np_cross_entropy(logits, labels, label_smoothing=0.1,
                                       reduction=reduction))


# ---------------------------------------------------------------------------------------
# 2. PyTorch parity.


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])   # the term skipped, and built
def test_pytorch_parity_values_and_grads(ndim, reduction, label_smoothing):
  torch = pytest.importorskip("torch")
  logits, labels = _batch(10 + ndim, n_ignored=3)
  if ndim == 2:
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
  cot = np.random.default_rng(5).standard_normal(
      labels.shape if reduction == "none" else ()).astype(np.float32)

  def jax_loss(z):
    out = cross_entropy(z, labels, label_smoothing=label_smoothing, reduction=reduction)
    return jnp.sum(out * cot), out

  (_, out), grad = jax.value_and_grad(jax_loss, has_aux=True)(logits)

  z_t = torch.tensor(np.asarray(logits), requires_grad=True)
  # torch wants the class axis second: [B, V] or [B, V, T].
  z_in = z_t if ndim == 2 else z_t.permute(0, 2, 1)
  out_t = torch.nn.functional.cross_entropy(
      z_in, torch.tensor(np.asarray(labels), dtype=torch.long), ignore_index=IGNORE,
      label_smoothing=label_smoothing, reduction=reduction)
  (out_t * torch.tensor(cot)).sum().backward()

  _assert_close(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-6)
  _assert_close(grad, z_t.grad.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 3. Properties.


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       shifts=hnp.arrays(np.float32, (3, 5, 1), elements=st.floats(-50, 50, width=32)),
       label_smoothing=st.sampled_from([0.0, 0.1, 0.5]))
def test_shift_invariance(seed, shifts, label_smoothing):
  logits, labels = _batch(seed)
  shifted = logits + shifts
  a = cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
  b = cross_entropy(shifted, labels, label_smoothing=label_smoothing, reduction="none")
  _assert_close(b, a, rtol=1e-5, atol=5e-5)


def test_gradient_is_softmax_minus_onehot():
  logits, labels = _batch(20, n_ignored=0)
  grad = jax.grad(partial(cross_entropy, reduction="sum"))(logits, labels)
  expected = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(labels, logits.shape[-1])
  _assert_close(grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("use_where", [False, True])
def test_ignored_rows_have_exactly_zero_gradient(use_where):
  logits, labels = _batch(21, n_ignored=0)
  # Extreme, even non-finite, logits in the rows that do not count must not leak NaN.
  logits = logits.at[0, 0].set(jnp.inf).at[1, 2].set(jnp.nan).at[2, 1].set(-jnp.inf)
  if use_where:
    where = jnp.ones(labels.shape, bool).at[0, 0].set(False).at[1, 2].set(False)
    where = where.at[2, 1].set(False)
    kwargs = dict(where=where)
  else:
    labels = labels.at[0, 0].set(IGNORE).at[1, 2].set(IGNORE).at[2, 1].set(IGNORE)
    kwargs = {}
  for reduction in ("mean", "sum"):
    loss, grad = jax.value_and_grad(partial(
        cross_entropy, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, **kwargs))(
            logits, labels)
    assert np.isfinite(float(loss))
    chex.assert_tree_all_finite(grad)
    for idx in [(0, 0), (1, 2), (2, 1)]:
      np.testing.assert_array_equal(np.asarray(grad[idx]), 0.0)
    # Counted rows do get gradient.
    assert np.abs(np.asarray(grad[0, 1])).sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradient(reduction):
  logits, labels = _batch(22, n_ignored=0)
  labels = jnp.full_like(labels, IGNORE)

  def f(z):
    return jnp.sum(cross_entropy(z, labels, reduction=reduction, z_loss=1e-2,
                                 label_smoothing=0.1))

  loss, grad = jax.value_and_grad(f)(logits)
  chex.assert_trees_all_equal(loss, jnp.float32(0.0))
  chex.assert_trees_all_equal(grad, jnp.zeros_like(logits))
  # Same through `where` only.
  where = jnp.zeros(labels.shape, bool)
  out = cross_entropy(logits, jnp.zeros_like(labels), where=where, reduction=reduction)
  chex.assert_trees_all_equal(jnp.sum(out), jnp.float32(0.0))


@pytest.mark.parametrize("dtype,big", [(jnp.float32, 1e4), (jnp.bfloat16, None),
                                       (jnp.float16, None)])
def test_extreme_logits_are_finite(dtype, big):
  big = float(jnp.finfo(dtype).max) if big is None else big
  row = np.array([big, -big, 0.0, 1.0, -big, big, -1.0], np.float32)
  logits = jnp.asarray(np.broadcast_to(row, (3, 5, 7))).astype(dtype)
  # Targets: the +max class (loss ~log 2) everywhere but one token, which targets a
  # moderate class (loss ~big). Two bf16-max-sized losses would overflow float32 when
  # summed: that is the true value, not a stability bug, so only one is used.
  labels = jnp.zeros((3, 5), jnp.int32).at[1, 2].set(3)
  for reduction in ("mean", "none"):
    loss, grad = jax.value_and_grad(
        lambda z: jnp.sum(cross_entropy(z, labels, reduction=reduction)))(logits)
    chex.assert_tree_all_finite((loss, grad))
  per_token = cross_entropy(logits, labels, reduction="none")
  # float32 resolves lse ~ big only to a few ulps(big): log 2 is exact up to that.
  ulp = float(np.spacing(np.float32(big)))
  tol = max(2 * ulp, 1e-6)
  _assert_close(per_token[0, 0], np.log(2.0), rtol=0, atol=tol)
  big_in = float(jnp.asarray(big, dtype).astype(jnp.float32))   # big as rounded to dtype
  _assert_close(per_token[1, 2], big_in + np.log(2.0) - 1.0, rtol=0, atol=tol)
  # Gradient of a +max target row is softmax - onehot = [-1/2, 0, 0, 0, 0, 1/2, 0].
  grad = jax.grad(partial(cross_entropy, reduction="sum"))(logits, labels)
  _assert_close(grad[0, 0].astype(jnp.float32), [-0.5, 0, 0, 0, 0, 0.5, 0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_jit_equals_eager(reduction):
  logits, labels = _batch(23)
  where = jnp.asarray(np.random.default_rng(23).random(labels.shape) < 0.8)
  f = partial(cross_entropy, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
  _assert_close(jax.jit(f)(logits, labels, where=where), f(logits, labels, where=where),
                rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda z: jnp.sum(f(z, labels, where=where)))
  _assert_close(jax.jit(g)(logits), g(logits), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# 4. Bad input.


@pytest.mark.parametrize("kwargs,name", [
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing=float("nan")), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(ignore_index=1.5), "ignore_index"),
])
def test_bad_hyperparameters(kwargs, name):
  logits, labels = _batch(30)
  with pytest.raises(ValueError, match=f"`{name}`"):
    cross_entropy(logits, labels, **kwargs)


def test_bad_shapes_and_dtypes():
  logits, labels = _batch(31)
  with pytest.raises(ValueError, match="`labels`"):
    cross_entropy(logits, labels[:, :-1])
  with pytest.raises(ValueError, match="`labels`"):
    cross_entropy(logits, labels[..., None])
  with pytest.raises(ValueError, match="`labels`"):
    cross_entropy(logits, labels.astype(jnp.float32))
  with pytest.raises(ValueError, match="`logits`"):
    cross_entropy(labels[..., None].repeat(3, -1), labels)
  with pytest.raises(ValueError, match="`where`"):
    cross_entropy(logits, labels, where=jnp.ones(labels.shape[:-1], bool))
  with pytest.raises(ValueError, match="`where`"):
    cross_entropy(logits, labels, where=jnp.ones(labels.shape, jnp.float32))


@pytest.mark.parametrize("bad", [7, 100, -1])
def test_out_of_range_label_raises_eagerly(bad):
  logits, labels = _batch(32)   # vocab 7
  labels = labels.at[1, 1].set(bad)
  with pytest.raises(ValueError, match=rf"`labels`.*\[0, 7\).*{bad}"):
    cross_entropy(logits, labels)
  # Also when only the logits are traced (e.g. inside jax.grad).
  with pytest.raises(ValueError, match="`labels`"):
    jax.grad(cross_entropy)(logits, labels)
  # ...but not when that position is masked out.
  where = jnp.ones(labels.shape, bool).at[1, 1].set(False)
  assert np.isfinite(float(cross_entropy(logits, labels, where=where)))


def test_out_of_range_label_checkify_under_jit():
  logits, labels = _batch(33)
  checked = checkify.checkify(jax.jit(partial(cross_entropy, validate=True)))
  err, out = checked(logits, labels)
  assert err.get() is None
  _assert_close(out, _np_cross_entropy(logits, labels))
  err, _ = checked(logits, labels.at[0, 2].set(9))
  with pytest.raises(checkify.JaxRuntimeError, match=r"`labels`.*\[0, 7\).*9"):
    err.throw()


def test_out_of_range_label_is_nan_under_jit_without_validate():
  logits, labels = _batch(34)
  labels = labels.at[0, 2].set(7)   # == V: a clamping gather would read class 6.
  for reduction in ("mean", "sum"):
    assert np.isnan(float(jax.jit(partial(cross_entropy, reduction=reduction))(
        logits, labels)))
  per_token = jax.jit(partial(cross_entropy, reduction="none"))(logits, labels)
  assert np.isnan(float(per_token[0, 2]))
  others = np.delete(np.asarray(per_token).reshape(-1), 2)
  assert np.isfinite(others).all()
  neg = jax.jit(cross_entropy)(logits, labels.at[0, 2].set(-1))   # would wrap to V - 1
  assert np.isnan(float(neg))


# ---------------------------------------------------------------------------------------
# 5. causal_lm_loss.


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_causal_lm_loss_is_shifted_cross_entropy(reduction):
  logits, ids = _batch(40, n_ignored=2)
  kwargs = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
  out = causal_lm_loss(logits, ids, **kwargs)
  _assert_close(out, cross_entropy(logits[:, :-1], ids[:, 1:], **kwargs))
  _assert_close(out, _np_cross_entropy(logits[:, :-1], ids[:, 1:], **kwargs))
  if reduction == "none":
    chex.assert_shape(out, (3, 4))


def test_causal_lm_loss_shifts_where():
  logits, ids = _batch(41, n_ignored=0)
  # Right padding: the last two tokens of row 1 are padding.
  where = jnp.ones(ids.shape, bool).at[1, 3:].set(False)
  out = causal_lm_loss(logits, ids, where=where, reduction="none")
  _assert_close(out, cross_entropy(logits[:, :-1], ids[:, 1:], where=where[:, 1:],
                                   reduction="none"))
  # Predictions *of* pad tokens (tokens 3, 4 in row 1) are dropped: position 2's
  # prediction of token 3 is one of them, position 1's prediction of token 2 is not.
  np.testing.assert_array_equal(np.asarray(out[1, 2:]), 0.0)
  assert float(out[1, 1]) > 0
  _assert_close(causal_lm_loss(logits, ids, where=where),
                _np_cross_entropy(logits[:, :-1], ids[:, 1:], where=where[:, 1:]))


def test_causal_lm_loss_bad_input():
  logits, ids = _batch(42, n_ignored=0)
  with pytest.raises(ValueError, match="`input_ids`"):
    causal_lm_loss(logits, ids[:, :-1])
  with pytest.raises(ValueError, match="`where`"):
    causal_lm_loss(logits, ids, where=jnp.ones((3, 4), bool))
  with pytest.raises(ValueError, match="`input_ids`"):
    causal_lm_loss(logits, ids.at[0, 3].set(7))
  with pytest.raises(ValueError, match="`reduction`"):
    causal_lm_loss(logits, ids, reduction="avg")
  with pytest.raises(TypeError):
    causal_lm_loss(logits, ids, label_smothing=0.1)
  # Jitted, the single-position case has no targets: mean over nothing is 0.
  chex.assert_trees_all_equal(jax.jit(causal_lm_loss)(logits[:, :1], ids[:, :1]),
                              jnp.float32(0.0))


# ---------------------------------------------------------------------------------------
# 6. Numerics of issue 14: tiny losses, +-max bf16 logits, NaN gradients of bad labels.


def _np_exact_nll(z, y):
  """float64 ``-log softmax(z)_y`` as ``log1p(sum_{c != y} exp(z_c - z_y))``: exact for
  tiny values (a float64 ``lse - z_y`` would already lose ~1e-9 of them)."""
  z = np.asarray(z, np.float64)
  y = np.asarray(y)
  z_y = np.take_along_axis(z, y[..., None], -1)
  others = np.where(np.arange(z.shape[-1]) == y[..., None], -np.inf, z - z_y)
  m = np.maximum(others.max(-1), 0.0)  # shift for the rows where the label is not the max
  rest = np.exp(others - m[..., None]).sum(-1)
  # log1p where the label is the max (m == 0): float64 1 + 1e-12 would keep 4 digits.
  return np.where(m == 0, np.log1p(rest), m + np.log(np.exp(-m) + rest))


def test_tiny_loss_keeps_relative_precision():
  # The case: exact 8.40451e-6; logsumexp - z_y gave 7.63e-6 (9% off).
  logits = jnp.asarray([[100.0, 88.0, 87.0]])
  out = float(cross_entropy(logits, jnp.asarray([0])))
  exact = float(_np_exact_nll(logits, [0])[0])
  np.testing.assert_allclose(exact, 8.404506e-6, rtol=1e-6)
  np.testing.assert_allclose(out, exact, rtol=1e-5)
  # Many well-fit tokens (losses 1e-17 .. 1e-2) at logits of size 1e2 .. 1e3: each token's
  # loss within 1e-4 of exact (float32 rounds the shifted logits z_c - max by ~1e-7).
  rng = np.random.default_rng(0)
  for scale in (1e2, 1e3):
    z = rng.uniform(-1, 1, (64, 50)) * scale
    y = rng.integers(0, 50, 64)
    z[np.arange(64), y] = z.max(-1) + rng.uniform(7, 20, 64)
    z = z.astype(np.float32)
    out = cross_entropy(jnp.asarray(z), jnp.asarray(y), reduction="none")
    exact = _np_exact_nll(z, y)
    assert exact.max() < 1e-2 and exact.min() > 1e-30   # tiny, yet normal floats
    np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-4)


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3),
                                                    (0.2, 1e-2)])
def test_gradient_is_softmax_minus_onehot_in_float64(label_smoothing, z_loss):
  """Values and gradients of well-fit and badly-fit tokens, with ignored ones, against the
  float64 equation; the label entry of a tiny loss's gradient (p_y - 1 ~ -1e-5) must keep
  its relative precision too."""
  rng = np.random.default_rng(1)
  z = (rng.standard_normal((6, 9)) * 3).astype(np.float32)
  y = rng.integers(0, 9, 6)
  z[0, y[0]] = 100.0
  z[0] = np.where(np.arange(9) == y[0], 100.0, 85.0 + z[0])   # p_y - 1 ~ -1e-5
  y[3] = IGNORE
  eps, zl = label_smoothing, z_loss
  loss, grad = jax.value_and_grad(lambda x: cross_entropy(
      x, jnp.asarray(y), label_smoothing=eps, z_loss=zl, reduction="sum"))(jnp.asarray(z))
  z64 = z.astype(np.float64)
  valid = y != IGNORE
  ys = np.where(valid, y, 0)
  m = z64.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z64 - m).sum(-1, keepdims=True)))[:, 0]
  p = np.exp(z64 - lse[:, None])
  onehot = np.eye(9)[ys]
  nll = _np_exact_nll(z64, ys)
  ref_loss = np.where(valid, (1 - eps) * nll + eps * (lse - z64.mean(-1)) + zl * lse**2, 0)
  ref_grad = ((1 - eps) * (p - onehot) + eps * (p - 1 / 9) + 2 * zl * lse[:, None] * p)
  ref_grad = np.where(valid[:, None], ref_grad, 0.0)
  np.testing.assert_allclose(float(loss), ref_loss.sum(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-7)
  if eps == 0 and zl == 0:   # the tiny label entry, relatively
    np.testing.assert_allclose(float(grad[0, y[0]]), ref_grad[0, y[0]], rtol=1e-4)
    assert abs(ref_grad[0, y[0]]) < 1e-4


def test_bf16_max_logits_with_z_loss_loss_never_nan_gradient_finite():
  big = float(jnp.finfo(jnp.bfloat16).max)
  logits = jnp.asarray([[big, -big, 0.0, big], [big, -big, 1.0, -big]], jnp.bfloat16)
  for labels in ([0, 1], [1, 2], [2, 0]):
    for eps in (0.0, 0.1):
      f = lambda z: cross_entropy(z, jnp.asarray(labels), z_loss=1e-4, label_smoothing=eps)
      loss, grad = jax.value_and_grad(f)(logits)
      # The true loss (1e-4 * lse**2 ~ 1e73) is beyond float32: inf, never NaN.
      assert not np.isnan(float(loss)) and float(loss) > 0
      g = np.asarray(grad.astype(jnp.float32))
      assert np.isfinite(g).all(), g
      # 2 z_loss lse p / N at the max classes (N = 2 tokens): ~3.4e34 * p.
      assert np.abs(g).max() > 1e33 and np.abs(g).max() < 1e35


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_label_under_jit_gives_nan_gradient_too(reduction):
  """A guard that checks gradients must fire: the bad token's row of the gradient is NaN
  (it used to be an exact, silent 0), the other rows stay finite and correct."""
  logits, labels = _batch(35)
  bad = labels.at[0, 2].set(7)
  f = lambda z, y: jnp.sum(cross_entropy(z, y, reduction=reduction, label_smoothing=0.1,
                                         z_loss=1e-3))
  loss, grad = jax.jit(jax.value_and_grad(f))(logits, bad)
  assert np.isnan(float(loss))
  assert np.isnan(np.asarray(grad[0, 2])).all()
  rest = np.asarray(grad).reshape(-1, 7)
  rest = np.delete(rest, 2, axis=0)
  assert np.isfinite(rest).all()
  if reduction != "mean":   # the other rows' gradients do not depend on the bad one
    good = jax.grad(f)(logits, labels.at[0, 2].set(IGNORE))
    np.testing.assert_allclose(rest, np.delete(np.asarray(good).reshape(-1, 7), 2, axis=0),
                               rtol=1e-6, atol=1e-8)
  # causal_lm_loss shares the rule.
  ids = jnp.asarray([[1, 2, 9]])
  g = jax.jit(jax.grad(lambda z: causal_lm_loss(z, ids)))(jnp.zeros((1, 3, 7)))
  assert np.isnan(np.asarray(g[0, 1])).all() and np.isfinite(np.asarray(g[0, 0])).all()


# ---------------------------------------------------------------------------------------
# 7. Class weights and soft targets (issue 17): torch's F.cross_entropy semantics.


def _np_weighted(logits, labels, *, weight=None, ignore_index=IGNORE, label_smoothing=0.0,
                 z_loss=0.0, reduction="mean", where=None):
  """float64 reference from the docstring's equations, hard or soft (floating) labels."""
  z = np.asarray(jnp.asarray(logits, jnp.float32), np.float64)
  vocab = z.shape[-1]
  w = np.ones(vocab) if weight is None else np.asarray(weight, np.float64)
  m = z.max(-1, keepdims=True)
  lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
  neg_logp = lse[..., None] - z
  labels = np.asarray(labels)
  eps = label_smoothing
  if labels.dtype.kind == "f":
    valid = np.ones(z.shape[:-1], bool) if where is None else np.asarray(where)
    q = labels.astype(np.float64) * (1 - eps) + eps / vocab
    loss = (w * q * neg_logp).sum(-1) + z_loss * lse**2
    denom = valid.sum()
  else:
    valid = labels != ignore_index
    if where is not None:
      valid &= np.asarray(where)
    y = np.where(valid, labels, 0)
    w_y = w[y]
    nll = np.take_along_axis(neg_logp, y[..., None], -1)[..., 0]
    loss = (1 - eps) * w_y * nll + eps * (w * neg_logp).sum(-1) / vocab + z_loss * lse**2
    denom = np.where(valid, w_y, 0).sum()
  loss = np.where(valid, loss, 0.0)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return loss.sum()
  return loss.sum() / denom if denom else 0.0


def _soft_batch(seed, shape=(3, 5), vocab=7, alpha=0.5):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.standard_normal(shape + (vocab,))).astype(np.float32)
  probs = rng.dirichlet(np.full(vocab, alpha), size=shape).astype(np.float32)
  weight = rng.uniform(0.2, 2.0, vocab).astype(np.float32)
  return jnp.asarray(logits), jnp.asarray(probs), jnp.asarray(weight)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_and_soft_targets_match_the_equations(soft, reduction):
  logits, labels = _batch(50, n_ignored=3)
  _, probs, weight = _soft_batch(50)
  targets = probs if soft else labels
  where = np.random.default_rng(2).random(labels.shape) < 0.8
  for kw in (dict(weight=weight, label_smoothing=0.2, z_loss=1e-3),
             dict(weight=weight, where=where, label_smoothing=1.0),
             dict(label_smoothing=0.1, where=where)):   # soft without weights
    out = cross_entropy(logits, targets, reduction=reduction, **kw)
    chex.assert_type(out, jnp.float32)
    chex.assert_shape(out, labels.shape if reduction == "none" else ())
    _assert_close(out, _np_weighted(logits, targets, reduction=reduction, **kw),
                  rtol=2e-6, atol=2e-6)


def _torch_hard_label_smoothing(torch, z, y, w, *, ignore_index, label_smoothing,
                                reduction):
  """aten's ``cross_entropy_loss_label_smoothing`` (LossNLL.cpp) re-written with torch
  ops, so the class weights get a gradient (``nll_loss`` has none w.r.t. ``weight``)."""
  logp = torch.log_softmax(z, 1)
  ignore = y == ignore_index
  y0 = y.masked_fill(ignore, 0)
  shape = [1] * z.ndim
  shape[1] = -1
  w_y = w[y0].masked_fill(ignore, 0.0)
  nll = -logp.gather(1, y0.unsqueeze(1)).squeeze(1) * w_y
  smooth = -(logp * w.view(shape)).sum(1).masked_fill(ignore, 0.0)
  eps, vocab = label_smoothing, z.shape[1]
  if reduction == "none":
    return (1 - eps) * nll + smooth * (eps / vocab)
  if reduction == "sum":
    return (1 - eps) * nll.sum() + smooth.sum() * (eps / vocab)
  return ((1 - eps) * nll.sum() + smooth.sum() * (eps / vocab)) / w_y.sum()


def _torch_ce(torch, logits, targets, cot, **kw):
  """torch's value and gradients w.r.t. logits, (soft) targets and weight."""
  z_t = torch.tensor(np.asarray(logits), requires_grad=True)
  soft = jnp.issubdtype(targets.dtype, jnp.floating)
  t_t = (torch.tensor(np.asarray(targets), requires_grad=True) if soft
         else torch.tensor(np.asarray(targets), dtype=torch.long))
  w = kw.pop("weight", None)
  w_t = None if w is None else torch.tensor(np.asarray(w), requires_grad=True)
  ndim = z_t.ndim
  z_in = z_t if ndim == 2 else z_t.permute(0, 2, 1)   # torch: classes on axis 1
  t_in = t_t.permute(0, 2, 1) if soft and ndim == 3 else t_t
  if soft or w_t is None:
    out = torch.nn.functional.cross_entropy(z_in, t_in, weight=w_t, **kw)
  else:
    out = _torch_hard_label_smoothing(torch, z_in, t_in, w_t, **kw)
    with torch.no_grad():   # the re-implementation is torch's own function
      ref = torch.nn.functional.cross_entropy(z_in, t_in, weight=w_t.detach(), **kw)
    np.testing.assert_allclose(out.detach().numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
  (out * torch.tensor(cot)).sum().backward()
  grads = (z_t.grad.numpy(), t_t.grad.numpy() if soft else None,
           None if w_t is None else w_t.grad.numpy())
  return out.detach().numpy(), grads


@pytest.mark.parametrize("soft,weighted,label_smoothing,reduction,ndim", [
    (False, True, 0.0, "mean", 3), (False, True, 0.1, "mean", 3),
    (False, True, 0.1, "sum", 2), (False, True, 0.3, "none", 3),
    (True, False, 0.0, "mean", 3), (True, True, 0.0, "mean", 2),
    (True, True, 0.1, "mean", 3), (True, True, 0.2, "sum", 3),
    (True, False, 0.1, "none", 2), (True, True, 0.1, "none", 3),
])
def test_weights_and_soft_targets_pytorch_parity(soft, weighted, label_smoothing,
                                                 reduction, ndim):
  """Values and gradients w.r.t. logits, soft targets and the class weights, fp32."""
  torch = pytest.importorskip("torch")
  logits, labels = _batch(60 + ndim, n_ignored=3)
  _, probs, weight = _soft_batch(61, alpha=0.3 if soft else 1.0)
  if ndim == 2:
    logits, labels, probs = (x.reshape(-1, x.shape[-1]) for x in (logits, labels[..., None],
                                                                   probs))
    labels = labels[:, 0]
  targets = probs if soft else labels
  cot = np.random.default_rng(5).standard_normal(
      labels.shape if reduction == "none" else ()).astype(np.float32)
  w = weight if weighted else None
  kw = dict(label_smoothing=label_smoothing, reduction=reduction)

  def f(z, t, w):
    out = cross_entropy(z, t, weight=w, **kw)
    return jnp.sum(out * cot), out

  argnums = tuple(i for i, on in enumerate((True, soft, weighted)) if on)
  (_, out), grads = jax.value_and_grad(f, argnums, has_aux=True)(logits, targets, w)
  ref, ref_grads = _torch_ce(torch, logits, targets, cot, weight=w, ignore_index=IGNORE,
                             **kw)
  _assert_close(out, ref, rtol=1e-5, atol=1e-6)
  for g, r in zip(grads, [r for r in ref_grads if r is not None]):
    _assert_close(g, r, rtol=1e-5, atol=1e-6)
  # jit, with a traced weight, gives the same.
  out_jit = jax.jit(lambda z, t, w: cross_entropy(z, t, weight=w, **kw))(logits, targets, w)
  _assert_close(out_jit, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), label_smoothing=st.sampled_from([0.0, 0.1, 1.0]),
       scale=st.floats(0.1, 10.0), z_loss=st.sampled_from([0.0, 1e-3]))
def test_one_hot_soft_targets_equal_hard_labels_and_uniform_weights_none(
    seed, label_smoothing, scale, z_loss):
  logits, labels = _batch(seed, n_ignored=0)
  _, _, weight = _soft_batch(seed)
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  kw = dict(label_smoothing=label_smoothing, z_loss=z_loss)
  for w in (None, weight):
    for red in ("none", "sum"):   # the means differ with weights (torch's rules)
      _assert_close(cross_entropy(logits, onehot, weight=w, reduction=red, **kw),
                    cross_entropy(logits, labels, weight=w, reduction=red, **kw),
                    rtol=2e-5, atol=2e-5)
  # Unweighted (or uniform weights and no z-loss) the mean agrees too.
  _assert_close(cross_entropy(logits, onehot, **kw), cross_entropy(logits, labels, **kw),
                rtol=2e-5, atol=2e-5)
  # Uniform weights c: the weighted mean is the unweighted mean (c cancels); sum scales.
  uniform = jnp.full(logits.shape[-1], scale, jnp.float32)
  kw = dict(label_smoothing=label_smoothing)
  _assert_close(cross_entropy(logits, labels, weight=uniform, **kw),
                cross_entropy(logits, labels, **kw), rtol=2e-5, atol=2e-6)
  _assert_close(cross_entropy(logits, labels, weight=uniform, reduction="sum", **kw),
                scale * cross_entropy(logits, labels, reduction="sum", **kw),
                rtol=2e-5, atol=2e-5)


def test_zero_weights_give_zero_never_nan():
  """A zero class weight adds exactly 0 even at a -inf logit (torch: NaN); a zero weight
  sum gives 0.0 with zero gradient (torch: NaN); a bad label stays NaN."""
  z = jnp.asarray([[0.0, -jnp.inf, 1.0], [2.0, 0.0, -1.0]])
  w = jnp.asarray([1.0, 0.0, 2.0])
  y = jnp.asarray([1, 0])   # token 0's label has weight 0 and logit -inf
  for eps in (0.0, 0.1):
    loss, grad = jax.value_and_grad(lambda z: cross_entropy(
        z, y, weight=w, label_smoothing=eps, reduction="sum"))(z)
    ref = _np_weighted(np.where(np.isinf(z), -1e30, z), y, weight=w, label_smoothing=eps,
                       reduction="sum")
    _assert_close(loss, ref, rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()
  # Soft targets: q = 0 at the -inf logit.
  q = jnp.asarray([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
  loss, (gz, gq) = jax.value_and_grad(lambda z, q: cross_entropy(z, q, weight=w),
                                      (0, 1))(z, q)
  assert np.isfinite(float(loss)) and np.isfinite(np.asarray(gz)).all()
  assert np.isfinite(np.asarray(gq)[0, [0, 2]]).all()
  # Only zero-weight targets counted: 0.0 and zero gradient, eager and jitted, also for
  # the smoothing term (whose own sum is not 0).
  for f in (cross_entropy, jax.jit(cross_entropy, static_argnames="label_smoothing")):
    loss, grad = jax.value_and_grad(lambda z: f(z, jnp.asarray([1, 1]), weight=w,
                                                label_smoothing=0.1))(jnp.ones((2, 3)))
    assert float(loss) == 0.0 and not np.asarray(grad).any()
  # A bad label under jit is NaN, even where the safe index's weight (class 0) is 0.
  w0 = jnp.asarray([0.0, 1.0, 1.0])
  f = jax.jit(jax.value_and_grad(lambda z, y: cross_entropy(z, y, weight=w0)))
  loss, grad = f(jnp.ones((2, 3)), jnp.asarray([5, IGNORE]))
  assert np.isnan(float(loss)) and np.isnan(np.asarray(grad[0])).all()


def test_soft_targets_mask_where_and_keep_tiny_losses():
  logits, probs, weight = _soft_batch(70)
  where = jnp.ones(probs.shape[:-1], bool).at[0, 1].set(False).at[2, 4].set(False)
  bad_z = logits.at[0, 1].set(jnp.nan).at[2, 4, 3].set(jnp.inf)
  bad_q = probs.at[0, 1].set(jnp.nan)
  f = lambda z, q: cross_entropy(z, q, weight=weight, where=where, z_loss=1e-3,
                                 label_smoothing=0.1)
  loss, (gz, gq) = jax.value_and_grad(f, (0, 1))(bad_z, bad_q)
  _assert_close(loss, _np_weighted(logits, probs, weight=weight, where=where, z_loss=1e-3,
                                   label_smoothing=0.1), rtol=2e-6)
  assert not np.asarray(gz[0, 1]).any() and not np.asarray(gq[2, 4]).any()
  assert np.isfinite(np.asarray(gz)).all() and np.isfinite(np.asarray(gq)).all()
  # A confident soft target: -log p ~ 8.4e-6 keeps its relative precision.
  out = cross_entropy(jnp.asarray([[100.0, 88.0, 87.0]]), jnp.asarray([[1.0, 0.0, 0.0]]))
  np.testing.assert_allclose(float(out), 8.404506e-6, rtol=1e-5)


def test_weights_pass_through_causal_and_masked_lm_loss():
  from jaxopt_llm.losses import masked_lm_loss
  logits, ids = _batch(80, n_ignored=2)
  _, _, weight = _soft_batch(80)
  kw = dict(weight=weight, label_smoothing=0.1)
  _assert_close(causal_lm_loss(logits, ids, **kw),
                _np_weighted(logits[:, :-1], ids[:, 1:], **kw), rtol=2e-6)
  _assert_close(masked_lm_loss(logits, ids, **kw), _np_weighted(logits, ids, **kw),
                rtol=2e-6)
  # Soft targets are cross_entropy's only: these take class indices.
  _, probs, _ = _soft_batch(80)
  with pytest.raises(ValueError, match="`labels`.*integer"):
    masked_lm_loss(logits, probs)
  with pytest.raises(ValueError, match="`input_ids`"):
    causal_lm_loss(logits, probs)


def test_bad_weight_and_soft_labels_raise_naming_them():
  logits, probs, weight = _soft_batch(90)
  labels = jnp.zeros(probs.shape[:-1], jnp.int32)
  for bad in (weight[:-1], weight[None], jnp.ones(7, bool), jnp.ones(7, jnp.complex64),
              weight.at[2].set(-0.5), weight.at[0].set(jnp.nan),
              weight.at[0].set(jnp.inf), "1.0"):
    with pytest.raises((TypeError, ValueError), match="`weight`"):
      cross_entropy(logits, labels, weight=bad)
    with pytest.raises((TypeError, ValueError), match="`weight`"):
      cross_entropy(logits, probs, weight=bad)
  # Integer weights are accepted (as floats).
  _assert_close(cross_entropy(logits, labels, weight=jnp.arange(1, 8)),
                _np_weighted(logits, labels, weight=np.arange(1, 8)), rtol=2e-6)
  # Floating labels are probabilities: they must have the logits' shape.
  for bad in (probs[..., :-1], probs[..., 0], probs[None]):
    with pytest.raises(ValueError, match="`labels`"):
      cross_entropy(logits, bad)
  # torch: "ignore_index is not supported for floating point target" (a negative one,
  # the default included, is ignored).
  with pytest.raises(ValueError, match="`ignore_index`"):
    cross_entropy(logits, probs, ignore_index=0)
  _assert_close(cross_entropy(logits, probs, ignore_index=-1),
                cross_entropy(logits, probs))
  with pytest.raises(ValueError, match="`where`"):
    cross_entropy(logits, probs, where=jnp.ones(probs.shape, bool))


def test_weighted_mean_is_scale_free_up_to_float32_max():
  """Fuzz finding: class weights near float32's maximum made the weighted mean's numerator
  and denominator overflow, inf / inf = NaN, where the mean (scale-free in the weights) is
  finite. The weights are now scaled by a power of two first (exact), so the mean of
  weights c * w equals that of w for every scale c, up to the float32 maximum, and the
  gradients stay finite."""
  rng = np.random.default_rng(7)
  z = jnp.asarray(2 * rng.standard_normal((2, 3, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, (2, 3)), jnp.int32).at[1, 2].set(-100)
  w = jnp.asarray([0.5, 2.0, 1.0, 0.0, 3.0], jnp.float32)
  f = lambda z, w: cross_entropy(z, y, weight=w, label_smoothing=0.1)
  want = f(z, w)
  # float64 reference: torch's weighted mean, sum_t l_t / sum_t w_{y_t}.
  z64, w64, y64 = np.asarray(z, np.float64), np.asarray(w, np.float64), np.asarray(y)
  valid = y64 != -100
  ys = np.where(valid, y64, 0)
  nlp = np.log(np.exp(z64).sum(-1, keepdims=True)) - z64
  per = 0.9 * w64[ys] * np.take_along_axis(nlp, ys[..., None], -1)[..., 0] + 0.1 * (
      nlp * w64 / 5).sum(-1)
  np.testing.assert_allclose(float(want), per[valid].sum() / w64[ys][valid].sum(), rtol=2e-6)
  for scale in (1e30, 1e38, float(jnp.finfo(jnp.float32).max) / 3.0):
    got = f(z, w * scale)
    np.testing.assert_allclose(float(got), float(want), rtol=2e-6)
    gz, gw = jax.grad(f, argnums=(0, 1))(z, w * scale)
    assert bool(jnp.all(jnp.isfinite(gz))) and bool(jnp.all(jnp.isfinite(gw)))
    np.testing.assert_allclose(gz, jax.grad(f)(z, w), rtol=1e-5, atol=1e-7)
  # All weights equal to the float32 maximum: the plain mean of the per-token losses.
  top = jnp.full(5, jnp.finfo(jnp.float32).max)
  np.testing.assert_allclose(float(f(z, top)),
                             float(cross_entropy(z, y, label_smoothing=0.1)), rtol=2e-6)
  # "sum" keeps the true (overflowing) products: +inf, not NaN.
  assert float(cross_entropy(z, y, weight=top, reduction="sum")) == float("inf")
