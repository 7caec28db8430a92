"""``jaxopt-llm``: train the tiny GPT, sample from it, compare optimizers, plot schedules,
check PyTorch parity.

  jaxopt-llm train    [--optimizer adamw] [--schedule warmup_cosine] [--steps 600] [--out DIR]
                      [--data PATH] [--tokenizer tokenizer.json] [--resume | --overwrite]
                      [--no-tensorboard] [--wandb]
                      [--shard zero1] [--num-processes 2 --process-id 0 --coordinator-address H:P]
  jaxopt-llm sample   RUN_DIR [--prompt TEXT] [--tokens 200] [--temperature 0.8] [--top-k K]
  jaxopt-llm compare  [--optimizers adamw,lion,sophia] [--steps 600] [--out DIR]
  jaxopt-llm schedule warmup_cosine --warmup-steps 1000 --steps 10000 --lr 1e-4 --out x.png
  jaxopt-llm parity   [--steps 200]
  jaxopt-llm parity   --replay run.npz [--out divergence.png]   (a from_torch.Recorder file)

The ``train`` / ``compare`` flags are generated from ``TrainConfig``'s fields: ``--n-layer``
sets ``n_layer``, ``--lr`` sets ``lr``, and so on (help texts from the field comments).
``schedule`` takes the schedule's fields of the same config and calls the same builder as
``train``. Bad arguments (including values the library rejects, e.g. a warmup longer than the
run, a path that is not a folder, a run folder the run refuses) print one line
``jaxopt-llm ...: error: ...`` and exit with status 2, never a traceback;
``JAXOPT_LLM_DEBUG=1`` shows the traceback instead (an unexpected failure is one line and
status 1). Only the command that runs is set up, and each command first checks that the
optional packages it needs are installed (``NEEDS``); if not, one line names the
``pip install 'jaxopt_llm[extra]'`` to run, status 2. matplotlib is optional for ``train``
and ``compare``: without it they skip the PNG with one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import sys
import typing
from typing import Optional, Sequence

COMMANDS = {
    "train": "train the tiny GPT on the embedded corpus or your text (--data)",
    "sample": "continue a prompt with a trained run's latest intact checkpoint",
    "compare": "AdamW vs Lion vs Sophia on the same data and budget",
    "schedule": "plot a learning-rate schedule to PNG",
    "parity": "every optimizer vs PyTorch, as a table (needs torch)",
}
# The optional packages each command imports: (module, distribution) per extra. A command
# checks them before it starts, and names the `pip install 'jaxopt_llm[extra]'` to run.
_TRAIN_MODULES = (("flax", "flax"), ("orbax.checkpoint", "orbax-checkpoint"), ("tqdm", "tqdm"))
NEEDS = {
    "train": {"train": _TRAIN_MODULES},
    "compare": {"train": _TRAIN_MODULES},
    "sample": {"train": _TRAIN_MODULES[:2]},
    "schedule": {"plots": (("matplotlib", "matplotlib"),)},
    "parity": {"torch": (("torch", "torch"),)},
}


class MissingExtra(Exception):
  """An optional dependency of the command is not installed (one line, exit status 2)."""


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a missing parent package; a module set to None
    return False


def _needs(args) -> dict[str, tuple]:
  """``{extra: ((module, distribution), ...)}`` that this invocation imports."""
  needs = {k: tuple(v) for k, v in NEEDS.get(args.command, {}).items()}
  if args.command == "parity" and getattr(args, "replay", None):
    needs = {}  # a replay needs numpy and jax only (matplotlib for --out, optional)
  if args.command in ("train", "compare"):
    if getattr(args, "tensorboard", False):
      needs["train"] += (("tensorboardX", "tensorboardX"),)
    if getattr(args, "tokenizer", None):
      needs["train"] += (("tokenizers", "tokenizers"),)
    if getattr(args, "wandb", False):
      needs["wandb"] = (("wandb", "wandb"),)
  return needs


def check_extras(args) -> None:
  """MissingExtra naming the extra to install when a module ``args.command`` needs is missing."""
  for extra, modules in _needs(args).items():
    missing = [dist for module, dist in modules if not _installed(module)]
    if missing:
      what = ", ".join(missing)
      hint = (" (or --no-tensorboard)" if missing == ["tensorboardX"] else "")
      raise MissingExtra(f"needs {what}, which {'is' if len(missing) == 1 else 'are'} not "
                         f"installed: pip install 'jaxopt_llm[{extra}]'{hint}")


def check_out_dir(path: str, flag: str = "--out") -> None:
  """ValueError (one line) unless ``path`` is a folder or can be created as one."""
  if not path:
    raise ValueError(f"{flag}: give a folder")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{flag}: {path!r} is a file, not a folder")
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f"{flag}: cannot create {path!r}: {parent!r} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}: cannot write in {parent!r} (permission denied)")


def check_out_file(path: str, flag: str = "--out") -> None:
  """ValueError (one line) unless ``path`` can be written as a file."""
  if not path or os.path.isdir(path):
    raise ValueError(f"{flag}: {path!r} is a folder; give a file name, e.g. schedule.png")
  check_out_dir(os.path.dirname(os.path.abspath(path)), flag)


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
  return re.sub(r"^(TrainConfig|sample): ", "",
                re.sub(r"`(\w+)`", lambda m: _flag(m.group(1)), message))


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
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bar (or, when stderr is not a terminal, progress lines)")
  p.add_argument("--out", default=out, help="output directory (default %(default)s)")
  p.add_argument("--overwrite", action="store_true",
                 help="start afresh in an --out that holds an earlier run's checkpoints, "
                      "deleting them")


def _build_parser(command: Optional[str]) -> argparse.ArgumentParser:
  """The parser; only ``command``'s arguments are set up (their imports cost seconds)."""
  parser = _Parser(prog="jaxopt-llm", description="Train the tiny GPT, sample from it, "
                   "compare optimizers, plot schedules, check PyTorch parity (jaxopt_llm's "
                   "command line).")
  sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                              parser_class=_Parser)
  sub.required = True
  parsers = {name: sub.add_parser(name, help=text) for name, text in COMMANDS.items()}

  if command == "train":
    t = parsers["train"]
    t.description = ("Train a tiny GPT (Flax NNX) on the embedded corpus (CPython's help() "
                     "text, byte-level) or on --data. Writes checkpoints/, metrics.jsonl, "
                     "config.json, TensorBoard event files and loss_curve.png to --out and "
                     "prints val loss against the unigram entropy.")
    _add_run_args(t, _train_fields(), out=os.path.join("runs", "train"))
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest intact checkpoint in --out")
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
  elif command == "sample":
    q = parsers["sample"]
    q.description = ("Continue a prompt with the model of a `jaxopt-llm train` run: its "
                     "latest intact checkpoint, its config and tokenizer. Prints the prompt "
                     "and the continuation.")
    q.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a train run")
    q.add_argument("--prompt", default=None,
                   help="text to continue (default: the run's --sample-prompt)")
    q.add_argument("--tokens", type=int, default=200,
                   help="tokens to generate (default %(default)s)")
    q.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature, > 0 (default %(default)s)")
    q.add_argument("--top-k", type=int, default=None,
                   help="sample among the K most likely tokens (default: all)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
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
    q.add_argument("--replay", metavar="RUN.npz", default=None,
                   help="instead of the table: replay a run recorded with "
                        "jaxopt_llm.from_torch.Recorder through the converted optimizer and "
                        "report the divergence per step and param group")
    q.add_argument("--out", metavar="PNG", default=None,
                   help="with --replay: plot the divergence over steps (needs matplotlib)")
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
  check_out_dir(args.out)
  if args.resume and args.overwrite:
    raise ValueError("--resume and --overwrite exclude each other: continue the run in --out, "
                     "or delete it and start afresh")
  if args.resume and not os.path.isdir(os.path.join(args.out, "checkpoints")):
    raise ValueError(f"--resume: no checkpoints in {args.out!r}")
  from jaxopt_llm.train.loop import format_summary, train
  result = train(cfg, out_dir=args.out, resume=args.resume, overwrite=args.overwrite,
                 progress=not args.no_progress)
  import jax
  if jax.process_index() == 0:
    print(format_summary(result.summary))
    print(_wrote(args.out))
  return 0


def _wrote(out: str) -> str:
  """``wrote OUT/{checkpoints/, metrics.jsonl, ...}``: what the run left in ``out``."""
  from jaxopt_llm.train import writers
  names = [n for n in ("checkpoints/", writers.METRICS, writers.CONFIG, writers.LOSS_CURVE)
           if os.path.exists(os.path.join(out, n))]
  if any(n.startswith("events.out.tfevents.") for n in os.listdir(out)):
    names.append("TensorBoard events")
  if os.path.isdir(os.path.join(out, "wandb")):
    names.append("wandb/")
  return f"wrote {os.path.join(out, '')}{{{', '.join(names)}}}"


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
  check_out_dir(args.out)
  from jaxopt_llm.train import run_dir
  for n in names:  # refuse before the first model trains, not after it
    found = None if args.overwrite else run_dir.earlier_run(os.path.join(args.out, n))
    if found:
      raise ValueError(f"{os.path.join(args.out, n)!r} holds {found}: replace it with "
                       "--overwrite, or give another --out")
  from jaxopt_llm.train.loop import train
  from jaxopt_llm.train.plots import plot_runs
  results = {}
  for n, cfg in configs.items():
    print(f"== {n} ==", flush=True)
    results[n] = train(cfg, out_dir=os.path.join(args.out, n), overwrite=args.overwrite,
                       progress=not args.no_progress)
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
  drawn = plot_runs({n: r.history for n, r in results.items()}, png,
                    title=f"optimizers on the tiny GPT ({args.steps} steps, {args.schedule})",
                    baseline=first["unigram_entropy"], log=print)
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"wrote {png + ' and ' if drawn else ''}{os.path.join(args.out, 'compare.json')}")
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
  check_out_file(args.out)
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
  if args.replay is not None:
    return _replay(args)
  if args.out is not None:
    raise ValueError("--out goes with --replay")
  from jaxopt_llm.parity.__main__ import main as parity_main
  return parity_main(["--steps", str(args.steps), "--tol", repr(args.tol)])


