"""A ``torch.optim.lr_scheduler`` object as our schedules, one per param group.

``describe(scheduler, steps=None)`` reads the scheduler into plain JSON data (its class,
``state_dict()`` without the callables, its children for ``SequentialLR`` /
``ChainedScheduler``, and what its lambdas are); ``build(desc, i, hyper)`` returns
``(learning_rate, momentum)`` for param group ``i``: the group's lr schedule (``n -> lr``
of the (n+1)-th step, ``jaxopt_llm.schedules``' convention) and, for a scheduler that
cycles momentum (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum=True``), the beta1 /
momentum schedule, else None. ``REGISTRY`` has one entry per torch class.

Lambdas (``LambdaLR``, ``MultiplicativeLR``):

* Hugging Face's ``get_*_schedule_with_warmup`` lambdas are recognised by their function
  (``functools.partial(_get_cosine_schedule_with_warmup_lr_lambda, num_warmup_steps=...,
  ...)`` in transformers >= 4.3x, a closure ``get_..._schedule_with_warmup.<locals>.lr_lambda``
  before) and keywords, and mapped to the closed forms of ``jaxopt_llm.schedules`` (see
  ``HF``; transformers is not needed), at every step (past ``num_training_steps`` Hugging
  Face's cosine rises again, and so does the converted schedule).
* Any other lambda (and a Hugging Face one whose keywords have no closed form here, e.g.
  ``num_cycles != 0.5`` or a warmup longer than the run) is *tabulated*: evaluated (in
  Python, as torch does) at steps ``0 .. steps-1`` when the conversion is made, and held at
  its last value afterwards (``schedules.lambda_lr`` / ``multiplicative_lr``). This
  needs ``steps`` (a ValueError names it otherwise), and a lambda that is a pure function of
  the step; ``desc["lambdas"][i]["tabulated"]`` records that it was done.

``ReduceLROnPlateau`` depends on the metrics, not the step: ``build`` returns
``PLATEAU`` for it, and the optimizer's converter chains
``jaxopt_llm.schedules.reduce_lr_on_plateau`` after each group's twin (fed the metric as
``tx.update(..., value=metric)``, where torch calls ``scheduler.step(metric)``).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Optional

import jax.numpy as jnp

from jaxopt_llm import schedules


def json_data(value: Any, where: Optional[str] = None) -> Any:
  """``value`` as JSON data: numbers, bools, strings, None, lists (from tuples), dicts
  (``collections.Counter``, MultiStepLR's milestones, included) and 1-element tensors (->
  float). Anything else (a callable, an object) is None, or, given ``where`` (what the value
  is, for the message), a TypeError."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (list, tuple)):
    return [json_data(v, where) for v in value]
  if isinstance(value, dict):
    return {str(k): json_data(v, where) for k, v in value.items()}
  if hasattr(value, "numel") and value.numel() == 1:  # a torch tensor hyperparameter
    return float(value.item())
  if where is not None:
    raise TypeError(f"from_torch: {where} is {type(value).__name__} {value!r}, which has no "
                    "JAX equivalent here (expected a number, a bool or a tuple of numbers)")
  return None


_DROP = ("_scale_fn_ref", "_scale_fn_custom", "lr_lambdas", "_schedulers", "optimizer",
         "_get_lr_called_within_step")


# ---------------------------------------------------------------------------------------
# Hugging Face lambdas


def _hf_cosine(base, kw):
  """``warmup_cosine`` up to ``num_training_steps``; past it, Hugging Face's cosine goes on
  (rises again towards the peak), and so does this schedule."""
  warmup, total = kw["num_warmup_steps"], kw["num_training_steps"]
  if float(kw.get("num_cycles", 0.5)) != 0.5 or total - warmup < 1:
    return None
  rate = float(kw.get("min_lr_rate", 0.0) or 0.0)
  closed = schedules.warmup_cosine(base, warmup, total, min_lr=base * rate)
  half_pi_per_step = math.pi / 2 / (total - warmup)

  def schedule(step):
    t = jnp.asarray(step).astype(jnp.float32)
    # 0.5 (1 + cos(pi p)) = cos(pi p / 2)**2: no cancellation just past the end
    wave = jnp.square(jnp.cos((t - warmup) * jnp.float32(half_pi_per_step)))
    past = jnp.float32(base) * (jnp.float32(rate) + jnp.float32(1.0 - rate) * wave)
    return jnp.where(t > total, past, closed(step))

  schedule.milestones = getattr(closed, "milestones", ())
  return schedule


