"""``train(cfg)``: the training loop, nanoGPT's ``train.py`` in shape. Read it top to bottom.

The config is ``train/config.py`` (``TrainConfig``); the learning rate goes
``cfg.lr -> optimizers.build_schedule -> the optimizer`` (``train/optimizers.py``); the jitted
step, monitors and evaluation are ``train/step.py`` (``build_program``); the tokens come from
``data.load_dataset``; records go to ``writers.MetricWriter`` (``metrics.jsonl``, TensorBoard,
W&B, the loss curve). This file only loops: batches in, metrics out, evaluation / checkpoints /
the end-of-run summary.

The output folder (``out_dir``) follows ``train/run_dir.py``'s rules: one run at a time (a
lock), a fresh run never replaces an earlier one's checkpoints unless ``overwrite``, a
checkpoint every ``cfg.resolved_save_every()`` steps and one on SIGTERM / SIGINT (then
``TrainingInterrupted``: exit code 143 / 130), and ``resume`` continues from the newest
checkpoint whose checksums verify (``train/checkpoint.py``).

Many processes (``cfg.num_processes > 1``, or a launcher's environment): ``train`` first calls
``parallel.initialize_distributed``; every process then runs this same loop on the same global
batches (each feeds its own slice), every process takes part in checkpoints (Orbax
coordinates), and process 0 alone holds the folder's lock and writes ``metrics.jsonl``,
``config.json``, the plot and the log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import time
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxopt_llm import parallel
from jaxopt_llm.train import data, run_dir, writers
from jaxopt_llm.train.config import TrainConfig, check_resumable
from jaxopt_llm.train.model import generate, num_params
from jaxopt_llm.train.run_dir import RunDirError, TrainingInterrupted
from jaxopt_llm.train.step import TrainState, build_program


@dataclasses.dataclass
class TrainResult:
  summary: dict
  history: list            # every record written to metrics.jsonl (train, eval, summary)
  state: TrainState
  graphdef: nnx.GraphDef


def train(cfg: TrainConfig, *, out_dir: Optional[str] = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True,
          log: Optional[Callable[[str], None]] = None,
          stop_after: Optional[int] = None) -> TrainResult:
  """Trains ``cfg``; writes checkpoints, ``metrics.jsonl``, ``config.json``, TensorBoard
  events and ``loss_curve.png`` to ``out_dir``.

  ``resume=True`` continues from the newest intact checkpoint in ``out_dir/checkpoints``
  (damaged newer ones are skipped, in one line); an error if there is none, or if it was
  written with a config that gives another trajectory. Without ``resume``, a folder holding
  an earlier run is refused (``RunDirError``) unless ``overwrite=True``, which deletes that
  run's outputs first. ``stop_after`` ends the run after that many optimizer steps (with a
  checkpoint, as if interrupted): the rest of the schedule still refers to ``cfg.steps``.
  SIGTERM / SIGINT: the step finishes, a checkpoint is saved, ``TrainingInterrupted``.
  """
  parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  lead = jax.process_index() == 0
  log = (log or functools.partial(print, flush=True)) if lead else (lambda text: None)
  with contextlib.ExitStack() as stack:  # closed in reverse: bar, writer, checkpoints, lock
    stack.enter_context(run_dir.claim(out_dir, resume=resume, overwrite=overwrite, log=log))
    signals = stack.enter_context(run_dir.StopSignals(enabled=out_dir is not None, log=log))
    return _run(cfg, out_dir, resume, progress, log, stop_after, signals, stack)


# What a checkpoint remembers of its tokens. All are computed from the content (the cache key
# also covers mtimes, which a copy or a `touch` changes), so an edited file is caught and a
# touched one is not.
DATA_IDENTITY = ("train_tokens", "val_tokens", "unigram_entropy", "vocab_size",
                 "tokenizer_sha256")


def data_identity(summary: dict) -> dict:
  return {k: summary.get(k) for k in DATA_IDENTITY}


def check_same_data(saved: Optional[dict], now: dict) -> None:
  """RunDirError naming what differs when the data resumed on is not the checkpoint's
  (checkpoints written before this check carry none: nothing to compare)."""
  if saved is None:
    return
  diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in DATA_IDENTITY
          if saved.get(k) != now.get(k)]
  if diff:
    raise RunDirError("resume: the data or tokenizer changed since the checkpoint ("
                      + ", ".join(diff) + "); restore them, or start a new run")


def _run(cfg: TrainConfig, out_dir: Optional[str], resume: bool, progress: bool,
         log: Callable[[str], None], stop_after: Optional[int],
         signals: run_dir.StopSignals, stack: contextlib.ExitStack) -> TrainResult:
  t_start = time.perf_counter()
  lead = jax.process_index() == 0
  prog = build_program(cfg)

  # Resume from the newest intact checkpoint (checked first: a refusal costs nothing), or
  # start fresh.
  ckpt, last_eval = None, None
  if out_dir:
    from jaxopt_llm.train.checkpoint import Checkpointer
    ckpt = stack.enter_context(contextlib.closing(
        Checkpointer(os.path.join(out_dir, run_dir.CHECKPOINTS))))
  if resume:
    step = ckpt.latest_intact_step(log, set_aside=True) if ckpt else None
    if step is None:
      raise RunDirError(f"resume: no checkpoint found in {out_dir!r}" if out_dir
                        else "resume: give the output folder (`out_dir`) to resume from")
    saved = ckpt.extra(step)["config"]
    check_resumable(saved, cfg, done=step // saved.get("accum", 1))
  ds = _load_dataset(cfg, out_dir, log)
  batches = data.BatchIterator(ds.train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  val_windows = data.eval_windows(ds.val_ids, cfg.block_size, cfg.eval_windows)
  state = prog.init(cfg.seed)
  if resume:
    state, extra = ckpt.restore(state, step, verify=False)  # verified just above
    check_same_data(extra.get("data_identity"), data_identity(ds.summary))
    batches.restore(extra["data"])
    last_eval = extra.get("last_eval")  # in the checkpoint: every process must agree on it
  start = int(state.step) // cfg.accum
  end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
  if out_dir and lead:
    writers.write_run_config(out_dir, cfg, dataset_summary=ds.summary,
                             resumed_at=start if resume else None)
  writer = stack.enter_context(writers.MetricWriter(
      out_dir, cfg, resume=resume, resume_step=start if resume else None, log=log))
  record, history = writer.write, writer.history

  mcfg = cfg.model_config()
  log(f"model: {num_params(state.params):,} parameters ({mcfg.n_layer} layers, d={mcfg.d_model}"
      f", {mcfg.n_head} heads, context {mcfg.block_size}); optimizer {cfg.optimizer} "
      f"(peak lr {cfg.peak_lr:g}), schedule {cfg.schedule}, {cfg.steps} steps of "
      f"{cfg.batch_size * cfg.accum} x {cfg.block_size} tokens"
      + (f"; {cfg.shard} over {jax.device_count()} devices" if prog.plan else "")
      + (f"; resuming at step {start}" if resume else ""))
  log(f"data: {ds.summary['source']}, {ds.summary['train_tokens']:,} train / "
      f"{ds.summary['val_tokens']:,} val tokens ({ds.tokenizer.name}, vocabulary "
      f"{ds.vocab_size:,}); unigram entropy {ds.summary['unigram_entropy']:.3f} nats")

  def run_eval(it: int) -> dict:
    rec = {"kind": "eval", "step": it, **prog.evaluate(state.params, val_windows)}
    record(rec)
    bar.write(f"step {it:5d}: val loss {rec['val_loss']:.3f}, perplexity {rec['val_ppl']:.2f},"
              f" token accuracy {100 * rec['val_acc']:.1f}%  "
              f"({time.perf_counter() - t_start:.0f} s)")
    return rec

  def save() -> None:
    ckpt.save(state, {"data": batches.state(), "config": cfg.to_dict(), "last_eval": last_eval,
                      "data_identity": data_identity(ds.summary)})

  # The loop. Metrics stay on the device until a logging step (no per-step host sync).
  save_every = cfg.resolved_save_every()
  bar = stack.enter_context(contextlib.closing(
      writers.progress(end, start, progress and lead, log)))
  if last_eval is not None and last_eval["step"] != start:
    last_eval = None
  if last_eval is None and start == 0 and cfg.eval_every:
    last_eval = run_eval(0)  # the curve starts at the initial loss (~log vocabulary)
  pending: list[dict] = []
  stopped = 0  # the signal that stops the run early
  t_loop = time.perf_counter()
  for it in range(start, end):
    for _ in range(cfg.accum):
      state, m = prog.step(state, prog.put_batch(next(batches)))
      pending.append(m)
    done = it + 1
    stopped = signals.requested()
    if stopped:
      end = done  # the step that was running has finished: log, save, stop
    if done % cfg.log_every == 0 or done == end:
      ms = jax.device_get(pending)
      pending = []
      finite = [float(x["loss"]) for x in ms if np.isfinite(x["loss"])]
      record({"kind": "train", "step": done,
              "loss": float(np.mean(finite)) if finite else float("nan"),
              "lr": float(ms[-1]["lr"]), "grad_norm": float(ms[-1]["grad_norm"]),
              "skipped_nonfinite": sum(int(x["nonfinite"]) for x in ms),
              "skipped_spike": sum(int(x["spike"]) for x in ms),
              "tokens": done * cfg.accum * cfg.batch_size * cfg.block_size,
              "time_s": time.perf_counter() - t_start,
              **{k: float(v) for k, v in jax.device_get(prog.monitor(state)).items()}})
      bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", lr=f"{history[-1]['lr']:.2e}",
                      refresh=False)
    if cfg.eval_every and done % cfg.eval_every == 0 and done != end:
      last_eval = run_eval(done)
    if ckpt is not None and save_every and done % save_every == 0 and done != end:
      save()
    bar.update(1)
    if stopped:
      break
  train_time = time.perf_counter() - t_loop
  if stopped:
    save()
    name = signal.Signals(stopped).name
    text = (f"{name}: stopped after step {end}; checkpoint saved in "
            f"{os.path.join(out_dir, run_dir.CHECKPOINTS)} (continue with --resume)")
    log(text)
    raise TrainingInterrupted(stopped, text)

  # The end: evaluate, save, sample, summarise.
  if not (last_eval and last_eval["step"] == end):
    last_eval = run_eval(end)
  if ckpt is not None:
    save()
  sample = ""
  if end == cfg.steps and cfg.sample_tokens:
    prompt = np.asarray(ds.tokenizer.encode(cfg.sample_prompt)).reshape(-1)[-mcfg.block_size:]
    new = generate(prog.graphdef, parallel.to_host(state.params), prompt, cfg.sample_tokens,
                   jax.random.PRNGKey(cfg.seed + 7), temperature=0.8, top_k=None)
    sample = cfg.sample_prompt + ds.tokenizer.decode(np.asarray(new))
  skipped = parallel.to_host((state.guard.skipped_nonfinite, state.guard.skipped_spike))
  unigram = ds.summary["unigram_entropy"]
  record({
      "kind": "summary", "step": end, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
      "params": num_params(state.params),
      **{k: last_eval[k] for k in ("val_loss", "val_ppl", "val_acc")},
      "unigram_entropy": unigram, "below_unigram": unigram - last_eval["val_loss"],
      "tokenizer": ds.tokenizer.name,
      "skipped_nonfinite": int(skipped[0]), "skipped_spike": int(skipped[1]),
      "fused_ce": prog.fused, "shard": cfg.shard,
      "train_time_s": train_time, "time_s": time.perf_counter() - t_start,
      "tokens_per_s": (end - start) * cfg.accum * cfg.batch_size * cfg.block_size
      / max(train_time, 1e-9),
      "sample": sample})
  return TrainResult(history[-1], history, state, prog.graphdef)


def format_summary(s: dict) -> str:
  """The end-of-run report: val loss vs the unigram entropy, perplexity, accuracy, time."""
  gap = s["below_unigram"]
  unit = "byte" if s.get("tokenizer", "bytes") == "bytes" else "token"
  lines = [
      f"val loss   {s['val_loss']:.3f} nats/{unit}: {abs(gap):.3f} "
      f"{'below' if gap >= 0 else 'ABOVE'} the unigram entropy {s['unigram_entropy']:.3f} "
      f"(a model that ignores context)",
      f"perplexity {s['val_ppl']:.2f}   token accuracy {100 * s['val_acc']:.1f}%",
      f"time       {s['time_s']:.1f} s  ({s['step']} steps, {s['tokens_per_s']:,.0f} tokens/s;"
      f" skipped: {s['skipped_nonfinite']} non-finite, {s['skipped_spike']} spikes)",
  ]
  if s.get("sample"):
    lines.append("sample     " + repr(s["sample"]))
  return "\n".join(lines)


def _load_dataset(cfg: TrainConfig, out_dir: Optional[str], log: Callable[[str], None]
                  ) -> data.Dataset:
  """``data.load_dataset``; with many processes, process 0 fills the cache in ``out_dir``
  first and the others read it."""
  if jax.process_count() == 1 or out_dir is None:
    return data.load_dataset(cfg, out_dir, log=log)
  ds = data.load_dataset(cfg, out_dir, log=log) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("jaxopt_llm.train.load_dataset")
  return ds if ds is not None else data.load_dataset(cfg, out_dir, log=log)
