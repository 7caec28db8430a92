"""categorical_from_hidden: labels from the LM head's softmax, blockwise over the vocabulary.

Checked against the written equation (argmax of logits + the documented per-class Gumbel
noise), against the distribution (chi-square goodness of fit to the softmax, and homogeneity
with ``jax.random.categorical`` on the full logits; both fail for deliberately wrong
samplers), on properties (same labels for every block size) and on memory (no [N, V] buffer
in the compiled program)."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from jaxopt_llm import losses
from jaxopt_llm.losses.sampling import categorical_from_hidden, default_block_size

# A chi-square p-value below this rejects. The seeds are fixed, so a run is deterministic; a
# correct sampler's p-value is uniform over seeds (and jax versions' random bits), so a
# correct sampler fails with probability 1e-4, a wrong one (below) with p ~ 0.
P_REJECT = 1e-4


def _problem(seed=0, shape=(3, 5), d=8, vocab=37, exact=True):
  """hidden, kernel, bias; with ``exact`` every entry is a multiple of 1/8 in [-1, 1], so
  each logit (a sum of d products of such numbers) is exact in float32 in any order."""
  rng = np.random.default_rng(seed)
  draw = (lambda *s: rng.integers(-8, 9, s) / 8) if exact else (lambda *s: rng.normal(size=s))
  return (jnp.asarray(draw(*shape, d), jnp.float32), jnp.asarray(draw(d, vocab), jnp.float32),
          jnp.asarray(draw(vocab), jnp.float32))


def _documented_noise(key, n, vocab, dtype=jnp.float32):
  """G[:, c] = Gumbel noise drawn from fold_in(key, c), as the docstring says."""
  return jax.vmap(lambda c: jax.random.gumbel(jax.random.fold_in(key, c), (n,), dtype),
                  out_axes=1)(jnp.arange(vocab))


def _sample(block_size=None):
  return jax.jit(lambda h, w, k, b: categorical_from_hidden(h, w, k, bias=b,
                                                            block_size=block_size))


# ---------------------------------------------------------------------------------------------
# 1. The equation


def test_labels_are_the_argmax_of_logits_plus_the_documented_gumbel_noise():
  h, w, b = _problem()
  key = jax.random.PRNGKey(7)
  labels = _sample(5)(h, w, key, b)   # 5 does not divide 37: the last block overlaps
  chex.assert_shape(labels, (3, 5))
  assert labels.dtype == jnp.int32
  z = h.reshape(-1, 8) @ w + b
  expect = jnp.argmax(z + _documented_noise(key, 15, 37), axis=-1).reshape(3, 5)
  chex.assert_trees_all_equal(labels, expect)
  # Not a constant: the labels move with the key and follow the logits' spread.
  other = _sample(5)(h, w, jax.random.PRNGKey(8), b)
  assert (np.asarray(other) != np.asarray(labels)).any()


def test_same_key_same_labels_for_every_block_size():
  h, w, b = _problem(seed=1, shape=(4, 6), vocab=29)
  key = jax.random.key(3)   # a typed key works as a raw one does
  outs = [np.asarray(_sample(bs)(h, w, key, b)) for bs in (1, 3, 7, 16, 29, 1000, None)]
  for out in outs[1:]:
    np.testing.assert_array_equal(out, outs[0])
  assert len(np.unique(outs[0])) > 5


@settings(max_examples=5, deadline=None)
@given(n=st.integers(1, 9), vocab=st.integers(1, 23), block=st.integers(1, 30),
       seed=st.integers(0, 2**16))
def test_property_block_size_never_changes_the_labels(n, vocab, block, seed):
  h, w, b = _problem(seed=seed, shape=(n,), d=3, vocab=vocab)
  key = jax.random.PRNGKey(seed)
  got = categorical_from_hidden(h, w, key, bias=b, block_size=block)
  whole = categorical_from_hidden(h, w, key, bias=b, block_size=vocab)
  chex.assert_trees_all_equal(got, whole)
  assert ((np.asarray(got) >= 0) & (np.asarray(got) < vocab)).all()


def test_masked_classes_nan_and_half_precision_follow_argmax():
  h, w, b = _problem(seed=2, shape=(6,), vocab=11)
  key = jax.random.PRNGKey(1)
  # -inf bias: those classes are never drawn; a row of all -inf gets class 0 (jnp.argmax).
  masked = b.at[jnp.array([0, 3, 4, 10])].set(-jnp.inf)
  draws = jax.jit(jax.vmap(lambda k: categorical_from_hidden(h, w, k, bias=masked,
                                                             block_size=3)))(
      jax.random.split(key, 200))
  assert not np.isin(np.asarray(draws), [0, 3, 4, 10]).any()
  assert len(np.unique(np.asarray(draws))) == 7
  all_inf = categorical_from_hidden(h, w, key, bias=jnp.full(11, -jnp.inf), block_size=3)
  chex.assert_trees_all_equal(all_inf, jnp.zeros(6, jnp.int32))
  # A NaN logit takes the row (its first NaN), as jnp.argmax of the full row would.
  nan_bias = b.at[jnp.array([5, 9])].set(jnp.nan)
  chex.assert_trees_all_equal(
      categorical_from_hidden(h, w, key, bias=nan_bias, block_size=3), jnp.full(6, 5))
  # bf16 inputs: bf16 products (exact here), float32 logits and noise.
  got16 = categorical_from_hidden(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), key,
                                  bias=b.astype(jnp.bfloat16), block_size=4)
  chex.assert_trees_all_equal(got16, categorical_from_hidden(h, w, key, bias=b, block_size=4))


def test_float64_inputs_compute_in_float64_under_x64():
  enable_x64 = getattr(jax, "enable_x64", None)
  if enable_x64 is None:   # jax < 0.8
    from jax.experimental import enable_x64
  h, w, b = _problem(seed=4, shape=(7,), vocab=13)
  key = jax.random.PRNGKey(2)
  with enable_x64(True):
    h64, w64, b64 = (jnp.asarray(x, jnp.float64) for x in (h, w, b))
    got = categorical_from_hidden(h64, w64, key, bias=b64, block_size=4)
    expect = jnp.argmax(h64 @ w64 + b64 + _documented_noise(key, 7, 13, jnp.float64), -1)
    chex.assert_trees_all_equal(got, expect.astype(jnp.int32))


def test_empty_and_bad_input():
  h, w, b = _problem()
  key = jax.random.PRNGKey(0)
  empty = categorical_from_hidden(jnp.zeros((0, 4, 8)), w, key)
  assert empty.shape == (0, 4) and empty.dtype == jnp.int32
  with pytest.raises(ValueError, match="`kernel` must have shape"):
    categorical_from_hidden(h, w.T, key)
  with pytest.raises(ValueError, match="`bias` must have shape"):
    categorical_from_hidden(h, w, key, bias=b[:-1])
  with pytest.raises(ValueError, match="`hidden` must be a floating"):
    categorical_from_hidden(h.astype(jnp.int32), w, key)
  with pytest.raises(ValueError, match="`block_size`"):
    categorical_from_hidden(h, w, key, block_size=0)
  with pytest.raises((TypeError, ValueError), match="`block_size`"):
    categorical_from_hidden(h, w, key, block_size=2.5)
  assert default_block_size(4096, 32000, "cpu") == 256
  assert default_block_size(10**6, 32000, "cpu") == 128       # never below 128 columns
  assert default_block_size(16, 100, "gpu") == 100             # never above V
  assert losses.categorical_from_hidden is categorical_from_hidden


# ---------------------------------------------------------------------------------------------
# 2. The distribution

ROWS, PER_ROW, VOCAB, D = 3, 3000, 12, 4


def _repeated_rows():
  """3 distinct logits rows (smallest expected count ~32), each repeated 3000 times."""
  rng = np.random.default_rng(0)
  base = rng.normal(size=(ROWS, D)).astype(np.float32)
  w = (0.7 * rng.normal(size=(D, VOCAB))).astype(np.float32)
  z = base.astype(np.float64) @ w.astype(np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  return jnp.asarray(np.repeat(base, PER_ROW, axis=0)), jnp.asarray(w), p / p.sum(1,
                                                                              keepdims=True)


def _counts(labels):
  labels = np.asarray(labels).reshape(ROWS, PER_ROW)
  return np.stack([np.bincount(row, minlength=VOCAB) for row in labels])


def _fit_p_value(labels, p):
  """Pearson's chi-square goodness of fit to the softmax, pooled over the rows."""
  counts = _counts(labels)
  chi = (((counts - PER_ROW * p) ** 2) / (PER_ROW * p)).sum()
  return stats.chi2.sf(chi, ROWS * (VOCAB - 1))


