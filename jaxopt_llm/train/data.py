"""Training text: the embedded corpus or your own files, tokenizers, a resumable batch iterator.

**Sources** (``load_dataset``). By default the embedded corpus (``corpus.txt``, ~466 KB, see
``CORPUS_NOTICE.txt``): CPython's ``help()`` topic prose, committed with the package, no
download, identical bytes everywhere. With ``cfg.data`` your own UTF-8 text: a file, a folder
(every file below it whose path has no part starting with ``.``) or a glob (``**`` recurses);
the files are taken in sorted path order and joined as ``cat`` would, with nothing added
between them. Empty files are skipped. A missing path, a glob matching nothing, no text at all,
a file that is not UTF-8 text (invalid UTF-8 or a NUL byte) or too little text for one batch
is a ``ValueError`` naming ``data``.

**Tokens.** Bytes by default (``ByteTokenizer``: a token is a UTF-8 byte, vocabulary 256, so
any text encodes and decoding never fails: invalid sequences a model samples become U+FFFD).
With ``cfg.tokenizer`` a ``tokenizer.json`` of the ``tokenizers`` library (a local file, read
with ``Tokenizer.from_file``; nothing is downloaded), vocabulary size from that file
(``vocab_size_of``); special tokens are not added (``add_special_tokens=False``).

**Split** (``split_offset``): by byte offset, before tokenizing. The text's first
``round(0.9 * n_bytes)`` bytes (moved forward to the next UTF-8 character start) train, the
rest validates: the same text validates whatever the tokenizer, and for the embedded corpus
this is nanoGPT's contiguous 90/10 split. With several files, the last files in sorted order
hold the validation text.

**Memory.** Files are memory-mapped (``np.memmap``), never read whole into Python strings.
Byte-level tokens of a single file *are* its bytes: the splits are ``uint8`` views of the
mapped file itself. Several files are concatenated once into the cache. A tokenizer runs over
the text in pieces of at most 256 KiB, each ending at a line end, and its ids are written to
the cache as they come (``uint16``, or ``int32`` for vocabularies above 65536): the ids are the
tokenizer's ids of each piece, concatenated. (They can differ from tokenizing the whole text at
once where a pre-tokenizer groups whitespace across a line end: 8 more tokens of 1.29 million
for a byte-level BPE on 4.7 MB of text.)

**Cache.** Derived token ids live under the run folder, ``RUN_DIR/data_cache/``, never beside
your files: ``<key>.train.bin`` / ``<key>.val.bin`` and a manifest ``<key>.json`` with their
dtype, length and SHA-256. ``key`` hashes every source file's (absolute path, size, mtime) and
the tokenizer file's SHA-256, so editing a file or the tokenizer builds a new cache (older
entries are then removed). Every load re-hashes the cached files: a corrupt or truncated cache
is reported and rebuilt, never loaded. The tokenizer file itself is copied to
``RUN_DIR/data_cache/tokenizer.json``, which ``load_tokenizer`` (``jaxopt-llm sample``) prefers.
Without a run folder nothing is cached (several files are then joined in memory).

``BatchIterator`` walks the train tokens in shuffled windows, epoch by epoch, from a seed. Its
whole position is two integers (``epoch``, ``index``), saved in checkpoints, so a resumed run
sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import hashlib
import importlib.resources
import json
import math
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np

from jaxopt_llm._validation import check_int, check_real
from jaxopt_llm.train.files import atomic_write, sha256_file

if TYPE_CHECKING:
  from jaxopt_llm.train.config import TrainConfig

VOCAB_SIZE = 256
CORPUS_SHA256 = "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4"
VAL_FRACTION = 0.1          # the last 10% of the text's bytes validate
CACHE_DIR = "data_cache"    # under the run folder
CACHE_VERSION = 1           # part of the cache key: bump when the cached format changes
TOKENIZE_CHUNK = 1 << 18    # bytes of text per piece given to the tokenizer (cut at a line end)
TOKENIZE_BATCH = 8          # pieces per tokenizer call (encoded in parallel by the library)
_SCAN_CHUNK = 1 << 22       # elements per step when checking, counting, hashing, copying


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
  _check_ids("decode", ids, VOCAB_SIZE)
  return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _check_ids(owner: str, ids: np.ndarray, vocab_size: int) -> None:
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"{owner}: token ids must be in [0, {vocab_size}), got "
                     f"[{ids.min()}, {ids.max()}]")


def train_val_split(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous split as in nanoGPT: the first ``1 - val_fraction`` trains, the rest validates."""
  check_real("train_val_split", "val_fraction", val_fraction, lo=0.0, hi=1.0, lo_open=True,
             hi_open=True)
  cut = int(round(len(ids) * (1.0 - val_fraction)))
  return ids[:cut], ids[cut:]


