"""Train the tiny GPT: config, train state, one jitted train step, evaluation, ``train()``.

Read it top to bottom like nanoGPT's ``train.py``. The pieces are the library's own:

* loss: ``losses.causal_lm_loss`` (optional PaLM z-loss), or ``losses.fused_linear_cross_entropy``
  on the model's final hidden states and head kernel when the vocabulary is large;
* optimizer: a recipe from ``train.optimizers`` (``jaxopt_llm.optim`` with
  ``weight_decay_mask``) after ``optax.clip_by_global_norm``, inside ``optax.MultiSteps`` for
  gradient accumulation, driven by a ``jaxopt_llm.schedules`` schedule;
* Sophia: the Gauss-Newton-Bartlett estimate (``optim.hessian``) every ``hessian_every``
  optimizer steps, under ``lax.cond`` inside the same jitted step;
* guards: an update is skipped (params and optimizer state untouched) when the loss or the
  gradient is non-finite, or when the loss is a spike: ``loss > mean + k * std`` of the last
  ``spike_window`` accepted losses. The guard's statistics live in the train state, so they
  are jit-safe and checkpointed;
* eval: val loss, perplexity and token accuracy (``losses.metrics``) on fixed val windows.

The whole state a run needs to continue (params, optimizer state, step counters, guard state,
RNG key) is one pytree, ``TrainState``; with the data iterator's position it is what
``checkpoint.py`` saves, and a resumed run continues bit-exactly.

Donation: the jitted step is ``jax.jit(step, donate_argnums=0)``: the old ``TrainState``'s
buffers are reused for the new one (no second copy of params + optimizer state), so the state
passed in must not be used again: always write ``state, metrics = step(state, batch)``.

Devices: ``put_batch`` and ``put_state`` are the only places where arrays are placed on
devices; ``make_train_step`` builds the step from a model graph and an optimizer. A sharded
run changes those three and nothing else.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_llm import losses
from jaxopt_llm._validation import check_choice, check_int, check_real
from jaxopt_llm.train import data, monitors
from jaxopt_llm.train.model import GPT, GPTConfig, MODEL_SIZES, generate, num_params
from jaxopt_llm.train.optimizers import (
    OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule, optimizer_names)

FUSED_CE_AUTO_VOCAB = 8192   # --fused-ce auto turns the fused loss on from this vocabulary


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
  """Every knob of a run. ``None`` means "the default for the chosen model/optimizer"."""
  # model
  model_size: str = "nano"             # nano | micro | tiny | small (see MODEL_SIZES)
  n_layer: Optional[int] = None        # override the size's layer count
  n_head: Optional[int] = None
  d_model: Optional[int] = None
  block_size: int = 64                 # context length
  tied_head: bool = True
  # optimization
  optimizer: str = "adamw"
  lr: Optional[float] = None           # peak lr; None = the optimizer recipe's
  weight_decay: Optional[float] = None  # None = the optimizer recipe's
  schedule: str = "warmup_cosine"
  warmup_steps: Optional[int] = None   # None = steps // 10
  min_lr_ratio: float = 0.1            # min_lr = min_lr_ratio * lr
  steps: int = 600                     # optimizer steps (each = accum micro-batches)
  batch_size: int = 32                 # sequences per micro-batch
  accum: int = 1                       # micro-batches per optimizer step (optax.MultiSteps)
  clip: float = 1.0                    # global-norm clip; 0 disables
  z_loss: float = 0.0
  fused_ce: str = "auto"               # auto | on | off
  hessian_every: int = 10              # Sophia: GNB estimate every k optimizer steps
  # guards
  spike_k: float = 6.0                 # skip when loss > mean + k*std; 0 disables
  spike_window: int = 64
  spike_min_history: int = 16          # the guard waits for this many accepted losses
  max_consecutive_skips: int = 25      # then accepts a (finite) loss anyway: a new level
  # evaluation, logging, checkpoints
  eval_every: int = 100                # optimizer steps; 0 = only at the end
  eval_windows: int = 256              # val windows of block_size tokens (fixed set)
  log_every: int = 10
  save_every: int = 0                  # 0 = only at the end (when there is an output dir)
  seed: int = 0
  sample_tokens: int = 240             # 0 = no sample
  sample_prompt: str = "The "

  def validate(self) -> None:
    owner = "TrainConfig"
    check_choice(owner, "model_size", self.model_size, tuple(MODEL_SIZES))
    check_choice(owner, "optimizer", self.optimizer, optimizer_names())
    check_choice(owner, "schedule", self.schedule, tuple(SCHEDULES))
    check_choice(owner, "fused_ce", self.fused_ce, ("auto", "on", "off"))
    for name in ("steps", "batch_size", "accum", "block_size", "hessian_every",
                 "spike_window", "eval_windows", "log_every"):
      check_int(owner, name, getattr(self, name), lo=1)
    for name in ("eval_every", "save_every", "spike_min_history", "max_consecutive_skips",
                 "seed", "sample_tokens"):
      check_int(owner, name, getattr(self, name), lo=0)
    for name in ("n_layer", "n_head", "d_model", "warmup_steps"):
      if getattr(self, name) is not None:
        check_int(owner, name, getattr(self, name), lo=0 if name == "warmup_steps" else 1)
    if self.warmup_steps is not None and self.warmup_steps > self.steps:
      raise ValueError(f"{owner}: `warmup_steps` ({self.warmup_steps}) must be <= `steps` "
                       f"({self.steps})")
    if self.lr is not None:
      check_real(owner, "lr", self.lr, lo=0.0, lo_open=True)
    if self.weight_decay is not None:
      check_real(owner, "weight_decay", self.weight_decay, lo=0.0)
    check_real(owner, "min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)
    check_real(owner, "clip", self.clip, lo=0.0)
    check_real(owner, "z_loss", self.z_loss, lo=0.0)
    check_real(owner, "spike_k", self.spike_k, lo=0.0)
    if not self.sample_prompt:
      raise ValueError(f"{owner}: `sample_prompt` must not be empty")
    self.model_config()  # d_model % n_head etc.

  def model_config(self) -> GPTConfig:
    overrides = {k: v for k, v in (("n_layer", self.n_layer), ("n_head", self.n_head),
                                   ("d_model", self.d_model)) if v is not None}
    return GPTConfig.from_size(self.model_size, vocab_size=data.VOCAB_SIZE,
                               block_size=self.block_size, tied_head=self.tied_head,
                               **overrides)

  @property
  def peak_lr(self) -> float:
    return OPTIMIZERS[self.optimizer].lr if self.lr is None else self.lr

  @property
  def warmup(self) -> int:
    return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Fields that may differ between a run and its resumption: they change when things are
# logged or saved, never the trajectory.
RESUMABLE_CHANGES = frozenset({"eval_every", "eval_windows", "log_every", "save_every",
                               "sample_tokens", "sample_prompt"})


# ---------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------

def fused_ce_available() -> bool:
  return hasattr(losses, "fused_linear_cross_entropy")


def use_fused_ce(mode: str, vocab_size: int) -> bool:
  """Resolves ``--fused-ce``: auto = on when ``vocab_size >= 8192`` and the loss exists."""
  check_choice("use_fused_ce", "mode", mode, ("auto", "on", "off"))
  if mode == "off":
    return False
  if not fused_ce_available():
    if mode == "on":
      raise ValueError("fused_ce='on' needs jaxopt_llm.losses.fused_linear_cross_entropy, "
                       "which this version of jaxopt_llm does not have")
    return False
  return mode == "on" or vocab_size >= FUSED_CE_AUTO_VOCAB


def lm_loss(model: GPT, tokens: jax.Array, *, z_loss: float = 0.0,
            fused: bool = False) -> jax.Array:
  """Mean next-token cross-entropy (+ ``z_loss * lse**2``) of ``tokens [B, T]``.

  ``fused=True`` computes it from the hidden states and the head kernel without building the
  ``[B*(T-1), V]`` logits (same value and gradients).
  """
  if not fused:
    return losses.causal_lm_loss(model(tokens), tokens, z_loss=z_loss)
  h = model.hidden(tokens)[:, :-1]
  return losses.fused_linear_cross_entropy(
      h.reshape(-1, h.shape[-1]), model.head_kernel(), tokens[:, 1:].reshape(-1),
      z_loss=z_loss)


# ---------------------------------------------------------------------------------------
# Train state and the loss-spike / non-finite guard
# ---------------------------------------------------------------------------------------

class GuardState(NamedTuple):
  history: jax.Array            # float32 [window] ring buffer of recent accepted losses
  count: jax.Array              # int32: accepted losses recorded so far
  consecutive: jax.Array        # int32: spikes skipped in a row
  skipped_nonfinite: jax.Array  # int32 totals, for the logs
  skipped_spike: jax.Array


def guard_init(window: int) -> GuardState:
  z = jnp.zeros((), jnp.int32)
  return GuardState(jnp.zeros((window,), jnp.float32), z, z, z, z)


def guard_threshold(g: GuardState, k: float, min_history: int) -> jax.Array:
  r"""``mean + k * std`` (unbiased) of the accepted losses in the window; +inf until
  ``min_history`` of them have been seen (and always when ``k == 0``)."""
  window = g.history.shape[0]
  n = jnp.minimum(g.count, window)
  valid = jnp.arange(window) < n
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, g.history, 0.0)) / nf
  var = jnp.sum(jnp.where(valid, jnp.square(g.history - mean), 0.0)) / jnp.maximum(nf - 1, 1)
  armed = (n >= max(min_history, 2)) & (k > 0)
  return jnp.where(armed, mean + k * jnp.sqrt(var), jnp.inf)


def guard_decide(g: GuardState, loss: jax.Array, grad_norm: jax.Array, *, k: float,
                 min_history: int, max_consecutive: int):
  """Returns ``(accept, nonfinite, spike, threshold)`` for this step's loss."""
  nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  threshold = guard_threshold(g, k, min_history)
  # After max_consecutive skipped spikes in a row the loss level itself has moved: accept.
  spike = ~nonfinite & (loss > threshold) & (g.consecutive < max_consecutive)
  return ~nonfinite & ~spike, nonfinite, spike, threshold


