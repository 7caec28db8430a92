"""``jaxopt-llm``: train the tiny GPT, compare optimizers, plot schedules, check PyTorch parity.

  jaxopt-llm train    [--optimizer adamw] [--schedule warmup_cosine] [--steps 600] [--out DIR]
  jaxopt-llm compare  [--optimizers adamw,lion,sophia] [--steps 600] [--out DIR]
  jaxopt-llm schedule warmup_cosine --warmup 1000 --total 10000 --peak 1e-4 --out x.png
  jaxopt-llm parity   [--steps 200]

Bad arguments (including values the library rejects, e.g. a warmup longer than the run)
print one line ``jaxopt-llm ...: error: ...`` and exit with status 2, never a traceback. Set
``JAXOPT_LLM_DEBUG=1`` to get the traceback of such an error instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


class _Parser(argparse.ArgumentParser):
  """argparse, but an error is one line (``prog: error: message``) and exit status 2."""

  def error(self, message: str):  # noqa: D401
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < lo:
      raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
    return value
  return parse


def _float_at_least(lo: float, open_: bool = False):
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < lo or (
        open_ and value == lo):
      raise argparse.ArgumentTypeError(
          f"must be a finite number {'>' if open_ else '>='} {lo:g}, got {text}")
    return value
  return parse


_POS_INT = _int_at_least(1)
_NONNEG_INT = _int_at_least(0)
_POS_FLOAT = _float_at_least(0.0, open_=True)
_NONNEG_FLOAT = _float_at_least(0.0)


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------

def _add_training_args(p: argparse.ArgumentParser, *, single: bool) -> None:
  from jaxopt_llm.train.loop import TrainConfig
  from jaxopt_llm.train.model import MODEL_SIZES
  from jaxopt_llm.train.optimizers import SCHEDULES, optimizer_names
  d = TrainConfig()
  g = p.add_argument_group("optimization")
  if single:
    g.add_argument("--optimizer", default=d.optimizer, choices=optimizer_names(),
                   help="optimizer recipe (default %(default)s)")
    g.add_argument("--lr", type=_POS_FLOAT, default=None,
                   help="peak learning rate (default: the optimizer's recipe)")
    g.add_argument("--weight-decay", type=_NONNEG_FLOAT, default=None,
                   help="weight decay (default: the optimizer's recipe)")
  g.add_argument("--schedule", default=d.schedule, choices=tuple(SCHEDULES),
                 help="learning-rate schedule (default %(default)s)")
  g.add_argument("--steps", type=_POS_INT, default=d.steps,
                 help="optimizer steps (default %(default)s)")
  g.add_argument("--warmup", type=_NONNEG_INT, default=None,
                 help="warmup steps (default: steps // 10)")
  g.add_argument("--min-lr-ratio", type=_NONNEG_FLOAT, default=d.min_lr_ratio,
                 help="final lr as a fraction of the peak (default %(default)s)")
  g.add_argument("--batch-size", type=_POS_INT, default=d.batch_size,
                 help="sequences per micro-batch (default %(default)s)")
  g.add_argument("--accum", type=_POS_INT, default=d.accum,
                 help="micro-batches per optimizer step, via optax.MultiSteps (default 1)")
  g.add_argument("--clip", type=_NONNEG_FLOAT, default=d.clip,
                 help="global gradient-norm clip, 0 = off (default %(default)s)")
  g.add_argument("--z-loss", type=_NONNEG_FLOAT, default=d.z_loss,
                 help="PaLM z-loss weight (default 0)")
  g.add_argument("--fused-ce", choices=("auto", "on", "off"), default=d.fused_ce,
                 help="fused linear cross-entropy: auto = on for vocab >= 8192")
  g.add_argument("--hessian-every", type=_POS_INT, default=d.hessian_every,
                 help="Sophia: Hessian estimate every k steps (default %(default)s)")
  g.add_argument("--spike-k", type=_NONNEG_FLOAT, default=d.spike_k,
                 help="skip updates with loss > mean + k*std of recent losses; 0 = off "
                      "(default %(default)s)")
  m = p.add_argument_group("model")
  m.add_argument("--model-size", default=d.model_size, choices=tuple(MODEL_SIZES),
                 help="preset: " + ", ".join(f"{k}={v[0]}x{v[2]}" for k, v in
                                             MODEL_SIZES.items())
                 + " (layers x width; default %(default)s)")
  m.add_argument("--layers", type=_POS_INT, default=None, help="override the layer count")
  m.add_argument("--d-model", type=_POS_INT, default=None, help="override the width")
  m.add_argument("--heads", type=_POS_INT, default=None, help="override the head count")
  m.add_argument("--context", type=_int_at_least(2), default=d.block_size,
                 help="context length in bytes (default %(default)s)")
  m.add_argument("--untied-head", action="store_true",
                 help="separate output matrix instead of the tied embedding")
  r = p.add_argument_group("run")
  r.add_argument("--seed", type=_NONNEG_INT, default=d.seed)
  r.add_argument("--eval-every", type=_NONNEG_INT, default=d.eval_every,
                 help="evaluate every N steps, 0 = only at the end (default %(default)s)")
  r.add_argument("--eval-windows", type=_POS_INT, default=d.eval_windows,
                 help="validation windows of one context each (default %(default)s)")
  r.add_argument("--log-every", type=_POS_INT, default=d.log_every)
  r.add_argument("--sample-tokens", type=_NONNEG_INT, default=d.sample_tokens,
                 help="bytes to generate after training, 0 = none (default %(default)s)")
  r.add_argument("--prompt", default=d.sample_prompt, help="prompt of the generated sample")
  r.add_argument("--no-progress", action="store_true", help="no progress bar")
  if single:
    r.add_argument("--save-every", type=_NONNEG_INT, default=d.save_every,
                   help="checkpoint every N steps (always at the end); default: end only")
    r.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")


def _config(args, optimizer: str, lr=None, weight_decay=None):
  from jaxopt_llm.train.loop import TrainConfig
  cfg = TrainConfig(
      model_size=args.model_size, n_layer=args.layers, n_head=args.heads,
      d_model=args.d_model, block_size=args.context, tied_head=not args.untied_head,
      optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=args.schedule,
      warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio, steps=args.steps,
      batch_size=args.batch_size, accum=args.accum, clip=args.clip, z_loss=args.z_loss,
      fused_ce=args.fused_ce, hessian_every=args.hessian_every, spike_k=args.spike_k,
      eval_every=args.eval_every, eval_windows=args.eval_windows, log_every=args.log_every,
      save_every=getattr(args, "save_every", 0), seed=args.seed,
      sample_tokens=args.sample_tokens, sample_prompt=args.prompt)
  cfg.validate()
  from jaxopt_llm.train.loop import use_fused_ce
  from jaxopt_llm.train.optimizers import build_optimizer, build_schedule
  # Build once now so that bad combinations fail before any compilation.
  sched = build_schedule(cfg.schedule, cfg.peak_lr, cfg.warmup, cfg.steps,
                         cfg.min_lr_ratio * cfg.peak_lr)
  build_optimizer(cfg.optimizer, sched, cfg.weight_decay, clip=cfg.clip, accum=cfg.accum)
  use_fused_ce(cfg.fused_ce, 256)
  return cfg


def _build_parser() -> argparse.ArgumentParser:
  from jaxopt_llm.train.optimizers import SCHEDULES
  parser = _Parser(prog="jaxopt-llm", description="Train the tiny GPT, compare optimizers, "
                   "plot schedules, check PyTorch parity (jaxopt_llm's command line).")
  sub = parser.add_subparsers(dest="command", metavar="{train,compare,schedule,parity}",
                              parser_class=_Parser)
  sub.required = True

  t = sub.add_parser("train", help="train the tiny GPT on the embedded corpus",
                     description="Train a tiny GPT (Flax NNX) on the embedded corpus (CPython's "
                     "help() text, byte-level). Writes metrics.jsonl, loss_curve.png and "
                     "checkpoints/ to --out and prints val loss against the unigram entropy.")
  _add_training_args(t, single=True)
  t.add_argument("--out", default=os.path.join("runs", "train"),
                 help="output directory (default %(default)s)")

  c = sub.add_parser("compare", help="AdamW vs Lion vs Sophia on the same data and budget",
                     description="Train one model per optimizer (each with its recipe's lr "
                     "and weight decay) on identical batches; print a table and draw all "
                     "curves in OUT/compare.png.")
  c.add_argument("--optimizers", default=None,
                 help="comma-separated optimizer recipes (default: adamw,lion,sophia)")
  c.add_argument("--lrs", default=None,
                 help="peak lr overrides, e.g. adamw=1e-2,lion=3e-3")
  _add_training_args(c, single=False)
  c.add_argument("--out", default=os.path.join("runs", "compare"),
                 help="output directory (default %(default)s)")

  s = sub.add_parser("schedule", help="plot a learning-rate schedule to PNG",
                     description="Plot a jaxopt_llm.schedules schedule over --total steps.")
  s.add_argument("name", choices=tuple(SCHEDULES) + ("step_decay", "exponential_decay"),
                 metavar="NAME", help="one of: " + ", ".join(
                     tuple(SCHEDULES) + ("step_decay", "exponential_decay")))
  s.add_argument("--peak", type=_NONNEG_FLOAT, default=1e-3, help="peak (or initial) lr")
  s.add_argument("--warmup", type=_NONNEG_INT, default=100, help="warmup steps")
  s.add_argument("--total", type=_POS_INT, default=1000, help="total steps (plot range)")
  s.add_argument("--min-lr", type=_NONNEG_FLOAT, default=0.0, help="final lr")
  s.add_argument("--stable", type=_NONNEG_INT, default=None,
                 help="wsd: stable steps (default: total - warmup - decay)")
  s.add_argument("--decay", type=_NONNEG_INT, default=None,
                 help="wsd: decay steps (default: total // 5)")
  s.add_argument("--decay-type", default="linear", help="wsd: linear | cosine | 1-sqrt")
  s.add_argument("--timescale", type=_POS_INT, default=None, help="inverse_sqrt timescale")
  s.add_argument("--power", type=_POS_FLOAT, default=1.0, help="polynomial_decay power")
  s.add_argument("--step-size", type=_POS_INT, default=None,
                 help="step_decay: steps per decay (default total // 3)")
  s.add_argument("--gamma", type=_POS_FLOAT, default=None,
                 help="step_decay (default 0.1) / exponential_decay (default: reaches "
                      "min-lr, or peak/100, at total) factor")
  s.add_argument("--out", default="schedule.png", help="PNG path (default %(default)s)")

  q = sub.add_parser("parity", help="every optimizer vs PyTorch, as a table (needs torch)")
  q.add_argument("--steps", type=_POS_INT, default=200, help="steps (default %(default)s)")
  q.add_argument("--tol", type=_POS_FLOAT, default=1e-5,
                 help="relative-error tolerance (default %(default)s)")
  return parser


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def _cmd_train(args) -> int:
  from jaxopt_llm.train.loop import format_summary, train
  cfg = _config(args, args.optimizer, args.lr, args.weight_decay)
  if args.resume and not os.path.isdir(os.path.join(args.out, "checkpoints")):
    raise ValueError(f"--resume: no checkpoints in {args.out!r}")
  result = train(cfg, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
  print(format_summary(result.summary))
  print(f"wrote {os.path.join(args.out, 'metrics.jsonl')}, "
        f"{os.path.join(args.out, 'loss_curve.png')} and checkpoints/")
  return 0


def _parse_lrs(text: Optional[str]) -> dict:
  out = {}
  for item in filter(None, (text or "").split(",")):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--lrs: expected name=value, got {item!r}")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f"--lrs: invalid number {value!r} for {name!r}") from None
  return out


def _cmd_compare(args) -> int:
  from jaxopt_llm.train.loop import train
  from jaxopt_llm.train.optimizers import optimizer_names
  from jaxopt_llm.train.plots import plot_runs
  default = ",".join(n for n in ("adamw", "lion", "sophia") if n in optimizer_names())
  names = [n.strip() for n in (args.optimizers or default).split(",") if n.strip()]
  if not names:
    raise ValueError("--optimizers: give at least one optimizer")
  for n in names:
    if n not in optimizer_names():
      raise ValueError(f"--optimizers: unknown optimizer {n!r}; choose from "
                       f"{', '.join(optimizer_names())}")
  if len(set(names)) != len(names):
    raise ValueError("--optimizers: each optimizer may appear once")
  lrs = _parse_lrs(args.lrs)
  for n in lrs:
    if n not in names:
      raise ValueError(f"--lrs: {n!r} is not among --optimizers")
  configs = {n: _config(args, n, lrs.get(n)) for n in names}  # validate all before training
  results = {}
  for n, cfg in configs.items():
    print(f"== {n} ==", flush=True)
    results[n] = train(cfg, out_dir=os.path.join(args.out, n), progress=not args.no_progress)
  first = next(iter(results.values())).summary
  rows = []
  header = (f"{'optimizer':10s} {'peak lr':>8s} {'val loss':>9s} {'ppl':>6s} {'acc':>6s} "
            f"{'vs unigram':>10s} {'time s':>7s} {'skipped':>7s}")
  print(f"\n{len(names)} optimizers, {args.steps} steps each on the same batches; unigram "
        f"entropy {first['unigram_entropy']:.3f} nats/byte")
  print(header)
  print("-" * len(header))
  for n, r in results.items():
    s = r.summary
    row = {"optimizer": n, "peak_lr": configs[n].peak_lr,
           **{k: s[k] for k in ("val_loss", "val_ppl", "val_acc", "below_unigram", "time_s",
                                "skipped_nonfinite", "skipped_spike")}}
    rows.append(row)
    print(f"{n:10s} {row['peak_lr']:8.1e} {s['val_loss']:9.3f} {s['val_ppl']:6.2f} "
          f"{100 * s['val_acc']:5.1f}% {-s['below_unigram']:+10.3f} {s['time_s']:7.1f} "
          f"{s['skipped_nonfinite'] + s['skipped_spike']:7d}")
  png = os.path.join(args.out, "compare.png")
  plot_runs({n: r.history for n, r in results.items()}, png,
            title=f"optimizers on the tiny GPT ({args.steps} steps, {args.schedule})",
            baseline=first["unigram_entropy"])
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"wrote {png} and {os.path.join(args.out, 'compare.json')}")
  return 0


def _make_schedule(args) -> tuple:
  """``(schedule, {argument: value actually used})`` for ``jaxopt-llm schedule``."""
  from jaxopt_llm import schedules
  n, peak, warmup, total, min_lr = args.name, args.peak, args.warmup, args.total, args.min_lr
  if n in ("warmup_cosine", "linear_decay"):
    used = dict(peak=peak, warmup=warmup, total=total, min_lr=min_lr)
    return getattr(schedules, n)(peak, warmup, total, min_lr=min_lr), used
  if n == "polynomial_decay":
    used = dict(peak=peak, warmup=warmup, total=total, min_lr=min_lr, power=args.power)
    return schedules.polynomial_decay(peak, warmup, total, min_lr=min_lr,
                                      power=args.power), used
  if n == "wsd":
    decay = args.decay if args.decay is not None else max(total // 5, 1)
    stable = args.stable if args.stable is not None else total - warmup - decay
    if stable < 0:
      raise ValueError(f"wsd: --warmup {warmup} + --decay {decay} exceed --total {total}")
    used = dict(peak=peak, warmup=warmup, stable=stable, decay=decay, min_lr=min_lr,
                decay_type=args.decay_type)
    return schedules.wsd(peak, warmup, stable, decay, min_lr=min_lr,
                         decay_type=args.decay_type), used
  if n == "inverse_sqrt":
    used = dict(peak=peak, warmup=warmup, timescale=args.timescale)
    return schedules.inverse_sqrt(peak, warmup, timescale=args.timescale), used
  if n == "constant_with_warmup":
    return schedules.constant_with_warmup(peak, warmup), dict(peak=peak, warmup=warmup)
  if n == "constant":
    return schedules.constant_with_warmup(peak, 0), dict(peak=peak)
  if n == "cosine_annealing":
    used = dict(peak=peak, total=total, min_lr=min_lr)
    return schedules.cosine_annealing(peak, total, eta_min=min_lr), used
  if n == "step_decay":
    used = dict(peak=peak, step_size=args.step_size or max(total // 3, 1),
                gamma=0.1 if args.gamma is None else args.gamma)
    return schedules.step_decay(peak, used["step_size"], gamma=used["gamma"]), used
  if n == "exponential_decay":
    gamma = args.gamma
    if gamma is None:
      end = min_lr if min_lr > 0 else peak / 100
      gamma = (end / peak) ** (1.0 / total) if peak > 0 else 1.0
    return schedules.exponential_decay(peak, gamma), dict(peak=peak, gamma=gamma)
  raise ValueError(f"unknown schedule {n!r}")  # argparse's choices make this unreachable


def _cmd_schedule(args) -> int:
  import numpy as np
  from jaxopt_llm.train.plots import plot_schedule
  sched, used = _make_schedule(args)
  marks = {0, args.warmup // 2, args.warmup, args.total // 4, args.total // 2,
           3 * args.total // 4, args.total}
  if "stable" in used:
    marks.add(args.warmup + used["stable"])  # wsd: where the decay starts
  marks = sorted(m for m in marks if 0 <= m <= args.total)
  values = np.asarray(sched(np.asarray(marks)))
  print(f"{args.name}: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in used.items()) + f"; plotted to step {args.total}")
  print(f"{'step':>8s}  {'lr':>10s}")
  for m, v in zip(marks, values):
    print(f"{m:8d}  {float(v):10.3e}")
  parent = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(parent, exist_ok=True)
  plot_schedule(sched, args.total, args.out, title=f"{args.name} (peak {args.peak:g})")
  print(f"wrote {args.out}")
  return 0


def _cmd_parity(args) -> int:
  try:
    import torch  # noqa: F401
  except ImportError:
    raise ValueError("parity needs PyTorch, which is not installed: "
                     "pip install 'jaxopt_llm[torch]'") from None
  from jaxopt_llm.parity.__main__ import main as parity_main
  return parity_main(["--steps", str(args.steps), "--tol", repr(args.tol)])


_COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "schedule": _cmd_schedule,
             "parity": _cmd_parity}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``jaxopt-llm`` console script; returns the exit status."""
  parser = _build_parser()
  args = parser.parse_args(argv)  # exits 2 with a one-line message on bad arguments
  prog = f"{parser.prog} {args.command}"
  try:
    return _COMMANDS[args.command](args)
  except (ValueError, FileNotFoundError) as e:
    if os.environ.get("JAXOPT_LLM_DEBUG"):
      raise
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
