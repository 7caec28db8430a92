"""What a run leaves beside its checkpoints, and what it shows while it runs.

* ``write_run_config(out_dir, cfg)``: ``config.json``, the full resolved config (the fields as
  given, and what ``None`` resolved to: peak lr, weight decay, warmup, the model's shape and
  vocabulary, the fused loss), the versions of jaxopt_llm / jax / optax / flax / orbax, the
  devices, and the data and tokenizer files with their SHA-256.
* ``MetricWriter(out_dir, cfg)``: every record of the run (``{"kind": "train" | "eval" |
  "summary", "step": ...}``) goes to ``metrics.jsonl`` and, by default, to TensorBoard event
  files in ``out_dir`` (tensorboardX): ``train/loss``, ``train/lr``, ``train/grad_norm``, the
  monitors (``train/param_norm``, ``train/state_norm/mu``...), ``val/loss``, ``val/ppl``,
  ``val/acc``; with ``cfg.wandb`` also to a Weights & Biases run (``WANDB_MODE=offline`` logs
  to ``out_dir/wandb`` without network or account). ``close()`` draws ``loss_curve.png``
  (matplotlib; without it, one line says the PNG was skipped).
* ``progress(total, initial, enabled, log)``: a tqdm bar when stdout and stderr are
  terminals, else one plain line every N steps (a tenth of the run, or 30 s, whichever comes first), so a run
  whose output goes to a file or a CI log is never silent for minutes.

Resuming (``MetricWriter(..., resume=True, resume_step=N)``): ``metrics.jsonl`` keeps its
records up to step N (the checkpoint's; the rest were written after it by the run that was
interrupted, and will be written again), ``.history`` returns them, TensorBoard is told to
purge the events after N (its ``purge_step``), and the W&B run id saved in
``out_dir/wandb_run_id`` is resumed. Only process 0 writes files; the other processes of a
multi-process run keep ``.history`` in memory.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import importlib.metadata
import json
import math
import os
import secrets
import sys
import time
from typing import Any, Callable, Optional

from jaxopt_llm.train.files import atomic_write, sha256_file

METRICS = "metrics.jsonl"
CONFIG = "config.json"
LOSS_CURVE = "loss_curve.png"
WANDB_ID = "wandb_run_id"
_PACKAGES = ("jaxopt_llm", "jax", "jaxlib", "optax", "flax", "orbax-checkpoint", "numpy",
             "tokenizers", "tensorboardX", "wandb")


# ---------------------------------------------------------------------------------------
# config.json

def versions() -> dict[str, Optional[str]]:
  """Installed versions of the packages a run depends on (``None``: not installed)."""
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _file_entries(paths: list[str]) -> list[dict]:
  return [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)}
          for p in paths]


def resolved_config(cfg) -> dict:
  """What the ``None`` fields of ``cfg`` resolve to, and the model it builds."""
  from jaxopt_llm.train.optimizers import OPTIMIZERS
  out: dict[str, Any] = {
      "peak_lr": cfg.peak_lr,
      "weight_decay": (OPTIMIZERS[cfg.optimizer].weight_decay if cfg.weight_decay is None
                       else cfg.weight_decay),
      "warmup_steps": cfg.warmup,
  }
  for name in ("save_every",):  # resolved by the config when it derives a default
    resolve = getattr(cfg, f"resolved_{name}", None)
    if callable(resolve):
      out[name] = resolve()
  mcfg = cfg.model_config()
  out["model"] = dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) else str(mcfg)
  try:
    from jaxopt_llm.train.step import use_fused_ce
    out["fused_ce"] = use_fused_ce(cfg.fused_ce, mcfg.vocab_size)
  except ImportError:  # flax missing: config.json is still written
    pass
  return out


def run_config(cfg, *, dataset_summary: Optional[dict] = None, resumed_at: Optional[int] = None
               ) -> dict:
  """The content of ``config.json`` (see ``write_run_config``)."""
  import jax
  return {
      "config": cfg.to_dict(),
      "resolved": resolved_config(cfg),
      "versions": versions(),
      "python": sys.version.split()[0],
      "devices": {"backend": jax.default_backend(), "count": jax.device_count(),
                  "kind": jax.devices()[0].device_kind, "processes": jax.process_count()},
      "data": _data_entries(cfg, dataset_summary),
      "command": sys.argv,
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "resumed_at_step": resumed_at,
  }


def _data_entries(cfg, dataset_summary: Optional[dict]) -> dict:
  """The data files (in the order they are joined) and the tokenizer file, with SHA-256."""
  from jaxopt_llm.train import data
  files = tokenizer = None
  if getattr(cfg, "data", None):
    files = _file_entries(data.resolve_files(cfg.data))
  if getattr(cfg, "tokenizer", None):
    tokenizer = _file_entries([cfg.tokenizer])[0]
  return {"files": files, "tokenizer": tokenizer, "summary": dataset_summary}


def write_run_config(out_dir: str, cfg, *, dataset_summary: Optional[dict] = None,
                     resumed_at: Optional[int] = None) -> str:
  """Writes ``out_dir/config.json`` (atomically; on resume it is rewritten, with
  ``resumed_at_step``) and returns its path. ``TrainConfig(**json["config"])`` is the run's
  config; ``jaxopt-llm sample`` reads it back."""
  path = os.path.join(out_dir, CONFIG)
  _write_text(path, json.dumps(run_config(cfg, dataset_summary=dataset_summary,
                                            resumed_at=resumed_at), indent=1, default=str)
                + "\n")
  return path


def read_run_config(out_dir: str) -> Optional[dict]:
  """``config.json``'s ``config`` (the TrainConfig fields), or None if there is none."""
  path = os.path.join(out_dir, CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{path} is not a run config ({e})") from None


def _write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text), "w")


