"""Tests for jaxopt_llm.losses.fused: equal to the unfused loss, never an [N, V] array."""
import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

from jaxopt_llm.losses import cross_entropy, fused_linear_cross_entropy
from jaxopt_llm.losses import fused as fused_module  # UPCAST_BACKENDS
from jaxopt_llm.losses.fused import default_chunk_size, default_vocab_block_size

IGNORE = -100
ARGS = (0, 1, 2)   # differentiate w.r.t. hidden, kernel, bias


def _data(seed, n=40, d=6, v=13, n_ignored=5, dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  hidden = scale * rng.standard_normal((n, d))
  kernel = rng.standard_normal((d, v)) / np.sqrt(d)
  bias = 0.5 * rng.standard_normal(v)
  labels = rng.integers(0, v, size=n)
  labels[rng.choice(n, size=n_ignored, replace=False)] = IGNORE
  cot = rng.standard_normal(n)   # per-token cotangent for reduction="none"
  return (jnp.asarray(hidden, dtype), jnp.asarray(kernel, dtype), jnp.asarray(bias, dtype),
          jnp.asarray(labels, jnp.int32), jnp.asarray(cot, jnp.float32))


def _unfused(hidden, kernel, labels, *, bias=None, logit_soft_cap=None, **kw):
  """The definition: cross_entropy on the materialised (soft-capped) logits."""
  z = jnp.matmul(hidden, kernel, precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    z = z + bias
  if logit_soft_cap is not None:
    z = logit_soft_cap * jnp.tanh(z / logit_soft_cap)
  return cross_entropy(z, labels, **kw)


def _scalar(loss_fn, labels, cot, reduction, **kw):
  """(hidden, kernel, bias) -> scalar; "none" is contracted with a random cotangent."""
  def f(h, w, b):
    out = loss_fn(h, w, labels, bias=b, reduction=reduction, **kw)
    return jnp.sum(out * cot) if reduction == "none" else out
  return f


def _assert_rel(actual, expected, rtol=1e-5, what=""):
  """Elementwise rtol, with an absolute floor of rtol * max|expected| for tiny entries.

  (The floor itself has a floor, 1e-3 * rtol: an exactly-zero reference, e.g. the
  gradient when V = 1, is then met by rounding noise of ~1e-9.)
  """
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  assert a.shape == e.shape, what
  scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-3)
  np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale, err_msg=what)


# ---------------------------------------------------------------------------------------
# 1. Equal to the unfused loss: value and all three gradients, every option combination.

_REDUCTIONS = ("mean", "sum", "none")
# Every combination of the options that change the loop's structure (static skips of the
# smoothing and z-loss terms, soft-cap, bias). Combination i runs with reduction i % 3, so
# every option value meets every reduction (asserted below) without the 3x cross product.
_COMBOS = [(eps, zl, cap, use_bias, _REDUCTIONS[i % 3]) for i, (eps, zl, cap, use_bias)
           in enumerate(itertools.product([0.0, 0.1], [0.0, 1e-2], [None, 2.5], [True, False]))]
# Chunk sizes that divide N = 40, that do not (the last chunk overlaps), 1, and > N.
_CHUNKS = [8, 7, 3, 64, 1, 40, 13, 16]


def test_every_option_combination_matches_unfused():
  for k in range(4):
    pairs = {(combo[k], combo[4]) for combo in _COMBOS}
    assert len(pairs) == 2 * len(_REDUCTIONS), pairs
  hidden, kernel, bias, labels, cot = _data(0)

  def both(h, w, b):
    out = []
    for i, (eps, zl, cap, use_bias, reduction) in enumerate(_COMBOS):
      kw = dict(label_smoothing=eps, z_loss=zl, logit_soft_cap=cap)
      fused = _scalar(fused_linear_cross_entropy, labels, cot, reduction,
                      chunk_size=_CHUNKS[i % len(_CHUNKS)], **kw)
      ref = _scalar(_unfused, labels, cot, reduction, **kw)
      if not use_bias:   # bias=None; the gradient w.r.t. the unused b is then 0.
        fused, ref = (lambda f: lambda h, w, b: f(h, w, None))(fused), \
            (lambda f: lambda h, w, b: f(h, w, None))(ref)
      out.append((jax.value_and_grad(fused, ARGS)(h, w, b),
                  jax.value_and_grad(ref, ARGS)(h, w, b)))
    return out

  results = jax.jit(both)(hidden, kernel, bias)
  for combo, ((val, grads), (ref_val, ref_grads)) in zip(_COMBOS, results):
    what = f"eps,z_loss,cap,bias,reduction={combo}"
    chex.assert_type(val, jnp.float32)
    chex.assert_shape(val, ())
    _assert_rel(val, ref_val, what=what + " value")
    for name, g, rg in zip(("hidden", "kernel", "bias"), grads, ref_grads):
      chex.assert_equal_shape([g, rg])
      _assert_rel(g, rg, what=f"{what} d{name}")
    assert float(jnp.max(jnp.abs(grads[0][labels == IGNORE]))) == 0.0, what


def test_per_token_values_match():
  hidden, kernel, bias, labels, _ = _data(1)
  kw = dict(label_smoothing=0.2, z_loss=1e-3, logit_soft_cap=4.0, reduction="none")
  out, ref = jax.jit(lambda h, w, b: (
      fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=6, **kw),
      _unfused(h, w, labels, bias=b, **kw)))(hidden, kernel, bias)
  chex.assert_shape(out, labels.shape)
  _assert_rel(out, ref)
  assert np.all(np.asarray(out)[np.asarray(labels) == IGNORE] == 0.0)


