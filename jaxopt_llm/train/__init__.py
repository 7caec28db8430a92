"""Train a tiny GPT (Flax NNX) on the embedded corpus with the library's losses/optimizers.

* ``model``: ``GPTConfig``, ``GPT`` (``hidden``/``head_kernel`` for the fused loss), ``generate``
* ``data``: the corpus, byte tokenizer, ``BatchIterator`` (resumable), unigram entropy
* ``optimizers``: named optimizer/schedule recipes (``OPTIMIZERS``, ``SCHEDULES``)
* ``loop``: ``TrainConfig``, ``TrainState``, ``make_train_step``, ``make_eval_fn``, ``train``
* ``monitors``: grad / optimizer-state norms, lr, Sophia win rate
* ``checkpoint``: Orbax ``Checkpointer`` (exact resumption)

The command line front end is ``jaxopt-llm`` (``jaxopt_llm.cli``).
"""
from jaxopt_llm.train.data import BatchIterator, VOCAB_SIZE, decode, encode, load_corpus
from jaxopt_llm.train.loop import (
    GuardState, Program, TrainConfig, TrainResult, TrainState, build_program, format_summary,
    init_state, lm_loss,
    make_eval_fn, make_train_step, put_batch, put_state, train, use_fused_ce)
from jaxopt_llm.train.model import GPT, GPTConfig, MODEL_SIZES, generate, num_params
from jaxopt_llm.train.optimizers import (
    OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule, optimizer_names)

__all__ = [
    "BatchIterator", "VOCAB_SIZE", "decode", "encode", "load_corpus",
    "GuardState", "Program", "TrainConfig", "TrainResult", "TrainState", "build_program",
    "format_summary", "init_state",
    "lm_loss", "make_eval_fn", "make_train_step", "put_batch", "put_state", "train",
    "use_fused_ce",
    "GPT", "GPTConfig", "MODEL_SIZES", "generate", "num_params",
    "OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_schedule", "optimizer_names",
]