# ---------------------------------------------------------------------------------------
# Metrics: metrics.jsonl, TensorBoard, W&B

def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalars(record: dict) -> dict[str, float]:
  """The TensorBoard / W&B scalars of one record: ``train/<key>`` for a train record,
  ``val/loss``, ``val/ppl``, ``val/acc`` for an evaluation, ``summary/<key>`` at the end."""
  kind = record.get("kind")
  out = {}
  for k, v in record.items():
    if k in ("kind", "step") or not _is_number(v):
      continue
    if kind == "eval":
      out["val/" + (k[4:] if k.startswith("val_") else k)] = float(v)
    else:
      out[f"{kind}/{k}"] = float(v)
  return out


class MetricWriter:
  """``metrics.jsonl`` + TensorBoard (+ W&B) for one run; ``write(record)`` each record.

  ``tensorboard`` / ``wandb`` default to ``cfg.tensorboard`` / ``cfg.wandb`` (True / False
  when the config has no such field). ``out_dir=None`` (or a process other than 0) writes no
  file and only keeps ``history``. ``log`` receives the one-line notes (the W&B run, a PNG
  skipped for want of matplotlib).
  """

  def __init__(self, out_dir: Optional[str], cfg, *, tensorboard: Optional[bool] = None,
               wandb: Optional[bool] = None, resume: bool = False,
               resume_step: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
               plot: bool = True):
    import jax
    self.cfg = cfg
    self.log = log or (lambda text: None)
    self.out_dir = out_dir if jax.process_index() == 0 else None
    self.plot = plot
    self.history: list[dict] = []
    self._jsonl = self._tb = self._wandb = None
    self._closed = False
    if tensorboard is None:
      tensorboard = getattr(cfg, "tensorboard", True)
    if wandb is None:
      wandb = getattr(cfg, "wandb", False)
    if resume and resume_step is None:
      raise ValueError("MetricWriter: resume=True needs resume_step (the checkpoint's step)")
    self.metrics_path = os.path.join(self.out_dir, METRICS) if self.out_dir else None
    if self.metrics_path:
      os.makedirs(self.out_dir, exist_ok=True)
      if resume:
        self.history = [r for r in _read_jsonl(self.metrics_path)
                        if r.get("step", 0) <= resume_step and r.get("kind") != "summary"]
      _write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
      try:
        self._jsonl = open(self.metrics_path, "a")
        if tensorboard:
          self._tb = _open_tensorboard(self.out_dir, resume_step + 1 if resume else None)
          if not resume:
            self._tb.add_text("config", _as_markdown_code(cfg.to_dict()), 0)
        if wandb:
          self._wandb = _open_wandb(self.out_dir, cfg, resume, self.log)
      except BaseException:
        self._close_sinks()  # what opened before the failure
        raise

  def write(self, record: dict) -> None:
    """Appends ``record`` to the history and every sink (flushed: a killed run keeps it)."""
    self.history.append(record)
    if self.metrics_path is None:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    step = int(record.get("step", 0))
    values = scalars(record)
    if self._tb is not None:
      for tag, v in values.items():
        self._tb.add_scalar(tag, v, step)
      if record.get("sample"):
        self._tb.add_text("sample", _as_markdown_code(record["sample"]), step)
      self._tb.flush()
    if self._wandb is not None:
      if record.get("kind") == "summary":
        self._wandb.summary.update({k: v for k, v in record.items() if k != "kind"})
      if values:
        self._wandb.log(values, step=step)

  def close(self) -> None:
    """Closes the sinks and, if the run ended (a ``summary`` record), draws the loss curve."""
    if self._closed:
      return
    self._closed = True
    if self.metrics_path is None:
      return
    self._close_sinks()
    summary = self.history[-1] if self.history and self.history[-1]["kind"] == "summary" \
        else None
    if self.plot and summary is not None:
      from jaxopt_llm.train.plots import plot_run
      plot_run(self.history, os.path.join(self.out_dir, LOSS_CURVE),
               title=f"{self.cfg.optimizer} / {self.cfg.schedule}",
               baseline=summary.get("unigram_entropy"), log=self.log)

  def _close_sinks(self) -> None:
    for sink, end in ((self._jsonl, "close"), (self._tb, "close"), (self._wandb, "finish")):
      if sink is not None:
        getattr(sink, end)()
    self._jsonl = self._tb = self._wandb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _as_markdown_code(obj) -> str:
  """TensorBoard renders text as markdown: an indented block keeps it verbatim."""
  text = obj if isinstance(obj, str) else json.dumps(obj, indent=1)
  return "\n".join("    " + line for line in text.splitlines())