def _np_loss_and_grads(h, w, b, y, *, eps, zl, cap, reduction):
  """float64 loss and its gradients, written from the equations (no autodiff).

  u = h W + b, z = cap tanh(u / cap), p = softmax(z);
  loss_i = (1 - eps)(lse - z_y) + eps (lse - mean z) + zl lse^2;
  dloss_i/dz = (1 - eps)(p - onehot) + eps (p - 1/V) + 2 zl lse p;
  dz/du = 1 - tanh^2; dh = g W^T, dW = h^T g, db = sum_i g.
  """
  h, w, b = (np.asarray(x, np.float64) for x in (h, w, b))
  y = np.asarray(y)
  n, v = h.shape[0], w.shape[1]
  u = h @ w + b
  t = np.tanh(u / cap)
  z = cap * t
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
  p = np.exp(z - lse[:, None])
  valid = y != IGNORE
  ys = np.where(valid, y, 0)
  onehot = np.eye(v)[ys]
  loss = ((1 - eps) * (lse - z[np.arange(n), ys]) + eps * (lse - z.mean(-1))
          + zl * lse**2) * valid
  dz = (1 - eps) * (p - onehot) + eps * (p - 1.0 / v) + 2 * zl * lse[:, None] * p
  scale = valid / (max(valid.sum(), 1) if reduction == "mean" else 1.0)
  g = dz * (1 - t**2) * scale[:, None]
  value = loss.sum() / (max(valid.sum(), 1) if reduction == "mean" else 1.0)
  return value, (g @ w.T, h.T @ g, g.sum(0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_equations_in_float64(reduction):
  hidden, kernel, bias, labels, _ = _data(2, n=23)
  kw = dict(label_smoothing=0.15, z_loss=2e-3)
  val, grads = jax.jit(jax.value_and_grad(
      lambda h, w, b: fused_linear_cross_entropy(
          h, w, labels, bias=b, logit_soft_cap=3.0, reduction=reduction, chunk_size=5,
          **kw), ARGS))(hidden, kernel, bias)
  ref_val, ref_grads = _np_loss_and_grads(hidden, kernel, bias, labels, eps=0.15, zl=2e-3,
                                          cap=3.0, reduction=reduction)
  _assert_rel(val, ref_val)
  for g, rg in zip(grads, ref_grads):
    _assert_rel(g, rg)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_pytorch(reduction):
  torch = pytest.importorskip("torch")
  hidden, kernel, bias, labels, _ = _data(3)
  eps, zl, cap = 0.1, 1e-2, 5.0
  th, tw, tb = (torch.tensor(np.asarray(x, np.float64), requires_grad=True)
                for x in (hidden, kernel, bias))
  ty = torch.tensor(np.asarray(labels), dtype=torch.long)
  z = cap * torch.tanh((th @ tw + tb) / cap)
  loss = torch.nn.functional.cross_entropy(z, ty, ignore_index=IGNORE,
                                           label_smoothing=eps, reduction=reduction)
  valid = (ty != IGNORE).double()
  zterm = (zl * torch.logsumexp(z, -1) ** 2 * valid).sum()
  loss = loss + (zterm / valid.sum() if reduction == "mean" else zterm)
  loss.backward()
  val, grads = jax.jit(jax.value_and_grad(
      lambda h, w, b: fused_linear_cross_entropy(
          h, w, labels, bias=b, label_smoothing=eps, z_loss=zl, logit_soft_cap=cap,
          reduction=reduction, chunk_size=9), ARGS))(hidden, kernel, bias)
  _assert_rel(val, loss.detach().numpy())
  for g, tg in zip(grads, (th.grad, tw.grad, tb.grad)):
    _assert_rel(g, tg.numpy())


@settings(max_examples=5, deadline=None)
@given(n=st.integers(1, 30), d=st.integers(1, 5), v=st.integers(1, 9),
       chunk=st.integers(1, 40), block=st.integers(1, 12), seed=st.integers(0, 2**16),
       frac_ignored=st.floats(0.0, 1.0))
def test_property_any_shape_and_tile_matches_unfused(n, d, v, chunk, block, seed,
                                                     frac_ignored):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
  labels = np.asarray(rng.integers(0, v, size=n))
  labels[rng.random(n) < frac_ignored] = IGNORE
  labels = jnp.asarray(labels)
  fused = lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_size=chunk,
                                                  vocab_block_size=block,
                                                  label_smoothing=0.05)
  ref = lambda h, w: _unfused(h, w, labels, label_smoothing=0.05)
  (val, grads), (ref_val, ref_grads) = jax.jit(lambda h, w: (
      jax.value_and_grad(fused, (0, 1))(h, w), jax.value_and_grad(ref, (0, 1))(h, w)))(
          hidden, kernel)
  _assert_rel(val, ref_val)
  for g, rg in zip(grads, ref_grads):
    _assert_rel(g, rg)


def test_leading_batch_dims_and_where():
  hidden, kernel, bias, labels, _ = _data(4, n=30)
  where = np.random.default_rng(4).random(30) < 0.7
  h3, y3, w3 = hidden.reshape(2, 15, -1), labels.reshape(2, 15), where.reshape(2, 15)
  masked = jnp.where(jnp.asarray(w3), y3, IGNORE)
  f = lambda h: fused_linear_cross_entropy(h, kernel, y3, where=w3, chunk_size=4)
  g = lambda h: fused_linear_cross_entropy(h, kernel, masked, chunk_size=4)
  out, ref, with_where, with_ignore = jax.jit(lambda h: (
      fused_linear_cross_entropy(h, kernel, y3, bias=bias, where=w3, reduction="none",
                                 chunk_size=4),
      _unfused(h, kernel, y3, bias=bias, where=w3, reduction="none"),
      jax.value_and_grad(f)(h), jax.value_and_grad(g)(h)))(h3)
  chex.assert_shape(out, (2, 15))
  _assert_rel(out, ref)
  # where=False is exactly ignore_index.
  chex.assert_trees_all_close(with_where, with_ignore, rtol=1e-6, atol=1e-7)
  chex.assert_shape(with_where[1], h3.shape)


# ---------------------------------------------------------------------------------------
# 2. Ignored tokens, all-ignored batches, bad labels.


def test_all_ignored_gives_zero_and_zero_grads():
  hidden, kernel, bias, _, cot = _data(5, n=12)
  labels = jnp.full((12,), IGNORE)
  kw = dict(label_smoothing=0.3, z_loss=1e-2, logit_soft_cap=2.0, chunk_size=5)

  def run(h, w, b):
    return {red: (fused_linear_cross_entropy(h, w, labels, bias=b, reduction=red, **kw),
                  jax.value_and_grad(_scalar(fused_linear_cross_entropy, labels, cot, red,
                                             **kw), ARGS)(h, w, b))
            for red in ("mean", "sum", "none")}

  for red, (out, (val, grads)) in jax.jit(run)(hidden, kernel, bias).items():
    chex.assert_shape(out, labels.shape if red == "none" else ())
    assert np.all(np.asarray(out) == 0.0) and float(val) == 0.0, red
    for g in grads:
      assert np.all(np.asarray(g) == 0.0), red


def test_nonfinite_hidden_in_ignored_rows_does_not_leak():
  hidden, kernel, bias, labels, _ = _data(6)
  ignored = np.asarray(labels) == IGNORE
  poisoned = jnp.where(jnp.asarray(ignored)[:, None], jnp.nan, hidden)
  poisoned = poisoned.at[np.flatnonzero(ignored)[0]].set(jnp.inf)
  zeroed = jnp.where(jnp.asarray(ignored)[:, None], 0.0, hidden)
  f = lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, z_loss=1e-3,
                                                 label_smoothing=0.1, chunk_size=7)
  val, grads = jax.jit(jax.value_and_grad(f, ARGS))(poisoned, kernel, bias)
  ref_val, ref_grads = jax.jit(jax.value_and_grad(
      lambda h, w, b: _unfused(h, w, labels, bias=b, z_loss=1e-3, label_smoothing=0.1),
      ARGS))(zeroed, kernel, bias)
  _assert_rel(val, ref_val)
  for g, rg in zip(grads, ref_grads):
    assert np.all(np.isfinite(np.asarray(g)))
    _assert_rel(g, rg)


