"""The jitted pieces of a run: train state, train step, monitors, evaluation, ``build_program``.

``prog = build_program(cfg); state = prog.init(seed); state, metrics = prog.step(state, batch)``
(``batch``: int32 ``[batch_size, block_size]``) is the public way to drive one step.

One step is::

  loss, grads = value_and_grad(lm_loss)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params, loss=loss)  # (+ hessian= for Sophia)
  params = params + updates

with ``tx`` from ``train.optimizers.build`` (guard -> [accumulation] -> clip -> optimizer, the
schedule inside the optimizer). The guard (``optim.guards.skip_spikes``) returns zero updates
on a skipped step; its counters tell the step's metrics what happened. Sophia's
Gauss-Newton-Bartlett estimate comes from ``optim.hessian.update_every_k`` (a ``lax.cond``:
the other steps pay nothing for it); with the fused loss it is
``hessian.gauss_newton_bartlett_fused``, which does not build the logits either. The state is
donated: write ``state, m = step(state, b)``.

Monitors (param and optimizer-state norms, Sophia's win rate) are a separate jitted function,
``prog.monitor(state)``, which the loop calls on logging steps only.

Devices: with ``cfg.shard`` in ``replicated | zero1 | fsdp`` the program runs data-parallel
over every device (of every process) with ``jaxopt_llm.parallel``'s sharding plan: the step
is jitted with the plan's shardings, ``prog.put_batch`` turns the global host batch into a
sharded array (each process feeds its own slice), everything else is unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_llm import losses, parallel
from jaxopt_llm.optim import guards, hessian
from jaxopt_llm.train import monitors
from jaxopt_llm.train.config import TrainConfig
from jaxopt_llm.train.model import GPT, mixed_dot_supported
from jaxopt_llm.train.optimizers import OPTIMIZERS, build

FUSED_CE_AUTO_VOCAB = 8192   # fused_ce="auto" turns the fused loss on from this vocabulary


def use_fused_ce(mode: str, vocab_size: int) -> bool:
  """Resolves ``fused_ce``: ``auto`` = on when ``vocab_size >= 8192``."""
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"use_fused_ce: `mode` must be one of ('auto', 'on', 'off'), got {mode!r}")
  return mode == "on" or (mode == "auto" and vocab_size >= FUSED_CE_AUTO_VOCAB)


def lm_loss(model: GPT, tokens: jax.Array, *, z_loss: float = 0.0,
            fused: bool = False) -> jax.Array:
  """Mean next-token cross-entropy (+ ``z_loss * lse**2``) of ``tokens [B, T]``.

  ``fused=True`` computes it from the hidden states and the head kernel without building the
  ``[B*(T-1), V]`` logits (same value and gradients).
  """
  if not fused:
    return losses.causal_lm_loss(model(tokens), tokens, z_loss=z_loss)
  h, kernel = lm_head_inputs(model, tokens)
  return losses.fused_linear_cross_entropy(
      h.reshape(-1, h.shape[-1]), kernel, tokens[:, 1:].reshape(-1), z_loss=z_loss)


def lm_head_inputs(model: GPT, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(hidden [B, T-1, d], kernel [d, V])``: the LM head's input at the positions that
  predict a next token, and its kernel, in the dtype the head's product runs in (bf16
  operands for ``compute_dtype="bfloat16"``, float32 accumulation). The fused loss and
  Sophia's fused Hessian estimate both start from them."""
  h = model.hidden(tokens)[:, :-1]
  kernel = model.head_kernel()
  if model.cfg.compute_dtype != "float32":  # bf16 products, float32 accumulation and loss
    h, kernel = h.astype(model.cfg.compute_dtype), kernel.astype(model.cfg.compute_dtype)
    if not mixed_dot_supported():  # the same numbers: float32 products of rounded operands
      h, kernel = h.astype(jnp.float32), kernel.astype(jnp.float32)
  return h, kernel


class TrainState(NamedTuple):
  step: jax.Array       # int32: micro-batches processed (calls of the train step)
  opt_step: jax.Array   # int32: optimizer updates applied (what the schedule counts)
  params: Any
  opt_state: guards.SkipSpikesState  # the guard's state, the optimizer's inside
  rng: jax.Array        # uint32[2]: key for Sophia's sampled labels (split every step)

  @property
  def guard(self) -> guards.SkipSpikesState:
    return self.opt_state


