"""The embedded corpus, a byte-level tokenizer and a resumable batch iterator.

The corpus (``corpus.txt``, ~466 KB, see ``CORPUS_NOTICE.txt``) is CPython's ``help()`` topic
prose, committed with the package: no download, identical bytes on every machine and Python
version. Tokens are its UTF-8 bytes (vocabulary 256), so any text can be encoded and decoding
never fails (invalid byte sequences a model may sample become U+FFFD).

``BatchIterator`` walks the token stream in shuffled windows, epoch by epoch, from a seed. Its
whole position is two integers (``epoch``, ``index``), saved in checkpoints, so a resumed run
sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import math

import numpy as np

from jaxopt_llm._validation import check_int, check_real

VOCAB_SIZE = 256
CORPUS_SHA256 = "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4"


def load_corpus(verify: bool = True) -> bytes:
  """The embedded corpus as raw UTF-8 bytes (checked against ``CORPUS_SHA256``)."""
  data = importlib.resources.files("jaxopt_llm.train").joinpath("corpus.txt").read_bytes()
  if verify and hashlib.sha256(data).hexdigest() != CORPUS_SHA256:
    raise RuntimeError("jaxopt_llm/train/corpus.txt does not match its SHA-256: the "
                       "package data is corrupted or was edited")
  return data


def encode(text: str | bytes) -> np.ndarray:
  """Byte-level tokens: the UTF-8 bytes of ``text`` as int32, shape ``[len(bytes)]``."""
  if isinstance(text, str):
    text = text.encode("utf-8")
  return np.frombuffer(text, dtype=np.uint8).astype(np.int32)


def decode(ids) -> str:
  """Inverse of ``encode``; bytes that are not valid UTF-8 become U+FFFD."""
  ids = np.asarray(ids)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"decode: token ids must be in [0, {VOCAB_SIZE}), got "
                     f"[{ids.min()}, {ids.max()}]")
  return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def train_val_split(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous split as in nanoGPT: the first ``1 - val_fraction`` trains, the rest validates."""
  check_real("train_val_split", "val_fraction", val_fraction, lo=0.0, hi=1.0, lo_open=True,
             hi_open=True)
  cut = int(round(len(ids) * (1.0 - val_fraction)))
  return ids[:cut], ids[cut:]


def unigram_entropy(ids: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
  r"""Entropy (nats) of the token frequencies: :math:`H = -\sum_c p_c \log p_c`.

  The loss of the best model that ignores context: a language model is learning something
  only once its cross-entropy is below this.
  """
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train_ids: np.ndarray, eval_ids: np.ndarray,
                          vocab_size: int = VOCAB_SIZE) -> float:
  """Cross-entropy (nats) on ``eval_ids`` of the add-one-smoothed unigram model of ``train_ids``."""
  counts = np.bincount(np.asarray(train_ids).reshape(-1), minlength=vocab_size) + 1.0
  logp = np.log(counts / counts.sum())
  return float(-logp[np.asarray(eval_ids).reshape(-1)].mean())


@dataclasses.dataclass
class BatchIterator:
  """Shuffled ``[batch_size, seq_len]`` windows of a token stream, epoch after epoch.

  Each epoch cuts the stream into non-overlapping windows of ``seq_len`` tokens starting at a
  random offset in ``[0, seq_len)`` (so window borders move between epochs) and visits them in
  a random order; both come from ``np.random.default_rng([seed, epoch])``, so an epoch's order
  depends only on (seed, epoch). A batch never straddles two epochs: the last incomplete batch
  of an epoch is dropped. The position is ``(epoch, index)``, the next batch's first window.

  For causal LM training a window is both input and target (``causal_lm_loss`` shifts it):
  ``seq_len`` is the model's context length.
  """
  ids: np.ndarray
  batch_size: int
  seq_len: int
  seed: int = 0
  epoch: int = 0
  index: int = 0

  def __post_init__(self):
    owner = "BatchIterator"
    check_int(owner, "batch_size", self.batch_size, lo=1)
    check_int(owner, "seq_len", self.seq_len, lo=2)
    self.ids = np.asarray(self.ids, dtype=np.int32)
    # The worst-case offset leaves len - seq_len + 1 tokens: we need a full batch from it.
    if (len(self.ids) - self.seq_len + 1) // self.seq_len < self.batch_size:
      raise ValueError(
          f"{owner}: the stream ({len(self.ids)} tokens) is too short for one batch of "
          f"{self.batch_size} windows of {self.seq_len} tokens")
    self._order_epoch = None

  def _epoch_windows(self) -> np.ndarray:
    if self._order_epoch != self.epoch:
      rng = np.random.default_rng([self.seed, self.epoch])
      offset = int(rng.integers(0, self.seq_len))
      starts = np.arange(offset, len(self.ids) - self.seq_len + 1, self.seq_len)
      self._starts = starts[rng.permutation(len(starts))]
      self._order_epoch = self.epoch
    return self._starts

  @property
  def batches_per_epoch(self) -> int:
    return len(self._epoch_windows()) // self.batch_size

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    starts = self._epoch_windows()
    if self.index + self.batch_size > len(starts):
      self.epoch, self.index = self.epoch + 1, 0
      starts = self._epoch_windows()
    chosen = starts[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return self.ids[chosen[:, None] + np.arange(self.seq_len)]

  def state(self) -> dict:
    """The position, as JSON-able ints (saved in checkpoints)."""
    return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed)}

  def restore(self, state: dict) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"BatchIterator: checkpoint was written with data seed "
                       f"{state['seed']}, this iterator has seed {self.seed}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_windows(ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """Fixed evaluation set: consecutive non-overlapping windows from the start of ``ids``.

  Returns ``[n, seq_len]`` int32 with ``n = min(len(ids) // seq_len, max_windows)``; the
  same windows at every evaluation, so val curves are comparable across steps and runs.
  """
  check_int("eval_windows", "seq_len", seq_len, lo=2)
  n = len(ids) // seq_len
  if max_windows is not None:
    n = min(n, max_windows)
  if n < 1:
    raise ValueError(f"eval_windows: {len(ids)} tokens give no window of {seq_len}")
  return np.asarray(ids[:n * seq_len], np.int32).reshape(n, seq_len)


def corpus_summary(train_ids: np.ndarray, val_ids: np.ndarray) -> dict:
  """Sizes and the two context-free baselines, in nats per token."""
  return {
      "train_tokens": int(len(train_ids)),
      "val_tokens": int(len(val_ids)),
      "unigram_entropy": unigram_entropy(train_ids),
      "unigram_val_cross_entropy": unigram_cross_entropy(train_ids, val_ids),
      "uniform_entropy": math.log(VOCAB_SIZE),
  }
