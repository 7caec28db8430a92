"""Hostile-input fuzz of the optimizers, building blocks, guards, Sophia helpers, schedules and
a few multi-device helpers (a dev script, not a test: it takes a few minutes).

Covered: every named optimizer and ``scale_by_*`` block (the torch twins NAdam, RAdam,
Adamax, Adadelta, ASGD, Rprop, Adafactor, Muon and muon_with_adamw included, with
non-default configs and b1 / momentum as a schedule; Muon alone on 2-D inputs), every
hyperparameter of every public builder and schedule (the builders are ``optim.__all__`` and
``schedules.__all__``'s functions, their required arguments the ``REQUIRED`` table of
tests/optim/test_hyperparameters.py, one table for both), every schedule at hostile steps,
and ``reduce_lr_on_plateau``'s metric.

Every case is run and classified as one of

* ``clear error``     a TypeError / ValueError whose message starts with the function's (or a
                      building block's) name, the house style ``owner: `argument` ...``, or is
                      the "requires params" error;
* ``finite result``   it ran, every output is finite and every oracle of the case held;
* ``NaN propagated``  it ran, an output is NaN/inf, and an input was NaN/inf;
* ``documented limit`` it ran into a limit the docstrings state: an exact value beyond the
                      dtype's range overflows to inf (gradients at float32's max; Adam's,
                      RMSprop's, Adagrad's, NAdam's, RAdam's, Adadelta's second moment and
                      Adafactor's factored statistics of g**2 for |g| > 1.8e19, whose
                      coordinate then steps by 0, as in torch.optim) - never a NaN;
* ``silent wrong``    it ran and an oracle failed: a non-finite output from finite inputs, an
                      integer parameter changed, a dtype or shape changed, eager != jit, the
                      fused step != update + apply_updates, a step that should be 0 is not, a
                      sign-like first step that is not lr, a schedule value out of its range;
* ``unreadable crash`` any other exception.

Runtime cases run eagerly and under ``jax.jit`` (the two results must agree), and through
both ``tx.update`` + ``optax.apply_updates`` and ``optim.update_and_apply``.

Usage::

  .venv/bin/python scripts/fuzz_optim.py            # the counts table
  .venv/bin/python scripts/fuzz_optim.py -v         # plus every case that is not clean
  .venv/bin/python scripts/fuzz_optim.py --x64      # the same under jax_enable_x64
"""
from __future__ import annotations

import argparse
import collections
import math
import re
import sys
import traceback
from typing import Any, Callable

import numpy as np

CLEAR, FINITE, PROPAGATED, LIMIT, WRONG, CRASH = (
    "clear error", "finite result", "NaN propagated", "documented limit", "silent wrong",
    "unreadable crash")
ORDER = (CLEAR, FINITE, PROPAGATED, LIMIT, WRONG, CRASH)


class Oracle(Exception):
  """An oracle failed: the case is silently wrong."""


class Limit(Exception):
  """The case hit a limit the docs state (float overflow of an exact result beyond the
  dtype's range, e.g. g**2 for |g| > 1.8e19 in Adam's float32 second moment)."""


def _is_clear(e: BaseException) -> bool:
  if not isinstance(e, (TypeError, ValueError)):
    return False
  msg = str(e)
  return bool(re.match(r"^[A-Za-z_][\w.]*: ", msg)) or "requires the current value" in msg


def _finite(tree: Any) -> bool:
  import jax
  for x in jax.tree.leaves(tree):
    a = np.asarray(x)
    if a.dtype.kind in "fc" or str(a.dtype) == "bfloat16":
      if not np.all(np.isfinite(a.astype(np.float64) if a.dtype.kind != "c" else a)):
        return False
  return True


def classify(thunk: Callable[[], Any], nonfinite_input: bool) -> tuple[str, str]:
  try:
    out = thunk()
  except Oracle as e:
    return WRONG, str(e)
  except Limit as e:
    return LIMIT, str(e)
  except Exception as e:  # noqa: BLE001 - the point is to see every kind
    kind = CLEAR if _is_clear(e) else CRASH
    detail = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if kind == CRASH:
      tb = traceback.extract_tb(e.__traceback__)
      detail += f"  [at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}]" if tb else ""
    return kind, detail
  if _finite(out):
    return FINITE, ""
  return (PROPAGATED, "") if nonfinite_input else (WRONG, "non-finite output from finite input")


# --------------------------------------------------------------------------------------------
# The cases


