"""Every hyperparameter of every public optimizer, building block, guard, Sophia helper and
schedule: a bad value is a TypeError or ValueError *naming the argument*, raised when the
object is built (or, for the step helpers, when called).

The sweep reads the signatures (``inspect``), so an argument or a builder added later (the
torch twins of issue 15 included, once they are in ``optim.__all__``) is swept too: a
builder missing from ``REQUIRED`` below fails ``test_every_public_builder_is_swept``.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import _validation, optim, schedules
from jaxopt_llm.optim import guards, hessian

P = {"w": jnp.ones((2, 3))}
KEY = jax.random.PRNGKey(0)

# Builder -> the arguments it needs besides the swept ones (valid values), or None for a
# public callable that is not a builder (state readers, the step helpers swept below).
REQUIRED = {
    optim.adamw: {}, optim.adam: {}, optim.adam_l2: {}, optim.lion: {}, optim.sophia: {},
    optim.sgd: {"learning_rate": 0.1}, optim.momentum: {"learning_rate": 0.1},
    optim.adagrad: {}, optim.rmsprop: {},
    optim.nadam: {}, optim.radam: {}, optim.adamax: {},
    optim.scale_by_nadam: {}, optim.scale_by_radam: {}, optim.scale_by_adamax: {},
    optim.adadelta: {}, optim.asgd: {}, optim.rprop: {}, optim.scale_by_adadelta: {},
    optim.scale_by_asgd: {}, optim.scale_by_rprop: {}, optim.adafactor: {},
    optim.scale_by_adafactor: {},
    optim.muon: {}, optim.scale_by_muon: {}, optim.muon_with_adamw: {},
    optim.scale_by_adjusted_learning_rate: {"learning_rate": 0.1},
    optim.newton_schulz: {"x": jnp.ones((2, 3))},
    optim.scale_by_adam: {}, optim.scale_by_lion: {}, optim.scale_by_sophia: {},
    optim.scale_by_momentum: {}, optim.scale_by_adagrad: {}, optim.scale_by_rmsprop: {},
    optim.skip_spikes: {"inner": optim.adamw(1e-3)},
    schedules.warmup_cosine: {"peak_lr": 1e-3, "warmup_steps": 10, "total_steps": 100},
    schedules.linear_decay: {"peak_lr": 1e-3, "warmup_steps": 10, "total_steps": 100},
    schedules.polynomial_decay: {"peak_lr": 1e-3, "warmup_steps": 10, "total_steps": 100},
    schedules.constant_with_warmup: {"peak_lr": 1e-3, "warmup_steps": 10},
    schedules.inverse_sqrt: {"peak_lr": 1e-3, "warmup_steps": 10},
    schedules.wsd: {"peak_lr": 1e-3, "warmup_steps": 10, "stable_steps": 10,
                    "decay_steps": 10},
    schedules.step_decay: {"lr": 1e-3, "step_size": 10},
    schedules.exponential_lr: {"lr": 1e-3, "gamma": 0.9},
    schedules.cosine_annealing: {"lr": 1e-3, "T_max": 10},
    schedules.step_lr: {"lr": 1e-3, "step_size": 10},
    schedules.multi_step_lr: {"lr": 1e-3, "milestones": [10, 20]},
    schedules.constant_lr: {"lr": 1e-3}, schedules.linear_lr: {"lr": 1e-3},
    schedules.polynomial_lr: {"lr": 1e-3},
    schedules.cosine_annealing_lr: {"lr": 1e-3, "T_max": 10},
    schedules.cosine_annealing_warm_restarts: {"lr": 1e-3, "T_0": 10},
    schedules.cyclic_lr: {"base_lr": 1e-4, "max_lr": 1e-3}, schedules.cyclic_momentum: {},
    schedules.one_cycle_lr: {"max_lr": 1e-3, "total_steps": 100},
    schedules.one_cycle_momentum: {"total_steps": 100},
    schedules.sequential_lr: {"schedules": [schedules.step_lr(1e-3, 10)] * 2, "milestones": [5]},
    schedules.chained_scheduler: {"lr": 1e-3, "factors": [schedules.step_lr(1.0, 10)]},
    schedules.lambda_lr: {"lr": 1e-3, "lr_lambda": lambda n: 1.0, "total_steps": 10},
    schedules.multiplicative_lr: {"lr": 1e-3, "lr_lambda": lambda n: 1.0, "total_steps": 10},
    schedules.reduce_lr_on_plateau: {"lr": 1e-3},
}
NOT_BUILDERS = {"update_and_apply", "is_fused", "state_bytes", "weight_decay_mask",
                "gauss_newton_bartlett", "hutchinson", "update_every_k", "is_estimate_step",
                "sophia_win_rate", "sophia_hessian_norm", "sophia_hessian_rejected",
                "asgd_averaged_params", "muon_labels", "gauss_newton_bartlett_fused"}
# Decays that may also be a schedule n -> value (torch's OneCycleLR / CyclicLR cycle them).
DECAY_SCHEDULES = {
    optim.adam: ("b1",), optim.adam_l2: ("b1",), optim.adamw: ("b1",),
    optim.scale_by_adam: ("b1",), optim.nadam: ("b1",), optim.radam: ("b1",),
    optim.adamax: ("b1",), optim.scale_by_nadam: ("b1",), optim.scale_by_radam: ("b1",),
    optim.scale_by_adamax: ("b1",), optim.sgd: ("momentum", "dampening"),
    optim.momentum: ("beta",), optim.rmsprop: ("momentum",),
    optim.scale_by_momentum: ("momentum", "dampening"), optim.scale_by_rmsprop: ("momentum",),
    optim.muon: ("momentum",), optim.muon_with_adamw: ("momentum",),
    optim.scale_by_muon: ("momentum",),
}
# Arguments that are not hyperparameters (a transformation or functions, checked by their owners).
DATA = {"inner", "scale_fn", "lr_lambda", "schedules", "factors", "x", "labels"}


def _public_callables():
  out = {}
  for module in (optim, schedules):
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.isfunction(obj) and name not in NOT_BUILDERS:
        out[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = obj
  return out


def test_every_public_builder_is_swept():
  missing = [name for name, fn in _public_callables().items() if fn not in REQUIRED]
  assert not missing, f"add these builders to REQUIRED (and so to the sweep): {missing}"


def _kind(param: inspect.Parameter) -> str:
  """What an argument holds, from its name and default: schedule / number / int / flag /
  dtype / choice / mask / optional number."""
  name, default = param.name, param.default
  if isinstance(default, bool):
    return "flag"
  if name.endswith(("learning_rate", "weight_decay")):  # also muon_with_adamw's adamw_*
    return "schedule"
  if name.endswith("mask"):
    return "mask"
  if name == "adjust_lr_fn":
    return "optional_choice"
  if name.endswith("_dtype"):
    return "dtype"
  if isinstance(default, bool):
    return "flag"
  if isinstance(default, str):
    return "choice"
  if name in ("timescale", "step_size_down"):
    return "optional_int"
  if isinstance(default, int) or name.endswith("_steps") or name in ("step_size", "T_max"):
    return "int"
  return "number"


BAD = {
    # every kind: a string, the issue's example
    "any": ["0.1", b"0.1"],
    "schedule": [None, True, [0.1], jnp.ones(2), float("nan"), -1.0, lambda s: float("nan"),
                 lambda s: -1e-3 * s, lambda s: "0.1", lambda s: jnp.ones(2)],
    "number": [None, True, [0.1], jnp.ones(2), float("nan"), float("inf"), 1 + 2j,
               lambda s: 0.5],
    "decay_schedule": [None, True, [0.1], jnp.ones(2), float("nan"), float("inf"), 1 + 2j,
                       lambda s: float("nan"), lambda s: 1.5, lambda s: -0.1 * s,
                       lambda s: "0.9", lambda s: jnp.ones(2)],
    "int": [None, True, 1.5, [1], float("nan")],
    "optional_int": [True, 1.5, [1]],
    "optional_choice": [1, "nope"],
    "flag": [None, 1, 0, "False", "True"],
    "dtype": [jnp.int8, jnp.int32, jnp.bool_, jnp.complex64, 1, "float33"],
    "choice": [None, 1, "nope"],
    "mask": ["0.1", 1, 0.5, {"w": 1}, {"w": "True"}],
}


def _sweep():
  cases = []
  for label, fn in _public_callables().items():
    for param in inspect.signature(fn).parameters.values():
      if param.name not in DATA:
        kind = ("decay_schedule" if param.name in DECAY_SCHEDULES.get(fn, ())
                else _kind(param))
        cases.append(pytest.param(fn, param.name, kind, id=f"{label}-{param.name}-{kind}"))
  return cases


@pytest.mark.parametrize("fn, name, kind", _sweep())
def test_bad_hyperparameter_is_a_clear_error_naming_it(fn, name, kind):
  for bad in BAD["any"] + BAD[kind]:
    kwargs = {**REQUIRED[fn], name: bad}
    with pytest.raises((TypeError, ValueError), match=f"`{name}`"):
      fn(**kwargs)


def test_the_issue_examples():
  with pytest.raises(TypeError, match="adamw: `learning_rate`"):
    optim.adamw("1e-3")
  with pytest.raises(TypeError, match="adamw: `weight_decay`"):
    optim.adamw(1e-3, weight_decay="0.1")
  with pytest.raises(TypeError, match="`b1`"):
    optim.adamw(1e-3, b1="0.9")


def test_skip_spikes_inner_must_be_a_transformation():
  with pytest.raises(TypeError, match="`inner`"):
    optim.skip_spikes("adamw")


def test_step_helpers_name_their_bad_arguments():
  tx = optim.sophia(1e-3)
  s = tx.init(P)
  with pytest.raises(TypeError, match="`ordered`"):
    optim.update_and_apply(tx, P, s, P, ordered="False")
  with pytest.raises(ValueError, match="`k`"):
    hessian.update_every_k(tx, P, s, P, step=0, estimate_fn=lambda p: p, k="10")
  with pytest.raises(ValueError, match="`k`"):
    hessian.is_estimate_step(0, k=0.5)
  logits = lambda p: p["w"]
  with pytest.raises(TypeError, match="`clip_norm`"):
    hessian.gauss_newton_bartlett(logits, P, KEY, clip_norm="1.0")
  with pytest.raises(ValueError, match="`where`"):
    hessian.gauss_newton_bartlett(logits, P, KEY, where="all")
  with pytest.raises(ValueError, match="`distribution`"):
    hessian.hutchinson(lambda p: jnp.sum(p["w"] ** 2), P, KEY, distribution=1)
  g = guards.skip_spikes(optim.adamw(1e-3))
  gs = g.init(P)
  with pytest.raises(ValueError, match="`loss`"):
    g.update(P, gs, P, loss=jnp.ones(3))
  with pytest.raises(TypeError, match="`loss`"):
    g.update(P, gs, P, loss="1.0")


def test_valid_forms_still_accepted():
  """Tracers and 0-d arrays (``optax.inject_hyperparams``), numpy scalars, bfloat16 scalars,
  dtype names and schedules are hyperparameters too."""
  optim.adamw(np.float32(1e-3), b1=jnp.asarray(0.9, jnp.bfloat16), b2=np.float64(0.99),
              mu_dtype="bfloat16", nu_dtype=jnp.float32, mask={"w": True})
  optim.sgd(jnp.asarray(0.1), momentum=np.float32(0.5), nesterov=np.bool_(True))
  optim.lion(schedules.warmup_cosine(1e-4, 10, 100), weight_decay=optax.constant_schedule(0.1))
  tx = optax.inject_hyperparams(optim.adamw)(learning_rate=1e-3, b1=0.9)
  s = tx.init(P)
  jax.jit(tx.update)(P, s, P)  # b1 is a traced 0-d array inside


# --------------------------------------------------------------------------------------------
# Schedules given as callables: checked on a grid of steps when the optimizer is built


@pytest.mark.parametrize("build", [
    lambda lr, wd: optim.adamw(lr, weight_decay=wd),
    lambda lr, wd: optim.sophia(lr, weight_decay=wd),
    lambda lr, wd: optim.momentum(lr, weight_decay=wd),
    lambda lr, wd: optim.rmsprop(lr, weight_decay=wd),
])
@pytest.mark.parametrize("bad, step", [
    (lambda s: jnp.where(s == 0, jnp.nan, 1e-3), 0),             # NaN at step 0
    (lambda s: 1e-3 - 3e-7 * s, 5000),                             # goes negative late
    (lambda s: 1e-3 * jnp.exp(s / 1e4), 1_000_000),                # overflows to inf
    (lambda s: 1e-3 if s < 100 else float("nan"), 100),            # Python branching
])
@pytest.mark.parametrize("arg", ["learning_rate", "weight_decay"])
def test_bad_schedule_is_refused_at_build_naming_argument_and_step(build, bad, step, arg):
  kw = {"lr": 1e-3, "wd": 0.1, {"learning_rate": "lr", "weight_decay": "wd"}[arg]: bad}
  with pytest.raises(ValueError, match=f"`{arg}` is a schedule that gives .* at step {step};"):
    build(**kw)


def test_milestones_are_checked_and_the_grid_is_documented():
  def bad(step):
    return jnp.where(jnp.asarray(step) == 1234, -1.0, 1e-3)
  optim.adamw(bad)  # 1234 is on no grid: not seen (a check on a grid, not a proof)
  bad.milestones = (1234,)
  with pytest.raises(ValueError, match="at step 1234"):
    optim.adamw(bad)
  assert 0 in _validation.SCHEDULE_CHECK_STEPS and 10**6 in _validation.SCHEDULE_CHECK_STEPS
  assert schedules.warmup_cosine(1e-3, 37, 500).milestones == (37, 500)


def test_checked_when_built_inside_jit():
  bad = lambda s: jnp.where(jnp.asarray(s) > 50, -1.0, 1e-3)

  @jax.jit
  def init(p):
    return optim.adamw(bad).init(p)

  with pytest.raises(ValueError, match="`learning_rate` is a schedule .* at step 100;"):
    init(P)


def test_schedule_that_cannot_run_eagerly_does_not_break_the_build():
  """Documented: a schedule that raises on a Python int and on an int32 scalar is left
  unchecked; it is used as usual by the jitted update."""
  calls = []

  def traced_only(step):
    if not isinstance(step, jax.core.Tracer):
      calls.append(step)
      raise RuntimeError("only under jit")
    return jnp.float32(1e-3) + 0.0 * step

  tx = optim.adamw(traced_only, weight_decay=0.0)
  assert calls  # it was tried
  u, _ = jax.jit(tx.update)(P, tx.init(P), P)
  assert np.all(np.isfinite(np.asarray(u["w"])))


def test_a_valid_schedule_costs_one_vectorised_call():
  calls = []

  def sched(step):
    calls.append(np.shape(step))
    return 1e-3 * jnp.ones_like(jnp.asarray(step, jnp.float32))

  optim.adamw(sched)
  assert calls == [(len(_validation.schedule_check_steps(sched)),)]
