"""``jaxopt-llm sample RUN_DIR``: text from a run's latest intact checkpoint.

``load_run(run_dir)`` rebuilds the run's model from its config (``config.json``, else the
checkpoint's own copy), restores the newest checkpoint whose files verify
(``checkpoint.restore_latest_intact``: a corrupt newest one falls back to the one before, in
one line) and loads the run's tokenizer (``data.load_tokenizer``: bytes, or the run's
``tokenizer.json``). ``sample(run, prompt, tokens)`` continues a prompt with
``model.generate`` (softmax at ``temperature``, optionally restricted to the ``top_k`` most
likely tokens; a ``seed`` makes it repeatable). One process, one device: a run trained with
``--shard`` over many devices or processes is restored onto one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

from jaxopt_llm._validation import check_int, check_real


@dataclasses.dataclass
class LoadedRun:
  cfg: Any                 # the run's TrainConfig
  graphdef: Any            # the model's nnx.GraphDef
  params: Any              # its parameters, restored from the checkpoint
  tokenizer: Any           # encode(text) -> ids, decode(ids) -> text
  step: int                # the checkpoint's optimizer step
  run_dir: str


def _run_config(run_dir: str, ckpt_dir: str):
  """The run's TrainConfig: ``config.json``'s, else the newest readable checkpoint's."""
  from jaxopt_llm.train.config import TrainConfig
  from jaxopt_llm.train.writers import read_run_config
  saved = read_run_config(run_dir)
  if saved is None:
    from jaxopt_llm.train.checkpoint import Checkpointer
    ckpt = Checkpointer(ckpt_dir, create=False)
    try:
      for step in sorted((int(n) for n in os.listdir(ckpt_dir) if n.isdigit()),
                         reverse=True):
        try:
          saved = ckpt.extra(step)["config"]
          break
        except Exception:  # noqa: BLE001  (a corrupt checkpoint: try the one before)
          continue
    finally:
      ckpt.close()
    if saved is None:
      raise ValueError(f"{run_dir}: neither config.json nor a readable checkpoint config")
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
  if cfg.tokenizer is not None:  # the copy the run kept: the user's file may have moved
    from jaxopt_llm.train import data
    copy = os.path.join(run_dir, data.CACHE_DIR, "tokenizer.json")
    if os.path.isfile(copy):
      cfg = dataclasses.replace(cfg, tokenizer=copy)
  # Sampling runs in this one process on one device, whatever the run was trained on.
  return dataclasses.replace(cfg, shard="none", num_processes=None, process_id=None,
                             coordinator_address=None)


def load_run(run_dir: str, log: Optional[Callable[[str], None]] = None) -> LoadedRun:
  """The model, parameters and tokenizer of ``run_dir``'s latest intact checkpoint.

  ValueError (one line) when ``run_dir`` is not a run folder or holds no checkpoint.
  """
  log = log or (lambda text: None)
  if not os.path.isdir(run_dir):
    raise ValueError(f"{run_dir!r} is not a folder" if os.path.exists(run_dir)
                     else f"{run_dir!r} does not exist")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  from jaxopt_llm.train.writers import CONFIG
  if not os.path.isdir(ckpt_dir) and not os.path.isfile(os.path.join(run_dir, CONFIG)):
    raise ValueError(f"{run_dir!r} is not a run folder (no checkpoints/, no {CONFIG}); "
                     "give the --out of a `jaxopt-llm train` run")
  if not os.path.isdir(ckpt_dir) or not any(
      name.isdigit() for name in os.listdir(ckpt_dir)):
    raise ValueError(f"no checkpoint in {ckpt_dir!r}")
  cfg = _run_config(run_dir, ckpt_dir)
  cfg.validate()

  import jax
  from jaxopt_llm.train import checkpoint, data
  from jaxopt_llm.train.step import build_program
  prog = build_program(cfg)
  target = prog.init(cfg.seed)
  state, _, _ = checkpoint.restore_latest_intact(ckpt_dir, target, log)
  tokenizer = data.load_tokenizer(cfg, run_dir)
  return LoadedRun(cfg, prog.graphdef, state.params, tokenizer,
                   int(jax.device_get(state.opt_step)), run_dir)


def check_sampling(tokens: int, temperature: float, top_k: Optional[int], seed: int,
                   vocab_size: Optional[int] = None) -> None:
  """ValueError naming the first bad sampling argument."""
  owner = "sample"
  check_int(owner, "tokens", tokens, lo=1)
  check_real(owner, "temperature", temperature, lo=0.0, lo_open=True)
  if top_k is not None:
    check_int(owner, "top_k", top_k, lo=1)
    if vocab_size is not None and top_k > vocab_size:
      raise ValueError(f"{owner}: `top_k` must be <= the vocabulary size {vocab_size}, "
                       f"got {top_k}")
  check_int(owner, "seed", seed, lo=0)


def sample(run: LoadedRun, prompt: Optional[str] = None, tokens: int = 200, *,
           temperature: float = 0.8, top_k: Optional[int] = None, seed: int = 0) -> str:
  """``prompt``'s continuation: ``tokens`` new tokens, decoded (the prompt not included).

  ``prompt=None`` uses the run's ``sample_prompt``; a prompt longer than the context keeps its
  last ``block_size`` tokens.
  """
  import jax
  import numpy as np
  from jaxopt_llm.train.model import generate
  mcfg = run.cfg.model_config()
  check_sampling(tokens, temperature, top_k, seed, mcfg.vocab_size)
  prompt = run.cfg.sample_prompt if prompt is None else prompt
  ids = np.asarray(run.tokenizer.encode(prompt)).reshape(-1)
  if ids.size == 0:
    raise ValueError("sample: `prompt` must encode to at least one token, got "
                     f"{prompt!r}")
  ids = ids[-mcfg.block_size:]
  new = generate(run.graphdef, run.params, ids, tokens, jax.random.PRNGKey(seed),
                 temperature=float(temperature), top_k=top_k)
  return run.tokenizer.decode(np.asarray(new))