def _token_counts(ids: np.ndarray, vocab_size: int) -> np.ndarray:
  """``bincount`` of the token ids, chunk by chunk (a memory-mapped stream stays on disk)."""
  flat = np.asarray(ids).reshape(-1)
  counts = np.zeros(vocab_size, np.int64)
  for s in range(0, len(flat), _SCAN_CHUNK):
    chunk = np.asarray(flat[s:s + _SCAN_CHUNK])
    _check_ids("unigram statistics", chunk, vocab_size)
    counts += np.bincount(chunk, minlength=vocab_size)
  return counts


def unigram_entropy(ids: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
  r"""Entropy (nats) of the token frequencies: :math:`H = -\sum_c p_c \log p_c`.

  The loss of the best model that ignores context: a language model is learning something
  only once its cross-entropy is below this.
  """
  counts = _token_counts(ids, vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train_ids: np.ndarray, eval_ids: np.ndarray,
                          vocab_size: int = VOCAB_SIZE) -> float:
  """Cross-entropy (nats) on ``eval_ids`` of the add-one-smoothed unigram model of ``train_ids``."""
  counts = _token_counts(train_ids, vocab_size) + 1.0
  logp = np.log(counts / counts.sum())
  eval_counts = _token_counts(eval_ids, vocab_size)
  return float(-(eval_counts * logp).sum() / eval_counts.sum())


@dataclasses.dataclass
class BatchIterator:
  """Shuffled ``[batch_size, seq_len]`` int32 windows of a token stream, epoch after epoch.

  Each epoch cuts the stream into non-overlapping windows of ``seq_len`` tokens starting at a
  random offset in ``[0, seq_len)`` (so window borders move between epochs) and visits them in
  a random order; both come from ``np.random.default_rng([seed, epoch])``, so an epoch's order
  depends only on (seed, epoch). A batch never straddles two epochs: the last incomplete batch
  of an epoch is dropped. The position is ``(epoch, index)``, the next batch's first window.

  ``ids`` is any 1-D integer array and is not copied (a memory-mapped stream stays on disk;
  only the batch's windows are read).

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
    if not isinstance(self.ids, np.ndarray):
      self.ids = np.asarray(self.ids)
    if self.ids.ndim != 1 or not np.issubdtype(self.ids.dtype, np.integer):
      raise ValueError(f"{owner}: `ids` must be a 1-D integer array, got "
                       f"{self.ids.dtype}{list(self.ids.shape)}")
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
    return np.asarray(self.ids[chosen[:, None] + np.arange(self.seq_len)], np.int32)

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


def corpus_summary(train_ids: np.ndarray, val_ids: np.ndarray,
                   vocab_size: int = VOCAB_SIZE) -> dict:
  """Sizes and the two context-free baselines, in nats per token."""
  return {
      "train_tokens": int(len(train_ids)),
      "val_tokens": int(len(val_ids)),
      "unigram_entropy": unigram_entropy(train_ids, vocab_size),
      "unigram_val_cross_entropy": unigram_cross_entropy(train_ids, val_ids, vocab_size),
      "uniform_entropy": math.log(vocab_size),
  }


# --- tokenizers ------------------------------------------------------------------------------

class Tokenizer(Protocol):
  """Text <-> token ids: what training, evaluation and sampling need of a tokenizer."""
  name: str
  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    """int32 ids, shape ``[n]``."""

  def decode(self, ids) -> str:
    """The text of ``ids`` (never raises on in-vocabulary ids a model may sample)."""


class ByteTokenizer:
  """The default: a token is a UTF-8 byte (vocabulary 256); ``encode`` / ``decode`` above."""
  name = "bytes"
  vocab_size = VOCAB_SIZE
  sha256 = None

  def encode(self, text: str) -> np.ndarray:
    return encode(text)

  def decode(self, ids) -> str:
    return decode(ids)


class JSONTokenizer:
  """A ``tokenizers`` library ``tokenizer.json`` (BPE, WordPiece, Unigram...), read locally.

  ``vocab_size`` is one more than the largest id in its vocabulary (added tokens included),
  so every id it produces is a valid embedding row. ``encode`` adds no special tokens.
  """

  def __init__(self, path: str, *, field: str = "tokenizer"):
    try:
      import tokenizers
    except ImportError:
      raise ImportError(f"`{field}` needs the tokenizers library: pip install tokenizers "
                        "(or the train extra)") from None
    if not os.path.isfile(path):
      raise ValueError(f"`{field}`: no such file: {path!r}")
    self.path = os.path.abspath(path)
    self.sha256 = sha256_file(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for a malformed file
      raise ValueError(f"`{field}`: {path!r} is not a tokenizers tokenizer.json "
                       f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    vocab = self._tok.get_vocab(with_added_tokens=True)
    if not vocab:
      raise ValueError(f"`{field}`: {path!r} has an empty vocabulary")
    self.vocab_size = max(vocab.values()) + 1
    self.name = os.path.basename(path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """``encode`` of each text (in parallel threads inside the library)."""
    out = self._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in out]

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    _check_ids("decode", ids, self.vocab_size)
    return self._tok.decode(ids.tolist(), skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def _json_tokenizer_cached(path: str, size: int, mtime_ns: int) -> JSONTokenizer:
  del size, mtime_ns  # the cache key: an edited file is read again
  return JSONTokenizer(path)


def _json_tokenizer(path: str) -> JSONTokenizer:
  try:
    st = os.stat(path)
  except OSError:
    raise ValueError(f"`tokenizer`: no such file: {path!r}") from None
  return _json_tokenizer_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def vocab_size_of(tokenizer: Optional[str]) -> int:
  """The vocabulary size of the ``tokenizer`` field: 256 (bytes) for ``None``."""
  return VOCAB_SIZE if tokenizer is None else _json_tokenizer(tokenizer).vocab_size


def load_tokenizer(cfg: "TrainConfig", run_dir: Optional[str] = None) -> Tokenizer:
  """The tokenizer of ``cfg``: bytes when ``cfg.tokenizer`` is None. With a run folder, the
  copy a run made there (``RUN_DIR/data_cache/tokenizer.json``: the tokenizer the run trained
  with) is preferred to the file ``cfg.tokenizer`` names, which may have moved or changed."""
  if cfg.tokenizer is None:
    return ByteTokenizer()
  if run_dir:
    copy = os.path.join(run_dir, CACHE_DIR, "tokenizer.json")
    if os.path.isfile(copy):
      return _json_tokenizer(copy)
  return _json_tokenizer(cfg.tokenizer)


# --- sources: files, the byte stream, the split ----------------------------------------------

@dataclasses.dataclass
class _Source:
  """A piece of the text stream: a file (memory-mapped) or the embedded corpus."""
  name: str           # absolute path, or "<embedded corpus>"
  key: tuple          # what identifies its content in the cache key
  nbytes: int

  def array(self) -> np.ndarray:
    if self.name == "<embedded corpus>":
      return np.frombuffer(load_corpus(), np.uint8)
    return np.memmap(self.name, dtype=np.uint8, mode="r")


def resolve_files(spec: str) -> list[str]:
  """The files ``spec`` names, in the order they are joined: a file; every file below a folder
  (skipping any path part starting with ``.``), sorted by path; or a glob's files, sorted."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"`data` must be a non-empty path, got {spec!r}")
  if os.path.isfile(spec):
    return [spec]
  if os.path.isdir(spec):
    found = []
    for root, dirs, files in os.walk(spec):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    found = sorted(p for p in found if os.path.isfile(p))
    if not found:
      raise ValueError(f"`data`: the folder {spec!r} holds no files")
    return found
  if any(c in spec for c in "*?["):
    found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not found:
      raise ValueError(f"`data`: no file matches {spec!r}")
    return found
  raise ValueError(f"`data`: no such file or folder: {spec!r}")


def _sources(spec: Optional[str]) -> list[_Source]:
  if spec is None:
    return [_Source("<embedded corpus>", ("<embedded corpus>", CORPUS_SHA256),
                    len(load_corpus()))]
  out = []
  for path in resolve_files(spec):
    st = os.stat(path)
    if st.st_size:
      path = os.path.abspath(path)
      out.append(_Source(path, (path, st.st_size, st.st_mtime_ns), st.st_size))
  if not out:
    raise ValueError(f"`data`: {spec!r} holds no text (its files are empty)")
  return out


def _check_text(src: _Source) -> None:
  """ValueError naming ``data`` unless ``src`` is UTF-8 text without NUL bytes."""
  arr = src.array()
  decoder = codecs.getincrementaldecoder("utf-8")()
  for s in range(0, len(arr), _SCAN_CHUNK):
    chunk = np.asarray(arr[s:s + _SCAN_CHUNK])
    nul = np.flatnonzero(chunk == 0)
    if nul.size:
      raise ValueError(f"`data`: {src.name!r} is not a text file (a NUL byte at offset "
                       f"{s + int(nul[0])})")
    try:
      decoder.decode(chunk.tobytes(), final=s + _SCAN_CHUNK >= len(arr))
    except UnicodeDecodeError as e:
      raise ValueError(f"`data`: {src.name!r} is not UTF-8 text (invalid UTF-8 near byte "
                       f"offset {s + e.start})") from None


class _ByteStream:
  """The sources' bytes joined (as ``cat`` would), read by absolute offset."""

  def __init__(self, sources: Sequence[_Source]):
    self.arrays = [s.array() for s in sources]
    self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
    self.nbytes = int(self.starts[-1])

  def read(self, start: int, stop: int) -> bytes:
    parts = []
    for a, a0 in zip(self.arrays, self.starts[:-1]):
      lo, hi = max(start - a0, 0), min(stop - a0, len(a))
      if lo < hi:
        parts.append(np.asarray(a[lo:hi]).tobytes())
    return b"".join(parts)

  def byte_at(self, pos: int) -> int:
    return self.read(pos, pos + 1)[0]

  def chunks(self, start: int, stop: int, size: int = _SCAN_CHUNK) -> Iterator[bytes]:
    for s in range(start, stop, size):
      yield self.read(s, min(s + size, stop))


def split_offset(stream_bytes: int, first_byte_at: Callable[[int], int],
                 val_fraction: float = VAL_FRACTION) -> int:
  """The train/val border: byte ``round((1 - val_fraction) * n)`` moved forward to the next
  UTF-8 character start (a byte that is not ``0b10xxxxxx``), so both halves are whole text."""
  cut = int(round(stream_bytes * (1.0 - val_fraction)))
  while cut < stream_bytes and (first_byte_at(cut) & 0xC0) == 0x80:
    cut += 1
  return cut


def _text_pieces(stream: _ByteStream, start: int, stop: int,
                 size: Optional[int] = None) -> Iterator[str]:
  """The text of bytes ``[start, stop)`` in pieces of at most ``size`` (``TOKENIZE_CHUNK``)
  bytes, each ending at a line end (or, in a line longer than that, at a character start)."""
  size = size or TOKENIZE_CHUNK
  pos = start
  while pos < stop:
    block = stream.read(pos, min(pos + size, stop))
    if pos + len(block) < stop:
      nl = block.rfind(b"\n")
      if nl >= 0:
        block = block[:nl + 1]
      else:
        end = len(block)
        while end > 1 and (block[end - 1] & 0xC0) == 0x80:
          end -= 1
        if end and block[end - 1] >= 0xC0:  # a lead byte whose continuation is cut off
          end -= 1
        block = block[:max(end, 1)]
    pos += len(block)
    yield block.decode("utf-8")


# --- the cache -------------------------------------------------------------------------------

def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536
                  else np.int32)