def test_out_of_range_label_is_nan_under_jit_and_checkify_catches_it():
  hidden, kernel, _, labels, _ = _data(7, n=10)
  bad = labels.at[3].set(13)   # V = 13
  f = jax.jit(lambda h, y: fused_linear_cross_entropy(h, kernel, y, chunk_size=4))
  assert np.isnan(float(f(hidden, bad)))
  assert np.isfinite(float(f(hidden, labels)))
  checked = checkify.checkify(jax.jit(lambda h, y: fused_linear_cross_entropy(
      h, kernel, y, chunk_size=4, validate=True)))
  err, _ = checked(hidden, bad)
  with pytest.raises(checkify.JaxRuntimeError, match="labels"):
    err.throw()
  err, _ = checked(hidden, labels)
  err.throw()


# ---------------------------------------------------------------------------------------
# 3. dtypes, jit, transformations.


def test_bf16_inputs_within_bf16_tolerance():
  hidden, kernel, bias, labels, _ = _data(8, n=48, d=16, v=50, dtype=jnp.bfloat16)
  kw = dict(label_smoothing=0.1, z_loss=1e-3)
  f = lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=10, **kw)
  val, grads = jax.jit(jax.value_and_grad(f, ARGS))(hidden, kernel, bias)
  chex.assert_type(val, jnp.float32)
  chex.assert_trees_all_equal_dtypes(grads, (hidden, kernel, bias))
  # Reference 1: the exact loss of these bf16 values, in float32. Fused accumulates the
  # logits in float32, so its value is float32-accurate; its gradients round the
  # logits' gradient to bf16 for the matmuls (as the unfused bf16 path does).
  up = lambda x: x.astype(jnp.float32)
  (ref_val, ref_grads), (bf_val, bf_grads) = jax.jit(lambda h, w, b: (
      jax.value_and_grad(lambda h, w, b: _unfused(h, w, labels, bias=b, **kw), ARGS)(
          up(h), up(w), up(b)),
      jax.value_and_grad(lambda h, w, b: cross_entropy(h @ w + b, labels, **kw), ARGS)(
          h, w, b)))(hidden, kernel, bias)
  _assert_rel(val, ref_val, rtol=1e-5)
  for g, rg in zip(grads, ref_grads):
    _assert_rel(g, rg, rtol=2e-2)
  # Reference 2: the unfused path run in bf16.
  _assert_rel(val, bf_val, rtol=2e-2)
  for g, rg in zip(grads, bf_grads):
    _assert_rel(g, rg, rtol=5e-2)


def test_traced_hyperparameters_under_jit():
  hidden, kernel, bias, labels, _ = _data(9)
  f = jax.jit(jax.value_and_grad(
      lambda h, eps, zl, cap: fused_linear_cross_entropy(
          h, kernel, labels, bias=bias, label_smoothing=eps, z_loss=zl,
          logit_soft_cap=cap, chunk_size=16)))
  g = jax.jit(jax.value_and_grad(
      lambda h, eps, zl, cap: _unfused(h, kernel, labels, bias=bias, label_smoothing=eps,
                                       z_loss=zl, logit_soft_cap=cap)))
  for args in [(0.0, 0.0, 3.0), (0.25, 1e-2, 1.5)]:
    val, grad = f(hidden, *args)
    ref_val, ref_grad = g(hidden, *args)
    _assert_rel(val, ref_val)
    _assert_rel(grad, ref_grad)


def test_frozen_kernel_hvp_and_vmap():
  hidden, kernel, bias, labels, _ = _data(10, n=20)
  fused = lambda h, w: fused_linear_cross_entropy(h, w, labels, z_loss=1e-2, chunk_size=6)
  ref = lambda h, w: _unfused(h, w, labels, z_loss=1e-2)
  tangent = jnp.asarray(np.random.default_rng(10).standard_normal(hidden.shape), jnp.float32)
  hvp = lambda f, h, w: jax.jvp(jax.grad(lambda h: f(h, w)), (h,), (tangent,))[1]

  def run(h, w):
    stacked = jnp.stack([h, 2.0 * h])
    return [(f(h, w), jax.grad(f, 0)(h, w), jax.grad(f, 1)(h, w), hvp(f, h, w),
             jax.vmap(jax.grad(f), (0, None))(stacked, w)) for f in (fused, ref)]

  # Only dL/dhidden (frozen head), only dL/dkernel; a Hessian-vector product
  # (forward-over-reverse, as Sophia's Hutchinson estimator uses); vmap.
  got, want = jax.jit(run)(hidden, kernel)
  for name, a, b in zip(("value", "dh only", "dW only", "hvp", "vmap"), got, want):
    _assert_rel(a, b, rtol=1e-4 if name == "hvp" else 1e-5, what=name)


