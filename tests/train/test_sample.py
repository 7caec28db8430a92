"""sample: the restored model is the trained one (its text equals generate() on the trained
parameters), the config comes from config.json or the checkpoint, one-line errors."""
import os
import shutil

import jax
import numpy as np
import pytest

from jaxopt_llm.train import data, loop, sample, writers
from jaxopt_llm.train.config import TrainConfig
from jaxopt_llm.train.model import generate

TINY = dict(n_layer=1, d_model=16, n_head=2, block_size=16, batch_size=4, eval_windows=4,
            sample_tokens=0, log_every=1, eval_every=0, steps=3, tensorboard=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sample") / "run")
  cfg = TrainConfig(**TINY, sample_prompt="def ")
  result = loop.train(cfg, out_dir=out, progress=False, log=lambda s: None)
  if not os.path.exists(os.path.join(out, writers.CONFIG)):
    writers.write_run_config(out, cfg)  # the loop writes it once it uses writers
  return out, cfg, result


def test_sample_continues_the_prompt_with_the_trained_parameters(run):
  out, cfg, result = run
  loaded = sample.load_run(out)
  assert loaded.step == cfg.steps and loaded.cfg.n_layer == 1
  for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(result.state.params)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  # one compilation: the same length, temperature and top-k throughout (they are static)
  kw = dict(temperature=0.7, top_k=20)
  text = sample.sample(loaded, "The ", 8, seed=3, **kw)
  want = generate(result.graphdef, result.state.params, data.encode("The "), 8,
                  jax.random.PRNGKey(3), **kw)
  assert text == data.decode(np.asarray(want))
  assert sample.sample(loaded, "The ", 8, seed=3, **kw) == text
  assert len({sample.sample(loaded, "The ", 8, seed=s, **kw) for s in range(4)}) > 1
  # the default prompt is the run's; a prompt longer than the context keeps its tail
  assert sample.sample(loaded, None, 8, seed=1, **kw) == sample.sample(loaded, "def ", 8,
                                                                       seed=1, **kw)
  long = "x" * 50 + "abcdefghijklmnop"
  assert sample.sample(loaded, long, 8, seed=1, **kw) == sample.sample(loaded, long[-16:], 8,
                                                                       seed=1, **kw)


def test_the_config_comes_from_the_checkpoint_when_config_json_is_missing(run, tmp_path):
  out, cfg, _ = run
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  os.remove(copy / writers.CONFIG)
  loaded = sample.load_run(str(copy))
  assert loaded.cfg.to_dict() == {**cfg.to_dict(), "shard": "none"}
  assert loaded.step == cfg.steps


def test_not_a_run_folder_or_no_checkpoint_is_one_clear_line(run, tmp_path):
  out, _, _ = run
  cases = {str(tmp_path / "missing"): "does not exist",
           str(tmp_path): "not a run folder"}
  (tmp_path / "file.txt").write_text("x")
  cases[str(tmp_path / "file.txt")] = "not a folder"
  empty = tmp_path / "empty"
  os.makedirs(empty / "checkpoints")
  cases[str(empty)] = "no checkpoint"
  for path, needle in cases.items():
    with pytest.raises(ValueError, match=needle) as e:
      sample.load_run(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,needle", [
    (dict(tokens=0), "tokens"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_k=0), "top_k"),
    (dict(top_k=257), "top_k"), (dict(seed=-1), "seed")])
def test_bad_sampling_arguments_name_themselves(kw, needle):
  args = {"tokens": 5, "temperature": 1.0, "top_k": None, "seed": 0, **kw}
  with pytest.raises(ValueError, match=f"`{needle}`"):
    sample.check_sampling(args["tokens"], args["temperature"], args["top_k"], args["seed"],
                          vocab_size=256)


def test_an_empty_prompt_is_refused(run):
  with pytest.raises(ValueError, match="prompt"):
    sample.sample(sample.load_run(run[0]), "", 5)


def test_a_tokenizer_run_samples_with_the_run_s_copy_of_its_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  text = ("the cat sat on the mat. the dog sat on the log. " * 60).strip()
  (tmp_path / "corpus.txt").write_text(text)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
      vocab_size=60, special_tokens=["[UNK]"]))
  tok.save(str(tmp_path / "tok.json"))
  out = str(tmp_path / "run")
  cfg = TrainConfig(**{**TINY, "steps": 1, "batch_size": 2, "block_size": 8},
                    data=str(tmp_path / "corpus.txt"), tokenizer=str(tmp_path / "tok.json"))
  loop.train(cfg, out_dir=out, progress=False, log=lambda s: None)
  os.remove(tmp_path / "tok.json")  # the user's file is gone: the run kept a copy
  loaded = sample.load_run(out)
  assert loaded.cfg.model_config().vocab_size == tok.get_vocab_size()
  words = sample.sample(loaded, "the cat", 6, seed=0)
  assert isinstance(words, str) and words.strip()