def _hf_hard_restarts(base, kw):
  if int(kw.get("num_cycles", 1)) != 1:
    return None
  return schedules.warmup_cosine(base, kw["num_warmup_steps"], kw["num_training_steps"])


def _hf_polynomial(base, kw):
  ratio = float(kw["lr_end"]) / float(kw["lr_init"])
  return schedules.polynomial_decay(base, kw["num_warmup_steps"], kw["num_training_steps"],
                                    min_lr=base * ratio, power=kw["power"])


def _hf_inverse_sqrt(base, kw):
  timescale = kw.get("timescale")
  return schedules.inverse_sqrt(base, kw["num_warmup_steps"],
                                timescale if timescale is not None else None)


# Hugging Face lambda function name -> (base_lr, keywords) -> our schedule, or None when
# these keywords have no closed form here (then the lambda is tabulated).
HF: dict[str, Callable] = {
    "_get_constant_lambda": lambda base, kw: schedules.constant_with_warmup(base, 0),
    "_get_constant_schedule_with_warmup_lr_lambda":
        lambda base, kw: schedules.constant_with_warmup(base, kw["num_warmup_steps"]),
    "_get_linear_schedule_with_warmup_lr_lambda":
        lambda base, kw: schedules.linear_decay(base, kw["num_warmup_steps"],
                                                kw["num_training_steps"]),
    "_get_cosine_schedule_with_warmup_lr_lambda": _hf_cosine,
    "_get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda": _hf_hard_restarts,
    "_get_polynomial_decay_schedule_with_warmup_lr_lambda": _hf_polynomial,
    "_get_inverse_sqrt_schedule_lr_lambda": _hf_inverse_sqrt,
}
# transformers < 4.3x: closures named after the public function.
_HF_CLOSURES = {
    "get_constant_schedule.<locals>.<lambda>": "_get_constant_lambda",
    "get_constant_schedule_with_warmup.<locals>.lr_lambda":
        "_get_constant_schedule_with_warmup_lr_lambda",
    "get_linear_schedule_with_warmup.<locals>.lr_lambda":
        "_get_linear_schedule_with_warmup_lr_lambda",
    "get_cosine_schedule_with_warmup.<locals>.lr_lambda":
        "_get_cosine_schedule_with_warmup_lr_lambda",
    "get_cosine_with_hard_restarts_schedule_with_warmup.<locals>.lr_lambda":
        "_get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda",
    "get_polynomial_decay_schedule_with_warmup.<locals>.lr_lambda":
        "_get_polynomial_decay_schedule_with_warmup_lr_lambda",
}


def recognise(fn: Callable) -> Optional[tuple[str, dict]]:
  """``(HF function name, keywords)`` of a Hugging Face lambda, else None."""
  if isinstance(fn, functools.partial):
    name = getattr(fn.func, "__name__", "")
    if name in HF and not fn.args:
      return name, {k: json_data(v) for k, v in fn.keywords.items()}
    return None
  name = _HF_CLOSURES.get(getattr(fn, "__qualname__", ""))
  if name is None:
    return None
  code, cells = fn.__code__, fn.__closure__ or ()
  kw = {k: json_data(c.cell_contents) for k, c in zip(code.co_freevars, cells)}
  if name == "_get_polynomial_decay_schedule_with_warmup_lr_lambda" and "lr_init" not in kw:
    return None
  return name, kw


def _describe_lambda(fn: Callable, steps: Optional[int], multiplicative: bool, i: int) -> dict:
  if not multiplicative:
    hf = recognise(fn)
    if hf is not None:
      try:
        closed = HF[hf[0]](1.0, hf[1])
      except (ValueError, TypeError, KeyError):  # e.g. a warmup longer than the run
        closed = None
      if closed is not None:
        return {"hf": hf[0], "kwargs": hf[1]}
  if steps is None:
    raise ValueError(
        f"from_torch: the lambda of param group {i} ({getattr(fn, '__qualname__', fn)!r}) is "
        "not one this library recognises, so it is tabulated over the run: pass `steps` (the "
        "number of optimizer steps to tabulate)")
  if not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"from_torch: `steps` must be an integer >= 1, got {steps!r}")
  values = [float(fn(n)) for n in range(int(steps))]
  return {"tabulated": values, "multiplicative": multiplicative}