def _replay(args) -> int:
  """``parity --replay``: the report of ``from_torch.replay``; status 1 over ``--tol``."""
  if not os.path.isfile(args.replay):
    raise ValueError(f"--replay: {args.replay!r} is not a file")
  if args.out is not None:
    check_out_file(args.out)
  from jaxopt_llm.from_torch.replay import replay
  report = replay(args.replay)
  print(report)
  if args.out is not None:
    if _installed("matplotlib"):
      report.plot(args.out)
      print(f"wrote {args.out}")
    else:
      print("no plot: matplotlib is not installed (pip install 'jaxopt_llm[plots]')")
  ok = report.worst <= args.tol
  print(f"{'ok' if ok else 'FAIL'}: worst {report.worst:.2e} (tolerance {args.tol:.0e})")
  return 0 if ok else 1


def _cmd_sample(args) -> int:
  from jaxopt_llm.train import sample
  try:
    sample.check_sampling(args.tokens, args.temperature, args.top_k, args.seed)
  except ValueError as e:
    raise ValueError(_flag_names(str(e))) from None
  run = sample.load_run(args.run_dir, log=lambda text: print(text, file=sys.stderr))
  prompt = run.cfg.sample_prompt if args.prompt is None else args.prompt
  try:
    text = sample.sample(run, prompt, args.tokens, temperature=args.temperature,
                         top_k=args.top_k, seed=args.seed)
  except ValueError as e:
    raise ValueError(_flag_names(str(e))) from None
  print(f"{args.run_dir}: checkpoint of step {run.step}, {args.tokens} tokens "
        f"(temperature {args.temperature:g}"
        + (f", top-k {args.top_k}" if args.top_k else "") + f", seed {args.seed})",
        file=sys.stderr)
  print(prompt + text)
  return 0


