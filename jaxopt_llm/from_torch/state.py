"""Optimizer state both ways: a torch run continued in JAX, a JAX run continued in torch.

``opt_state(optimizer, tx, params)`` is ``tx.init(params)`` with torch's per-parameter
state written in (moments, buffers, step counts: ``REGISTRY``'s ``state_keys`` say which
torch key fills which field of our state NamedTuple) and the schedules' step counts set to
the scheduler's position (``scheduler.last_epoch``). ``to_torch_state(state, optimizer)``
writes such a state back into a torch optimizer (and steps a fresh scheduler to the same
position, so torch's own recursive formulas give its values).

Both refuse, naming it, a torch state key that has no field here (state is never dropped
silently) and a parameter whose shape differs.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm.from_torch import schedulers
from jaxopt_llm.from_torch.optimizers import (
    REGISTRY,
    check_optimizer,
    group_label,
    parameter_names,
)

COUNT = "count"


def _is_state(node: Any) -> bool:
  return isinstance(node, tuple) and hasattr(node, "_fields")


def _map_states(node: Any, fn) -> Any:
  """Rebuilds ``node`` (nested tuples / NamedTuples), replacing each NamedTuple for which
  ``fn`` returns something other than None."""
  if _is_state(node):
    new = fn(node)
    if new is not None:
      return new
    return type(node)(*[_map_states(getattr(node, f), fn) for f in node._fields])
  if isinstance(node, tuple):
    return tuple(_map_states(x, fn) for x in node)
  return node


def _visit_states(node: Any, fn) -> None:
  if _is_state(node):
    fn(node)
    for f in node._fields:
      _visit_states(getattr(node, f), fn)
  elif isinstance(node, tuple):
    for x in node:
      _visit_states(x, fn)


def _direction_fields(node: Any, state_keys: dict) -> bool:
  """Is ``node`` the state of an optimizer's direction (holds a mapped moment field)?"""
  return any(f in state_keys and f != COUNT for f in node._fields)


def _groups(state: Any, n_groups: int) -> list:
  if not isinstance(state, optax.MultiTransformState):
    raise TypeError("from_torch: `state` must be the state of a transformation made by "
                    f"from_torch.optimizer, got {type(state).__name__}")
  inner = state.inner_states
  missing = [group_label(i) for i in range(n_groups) if group_label(i) not in inner]
  if missing:
    raise ValueError(f"from_torch: the state has no {missing[0]!r}: it was not made for "
                     "this optimizer's param groups")
  return [inner[group_label(i)] for i in range(n_groups)]


PLATEAU_FIELDS = ("lr", "best", "num_bad_epochs", "cooldown_counter", COUNT)


def _is_plateau(node: Any) -> bool:
  return tuple(node._fields) == PLATEAU_FIELDS