def guard_update(g: GuardState, loss: jax.Array, accept: jax.Array, nonfinite: jax.Array,
                 spike: jax.Array) -> GuardState:
  window = g.history.shape[0]
  history = jnp.where(accept, g.history.at[g.count % window].set(loss), g.history)
  return GuardState(
      history=history,
      count=g.count + accept.astype(jnp.int32),
      consecutive=jnp.where(spike, g.consecutive + 1, 0).astype(jnp.int32),
      skipped_nonfinite=g.skipped_nonfinite + nonfinite.astype(jnp.int32),
      skipped_spike=g.skipped_spike + spike.astype(jnp.int32))


class TrainState(NamedTuple):
  step: jax.Array       # int32: micro-batches processed (calls of the train step)
  opt_step: jax.Array   # int32: optimizer updates applied (what the schedule counts)
  params: Any
  opt_state: Any
  guard: GuardState
  rng: jax.Array        # uint32[2]: key for Sophia's sampled labels (split every step)


def init_state(params: Any, tx: optax.GradientTransformation, cfg: TrainConfig,
               seed: Any = None) -> TrainState:
  """The state before step 0. Call it under ``jax.jit`` (as ``build_program`` does): then
  every leaf is its own buffer, which donating the state to the train step requires."""
  seed = cfg.seed if seed is None else seed
  return TrainState(
      step=jnp.zeros((), jnp.int32), opt_step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(params), guard=guard_init(cfg.spike_window),
      rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def put_state(state: TrainState) -> TrainState:
  """Places the state on the device(s): the one place a sharded run changes."""
  return jax.device_put(state)


def put_batch(batch: np.ndarray) -> jax.Array:
  """Places a host batch ``[B, T]`` on the device(s): the one place a sharded run changes."""
  return jax.device_put(batch)


# ---------------------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------------------

def _emits(opt_state: Any, accum: int) -> jax.Array:
  """True when this micro-step completes an optimizer step (always, without accumulation)."""
  if accum == 1:
    return jnp.asarray(True)
  return opt_state.mini_step == accum - 1


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: TrainConfig, *, uses_hessian: bool = False,
                    fused: bool = False, jit: bool = True
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """Builds ``step(state, tokens) -> (state, metrics)``, jitted with the state donated.

  One call processes one micro-batch ``tokens [B, T]``: loss and gradient, the guard's
  verdict, and (if accepted) ``tx.update`` + ``apply_updates``. ``metrics`` holds scalars:
  loss, grad_norm (before clipping), lr (the one this update used), accepted, nonfinite,
  spike, threshold and the Sophia ``estimated`` flag.
  """
  loss_kwargs = dict(z_loss=cfg.z_loss, fused=fused)

  def loss_fn(params, tokens):
    return lm_loss(nnx.merge(graphdef, params), tokens, **loss_kwargs)

  def optimizer_update(grads, opt_state, params, tokens, key, estimate):
    if not uses_hessian:
      return tx.update(grads, opt_state, params)
    from jaxopt_llm.optim import hessian

    def with_estimate():
      logits_fn = lambda p: nnx.merge(graphdef, p)(tokens)[:, :-1]  # noqa: E731
      h = hessian.gauss_newton_bartlett(logits_fn, params, key)
      return tx.update(grads, opt_state, params, hessian=h)

    def without_estimate():
      return tx.update(grads, opt_state, params)

    # Only the taken branch runs: the other k-1 steps pay nothing for the estimator.
    return jax.lax.cond(estimate, with_estimate, without_estimate)

  def step(state: TrainState, tokens: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
    grad_norm = monitors.global_norm(grads)
    accept, nonfinite, spike, threshold = guard_decide(
        state.guard, loss, grad_norm, k=cfg.spike_k, min_history=cfg.spike_min_history,
        max_consecutive=cfg.max_consecutive_skips)
    emit = _emits(state.opt_state, cfg.accum)
    # The estimate must land on a micro-step that completes an optimizer step: MultiSteps
    # discards the inner update (and with it the Hessian EMA) on the others.
    estimate = emit & (state.opt_step % cfg.hessian_every == 0)  # hessian.is_estimate_step
    rng, key = jax.random.split(state.rng)

    def apply(_):
      updates, opt_state = optimizer_update(grads, state.opt_state, state.params, tokens,
                                            key, estimate)
      return optax.apply_updates(state.params, updates), opt_state

    def skip(_):
      return state.params, state.opt_state

    params, opt_state = jax.lax.cond(accept, apply, skip, None)
    new_state = TrainState(
        step=state.step + 1,
        opt_step=state.opt_step + (accept & emit).astype(jnp.int32),
        params=params, opt_state=opt_state,
        guard=guard_update(state.guard, loss, accept, nonfinite, spike), rng=rng)
    metrics = dict(loss=loss, grad_norm=grad_norm,
                   lr=monitors.schedule_value(schedule, state.opt_step), accepted=accept,
                   nonfinite=nonfinite, spike=spike, threshold=threshold,
                   estimated=accept & estimate if uses_hessian else jnp.asarray(False))
    return new_state, metrics

  return jax.jit(step, donate_argnums=0) if jit else step


@functools.partial(jax.jit, static_argnums=0)
def _monitor(graphdef, state: TrainState) -> dict:
  del graphdef  # static: one compilation per model
  return monitors.monitor(state.params, state.opt_state)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(graphdef, params, batches, valid):
  """Summed next-token CE and correct predictions over ``batches [n, b, T]``; ``valid [n, b]``
  marks real windows (the last batch is padded to full size)."""
  model = nnx.merge(graphdef, params)

  def one(args):
    x, ok = args
    logits = model(x)
    where = jnp.broadcast_to(ok[:, None], x.shape)
    total = losses.causal_lm_loss(logits, x, reduction="sum", where=where)
    count = jnp.sum(where[:, 1:], dtype=jnp.float32)
    acc = losses.token_accuracy(logits[:, :-1], x[:, 1:], where=where[:, 1:])
    return total, acc * count

  totals, hits = jax.lax.map(one, (batches, valid))
  return jnp.sum(totals), jnp.sum(hits)


def make_eval_fn(graphdef: nnx.GraphDef, batch_size: int = 64
                 ) -> Callable[[Any, np.ndarray], dict]:
  """``eval(params, windows [n, T]) -> {val_loss, val_ppl, val_acc}`` over all windows.

  ``val_loss`` is the token-weighted mean next-token cross-entropy (nats), ``val_ppl =
  exp(val_loss)`` (equal to ``losses.perplexity`` on the concatenated windows) and
  ``val_acc`` the ``losses.token_accuracy`` of the argmax prediction. The windows go through
  the model in batches of ``batch_size`` (``lax.map`` inside one jit); the last batch is
  padded and the padding masked out with the losses' ``where``, so no window is dropped and
  there is one compilation per model and window count.
  """

  def evaluate(params, windows: np.ndarray) -> dict:
    windows = np.asarray(windows, np.int32)
    n, t = windows.shape
    b = min(batch_size, n)
    nb = -(-n // b)
    padded = np.zeros((nb * b, t), np.int32)
    padded[:n] = windows
    valid = np.arange(nb * b) < n
    total, hits = _eval_sums(graphdef, params, put_batch(padded.reshape(nb, b, t)),
                             put_batch(valid.reshape(nb, b)))
    count = n * (t - 1)
    val_loss = float(total) / count
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_acc": float(hits) / count}

  return evaluate


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

class Program(NamedTuple):
  """Everything compiled for a config: model graph, optimizer, schedule, init and step."""
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[int], TrainState]      # seed -> initial state (jitted)
  step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
  uses_hessian: bool
  fused: bool


# Fields that do not enter the compiled program (logging, sampling, the seed: the seed only
# changes the initial values and the batch order).
_NOT_IN_PROGRAM = frozenset({"eval_every", "eval_windows", "log_every", "save_every", "seed",
                             "sample_tokens", "sample_prompt"})


def build_program(cfg: TrainConfig) -> Program:
  """The compiled pieces for ``cfg``, cached: runs in one process that differ only in
  logging, sampling or seed (tests, notebooks, resumption) compile once."""
  cfg.validate()
  key = tuple(sorted((k, v) for k, v in cfg.to_dict().items() if k not in _NOT_IN_PROGRAM))
  return _build_program(key)


@functools.lru_cache(maxsize=8)
def _build_program(key: tuple) -> Program:
  cfg = TrainConfig(**dict(key))
  mcfg = cfg.model_config()
  peak = cfg.peak_lr
  schedule = build_schedule(cfg.schedule, peak, cfg.warmup, cfg.steps,
                            min_lr=cfg.min_lr_ratio * peak)
  tx = build_optimizer(cfg.optimizer, schedule, cfg.weight_decay, clip=cfg.clip,
                       accum=cfg.accum)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(mcfg, nnx.Rngs(0))))
  init_opt = jax.jit(lambda params, seed: init_state(params, tx, cfg, seed=seed))

  def init(seed: int) -> TrainState:
    # Copies: the step donates the state, and the initial params are cached per model.
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), initial_params(mcfg, seed))
    return init_opt(params, jnp.int32(seed))

  uses_hessian = OPTIMIZERS[cfg.optimizer].uses_hessian
  fused = use_fused_ce(cfg.fused_ce, mcfg.vocab_size)
  step = make_train_step(graphdef, tx, schedule, cfg, uses_hessian=uses_hessian, fused=fused)
  return Program(graphdef, tx, schedule, init, step, uses_hessian, fused)