def test_inside_shard_map_data_parallel():
  """The recipe for token-sharded inputs: local sums in shard_map, one psum, no gather."""
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices (tests/conftest.py asks for 8 CPU devices)")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  P = jax.sharding.PartitionSpec
  hidden, kernel, bias, labels, _ = _data(13, n=8 * len(devices))
  kw = dict(label_smoothing=0.1, z_loss=1e-3)

  def local(h, w, b, y):
    total = fused_linear_cross_entropy(h, w, y, bias=b, reduction="sum", chunk_size=3, **kw)
    count = jnp.sum(y != IGNORE)
    return jax.lax.psum(total, "data") / jnp.maximum(jax.lax.psum(count, "data"), 1)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                          out_specs=P())
  step = jax.jit(jax.value_and_grad(sharded, ARGS))
  val, grads = step(hidden, kernel, bias, labels)
  ref_val, ref_grads = jax.jit(jax.value_and_grad(
      lambda h, w, b: _unfused(h, w, labels, bias=b, **kw), ARGS))(hidden, kernel, bias)
  _assert_rel(val, ref_val)
  for g, rg in zip(grads, ref_grads):
    _assert_rel(g, rg)
  assert "all-gather" not in step.lower(hidden, kernel, bias, labels).compile().as_text()


def test_gradient_wrt_hyperparameters_is_an_error_not_a_silent_zero():
  hidden, kernel, _, labels, _ = _data(14, n=8)
  with pytest.raises(NotImplementedError, match="label_smoothing"):
    jax.grad(lambda eps: fused_linear_cross_entropy(
        hidden, kernel, labels, label_smoothing=eps))(0.1)


def _count_dots(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_matmul_count_forward_once_backward_recomputes():
  """Not differentiated: the logits only. Differentiated: the forward's logits, then the
  backward's recomputed logits, dh and dW (4; the unfused path has 3: the recompute is
  what a [d, V]-accumulator-free backward costs, replacing the earlier 3-matmul scheme
  whose float32 [d, V] accumulator was 4x the kernel gradient at LLM shapes). A frozen
  kernel skips dW; every reduction runs the same scheme."""
  hidden, kernel, bias, labels, cot = _data(11)
  mean = lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_size=8)
  none = lambda h, w: jnp.sum(cot * fused_linear_cross_entropy(
      h, w, labels, chunk_size=8, reduction="none"))
  assert _count_dots(mean, hidden, kernel) == 1
  assert _count_dots(jax.value_and_grad(mean, (0, 1)), hidden, kernel) == 4
  assert _count_dots(jax.grad(mean, 0), hidden, kernel) == 3
  assert _count_dots(jax.value_and_grad(none, (0, 1)), hidden, kernel) == 4


# ---------------------------------------------------------------------------------------
# 4. Never an [N, V] buffer.

_SHAPE_RE = re.compile(r"\b(?:f|bf|s|u|pred)\d*\[([\d,]*)\]")


def test_no_tokens_by_vocab_buffer_in_compiled_program():
  n, d, v = 8192, 32, 32768     # one float32 [N, V] array = 1 GiB
  spec = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  full = n * v * 4

  def compiled(loss):
    return jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*spec).compile()

  fused = compiled(lambda h, w, y: fused_linear_cross_entropy(h, w, y, z_loss=1e-4))
  none = compiled(lambda h, w, y: jnp.sum(fused_linear_cross_entropy(
      h, w, y, reduction="none", label_smoothing=0.1)))
  unfused = compiled(lambda h, w, y: cross_entropy(h @ w, y, z_loss=1e-4))
  # The measurement can tell: the unfused program needs at least one [N, V] buffer.
  assert unfused.memory_analysis().temp_size_in_bytes >= full
  for c in (fused, none):
    assert c.memory_analysis().temp_size_in_bytes < full / 8
    biggest = max(int(np.prod([int(s) for s in m.split(",") if s]))
                  for m in _SHAPE_RE.findall(c.as_text()))
    tile = default_chunk_size(n, v) * default_vocab_block_size(n, v)
    assert biggest <= max(tile, d * v) and tile < n * v // 8


def test_default_tile_sizes():
  assert default_chunk_size(4096, 32000, "cpu") == 4096            # all the tokens
  assert default_vocab_block_size(4096, 32000, "cpu") == 2000      # 16 blocks, 31 MiB
  assert default_chunk_size(8192, 128256, "gpu") == 8192
  assert default_vocab_block_size(8192, 128256, "gpu") == 4008     # 32 blocks, 125 MiB
  assert default_chunk_size(10**6, 10**7, "cpu") == 65536          # [C, 128] is 32 MiB
  assert default_vocab_block_size(100, 50, "cpu") == 50            # never more than V
  for n, v, backend in [(4096, 32000, "cpu"), (8192, 128256, "gpu"), (777, 3000, "tpu"),
                        (10**6, 10**7, "cpu"), (3, 7, "cpu")]:
    c = default_chunk_size(n, v, backend)
    b = default_vocab_block_size(n, v, backend)
    budget = (32 if backend == "cpu" else 128) * 2**20
    assert 1 <= c <= max(n, 1) and 1 <= b <= v
    assert c * b * 4 <= budget or b == min(v, 128), (n, v, backend)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_vocabulary_blocks_and_token_chunks_overlapping(layout):
  """Blocks of 5 columns (at 0, 5, 8: the last overlaps) and chunks of 7 tokens (the
  last overlaps too): every tile counted once, in both kernel layouts."""
  hidden, kernel, bias, labels, cot = _data(15)     # d = 6, V = 13, N = 40
  w = kernel if layout == "dv" else kernel.T
  for reduction in ("mean", "none"):
    f = _scalar(fused_linear_cross_entropy, labels, cot, reduction, chunk_size=7,
                vocab_block_size=5, label_smoothing=0.1, z_loss=1e-3, kernel_layout=layout)
    ref = _scalar(_unfused, labels, cot, reduction, label_smoothing=0.1, z_loss=1e-3)
    ref_w = (lambda h, w, b: ref(h, w, b)) if layout == "dv" else (
        lambda h, w, b: ref(h, w.T, b))
    (val, grads), (ref_val, ref_grads) = jax.jit(lambda h, w, b: (
        jax.value_and_grad(f, ARGS)(h, w, b), jax.value_and_grad(ref_w, ARGS)(h, w, b)))(
            hidden, w, bias)
    _assert_rel(val, ref_val, what=reduction)
    for g, rg in zip(grads, ref_grads):
      chex.assert_equal_shape([g, rg])
      _assert_rel(g, rg, what=reduction)


