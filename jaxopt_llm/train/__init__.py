"""Train a tiny GPT (Flax NNX) on the embedded corpus with the library's losses/optimizers.

Read in this order (nanoGPT's ``train.py``, split in four):

* ``config``: ``TrainConfig``, every knob of a run (the CLI's flags are its field names)
* ``optimizers``: ``build(cfg) -> (schedule, optimizer)``, the one builder (named recipes)
* ``step``: ``TrainState``, the jitted train step, monitors, evaluation, ``build_program``
* ``loop``: ``train(cfg)``, the loop: batches in, metrics / evals / checkpoints out

and the pieces they use: ``model`` (``GPT``, ``generate``), ``data`` (corpus, byte tokenizer,
resumable ``BatchIterator``), ``monitors`` (norms, Sophia's win rate), ``checkpoint`` (Orbax),
``plots``. The command line front end is ``jaxopt-llm`` (``jaxopt_llm.cli``).

The names below are imported on first use (PEP 562), so that ``jaxopt_llm.train.config`` and
``.optimizers`` (what ``jaxopt-llm schedule`` needs) load without flax.
"""
import importlib

_EXPORTS = {
    "config": ("TrainConfig",),
    "data": ("BatchIterator", "VOCAB_SIZE", "decode", "encode", "load_corpus"),
    "loop": ("TrainResult", "format_summary", "train"),
    "model": ("GPT", "GPTConfig", "MODEL_SIZES", "generate", "num_params"),
    "optimizers": ("OPTIMIZERS", "SCHEDULES", "build", "build_optimizer", "build_schedule"),
    "step": ("Program", "TrainState", "build_program", "lm_loss", "make_eval_fn",
             "make_train_step", "use_fused_ce"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name not in _MODULE_OF:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)


def __dir__():
  return sorted(set(globals()) | set(__all__))