def optimizer_factories():
  import optax
  from jaxopt_llm import optim, schedules
  sched = schedules.warmup_cosine(1e-2, 2, 10)
  # b1 / momentum cycled as torch's OneCycleLR / CyclicLR do.
  m_sched = schedules.cyclic_momentum(0.85, 0.95, step_size_up=2)
  return {
      # name: (build(**overrides), sign_like_first_step, has_fused)
      "adamw": (lambda **k: optim.adamw(**{"learning_rate": 1e-2, **k}), "adam", True),
      "adamw_amsgrad_bf16": (lambda **k: optim.adamw(**{
          "learning_rate": 1e-2, "amsgrad": True, "mu_dtype": "bfloat16",
          "nu_dtype": "bfloat16", **k}), "adam", True),
      "adam_fp16_state": (lambda **k: optim.adam(**{
          "learning_rate": 1e-2, "mu_dtype": "float16", "nu_dtype": "float16", **k}),
          "adam", True),
      "adam_l2": (lambda **k: optim.adam_l2(**{"learning_rate": 1e-2, **k}), None, True),
      "lion": (lambda **k: optim.lion(**{"learning_rate": 1e-2, "weight_decay": 0.1, **k}),
               "sign", True),
      "sophia": (lambda **k: optim.sophia(**{"learning_rate": 1e-2, **k}), "sign", True),
      "sgd": (lambda **k: optim.sgd(**{"learning_rate": 0.1, "weight_decay": 0.1, **k}), None,
              False),
      "sgd_nesterov": (lambda **k: optim.sgd(**{"learning_rate": 0.1, "momentum": 0.9,
                                                "nesterov": True, **k}), None, False),
      "momentum_zero": (lambda **k: optim.momentum(**{"learning_rate": 0.1,
                                                      "buffer_init": "zero", **k}), None, False),
      "adagrad": (lambda **k: optim.adagrad(**{"weight_decay": 0.1, **k}), None, False),
      "rmsprop_centered": (lambda **k: optim.rmsprop(**{"centered": True, "momentum": 0.9,
                                                        **k}), None, False),
      "rmsprop_eps0": (lambda **k: optim.rmsprop(**{"eps": 0.0, **k}), None, False),
      "adagrad_eps0": (lambda **k: optim.adagrad(**{"eps": 0.0, **k}), None, False),
      "adamw_schedule": (lambda **k: optim.adamw(**{"learning_rate": sched,
                                                    "weight_decay": sched, **k}), None, True),
      "block_scale_by_adam": (lambda **k: optim.scale_by_adam(), None, False),
      "block_scale_by_lion": (lambda **k: optim.scale_by_lion(), None, False),
      "block_scale_by_sophia": (lambda **k: optim.scale_by_sophia(), None, False),
      "block_scale_by_momentum": (lambda **k: optim.scale_by_momentum(), None, False),
      "block_scale_by_adagrad": (lambda **k: optim.scale_by_adagrad(), None, False),
      "block_scale_by_rmsprop": (lambda **k: optim.scale_by_rmsprop(), None, False),
      "guard_skip_spikes(adamw)": (lambda **k: optim.skip_spikes(optim.adamw(**{
          "learning_rate": 1e-2, **k}), min_history=2), None, False),
      # torch.optim twins of issues 15/17 (adam_variants, classic, factored, orthogonalized).
      # Adamax's first step is lr * sign(g) (u = max(0, |g| + eps)), NAdam's and RAdam's are
      # not lr-sized (RAdam's first steps are unrectified: lr * m_hat).
      "nadam": (lambda **k: optim.nadam(**{"learning_rate": 1e-2, **k}), None, None),
      "nadam_decoupled_wd": (lambda **k: optim.nadam(**{
          "learning_rate": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True,
          "momentum_decay": 0.1, **k}), None, None),
      "nadam_b1_schedule": (lambda **k: optim.nadam(**{
          "learning_rate": 1e-2, "b1": m_sched, **k}), None, None),
      "radam": (lambda **k: optim.radam(**{"learning_rate": 1e-2, **k}), None, None),
      "radam_decoupled_bf16_state": (lambda **k: optim.radam(**{
          "learning_rate": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True,
          "mu_dtype": "bfloat16", "nu_dtype": "bfloat16", **k}), None, None),
      "adamax": (lambda **k: optim.adamax(**{"learning_rate": 1e-2, **k}), "adam", None),
      "adamax_b1_schedule_wd": (lambda **k: optim.adamax(**{
          "learning_rate": sched, "b1": m_sched, "weight_decay": 0.1, **k}), None, None),
      "adamax_eps0": (lambda **k: optim.adamax(**{"learning_rate": 1e-2, "eps": 0.0, **k}),
                      None, None),
      "adadelta": (lambda **k: optim.adadelta(**k), None, None),
      "adadelta_wd_eps0": (lambda **k: optim.adadelta(**{
          "learning_rate": 0.5, "rho": 0.5, "eps": 0.0, "weight_decay": 0.1, **k}), None,
          None),
      "asgd": (lambda **k: optim.asgd(**k), None, None),
      "asgd_t0_1_wd": (lambda **k: optim.asgd(**{
          "learning_rate": sched, "t0": 1.0, "lambd": 0.1, "weight_decay": 0.1, **k}), None,
          None),
      "rprop": (lambda **k: optim.rprop(**k), None, None),
      "rprop_custom": (lambda **k: optim.rprop(**{
          "learning_rate": 0.1, "etas": (0.3, 1.5), "step_sizes": (0.0, 1.0), **k}), None,
          None),
      "adafactor": (lambda **k: optim.adafactor(**k), None, None),
      "adafactor_eps1_wd": (lambda **k: optim.adafactor(**{
          "learning_rate": sched, "eps": (1e-30, 1e-3), "d": 2.0, "beta2_decay": -0.5,
          "weight_decay": 0.1, **k}), None, None),
      "muon_with_adamw": (lambda **k: optim.muon_with_adamw(**k), None, None),
      "muon_with_adamw_sched_f32": (lambda **k: optim.muon_with_adamw(**{
          "learning_rate": sched, "momentum": m_sched, "nesterov": False,
          "ns_dtype": "float32", "adjust_lr_fn": "match_rms_adamw", **k}), None, None),
      # Muon alone takes 2-D float leaves only: its inputs drop the 1-D leaf "b" (see
      # MATRIX_ONLY in runtime_cases).
      "muon": (lambda **k: optim.muon(**k), None, None),
      "muon_momentum_schedule_eps0": (lambda **k: optim.muon(**{
          "learning_rate": 1e-2, "momentum": m_sched, "eps": 0.0, "weight_decay": 0.0,
          **k}), None, None),
      "block_scale_by_nadam": (lambda **k: optim.scale_by_nadam(), None, None),
      "block_scale_by_radam": (lambda **k: optim.scale_by_radam(), None, None),
      "block_scale_by_adamax": (lambda **k: optim.scale_by_adamax(), None, None),
      "block_scale_by_adadelta": (lambda **k: optim.scale_by_adadelta(), None, None),
      "block_scale_by_asgd": (lambda **k: optim.scale_by_asgd(), None, None),
      "block_scale_by_rprop": (lambda **k: optim.scale_by_rprop(), None, None),
      "block_scale_by_adafactor": (lambda **k: optim.scale_by_adafactor(), None, None),
      "block_scale_by_muon": (lambda **k: optim.scale_by_muon(), None, None),
      "block_scale_by_adjusted_learning_rate": (
          lambda **k: optim.scale_by_adjusted_learning_rate(0.1), None, None),
      "reduce_lr_on_plateau(adamw)": (lambda **k: optax.chain(
          optim.adamw(**{"learning_rate": 1e-2, **k}),
          schedules.reduce_lr_on_plateau(1e-2, patience=0)), None, None),
  }