def describe(scheduler: Any, steps: Optional[int] = None) -> dict:
  """The scheduler as JSON data (see the module docstring)."""
  cls = type(scheduler)
  name = cls.__name__
  module = cls.__module__ or ""
  if not module.startswith("torch.optim") or name not in REGISTRY:
    raise TypeError(
        f"from_torch: `scheduler` must be a torch.optim.lr_scheduler scheduler of one of the "
        f"classes {', '.join(sorted(REGISTRY))}; got {module}.{cls.__qualname__}")
  state = {k: json_data(v) for k, v in scheduler.state_dict().items() if k not in _DROP}
  desc = {"class": name, "state": state}
  if name == "CyclicLR" and getattr(scheduler, "_scale_fn_custom", None) is not None:
    raise NotImplementedError("from_torch: CyclicLR with a custom `scale_fn` cannot be "
                              "converted; use mode='triangular', 'triangular2' or 'exp_range'")
  if name in ("LambdaLR", "MultiplicativeLR"):
    desc["lambdas"] = [_describe_lambda(fn, steps, name == "MultiplicativeLR", i)
                       for i, fn in enumerate(scheduler.lr_lambdas)]
  if name in ("SequentialLR", "ChainedScheduler"):
    desc["children"] = [describe(s, steps) for s in scheduler._schedulers]
  return desc


def position(scheduler: Any) -> int:
  """A torch scheduler's step count (``last_epoch``: ``scheduler.step()`` calls so far;
  a ChainedScheduler's is its first child's)."""
  while not hasattr(scheduler, "last_epoch") and getattr(scheduler, "_schedulers", None):
    scheduler = scheduler._schedulers[0]
  return int(scheduler.last_epoch)


# ---------------------------------------------------------------------------------------
# JSON data -> schedules


def _lambda(desc, i, hyper):
  del hyper
  base = desc["state"]["base_lrs"][i]
  lam = desc["lambdas"][i]
  if "hf" in lam:
    out = HF[lam["hf"]](base, lam["kwargs"])
    if out is not None:
      return out
    raise NotImplementedError(  # (describe tabulates these; a hand-written spec may not)
        f"from_torch: {lam['hf']} with {lam['kwargs']} has no closed form here")
  table = [float(v) for v in lam["tabulated"]]
  twin = schedules.multiplicative_lr if lam["multiplicative"] else schedules.lambda_lr
  return twin(base, table.__getitem__, len(table) - 1)


def _base(desc, i):
  return desc["state"]["base_lrs"][i]


def _step_lr(desc, i, hyper):
  s = desc["state"]
  return schedules.step_lr(_base(desc, i), s["step_size"], s["gamma"])


def _multi_step_lr(desc, i, hyper):
  s = desc["state"]
  milestones = sorted(int(k) for k, c in s["milestones"].items() for _ in range(int(c)))
  return schedules.multi_step_lr(_base(desc, i), milestones, s["gamma"])


def _constant_lr(desc, i, hyper):
  s = desc["state"]
  return schedules.constant_lr(_base(desc, i), s["factor"], s["total_iters"])


def _linear_lr(desc, i, hyper):
  s = desc["state"]
  return schedules.linear_lr(_base(desc, i), s["start_factor"], s["end_factor"],
                            s["total_iters"])


def _exponential_lr(desc, i, hyper):
  return schedules.exponential_lr(_base(desc, i), desc["state"]["gamma"])


def _polynomial_lr(desc, i, hyper):
  s = desc["state"]
  return schedules.polynomial_lr(_base(desc, i), s["total_iters"], s["power"])


def _cosine_annealing_lr(desc, i, hyper):
  s = desc["state"]
  return schedules.cosine_annealing_lr(_base(desc, i), s["T_max"], s["eta_min"])


def _warm_restarts(desc, i, hyper):
  s = desc["state"]
  return schedules.cosine_annealing_warm_restarts(_base(desc, i), s["T_0"], s["T_mult"],
                                                 s["eta_min"])


def _children(desc, i, hyper):
  out = [build(c, i, hyper) for c in desc["children"]]
  if any(m is not None for _, m in out):
    raise NotImplementedError(f"from_torch: a {desc['class']} whose children cycle momentum")
  return [lr for lr, _ in out]


def _sequential_lr(desc, i, hyper):
  return schedules.sequential_lr(_children(desc, i, hyper),
                                [int(m) for m in desc["state"]["_milestones"]])


def _unit_base(desc):
  """``desc`` with every base lr 1.0: the factor schedule of a chained scheduler."""
  state = dict(desc["state"])
  if "base_lrs" in state:
    state["base_lrs"] = [1.0] * len(state["base_lrs"])
  out = dict(desc, state=state)
  if "children" in desc:
    out["children"] = [_unit_base(c) for c in desc["children"]]
  return out