def _homogeneity_p_value(labels_a, labels_b):
  """Chi-square test that two samplers draw from the same distribution, pooled over rows."""
  chi, dof = 0.0, 0
  for a, b in zip(_counts(labels_a), _counts(labels_b)):
    res = stats.chi2_contingency(np.stack([a, b]))
    chi, dof = chi + res[0], dof + res[2]
  return stats.chi2.sf(chi, dof)


def test_labels_follow_the_softmax_chi_square():
  h, w, p = _repeated_rows()
  sample = jax.jit(lambda h, w, k, bs: categorical_from_hidden(h, w, k, block_size=bs),
                   static_argnums=3)
  fused = sample(h, w, jax.random.PRNGKey(3), 5)   # blocks 0-4, 5-9, 7-11 (overlapping)
  assert _fit_p_value(fused, p) > P_REJECT
  # The same distribution as the unfused sampler on the full logits (another key).
  unfused = jax.jit(lambda k: jax.random.categorical(k, h @ w, axis=-1))(
      jax.random.PRNGKey(4))
  assert _fit_p_value(unfused, p) > P_REJECT
  assert _homogeneity_p_value(fused, unfused) > P_REJECT

  # The test has power: a sampler that drops the last block, or one whose noise repeats
  # across blocks (keyed by the column within its block), is rejected both ways.
  dropped = sample(h, w[:, :10], jax.random.PRNGKey(3), 5)

  @jax.jit
  def repeated_noise(k):
    cols = jnp.arange(VOCAB) % 4
    g = jax.vmap(lambda c: jax.random.gumbel(jax.random.fold_in(k, c), (h.shape[0],)),
                 out_axes=1)(cols)
    return jnp.argmax(h @ w + g, axis=-1)

  for wrong in (dropped, repeated_noise(jax.random.PRNGKey(3))):
    assert _fit_p_value(wrong, p) < P_REJECT
    assert _homogeneity_p_value(wrong, unfused) < P_REJECT