def runtime_inputs(x64: bool):
  """name -> (params, grads, nonfinite_input, expectations)."""
  import jax
  import jax.numpy as jnp
  f = jnp.float64 if x64 else jnp.float32
  w = jnp.asarray(np.linspace(-1.0, 1.0, 6).reshape(2, 3), f)
  b = jnp.asarray([0.5, -0.25, 2.0], f)
  base = {"w": w, "b": b}
  g = {"w": jnp.asarray(np.linspace(0.3, -0.7, 6).reshape(2, 3), f), "b": jnp.asarray(
      [1.0, -2.0, 0.5], f)}
  nan_g = {"w": g["w"].at[0, 1].set(jnp.nan), "b": g["b"]}
  inf_g = {"w": g["w"].at[1, 2].set(jnp.inf), "b": g["b"]}
  ints = {**base, "step": jnp.asarray(7, jnp.int32), "ids": jnp.asarray([7, 1, 0, -3]),
          "flag": jnp.asarray([True, False])}
  int_grads = {**g, "step": jnp.asarray(1, jnp.int32), "ids": jnp.ones(4, jnp.int32),
               "flag": jnp.asarray([True, True])}
  loss_int = lambda p: jnp.sum(p["w"] ** 2) * p["step"] + jnp.sum(p["b"])
  float0_grads = jax.grad(loss_int, allow_int=True)({k: ints[k] for k in ("w", "b", "step")})
  out = {
      "normal": (base, g, False, {}),
      "zero_grads": (base, jax.tree.map(jnp.zeros_like, g), False, {"zero_step_if_no_wd": True}),
      "nan_grad": (base, nan_g, True, {}),
      "inf_grad": (base, inf_g, True, {}),
      "nan_param": (dict(base, b=b.at[0].set(jnp.nan)), g, True, {}),
      "huge_grads_1e30": (base, jax.tree.map(lambda x: x * 1e30, g), False, {}),
      "huge_grads_max": (base, jax.tree.map(
          lambda x: jnp.sign(x) * jnp.finfo(x.dtype).max, g), False, {}),
      "tiny_grads_1e-40": (base, jax.tree.map(lambda x: x * 1e-40, g), False, {}),
      "empty_leaf": ({**base, "e": jnp.zeros((0, 3), f)}, {**g, "e": jnp.zeros((0, 3), f)},
                     False, {}),
      "empty_tree": ({}, {}, False, {}),
      "scalar_leaf": ({"s": jnp.asarray(1.5, f)}, {"s": jnp.asarray(-0.5, f)}, False, {}),
      "fp16": (jax.tree.map(lambda x: x.astype(jnp.float16), base),
               jax.tree.map(lambda x: x.astype(jnp.float16), g), False, {}),
      "bf16": (jax.tree.map(lambda x: x.astype(jnp.bfloat16), base),
               jax.tree.map(lambda x: x.astype(jnp.bfloat16), g), False, {}),
      "int_and_bool_leaves": (ints, int_grads, False, {"ints_unchanged": True}),
      "float0_grads": ({k: ints[k] for k in ("w", "b", "step")}, float0_grads, False,
                       {"ints_unchanged": True}),
      "wrong_shape_grads": (base, {**g, "w": g["w"][:, :2]}, False, {"must_raise": True}),
      "broadcastable_grads": (base, {**g, "b": g["b"][:1]}, False, {"must_raise": True}),
      "wrong_structure_grads": (base, {"w": g["w"]}, False, {"must_raise": True}),
      "grads_none": (base, None, False, {"must_raise": True}),
      "string_grads": (base, {"w": "0.1", "b": g["b"]}, False, {"must_raise": True}),
      "complex_params": ({"z": jnp.ones(2, jnp.complex64)}, {"z": jnp.ones(2, jnp.complex64)},
                         False, {"must_raise": True}),
  }
  return out


# Optimizers defined for 2-D float leaves only (torch.optim.Muon): their runtime inputs are
# matrix_inputs(...), the same cases without the 1-D leaf.
MATRIX_ONLY = ("muon", "muon_momentum_schedule_eps0", "block_scale_by_muon",
               "block_scale_by_adjusted_learning_rate")


def matrix_inputs(inputs):
  """``runtime_inputs`` for a 2-D-only optimizer: the leaf "b" dropped; the cases that were
  invalid through "b" made invalid through "w" instead."""
  out = {}
  for iname, (params, grads, nonfinite, expect) in inputs.items():
    drop = lambda t: {k: v for k, v in t.items() if k != "b"} if isinstance(t, dict) else t
    p2, g2 = drop(params), drop(grads)
    if iname == "broadcastable_grads":
      g2 = {**g2, "w": grads["w"][:1]}
    elif iname == "wrong_structure_grads":
      g2 = {"w": grads["w"], "b": params["b"]}
    elif iname == "nan_param":
      p2 = {**p2, "w": params["w"].at[0, 0].set(float("nan"))}
    elif iname == "scalar_leaf":  # a scalar is not a matrix: must be a clear error
      expect = {"must_raise": True}
    out[iname] = (p2, g2, nonfinite, expect)
  return out


def _first_step_oracle(kind, p0, p1, lr, grads):
  """Adam's first step is lr * g / (|g| + eps'): magnitude <= lr, ~lr where |g| >> eps; a
  sign step (Lion, Sophia before any estimate) is lr exactly where g != 0."""
  import jax
  for k in p0:
    a0, a1, gk = (np.asarray(jax.tree.leaves(t[k])[0], np.float64) for t in (p0, p1, grads))
    if a0.size == 0 or not np.all(np.isfinite(gk)):
      continue
    step = np.abs(a1 - a0)
    big = np.abs(gk) > 1e-3
    # The new parameter is rounded to its dtype: allow one ulp of it.
    dtype = np.asarray(jax.tree.leaves(p0[k])[0]).dtype
    ulp = np.abs(a0) * float(jax.numpy.finfo(dtype).eps) + float(jax.numpy.finfo(dtype).tiny)
    if np.any(step > lr * (1 + 1e-5) + ulp):
      raise Oracle(f"first step {step.max():.3g} > lr {lr}")
    if np.any(big) and np.min(step[big]) < 0.5 * lr:
      raise Oracle(f"first step {np.min(step[big]):.3g} << lr {lr} for |g| > 1e-3")