def initial_params(mcfg: GPTConfig, seed: int) -> dict:
  """The model's initial parameters (a pure dict) for ``nnx.Rngs(jax.random.key(seed))``."""
  return _initial_params(mcfg, jnp.int32(seed))


@functools.partial(jax.jit, static_argnums=0)
def _initial_params(mcfg, seed):
  # One jit for all initialisers (one compilation per model shape): run eagerly, each
  # would be compiled on its own.
  return nnx.to_pure_dict(nnx.state(GPT(mcfg, nnx.Rngs(jax.random.key(seed)))))


@dataclasses.dataclass
class TrainResult:
  summary: dict
  history: list            # every record written to metrics.jsonl (train, eval, summary)
  state: TrainState
  graphdef: nnx.GraphDef


def _to_host(tree) -> dict:
  return {k: (v.item() if hasattr(v, "item") else v) for k, v in jax.device_get(tree).items()}


def train(cfg: TrainConfig, *, out_dir: Optional[str] = None, resume: bool = False,
          progress: bool = True, log: Optional[Callable[[str], None]] = None,
          stop_after: Optional[int] = None) -> TrainResult:
  """Trains ``cfg``; writes ``metrics.jsonl``, ``loss_curve.png`` and checkpoints to ``out_dir``.

  ``resume=True`` continues from the latest checkpoint in ``out_dir/checkpoints`` (an error if
  there is none, or if it was written with a different config). ``stop_after`` ends the run
  after that many optimizer steps (with a checkpoint, as if interrupted): the rest of the
  schedule still refers to ``cfg.steps``.
  """
  t_start = time.perf_counter()
  log = log or functools.partial(print, flush=True)
  prog = build_program(cfg)
  graphdef, step_fn, mcfg = prog.graphdef, prog.step, cfg.model_config()
  train_ids, val_ids = data.train_val_split(data.encode(data.load_corpus()))
  corpus = data.corpus_summary(train_ids, val_ids)
  batches = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  val_windows = data.eval_windows(val_ids, cfg.block_size, cfg.eval_windows)
  evaluate = make_eval_fn(graphdef)

  ckpt = None
  history: list[dict] = []
  metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    from jaxopt_llm.train.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"))
  if resume:
    if ckpt is None or ckpt.latest_step() is None:
      raise ValueError(f"resume: no checkpoint found in {out_dir!r}/checkpoints")
    _check_resumable(ckpt.extra()["config"], cfg)  # before reading arrays of another shape
  state = put_state(prog.init(cfg.seed))
  if resume:
    state, extra = ckpt.restore(state)
    batches.restore(extra["data"])
    done = int(state.step) // cfg.accum
    history = [r for r in _read_jsonl(metrics_path)
               if r["step"] <= done and r["kind"] != "summary"]
  elif ckpt is not None and ckpt.latest_step() is not None:
    ckpt.clear()
  _write_jsonl(metrics_path, history)

  start = int(state.step) // cfg.accum
  end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
  log(f"model: {num_params(state.params):,} parameters ({mcfg.n_layer} layers, d={mcfg.d_model}"
      f", {mcfg.n_head} heads, context {mcfg.block_size}); optimizer {cfg.optimizer} "
      f"(peak lr {cfg.peak_lr:g}), schedule {cfg.schedule}, {cfg.steps} steps of "
      f"{cfg.batch_size * cfg.accum} x {cfg.block_size} tokens"
      + (f"; resuming at step {start}" if resume else ""))
  log(f"corpus: {corpus['train_tokens']:,} train / {corpus['val_tokens']:,} val bytes; "
      f"unigram entropy {corpus['unigram_entropy']:.3f} nats")

  def record(rec: dict) -> None:
    history.append(rec)
    _append_jsonl(metrics_path, rec)

  def run_eval(it: int) -> dict:
    rec = {"kind": "eval", "step": it, **evaluate(state.params, val_windows)}
    record(rec)
    elapsed = time.perf_counter() - t_start
    bar.write(f"step {it:5d}: val loss {rec['val_loss']:.3f}, perplexity {rec['val_ppl']:.2f},"
              f" token accuracy {100 * rec['val_acc']:.1f}%  ({elapsed:.0f} s)")
    return rec

  bar = _progress_bar(end, start, progress and end > start, log)
  postfix: dict = {}
  last_eval = None
  window_losses: list[float] = []
  evals = [r for r in history if r["kind"] == "eval"]
  if evals and evals[-1]["step"] == start:
    last_eval = evals[-1]  # resumed where the previous run had evaluated
  elif start == 0 and cfg.eval_every:
    last_eval = run_eval(0)  # the curve starts at the initial loss (~log 256)
  t_loop = time.perf_counter()
  try:
    for it in range(start, end):
      for _ in range(cfg.accum):
        state, m = step_fn(state, put_batch(next(batches)))
        window_losses.append(m)
      done = it + 1
      if done % cfg.log_every == 0 or done == end:
        ms = [_to_host(x) for x in window_losses]
        window_losses = []
        finite = [x["loss"] for x in ms if np.isfinite(x["loss"])]
        rec = {"kind": "train", "step": done,
               "loss": float(np.mean(finite)) if finite else float("nan"),
               "lr": ms[-1]["lr"], "grad_norm": ms[-1]["grad_norm"],
               "skipped_nonfinite": sum(int(x["nonfinite"]) for x in ms),
               "skipped_spike": sum(int(x["spike"]) for x in ms),
               "tokens": done * cfg.accum * cfg.batch_size * cfg.block_size,
               "time_s": time.perf_counter() - t_start}
        rec.update(_to_host(_monitor(graphdef, state)))
        record(rec)
        postfix.update(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}")
        bar.set_postfix(postfix, refresh=False)
      if cfg.eval_every and done % cfg.eval_every == 0 and done != end:
        last_eval = run_eval(done)
        postfix["val"] = f"{last_eval['val_loss']:.3f}"
        bar.set_postfix(postfix, refresh=False)
      if ckpt is not None and cfg.save_every and done % cfg.save_every == 0 and done != end:
        ckpt.save(state, {"data": batches.state(), "config": cfg.to_dict()})
      bar.update(1)
  finally:
    bar.close()
  train_time = time.perf_counter() - t_loop

  if not (last_eval and last_eval["step"] == end):
    last_eval = run_eval(end)
  if ckpt is not None:
    ckpt.save(state, {"data": batches.state(), "config": cfg.to_dict()})
    ckpt.close()
  sample = ""
  if end == cfg.steps and cfg.sample_tokens:
    prompt = data.encode(cfg.sample_prompt)[-mcfg.block_size:]
    new = generate(graphdef, state.params, prompt, cfg.sample_tokens,
                   jax.random.PRNGKey(cfg.seed + 7), temperature=0.8, top_k=None)
    sample = cfg.sample_prompt + data.decode(np.asarray(new))
  guard = jax.device_get(state.guard)
  summary = {
      "kind": "summary", "step": end, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
      "params": num_params(state.params), **{k: last_eval[k] for k in
                                              ("val_loss", "val_ppl", "val_acc")},
      "unigram_entropy": corpus["unigram_entropy"],
      "below_unigram": corpus["unigram_entropy"] - last_eval["val_loss"],
      "skipped_nonfinite": int(guard.skipped_nonfinite),
      "skipped_spike": int(guard.skipped_spike), "fused_ce": prog.fused,
      "train_time_s": train_time, "time_s": time.perf_counter() - t_start,
      "tokens_per_s": (end - start) * cfg.accum * cfg.batch_size * cfg.block_size
      / max(train_time, 1e-9),
      "sample": sample,
  }
  record(summary)
  if out_dir:
    from jaxopt_llm.train.plots import plot_run
    plot_run(history, os.path.join(out_dir, "loss_curve.png"),
             title=f"{cfg.optimizer} / {cfg.schedule}",
             baseline=corpus["unigram_entropy"])
  return TrainResult(summary, history, state, graphdef)