_RUN = {"train": _cmd_train, "sample": _cmd_sample, "compare": _cmd_compare,
        "schedule": _cmd_schedule, "parity": _cmd_parity}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``jaxopt-llm`` console script; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  command = next((a for a in argv if not a.startswith("-")), None)
  parser = _build_parser(command)
  args = parser.parse_args(argv)  # exits 2 with a one-line message on bad arguments
  prog = f"{parser.prog} {args.command}"
  debug = os.environ.get("JAXOPT_LLM_DEBUG", "") not in ("", "0")
  try:
    check_extras(args)
    return _RUN[args.command](args)
  except (ValueError, OSError, ImportError, MissingExtra) as e:  # bad arguments, paths, run
    # folders, an optional package missing
    if debug:
      raise
    print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001  (a failure we did not foresee: one line too)
    if debug:
      raise
    print(f"{prog}: error: {type(e).__name__}: {_one_line(e)} (JAXOPT_LLM_DEBUG=1 shows "
          "the traceback)", file=sys.stderr)
    return 1


def _one_line(e: BaseException) -> str:
  """The message of ``e`` on one line (OSError: with its file name)."""
  if isinstance(e, OSError) and e.strerror and e.filename:
    text = f"{e.filename}: {e.strerror}"
  else:
    text = str(e) or type(e).__name__
  return " ".join(text.split())


if __name__ == "__main__":
  sys.exit(main())
