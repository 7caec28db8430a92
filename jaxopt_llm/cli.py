"""``jaxopt-llm``: train the tiny GPT, compare optimizers, plot schedules, check PyTorch parity.

  jaxopt-llm train    [--optimizer adamw] [--schedule warmup_cosine] [--steps 600] [--out DIR]
                      [--shard zero1] [--num-processes 2 --process-id 0 --coordinator-address H:P]
  jaxopt-llm compare  [--optimizers adamw,lion,sophia] [--steps 600] [--out DIR]
  jaxopt-llm schedule warmup_cosine --warmup-steps 1000 --steps 10000 --lr 1e-4 --out x.png
  jaxopt-llm parity   [--steps 200]

The ``train`` / ``compare`` flags are generated from ``TrainConfig``'s fields: ``--n-layer``
sets ``n_layer``, ``--lr`` sets ``lr``, and so on (help texts from the field comments).
``schedule`` takes the schedule's fields of the same config and calls the same builder as
``train``. Bad arguments (including values the library rejects, e.g. a warmup longer than the
run) print one line ``jaxopt-llm ...: error: ...`` and exit with status 2, never a
traceback; ``JAXOPT_LLM_DEBUG=1`` shows the traceback instead. Only the command that runs is
set up, and flax, orbax, tqdm and matplotlib are imported by the commands that need them
(``parity`` needs none of them, ``schedule`` only matplotlib).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
from typing import Optional, Sequence

COMMANDS = {
    "train": "train the tiny GPT on the embedded corpus",
    "compare": "AdamW vs Lion vs Sophia on the same data and budget",
    "schedule": "plot a learning-rate schedule to PNG",
    "parity": "every optimizer vs PyTorch, as a table (needs torch)",
}
# TrainConfig fields that `compare` sets itself, and the multi-host ones it does not take.
_NOT_COMPARE = ("optimizer", "lr", "weight_decay", "save_every", "coordinator_address",
                "num_processes", "process_id")
# The fields the `schedule` command takes, with its own defaults (a plot, not a run).
_SCHEDULE_FIELDS = {"lr": 1e-3, "warmup_steps": 100, "steps": 1000, "min_lr_ratio": 0.0,
                    "decay_steps": None, "decay_type": "linear", "power": 2.0, "gamma": None}


class _Parser(argparse.ArgumentParser):
  """argparse, but an error is one line (``prog: error: message``) and exit status 2."""

  def error(self, message: str):  # noqa: D401
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(field: str) -> str:
  return "--" + field.replace("_", "-")


def _field_help() -> dict[str, str]:
  """``{field: its comment}`` from TrainConfig's source (the comments are the help texts)."""
  from jaxopt_llm.train.config import TrainConfig
  out: dict[str, str] = {}
  last = None
  for line in inspect.getsource(TrainConfig).splitlines():
    m = re.match(r"\s+(\w+): [^#]*?=[^#]*#\s*(.*)$", line)
    if m:
      last = m.group(1)
      out[last] = m.group(2)
    # A comment continued on the next line sits in the comment column; a section heading
    # ("  # guard ...") sits at the fields' indentation and is no field's help.
    elif last and re.match(r"\s{8,}#\s*(.*)$", line):
      out[last] += " " + line.strip().lstrip("#").strip()
    else:
      last = None
  return out


def _choices(field: str) -> Optional[tuple]:
  from jaxopt_llm.train import config, optimizers
  if field == "model_size":
    from jaxopt_llm.train.model import MODEL_SIZES
    return tuple(MODEL_SIZES)
  return {"optimizer": tuple(optimizers.OPTIMIZERS), "schedule": tuple(optimizers.SCHEDULES),
          "decay_type": config.DECAY_TYPES, "fused_ce": ("auto", "on", "off"),
          "shard": config.SHARD_MODES}.get(field)


def _add_config_args(p: argparse.ArgumentParser, fields: Sequence[str],
                     defaults: Optional[dict] = None) -> None:
  """One flag per TrainConfig field, typed by its annotation; range checks are the config's."""
  from jaxopt_llm.train.config import TrainConfig
  hints = typing.get_type_hints(TrainConfig)
  helps = _field_help()
  for f in dataclasses.fields(TrainConfig):
    if f.name not in fields:
      continue
    default = (defaults or {}).get(f.name, f.default)
    kind = hints[f.name]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional
    text = helps.get(f.name, "") + ("" if default is None else " (default %(default)s)")
    if kind is bool:
      p.add_argument(_flag(f.name), default=default, help=text,
                     action=argparse.BooleanOptionalAction)
    else:
      p.add_argument(_flag(f.name), type=kind, default=default, help=text,
                     choices=_choices(f.name), metavar=None if _choices(f.name) else
                     f.name.upper())