class _Cache:
  """``RUN_DIR/data_cache/<key>.{train,val}.bin`` + ``<key>.json`` (dtype, length, SHA-256)."""

  def __init__(self, run_dir: str, key: str, log: Callable[[str], None]):
    self.dir = os.path.join(run_dir, CACHE_DIR)
    self.key, self.log = key, log
    self.manifest = os.path.join(self.dir, f"{key}.json")

  def path(self, part: str) -> str:
    return os.path.join(self.dir, f"{self.key}.{part}.bin")

  def load(self) -> Optional[dict]:
    """The manifest and memory-mapped parts if the entry exists and verifies, else None
    (a corrupt entry is reported)."""
    if not os.path.exists(self.manifest):
      return None
    try:
      with open(self.manifest) as f:
        man = json.load(f)
      arrays = {}
      for part, info in man["parts"].items():
        path = self.path(part)
        dtype = np.dtype(info["dtype"])
        if os.path.getsize(path) != info["length"] * dtype.itemsize:
          raise ValueError(f"{os.path.basename(path)} has the wrong size")
        if sha256_file(path) != info["sha256"]:
          raise ValueError(f"{os.path.basename(path)} does not match its SHA-256")
        arrays[part] = (np.memmap(path, dtype=dtype, mode="r", shape=(info["length"],))
                        if info["length"] else np.zeros(0, dtype))
      man["arrays"] = arrays
      return man
    except (OSError, ValueError, KeyError, TypeError) as e:
      self.log(f"data cache {self.manifest!r} is corrupt ({e}); rebuilding it")
      return None

  def write_part(self, part: str, blocks: Iterator[np.ndarray], dtype: np.dtype) -> dict:
    """Writes the concatenated ``blocks`` as ``part``; returns its manifest entry."""
    os.makedirs(self.dir, exist_ok=True)
    h, n = hashlib.sha256(), 0

    def write(f):
      nonlocal n
      for block in blocks:
        raw = np.ascontiguousarray(block, dtype).tobytes()
        h.update(raw)
        f.write(raw)
        n += len(block)

    atomic_write(self.path(part), write)
    return {"dtype": dtype.str, "length": n, "sha256": h.hexdigest()}

  def commit(self, manifest: dict) -> None:
    """Writes the manifest (last: an entry without one is never read) and removes the
    entries of other keys (an edited source or tokenizer)."""
    os.makedirs(self.dir, exist_ok=True)
    atomic_write(self.manifest, lambda f: json.dump(manifest, f, indent=1), mode="w")
    for name in os.listdir(self.dir):
      if not name.startswith(self.key) and name != "tokenizer.json" and ".tmp-" not in name:
        try:
          os.remove(os.path.join(self.dir, name))
        except OSError:
          pass