# ---------------------------------------------------------------------------------------
# 5. Extremes and bad arguments.


def test_finite_under_extreme_logits():
  hidden, kernel, bias, labels, _ = _data(12, scale=3e3)     # |logits| ~ 1e4

  def run(h, w):
    out = []
    for cap in (None, 30.0):
      kw = dict(bias=bias, label_smoothing=0.1, z_loss=1e-4, logit_soft_cap=cap)
      f = lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_size=7, **kw)
      g = lambda h, w: _unfused(h, w, labels, **kw)
      out.append((jax.value_and_grad(f, (0, 1))(h, w), jax.value_and_grad(g, (0, 1))(h, w)))
    return out

  for (val, grads), (ref_val, ref_grads) in jax.jit(run)(hidden, kernel):
    assert np.isfinite(float(val)) and float(val) > 1.0
    _assert_rel(val, ref_val)
    for g, rg in zip(grads, ref_grads):
      assert np.all(np.isfinite(np.asarray(g)))
      _assert_rel(g, rg, rtol=1e-4)


def test_empty_batch():
  kernel = jnp.ones((4, 5))
  out = fused_linear_cross_entropy(jnp.zeros((0, 4)), kernel, jnp.zeros((0,), jnp.int32))
  assert float(out) == 0.0
  none = fused_linear_cross_entropy(jnp.zeros((2, 0, 4)), kernel,
                                    jnp.zeros((2, 0), jnp.int32), reduction="none")
  chex.assert_shape(none, (2, 0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=-3), "chunk_size"),
    (dict(chunk_size=2.5), "chunk_size"),
    (dict(chunk_size=True), "chunk_size"),
    (dict(logit_soft_cap=0.0), "logit_soft_cap"),
    (dict(logit_soft_cap=-1.0), "logit_soft_cap"),
    (dict(logit_soft_cap=float("nan")), "logit_soft_cap"),
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1e-4), "z_loss"),
    (dict(ignore_index=1.5), "ignore_index"),
    (dict(bias=jnp.zeros(4)), "bias"),
    (dict(bias=jnp.zeros(5, jnp.int32)), "bias"),
    (dict(where=jnp.ones(3, bool)), "where"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
  hidden, kernel, labels = jnp.ones((6, 3)), jnp.ones((3, 5)), jnp.zeros(6, jnp.int32)
  with pytest.raises(ValueError, match=match):
    fused_linear_cross_entropy(hidden, kernel, labels, **kwargs)


@pytest.mark.parametrize("hidden,kernel,labels,match", [
    (jnp.ones((6, 3), jnp.int32), jnp.ones((3, 5)), jnp.zeros(6, jnp.int32), "hidden"),
    (jnp.ones((6, 3)), jnp.ones((4, 5)), jnp.zeros(6, jnp.int32), "kernel"),
    (jnp.ones((6, 3)), jnp.ones((3, 5, 1)), jnp.zeros(6, jnp.int32), "kernel"),
    (jnp.ones((6, 3)), jnp.ones((3, 0)), jnp.zeros(6, jnp.int32), "kernel"),
    (jnp.ones((6, 3)), jnp.ones((3, 5), jnp.int32), jnp.zeros(6, jnp.int32), "kernel"),
    (jnp.ones((6, 3)), jnp.ones((3, 5)), jnp.zeros(5, jnp.int32), "labels"),
    (jnp.ones((6, 3)), jnp.ones((3, 5)), jnp.zeros(6), "labels"),
    (jnp.ones((6, 3)), jnp.ones((3, 5)), jnp.array([0, 1, 2, 5, 0, 0]), r"labels.*\[5\]"),
    (jnp.ones((6, 3)), jnp.ones((3, 5)), jnp.array([0, 1, 2, -1, 0, 0]), r"labels.*\[-1\]"),
])
def test_bad_arrays_raise_naming_them(hidden, kernel, labels, match):
  with pytest.raises(ValueError, match=match):
    fused_linear_cross_entropy(hidden, kernel, labels)


# ---------------------------------------------------------------------------------------
# 6. Numerics of issue 14: tiny losses, +-max bf16 logits, NaN gradients of bad labels.


def _np_exact_nll(z, y):
  """float64 -log softmax(z)_y, log1p where the label is the max (exact for tiny values)."""
  z = np.asarray(z, np.float64)
  y = np.asarray(y)
  others = np.where(np.arange(z.shape[-1]) == y[..., None], -np.inf,
                    z - np.take_along_axis(z, y[..., None], -1))
  m = np.maximum(others.max(-1), 0.0)
  rest = np.exp(others - m[..., None]).sum(-1)
  return np.where(m == 0, np.log1p(rest), m + np.log(np.exp(-m) + rest))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_tiny_losses_keep_relative_precision(reduction):
  """hidden = identity rows, so the logits are exactly the kernel's columns: the issue's
  [100, 88, 87] (exact 8.40451e-6; logsumexp - z_y gave 7.63e-6) and random well-fit
  tokens at logits ~1e2, each within 1e-4 of the float64 value; the hidden gradient
  (whose label entry is the tiny p_y - 1) likewise."""
  rng = np.random.default_rng(3)
  v, n = 20, 24
  z = rng.uniform(-100, 100, (n, v))
  y = rng.integers(0, v, n)
  z[np.arange(n), y] = z.max(-1) + rng.uniform(7, 20, n)
  z[0, :3], y[0] = [100.0, 88.0, 87.0], 0
  z[0, 3:] = -1e4
  z = z.astype(np.float32)
  hidden = jnp.eye(n, dtype=jnp.float32)       # [n, d = n]
  kernel = jnp.asarray(z)                      # [d, V]: logits row i = z[i]
  f = lambda h: fused_linear_cross_entropy(h, kernel, jnp.asarray(y), reduction=reduction,
                                           chunk_size=7)
  out = f(hidden)
  exact = _np_exact_nll(z, y)
  assert exact.max() < 1e-2
  if reduction == "none":
    np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-4)
    np.testing.assert_allclose(float(out[0]), 8.404506e-6, rtol=1e-5)
  else:
    np.testing.assert_allclose(float(out), exact.sum(), rtol=1e-4)
  # d loss / d hidden = (softmax - onehot) @ kernel.T; the diagonal entry h_ii meets
  # z_i . (p_i - e_y) = sum_c p_c z_c - z_y: exact in float64 from the exact p - onehot.
  grad = jax.grad(lambda h: jnp.sum(f(h)))(hidden)
  z64 = z.astype(np.float64)
  p = np.exp(z64 - z64.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  g = p - np.eye(v)[y]
  g[np.arange(n), y] = -(1 - np.exp(-exact)) * 1.0   # p_y - 1, exactly
  ref = g @ z64.T
  np.testing.assert_allclose(np.asarray(grad), ref, rtol=2e-3, atol=1e-6 * np.abs(ref).max())


def test_bf16_max_logits_with_z_loss_loss_never_nan_gradient_finite():
  big = float(jnp.finfo(jnp.bfloat16).max)
  rows = np.asarray([[big, -big, 0.0, big], [big, -big, 1.0, -big]])
  hidden = jnp.eye(2, dtype=jnp.bfloat16)
  kernel = jnp.asarray(rows, jnp.bfloat16)     # logits = rows, exactly
  for labels in ([0, 1], [1, 2], [2, 0]):
    for eps in (0.0, 0.1):
      f = lambda h, w: fused_linear_cross_entropy(h, w, jnp.asarray(labels), z_loss=1e-4,
                                                  label_smoothing=eps)
      loss, (gh, gw) = jax.value_and_grad(f, (0, 1))(hidden, kernel)
      assert not np.isnan(float(loss)) and float(loss) > 0
      gw = np.asarray(gw.astype(jnp.float32))
      assert np.isfinite(gw).all(), gw
      assert np.abs(gw).max() > 1e33 and np.abs(gw).max() < 1e35
      # d/dhidden = g @ kernel.T contracts ~1e34 gradients with ~3e38 logits: that
      # product is beyond any float, so only the kernel gradient is checked finite.


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_label_under_jit_gives_nan_gradients(reduction):
  """Like cross_entropy: a guard that checks gradients must fire (they used to be finite,
  with the bad token's contribution silently 0)."""
  hidden, kernel, bias, labels, cot = _data(13, n=10)
  bad = labels.at[3].set(13)   # V = 13
  kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)

  def scalar(loss_fn):
    def f(h, w, b, y):   # labels traced: the eager range check cannot see them
      out = loss_fn(h, w, y, bias=b, **kw)
      return jnp.sum(out * cot) if reduction == "none" else out
    return jax.jit(jax.value_and_grad(f, ARGS))

  loss, (gh, gw, gb) = scalar(
      lambda *a, **k: fused_linear_cross_entropy(*a, chunk_size=4, **k))(
          hidden, kernel, bias, bad)
  assert np.isnan(float(loss))
  assert np.isnan(np.asarray(gh[3])).all()
  assert np.isfinite(np.delete(np.asarray(gh), 3, axis=0)).all()
  assert np.isnan(np.asarray(gw)).any() and np.isnan(np.asarray(gb)).any()
  # The same NaN pattern as the unfused cross_entropy's.
  _, ref = scalar(_unfused)(hidden, kernel, bias, bad)
  for a, b in zip((gh, gw, gb), ref):
    np.testing.assert_array_equal(np.isnan(np.asarray(a)), np.isnan(np.asarray(b)))