def _open_tensorboard(out_dir: str, purge_step: Optional[int]):
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    raise ImportError("TensorBoard logging needs tensorboardX: pip install "
                      "'jaxopt_llm[train]' (or --no-tensorboard)") from None
  # One event file per start of the run; the numbered suffix keeps the files of two starts
  # in the same second apart (tensorboardX names them by the second) and in order.
  n = len(glob.glob(os.path.join(glob.escape(out_dir), "events.out.tfevents.*")))
  return SummaryWriter(logdir=out_dir, purge_step=purge_step, filename_suffix=f".{n:03d}",
                       flush_secs=30)


def _open_wandb(out_dir: str, cfg, resume: bool, log: Callable[[str], None]):
  try:
    import wandb
  except ImportError:
    raise ValueError("--wandb: wandb is not installed: pip install 'jaxopt_llm[wandb]'") \
        from None
  id_path = os.path.join(out_dir, WANDB_ID)
  run_id = None
  if resume and os.path.isfile(id_path):
    with open(id_path) as f:
      run_id = f.read().strip() or None
  if run_id is None:
    run_id = secrets.token_hex(4)  # W&B run ids are [a-z0-9]
    _write_text(id_path, run_id + "\n")
  config = {"config": cfg.to_dict()}
  if os.path.isfile(os.path.join(out_dir, CONFIG)):  # the run's config.json, written first
    with open(os.path.join(out_dir, CONFIG)) as f:
      config = json.load(f)
  try:
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "jaxopt_llm"),
                     name=os.path.basename(os.path.abspath(out_dir)), dir=out_dir, id=run_id,
                     resume="allow", config=config)
  except Exception as e:  # noqa: BLE001  (wandb raises its own types: login, network...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"--wandb: wandb.init failed ({first}); WANDB_MODE=offline logs "
                     "without an account or network") from None
  mode = getattr(getattr(run, "settings", None), "mode", None) or \
      os.environ.get("WANDB_MODE") or "online"
  log(f"wandb: run {run_id} ({mode}) in {os.path.join(out_dir, 'wandb')}")
  return run


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
          break
  return out


