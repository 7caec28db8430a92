"""Gradient replay: is the converted optimizer torch's, on *your* run?

``Recorder(optimizer, scheduler)`` hooks ``optimizer.step()`` (torch's step pre/post hooks)
and records, for each of the next ``max_steps`` steps, every parameter's gradient, every
parameter after the step, and each param group's lr and momentum (beta1); at the first
step also the parameters, the optimizer state and the scheduler position, so a recording
can start mid-run. ``save(path)`` writes one ``.npz`` (arrays and a JSON description, no
pickled objects).

``replay(path)`` builds the converted optimizer from the file alone (numpy and jax; torch
is not needed), feeds it the recorded gradients from the recorded starting point, and
compares its parameters after each step with torch's: per step and param group, the max
over the group's parameters of ``max|ours - torch| / max|torch|`` (``relative_error``'s
rule, per leaf). The gradients are torch's, so a model difference cannot show up here: what
remains is the optimizer and the scheduler. ``jaxopt-llm parity --replay run.npz [--out
divergence.png]`` prints the report (and plots it when matplotlib is installed).

Files are data: ``np.load(path, allow_pickle=False)``; a file with a pickled object in it is
refused with a ValueError naming the entry.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm.from_torch import schedulers
from jaxopt_llm.from_torch.optimizers import build, check_optimizer, describe, parameter_names
from jaxopt_llm.from_torch.state import fill, torch_state_arrays

FORMAT = "jaxopt_llm.replay/1"


def _np(t: Any) -> np.ndarray:
  t = t.detach().cpu()
  if str(t.dtype) == "torch.bfloat16":
    t = t.float()
  return t.numpy().copy()


def _momentum(group: dict) -> float:
  if "betas" in group:
    return float(group["betas"][0])
  if "momentum" in group:
    return float(group["momentum"])
  return float("nan")


class Recorder:
  """Records ``max_steps`` steps of a torch run for ``replay`` (see the module docstring).

  Use::

    rec = Recorder(opt, sched, named_parameters=model.named_parameters(), max_steps=100)
    ...  # train as usual: loss.backward(); opt.step(); sched.step()
    rec.save("run.npz")  # also removes the hooks

  A parameter without a gradient at a step (``p.grad is None``: torch skips it) is
  recorded with a zero gradient and flagged; the report lists it.
  """

  def __init__(self, optimizer: Any, scheduler: Any = None, *, named_parameters: Any = None,
               max_steps: int = 100) -> None:
    check_optimizer(optimizer)
    if type(scheduler).__name__ == schedulers.PLATEAU:
      raise NotImplementedError("Recorder: a ReduceLROnPlateau run cannot be replayed (the "
                                "metrics given to scheduler.step(metric) are not recorded)")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
      raise ValueError(f"Recorder: `max_steps` must be an integer >= 1, got {max_steps!r}")
    self.optimizer, self.scheduler = optimizer, scheduler
    self.named_parameters = (None if named_parameters is None
                             else list(named_parameters.items())
                             if isinstance(named_parameters, dict) else list(named_parameters))
    self.names = parameter_names(optimizer, self.named_parameters)
    self.max_steps = max_steps
    self._start: Optional[dict] = None
    self._grads: list = []
    self._after: list = []
    self._missing: list = []
    self._lrs: list = []
    self._moms: list = []
    self._handles = [optimizer.register_step_pre_hook(self._before_step),
                     optimizer.register_step_post_hook(self._after_step)]

  @property
  def steps(self) -> int:
    """Steps recorded so far."""
    return len(self._after)

  def _params(self):
    return [p for g in self.optimizer.param_groups for p in g["params"]]

  def _before_step(self, optimizer, args, kwargs) -> None:
    if self.steps >= self.max_steps:
      return
    if self._start is None:
      self._start = {
          "params": [_np(p) for p in self._params()],
          "dtypes": [str(p.dtype).replace("torch.", "") for p in self._params()],
          "state": torch_state_arrays(optimizer, self.names),
          "position": 0 if self.scheduler is None else schedulers.position(self.scheduler)}
    ps = self._params()
    self._grads.append([np.zeros(tuple(p.shape), np.float32) if p.grad is None
                        else _np(p.grad) for p in ps])
    self._missing.append([p.grad is None for p in ps])
    self._lrs.append([float(g["lr"]) for g in optimizer.param_groups])
    self._moms.append([_momentum(g) for g in optimizer.param_groups])

  def _after_step(self, optimizer, args, kwargs) -> None:
    if len(self._after) < len(self._grads):
      self._after.append([_np(p) for p in self._params()])

  def close(self) -> None:
    """Removes the hooks (``save`` does too)."""
    for h in self._handles:
      h.remove()
    self._handles = []

  def save(self, path: str, *, overwrite: bool = False) -> str:
    """Writes the recording to ``path`` (.npz) and removes the hooks; returns ``path``.

    An existing file (an earlier recording) is never replaced unless ``overwrite=True``."""
    out = path if str(path).endswith(".npz") else f"{path}.npz"  # where np.savez writes
    if os.path.exists(out) and not overwrite:
      raise FileExistsError(f"Recorder: {out!r} exists; pass overwrite=True to replace it")
    self.close()
    if self._start is None or not self._after:
      raise ValueError("Recorder: nothing recorded yet (no optimizer.step() since the "
                       "Recorder was made)")
    n = len(self._after)
    spec = describe(self.optimizer, self.scheduler, named_parameters=self.named_parameters,
                    steps=self._start["position"] + n)
    flat = [name for row in self.names for name in row]
    arrays = {
        "format": np.array(FORMAT),
        "spec": np.array(json.dumps(spec)),
        "names": np.array(flat),
        "dtypes": np.array(self._start["dtypes"]),
        "start_position": np.array(self._start["position"], np.int64),
        "lr": np.array(self._lrs[:n], np.float64),
        "momentum": np.array(self._moms[:n], np.float64),
        "missing_grad": np.array(self._missing[:n], bool),
    }
    for k in range(len(flat)):
      arrays[f"params0/{k}"] = self._start["params"][k]
      arrays[f"grads/{k}"] = np.stack([g[k] for g in self._grads[:n]])
      arrays[f"after/{k}"] = np.stack([a[k] for a in self._after[:n]])
      for key, value in self._start["state"].get(flat[k], {}).items():
        arrays[f"state/{k}/{key}"] = value
    np.savez(out, **arrays)
    return out


@dataclasses.dataclass
class ReplayReport:
  """What ``replay`` found. ``divergence[t, i]``: after step ``t`` of the recording, the max
  over param group ``i``'s parameters of ``max|ours - torch| / max|torch|``.
  ``lr_ours`` / ``lr_torch``: ``[t, i]`` learning rates (``lr_divergence`` their relative
  difference)."""
  optimizer: str
  scheduler: Optional[str]
  groups: list
  start_position: int
  divergence: np.ndarray
  lr_ours: np.ndarray
  lr_torch: np.ndarray
  missing_grad: list
  notes: list

  @property
  def steps(self) -> int:
    return int(self.divergence.shape[0])

  @property
  def worst(self) -> float:
    """The largest divergence over all steps and groups."""
    return float(np.max(self.divergence)) if self.divergence.size else 0.0

  @property
  def lr_divergence(self) -> float:
    den = np.maximum(np.abs(self.lr_torch), 1e-30)
    return float(np.max(np.abs(self.lr_ours - self.lr_torch) / den))

  def __str__(self) -> str:
    t, i = np.unravel_index(int(np.argmax(self.divergence)), self.divergence.shape)
    lines = [f"replay of torch.optim.{self.optimizer}"
             + (f" + {self.scheduler}" if self.scheduler else "")
             + f": {self.steps} steps from step {self.start_position}, "
             f"{len(self.groups)} param group(s)"]
    head = "  step  " + "  ".join(f"{g:>12s}" for g in self.group_labels)
    lines.append(head)
    marks = sorted(set(np.unique(np.linspace(0, self.steps - 1, min(self.steps, 10))
                                 .astype(int)).tolist() + [int(t)]))
    for s in marks:
      lines.append(f"{self.start_position + s + 1:6d}  "
                   + "  ".join(f"{self.divergence[s, j]:12.3e}" for j in range(len(self.groups))))
    lines.append(f"worst divergence {self.worst:.3e} (group {self.group_labels[i]}, step "
                 f"{self.start_position + t + 1}); max lr difference "
                 f"{self.lr_divergence:.3e} (relative)")
    lines.extend(self.notes)
    return "\n".join(lines)

  @property
  def group_labels(self) -> list:
    return [f"group{i}" for i in range(len(self.groups))]

  def plot(self, path: str) -> str:
    """Divergence over steps, one line per param group, to ``path`` (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(self.steps) + self.start_position + 1
    for j, label in enumerate(self.group_labels):
      y = np.maximum(self.divergence[:, j], 1e-12)
      ax.semilogy(x, y, label=f"{label} ({len(self.groups[j])} params)")
    ax.set_xlabel("torch step")
    ax.set_ylabel("max relative divergence")
    ax.set_title(f"replay: torch.optim.{self.optimizer} vs jaxopt_llm")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _load(path: str) -> dict:
  try:
    f = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise ValueError(f"replay: {path} is not a replay .npz ({e})") from None
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise ValueError(f"replay: {path} is a single array, not a replay .npz")
  out = {}
  with f:
    for key in f.files:
      try:
        out[key] = f[key]
      except ValueError:
        raise ValueError(
            f"replay: {path}: entry {key!r} is a pickled Python object; a replay file holds "
            "data only (arrays and JSON), so it is refused (pickles can run code)") from None
  if "format" not in out or str(out["format"]) != FORMAT:
    raise ValueError(f"replay: {path} is not a {FORMAT} file (made by from_torch.Recorder)")
  return out


def replay(path: str) -> ReplayReport:
  """Feeds a recording's gradients through the converted optimizer; the report.

  See the module docstring. Needs numpy and jax only.
  """
  try:
    data = _load(path)
  except (zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"replay: {path} is not a replay .npz ({e})") from None
  spec = json.loads(str(data["spec"]))
  names = [str(n) for n in data["names"]]
  dtypes = [str(d) for d in data["dtypes"]]
  group_names = [g["names"] for g in spec["groups"]]
  position = int(data["start_position"])
  tx = build(spec)
  params = {n: jnp.asarray(data[f"params0/{k}"]).astype(
      jnp.bfloat16 if dtypes[k] == "bfloat16" else data[f"params0/{k}"].dtype)
            for k, n in enumerate(names)}
  torch_state = {}
  for key, value in data.items():
    if key.startswith("state/"):
      _, k, skey = key.split("/", 2)
      torch_state.setdefault(names[int(k)], {})[skey] = value
  has_sched = spec["scheduler"] is not None
  state = fill(tx.init(params), spec["optimizer"], group_names, torch_state,
               position if has_sched else None)
  grads = {n: jnp.asarray(data[f"grads/{k}"]).astype(params[n].dtype)
           for k, n in enumerate(names)}

  @jax.jit
  def run(params, state, grads):
    def step(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      return (p, s), p

    _, trajectory = jax.lax.scan(step, (params, state), grads)
    return trajectory

  ours = jax.tree.map(lambda x: np.asarray(x, np.float64), run(params, state, grads))
  n_steps = int(data["lr"].shape[0])
  index = {n: k for k, n in enumerate(names)}
  div = np.zeros((n_steps, len(group_names)))
  for i, row in enumerate(group_names):
    for n in row:
      ref = np.asarray(data[f"after/{index[n]}"], np.float64).reshape(n_steps, -1)
      a = ours[n].reshape(n_steps, -1)
      if ref.shape[1] == 0:
        continue
      scale = np.maximum(np.max(np.abs(ref), axis=1), 1e-30)
      div[:, i] = np.maximum(div[:, i], np.max(np.abs(a - ref), axis=1) / scale)
  lr_ours = np.zeros((n_steps, len(group_names)))
  for i, g in enumerate(spec["groups"]):
    if has_sched:
      lr_fn, _ = schedulers.build(spec["scheduler"], i, g["hyper"])
      lr_ours[:, i] = np.asarray(jax.vmap(lr_fn)(jnp.arange(position, position + n_steps)),
                                 np.float64)
    else:
      lr_ours[:, i] = g["hyper"]["lr"]
  notes = []
  missing = np.asarray(data["missing_grad"])
  flagged = [names[k] for k in range(len(names)) if missing[:, k].any()]
  if flagged:
    notes.append(f"note: torch had no gradient for {flagged} at some steps (it skipped them; "
                 "the replay used a zero gradient, which still updates moments)")
  for i, lam in enumerate((spec["scheduler"] or {}).get("lambdas", [])):
    if "tabulated" in lam:
      notes.append(f"note: group{i}'s lambda was not recognised and was tabulated over "
                   f"{len(lam['tabulated'])} steps")
  return ReplayReport(
      optimizer=spec["optimizer"],
      scheduler=None if not has_sched else spec["scheduler"]["class"],
      groups=group_names, start_position=position, divergence=div, lr_ours=lr_ours,
      lr_torch=np.asarray(data["lr"], np.float64), missing_grad=flagged, notes=notes)