# ---------------------------------------------------------------------------------------
# 7. Issue 17: no [d, V] temporary, float32 accumulation, torch's linear_cross_entropy,
#    class weights, kernel layouts, a vocabulary-sharded kernel.

_F32_RE = re.compile(r"\bf32\[([\d,]*)\]")


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_no_float32_kernel_sized_buffer_bf16(layout):
  """value_and_grad of a bf16 head: no float32 buffer of d*V/4 or more elements in the
  compiled program (XLA:CPU used to hoist a float32 copy of the whole kernel out of the
  loops, and the earlier scheme kept a float32 [d, V] gradient accumulator), and the
  compiled temporary memory <= 1.5x the bf16 kernel gradient. The unfused program shows
  that the check can fail."""
  n, d, v, block = 128, 256, 16384, 512
  kshape = (d, v) if layout == "dv" else (v, d)
  spec = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
          jax.ShapeDtypeStruct(kshape, jnp.bfloat16), jax.ShapeDtypeStruct((n,), jnp.int32))

  def compiled(loss):
    return jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*spec).compile()

  def biggest_f32(c):
    return max([int(np.prod([int(s) for s in m.split(",") if s] or [1]))
                for m in _F32_RE.findall(c.as_text())] + [0])

  fused = compiled(lambda h, w, y: fused_linear_cross_entropy(
      h, w, y, vocab_block_size=block, kernel_layout=layout, label_smoothing=0.1,
      z_loss=1e-4))
  unfused = compiled(lambda h, w, y: cross_entropy(
      (h @ w if layout == "dv" else h @ w.T).astype(jnp.float32), y))
  assert biggest_f32(unfused) >= d * v
  assert biggest_f32(fused) < d * v // 4, biggest_f32(fused)
  grad_bytes = d * v * 2
  assert fused.memory_analysis().temp_size_in_bytes <= 1.5 * grad_bytes


def test_bf16_kernel_gradient_accumulates_in_float32():
  """dL/dkernel of bf16 inputs is the float32 gradient of the same bf16 values, rounded
  once to bf16 (within one bf16 rounding, 2^-8 relative), summed over 3 token chunks
  and 4 vocabulary blocks; a bf16 accumulation would be off by several roundings."""
  hidden, kernel, bias, labels, _ = _data(21, n=96, d=32, v=200, dtype=jnp.bfloat16)
  f = lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk_size=32,
                                              vocab_block_size=50, label_smoothing=0.1)
  ref = lambda h, w: _unfused(h, w, labels, label_smoothing=0.1)
  (gh, gw), (rh, rw) = jax.jit(lambda h, w: (
      jax.grad(f, (0, 1))(h, w),
      jax.grad(ref, (0, 1))(h.astype(jnp.float32), w.astype(jnp.float32))))(hidden, kernel)
  chex.assert_trees_all_equal_dtypes((gh, gw), (hidden, kernel))
  for g, r in ((gh, rh), (gw, rw)):
    g, r = np.asarray(g.astype(jnp.float32), np.float64), np.asarray(r, np.float64)
    floor = 1e-6 * np.abs(r).max()
    assert np.all(np.abs(g - r) <= 2.0**-8 * np.abs(r) + floor)