# ---------------------------------------------------------------------------------------
# Progress

def progress(total: int, initial: int, enabled: bool, log: Callable[[str], None], *,
             every: Optional[int] = None, interval_s: float = 30.0, stream=None, out=None):
  """The run's progress display, with tqdm's interface (``set_postfix``, ``update``,
  ``write``, ``close``).

  ``enabled=False``: no display; ``write`` still logs. Else a tqdm bar on ``stream``
  (stderr) when it and ``out`` (stdout, where ``log`` prints) are both terminals and tqdm is
  installed; otherwise (output to a file, a pipe, a CI log) ``ProgressLines``: a line every
  ``every`` steps (default: a tenth of the run) or ``interval_s`` seconds, and at the end.
  """
  if not enabled or total <= initial:
    return _Quiet(log)
  stream = sys.stderr if stream is None else stream
  if _isatty(stream) and _isatty(sys.stdout if out is None else out):
    try:
      from tqdm.auto import tqdm
    except ImportError:
      pass
    else:
      return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False,
                  file=stream)
  return ProgressLines(total, initial, log, every=every, interval_s=interval_s)


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # closed or not a file
    return False


class _Quiet:
  """No display: ``write`` logs, the rest does nothing."""

  def __init__(self, log: Callable[[str], None]):
    self.write = log

  def set_postfix(self, *args, **kwargs) -> None:
    pass

  def update(self, n: int = 1) -> None:
    pass

  def close(self) -> None:
    pass


class ProgressLines(_Quiet):
  """``step 120/600 (20%)  loss 2.345  lr 1.00e-02  |  14.2 steps/s, 34 s left``: one
  line every ``every`` steps or ``interval_s`` seconds (whichever comes first) and at the
  last step."""

  def __init__(self, total: int, initial: int, log: Callable[[str], None], *,
               every: Optional[int] = None, interval_s: float = 30.0,
               clock: Callable[[], float] = time.monotonic):
    super().__init__(log)
    self.total, self.n, self._start_n = total, initial, initial
    self.every = every or max(1, math.ceil((total - initial) / 10))
    self.interval_s = interval_s
    self._clock = clock
    self._last = clock()
    self._t0 = self._n0 = None  # the rate is timed from the first step's end (the first
    self._postfix: dict = {}    # step compiles: it would make the estimate minutes long)

  def set_postfix(self, refresh: bool = True, **kwargs) -> None:  # noqa: ARG002
    self._postfix = kwargs

  def update(self, n: int = 1) -> None:
    self.n += n
    now = self._clock()
    if self._t0 is None:
      self._t0, self._n0 = now, self.n
    if ((self.n - self._start_n) % self.every == 0 or self.n >= self.total
        or now - self._last >= self.interval_s):
      self._last = now
      self.write(self.line(now))

  def line(self, now: float) -> str:
    pct = 100.0 * self.n / self.total
    text = f"step {self.n}/{self.total} ({pct:.0f}%)"
    for k, v in self._postfix.items():
      text += f"  {k} {v}"
    elapsed, done = now - self._t0, self.n - self._n0
    if done > 0 and elapsed > 0:
      rate = done / elapsed
      text += f"  |  {rate:.3g} steps/s"
      if self.n < self.total:
        text += f", {_duration((self.total - self.n) / rate)} left"
    return text


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