def format_summary(s: dict) -> str:
  """The end-of-run report: val loss vs the unigram entropy, perplexity, accuracy, time."""
  gap = s["below_unigram"]
  lines = [
      f"val loss   {s['val_loss']:.3f} nats/byte: {abs(gap):.3f} "
      f"{'below' if gap >= 0 else 'ABOVE'} the unigram entropy {s['unigram_entropy']:.3f} "
      f"(a model that ignores context)",
      f"perplexity {s['val_ppl']:.2f}   token accuracy {100 * s['val_acc']:.1f}%",
      f"time       {s['time_s']:.1f} s  ({s['step']} steps, {s['tokens_per_s']:,.0f} tokens/s;"
      f" skipped: {s['skipped_nonfinite']} non-finite, {s['skipped_spike']} spikes)",
  ]
  if s.get("sample"):
    lines.append("sample     " + repr(s["sample"]))
  return "\n".join(lines)


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
  now = cfg.to_dict()
  diff = sorted(k for k in set(saved) | set(now)
                if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
  if diff:
    detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
    raise ValueError(f"resume: the checkpoint was written with a different config ({detail})")


def _progress_bar(total: int, initial: int, enabled: bool, log: Callable[[str], None]):
  """tqdm on a terminal (``disable=None``: off when stderr is not a tty), else log lines."""
  if enabled:
    try:
      from tqdm.auto import tqdm
      bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                 disable=None)
      if not bar.disable:
        return bar
      bar.close()
    except ImportError:
      pass

  class _Null:
    def set_postfix(self, *a, **k):
      pass

    def write(self, text):
      log(text)

    def update(self, n=1):
      pass

    def close(self):
      pass
  return _Null()


def _read_jsonl(path: Optional[str]) -> list[dict]:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Optional[str], records: list[dict]) -> None:
  if path:
    with open(path, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")


def _append_jsonl(path: Optional[str], rec: dict) -> None:
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(rec) + "\n")
