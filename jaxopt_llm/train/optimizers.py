"""The one builder: a ``TrainConfig`` -> (learning-rate schedule, optimizer).

``build(cfg)`` is what ``jaxopt-llm train``, ``compare`` and ``schedule`` all call. The
optimizer it returns is the whole update rule of a train step::

  skip_spikes( [MultiSteps(] clip_by_global_norm(clip) -> recipe(schedule, weight_decay) [, accum)] )

* ``OPTIMIZERS``: named recipes building a ``jaxopt_llm.optim`` optimizer from a schedule and
  a weight decay, with a recommended peak lr and decay for the tiny GPT (tuned on the
  embedded corpus, see README). Decoupled decay uses ``weight_decay_mask`` (matrices only).
  ``uses_hessian`` marks Sophia: its train step feeds it a Gauss-Newton-Bartlett estimate
  every ``hessian_every`` optimizer steps (``optim.hessian.update_every_k``).
* ``SCHEDULES``: named ``jaxopt_llm.schedules`` over the run's ``steps`` optimizer steps.
* ``optax.MultiSteps`` (only when ``accum > 1``) averages ``accum`` micro-batch gradients;
  the clip then acts on the average, as it should.
* ``optim.guards.skip_spikes`` (outermost: it judges each micro-batch's loss) skips
  non-finite steps and loss spikes.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import optax

from jaxopt_llm import optim, schedules
from jaxopt_llm.optim import guards

if TYPE_CHECKING:
  from jaxopt_llm.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe:
  build: Callable[[optax.Schedule, float], optax.GradientTransformation]
  lr: float             # recommended peak learning rate for the tiny GPT
  weight_decay: float   # recommended (decoupled or L2, as the optimizer defines it)
  uses_hessian: bool = False
  note: str = ""


_MASK = optim.weight_decay_mask

# The learning rate goes in positionally: the optimizers' first argument.
OPTIMIZERS: dict[str, OptimizerRecipe] = {
    "adamw": OptimizerRecipe(
        lambda lr, wd: optim.adamw(lr, b1=0.9, b2=0.95, weight_decay=wd, mask=_MASK),
        lr=1e-2, weight_decay=0.1, note="betas (0.9, 0.95), decay on matrices"),
    "adam": OptimizerRecipe(
        lambda lr, wd: optim.adam(lr, b1=0.9, b2=0.95), lr=3e-3, weight_decay=0.0,
        note="no weight decay"),
    "adam_l2": OptimizerRecipe(
        lambda lr, wd: optim.adam_l2(lr, b1=0.9, b2=0.95, weight_decay=wd, mask=_MASK),
        lr=3e-3, weight_decay=1e-4, note="coupled L2 decay"),
    "lion": OptimizerRecipe(
        lambda lr, wd: optim.lion(lr, b1=0.9, b2=0.99, weight_decay=wd, mask=_MASK),
        lr=1e-3, weight_decay=0.3, note="3x smaller lr, 3x larger decay than AdamW"),
    "sophia": OptimizerRecipe(
        lambda lr, wd: optim.sophia(lr, b1=0.965, b2=0.99, rho=0.04, weight_decay=wd,
                                    mask=_MASK),
        lr=5e-4, weight_decay=0.1, uses_hessian=True,
        note="SophiaG, GNB Hessian estimate every k steps"),
    "sgd": OptimizerRecipe(
        lambda lr, wd: optim.sgd(lr, weight_decay=wd, mask=_MASK), lr=0.5, weight_decay=0.0),
    "momentum": OptimizerRecipe(
        lambda lr, wd: optim.momentum(lr, beta=0.9, weight_decay=wd, mask=_MASK),
        lr=0.5, weight_decay=0.0, note="EMA momentum"),
    "nesterov": OptimizerRecipe(
        lambda lr, wd: optim.sgd(lr, momentum=0.9, nesterov=True, weight_decay=wd, mask=_MASK),
        lr=0.05, weight_decay=0.0, note="heavy-ball Nesterov (torch SGD)"),
    "adagrad": OptimizerRecipe(
        lambda lr, wd: optim.adagrad(lr, weight_decay=wd, mask=_MASK), lr=2e-2,
        weight_decay=0.0),
    "rmsprop": OptimizerRecipe(
        lambda lr, wd: optim.rmsprop(lr, alpha=0.99, weight_decay=wd, mask=_MASK), lr=1e-3,
        weight_decay=0.0),
}


def _wsd(cfg: TrainConfig, peak: float, min_lr: float) -> optax.Schedule:
  decay = max(cfg.steps // 5, 1) if cfg.decay_steps is None else cfg.decay_steps
  stable = cfg.steps - cfg.warmup - decay
  if stable < 0:
    raise ValueError(f"wsd: `warmup_steps` ({cfg.warmup}) + `decay_steps` ({decay}) exceed "
                     f"`steps` ({cfg.steps})")
  return schedules.wsd(peak, cfg.warmup, stable, decay, min_lr=min_lr,
                       decay_type=cfg.decay_type)


def _exponential(cfg: TrainConfig, peak: float, min_lr: float) -> optax.Schedule:
  # Default factor: reach the min lr (or peak / 100 when it is 0) at the last step.
  end = min_lr if min_lr > 0 else peak / 100
  gamma = (end / peak) ** (1.0 / cfg.steps) if cfg.gamma is None else cfg.gamma
  return schedules.exponential_lr(peak, gamma)


# name -> (cfg, peak lr, min lr) -> schedule over cfg.steps optimizer steps.
SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "warmup_cosine": lambda c, p, m: schedules.warmup_cosine(p, c.warmup, c.steps, min_lr=m),
    "wsd": _wsd,
    "linear_decay": lambda c, p, m: schedules.linear_decay(p, c.warmup, c.steps, min_lr=m),
    "polynomial_decay": lambda c, p, m: schedules.polynomial_decay(
        p, c.warmup, c.steps, min_lr=m, power=c.power),
    "inverse_sqrt": lambda c, p, m: schedules.inverse_sqrt(p, c.warmup),
    "constant_with_warmup": lambda c, p, m: schedules.constant_with_warmup(p, c.warmup),
    "constant": lambda c, p, m: schedules.constant_with_warmup(p, 0),
    "cosine_annealing": lambda c, p, m: schedules.cosine_annealing(p, c.steps, eta_min=m),
    "step_decay": lambda c, p, m: schedules.step_decay(
        p, max(c.steps // 3, 1), gamma=0.1 if c.gamma is None else c.gamma),
    "exponential_lr": _exponential,
}


def build_schedule(cfg: TrainConfig) -> optax.Schedule:
  """``cfg.schedule`` from its peak lr ``cfg.peak_lr`` to ``min_lr_ratio * peak`` over
  ``cfg.steps``. ``inverse_sqrt``, ``constant*`` and ``step_decay`` ignore the min lr,
  ``cosine_annealing``, ``step_decay`` and ``exponential_lr`` have no warmup."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {cfg.schedule!r}")
  peak = cfg.peak_lr
  return SCHEDULES[cfg.schedule](cfg, peak, cfg.min_lr_ratio * peak)