def runtime_cases(x64: bool):
  import jax
  import jax.numpy as jnp
  import optax
  from jaxopt_llm import optim

  cases = []
  inputs = runtime_inputs(x64)
  for name, (build, sign_like, has_fused) in optimizer_factories().items():
    is_block = name.startswith("block_")
    is_guard = name.startswith("guard_")
    if has_fused is None:
      has_fused = optim.is_fused(build())
    for iname, (params, grads, nonfinite, expect) in (
        matrix_inputs(inputs) if name in MATRIX_ONLY else inputs).items():
      modes = ("eager", "jit") + (("fused",) if has_fused else ())
      if iname == "string_grads":  # jax.jit refuses a string argument itself (not our code)
        modes = tuple(m for m in modes if m != "jit")
      for mode in modes:
        def thunk(build=build, params=params, grads=grads, mode=mode, expect=expect,
                  iname=iname, sign_like=sign_like, name=name, is_block=is_block,
                  is_guard=is_guard):
          tx = build()
          state = tx.init(params)
          extra = {"loss": jnp.float32(1.0)} if is_guard else {}
          if "sophia" in name and mode != "fused":
            extra["hessian"] = None

          def plain(g, s, p):
            u, s = tx.update(g, s, p, **extra)
            if is_block:  # a building block alone: apply a -lr step ourselves
              u = jax.tree.map(lambda x: -0.01 * x if jnp.issubdtype(x.dtype, jnp.inexact)
                               else x, u)
            return optax.apply_updates(p, u), s

          if mode == "eager":
            p1, s1 = plain(grads, state, params)
          elif mode == "jit":
            p1, s1 = jax.jit(plain)(grads, state, params)
            pe, _ = plain(grads, state, params)
            for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(pe)):
              a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
              if not np.allclose(a, c, rtol=1e-5, atol=1e-12, equal_nan=True):
                raise Oracle("eager and jit differ")
          else:
            p1, s1 = optim.update_and_apply(tx, grads, state, params)
            pr, _ = plain(grads, state, params)
            for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(pr)):
              if not np.array_equal(np.asarray(a), np.asarray(c), equal_nan=True):
                raise Oracle("update_and_apply != update + apply_updates")
          if expect.get("must_raise"):
            raise Oracle("accepted an invalid input")
          if iname.startswith("huge_grads"):
            if any(np.isnan(np.asarray(x, np.float64)).any() for x in jax.tree.leaves((p1, s1))
                   if np.asarray(x).dtype.kind == "f" or str(np.asarray(x).dtype) == "bfloat16"):
              raise Oracle("NaN from huge but finite gradients")
            if not _finite((p1, s1)):
              raise Limit("overflow to inf of an exact value beyond float32's range")
            if sign_like == "adam" and "adamax" not in name:  # g**2 overflowed in float32
              raise Limit("g**2 overflows float32: this coordinate's Adam step is 0")
          for k, v in params.items():
            if jnp.shape(p1[k]) != jnp.shape(v) or p1[k].dtype != jnp.asarray(v).dtype:
              raise Oracle(f"leaf {k}: shape/dtype changed")
            if not jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact):
              if not np.array_equal(np.asarray(p1[k]), np.asarray(v)):
                raise Oracle(f"integer leaf {k} changed")
          if expect.get("zero_step_if_no_wd") and (is_block or name in (
              "adam_fp16_state", "sgd_nesterov", "momentum_zero", "rmsprop_centered",
              "rmsprop_eps0", "adagrad_eps0", "nadam", "nadam_b1_schedule", "radam",
              "adamax", "adamax_eps0", "adadelta", "rprop", "rprop_custom", "adafactor",
              "muon_momentum_schedule_eps0")):
            for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(params)):
              if not np.array_equal(np.asarray(a), np.asarray(c)):
                raise Oracle("zero gradient, no decay, but the params moved")
          if sign_like and iname in ("normal", "huge_grads_1e30", "huge_grads_max",
                                     "fp16", "bf16") and "schedule" not in name:
            tx2 = build(**({} if name.startswith("adam_fp16") else {"weight_decay": 0.0}))
            u2, _ = tx2.update(grads, tx2.init(params), params)
            _first_step_oracle(sign_like, params, optax.apply_updates(params, u2), 1e-2, grads)
          if "plateau" in name:  # its `best` starts at +inf (torch's too): not an output
            return p1, s1[0], s1[1].lr
          return p1, s1

        cases.append((f"{name}", f"update:{iname}:{mode}", thunk, nonfinite))
  return cases


def state_cases():
  """A state from other params, a state from another optimizer, update_and_apply(None)."""
  import jax.numpy as jnp
  from jaxopt_llm import optim
  p = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  other = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  cases = []
  for name, (build, _, has_fused) in optimizer_factories().items():
    if name.startswith("guard_") or "plateau" in name:  # the latter: optax.chain's state
      continue
    kw = {"loss": 1.0} if name.startswith("guard_") else {}
    cases.append((name, "state:from_other_shapes",
                  lambda b=build: b().update(p, b().init(other), p, **kw), False))
    cases.append((name, "state:from_other_optimizer",
                  lambda b=build: b().update(p, optim.scale_by_lion().init(other), p), False))
    cases.append((name, "state:none", lambda b=build: b().update(p, None, p), False))
    if not name.startswith("block_"):
      cases.append((name, "update_and_apply:params_none",
                    lambda b=build: optim.update_and_apply(b(), p, b().init(p), None), False))
  return cases


