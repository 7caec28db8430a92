"""Named optimizer and schedule recipes for the tiny GPT (what ``--optimizer``/``--schedule`` pick).

Each ``OptimizerRecipe`` builds a ``jaxopt_llm.optim`` optimizer from a learning-rate schedule
and a weight decay, with a recommended peak lr and decay for this model (tuned on the
embedded corpus; see ``benchmarks``/README). Decoupled decay uses ``weight_decay_mask``
(matrices only: no biases, LayerNorm scales). ``uses_hessian`` marks Sophia: its train step
calls the Gauss-Newton-Bartlett estimator every ``hessian_every`` optimizer steps.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import optax

from jaxopt_llm import optim, schedules


@dataclasses.dataclass(frozen=True)
class OptimizerRecipe:
  build: Callable[[optax.Schedule, float], optax.GradientTransformation]
  lr: float             # recommended peak learning rate for the tiny GPT
  weight_decay: float   # recommended (decoupled or L2, as the optimizer defines it)
  uses_hessian: bool = False
  note: str = ""


def _sophia(lr, wd):
  if not hasattr(optim, "sophia"):
    raise ValueError("optimizer 'sophia' is not available in this version of jaxopt_llm")
  return optim.sophia(lr, b1=0.965, b2=0.99, rho=0.04, weight_decay=wd,
                      mask=optim.weight_decay_mask)


_MASK = optim.weight_decay_mask

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
        _sophia, lr=5e-4, weight_decay=0.1, uses_hessian=True,
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

# name -> (builder(peak_lr, warmup, total, min_lr) -> schedule). Every entry decays over the
# run's ``total`` optimizer steps so that "same budget" comparisons are fair.
SCHEDULES: dict[str, Callable[[float, int, int, float], optax.Schedule]] = {
    "warmup_cosine": lambda p, w, t, m: schedules.warmup_cosine(p, w, t, min_lr=m),
    "wsd": lambda p, w, t, m: schedules.wsd(
        p, w, max(t - w - max(t // 5, 1), 0), min(max(t // 5, 1), t - w), min_lr=m),
    "linear_decay": lambda p, w, t, m: schedules.linear_decay(p, w, t, min_lr=m),
    "polynomial_decay": lambda p, w, t, m: schedules.polynomial_decay(p, w, t, min_lr=m,
                                                                     power=2.0),
    "inverse_sqrt": lambda p, w, t, m: schedules.inverse_sqrt(p, w),
    "constant_with_warmup": lambda p, w, t, m: schedules.constant_with_warmup(p, w),
    "cosine_annealing": lambda p, w, t, m: schedules.cosine_annealing(p, t, eta_min=m),
    "constant": lambda p, w, t, m: schedules.constant_with_warmup(p, 0),
}


def optimizer_names() -> tuple[str, ...]:
  names = tuple(OPTIMIZERS)
  return names if hasattr(optim, "sophia") else tuple(n for n in names if n != "sophia")


def build_schedule(name: str, peak_lr: float, warmup_steps: int, total_steps: int,
                   min_lr: float = 0.0) -> optax.Schedule:
  """A schedule from ``SCHEDULES`` over ``total_steps`` optimizer steps (ValueError if unknown).

  ``wsd`` decays over the last 20% of the run; ``inverse_sqrt``, ``constant_with_warmup``
  and ``constant`` ignore ``min_lr``; ``cosine_annealing`` has no warmup.
  """
  if name not in SCHEDULES:
    raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {name!r}")
  return SCHEDULES[name](peak_lr, warmup_steps, total_steps, min_lr)


def build_optimizer(name: str, schedule: optax.Schedule, weight_decay: float | None = None,
                    *, clip: float = 1.0, accum: int = 1) -> optax.GradientTransformation:
  """``[MultiSteps(] clip_by_global_norm(clip) -> optimizer(schedule) [, accum)]``.

  ``clip <= 0`` disables clipping. With ``accum > 1``, ``optax.MultiSteps`` averages
  ``accum`` micro-batch gradients and applies one update every ``accum`` calls (the clip
  then acts on the averaged gradient, as it should). ``weight_decay=None`` takes the recipe's.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {optimizer_names()}, got {name!r}")
  recipe = OPTIMIZERS[name]
  wd = recipe.weight_decay if weight_decay is None else weight_decay
  tx = recipe.build(schedule, wd)
  if clip and clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx
