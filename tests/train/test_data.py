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


# --- your own text: files, folders, globs, the split, the cache, tokenizers ---------------

from jaxopt_llm.train.config import TrainConfig  # noqa: E402

TEXT = data.load_corpus().decode("utf-8")


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
  return path


def small_cfg(**kw) -> TrainConfig:
  return TrainConfig(**{"batch_size": 4, "block_size": 16, **kw})


def listing(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_text_file_is_memory_mapped_split_by_byte_offset_and_nothing_lands_beside_it(
    tmp_path):
  src = write(tmp_path / "in" / "book.txt", TEXT[:30_000])
  raw = src.read_bytes()
  before = listing(tmp_path / "in")
  ds = data.load_dataset(small_cfg(data=str(src)), str(tmp_path / "run"))
  cut = int(round(0.9 * len(raw)))
  assert raw[cut] & 0xC0 != 0x80  # an ASCII/lead byte here: the border is not moved
  assert isinstance(ds.train_ids, np.memmap) and ds.train_ids.dtype == np.uint8
  assert ds.train_ids.tobytes() == raw[:cut] and ds.val_ids.tobytes() == raw[cut:]
  assert ds.vocab_size == 256 and ds.tokenizer.name == "bytes"
  s = ds.summary
  assert (s["train_tokens"], s["val_tokens"], s["bytes"], s["split_byte"], s["files"]) == (
      cut, len(raw) - cut, len(raw), cut, 1)
  assert s["unigram_entropy"] == pytest.approx(data.unigram_entropy(data.encode(raw[:cut])))
  assert listing(tmp_path / "in") == before  # nothing written beside the user's file
  assert all(p.startswith("data_cache") for p in listing(tmp_path / "run"))
  # The embedded corpus is the default, with nanoGPT's split as before.
  ref_train, ref_val = data.train_val_split(data.encode(data.load_corpus()))
  ds = data.load_dataset(small_cfg(), None)
  np.testing.assert_array_equal(ds.train_ids, ref_train)
  np.testing.assert_array_equal(ds.val_ids, ref_val)
  assert ds.summary["source"] == "embedded corpus"


def test_the_split_moves_to_the_next_character_start():
  raw = ("é" * 50).encode("utf-8")  # 100 bytes: byte 90 starts a character, 89 does not
  for n_bytes, expected in ((100, 90), (99, 90), (97, 88)):
    cut = data.split_offset(n_bytes, lambda i: raw[i])
    assert cut == expected, (n_bytes, cut)
  # Both halves decode on their own: no character is cut in two.
  cut = data.split_offset(len(raw) - 1, lambda i: raw[i])
  assert raw[:cut].decode("utf-8") == "é" * 45 and raw[cut:].decode("utf-8") == "é" * 5


def test_a_folder_or_glob_joins_its_files_in_sorted_order_like_cat(tmp_path):
  parts = {"b.txt": TEXT[:9000], "a.txt": TEXT[9000:15000], "sub/c.txt": TEXT[15000:21000],
           "empty.txt": "", ".hidden/x.txt": "hidden", ".notes": "hidden"}
  for name, text in parts.items():
    write(tmp_path / "corpus" / name, text)
  joined = "".join(parts[n] for n in ("a.txt", "b.txt", "empty.txt", "sub/c.txt"))
  raw = joined.encode("utf-8")
  cut = data.split_offset(len(raw), lambda i: raw[i])
  run = tmp_path / "run"
  folder = data.load_dataset(small_cfg(data=str(tmp_path / "corpus")), str(run))
  assert folder.train_ids.tobytes() == raw[:cut] and folder.val_ids.tobytes() == raw[cut:]
  assert folder.summary["files"] == 3  # the empty file is skipped, hidden paths too
  assert isinstance(folder.train_ids, np.memmap)  # the joined bytes: cached under the run
  assert str(run / "data_cache") in folder.summary["cache"]
  pattern = str(tmp_path / "corpus" / "**" / "*.txt")
  globbed = data.load_dataset(small_cfg(data=pattern), None)  # no run folder: in memory
  assert globbed.train_ids.tobytes() == raw[:cut] and globbed.summary["cache"] is None
  assert data.resolve_files(pattern) == data.resolve_files(str(tmp_path / "corpus"))


@pytest.mark.parametrize("setup,match", [
    (lambda d: str(d / "missing.txt"), "no such file or folder"),
    (lambda d: str(d / "*.nothing"), "no file matches"),
    (lambda d: (d / "empty_dir").mkdir() or str(d / "empty_dir"), "holds no files"),
    (lambda d: str(write(d / "empty.txt", "")), "holds no text"),
    (lambda d: str(write(d / "img.bin", b"GIF89a\x00\x01\x02" * 100)), "not a text file"),
    (lambda d: str(write(d / "latin1.txt", "caf\xe9 ".encode("latin-1") * 100)),
     "not UTF-8 text"),
    (lambda d: str(write(d / "short.txt", "tiny text " * 8)), "too short|needs at least"),
])
def test_bad_data_is_one_value_error_naming_data(tmp_path, setup, match):
  spec = setup(tmp_path)
  with pytest.raises(ValueError, match=f"`data`.*({match})"):
    data.load_dataset(small_cfg(data=spec), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "data_cache").exists() or not any(
      p.suffix == ".bin" for p in (tmp_path / "run" / "data_cache").iterdir())


def test_the_cache_is_reused_rebuilt_when_corrupt_and_renewed_when_a_file_changes(
    tmp_path, monkeypatch):
  for name, text in (("a.txt", TEXT[:6000]), ("b.txt", TEXT[6000:12000])):
    write(tmp_path / "corpus" / name, text)
  cfg, run = small_cfg(data=str(tmp_path / "corpus")), str(tmp_path / "run")
  first = data.load_dataset(cfg, run)
  train, val = np.array(first.train_ids), np.array(first.val_ids)
  key = first.summary["fingerprint"]
  cache = tmp_path / "run" / "data_cache"
  assert sorted(p.name for p in cache.iterdir()) == [
      f"{key}.json", f"{key}.train.bin", f"{key}.val.bin"]
  built = []
  real_build = data._build
  monkeypatch.setattr(data, "_build", lambda *a: built.append(1) or real_build(*a))
  again = data.load_dataset(cfg, run)
  assert built == [] and again.summary["fingerprint"] == key  # reused, not rebuilt
  np.testing.assert_array_equal(again.train_ids, train)

  # One flipped byte, then a truncated file: detected, reported, rebuilt; same tokens.
  for damage in ("flip", "truncate"):
    path = cache / f"{key}.train.bin"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
      raw[len(raw) // 2] ^= 0x01
    else:
      del raw[-100:]
    path.write_bytes(bytes(raw))
    notes = []
    ds = data.load_dataset(cfg, run, log=notes.append)
    assert len(notes) == 1 and "corrupt" in notes[0] and "rebuilding" in notes[0]
    np.testing.assert_array_equal(ds.train_ids, train)
    np.testing.assert_array_equal(ds.val_ids, val)
  assert len(built) == 2

  # Editing a source file changes the key: a new entry, the old one removed.
  write(tmp_path / "corpus" / "b.txt", TEXT[6000:13000])
  edited = data.load_dataset(cfg, run)
  assert edited.summary["fingerprint"] != key and len(edited.train_ids) > len(train)
  assert not any(p.name.startswith(key) for p in cache.iterdir())


def test_split_and_batches_are_deterministic_and_memmaps_batch_like_arrays(tmp_path):
  src = write(tmp_path / "t.txt", TEXT[:20_000])
  a = data.load_dataset(small_cfg(data=str(src)), str(tmp_path / "r1"))
  b = data.load_dataset(small_cfg(data=str(src)), None)
  it_a = data.BatchIterator(a.train_ids, 4, 16, seed=5)     # uint8, memory-mapped
  it_b = data.BatchIterator(np.array(b.train_ids, np.int32), 4, 16, seed=5)
  for _ in range(it_a.batches_per_epoch + 3):  # across an epoch boundary
    x, y = next(it_a), next(it_b)
    assert x.dtype == np.int32
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match="1-D integer"):
    data.BatchIterator(np.zeros(1000, np.float32), 4, 16)


def bpe_tokenizer(path, text, vocab_size=320):
  """A byte-level BPE trained with the tokenizers library on ``text``, saved to ``path``."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([text], trainer)
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path))
  return path


def test_a_tokenizer_json_tokenizes_into_the_cache_in_line_pieces(tmp_path, monkeypatch):
  pytest.importorskip("tokenizers")
  tok_path = bpe_tokenizer(tmp_path / "tok" / "tokenizer.json", TEXT[:50_000])
  src = write(tmp_path / "t.txt", TEXT[:40_000])
  cfg = small_cfg(data=str(src), tokenizer=str(tok_path))
  ds = data.load_dataset(cfg, str(tmp_path / "run"))
  tok = ds.tokenizer
  assert ds.vocab_size == tok.vocab_size == 320 == cfg.model_config().vocab_size
  assert ds.train_ids.dtype == np.uint16 and isinstance(ds.train_ids, np.memmap)
  raw = src.read_bytes()
  cut = ds.summary["split_byte"]
  # One piece (the text is < 256 KiB): exactly the tokenizer's ids of each half.
  np.testing.assert_array_equal(ds.train_ids, tok.encode(raw[:cut].decode()))
  np.testing.assert_array_equal(ds.val_ids, tok.encode(raw[cut:].decode()))
  assert tok.decode(ds.val_ids) == raw[cut:].decode()
  assert ds.summary["unigram_entropy"] < math.log(320)
  # The run keeps the tokenizer it trained with; sampling reads that copy.
  copy = tmp_path / "run" / "data_cache" / "tokenizer.json"
  assert copy.read_bytes() == tok_path.read_bytes()
  tok_path.unlink()
  assert data.load_tokenizer(cfg, str(tmp_path / "run")).vocab_size == 320
  with pytest.raises(ValueError, match="`tokenizer`"):
    data.load_tokenizer(cfg, None)

  # Small pieces: each ends at a line end, and the ids still decode to the text.
  monkeypatch.setattr(data, "TOKENIZE_CHUNK", 500)
  stream = data._ByteStream([data._Source(str(src), ("x",), len(raw))])
  pieces = list(data._text_pieces(stream, 0, len(raw), size=500))
  assert "".join(pieces) == raw.decode() and len(pieces) > 40
  assert all(p.endswith("\n") for p in pieces[:-1]) and max(map(len, pieces)) <= 500
  small = data.load_dataset(cfg.__class__(**{**cfg.to_dict(), "tokenizer": str(copy)}),
                            str(tmp_path / "run2"))
  assert tok.decode(small.train_ids) == raw[:cut].decode()
  np.testing.assert_array_equal(
      small.train_ids, np.concatenate([tok.encode(p) for p in data._text_pieces(
          stream, 0, cut, size=500)]))


def test_bad_tokenizer_files_name_the_field(tmp_path):
  pytest.importorskip("tokenizers")
  with pytest.raises(ValueError, match="`tokenizer`: no such file"):
    data.load_dataset(small_cfg(tokenizer=str(tmp_path / "nope.json")), None)
  with pytest.raises(ValueError, match="`tokenizer`.*not a tokenizers"):
    data.load_dataset(small_cfg(tokenizer=str(write(tmp_path / "t.json", "{}"))), None)


def test_model_vocabulary_and_fused_ce_follow_the_tokenizer(tmp_path):
  pytest.importorskip("tokenizers")
  from tokenizers import Tokenizer, models, pre_tokenizers
  from jaxopt_llm.train import step
  vocab = {f"w{i}": i for i in range(9000)} | {"[UNK]": 9000}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "big.json"))
  cfg = small_cfg(tokenizer=str(tmp_path / "big.json"))
  assert cfg.model_config().vocab_size == 9001
  assert step.use_fused_ce(cfg.fused_ce, cfg.model_config().vocab_size)  # auto: >= 8192
  assert not step.use_fused_ce(small_cfg().fused_ce, small_cfg().model_config().vocab_size)
  ids = data.load_tokenizer(cfg).encode("w3 w8999 w12345")
  np.testing.assert_array_equal(ids, [3, 8999, 9000])


def test_training_steps_on_a_user_file_with_bytes_and_with_a_tokenizer(tmp_path):
  pytest.importorskip("tokenizers")
  from jaxopt_llm.train import step
  src = write(tmp_path / "t.txt", TEXT[:40_000])
  tok_path = bpe_tokenizer(tmp_path / "tokenizer.json", TEXT[:50_000])
  for tokenizer in (None, str(tok_path)):
    cfg = small_cfg(data=str(src), tokenizer=tokenizer, n_layer=1, d_model=32, steps=20,
                    schedule="constant", lr=3e-3)
    ds = data.load_dataset(cfg, str(tmp_path / "run"))
    prog = step.build_program(cfg)
    state = prog.init(0)
    batches = data.BatchIterator(ds.train_ids, cfg.batch_size, cfg.block_size)
    val = data.eval_windows(ds.val_ids, cfg.block_size, 16)
    before = prog.evaluate(state.params, val)["val_loss"]
    for _ in range(cfg.steps):
      state, m = prog.step(state, prog.put_batch(next(batches)))
    after = prog.evaluate(state.params, val)["val_loss"]
    assert before == pytest.approx(math.log(ds.vocab_size), abs=0.1)  # uniform at init
    assert after < before - 0.3, (tokenizer, before, after)
    # The data files do not enter the compiled program; the tokenizer's vocabulary does.
    same = step.build_program(cfg.__class__(**{**cfg.to_dict(), "data": None}))
    assert same is prog and prog.graphdef is not None