def _sweep_table():
  """tests/optim/test_hyperparameters.py's REQUIRED (builder -> its valid required
  arguments) and NOT_BUILDERS: the one table of every public builder, which that test keeps
  complete (a builder missing from it fails test_every_public_builder_is_swept)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "tests/optim/test_hyperparameters.py"
  spec = importlib.util.spec_from_file_location("_fuzz_hyperparameter_table", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.REQUIRED, mod.NOT_BUILDERS


def build_cases():
  """Every hyperparameter of every public builder (every function of ``optim.__all__`` and
  ``schedules.__all__`` but the step helpers) with bad values: must be a clear error."""
  import inspect
  import jax.numpy as jnp
  from jaxopt_llm import optim, schedules
  required, not_builders = _sweep_table()
  builders = [getattr(m, n) for m in (optim, schedules) for n in m.__all__
              if inspect.isfunction(getattr(m, n)) and n not in not_builders]
  missing = [fn.__name__ for fn in builders if fn not in required]
  if missing:
    raise SystemExit(f"fuzz_optim: builders missing from REQUIRED: {missing}")
  bad_values = {
      "string": "0.1", "none": None, "nan": float("nan"), "inf": float("inf"),
      "neg_inf": -float("inf"), "negative": -1.0, "huge": 1e300, "bool": True,
      "list": [0.1], "array": jnp.ones(2), "complex": 1 + 1j, "int8_dtype": jnp.int8,
      "nan_schedule": lambda s: float("nan"), "neg_schedule": lambda s: -1e-3 * s,
      "str_schedule": lambda s: "0.1", "dict": {"a": 1},
  }
  cases = []
  for fn in builders:
    for param in inspect.signature(fn).parameters.values():
      if param.name == "inner":
        continue
      for label, bad in bad_values.items():
        kwargs = {**required.get(fn, {}), param.name: bad}

        def thunk(fn=fn, kwargs=kwargs, name=param.name, label=label, default=param.default):
          out = fn(**kwargs)
          # Some values are valid for some arguments (mask=None, huge lr, 1e300 weight decay).
          return _accepted_ok(fn, name, label, kwargs[name], default, out)

        cases.append((fn.__name__, f"build:{param.name}={label}", thunk, False))
  return cases


def _accepted_ok(fn, name, label, value, default, out):
  """A bad-looking value that was accepted: is it a valid one? Else: silently wrong."""
  valid = {
      ("none", "mask"), ("none", "mu_dtype"), ("none", "nu_dtype"), ("none", "timescale"),
      ("huge", "learning_rate"), ("huge", "weight_decay"), ("huge", "peak_lr"), ("huge", "lr"),
      ("huge", "eps"), ("huge", "rho"), ("huge", "k"), ("huge", "initial_accumulator_value"),
      ("huge", "lr_decay"), ("huge", "power"), ("huge", "min_lr"), ("huge", "eta_min"),
      # torch accepts these and the formulas stay defined: ASGD's t0 (averaging never
      # starts), alpha (eta -> 0), lambd (a decay like weight_decay); NAdam's momentum_decay
      # (mu_t -> b1); Adafactor's clipping threshold d (no clipping); OneCycleLR's and
      # CyclicLR's rates and divisors; ReduceLROnPlateau's threshold (never better).
      ("huge", "t0"), ("huge", "alpha"), ("huge", "lambd"), ("huge", "momentum_decay"),
      ("huge", "d"), ("huge", "max_lr"), ("huge", "base_lr"), ("huge", "div_factor"),
      ("huge", "final_div_factor"), ("huge", "threshold"),
      ("huge", "adamw_learning_rate"), ("huge", "adamw_weight_decay"), ("huge", "adamw_eps"),
      ("negative", "beta2_decay"),  # Adafactor's tau <= 0 (default -0.8)
  }
  if (label, name) in valid or (label == "none" and default is None):
    return None
  if label == "bool" and isinstance(default, bool):  # True is a valid flag
    return None
  if name.endswith("mask") and (label == "bool" or callable(value)):
    # True is a valid prefix mask; a callable mask is called (and checked) at update time.
    return None
  if label == "huge" and name in ("min_lr", "eta_min"):
    return None
  if name in ("labels", "lr_lambda", "scale_fn") and callable(value):
    # muon_with_adamw's labels callable is called (and checked) at init; lambda_lr's
    # lr_lambda is tabulated at build, cyclic scale_fn probed at build (jnp.int8 maps n to
    # an integer factor 1: valid).
    return None
  raise Oracle(f"{name}={value!r} accepted")


def schedule_cases():
  import jax
  import jax.numpy as jnp
  from jaxopt_llm import schedules as S
  scheds = {
      "warmup_cosine": (S.warmup_cosine(1e-3, 10, 100, 1e-4), 0.0, 1e-3),
      "warmup_cosine_w=T": (S.warmup_cosine(1e-3, 100, 100), 0.0, 1e-3),
      "linear_decay_T=1": (S.linear_decay(1e-3, 0, 1), 0.0, 1e-3),
      "polynomial_decay_p0.5": (S.polynomial_decay(1e-3, 5, 50, 0.0, 0.5), 0.0, 1e-3),
      "constant_with_warmup": (S.constant_with_warmup(1e-3, 10), 0.0, 1e-3),
      "inverse_sqrt": (S.inverse_sqrt(1e-3, 10), 0.0, 1e-3),
      "wsd_1-sqrt": (S.wsd(1e-3, 5, 5, 5, 1e-5, "1-sqrt"), 0.0, 1e-3),
      "wsd_decay0": (S.wsd(1e-3, 0, 5, 0), 0.0, 1e-3),
      "step_decay": (S.step_decay(1e-3, 7, 0.5), 0.0, 1e-3),
      "exponential_lr": (S.exponential_lr(1e-3, 0.9), 0.0, 1e-3),
      "cosine_annealing": (S.cosine_annealing(1e-3, 20, 1e-5), 1e-5, 1e-3),
      "peak_0": (S.warmup_cosine(0.0, 10, 100), 0.0, 0.0),
      "peak_huge": (S.warmup_cosine(1e38, 10, 100), 0.0, 1e38),
      # The torch.optim.lr_scheduler twins: (schedule, lowest, highest value).
      "step_lr": (S.step_lr(1e-3, 7, 0.5), 0.0, 1e-3),
      "multi_step_lr": (S.multi_step_lr(1e-3, [3, 8], 0.5), 0.0, 1e-3),
      "constant_lr": (S.constant_lr(1e-3, 0.5, 4), 5e-4, 1e-3),
      "linear_lr": (S.linear_lr(1e-3, 0.25, 1.0, 4), 2.5e-4, 1e-3),
      "linear_lr_down": (S.linear_lr(1e-3, 1.0, 0.1, 4), 1e-4, 1e-3),
      "polynomial_lr": (S.polynomial_lr(1e-3, 6, 2.0), 0.0, 1e-3),
      "cosine_annealing_lr": (S.cosine_annealing_lr(1e-3, 20, 1e-5), 1e-5, 1e-3),
      "cosine_annealing_lr_T1": (S.cosine_annealing_lr(1e-3, 1), 0.0, 1e-3),
      "warm_restarts_Tmult2": (S.cosine_annealing_warm_restarts(1e-3, 3, 2, 1e-5), 1e-5,
                               1e-3),
      "warm_restarts_T0_1": (S.cosine_annealing_warm_restarts(1e-3, 1), 0.0, 1e-3),
      "cyclic_lr": (S.cyclic_lr(1e-4, 1e-3, 5), 1e-4, 1e-3),
      "cyclic_lr_exp_range": (S.cyclic_lr(1e-4, 1e-3, 3, 2, "exp_range", 0.9), 1e-4, 1e-3),
      "cyclic_lr_triangular2": (S.cyclic_lr(1e-4, 1e-3, 1, 1, "triangular2"), 1e-4, 1e-3),
      "cyclic_momentum": (S.cyclic_momentum(0.8, 0.9, 5), 0.8, 0.9),
      "one_cycle_lr": (S.one_cycle_lr(1e-3, 100), 0.0, 1e-3),
      "one_cycle_lr_3phase_linear": (S.one_cycle_lr(1e-3, 10, 0.5, "linear", 10.0, 1e4,
                                                    True), 0.0, 1e-3),
      "one_cycle_lr_total_2": (S.one_cycle_lr(1e-3, 2), 0.0, 1e-3),
      "one_cycle_momentum": (S.one_cycle_momentum(100), 0.85, 0.95),
      "one_cycle_momentum_3phase": (S.one_cycle_momentum(10, 0.8, 0.9, 0.5, "linear", True),
                                    0.8, 0.9),
      "sequential_lr": (S.sequential_lr([S.linear_lr(1e-3, 0.1, 1.0, 5),
                                         S.cosine_annealing_lr(1e-3, 10)], [5]), 0.0, 1e-3),
      "chained_scheduler": (S.chained_scheduler(1e-3, [S.step_lr(1.0, 5, 0.5),
                                                       S.exponential_lr(1.0, 0.9)]), 0.0,
                            1e-3),
      "lambda_lr": (S.lambda_lr(1e-3, lambda n: 1.0 / (n + 1), 20), 0.0, 1e-3),
      "multiplicative_lr": (S.multiplicative_lr(1e-3, lambda n: 0.9, 20), 0.0, 1e-3),
  }
  steps = {
      "0": (0, False), "negative": (-5, False), "int32_max": (2**31 - 1, False),
      "int64_big": (np.int64(2**40), False), "float": (2.5, False), "nan": (float("nan"), True),
      "inf": (float("inf"), True), "neg_inf": (-float("inf"), True),
      "array_empty": (np.zeros((0,), np.int32), False),
      "array_2d": (np.arange(6, dtype=np.int32).reshape(2, 3), False),
      "uint8": (np.uint8(200), False), "bool": (True, False), "string": ("5", False),
      "none": (None, False), "complex": (1 + 1j, False),
  }
  cases = []
  for sname, (sched, lo, hi) in scheds.items():
    for tname, (step, nonfinite) in steps.items():
      # jax.jit itself refuses a string argument (before our code runs): eager only.
      for mode in ("eager",) if tname == "string" else ("eager", "jit"):
        def thunk(sched=sched, step=step, lo=lo, hi=hi, mode=mode, tname=tname):
          out = sched(step) if mode == "eager" else jax.jit(sched)(step)
          arr = np.asarray(out, np.float64)
          if tname in ("string", "none", "complex"):
            raise Oracle(f"step {step!r} accepted")
          if arr.shape != np.shape(step):
            raise Oracle(f"shape {arr.shape} for step shape {np.shape(step)}")
          fin = arr[np.isfinite(arr)]
          if np.any(fin < lo * (1 - 1e-6)) or np.any(fin > hi * (1 + 1e-6)):
            raise Oracle(f"value {arr} outside [{lo}, {hi}]")
          return out
        cases.append((f"schedule:{sname}", f"step={tname}:{mode}", thunk, nonfinite))
  return cases


def plateau_cases():
  """reduce_lr_on_plateau's metric: NaN/inf/vector/string/None/int/bool values, eager and
  jit; a NaN or inf metric must never make the scale NaN or raise it above 1."""
  import jax
  import jax.numpy as jnp
  from jaxopt_llm import schedules as S
  p = {"w": jnp.ones(3), "i": jnp.asarray([1, 2])}
  cases = []
  for label, values, invalid in (
      ("nan", [1.0, float("nan"), float("nan")], False),
      ("inf", [1.0, float("inf"), float("inf")], False),
      ("neg_inf", [1.0, -float("inf"), 0.5], False),
      ("decreasing", [3.0, 2.0, 1.0], False), ("flat", [1.0, 1.0, 1.0], False),
      ("int", [3, 3, 3], False), ("float64_huge", [np.float64(1e300)] * 3, False),
      ("vector", [jnp.ones(3)], True), ("string", ["1.0"], True), ("bool", [True], True),
      ("complex", [1 + 1j], True)):
    for mode in ("eager", "jit"):
      def thunk(values=values, mode=mode, invalid=invalid, label=label):
        tx = S.reduce_lr_on_plateau(1e-2, patience=0, cooldown=0)
        s = tx.init(p)
        f = lambda u, s, v: tx.update(u, s, p, value=v)
        jittable = mode == "jit" and label not in ("string",)
        for v in values:
          u, s = jax.jit(f)(p, s, v) if jittable else f(p, s, v)
          if not np.array_equal(np.asarray(u["i"]), np.asarray(p["i"])):
            raise Oracle("an integer leaf was scaled")
          scale = np.asarray(u["w"], np.float64)[0]
          if not (np.isfinite(scale) and 0 <= scale <= 1 + 1e-7):
            raise Oracle(f"scale {scale} outside [0, 1] (metric {v!r})")
        if invalid:
          raise Oracle("accepted")
        return u, s.lr  # `best` may be +-inf (the metric's), the rate may not
      cases.append(("reduce_lr_on_plateau", f"value={label}:{mode}", thunk, False))
  return cases


def sophia_helper_cases():
  import jax
  import jax.numpy as jnp
  from jaxopt_llm import optim
  from jaxopt_llm.optim import hessian as H
  key = jax.random.PRNGKey(0)
  p = {"w": jnp.ones((3, 4)) * 0.1}
  x = jnp.ones((5, 3))
  logits = lambda q: x @ q["w"]
  loss = lambda q: -jnp.mean(jax.nn.log_softmax(logits(q))[:, 0])
  tx = optim.sophia(1e-3)
  s = tx.init(p)
  cases = []
  gnb_args = {
      "normal": ({}, False), "where_all_false": ({"where": jnp.zeros(5, bool)}, False),
      "where_wrong_shape": ({"where": jnp.ones(4, bool)}, False),
      "where_float": ({"where": jnp.ones(5)}, False), "where_string": ({"where": "x"}, False),
      "clip_0": ({"clip_norm": 0.0}, False), "clip_nan": ({"clip_norm": float("nan")}, False),
      "clip_string": ({"clip_norm": "1"}, False),
  }
  for label, (kw, nonfinite) in gnb_args.items():
    for mode in ("eager", "jit"):
      def thunk(kw=kw, mode=mode, label=label):
        f = lambda q: H.gauss_newton_bartlett(logits, q, key, **kw)
        out = f(p) if mode == "eager" else jax.jit(f)(p)
        if label in ("where_wrong_shape", "where_float", "where_string", "clip_0",
                     "clip_nan", "clip_string"):
          raise Oracle("accepted")
        if np.any(np.asarray(out["w"]) < 0):
          raise Oracle("negative GNB estimate")
        return out
      cases.append(("gauss_newton_bartlett", f"{label}:{mode}", thunk, nonfinite))
  nan_logits = lambda q: logits(q) * jnp.nan
  cases.append(("gauss_newton_bartlett", "nan_logits",
                lambda: H.gauss_newton_bartlett(nan_logits, p, key), True))
  cases.append(("gauss_newton_bartlett", "logits_fn_not_callable",
                lambda: H.gauss_newton_bartlett("f", p, key), False))
  cases.append(("gauss_newton_bartlett", "int_logits",
                lambda: H.gauss_newton_bartlett(lambda q: jnp.ones((2, 3), jnp.int32), p, key),
                False))
  cases.append(("gauss_newton_bartlett", "scalar_logits",
                lambda: H.gauss_newton_bartlett(lambda q: jnp.sum(q["w"]), p, key), False))
  for dist in ("rademacher", "gaussian", "uniform", 3):
    for mode in ("eager", "jit"):
      def thunk(dist=dist, mode=mode):
        f = lambda q: H.hutchinson(loss, q, key, distribution=dist)
        out = f(p) if mode == "eager" else jax.jit(f)(p)
        if dist not in ("rademacher", "gaussian"):
          raise Oracle("accepted")
        return out
      cases.append(("hutchinson", f"distribution={dist}:{mode}", thunk, False))
  cases.append(("hutchinson", "vector_loss",
                lambda: H.hutchinson(lambda q: q["w"].sum(0), p, key), False))
  for label, est, nonfinite in (
      ("nan_estimate", {"w": jnp.full((3, 4), jnp.nan)}, True),
      ("inf_estimate", {"w": jnp.full((3, 4), jnp.inf)}, True),
      ("negative_estimate", {"w": -jnp.ones((3, 4))}, False),
      ("wrong_shape_estimate", {"w": jnp.ones((4, 3))}, False),
      ("wrong_structure_estimate", [jnp.ones((3, 4))], False),
      ("int_estimate", {"w": jnp.ones((3, 4), jnp.int32)}, False),
      ("string_estimate", {"w": "x"}, False)):
    for mode in ("update", "fused", "every_k_jit"):
      def thunk(est=est, mode=mode, label=label):
        if mode == "update":
          u, s1 = tx.update(p, s, p, hessian=est)
        elif mode == "fused":
          _, s1 = optim.update_and_apply(tx, p, s, p, hessian=est)
        else:
          _, s1 = jax.jit(lambda s_: H.update_every_k(tx, p, s_, p, step=jnp.asarray(0),
                                                       estimate_fn=lambda q: est, k=2))(s)
        if label.startswith(("wrong", "int", "string")):
          raise Oracle("accepted")
        h = np.asarray(s1[0].hessian["w"])
        if not np.all(np.isfinite(h)):
          raise Oracle("a non-finite estimate reached h")
        if label in ("nan_estimate", "inf_estimate") and int(
            optim.sophia_hessian_rejected(s1)) != 1:
          raise Oracle("rejected estimate not counted")
        return s1
      cases.append(("sophia hessian=", f"{label}:{mode}", thunk, False))
  for label, args in (("step_float", dict(step=1.5)), ("step_string", dict(step="0")),
                      ("k_0", dict(step=0, k=0)), ("k_float", dict(step=0, k=2.0)),
                      ("no_sophia", dict(step=0, tx_other=True)),
                      ("fn_not_callable", dict(step=0, estimate_fn=3))):
    def thunk(args=args):
      args = dict(args)
      t = optim.adamw(1e-3) if args.pop("tx_other", False) else tx
      st = t.init(p)
      fn = args.pop("estimate_fn", lambda q: q)
      H.update_every_k(t, p, st, p, estimate_fn=fn, **args)
      raise Oracle("accepted")
    cases.append(("update_every_k", label, thunk, False))
  for fn in (optim.sophia_win_rate, optim.sophia_hessian_norm, optim.sophia_hessian_rejected):
    cases.append((fn.__name__, "adamw_state",
                  lambda fn=fn: fn(optim.adamw(1e-3).init(p)), False))
    cases.append((fn.__name__, "none", lambda fn=fn: fn(None), False))
  return cases


def guard_cases():
  import jax
  import jax.numpy as jnp
  from jaxopt_llm import optim
  p = {"w": jnp.ones(3)}
  cases = []
  for label, loss, nonfinite in (("nan", jnp.nan, True), ("inf", jnp.inf, True),
                                 ("vector", jnp.ones(3), False), ("string", "1", False),
                                 ("none", None, False), ("int", 3, False),
                                 ("f64_huge", np.float64(1e300), False)):
    for mode in ("eager", "jit"):
      def thunk(loss=loss, mode=mode, label=label):
        tx = optim.skip_spikes(optim.adamw(1e-2))
        s = tx.init(p)
        f = lambda g, s, l: tx.update(g, s, p, loss=l)
        u, s1 = f(p, s, loss) if mode == "eager" or label in ("string", "none") else jax.jit(
            f)(p, s, loss)
        if label in ("vector", "string", "none"):
          raise Oracle("accepted")
        if label in ("nan", "inf") and (int(s1.skipped_nonfinite) != 1 or np.any(
            np.asarray(u["w"]))):
          raise Oracle("non-finite loss not skipped")
        return u, s1
      cases.append(("skip_spikes", f"loss={label}:{mode}", thunk, False))
  return cases


def parallel_cases():
  import jax
  import jax.numpy as jnp
  from jaxopt_llm import parallel
  cases = []
  n = len(jax.devices())
  for label, thunk in (
      ("make_mesh(data=0)", lambda: parallel.make_mesh(data=0)),
      ("make_mesh(data='2')", lambda: parallel.make_mesh(data="2")),
      ("make_mesh(model=n+1)", lambda: parallel.make_mesh(model=n + 1)),
      ("make_mesh(devices=-1)", lambda: parallel.make_mesh(-1)),
      ("zero_spec(shape=(3,), axis_size=0)", lambda: parallel.zero_spec((3,), 0)),
      ("zero_spec(shape='3', axis_size=2)", lambda: parallel.zero_spec("3", 2)),
      ("split_batch(n=3, batch 4)", lambda: parallel.split_batch({"x": jnp.ones((4, 2))}, 3)),
      ("split_batch(n=0)", lambda: parallel.split_batch({"x": jnp.ones((4, 2))}, 0)),
      ("split_batch(scalar)", lambda: parallel.split_batch({"x": jnp.ones(())}, 1)),
      ("replicate(devices=[])", lambda: parallel.replicate({"x": jnp.ones(2)}, [])),
      ("unreplicate(scalar)", lambda: parallel.unreplicate({"x": jnp.ones(())})),
      ("shard_batch(batch 3 on mesh)", lambda: parallel.shard_batch(
          {"x": jnp.ones((3, 2))}, parallel.make_mesh(data=2) if n >= 2 else None)),
      ("param_shardings(mode='x')", lambda: parallel.param_shardings(
          {"w": jnp.ones(4)}, parallel.make_mesh(), "x")),
  ):
    def wrapped(thunk=thunk, label=label):
      out = thunk()
      if label in ("unreplicate(scalar)",):
        return out
      raise Oracle(f"accepted: {out!r}"[:200])
    cases.append(("parallel", label, wrapped, False))
  return cases


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("-v", "--verbose", action="store_true", help="print every non-clean case")
  ap.add_argument("--x64", action="store_true", help="run under jax_enable_x64")
  ap.add_argument("--only", default="", help="regex on the target name")
  args = ap.parse_args(argv)
  import os
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  import jax
  if args.x64:
    jax.config.update("jax_enable_x64", True)
  import warnings
  warnings.filterwarnings("ignore")

  groups = {
      "optimizers/blocks/guard: update": lambda: runtime_cases(args.x64),
      "optimizers/blocks: state": state_cases,
      "builders: hyperparameters": build_cases,
      "schedules: steps": schedule_cases,
      "reduce_lr_on_plateau: value": plateau_cases,
      "sophia helpers": sophia_helper_cases,
      "skip_spikes: loss": guard_cases,
      "parallel helpers": parallel_cases,
  }
  table = collections.OrderedDict()
  bad = []
  for group, make in groups.items():
    counts = collections.Counter()
    for target, label, thunk, nonfinite in make():
      if args.only and not re.search(args.only, target):
        continue
      kind, detail = classify(thunk, nonfinite)
      counts[kind] += 1
      if kind in (WRONG, CRASH) or (args.verbose and kind != FINITE and kind != CLEAR):
        bad.append((kind, target, label, detail))
    table[group] = counts
  width = max(len(g) for g in table) + 2
  head = f"{'group':<{width}}{'cases':>7}" + "".join(f"{k:>18}" for k in ORDER)
  print(head)
  total = collections.Counter()
  for group, counts in table.items():
    total.update(counts)
    print(f"{group:<{width}}{sum(counts.values()):>7}" + "".join(
        f"{counts[k]:>18}" for k in ORDER))
  print(f"{'total':<{width}}{sum(total.values()):>7}" + "".join(
      f"{total[k]:>18}" for k in ORDER))
  if bad:
    print()
    for kind, target, label, detail in bad:
      print(f"[{kind}] {target} {label}: {detail}")
  return 1 if total[WRONG] or total[CRASH] else 0


if __name__ == "__main__":
  sys.exit(main())