def _torch_lce(torch, h, w, y, *, bias, weight, reduction, eps, chunked):
  """torch.nn.functional.linear_cross_entropy (w: [V, d]) and its gradients."""
  th, tw = (torch.tensor(np.asarray(x, np.float32), requires_grad=True) for x in (h, w))
  tb = None if bias is None else torch.tensor(np.asarray(bias, np.float32),
                                              requires_grad=True)
  tcw = None if weight is None else torch.tensor(np.asarray(weight, np.float32))
  ty = torch.tensor(np.asarray(y), dtype=torch.long)
  options = torch.nn.LinearCrossEntropyOptions() if chunked else None
  out = torch.nn.functional.linear_cross_entropy(
      th, tw, ty, linear_bias=tb, weight=tcw, reduction=reduction, ignore_index=IGNORE,
      label_smoothing=eps, options=options)
  ct = torch.tensor(np.asarray(_data(0, n=h.shape[0])[4]))
  (out if reduction != "none" else (out * ct).sum()).backward()
  grads = (th.grad, tw.grad) + (() if tb is None else (tb.grad,))
  return out.detach().numpy(), [g.numpy() for g in grads], np.asarray(ct.numpy())


# (reduction, bias, weighted, label_smoothing): every option at least once, with both.
_TORCH_COMBOS = [("mean", True, True, 0.0), ("sum", False, True, 0.1),
                 ("none", True, False, 0.1), ("mean", False, False, 0.0),
                 ("none", False, True, 0.0), ("mean", True, True, 0.2)]


@pytest.mark.parametrize("reduction,use_bias,weighted,eps", _TORCH_COMBOS)
def test_matches_torch_linear_cross_entropy(reduction, use_bias, weighted, eps):
  """Values and input/weight/bias gradients of F.linear_cross_entropy, fp32, 1e-5: with
  options=LinearCrossEntropyOptions() (torch's chunked path) where torch supports it
  (no label smoothing), else the reference path. kernel_layout="vd" takes torch's
  [V, d] weight as it is."""
  torch = pytest.importorskip("torch")
  if not hasattr(torch.nn.functional, "linear_cross_entropy"):
    pytest.skip("torch without F.linear_cross_entropy (torch < 2.13)")
  hidden, kernel, bias, labels, _ = _data(22, n=40, d=8, v=37)
  w_vd = kernel.T
  cls_w = jnp.asarray(np.random.default_rng(22).uniform(0.2, 2.0, 37), jnp.float32)
  kw = dict(bias=bias if use_bias else None, weight=cls_w if weighted else None)
  want, want_grads, ct = _torch_lce(torch, hidden, w_vd, labels, reduction=reduction,
                                    eps=eps, chunked=eps == 0.0, **kw)
  ct = jnp.asarray(ct)

  def f(h, w, b):
    out = fused_linear_cross_entropy(
        h, w, labels, bias=b if use_bias else None, weight=kw["weight"],
        label_smoothing=eps, reduction=reduction, kernel_layout="vd", chunk_size=16,
        vocab_block_size=10)
    return jnp.sum(out * ct) if reduction == "none" else out

  out = fused_linear_cross_entropy(
      hidden, w_vd, labels, label_smoothing=eps, reduction=reduction, kernel_layout="vd",
      **kw)
  grads = jax.jit(jax.grad(f, ARGS if use_bias else (0, 1)))(hidden, w_vd, bias)
  _assert_rel(out, want, what="value")
  for name, g, tg in zip(("input", "weight", "bias"), grads, want_grads):
    _assert_rel(g, tg, what=name)


