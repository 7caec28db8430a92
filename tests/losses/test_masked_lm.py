"""Tests for jaxopt_llm.losses.masked_lm: 80/10/10 corruption and the MLM loss."""
import math
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.losses import cross_entropy, mask_tokens, masked_lm_loss

IGNORE = -100
VOCAB = 1000
MASK_ID = 3


def _close(actual, expected, rtol=1e-6, atol=1e-6):
  chex.assert_trees_all_close(jnp.asarray(actual), jnp.asarray(expected, jnp.float32),
                              rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------
# mask_tokens


@jax.jit
def _mask_jit_all(ids, key, special, mask_prob, replace_prob, random_prob):
  return mask_tokens(ids, key, mask_token_id=MASK_ID, vocab_size=VOCAB,
                     mask_prob=mask_prob, replace_prob=replace_prob,
                     random_prob=random_prob, special_tokens_mask=special)


def _mask_jit(ids, key, special, mask_prob=0.15, replace_prob=0.8, random_prob=0.1):
  # The probabilities are traced: one compilation serves every test.
  return _mask_jit_all(ids, key, special, mask_prob, replace_prob, random_prob)


def _corpus(seed=0, shape=(150, 1000)):
  rng = np.random.default_rng(seed)
  # Ordinary tokens are >= 5, so an original token never equals [MASK] (3).
  ids = rng.integers(5, VOCAB, size=shape).astype(np.int32)
  special = rng.random(shape) < 0.1
  ids[special] = 0  # e.g. padding
  return jnp.asarray(ids), jnp.asarray(special)


def _within(observed, p, n, sigmas=5.0):
  """|observed - p| within `sigmas` binomial standard deviations of n draws."""
  sd = math.sqrt(p * (1 - p) / n)
  assert abs(observed - p) <= sigmas * sd, (observed, p, n, sd)


def test_mask_tokens_structure():
  ids, special = _corpus(0)
  inputs, labels = _mask_jit(ids, jax.random.PRNGKey(0), special)
  chex.assert_shape((inputs, labels), ids.shape)
  chex.assert_type(inputs, ids.dtype)
  chex.assert_type(labels, jnp.int32)
  ids, inputs, labels, special = map(np.asarray, (ids, inputs, labels, special))
  chosen = labels != IGNORE
  # Labels hold the original token exactly where chosen; elsewhere nothing changes.
  assert np.array_equal(labels[chosen], ids[chosen])
  assert np.array_equal(inputs[~chosen], ids[~chosen])
  assert not np.any(chosen & special)
  assert np.all((inputs >= 0) & (inputs < VOCAB))
  # Same key, same corruption; another key, another one.
  again = _mask_jit(jnp.asarray(ids), jax.random.PRNGKey(0), jnp.asarray(special))
  assert np.array_equal(np.asarray(again[1]), labels)
  other = _mask_jit(jnp.asarray(ids), jax.random.PRNGKey(1), jnp.asarray(special))
  assert not np.array_equal(np.asarray(other[1]), labels)


def test_mask_tokens_proportions_80_10_10():
  ids, special = _corpus(1)
  inputs, labels = map(np.asarray, _mask_jit(ids, jax.random.PRNGKey(42), special))
  ids, special = np.asarray(ids), np.asarray(special)
  chosen = labels != IGNORE
  n_normal = int((~special).sum())
  n_chosen = int(chosen.sum())
  _within(n_chosen / n_normal, 0.15, n_normal)
  # Among chosen tokens: [MASK] w.p. 0.8, plus a random draw that happens to be [MASK]
  # (0.1 / V); unchanged w.p. 0.1, plus a random draw equal to the original (0.1 / V).
  as_mask = inputs[chosen] == MASK_ID
  unchanged = inputs[chosen] == ids[chosen]
  other = ~as_mask & ~unchanged
  _within(as_mask.mean(), 0.8 + 0.1 / VOCAB, n_chosen)
  _within(unchanged.mean(), 0.1 + 0.1 / VOCAB, n_chosen)
  _within(other.mean(), 0.1 * (1 - 2 / VOCAB), n_chosen)
  # The random replacements are uniform over the vocabulary: chi-square over 10 bins.
  replaced = inputs[chosen][other]
  counts = np.bincount(replaced * 10 // VOCAB, minlength=10)
  expected = len(replaced) / 10
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 40.0, (chi2, counts)  # 9 dof: P(chi2 > 40) ~ 7e-6


def test_mask_tokens_proportions_follow_arguments():
  ids, special = _corpus(2)
  inputs, labels = _mask_jit(ids, jax.random.PRNGKey(3), special, mask_prob=0.4,
                             replace_prob=0.5, random_prob=0.0)
  inputs, labels, ids = map(np.asarray, (inputs, labels, ids))
  chosen = labels != IGNORE
  n_normal = int((~np.asarray(special)).sum())
  _within(chosen.sum() / n_normal, 0.4, n_normal)
  _within((inputs[chosen] == MASK_ID).mean(), 0.5, int(chosen.sum()))
  assert np.all((inputs[chosen] == MASK_ID) | (inputs[chosen] == ids[chosen]))
  # mask_prob = 0 chooses nothing, 1 chooses every non-special token.
  _, none = _mask_jit(ids, jax.random.PRNGKey(0), special, mask_prob=0.0)
  assert np.all(np.asarray(none) == IGNORE)
  _, every = _mask_jit(ids, jax.random.PRNGKey(0), special, mask_prob=1.0)
  assert np.array_equal(np.asarray(every) != IGNORE, ~np.asarray(special))


def test_mask_tokens_bad_arguments():
  ids, _ = _corpus(3, (2, 8))
  key = jax.random.PRNGKey(0)
  kw = dict(mask_token_id=MASK_ID, vocab_size=VOCAB)
  with pytest.raises(ValueError, match="mask_prob"):
    mask_tokens(ids, key, **kw, mask_prob=1.5)
  with pytest.raises(ValueError, match="random_prob"):
    mask_tokens(ids, key, **kw, replace_prob=0.8, random_prob=0.3)
  mask_tokens(ids, key, **kw, replace_prob=0.8, random_prob=0.2)  # sums to 1: fine
  with pytest.raises(ValueError, match="vocab_size"):
    mask_tokens(ids, key, mask_token_id=MASK_ID, vocab_size=0)
  with pytest.raises(ValueError, match="mask_token_id"):
    mask_tokens(ids, key, mask_token_id=-1, vocab_size=VOCAB)
  with pytest.raises(ValueError, match="input_ids"):
    mask_tokens(ids.astype(jnp.float32), key, **kw)
  with pytest.raises(ValueError, match="special_tokens_mask"):
    mask_tokens(ids, key, **kw, special_tokens_mask=np.ones((2, 7), bool))


# ---------------------------------------------------------------------------------------
# masked_lm_loss


def test_masked_lm_loss_is_ce_on_masked_positions_only():
  rng = np.random.default_rng(4)
  ids = rng.integers(5, 50, size=(4, 12)).astype(np.int32)
  # Labels as mask_tokens makes them: the original token where chosen, else ignored.
  labels = jnp.asarray(np.where(rng.random(ids.shape) < 0.3, ids, IGNORE))
  logits = jnp.asarray(rng.standard_normal((4, 12, 50)) * 2, jnp.float32)
  loss, grad = jax.jit(jax.value_and_grad(masked_lm_loss))(logits, labels)
  chosen = np.asarray(labels) != IGNORE
  assert 0 < chosen.sum() < chosen.size
  z = np.asarray(logits, np.float64)[chosen]
  y = np.asarray(ids)[chosen]
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  _close(loss, np.mean(lse - z[np.arange(len(y)), y]), rtol=1e-5)
  _close(loss, jax.jit(cross_entropy)(logits, labels))
  # Unmasked positions get exactly zero gradient.
  assert np.all(np.asarray(grad)[~chosen] == 0.0)
  assert np.all(np.any(np.asarray(grad)[chosen] != 0.0, axis=-1))
  # Nothing chosen: 0.0, not NaN.
  assert float(jax.jit(masked_lm_loss)(logits, jnp.full_like(labels, IGNORE))) == 0.0
  with pytest.raises(ValueError, match="reduction"):
    masked_lm_loss(logits, labels, reduction="avg")