def fill(state: Any, spec_optimizer: str, group_names: list[list[str]],
         torch_state: dict[str, dict[str, np.ndarray]], position: Optional[int],
         plateau: Optional[dict] = None) -> Any:
  """``state`` (``tx.init(params)`` of ``build(spec)``) with torch's per-parameter state
  ``torch_state`` (name -> key -> numpy array, absent for a parameter torch has no state
  for) written in, and the schedule counts set to ``position`` (None: left at 0).
  ``plateau``: a described ReduceLROnPlateau's ``state`` (its counters and best metric)."""
  entry = REGISTRY[spec_optimizer]
  keys = entry.state_keys
  known = set(keys.values())
  groups = _groups(state, len(group_names))
  new_inner = dict(state.inner_states)
  for i, names in enumerate(group_names):
    have = {n: torch_state.get(n, {}) for n in names}
    for n, st in have.items():
      extra = sorted(set(st) - known)
      if extra:
        raise NotImplementedError(
            f"from_torch: torch.optim.{spec_optimizer}'s state of {n!r} holds {extra}, which "
            f"jaxopt_llm.optim.{entry.twin}'s state has no field for")
    steps = [float(np.asarray(st["step"])) for st in have.values() if "step" in st]
    started = any(st for st in have.values())
    if steps:
      count = int(max(steps))
    elif started:
      count = position if position is not None else 1
    else:
      count = 0
    used = set()

    def write(node):
      if plateau is not None and _is_plateau(node):
        return node._replace(
            best=jnp.asarray(float(plateau["best"]), node.best.dtype),
            num_bad_epochs=jnp.asarray(plateau["num_bad_epochs"], node.num_bad_epochs.dtype),
            cooldown_counter=jnp.asarray(plateau["cooldown_counter"],
                                         node.cooldown_counter.dtype),
            count=jnp.asarray(plateau["last_epoch"], node.count.dtype))
      if not _direction_fields(node, keys):
        if node._fields == (COUNT,):  # a schedule's step count (lr, weight decay)
          return node._replace(count=jnp.asarray(position if position is not None else count,
                                                 node.count.dtype))
        return None
      out = {}
      for f in node._fields:
        value = getattr(node, f)
        if f == COUNT:
          out[f] = jnp.asarray(count, jnp.asarray(value).dtype)
        elif f in keys and value is not None and not isinstance(value, dict):
          # a per-group scalar (NAdam's mu_product, ASGD's eta and mu): torch keeps one per
          # parameter, all equal within a group
          got = [np.asarray(have[n][keys[f]]) for n in names if keys[f] in have[n]]
          out[f] = jnp.asarray(got[0]).astype(jnp.asarray(value).dtype) if got else value
          used.update((n, keys[f]) for n in names if keys[f] in have[n])
        elif f in keys and value is not None:
          tree = dict(value)
          for n in names:
            if keys[f] in have[n]:
              arr = np.asarray(have[n][keys[f]])
              like = tree[n]
              if like is None or isinstance(like, optax.MaskedNode):
                continue
              if tuple(arr.shape) != tuple(like.shape):
                raise ValueError(f"from_torch: torch's {keys[f]!r} of {n!r} has shape "
                                 f"{arr.shape}, the parameter {like.shape}")
              tree[n] = jnp.asarray(arr).astype(like.dtype)
              used.add((n, keys[f]))
          out[f] = type(value)(tree) if isinstance(value, dict) else tree
        else:
          out[f] = value
      return type(node)(**out)

    new_inner[group_label(i)] = _map_states(groups[i], write)
    for n, st in have.items():
      lost = sorted(k for k in st if k != "step" and (n, k) not in used)
      if lost:
        raise NotImplementedError(
            f"from_torch: torch's {lost} of {n!r} found no place in the converted state "
            f"(jaxopt_llm.optim.{entry.twin} was built with other options?)")
  return state._replace(inner_states=new_inner)


def torch_state_arrays(optimizer: Any, group_names: list[list[str]]) -> dict:
  """``{name: {key: numpy array}}`` of a torch optimizer's per-parameter state."""
  out = {}
  for names, g in zip(group_names, optimizer.param_groups):
    for n, p in zip(names, g["params"]):
      st = optimizer.state.get(p, {})
      if st:
        out[n] = {k: _numpy(v) for k, v in st.items()}
  return out


def _numpy(v: Any) -> np.ndarray:
  if hasattr(v, "detach"):
    t = v.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      t = t.float()
    return t.numpy().copy()
  return np.asarray(v)


def opt_state(optimizer: Any, tx: optax.GradientTransformation, params: dict, *,
              scheduler: Any = None, named_parameters: Any = None) -> Any:
  """``tx``'s state holding ``optimizer``'s current state (and ``scheduler``'s position).

  ``tx`` is ``from_torch.optimizer(optimizer, scheduler, named_parameters=...)``; ``params``
  the dict ``from_torch.params(...)`` of the same names (the parameters torch has now). A
  run trained N steps in torch then continues in JAX on the same trajectory:
  ``tx.update(grads, state, params)`` from here gives torch's step N+1. Pass the
  ``scheduler`` given to ``from_torch.optimizer`` (its ``last_epoch`` is the schedules'
  position) and the same ``named_parameters``.
  """
  name, _ = check_optimizer(optimizer)
  names = parameter_names(optimizer, named_parameters)
  position, plateau = None, None
  if _is_torch_plateau(scheduler):  # counts metrics, not steps
    plateau = schedulers.describe(scheduler)["state"]
  elif scheduler is not None:
    position = schedulers.position(scheduler)
  return fill(tx.init(params), name, names, torch_state_arrays(optimizer, names), position,
              plateau)


