"""The embedded corpus, the byte tokenizer, the unigram baselines, the resumable batches."""
import hashlib
import math

import numpy as np
import pytest

from jaxopt_llm.train import data


def test_corpus_is_the_committed_file():
  raw = data.load_corpus()
  assert hashlib.sha256(raw).hexdigest() == data.CORPUS_SHA256
  assert len(raw) == 466_195
  text = raw.decode("utf-8")  # valid UTF-8 throughout
  assert 'The "if" statement' in text


def test_encode_decode_round_trip_and_bad_bytes():
  text = "x = “quoted” — ß\n"
  ids = data.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < data.VOCAB_SIZE
  assert len(ids) == len(text.encode("utf-8")) > len(text)
  assert data.decode(ids) == text
  assert data.decode([0xE2, 0x80]) == "\ufffd"  # a truncated sequence never raises
  with pytest.raises(ValueError, match="token ids"):
    data.decode([256])


def test_unigram_entropy_equation_and_corpus_value():
  ids = np.array([0, 0, 1, 2])
  expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
  assert data.unigram_entropy(ids) == pytest.approx(expected, rel=1e-12)
  assert data.unigram_entropy(np.zeros(10, int)) == 0.0
  train_ids, val_ids = data.train_val_split(data.encode(data.load_corpus()))
  h = data.unigram_entropy(train_ids)
  assert 3.0 < h < math.log(256)
  # The smoothed unigram model cannot beat the val split's own entropy (Gibbs' inequality).
  assert data.unigram_cross_entropy(train_ids, val_ids) >= data.unigram_entropy(val_ids)


def test_batch_iterator_windows_are_slices_and_cover_an_epoch_once():
  ids = np.arange(1000, dtype=np.int32)  # token value = its position
  it = data.BatchIterator(ids, batch_size=4, seq_len=10, seed=3)
  per_epoch = it.batches_per_epoch
  starts = []
  for _ in range(per_epoch):
    b = next(it)
    assert b.shape == (4, 10) and b.dtype == np.int32
    np.testing.assert_array_equal(b, b[:, :1] + np.arange(10))  # contiguous slices
    starts.extend(b[:, 0].tolist())
  assert len(set(starts)) == len(starts) == per_epoch * 4  # no window twice in an epoch
  assert len({s % 10 for s in starts}) == 1  # one random offset per epoch
  assert it.epoch == 0
  next(it)
  assert it.epoch == 1


def test_batch_iterator_position_restores_exactly():
  ids = data.encode(data.load_corpus())[:20_000]
  a = data.BatchIterator(ids, batch_size=8, seq_len=32, seed=1)
  for _ in range(a.batches_per_epoch - 2):  # the next batches cross an epoch boundary
    next(a)
  saved = a.state()
  expected = [next(a) for _ in range(5)]
  b = data.BatchIterator(ids, batch_size=8, seq_len=32, seed=1)
  b.restore(saved)
  for e in expected:
    np.testing.assert_array_equal(next(b), e)
  c = data.BatchIterator(ids, batch_size=8, seq_len=32, seed=2)
  assert not np.array_equal(next(c), next(data.BatchIterator(ids, 8, 32, seed=1)))
  with pytest.raises(ValueError, match="seed"):
    c.restore(saved)
  with pytest.raises(ValueError, match="too short"):
    data.BatchIterator(ids[:100], batch_size=8, seq_len=32)
