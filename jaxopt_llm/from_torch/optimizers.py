"""A ``torch.optim`` optimizer (and its scheduler) as one ``optax.GradientTransformation``.

The conversion has two halves, so that a recorded run (``replay.py``) can be converted
without torch objects:

* ``describe(optimizer, scheduler, named_parameters)`` reads the torch objects into a
  *spec*: plain JSON data (the optimizer's class name, each param group's parameter names
  and hyperparameters, the scheduler's description from ``schedulers.describe``);
* ``build(spec)`` makes the optax transformation from a spec: one twin from
  ``jaxopt_llm.optim`` per param group (``REGISTRY``: one entry per torch class), each with
  its group's learning-rate schedule (and momentum schedule, for OneCycleLR / CyclicLR with
  ``cycle_momentum``), combined with ``optax.multi_transform`` over a flat dict
  ``{name: array}``. Parameters not in any group (frozen in torch) get a zero update.

Options: ``maximize`` is honoured (the gradient is negated first, as torch does);
``amsgrad``, ``nesterov``, ``centered``, ``decoupled_weight_decay`` are honoured by the
twins; ``foreach``, ``fused``, ``capturable`` and ``differentiable`` are ignored: they change
how torch computes a step (kernels, CUDA-graph capture, autograd through the step), not its
value. ``LBFGS`` (needs a closure re-evaluating the loss several times per step) and
``SparseAdam`` (sparse gradients) raise NotImplementedError; any other class, including a
subclass of a torch optimizer (its ``step`` may differ), raises a TypeError naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
import optax

from jaxopt_llm import optim

SPEC_FORMAT = 1
# Options that change how torch computes a step, not its value.
IGNORED = ("foreach", "fused", "capturable", "differentiable")
# Keys a scheduler adds to the param groups (OneCycleLR's; CyclicLR's are in its state).
SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")
UNSUPPORTED = {
    "LBFGS": "it needs a closure that re-evaluates the loss several times per step (a line "
             "search); optax's equivalent is optax.lbfgs, driven by value_and_grad",
    "SparseAdam": "it updates only the rows present in sparse gradients; JAX has dense "
                  "gradients (use optim.adam, which differs on rows with zero gradient)",
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """How one ``torch.optim`` class becomes a twin from ``jaxopt_llm.optim``.

  ``build(hyper, learning_rate, momentum)`` returns the transformation of one param group
  (``hyper``: the group's hyperparameters, torch's keys; ``momentum``: None or a schedule
  of beta1 / momentum for a scheduler that cycles it). ``state_keys``: our state field ->
  torch's per-parameter state key (``count`` is torch's ``step``). ``momentum_key``: the
  group key a cycling scheduler changes (``"betas"`` or ``"momentum"``), None if none.
  """
  twin: str
  build: Callable[..., optax.GradientTransformation]
  state_keys: dict
  momentum_key: Optional[str] = None
  linear_in_lr: bool = True  # the step is lr times something (ReduceLROnPlateau can scale it)


def _b1(hyper, momentum):
  return hyper["betas"][0] if momentum is None else momentum


def _sgd(h, lr, momentum):
  mom = h["momentum"] if momentum is None else momentum
  return optim.sgd(lr, mom, dampening=h["dampening"], nesterov=h["nesterov"],
                   weight_decay=h["weight_decay"])


def _adam(h, lr, momentum):
  b1, b2 = _b1(h, momentum), h["betas"][1]
  if h.get("decoupled_weight_decay", False):
    return optim.adamw(lr, b1, b2, h["eps"], weight_decay=h["weight_decay"],
                       amsgrad=h["amsgrad"])
  if h["weight_decay"] == 0:
    return optim.adam(lr, b1, b2, h["eps"], amsgrad=h["amsgrad"])
  return optim.adam_l2(lr, b1, b2, h["eps"], weight_decay=h["weight_decay"],
                       amsgrad=h["amsgrad"])


def _adamw(h, lr, momentum):
  return optim.adamw(lr, _b1(h, momentum), h["betas"][1], h["eps"],
                     weight_decay=h["weight_decay"], amsgrad=h["amsgrad"])


def _adagrad(h, lr, momentum):
  del momentum
  return optim.adagrad(lr, lr_decay=h["lr_decay"], weight_decay=h["weight_decay"],
                       initial_accumulator_value=h["initial_accumulator_value"], eps=h["eps"])


def _rmsprop(h, lr, momentum):
  mom = h["momentum"] if momentum is None else momentum
  return optim.rmsprop(lr, alpha=h["alpha"], eps=h["eps"], weight_decay=h["weight_decay"],
                       momentum=mom, centered=h["centered"])


def _nadam(h, lr, momentum):
  return optim.nadam(lr, _b1(h, momentum), h["betas"][1], h["eps"],
                        weight_decay=h["weight_decay"], momentum_decay=h["momentum_decay"],
                        decoupled_weight_decay=h["decoupled_weight_decay"])


def _radam(h, lr, momentum):
  return optim.radam(lr, _b1(h, momentum), h["betas"][1], h["eps"],
                        weight_decay=h["weight_decay"],
                        decoupled_weight_decay=h["decoupled_weight_decay"])


def _adamax(h, lr, momentum):
  return optim.adamax(lr, _b1(h, momentum), h["betas"][1], h["eps"],
                         weight_decay=h["weight_decay"])


def _adadelta(h, lr, momentum):
  del momentum
  return optim.adadelta(lr, h["rho"], h["eps"], weight_decay=h["weight_decay"])


def _asgd(h, lr, momentum):
  del momentum
  return optim.asgd(lr, h["lambd"], h["alpha"], h["t0"], weight_decay=h["weight_decay"])


def _rprop(h, lr, momentum):
  del momentum
  # torch's Rprop reads the lr once, as the initial step size (the first step's lr).
  first = float(lr(0)) if callable(lr) else lr
  return optim.rprop(first, tuple(h["etas"]), tuple(h["step_sizes"]))


def _adafactor(h, lr, momentum):
  del momentum
  return optim.adafactor(lr, h["beta2_decay"], tuple(h["eps"]), h["d"],
                            weight_decay=h["weight_decay"])


def _muon(h, lr, momentum):
  mom = h["momentum"] if momentum is None else momentum
  return optim.muon(lr, weight_decay=h["weight_decay"], momentum=mom,
                       nesterov=h["nesterov"], ns_coefficients=tuple(h["ns_coefficients"]),
                       eps=h["eps"], ns_steps=h["ns_steps"], adjust_lr_fn=h["adjust_lr_fn"])


_ADAM_STATE = {"count": "step", "mu": "exp_avg", "nu": "exp_avg_sq",
               "nu_max": "max_exp_avg_sq"}

# torch.optim class name -> Entry. A new twin is one entry here (and its state NamedTuple
# in ``state.py``'s lookup, found by type).
REGISTRY: dict[str, Entry] = {
    "SGD": Entry("sgd", _sgd, {"trace": "momentum_buffer"}, "momentum"),
    "Adam": Entry("adam", _adam, _ADAM_STATE, "betas"),
    "AdamW": Entry("adamw", _adamw, _ADAM_STATE, "betas"),
    "Adagrad": Entry("adagrad", _adagrad, {"count": "step", "sum_of_squares": "sum"}),
    "RMSprop": Entry("rmsprop", _rmsprop,
                     {"count": "step", "square_avg": "square_avg", "grad_avg": "grad_avg",
                      "momentum_buffer": "momentum_buffer"}, "momentum"),
    "NAdam": Entry("nadam", _nadam, {"count": "step", "mu_product": "mu_product",
                                     "mu": "exp_avg", "nu": "exp_avg_sq"}, "betas"),
    "RAdam": Entry("radam", _radam, {"count": "step", "mu": "exp_avg", "nu": "exp_avg_sq"},
                   "betas"),
    "Adamax": Entry("adamax", _adamax, {"count": "step", "mu": "exp_avg", "nu": "exp_inf"},
                    "betas"),
    "Adadelta": Entry("adadelta", _adadelta, {"count": "step", "square_avg": "square_avg",
                                              "acc_delta": "acc_delta"}),
    "ASGD": Entry("asgd", _asgd, {"count": "step", "eta": "eta", "mu": "mu", "ax": "ax"},
                  linear_in_lr=False),
    "Rprop": Entry("rprop", _rprop, {"count": "step", "prev": "prev",
                                     "step_size": "step_size"}, linear_in_lr=False),
    "Adafactor": Entry("adafactor", _adafactor, {"count": "step", "row_var": "row_var",
                                                 "col_var": "col_var",
                                                 "variance": "variance"},
                       linear_in_lr=False),
    "Muon": Entry("muon", _muon, {"momentum_buffer": "momentum_buffer"}, "momentum"),
}


def register(torch_name: str, entry: Entry) -> None:
  """Adds (or replaces) the entry of ``torch.optim.<torch_name>``."""
  REGISTRY[torch_name] = entry


# ---------------------------------------------------------------------------------------
# torch objects -> spec (plain data)


def check_optimizer(optimizer: Any) -> tuple[str, Entry]:
  """``(class name, registry entry)``, or the error naming what is unsupported."""
  cls = type(optimizer)
  name = cls.__name__
  module = cls.__module__ or ""
  is_torch = module == "torch.optim" or module.startswith("torch.optim.")
  if is_torch and name in UNSUPPORTED:
    raise NotImplementedError(f"from_torch: torch.optim.{name} is not supported: "
                              f"{UNSUPPORTED[name]}")
  if not is_torch or name not in REGISTRY:
    bases = [b.__module__ + "." + b.__qualname__ for b in cls.__mro__[1:3]]
    raise TypeError(
        f"from_torch: `optimizer` must be a torch.optim optimizer of one of the classes "
        f"{', '.join(sorted(REGISTRY))}; got {module}.{cls.__qualname__} (bases "
        f"{', '.join(bases)}). A custom Optimizer subclass has its own step(), which cannot "
        "be converted: write its rule as an optax transformation")
  return name, REGISTRY[name]


def parameter_names(optimizer: Any, named_parameters: Any = None) -> list[list[str]]:
  """The name of each parameter of each param group: ``model.named_parameters()`` names
  when given (matched by identity), else ``"group{i}.{j}"``."""
  if named_parameters is None:
    return [[f"group{i}.{j}" for j in range(len(g["params"]))]
            for i, g in enumerate(optimizer.param_groups)]
  pairs = list(named_parameters.items() if isinstance(named_parameters, dict)
               else named_parameters)
  by_id = {}
  for pair in pairs:
    if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
      raise TypeError("from_torch: `named_parameters` must be model.named_parameters() "
                      f"(pairs (name, tensor)) or a dict name -> tensor, got an item {pair!r}")
    by_id[id(pair[1])] = pair[0]
  names = []
  for i, g in enumerate(optimizer.param_groups):
    row = []
    for j, p in enumerate(g["params"]):
      if id(p) not in by_id:
        raise ValueError(f"from_torch: parameter {j} of param group {i} (shape "
                         f"{tuple(p.shape)}) is not in `named_parameters`")
      row.append(by_id[id(p)])
    names.append(row)
  flat = [n for row in names for n in row]
  if len(set(flat)) != len(flat):
    raise ValueError("from_torch: a parameter appears twice in the optimizer's param groups")
  return names


def describe(optimizer: Any, scheduler: Any = None, *, named_parameters: Any = None,
             steps: Optional[int] = None) -> dict:
  """The spec (JSON data) of ``optimizer`` and ``scheduler``; see ``build``.

  ``steps``: how many steps to tabulate an unrecognised ``LambdaLR`` /
  ``MultiplicativeLR`` lambda over (``schedulers.describe``).
  """
  from jaxopt_llm.from_torch import schedulers

  name, _ = check_optimizer(optimizer)
  names = parameter_names(optimizer, named_parameters)
  keys = [k for k in optimizer.defaults if k not in IGNORED]
  groups = []
  for i, g in enumerate(optimizer.param_groups):
    for j, p in enumerate(g["params"]):
      if getattr(p, "is_sparse", False) or getattr(p, "is_complex", lambda: False)():
        raise NotImplementedError(f"from_torch: parameter {names[i][j]!r} is sparse or "
                                  "complex; only dense real parameters are supported")
    hyper = {k: schedulers.json_data(g[k], f"param group {i}'s {k!r}")
             for k in [*keys, *(k for k in SCHEDULER_KEYS if k in g)]}
    groups.append({"names": names[i], "hyper": hyper,
                   "shapes": [list(p.shape) for p in g["params"]]})
  sched = None
  if scheduler is not None:
    if getattr(scheduler, "optimizer", None) is not optimizer:
      raise ValueError("from_torch: `scheduler` was not built on this `optimizer`")
    sched = schedulers.describe(scheduler, steps=steps)
  return {"format": SPEC_FORMAT, "optimizer": name, "groups": groups, "scheduler": sched}


# ---------------------------------------------------------------------------------------
# spec -> optax


def _negate() -> optax.GradientTransformation:
  """``maximize=True``: torch negates the gradient before anything else."""
  return optax.scale(-1.0)


def group_label(i: int) -> str:
  return f"group{i}"


FROZEN = "not_in_optimizer"


def build(spec: dict) -> optax.GradientTransformation:
  """The transformation a spec (``describe``) describes: ``optax.multi_transform`` over
  ``{name: array}`` with one twin per param group, labelled ``"group{i}"``."""
  from jaxopt_llm.from_torch import schedulers

  if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
    raise ValueError(f"from_torch: not a spec of format {SPEC_FORMAT}: {str(spec)[:200]}")
  entry = REGISTRY.get(spec["optimizer"])
  if entry is None:
    raise TypeError(f"from_torch: no twin for torch.optim.{spec['optimizer']}")
  transforms = {}
  labels = {}
  for i, group in enumerate(spec["groups"]):
    hyper = group["hyper"]
    lr, mom = hyper["lr"], None
    if spec["scheduler"] is not None:
      lr, mom = schedulers.build(spec["scheduler"], i, hyper)
    plateau = None
    if isinstance(lr, str) and lr == schedulers.PLATEAU:
      if not entry.linear_in_lr:
        raise NotImplementedError(
            f"from_torch: ReduceLROnPlateau with torch.optim.{spec['optimizer']}: its step is "
            "not proportional to the lr, so the plateau's scaling cannot follow it")
      lr = hyper["lr"]
      plateau = schedulers.plateau(spec["scheduler"], i, lr)
    if mom is not None and entry.momentum_key is None:
      raise NotImplementedError(
          f"from_torch: the scheduler cycles momentum, which torch.optim.{spec['optimizer']} "
          "does not have")
    tx = entry.build(hyper, lr, mom)
    if plateau is not None:
      tx = optax.chain(tx, plateau)
    if hyper.get("maximize", False):
      tx = optax.chain(_negate(), tx)
    transforms[group_label(i)] = tx
    for n in group["names"]:
      labels[n] = group_label(i)
  transforms[FROZEN] = optax.set_to_zero()

  def label_fn(params):
    if not isinstance(params, dict):
      raise TypeError("from_torch: the parameters must be a flat dict {name: array} "
                      f"(from_torch.params), got {type(params).__name__}")
    return {k: labels.get(k, FROZEN) for k in params}

  return optax.multi_transform(transforms, label_fn)


def optimizer(optimizer: Any, scheduler: Any = None, *, named_parameters: Any = None,
              steps: Optional[int] = None) -> optax.GradientTransformation:
  """The optax twin of a torch optimizer (and of its scheduler), param groups included.

  Returns one ``optax.GradientTransformation`` over a flat dict ``{name: array}`` keyed by
  the ``model.named_parameters()`` names given as ``named_parameters`` (or
  ``"group{i}.{j}"`` without them; ``from_torch.params`` builds that dict). Each param
  group is ``jaxopt_llm.optim``'s twin with the group's hyperparameters and the group's
  schedule (``scheduler``'s values for that group, stepped once per optimizer step, as
  ``scheduler.step()`` after every ``optimizer.step()``). Parameters of ``params`` that are
  in no group are left unchanged. The schedule starts at step 0 (a fresh scheduler); for a
  run already under way, ``from_torch.opt_state`` sets the position.

  ``steps``: for an unrecognised ``LambdaLR`` / ``MultiplicativeLR`` lambda, the number of
  steps its values are tabulated over (held at the last value afterwards); required then.

  A scheduler that cycles momentum (``OneCycleLR``, ``CyclicLR(cycle_momentum=True)``)
  makes ``b1`` / ``momentum`` a schedule too, as torch rewrites it every step. A
  ``ReduceLROnPlateau`` becomes ``jaxopt_llm.schedules.reduce_lr_on_plateau`` chained
  after each group's twin: pass the metric as ``tx.update(grads, state, params,
  value=metric)`` at the steps where torch calls ``scheduler.step(metric)`` (not for Rprop,
  ASGD, Adafactor, whose step is not proportional to the lr).

  Raises NotImplementedError (LBFGS, SparseAdam, a scheduler or option without a twin),
  TypeError (another optimizer or scheduler class, a custom subclass) naming what is
  unsupported.
  """
  return build(describe(optimizer, scheduler, named_parameters=named_parameters,
                        steps=steps))


def params(named_parameters: Any) -> dict:
  """``{name: jax array}`` from ``model.named_parameters()``, a dict of tensors, or a torch
  optimizer (names ``"group{i}.{j}"``). Same dtypes (bfloat16 included), copied."""
  if hasattr(named_parameters, "param_groups"):
    names = parameter_names(named_parameters)
    pairs = [(n, p) for row, g in zip(names, named_parameters.param_groups)
             for n, p in zip(row, g["params"])]
  elif isinstance(named_parameters, dict):
    pairs = list(named_parameters.items())
  else:
    pairs = list(named_parameters)
  return {n: to_jax(t) for n, t in pairs}


def to_jax(tensor: Any) -> Any:
  """A torch tensor as a jax array of the same dtype (a copy)."""
  import torch

  t = tensor.detach().cpu()
  if t.dtype == torch.bfloat16:
    return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
  return jnp.asarray(t.numpy().copy())