def _is_torch_plateau(scheduler: Any) -> bool:
  return type(scheduler).__name__ == schedulers.PLATEAU


def schedule_position(state: Any) -> Optional[int]:
  """The step count held in a converted state (its first ``count``; None if none)."""
  found = []
  _visit_states(state.inner_states[group_label(0)],
                lambda s: found.append(int(s.count)) if COUNT in s._fields else None)
  return found[0] if found else None


def to_torch_state(state: Any, optimizer: Any, scheduler: Any = None, *,
                   params: Optional[dict] = None, named_parameters: Any = None) -> None:
  """Writes a converted state back into ``optimizer`` (in place): a JAX run resumed in torch.

  ``state``: the state of ``from_torch.optimizer(optimizer, scheduler, ...)``. ``params``
  (optional): the JAX parameters ``{name: array}``, copied into the torch parameters.
  ``scheduler``: a scheduler built on ``optimizer`` not stepped further than the state's
  position; it is stepped there (torch's own arithmetic sets the group lrs and momenta).
  """
  import torch

  name, entry = check_optimizer(optimizer)
  names = parameter_names(optimizer, named_parameters)
  groups = _groups(state, len(names))
  keys = entry.state_keys
  scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
  by_name = {n: p for row, g in zip(names, optimizer.param_groups) for n, p in zip(row,
                                                                                   g["params"])}
  for i, row in enumerate(names):
    found = []
    _visit_states(groups[i], lambda s: found.append(s) if _direction_fields(s, keys) else None)
    for node in found[:1]:
      count = int(getattr(node, COUNT, 0) or 0) if COUNT in node._fields else None
      for n in row:
        p = by_name[n]
        st = {}
        for f, key in keys.items():
          value = getattr(node, f, None) if f in node._fields else None
          if f == COUNT or value is None:
            continue
          if not isinstance(value, dict):  # a per-group scalar
            st[key] = torch.tensor(float(np.asarray(value)), dtype=scalar)
            continue
          if value[n] is None or isinstance(value[n], optax.MaskedNode):
            continue
          arr = np.asarray(value[n])
          st[key] = torch.from_numpy(arr.astype(np.float32) if arr.dtype == jnp.bfloat16
                                     else arr.copy()).to(dtype=p.dtype, device=p.device)
        if count is not None and "count" in keys:
          st[keys["count"]] = torch.tensor(float(count), dtype=scalar)
        if count == 0:  # nothing accumulated yet: torch starts from an empty state
          st = {}
        optimizer.state[p] = st
  if params is not None:
    with torch.no_grad():
      for n, p in by_name.items():
        if n not in params:
          raise ValueError(f"from_torch: `params` has no {n!r}")
        value = np.asarray(params[n], np.float32 if p.dtype == torch.bfloat16 else None)
        if tuple(value.shape) != tuple(p.shape):
          raise ValueError(f"from_torch: `params`[{n!r}] has shape {value.shape}, torch's "
                           f"{tuple(p.shape)}")
        p.copy_(torch.from_numpy(value.copy()).to(p.dtype))
  if _is_torch_plateau(scheduler):
    found = []
    _visit_states(groups[0], lambda s: found.append(s) if _is_plateau(s) else None)
    if not found:
      raise ValueError("from_torch: the state holds no ReduceLROnPlateau state; was `tx` "
                       "built with this scheduler?")
    node = found[0]
    scheduler.best = float(node.best)
    scheduler.num_bad_epochs = int(node.num_bad_epochs)
    scheduler.cooldown_counter = int(node.cooldown_counter)
    scheduler.last_epoch = int(node.count)
    for i, g in enumerate(optimizer.param_groups):
      lrs = []
      _visit_states(groups[i], lambda s: lrs.append(float(s.lr)) if _is_plateau(s) else None)
      g["lr"] = lrs[0]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
  elif scheduler is not None:
    target = schedule_position(state)
    if target is None:
      raise ValueError("from_torch: the state holds no schedule position; was `tx` built "
                       "with this scheduler?")
    if schedulers.position(scheduler) > target:
      raise ValueError(f"from_torch: `scheduler` is at step {schedulers.position(scheduler)}, "
                       f"past the state's {target}: pass a freshly built one")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
      for _ in range(target - schedulers.position(scheduler)):
        scheduler.step()