def _chained(desc, i, hyper):
  factors = _children(_unit_base(desc), i, hyper)
  return schedules.chained_scheduler(_base(desc["children"][0], i), factors)


def _cyclic_lr(desc, i, hyper):
  s = desc["state"]
  up = int(round(s["total_size"] * s["step_ratio"]))
  down = int(round(s["total_size"])) - up
  lr = schedules.cyclic_lr(_base(desc, i), s["max_lrs"][i], step_size_up=up,
                          step_size_down=down, mode=s["mode"], gamma=s["gamma"])
  mom = None
  if s["cycle_momentum"]:
    mom = schedules.cyclic_momentum(s["base_momentums"][i], s["max_momentums"][i],
                                   step_size_up=up, step_size_down=down, mode=s["mode"],
                                   gamma=s["gamma"])
  return lr, mom


def _one_cycle(desc, i, hyper):
  s = desc["state"]
  phases = s["_schedule_phases"]
  three_phase = len(phases) == 3
  total = int(s["total_steps"])
  pct_start = (float(phases[0]["end_step"]) + 1.0) / total
  anneal = s["_anneal_func_type"]
  # torch stores the group's initial/max/min lr in the param group; base_lrs is unused.
  initial = hyper["initial_lr"]
  max_lr, min_lr = hyper["max_lr"], hyper["min_lr"]
  lr = schedules.one_cycle_lr(max_lr, total, pct_start=pct_start, anneal_strategy=anneal,
                             div_factor=max_lr / initial, final_div_factor=initial / min_lr,
                             three_phase=three_phase)
  mom = None
  if s["cycle_momentum"]:
    mom = schedules.one_cycle_momentum(total, pct_start=pct_start, anneal_strategy=anneal,
                                      base_momentum=hyper["base_momentum"],
                                      max_momentum=hyper["max_momentum"],
                                      three_phase=three_phase)
  return lr, mom


def _lr_only(fn):
  return lambda desc, i, hyper: (fn(desc, i, hyper), None)


# torch.optim.lr_scheduler class name -> (desc, group index, group hyper) -> (lr, momentum).
REGISTRY: dict[str, Callable] = {
    "LambdaLR": _lr_only(_lambda),
    "MultiplicativeLR": _lr_only(_lambda),
    "StepLR": _lr_only(_step_lr),
    "MultiStepLR": _lr_only(_multi_step_lr),
    "ConstantLR": _lr_only(_constant_lr),
    "LinearLR": _lr_only(_linear_lr),
    "ExponentialLR": _lr_only(_exponential_lr),
    "PolynomialLR": _lr_only(_polynomial_lr),
    "CosineAnnealingLR": _lr_only(_cosine_annealing_lr),
    "CosineAnnealingWarmRestarts": _lr_only(_warm_restarts),
    "SequentialLR": _lr_only(_sequential_lr),
    "ChainedScheduler": _lr_only(_chained),
    "CyclicLR": _cyclic_lr,
    "OneCycleLR": _one_cycle,
    "ReduceLROnPlateau": lambda desc, i, hyper: (PLATEAU, None),
}
# ``build``'s learning rate for ReduceLROnPlateau: the optimizer chains the transformation.
PLATEAU = "ReduceLROnPlateau"


def plateau(desc: dict, i: int, lr: float) -> Any:
  """``schedules.reduce_lr_on_plateau`` for param group ``i`` of a described
  ReduceLROnPlateau, relative to ``lr`` (the rate the group's twin is built with)."""
  s = desc["state"]
  return schedules.reduce_lr_on_plateau(
      lr, mode=s["mode"], factor=s["factor"], patience=s["patience"],
      threshold=s["threshold"], threshold_mode=s["threshold_mode"], cooldown=s["cooldown"],
      min_lr=s["min_lrs"][i], eps=s["eps"])


def build(desc: dict, i: int, hyper: dict) -> tuple[Callable, Optional[Callable]]:
  """``(learning_rate, momentum)`` schedules of param group ``i`` (``hyper``: the group's
  hyperparameters as ``describe`` of the optimizer read them, torch's extra keys such as
  OneCycleLR's ``max_lr`` included)."""
  fn = REGISTRY.get(desc["class"])
  if fn is None:
    raise NotImplementedError(f"from_torch: torch's {desc['class']} has no twin here")
  return fn(desc, i, hyper)