def _mini_step(guard_state: guards.SkipSpikesState, accum: int) -> jax.Array:
  """The accumulation position of this micro-step (0 without accumulation)."""
  if accum == 1:
    return jnp.zeros((), jnp.int32)
  return guard_state.inner_state.mini_step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformationExtraArgs,
                    schedule: optax.Schedule, cfg: TrainConfig, *, fused: bool = False,
                    plan: Optional[parallel.ShardingPlan] = None
                    ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """``step(state, tokens) -> (state, metrics)``, not jitted (``build_program`` jits it).

  ``metrics``: loss, grad_norm (before clipping), lr (the one this update used), accepted,
  nonfinite, spike, threshold (the guard's), estimated (Sophia took a Hessian estimate).
  """
  uses_hessian = OPTIMIZERS[cfg.optimizer].uses_hessian
  k, accum = cfg.hessian_every, cfg.accum

  def loss_fn(params, tokens):
    return lm_loss(nnx.merge(graphdef, params), tokens, z_loss=cfg.z_loss, fused=fused)

  def step(state: TrainState, tokens: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
    if plan is not None:  # ZeRO-1: reduce-scatter the gradient into the state's layout
      grads = jax.lax.with_sharding_constraint(grads, plan.grads)
    rng, key = jax.random.split(state.rng)
    mini = _mini_step(state.opt_state, accum)
    if uses_hessian:
      def estimate_fn(p):
        if fused:  # from the hidden states and the head kernel: never the [B*T, V] logits
          return hessian.gauss_newton_bartlett_fused(
              lambda q: lm_head_inputs(nnx.merge(graphdef, q), tokens), p, key)
        return hessian.gauss_newton_bartlett(
            lambda q: nnx.merge(graphdef, q)(tokens)[:, :-1], p, key)
      # update_every_k estimates when `count % (k * accum) == 0`: exactly on the micro-step
      # that applies optimizer step `opt_step` with `opt_step % k == 0` (MultiSteps
      # discards the inner update, and with it an estimate, on the other micro-steps).
      count = state.opt_step * accum + (accum - 1 - mini)
      updates, opt_state = hessian.update_every_k(
          tx, grads, state.opt_state, state.params, step=count, estimate_fn=estimate_fn,
          k=k * accum, loss=loss)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=loss)
    params = optax.apply_updates(state.params, updates)

    old, new = state.opt_state, opt_state
    nonfinite = new.skipped_nonfinite > old.skipped_nonfinite
    spike = new.skipped_spike > old.skipped_spike
    accepted = ~(nonfinite | spike)
    applied = accepted & (mini == accum - 1)
    new_state = TrainState(step=state.step + 1,
                           opt_step=state.opt_step + applied.astype(jnp.int32),
                           params=params, opt_state=opt_state, rng=rng)
    metrics = dict(
        loss=loss, grad_norm=monitors.global_norm(grads),
        lr=monitors.schedule_value(schedule, state.opt_step), accepted=accepted,
        nonfinite=nonfinite, spike=spike,
        threshold=guards.spike_threshold(old, cfg.spike_k, cfg.spike_min_history),
        estimated=applied & (state.opt_step % k == 0) if uses_hessian
        else jnp.asarray(False))
    return new_state, metrics

  return step


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


def make_eval_fn(graphdef: nnx.GraphDef, batch_size: int = 64,
                 put: Callable[[np.ndarray], jax.Array] = jnp.asarray
                 ) -> Callable[[Any, np.ndarray], dict]:
  """``eval(params, windows [n, T]) -> {val_loss, val_ppl, val_acc}`` over all windows.

  ``val_loss`` is the token-weighted mean next-token cross-entropy (nats), ``val_ppl =
  exp(val_loss)`` (equal to ``losses.perplexity`` on the concatenated windows) and
  ``val_acc`` the ``losses.token_accuracy`` of the argmax prediction. The windows go through
  the model in batches of ``batch_size`` (``lax.map`` inside one jit); the last batch is
  padded and the padding masked out with the losses' ``where``, so no window is dropped.
  ``put`` places the host arrays (replicated on every device of a sharded run).
  """

  def evaluate(params, windows: np.ndarray) -> dict:
    windows = np.asarray(windows, np.int32)
    n, t = windows.shape
    b = min(batch_size, n)
    nb = -(-n // b)
    padded = np.zeros((nb * b, t), np.int32)
    padded[:n] = windows
    valid = np.arange(nb * b) < n
    total, hits = _eval_sums(graphdef, params, put(padded.reshape(nb, b, t)),
                             put(valid.reshape(nb, b)))
    count = n * (t - 1)
    val_loss = float(total) / count
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "val_acc": float(hits) / count}

  return evaluate


