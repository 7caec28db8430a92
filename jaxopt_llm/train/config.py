"""``TrainConfig``: every knob of a training run, its defaults and its validation.

The command line is generated from these fields (``--n-layer`` sets ``n_layer``, ``--lr`` sets
``lr``...), so the names here are the flags' names, and the comments their help texts.
``None`` means "the default for the chosen model size / optimizer recipe"
(``train/optimizers.py`` holds the recipes). Importing this module needs no flax (the model
is imported when a config is validated), so ``jaxopt-llm schedule`` runs without it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from typing import TYPE_CHECKING

from jaxopt_llm._validation import check_choice, check_int, check_real
from jaxopt_llm.train import data

if TYPE_CHECKING:
  from jaxopt_llm.train.model import GPTConfig

SHARD_MODES = ("none", "replicated", "zero1", "fsdp")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")


@dataclasses.dataclass
class TrainConfig:
  """Every knob of a run (the comments are the ``--help`` texts)."""
  # data
  data: Optional[str] = None           # text file, folder or glob; default: embedded corpus
  tokenizer: Optional[str] = None      # tokenizer.json (tokenizers library); default: bytes
  # model
  model_size: str = "nano"             # preset: nano | micro | tiny | small (layers x width)
  n_layer: Optional[int] = None        # override the preset's layer count
  n_head: Optional[int] = None         # override the preset's head count
  d_model: Optional[int] = None        # override the preset's width
  block_size: int = 64                 # context length in tokens
  tied_head: bool = True               # output matrix = the token embedding, transposed
  compute_dtype: str = "float32"       # float32 | bfloat16 (matmuls; weights stay float32)
  # optimization
  optimizer: str = "adamw"             # optimizer recipe (train/optimizers.py)
  lr: Optional[float] = None           # peak learning rate; default: the recipe's
  weight_decay: Optional[float] = None  # default: the recipe's
  schedule: str = "warmup_cosine"      # learning-rate schedule
  warmup_steps: Optional[int] = None   # default: steps // 10
  min_lr_ratio: float = 0.1            # final lr as a fraction of the peak
  decay_steps: Optional[int] = None    # wsd: length of the decay; default: steps // 5
  decay_type: str = "linear"           # wsd: linear | cosine | 1-sqrt
  power: float = 2.0                   # polynomial_decay: the power
  gamma: Optional[float] = None        # step_decay (default 0.1) / exponential_lr
                                       # (default: reaches min lr at the end) factor
  steps: int = 600                     # optimizer steps (each = accum micro-batches)
  batch_size: int = 32                 # sequences per micro-batch
  accum: int = 1                       # micro-batches per optimizer step (optax.MultiSteps)
  clip: float = 1.0                    # global gradient-norm clip; 0 = off
  z_loss: float = 0.0                  # PaLM z-loss weight
  fused_ce: str = "auto"               # fused linear cross-entropy: auto = on for vocab >= 8192
  hessian_every: int = 10              # Sophia: Hessian estimate every k optimizer steps
  # guard (optim.guards.skip_spikes)
  spike_k: float = 6.0                 # skip updates with loss > mean + k*std; 0 = off
  spike_window: int = 64               # recent accepted losses the statistics use
  spike_min_history: int = 16          # accepted losses before the spike test is armed
  max_consecutive_skips: int = 25      # then accept a (finite) loss anyway: a new level
  # devices
  shard: str = "none"                  # none (one device) | replicated | zero1 | fsdp
  coordinator_address: Optional[str] = None  # multi-host: host:port of process 0
  num_processes: Optional[int] = None  # multi-host: number of processes
  process_id: Optional[int] = None     # multi-host: this process's index
  # evaluation, logging, checkpoints
  eval_every: int = 100                # evaluate every N steps; 0 = only at the end
  eval_windows: int = 256              # validation windows of one context each
  log_every: int = 10                  # log train metrics every N steps
  tensorboard: bool = True             # TensorBoard event files in --out (tensorboardX)
  wandb: bool = False                  # also log to Weights & Biases (WANDB_MODE=offline:
                                       # no account or network needed)
  save_every: Optional[int] = None     # checkpoint every N steps (and at the end, and on
                                       # SIGTERM/SIGINT); default: steps // 10; 0 = end only
  seed: int = 0
  sample_tokens: int = 240             # tokens to generate after training; 0 = none
  sample_prompt: str = "The "          # prompt of the generated sample

  def validate_schedule(self) -> None:
    """The checks of the fields the learning-rate schedule reads (no model, no flax)."""
    from jaxopt_llm.train.optimizers import OPTIMIZERS, SCHEDULES
    owner = "TrainConfig"
    check_choice(owner, "optimizer", self.optimizer, tuple(OPTIMIZERS))
    check_choice(owner, "schedule", self.schedule, tuple(SCHEDULES))
    check_choice(owner, "decay_type", self.decay_type, DECAY_TYPES)
    check_int(owner, "steps", self.steps, lo=1)
    for name in ("warmup_steps", "decay_steps"):
      if getattr(self, name) is not None:
        check_int(owner, name, getattr(self, name), lo=0)
    if self.warmup > self.steps:
      raise ValueError(f"{owner}: `warmup_steps` ({self.warmup}) must be <= `steps` "
                       f"({self.steps})")
    if self.lr is not None:
      check_real(owner, "lr", self.lr, lo=0.0, lo_open=True)
    if self.gamma is not None:
      check_real(owner, "gamma", self.gamma, lo=0.0, lo_open=True)
    check_real(owner, "min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)
    check_real(owner, "power", self.power, lo=0.0, lo_open=True)

  def validate(self) -> None:
    """ValueError naming the first field out of its range (or a bad combination)."""
    from jaxopt_llm.train.model import COMPUTE_DTYPES, MODEL_SIZES
    owner = "TrainConfig"
    self.validate_schedule()
    check_choice(owner, "model_size", self.model_size, tuple(MODEL_SIZES))
    check_choice(owner, "fused_ce", self.fused_ce, ("auto", "on", "off"))
    check_choice(owner, "shard", self.shard, SHARD_MODES)
    check_choice(owner, "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
    for name in ("data", "tokenizer"):
      if getattr(self, name) is not None and (not isinstance(getattr(self, name), str)
                                              or not getattr(self, name)):
        raise ValueError(f"{owner}: `{name}` must be a non-empty path, got "
                         f"{getattr(self, name)!r}")
    for name in ("batch_size", "accum", "hessian_every", "spike_window", "eval_windows",
                 "log_every"):
      check_int(owner, name, getattr(self, name), lo=1)
    check_int(owner, "block_size", self.block_size, lo=2)
    for name in ("eval_every", "spike_min_history", "max_consecutive_skips",
                 "seed", "sample_tokens"):
      check_int(owner, name, getattr(self, name), lo=0)
    if self.save_every is not None:
      check_int(owner, "save_every", self.save_every, lo=0)
    for name, lo in (("n_layer", 1), ("n_head", 1), ("d_model", 1), ("num_processes", 1),
                     ("process_id", 0)):
      if getattr(self, name) is not None:
        check_int(owner, name, getattr(self, name), lo=lo)
    if self.weight_decay is not None:
      check_real(owner, "weight_decay", self.weight_decay, lo=0.0)
    for name in ("clip", "z_loss", "spike_k"):
      check_real(owner, name, getattr(self, name), lo=0.0)
    if not self.sample_prompt:
      raise ValueError(f"{owner}: `sample_prompt` must not be empty")
    if self.shard == "none" and (self.num_processes or 1) > 1:
      raise ValueError(f"{owner}: `num_processes` > 1 needs `shard` in "
                       f"{SHARD_MODES[1:]}, got 'none'")
    self.model_config()  # d_model % n_head etc.

  def model_config(self) -> GPTConfig:
    from jaxopt_llm.train.model import GPTConfig
    overrides = {k: v for k, v in (("n_layer", self.n_layer), ("n_head", self.n_head),
                                   ("d_model", self.d_model)) if v is not None}
    return GPTConfig.from_size(self.model_size, vocab_size=data.vocab_size_of(self.tokenizer),
                               block_size=self.block_size, tied_head=self.tied_head,
                               compute_dtype=self.compute_dtype, **overrides)

  @property
  def peak_lr(self) -> float:
    from jaxopt_llm.train.optimizers import OPTIMIZERS
    return OPTIMIZERS[self.optimizer].lr if self.lr is None else self.lr

  def resolved_save_every(self) -> int:
    """``save_every``, or its default: ten checkpoints a run (``max(1, steps // 10)``)."""
    return max(1, self.steps // 10) if self.save_every is None else self.save_every

  @property
  def warmup(self) -> int:
    return self.steps // 10 if self.warmup_steps is None else self.warmup_steps

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Fields that may differ between a run and its resumption: they change when things are
# logged or saved, or how processes find each other, never the trajectory.
RESUMABLE_CHANGES = frozenset({"eval_every", "eval_windows", "log_every", "save_every",
                               "tensorboard", "wandb",
                               "sample_tokens", "sample_prompt", "coordinator_address",
                               "process_id"})


# Fields only the learning-rate schedule reads: they may change on resume (``--steps`` raised,
# another WSD cooldown) when the learning rate of every step already taken stays the same.
SCHEDULE_CHANGES = frozenset({"steps", "schedule", "lr", "warmup_steps", "decay_steps",
                              "decay_type", "min_lr_ratio", "power", "gamma"})


def check_resumable(saved: dict, cfg: TrainConfig, done: Optional[int] = None) -> None:
  """ValueError naming every field where ``cfg`` differs from the checkpoint's config.

  With ``done`` (the optimizer steps the checkpoint has taken), the schedule's fields
  (``SCHEDULE_CHANGES``: ``steps`` above all) may differ when the learning rate of steps
  ``0 .. done-1`` is bit-identical under both configs: the trajectory so far is then the one
  ``cfg`` gives (a constant schedule, or WSD still in its stable phase with the same warmup).
  """
  now = cfg.to_dict()
  diff = sorted(k for k in set(saved) | set(now)
                if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
  if done is not None and diff and set(diff) <= SCHEDULE_CHANGES:
    if done > cfg.steps:
      raise ValueError(f"resume: `steps` ({cfg.steps}) is below the checkpoint's step {done}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    before = TrainConfig(**{**now, **{k: v for k, v in saved.items() if k in known}})
    if _same_past_lr(before, cfg, done):
      return
    detail = ", ".join(f"`{k}` {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
    hint = (f" (the warmup was {before.warmup} steps: give `warmup_steps` {before.warmup})"
            if before.warmup != cfg.warmup else "")
    raise ValueError(f"resume: {detail} changes the learning rate of the {done} steps already "
                     f"taken; only a schedule whose past stays the same can change: constant, "
                     f"or wsd in its stable phase with the same warmup{hint}")
  if diff:
    detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
    raise ValueError(f"resume: the checkpoint was written with a different config ({detail})")


def _same_past_lr(a: TrainConfig, b: TrainConfig, done: int) -> bool:
  """The schedules of ``a`` and ``b`` give bit-identical learning rates at steps < ``done``."""
  import jax
  import numpy as np
  from jaxopt_llm.train.optimizers import build_schedule
  if done == 0:
    return True
  try:
    la, lb = build_schedule(a), build_schedule(b)
  except ValueError:
    return False
  t = np.arange(done, dtype=np.int32)
  return np.array_equal(np.asarray(jax.vmap(la)(t)), np.asarray(jax.vmap(lb)(t)))