def _cache_key(sources: Sequence[_Source], tok: Tokenizer) -> str:
  ident = {"version": CACHE_VERSION, "val_fraction": VAL_FRACTION, "piece": TOKENIZE_CHUNK,
           "sources": [list(s.key) for s in sources],
           "tokenizer": getattr(tok, "sha256", None) or tok.name}
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


# --- the dataset -----------------------------------------------------------------------------

@dataclasses.dataclass
class Dataset:
  """A run's tokens: the two splits (1-D integer arrays, possibly memory-mapped), the
  tokenizer that made them and its vocabulary, and ``summary``: ``source``, ``files``,
  ``bytes``, ``split_byte``, ``tokenizer``, ``tokenizer_sha256``, ``vocab_size``,
  ``fingerprint`` (the cache key: equal fingerprints, equal tokens), ``cache`` and
  ``corpus_summary``'s ``train_tokens``, ``val_tokens``, ``unigram_entropy``..."""
  train_ids: np.ndarray
  val_ids: np.ndarray
  vocab_size: int
  tokenizer: Any
  summary: dict


def load_dataset(cfg: "TrainConfig", run_dir: Optional[str] = None, *,
                 log: Optional[Callable[[str], None]] = None) -> Dataset:
  """The train / val tokens of ``cfg`` (``cfg.data``, ``cfg.tokenizer``; see the module
  docstring for the sources, the split and the cache under ``run_dir``).

  Checks that the train split holds one batch of ``cfg.batch_size`` windows of
  ``cfg.block_size`` tokens and the val split one window; ``ValueError`` naming ``data``
  otherwise. ``log`` reports a rebuilt cache (default: ``warnings.warn``).
  """
  log = log or (lambda text: warnings.warn(text, stacklevel=3))
  sources = _sources(cfg.data)
  if cfg.tokenizer is None:
    tok: Tokenizer = ByteTokenizer()
  else:
    tok = _json_tokenizer(cfg.tokenizer)
  key = _cache_key(sources, tok)
  cache = _Cache(run_dir, key, log) if run_dir else None
  if cache is not None and isinstance(tok, JSONTokenizer):
    os.makedirs(cache.dir, exist_ok=True)
    copy = os.path.join(cache.dir, "tokenizer.json")
    if not os.path.isfile(copy) or sha256_file(copy) != tok.sha256:
      with open(tok.path, "rb") as src:
        raw = src.read()
      atomic_write(copy, lambda f: f.write(raw))

  man = cache.load() if cache is not None else None
  if man is not None and man.get("source_view"):
    arr = sources[0].array()
    man["arrays"] = {"train": arr[:man["split_byte"]], "val": arr[man["split_byte"]:]}
  if man is None:
    man = _build(sources, tok, cache)
  train_ids, val_ids = man["arrays"]["train"], man["arrays"]["val"]

  where = "the embedded corpus" if cfg.data is None else repr(cfg.data)
  need_train = (cfg.batch_size + 1) * cfg.block_size - 1
  if len(train_ids) < need_train or len(val_ids) < cfg.block_size:
    raise ValueError(
        f"`data`: {where} gives {len(train_ids)} train and {len(val_ids)} val tokens; a run "
        f"needs at least {need_train} train tokens (one batch of {cfg.batch_size} windows of "
        f"{cfg.block_size}) and {cfg.block_size} val tokens")
  summary = {
      "source": "embedded corpus" if cfg.data is None else cfg.data,
      "files": len(sources) if cfg.data is not None else 0,
      "bytes": man["bytes"], "split_byte": man["split_byte"],
      "tokenizer": tok.name, "tokenizer_sha256": getattr(tok, "sha256", None),
      "vocab_size": tok.vocab_size, "fingerprint": key,
      "cache": cache.manifest if cache is not None and os.path.exists(cache.manifest)
      else None,
      **corpus_summary(train_ids, val_ids, tok.vocab_size)}
  return Dataset(train_ids, val_ids, tok.vocab_size, tok, summary)