def build_optimizer(cfg: TrainConfig, schedule: optax.Schedule
                    ) -> optax.GradientTransformationExtraArgs:
  """The guarded, clipped (accumulated) recipe of ``cfg.optimizer`` driven by ``schedule``."""
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {cfg.optimizer!r}")
  recipe = OPTIMIZERS[cfg.optimizer]
  wd = recipe.weight_decay if cfg.weight_decay is None else cfg.weight_decay
  tx = recipe.build(schedule, wd)
  if cfg.clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), tx)
  if cfg.accum > 1:
    # MultiSteps forwards extra arguments (Sophia's hessian=) but is not an optax
    # GradientTransformationExtraArgs, so wrappers would drop them: say that it takes them.
    steps = optax.MultiSteps(tx, every_k_schedule=cfg.accum)
    tx = optax.GradientTransformationExtraArgs(steps.init, steps.update)
  return guards.skip_spikes(tx, k=cfg.spike_k, window=cfg.spike_window,
                            min_history=cfg.spike_min_history,
                            max_consecutive_skips=cfg.max_consecutive_skips)


def build(cfg: TrainConfig) -> tuple[optax.Schedule, optax.GradientTransformationExtraArgs]:
  """``(schedule, optimizer)`` for ``cfg``; ValueError on a bad combination."""
  schedule = build_schedule(cfg)
  return schedule, build_optimizer(cfg, schedule)