class Program(NamedTuple):
  """Everything compiled for a config."""
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformationExtraArgs
  schedule: optax.Schedule
  init: Callable[[int], TrainState]      # seed -> initial state (jitted, placed)
  step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]  # jitted, state donated
  monitor: Callable[[TrainState], dict]  # param / optimizer-state norms, Sophia's stats
  evaluate: Callable[[Any, np.ndarray], dict]
  put_batch: Callable[[np.ndarray], jax.Array]  # global host batch -> (sharded) device array
  plan: Optional[parallel.ShardingPlan]  # None on one device
  fused: bool


# Fields that do not enter the compiled program (logging, sampling, the seed: the seed only
# changes the initial values and the batch order; how processes find each other; the data
# files). The tokenizer enters as its vocabulary size only (``_VOCAB``), read when the program
# is looked up: an edited tokenizer file with another vocabulary gets another program.
_NOT_IN_PROGRAM = frozenset({"eval_every", "eval_windows", "log_every", "save_every", "seed",
                             "sample_tokens", "sample_prompt", "coordinator_address",
                             "process_id", "tensorboard", "wandb", "data", "tokenizer"})
_VOCAB = "<vocab_size>"


def build_program(cfg: TrainConfig, *, cached: bool = True) -> Program:
  """The compiled pieces for ``cfg``, cached: runs in one process that differ only in
  logging, sampling or seed (tests, notebooks, resumption) compile once. ``cached=False``
  builds new objects (a new optimizer, newly compiled functions)."""
  cfg.validate()
  key = tuple(sorted((k, v) for k, v in cfg.to_dict().items() if k not in _NOT_IN_PROGRAM))
  key += ((_VOCAB, cfg.model_config().vocab_size),)
  return _build_program(key) if cached else _build_program.__wrapped__(key)


@functools.lru_cache(maxsize=16)
def _build_program(key: tuple) -> Program:
  fields = dict(key)
  vocab_size = fields.pop(_VOCAB)
  cfg = TrainConfig(**fields)
  mcfg = dataclasses.replace(cfg.model_config(), vocab_size=vocab_size)
  schedule, tx = build(cfg)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPT(mcfg, nnx.Rngs(0))))
  fused = use_fused_ce(cfg.fused_ce, mcfg.vocab_size)

  def init_state(seed: jax.Array) -> TrainState:
    params = nnx.to_pure_dict(nnx.state(GPT(mcfg, nnx.Rngs(jax.random.key(seed)))))
    return TrainState(step=jnp.zeros((), jnp.int32), opt_step=jnp.zeros((), jnp.int32),
                      params=params, opt_state=tx.init(params),
                      rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))

  plan = None
  if cfg.shard == "none":
    state_sh = metric_sh = None
    put_batch = put_replicated = jnp.asarray
  else:
    mesh = parallel.make_mesh()
    abstract = jax.eval_shape(init_state, jnp.int32(0))
    plan = parallel.plan_shardings(tx, abstract.params, mesh, cfg.shard)
    state_sh, metric_sh = parallel.train_state_shardings(abstract, plan), plan.replicated

    def put_batch(batch: np.ndarray) -> jax.Array:
      return parallel.shard_batch(parallel.process_local_slice(np.asarray(batch), mesh), mesh)

    def put_replicated(x: np.ndarray) -> jax.Array:
      return jax.make_array_from_process_local_data(plan.replicated, np.asarray(x))

  step = make_train_step(graphdef, tx, schedule, cfg, fused=fused, plan=plan)

  def placed(**shardings) -> dict:  # jit's sharding arguments, in a sharded run only
    return {} if plan is None else shardings

  # A jit's outputs are fresh buffers, so the initial state is safe to donate to the step.
  init = jax.jit(init_state, **placed(out_shardings=state_sh))
  return Program(
      graphdef=graphdef, tx=tx, schedule=schedule,
      init=lambda seed: init(jnp.int32(seed)),
      step=jax.jit(step, donate_argnums=0,
                   **placed(in_shardings=(state_sh, plan.batch if plan else None),
                            out_shardings=(state_sh, metric_sh))),
      monitor=jax.jit(lambda s: monitors.monitor(s.params, s.opt_state.inner_state),
                      **placed(out_shardings=metric_sh)),
      evaluate=make_eval_fn(graphdef, put=put_replicated), put_batch=put_batch, plan=plan,
      fused=fused)