# ---------------------------------------------------------------------------------------------
# 3. Memory: never a [N, V] buffer

_SHAPE_RE = re.compile(r"\b(?:f|bf|s|u|pred)\d*\[([\d,]*)\]")


def test_no_tokens_by_vocab_buffer_in_compiled_program():
  n, d, v = 4096, 16, 32768     # one float32 [N, V] array = 512 MiB, a block 4 MiB
  spec = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((2,), jnp.uint32))
  full = n * v * 4
  fused = jax.jit(lambda h, w, k: categorical_from_hidden(h, w, k)).lower(*spec).compile()
  unfused = jax.jit(lambda h, w, k: jax.random.categorical(k, h @ w)).lower(*spec).compile()
  assert unfused.memory_analysis().temp_size_in_bytes >= full   # the measurement can tell
  assert fused.memory_analysis().temp_size_in_bytes < full / 8
  block = default_block_size(n, v)
  biggest = max(int(np.prod([int(s) for s in m.split(",") if s]))
                for m in _SHAPE_RE.findall(fused.as_text()))
  assert biggest <= n * block < n * v // 8


def test_half_precision_kernel_is_not_upcast_whole():
  """bf16 products with float32 accumulation, and no float32 copy of the [d, V] kernel (XLA:CPU
  used to upcast the whole kernel for its bf16 dynamic slices)."""
  n, d, v = 32, 64, 8192
  spec = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((d, v), jnp.bfloat16), jax.ShapeDtypeStruct((2,), jnp.uint32))
  compiled = jax.jit(lambda h, w, k: categorical_from_hidden(h, w, k, block_size=128)).lower(
      *spec).compile()
  text = compiled.as_text()
  assert f"f32[{d},{v}]" not in text and f"f32[{v},{d}]" not in text
  # At most XLA:CPU's bitcast copy of the bf16 kernel (d * v * 2) and a few blocks.
  assert compiled.memory_analysis().temp_size_in_bytes < 0.75 * d * v * 4