def _build(sources: list[_Source], tok: Tokenizer, cache: Optional[_Cache]) -> dict:
  """Checks the text, splits it and tokenizes it (into ``cache`` when given)."""
  if sources[0].name != "<embedded corpus>":
    for src in sources:
      _check_text(src)
  stream = _ByteStream(sources)
  cut = split_offset(stream.nbytes, stream.byte_at)
  man = {"version": CACHE_VERSION, "bytes": stream.nbytes, "split_byte": cut,
         "sources": [list(s.key) for s in sources], "tokenizer": tok.name}
  ranges = {"train": (0, cut), "val": (cut, stream.nbytes)}

  if isinstance(tok, ByteTokenizer) and len(stream.arrays) == 1:
    # The bytes are the tokens: views of the (memory-mapped) source, nothing to write; a
    # file's manifest records that it was checked (the next load skips the check).
    if cache is not None and sources[0].name != "<embedded corpus>":
      cache.commit({**man, "parts": {}, "source_view": True})
    arr = stream.arrays[0]
    man["arrays"] = {"train": arr[:cut], "val": arr[cut:]}
    return man

  if isinstance(tok, ByteTokenizer):
    def blocks(start, stop):
      return (np.frombuffer(b, np.uint8) for b in stream.chunks(start, stop))
  else:
    def blocks(start, stop):
      pieces = _text_pieces(stream, start, stop)
      while True:
        batch = [p for _, p in zip(range(TOKENIZE_BATCH), pieces)]
        if not batch:
          return
        yield from tok.encode_batch(batch)
  dtype = _token_dtype(tok.vocab_size)
  if cache is None:
    man["arrays"] = {part: np.concatenate([np.zeros(0, dtype)] + [
        np.asarray(b, dtype) for b in blocks(*r)]) for part, r in ranges.items()}
    return man
  man["parts"] = {part: cache.write_part(part, blocks(*r), dtype) for part, r in ranges.items()}
  cache.commit(man)
  loaded = cache.load()
  if loaded is None:
    raise RuntimeError(f"data cache {cache.manifest!r}: written but does not verify")
  return loaded
