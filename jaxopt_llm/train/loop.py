"""``train(cfg)``: the training loop, nanoGPT's ``train.py`` in shape. Read it top to bottom.

The config is ``train/config.py`` (``TrainConfig``); the learning rate goes
``cfg.lr -> optimizers.build_schedule -> the optimizer`` (``train/optimizers.py``); the jitted
step, monitors and evaluation are ``train/step.py`` (``build_program``). This file only
loops: batches in, metrics out, evaluation / checkpoints / the end-of-run summary.

Many processes (``cfg.num_processes > 1``, or a launcher's environment): ``train`` first calls
``parallel.initialize_distributed``; every process then runs this same loop on the same global
batches (each feeds its own slice), every process takes part in checkpoints (Orbax
coordinates), and only process 0 writes ``metrics.jsonl``, the plot and the log.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx

from jaxopt_llm import parallel
from jaxopt_llm.train import data
from jaxopt_llm.train.config import TrainConfig, check_resumable
from jaxopt_llm.train.model import generate, num_params
from jaxopt_llm.train.step import TrainState, build_program


@dataclasses.dataclass
class TrainResult:
  summary: dict
  history: list            # every record written to metrics.jsonl (train, eval, summary)
  state: TrainState
  graphdef: nnx.GraphDef


def train(cfg: TrainConfig, *, out_dir: Optional[str] = None, resume: bool = False,
          progress: bool = True, log: Optional[Callable[[str], None]] = None,
          stop_after: Optional[int] = None) -> TrainResult:
  """Trains ``cfg``; writes ``metrics.jsonl``, ``loss_curve.png`` and checkpoints to ``out_dir``.

  ``resume=True`` continues from the latest checkpoint in ``out_dir/checkpoints`` (an error if
  there is none, or if it was written with a different config). ``stop_after`` ends the run
  after that many optimizer steps (with a checkpoint, as if interrupted): the rest of the
  schedule still refers to ``cfg.steps``.
  """
  parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  t_start = time.perf_counter()
  lead = jax.process_index() == 0
  log = (log or functools.partial(print, flush=True)) if lead else (lambda text: None)
  prog = build_program(cfg)
  train_ids, val_ids = data.train_val_split(data.encode(data.load_corpus()))
  corpus = data.corpus_summary(train_ids, val_ids)
  batches = data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
  val_windows = data.eval_windows(val_ids, cfg.block_size, cfg.eval_windows)
  metrics_path = os.path.join(out_dir, "metrics.jsonl") if out_dir and lead else None

  # Resume or start fresh.
  ckpt, history, last_eval = None, [], None
  if out_dir:
    from jaxopt_llm.train.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"))
  if resume:
    if ckpt is None or ckpt.latest_step() is None:
      raise ValueError(f"resume: no checkpoint found in {out_dir!r}/checkpoints")
    check_resumable(ckpt.extra()["config"], cfg)  # before reading arrays of another shape
  state = prog.init(cfg.seed)
  if resume:
    state, extra = ckpt.restore(state)
    batches.restore(extra["data"])
    last_eval = extra.get("last_eval")  # in the checkpoint: every process must agree on it
    history = [r for r in _read_jsonl(metrics_path)
               if r["step"] <= int(state.step) // cfg.accum and r["kind"] != "summary"]
  elif ckpt is not None and ckpt.latest_step() is not None:
    ckpt.clear()
  _write_jsonl(metrics_path, history)
  start = int(state.step) // cfg.accum
  end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

  mcfg = cfg.model_config()
  log(f"model: {num_params(state.params):,} parameters ({mcfg.n_layer} layers, d={mcfg.d_model}"
      f", {mcfg.n_head} heads, context {mcfg.block_size}); optimizer {cfg.optimizer} "
      f"(peak lr {cfg.peak_lr:g}), schedule {cfg.schedule}, {cfg.steps} steps of "
      f"{cfg.batch_size * cfg.accum} x {cfg.block_size} tokens"
      + (f"; {cfg.shard} over {jax.device_count()} devices" if prog.plan else "")
      + (f"; resuming at step {start}" if resume else ""))
  log(f"corpus: {corpus['train_tokens']:,} train / {corpus['val_tokens']:,} val bytes; "
      f"unigram entropy {corpus['unigram_entropy']:.3f} nats")

  def record(rec: dict) -> None:
    history.append(rec)
    _append_jsonl(metrics_path, rec)

  def run_eval(it: int) -> dict:
    rec = {"kind": "eval", "step": it, **prog.evaluate(state.params, val_windows)}
    record(rec)
    bar.write(f"step {it:5d}: val loss {rec['val_loss']:.3f}, perplexity {rec['val_ppl']:.2f},"
              f" token accuracy {100 * rec['val_acc']:.1f}%  "
              f"({time.perf_counter() - t_start:.0f} s)")
    return rec

  def save() -> None:
    ckpt.save(state, {"data": batches.state(), "config": cfg.to_dict(), "last_eval": last_eval})

  # The loop. Metrics stay on the device until a logging step (no per-step host sync).
  bar = _progress_bar(end, start, progress and lead and end > start, log)
  if last_eval is not None and last_eval["step"] != start:
    last_eval = None
  if last_eval is None and start == 0 and cfg.eval_every:
    last_eval = run_eval(0)  # the curve starts at the initial loss (~log 256)
  pending: list[dict] = []
  t_loop = time.perf_counter()
  try:
    for it in range(start, end):
      for _ in range(cfg.accum):
        state, m = prog.step(state, prog.put_batch(next(batches)))
        pending.append(m)
      done = it + 1
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
      if ckpt is not None and cfg.save_every and done % cfg.save_every == 0 and done != end:
        save()
      bar.update(1)
  finally:
    bar.close()
  train_time = time.perf_counter() - t_loop

  # The end: evaluate, save, sample, summarise.
  if not (last_eval and last_eval["step"] == end):
    last_eval = run_eval(end)
  if ckpt is not None:
    save()
    ckpt.close()
  sample = ""
  if end == cfg.steps and cfg.sample_tokens:
    prompt = data.encode(cfg.sample_prompt)[-mcfg.block_size:]
    new = generate(prog.graphdef, parallel.to_host(state.params), prompt, cfg.sample_tokens,
                   jax.random.PRNGKey(cfg.seed + 7), temperature=0.8, top_k=None)
    sample = cfg.sample_prompt + data.decode(np.asarray(new))
  skipped = parallel.to_host((state.guard.skipped_nonfinite, state.guard.skipped_spike))
  record({
      "kind": "summary", "step": end, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
      "params": num_params(state.params),
      **{k: last_eval[k] for k in ("val_loss", "val_ppl", "val_acc")},
      "unigram_entropy": corpus["unigram_entropy"],
      "below_unigram": corpus["unigram_entropy"] - last_eval["val_loss"],
      "skipped_nonfinite": int(skipped[0]), "skipped_spike": int(skipped[1]),
      "fused_ce": prog.fused, "shard": cfg.shard,
      "train_time_s": train_time, "time_s": time.perf_counter() - t_start,
      "tokens_per_s": (end - start) * cfg.accum * cfg.batch_size * cfg.block_size
      / max(train_time, 1e-9),
      "sample": sample})
  if out_dir and lead:
    from jaxopt_llm.train.plots import plot_run
    plot_run(history, os.path.join(out_dir, "loss_curve.png"),
             title=f"{cfg.optimizer} / {cfg.schedule}", baseline=corpus["unigram_entropy"])
  return TrainResult(history[-1], history, state, prog.graphdef)


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


def _progress_bar(total: int, initial: int, enabled: bool, log: Callable[[str], None]):
  """tqdm on a terminal (``disable=None``: off when stderr is not a tty), else log lines."""
  if enabled:
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
               disable=None)
    if not bar.disable:
      return bar
    bar.close()
  return _LogLines(log)


class _LogLines:
  """The progress bar's interface when there is no bar: ``write`` logs, the rest is a no-op."""

  def __init__(self, log: Callable[[str], None]):
    self.write = log

  def set_postfix(self, *args, **kwargs) -> None:
    pass

  def update(self, n: int = 1) -> None:
    pass

  def close(self) -> None:
    pass


def _read_jsonl(path: Optional[str]) -> list[dict]:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Optional[str], records: list[dict]) -> None:
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)


def _append_jsonl(path: Optional[str], rec: dict) -> None:
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(rec) + "\n")