def _config_from(args, fields: Sequence[str], **fixed):
  from jaxopt_llm.train.config import TrainConfig
  return TrainConfig(**{f: getattr(args, f) for f in fields if f not in fixed}, **fixed)


def _flag_names(message: str) -> str:
  """A config error names fields (`warmup_steps`); on the command line, name the flags."""
  return re.sub(r"^TrainConfig: ", "", re.sub(r"`(\w+)`", lambda m: _flag(m.group(1)),
                                              message))


def _checked(cfg):
  """``cfg`` validated and its schedule and optimizer built, so that a bad combination
  fails here, before any compilation."""
  from jaxopt_llm.train.optimizers import build
  try:
    cfg.validate()
    build(cfg)
  except ValueError as e:
    raise ValueError(_flag_names(str(e))) from None
  return cfg


def _train_fields() -> list[str]:
  from jaxopt_llm.train.config import TrainConfig
  return [f.name for f in dataclasses.fields(TrainConfig)]


def _add_run_args(p: argparse.ArgumentParser, fields, *, out: str) -> None:
  """What ``train`` and ``compare`` share: the config flags, ``--no-progress``, ``--out``."""
  _add_config_args(p, fields)
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--out", default=out, help="output directory (default %(default)s)")


def _build_parser(command: Optional[str]) -> argparse.ArgumentParser:
  """The parser; only ``command``'s arguments are set up (their imports cost seconds)."""
  parser = _Parser(prog="jaxopt-llm", description="Train the tiny GPT, compare optimizers, "
                   "plot schedules, check PyTorch parity (jaxopt_llm's command line).")
  sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                              parser_class=_Parser)
  sub.required = True
  parsers = {name: sub.add_parser(name, help=text) for name, text in COMMANDS.items()}

  if command == "train":
    t = parsers["train"]
    t.description = ("Train a tiny GPT (Flax NNX) on the embedded corpus (CPython's help() "
                     "text, byte-level). Writes metrics.jsonl, loss_curve.png and "
                     "checkpoints/ to --out and prints val loss against the unigram entropy.")
    _add_run_args(t, _train_fields(), out=os.path.join("runs", "train"))
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out")
  elif command == "compare":
    c = parsers["compare"]
    c.description = ("Train one model per optimizer (each with its recipe's lr and weight "
                     "decay) on identical batches; print a table and draw all curves in "
                     "OUT/compare.png.")
    c.add_argument("--optimizers", default="adamw,lion,sophia",
                   help="comma-separated optimizer recipes (default %(default)s)")
    c.add_argument("--lrs", default=None, help="peak lr overrides, e.g. adamw=1e-2,lion=3e-3")
    _add_run_args(c, [f for f in _train_fields() if f not in _NOT_COMPARE],
                  out=os.path.join("runs", "compare"))
  elif command == "schedule":
    from jaxopt_llm.train.optimizers import SCHEDULES
    s = parsers["schedule"]
    s.description = ("Plot the learning-rate schedule `jaxopt-llm train --schedule NAME` "
                     "would use, over --steps steps (the same builder).")
    s.add_argument("schedule", choices=tuple(SCHEDULES), metavar="NAME",
                   help="one of: " + ", ".join(SCHEDULES))
    _add_config_args(s, tuple(_SCHEDULE_FIELDS), defaults=_SCHEDULE_FIELDS)
    s.add_argument("--out", default="schedule.png", help="PNG path (default %(default)s)")
  elif command == "parity":
    q = parsers["parity"]
    q.add_argument("--steps", type=int, default=200, help="steps (default %(default)s)")
    q.add_argument("--tol", type=float, default=1e-5,
                   help="relative-error tolerance (default %(default)s)")
  return parser


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def _cmd_train(args) -> int:
  cfg = _config_from(args, _train_fields())
  # First, before anything could start a jax backend: join a multi-process run if the flags
  # or a launcher's environment say so (a no-op for one process).
  from jaxopt_llm import parallel
  try:
    parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes,
                                    cfg.process_id)
  except ValueError as e:
    raise ValueError(_flag_names(str(e))) from None
  _checked(cfg)
  if args.resume and not os.path.isdir(os.path.join(args.out, "checkpoints")):
    raise ValueError(f"--resume: no checkpoints in {args.out!r}")
  from jaxopt_llm.train.loop import format_summary, train
  result = train(cfg, out_dir=args.out, resume=args.resume, progress=not args.no_progress)
  import jax
  if jax.process_index() == 0:
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
  from jaxopt_llm.train.optimizers import OPTIMIZERS
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  if not names:
    raise ValueError("--optimizers: give at least one optimizer")
  for n in names:
    if n not in OPTIMIZERS:
      raise ValueError(f"--optimizers: unknown optimizer {n!r}; choose from "
                       f"{', '.join(OPTIMIZERS)}")
  if len(set(names)) != len(names):
    raise ValueError("--optimizers: each optimizer may appear once")
  lrs = _parse_lrs(args.lrs)
  for n in lrs:
    if n not in names:
      raise ValueError(f"--lrs: {n!r} is not among --optimizers")
  fields = [f for f in _train_fields() if f not in _NOT_COMPARE]
  configs = {n: _checked(_config_from(args, fields, optimizer=n, lr=lrs.get(n)))
             for n in names}  # all validated before any training
  from jaxopt_llm.train.loop import train
  from jaxopt_llm.train.plots import plot_runs
  results = {}
  for n, cfg in configs.items():
    print(f"== {n} ==", flush=True)
    results[n] = train(cfg, out_dir=os.path.join(args.out, n), progress=not args.no_progress)
  first = next(iter(results.values())).summary
  header = (f"{'optimizer':10s} {'peak lr':>8s} {'val loss':>9s} {'ppl':>6s} {'acc':>6s} "
            f"{'vs unigram':>10s} {'time s':>7s} {'skipped':>7s}")
  print(f"\n{len(names)} optimizers, {args.steps} steps each on the same batches; unigram "
        f"entropy {first['unigram_entropy']:.3f} nats/byte")
  print(header)
  print("-" * len(header))
  rows = []
  for n, r in results.items():
    s = r.summary
    rows.append({"optimizer": n, "peak_lr": configs[n].peak_lr,
                 **{k: s[k] for k in ("val_loss", "val_ppl", "val_acc", "below_unigram",
                                      "time_s", "skipped_nonfinite", "skipped_spike")}})
    print(f"{n:10s} {configs[n].peak_lr:8.1e} {s['val_loss']:9.3f} {s['val_ppl']:6.2f} "
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


# What each schedule reads besides lr, warmup_steps and steps (printed with the values).
_SCHEDULE_USES = {"wsd": ("min_lr_ratio", "decay_steps", "decay_type"),
                  "polynomial_decay": ("min_lr_ratio", "power"),
                  "step_decay": ("gamma",), "exponential_lr": ("min_lr_ratio", "gamma"),
                  "warmup_cosine": ("min_lr_ratio",), "linear_decay": ("min_lr_ratio",),
                  "cosine_annealing": ("min_lr_ratio",)}


def _cmd_schedule(args) -> int:
  import numpy as np
  from jaxopt_llm.train.optimizers import build_schedule
  cfg = _config_from(args, ("schedule",) + tuple(_SCHEDULE_FIELDS))
  try:
    cfg.validate_schedule()
    sched = build_schedule(cfg)
  except ValueError as e:
    raise ValueError(_flag_names(str(e))) from None
  total, warmup = cfg.steps, cfg.warmup
  marks = {0, warmup // 2, warmup, total // 4, total // 2, 3 * total // 4, total}
  if cfg.schedule == "wsd":
    marks.add(total - (max(total // 5, 1) if cfg.decay_steps is None else cfg.decay_steps))
  marks = sorted(m for m in marks if 0 <= m <= total)
  values = np.asarray(sched(np.asarray(marks)))
  used = ("lr", "warmup_steps", "steps") + _SCHEDULE_USES.get(cfg.schedule, ())
  print(f"{cfg.schedule}: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in used)
        + f"; plotted to step {total}")
  print(f"{'step':>8s}  {'lr':>10s}")
  for m, v in zip(marks, values):
    print(f"{m:8d}  {float(v):10.3e}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  from jaxopt_llm.train.plots import plot_schedule
  plot_schedule(sched, total, args.out, title=f"{cfg.schedule} (peak {cfg.lr:g})")
  print(f"wrote {args.out}")
  return 0


def _cmd_parity(args) -> int:
  if args.steps < 1:
    raise ValueError(f"--steps must be an integer >= 1, got {args.steps}")
  if not args.tol > 0 or args.tol == float("inf"):
    raise ValueError(f"--tol must be a finite number > 0, got {args.tol}")
  try:
    import torch  # noqa: F401
  except ImportError:
    raise ValueError("parity needs PyTorch, which is not installed: "
                     "pip install 'jaxopt_llm[torch]'") from None
  from jaxopt_llm.parity.__main__ import main as parity_main
  return parity_main(["--steps", str(args.steps), "--tol", repr(args.tol)])


_RUN = {"train": _cmd_train, "compare": _cmd_compare, "schedule": _cmd_schedule,
        "parity": _cmd_parity}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``jaxopt-llm`` console script; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  command = next((a for a in argv if not a.startswith("-")), None)
  parser = _build_parser(command)
  args = parser.parse_args(argv)  # exits 2 with a one-line message on bad arguments
  prog = f"{parser.prog} {args.command}"
  try:
    return _RUN[args.command](args)
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