def _np_weighted(h, w, b, y, cw, *, eps, zl, reduction):
  """float64 torch-semantics weighted loss and gradients, from the equations:
  loss_i = (1 - eps) w_y nll + eps sum_c w_c (lse - z_c) / V + zl lse^2, mean divided by
  sum_i w_{y_i} over counted tokens."""
  h, w, b, cw = (np.asarray(x, np.float64) for x in (h, w, b, cw))
  y = np.asarray(y)
  n, v = h.shape[0], w.shape[1]
  z = h @ w + b
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
  p = np.exp(z - lse[:, None])
  valid = y != IGNORE
  ys = np.where(valid, y, 0)
  wy = cw[ys]
  loss = ((1 - eps) * wy * (lse - z[np.arange(n), ys])
          + eps * ((lse[:, None] - z) * cw).sum(-1) / v + zl * lse**2) * valid
  dz = ((1 - eps) * wy[:, None] * (p - np.eye(v)[ys])
        + eps * (cw.sum() / v * p - cw / v) + 2 * zl * lse[:, None] * p)
  den = (wy * valid).sum() if reduction == "mean" else 1.0
  g = dz * (valid / den)[:, None]
  return loss.sum() / den, (g @ w.T, h.T @ g, g.sum(0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_class_weights_match_equations_and_cross_entropy(reduction):
  hidden, kernel, bias, labels, _ = _data(23, n=33, v=17)
  cw = jnp.asarray(np.random.default_rng(23).uniform(0.0, 3.0, 17), jnp.float32)
  cw = cw.at[3].set(0.0)
  kw = dict(label_smoothing=0.15, z_loss=1e-3, reduction=reduction)
  f = lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, weight=cw,
                                                 chunk_size=10, vocab_block_size=6, **kw)
  g = lambda h, w, b: _unfused(h, w, labels, bias=b, weight=cw, **kw)
  (val, grads), (uval, ugrads) = jax.jit(lambda h, w, b: (
      jax.value_and_grad(f, ARGS)(h, w, b), jax.value_and_grad(g, ARGS)(h, w, b)))(
          hidden, kernel, bias)
  ref_val, ref_grads = _np_weighted(hidden, kernel, bias, labels, cw, eps=0.15, zl=1e-3,
                                    reduction=reduction)
  _assert_rel(val, ref_val)
  _assert_rel(val, uval)
  for a, b_, r in zip(grads, ugrads, ref_grads):
    _assert_rel(a, r)
    _assert_rel(a, b_)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_vocabulary_sharded_kernel_equals_unsharded(layout):
  """The kernel, bias and class weights split over the vocabulary on 8 devices
  (axis_name="vocab"): loss and gradients equal the unsharded ones, and the compiled
  program gathers nothing (the statistics are combined by all-reduces)."""
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices (tests/conftest.py asks for 8 CPU devices)")
  k = len(devices)
  mesh = jax.sharding.Mesh(np.array(devices), ("vocab",))
  P = jax.sharding.PartitionSpec
  hidden, kernel, bias, labels, cot = _data(24, n=20, d=6, v=3 * k)
  w = kernel if layout == "dv" else kernel.T
  cw = jnp.asarray(np.random.default_rng(24).uniform(0.5, 2.0, 3 * k), jnp.float32)
  kw = dict(label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=5.0, kernel_layout=layout)
  wspec = P(None, "vocab") if layout == "dv" else P("vocab", None)

  for reduction in ("mean", "none"):
    def local(h, w, b, c, y):
      out = fused_linear_cross_entropy(h, w, y, bias=b, weight=c, reduction=reduction,
                                       axis_name="vocab", chunk_size=7,
                                       vocab_block_size=2, **kw)
      return jnp.sum(out * cot) if reduction == "none" else out

    sharded = jax.shard_map(local, mesh=mesh,
                            in_specs=(P(), wspec, P("vocab"), P("vocab"), P()),
                            out_specs=P())
    step = jax.jit(jax.value_and_grad(lambda h, w, b: sharded(h, w, b, cw, labels), ARGS))
    val, grads = step(hidden, w, bias)
    ref = _scalar(fused_linear_cross_entropy, labels, cot, reduction, weight=cw, **kw)
    ref_val, ref_grads = jax.jit(jax.value_and_grad(ref, ARGS))(hidden, w, bias)
    _assert_rel(val, ref_val, what=reduction)
    for g, rg in zip(grads, ref_grads):
      _assert_rel(g, rg, what=reduction)
    text = step.lower(hidden, w, bias).compile().as_text()
    assert "all-gather" not in text and "all-reduce" in text


@pytest.mark.parametrize("kwargs,match,exc", [
    (dict(kernel_layout="auto"), "kernel_layout", ValueError),
    (dict(kernel_layout="vd"), "kernel", ValueError),      # [3, 5] is not [V, d = 3]
    (dict(vocab_block_size=0), "vocab_block_size", ValueError),
    (dict(vocab_block_size=2.0), "vocab_block_size", ValueError),
    (dict(weight=jnp.ones(4)), "weight", ValueError),
    (dict(weight=-jnp.ones(5)), "weight", ValueError),
    (dict(weight=jnp.ones(5, bool)), "weight", ValueError),
    (dict(axis_name="vocab"), "axis_name", ValueError),   # no enclosing shard_map
])
def test_new_arguments_raise_naming_them(kwargs, match, exc):
  hidden, kernel, labels = jnp.ones((6, 3)), jnp.ones((3, 5)), jnp.zeros(6, jnp.int32)
  with pytest.raises(exc, match=match):
    fused_linear_cross_entropy(hidden, kernel, labels, **kwargs)


@pytest.mark.parametrize("dtypes", [(jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16),
                                    (jnp.bfloat16, jnp.bfloat16)])
def test_accelerator_formulation_on_cpu(monkeypatch, dtypes):
  """GPU/TPU take the matmul operands in the inputs' dtype (bf16 products with float32
  accumulation) instead of casting each block to float32: that path, run here on CPU,
  against the float32 loss of the same (rounded) values."""
  monkeypatch.setattr(fused_module, "UPCAST_BACKENDS", ())
  hd, kd = dtypes
  hidden, kernel, bias, labels, _ = _data(25, n=30, d=8, v=21)
  hidden, kernel = hidden.astype(hd), kernel.astype(kd)
  kw = dict(label_smoothing=0.1, z_loss=1e-3)
  f = lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=8,
                                                 vocab_block_size=6, **kw)
  up = lambda x: x.astype(jnp.float32)
  g = lambda h, w, b: _unfused(up(h), up(w), labels, bias=b, **kw)
  (val, grads), (ref_val, ref_grads) = jax.jit(lambda h, w, b: (
      jax.value_and_grad(f, ARGS)(h, w, b), jax.value_and_grad(g, ARGS)(h, w, b)))(
          hidden, kernel, bias)
  chex.assert_trees_all_equal_dtypes(grads, (hidden, kernel, bias))
  low = jnp.bfloat16 in dtypes
  _assert_rel(val, ref_val, rtol=1e-5)
  for gr, rg in zip(grads, ref_grads):   # bf16: the logits' gradient is rounded to bf16
    _assert_rel(gr, rg, rtol=2e-2 if low else 1e-5)


def test_class_weights_near_float32_max_give_the_finite_weighted_mean():
  # sum_i w_y l_i and sum_i w_y both overflow to inf at weights ~3e38 (inf / inf = NaN);
  # the weights and the z-loss are first scaled by an exact power of two (_common). The
  # unweighted z-loss term divided by sum w_y ~ 1e39 vanishes, so the mean is the weighted
  # mean without z-loss.
  hidden, kernel, bias, labels, _ = _data(31, n=12, v=9)
  cw = jnp.asarray(np.random.default_rng(31).uniform(0.5, 1.0, 9), jnp.float32)
  kw = dict(bias=bias, label_smoothing=0.1, vocab_block_size=4)
  big = fused_linear_cross_entropy(hidden, kernel, labels, weight=cw * 2.0**127, z_loss=1e-2,
                                   **kw)
  small = fused_linear_cross_entropy(hidden, kernel, labels, weight=cw, **kw)
  assert np.isfinite(float(big))
  np.testing.assert_allclose(float(big), float(small), rtol=1e-6)
  np.testing.assert_allclose(
      float(big), float(cross_entropy(hidden @ kernel + bias, labels, weight=cw * 2.0**127,
                                      label_smoothing=0.1, z_loss=1e-2)), rtol=1e-5)
