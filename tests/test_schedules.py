"""Tests for jaxopt_llm.schedules.

1. Every schedule against its written closed form at every step of a run, with reference
   implementations in plain Python ``math`` (float64): the Hugging Face LambdaLR lambdas
   (re-derived here from their equations) and PyTorch's closed forms.
2. Against PyTorch's real ``torch.optim.lr_scheduler`` classes: StepLR, ExponentialLR,
   CosineAnnealingLR, and LambdaLR driven by the HF lambdas.
3. Properties (hypothesis): warmup from 0 to peak, monotone phases, bounds, exact min_lr
   after the end, dtype/shape, jit/vmap and use inside optax transformations.
4. Invalid hyperparameters raise ValueError naming the argument, when the schedule is built.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_llm import schedules as S

RTOL = 1e-6
ATOL = 1e-9
EXTRA = 50  # steps checked past the end of each schedule


# ----------------------------------------------------------------------------------------
# Reference closed forms in float64 Python: the HF lambdas (multipliers of the base lr).
# ----------------------------------------------------------------------------------------


def hf_cosine_lambda(step, *, warmup, total, min_lr_rate=0.0, num_cycles=0.5):
  """HF _get_cosine_schedule_with_warmup_lr_lambda (with the min-lr-rate variant)."""
  if step < warmup:
    return step / max(1, warmup)
  progress = (step - warmup) / max(1, total - warmup)
  factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
  return max(0.0, factor * (1.0 - min_lr_rate) + min_lr_rate)


def hf_linear_lambda(step, *, warmup, total):
  """HF _get_linear_schedule_with_warmup_lr_lambda."""
  if step < warmup:
    return step / max(1, warmup)
  return max(0.0, (total - step) / max(1, total - warmup))


def hf_polynomial_lambda(step, *, warmup, total, lr_init, lr_end, power):
  """HF _get_polynomial_decay_schedule_with_warmup_lr_lambda."""
  if step < warmup:
    return step / max(1, warmup)
  if step > total:
    return lr_end / lr_init
  pct_remaining = 1.0 - (step - warmup) / (total - warmup)
  return ((lr_init - lr_end) * pct_remaining**power + lr_end) / lr_init


def hf_constant_lambda(step, *, warmup):
  """HF _get_constant_schedule_with_warmup_lr_lambda."""
  if step < warmup:
    return step / max(1.0, warmup)
  return 1.0


def hf_inverse_sqrt_lambda(step, *, warmup, timescale=None):
  """HF _get_inverse_sqrt_schedule_lr_lambda."""
  if timescale is None:
    timescale = warmup or 10_000
  if step < warmup:
    return step / max(1, warmup)
  shift = timescale - warmup
  return 1.0 / math.sqrt((step + shift) / timescale)


def hf_wsd_lambda(step, *, warmup, stable, decay, decay_type, min_lr_ratio=0.0,
                  warmup_from_zero=True):
  """HF _get_wsd_scheduler_lambda (warmup_type="linear", num_cycles=0.5).

  HF's warmup starts at min_lr_ratio; ours (documented) starts at 0. ``warmup_from_zero``
  picks ours; with min_lr_ratio = 0 the two agree.
  """
  if step < warmup:
    factor = step / max(1, warmup)
    return factor if warmup_from_zero else factor * (1.0 - min_lr_ratio) + min_lr_ratio
  if step < warmup + stable:
    return 1.0
  if step < warmup + stable + decay:
    progress = (step - warmup - stable) / max(1, decay)
    if decay_type == "linear":
      factor = 1.0 - progress
    elif decay_type == "cosine":
      factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
    elif decay_type == "1-sqrt":
      factor = 1.0 - math.sqrt(progress)
    else:
      raise AssertionError(decay_type)
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
  return min_lr_ratio


# Our documented semantics in terms of the HF lambdas (the learning rate, not a multiplier).


def ref_warmup_cosine(step, peak_lr, warmup_steps, total_steps, min_lr=0.0):
  if warmup_steps == total_steps and step >= total_steps:
    return min_lr  # no decay phase: over at total_steps
  rate = min_lr / peak_lr if peak_lr else 0.0
  # Clamping the step at total keeps HF's cosine from rising again after the end.
  return peak_lr * hf_cosine_lambda(min(step, total_steps), warmup=warmup_steps,
                                    total=total_steps, min_lr_rate=rate)


def ref_linear_decay(step, peak_lr, warmup_steps, total_steps, min_lr=0.0):
  value = hf_linear_lambda(step, warmup=warmup_steps, total=total_steps)
  if step < warmup_steps:
    return peak_lr * value
  return min_lr + (peak_lr - min_lr) * value


def ref_polynomial_decay(step, peak_lr, warmup_steps, total_steps, min_lr=0.0, power=1.0):
  if warmup_steps == total_steps and step >= total_steps:
    return min_lr  # HF divides by zero here
  return peak_lr * hf_polynomial_lambda(step, warmup=warmup_steps, total=total_steps,
                                        lr_init=peak_lr, lr_end=min_lr, power=power)


def ref_constant_with_warmup(step, peak_lr, warmup_steps):
  return peak_lr * hf_constant_lambda(step, warmup=warmup_steps)


def ref_inverse_sqrt(step, peak_lr, warmup_steps, timescale=None):
  return peak_lr * hf_inverse_sqrt_lambda(step, warmup=warmup_steps, timescale=timescale)


def ref_wsd(step, peak_lr, warmup_steps, stable_steps, decay_steps, min_lr=0.0,
            decay_type="linear"):
  return peak_lr * hf_wsd_lambda(step, warmup=warmup_steps, stable=stable_steps,
                                 decay=decay_steps, decay_type=decay_type,
                                 min_lr_ratio=min_lr / peak_lr)


def ref_step_decay(step, lr, step_size, gamma=0.1):
  return lr * gamma**(step // step_size)


def ref_exponential_lr(step, lr, gamma):
  return lr * gamma**step


def ref_cosine_annealing(step, lr, T_max, eta_min=0.0):  # noqa: N803
  t = min(step, T_max)
  return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * t / T_max)) / 2.0


# ----------------------------------------------------------------------------------------
# Parameter sets.
# ----------------------------------------------------------------------------------------

WARMUP_TOTAL_CASES = [
  dict(peak_lr=3e-4, warmup_steps=10, total_steps=100),
  dict(peak_lr=1.0, warmup_steps=0, total_steps=50),
  dict(peak_lr=6e-4, warmup_steps=20, total_steps=20, min_lr=6e-5),  # warmup == total
  dict(peak_lr=2.5, warmup_steps=7, total_steps=93, min_lr=0.25),
  dict(peak_lr=1e-3, warmup_steps=1, total_steps=1),
  dict(peak_lr=1.0, warmup_steps=0, total_steps=1, min_lr=0.5),
  dict(peak_lr=0.7, warmup_steps=13, total_steps=150, min_lr=0.7),  # min_lr == peak
]

POLY_CASES = [dict(c, power=p) for c in WARMUP_TOTAL_CASES[:4] for p in (1.0, 2.0, 0.5, 3.7)]

WSD_CASES = [
  dict(peak_lr=1e-3, warmup_steps=10, stable_steps=30, decay_steps=40),
  dict(peak_lr=2.0, warmup_steps=0, stable_steps=0, decay_steps=25, min_lr=0.2),
  dict(peak_lr=3e-4, warmup_steps=5, stable_steps=10, decay_steps=0, min_lr=3e-5),
  dict(peak_lr=1.0, warmup_steps=10, stable_steps=20, decay_steps=1),
  dict(peak_lr=1.0, warmup_steps=8, stable_steps=0, decay_steps=57, min_lr=0.01),
]
WSD_CASES = [dict(c, decay_type=d) for c in WSD_CASES for d in ("linear", "cosine", "1-sqrt")]

CONSTANT_CASES = [dict(peak_lr=1e-3, warmup_steps=10), dict(peak_lr=2.0, warmup_steps=0),
                  dict(peak_lr=0.7, warmup_steps=1)]

INV_SQRT_CASES = [
  dict(peak_lr=1e-3, warmup_steps=100),
  dict(peak_lr=1.0, warmup_steps=0),  # timescale 10000
  dict(peak_lr=0.5, warmup_steps=16, timescale=64),
  dict(peak_lr=2.0, warmup_steps=0, timescale=7),
]

STEP_CASES = [dict(lr=1.0, step_size=10), dict(lr=3e-4, step_size=7, gamma=0.5),
              dict(lr=0.1, step_size=1, gamma=0.9), dict(lr=2.0, step_size=30, gamma=1.0)]
EXP_CASES = [dict(lr=1.0, gamma=0.9), dict(lr=3e-4, gamma=0.999), dict(lr=0.5, gamma=0.95),
             dict(lr=1.0, gamma=1.0)]
COS_ANNEAL_CASES = [dict(lr=1.0, T_max=100), dict(lr=3e-4, T_max=37, eta_min=1e-5),
                    dict(lr=1.0, T_max=1, eta_min=0.5)]


def _end(name: str, kw: dict[str, Any]) -> int:
  """Last step of interest (the end of the decay, or a point well past warmup)."""
  if "total_steps" in kw:
    return kw["total_steps"]
  if name == "wsd":
    return kw["warmup_steps"] + kw["stable_steps"] + kw["decay_steps"]
  if name == "cosine_annealing":
    return kw["T_max"]
  if name == "step_decay":
    return 4 * kw["step_size"]
  return kw.get("warmup_steps", 0) + 50


CLOSED_FORM_CASES = (
  [("warmup_cosine", ref_warmup_cosine, c) for c in WARMUP_TOTAL_CASES]
  + [("linear_decay", ref_linear_decay, c) for c in WARMUP_TOTAL_CASES]
  + [("polynomial_decay", ref_polynomial_decay, c) for c in POLY_CASES]
  + [("constant_with_warmup", ref_constant_with_warmup, c) for c in CONSTANT_CASES]
  + [("inverse_sqrt", ref_inverse_sqrt, c) for c in INV_SQRT_CASES]
  + [("wsd", ref_wsd, c) for c in WSD_CASES]
  + [("step_decay", ref_step_decay, c) for c in STEP_CASES]
  + [("exponential_lr", ref_exponential_lr, c) for c in EXP_CASES]
  + [("cosine_annealing", ref_cosine_annealing, c) for c in COS_ANNEAL_CASES]
)


def _case_id(case) -> str:
  name, _, kw = case
  return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


# Every run checked fits in steps [0, L). Evaluating all of them on the same fixed-length
# step array lets eager jnp reuse its compiled kernels instead of compiling per shape, which
# keeps this file fast (XLA compiles dominate its runtime).
L = 256
STEPS = jnp.arange(L, dtype=jnp.int32)


def _eager_vmap(schedule) -> np.ndarray:
  return np.asarray(jax.vmap(schedule)(STEPS))


@pytest.fixture(scope="module")
def per_step_jit_values() -> np.ndarray:
  """[L, len(CLOSED_FORM_CASES)]: each schedule called under jax.jit with a traced scalar step.

  All schedules go into one jitted function: one XLA compile instead of one per case.
  """
  scheds = [getattr(S, name)(**kw) for name, _, kw in CLOSED_FORM_CASES]
  all_at = jax.jit(lambda t: jnp.stack([sched(t) for sched in scheds]))
  return np.stack([np.asarray(all_at(jnp.int32(t))) for t in range(L)])


# ----------------------------------------------------------------------------------------
# 1. Closed forms at every step.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CLOSED_FORM_CASES)),
                         ids=[_case_id(c) for c in CLOSED_FORM_CASES])
def test_matches_closed_form_at_every_step(index, per_step_jit_values):
  name, ref, kw = CLOSED_FORM_CASES[index]
  schedule = getattr(S, name)(**kw)
  n = _end(name, kw) + EXTRA + 1  # steps [0, end + EXTRA]
  assert n <= L
  expected = np.array([ref(t, **kw) for t in range(L)])

  # Vectorised over steps.
  got = _eager_vmap(schedule)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)

  # One step at a time under jit, traced scalar step.
  per_step = per_step_jit_values[:, index]
  assert per_step.dtype == np.float32
  np.testing.assert_allclose(per_step, expected, rtol=RTOL, atol=ATOL)

  # Eagerly with a Python int.
  t = n // 2
  np.testing.assert_allclose(float(schedule(t)), expected[t], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,kw,ref", [
  ("warmup_cosine", dict(peak_lr=3e-4, warmup_steps=2000, total_steps=100_000, min_lr=3e-5),
   ref_warmup_cosine),
  ("linear_decay", dict(peak_lr=1e-3, warmup_steps=500, total_steps=300_000), ref_linear_decay),
  ("wsd", dict(peak_lr=1e-3, warmup_steps=1000, stable_steps=200_000, decay_steps=50_000,
               decay_type="1-sqrt"), ref_wsd),
  ("inverse_sqrt", dict(peak_lr=1e-3, warmup_steps=4000), ref_inverse_sqrt),
  ("exponential_lr", dict(lr=1.0, gamma=0.99999), ref_exponential_lr),
])
def test_long_runs_sampled(name, kw, ref):
  """Realistic run lengths: sampled steps, including the last steps before the end."""
  schedule = getattr(S, name)(**kw)
  end = _end(name, kw) if name not in ("inverse_sqrt", "exponential_lr") else 300_000
  # L steps for every case (a shared shape, see L above).
  steps = np.concatenate([np.linspace(0, end + 100, L - 24).astype(int),
                          np.arange(end - 21, end + 3)])
  expected = np.array([ref(int(t), **kw) for t in steps])
  got = np.asarray(schedule(jnp.asarray(steps, jnp.int32)))
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_large_and_negative_steps():
  """Huge steps do not overflow int32 arithmetic; negative steps are clamped to 0."""
  ending = [
    S.warmup_cosine(1e-3, 100, 1000, min_lr=1e-5),
    S.linear_decay(1e-3, 100, 1000, min_lr=1e-5),
    S.polynomial_decay(1e-3, 100, 1000, min_lr=1e-5, power=0.5),
    S.wsd(1e-3, 100, 500, 400, min_lr=1e-5, decay_type="1-sqrt"),
    S.cosine_annealing(1e-3, 1000, eta_min=1e-5),
  ]
  inv = S.inverse_sqrt(1e-3, 4000)
  others = [inv, S.constant_with_warmup(1e-3, 10), S.exponential_lr(1.0, 0.9),
            S.step_decay(1.0, 2**40)]
  big = [10**9, 2**31 - 1]
  steps = jnp.array(big + [-5, 0], jnp.int32)
  # All of them in one compiled program (one XLA compile).
  jitted = jax.jit(jax.vmap(lambda t: [sched(t) for sched in ending + others]))(steps)
  for i, sched in enumerate(ending):
    for j, t in enumerate(big):
      assert float(sched(t)) == np.float32(1e-5), i
      assert float(jitted[i][j]) == np.float32(1e-5), i
    assert float(sched(-5)) == float(sched(0)), i
    np.testing.assert_allclose(float(jitted[i][2]), float(jitted[i][3]), rtol=0, atol=0)

  inv_at, const_at, exp_at, step_at = jitted[len(ending):]
  for t in big + [10**10]:
    np.testing.assert_allclose(float(inv(t)), ref_inverse_sqrt(t, 1e-3, 4000), rtol=RTOL)
  np.testing.assert_allclose(np.asarray(inv_at[:2]),
                             [ref_inverse_sqrt(t, 1e-3, 4000) for t in big], rtol=RTOL)
  assert float(S.constant_with_warmup(1e-3, 10)(10**9)) == np.float32(1e-3)
  np.testing.assert_array_equal(np.asarray(const_at), np.float32([1e-3, 1e-3, 0.0, 0.0]))
  assert float(S.exponential_lr(1.0, 0.9)(10**9)) == 0.0
  np.testing.assert_array_equal(np.asarray(exp_at), np.float32([0.0, 0.0, 1.0, 1.0]))
  assert float(S.step_decay(1.0, 2**40)(2**31 - 1)) == 1.0
  np.testing.assert_array_equal(np.asarray(step_at), np.float32([1.0, 1.0, 1.0, 1.0]))

  # StepLR's floor is exact even where float32 cannot hold the step.
  sched = S.step_decay(1.0, 7, gamma=0.999999)
  k = 3_000_001  # 7 * k > 2**24
  steps = np.array([7 * k - 1, 7 * k, 7 * k + 6], np.int64)
  expected = [ref_step_decay(int(t), 1.0, 7, 0.999999) for t in steps]
  # (Scalar calls: they reuse the kernels compiled for scalars elsewhere in this file.)
  for convert in (int, np.int64, jnp.int32):
    got = [float(sched(convert(t))) for t in steps]
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    assert got[0] > got[1] == got[2]
  # Float steps take the floor too, including at exact multiples.
  sched = S.step_decay(1.0, 61, gamma=0.5)
  for t, want in ((60.0, 1.0), (61.0, 0.5), (122.0, 0.25), (121.5, 0.5)):
    assert float(sched(jnp.float32(t))) == want


# ----------------------------------------------------------------------------------------
# 2. Against PyTorch's lr_scheduler classes.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


def _torch_lrs(torch, lr: float, make_scheduler: Callable, n: int) -> np.ndarray:
  """The lr PyTorch uses at steps 0..n-1 (optimizer.step() then scheduler.step())."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=lr)
  sched = make_scheduler(opt)
  lrs = []
  for _ in range(n):
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  return np.array(lrs, dtype=np.float64)


def _ours(schedule, n: int) -> np.ndarray:
  assert n <= L
  return _eager_vmap(schedule)[:n]


@pytest.mark.parametrize("kw", STEP_CASES)
def test_step_decay_vs_torch_steplr(torch, kw):
  gamma = kw.get("gamma", 0.1)
  n = 5 * kw["step_size"] + 3
  expected = _torch_lrs(torch, kw["lr"], lambda o: torch.optim.lr_scheduler.StepLR(
      o, step_size=kw["step_size"], gamma=gamma), n)
  np.testing.assert_allclose(_ours(S.step_decay(**kw), n), expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("kw", EXP_CASES)
def test_exponential_lr_vs_torch_exponentiallr(torch, kw):
  n = 60
  expected = _torch_lrs(torch, kw["lr"], lambda o: torch.optim.lr_scheduler.ExponentialLR(
      o, gamma=kw["gamma"]), n)
  np.testing.assert_allclose(_ours(S.exponential_lr(**kw), n), expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("kw", COS_ANNEAL_CASES)
def test_cosine_annealing_vs_torch(torch, kw):
  n = kw["T_max"] + 1  # PyTorch's is periodic past T_max; ours stays at eta_min
  expected = _torch_lrs(torch, kw["lr"], lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
      o, T_max=kw["T_max"], eta_min=kw.get("eta_min", 0.0)), n)
  np.testing.assert_allclose(_ours(S.cosine_annealing(**kw), n), expected, rtol=RTOL, atol=ATOL)


def _lambda_cases():
  """(schedule, peak, HF lambda, number of steps where HF and ours agree)."""
  cases = []
  for c in WARMUP_TOTAL_CASES:
    peak, w, t, lo = c["peak_lr"], c["warmup_steps"], c["total_steps"], c.get("min_lr", 0.0)
    if w < t:  # HF's cosine keeps going past total (ours stays at min_lr); compare up to it
      lam = lambda s, w=w, t=t, r=lo / peak: hf_cosine_lambda(s, warmup=w, total=t, min_lr_rate=r)
      cases.append((f"cosine{c}", S.warmup_cosine(**c), peak, lam, t + 1))
      lam = lambda s, w=w, t=t, p=peak, lo=lo: hf_polynomial_lambda(
          s, warmup=w, total=t, lr_init=p, lr_end=lo, power=2.0)
      cases.append((f"poly{c}", S.polynomial_decay(**c, power=2.0), peak, lam, t + EXTRA))
    if lo == 0.0:  # HF's linear schedule has no floor
      lam = lambda s, w=w, t=t: hf_linear_lambda(s, warmup=w, total=t)
      cases.append((f"linear{c}", S.linear_decay(**c), peak, lam, t + EXTRA))
  for c in CONSTANT_CASES:
    lam = lambda s, w=c["warmup_steps"]: hf_constant_lambda(s, warmup=w)
    cases.append((f"constant{c}", S.constant_with_warmup(**c), c["peak_lr"], lam, 80))
  for c in INV_SQRT_CASES:
    lam = lambda s, c=c: hf_inverse_sqrt_lambda(s, warmup=c["warmup_steps"],
                                                timescale=c.get("timescale"))
    cases.append((f"inverse_sqrt{c}", S.inverse_sqrt(**c), c["peak_lr"], lam, 200))
  for c in WSD_CASES:
    if c.get("min_lr", 0.0) == 0.0:  # with a floor HF's warmup starts at min_lr (ours at 0)
      lam = lambda s, c=c: hf_wsd_lambda(
          s, warmup=c["warmup_steps"], stable=c["stable_steps"], decay=c["decay_steps"],
          decay_type=c["decay_type"], warmup_from_zero=False)
      cases.append((f"wsd{c}", S.wsd(**c), c["peak_lr"], lam, _end("wsd", c) + EXTRA))
  return cases


@pytest.mark.parametrize("case", _lambda_cases(), ids=lambda c: c[0])
def test_warmup_schedules_vs_torch_lambdalr(torch, case):
  _, schedule, peak, lam, n = case
  expected = _torch_lrs(torch, peak, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lam), n)
  np.testing.assert_allclose(_ours(schedule, n), expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------
# 3. Properties.
# ----------------------------------------------------------------------------------------


class Case(NamedTuple):
  schedule: Callable
  peak: float
  floor: float  # lower bound after warmup
  warmup: int
  end: int | None  # first step at which the rate is min_lr for good (None: never)
  peak_at_warmup: bool  # whether lr(warmup) == peak


@st.composite
def warmup_schedules(draw) -> Case:
  kind = draw(st.sampled_from(["cosine", "linear", "poly", "wsd", "constant", "inverse_sqrt",
                               "cosine_annealing"]))
  peak = draw(st.floats(1e-6, 10.0))
  min_lr = peak * draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0))
  warmup = draw(st.integers(0, 60))
  if kind in ("cosine", "linear", "poly"):
    total = max(warmup + draw(st.integers(0, 80)), 1)
    if kind == "cosine":
      sched = S.warmup_cosine(peak, warmup, total, min_lr=min_lr)
    elif kind == "linear":
      sched = S.linear_decay(peak, warmup, total, min_lr=min_lr)
    else:
      power = draw(st.floats(0.1, 5.0))
      sched = S.polynomial_decay(peak, warmup, total, min_lr=min_lr, power=power)
    return Case(sched, peak, min_lr, warmup, total, warmup < total)
  if kind == "wsd":
    stable, decay = draw(st.integers(0, 40)), draw(st.integers(0, 60))
    decay_type = draw(st.sampled_from(["linear", "cosine", "1-sqrt"]))
    if warmup + stable + decay == 0:
      decay = 1
    sched = S.wsd(peak, warmup, stable, decay, min_lr=min_lr, decay_type=decay_type)
    return Case(sched, peak, min_lr, warmup, warmup + stable + decay, stable + decay > 0)
  if kind == "constant":
    return Case(S.constant_with_warmup(peak, warmup), peak, peak, warmup, None, True)
  if kind == "inverse_sqrt":
    timescale = draw(st.none() | st.integers(1, 1000))
    return Case(S.inverse_sqrt(peak, warmup, timescale), peak, 0.0, warmup, None, True)
  t_max = draw(st.integers(1, 100))
  return Case(S.cosine_annealing(peak, t_max, eta_min=min_lr), peak, min_lr, 0, t_max, True)


@settings(max_examples=30, deadline=None)
@given(warmup_schedules())
def test_warmup_decay_properties(case):
  horizon = (case.end if case.end is not None else case.warmup + 100) + 30
  assert horizon < L
  lr = np.asarray(case.schedule(STEPS))[:horizon + 1]
  peak, floor = np.float32(case.peak), np.float32(case.floor)
  assert lr.dtype == np.float32
  assert np.all(np.isfinite(lr))
  w = case.warmup
  if w > 0:
    assert lr[0] == 0.0
  if case.peak_at_warmup:
    assert lr[w] == peak
  else:  # warmup_steps == total_steps: no decay phase, over at the end
    assert lr[w] == floor
  # Warmup: monotone non-decreasing, within [0, peak].
  # (up to and including step w, which is peak, unless warmup_steps == total_steps)
  assert np.all(np.diff(lr[:w + 1 if case.peak_at_warmup else w]) >= 0)
  assert np.all((lr[:w] >= 0) & (lr[:w] <= peak))
  # After warmup: monotone non-increasing, within [floor, peak].
  assert np.all(np.diff(lr[w:]) <= 0)
  assert np.all((lr[w:] >= floor) & (lr[w:] <= peak))
  # Exactly min_lr from the end on.
  if case.end is not None:
    assert np.all(lr[case.end:] == floor)
    assert float(case.schedule(10**9)) == floor


@settings(max_examples=30, deadline=None)
@given(lr=st.floats(1e-6, 10.0), gamma=st.floats(1e-3, 1.0), step_size=st.integers(1, 20))
def test_multiplicative_decay_properties(lr, gamma, step_size):
  for sched in (S.step_decay(lr, step_size, gamma), S.exponential_lr(lr, gamma)):
    vals = np.asarray(sched(STEPS))
    assert vals.dtype == np.float32
    assert vals[0] == np.float32(lr)
    assert np.all(np.diff(vals) <= 0)
    assert np.all((vals >= 0) & (vals <= np.float32(lr)))
  vals = np.asarray(S.step_decay(lr, step_size, gamma)(STEPS))
  # Piecewise constant on each period of step_size steps.
  for start in range(0, L - step_size, step_size):
    assert np.all(vals[start:start + step_size] == vals[start])


ALL_SCHEDULES = {
  "warmup_cosine": S.warmup_cosine(1e-3, 10, 100, min_lr=1e-4),
  "wsd": S.wsd(1e-3, 10, 20, 30, min_lr=1e-4, decay_type="cosine"),
  "linear_decay": S.linear_decay(1e-3, 10, 100),
  "polynomial_decay": S.polynomial_decay(1e-3, 10, 100, power=2.0),
  "constant_with_warmup": S.constant_with_warmup(1e-3, 10),
  "inverse_sqrt": S.inverse_sqrt(1e-3, 10),
  "step_decay": S.step_decay(1e-3, 10, 0.5),
  "exponential_lr": S.exponential_lr(1e-3, 0.97),
  "cosine_annealing": S.cosine_annealing(1e-3, 50),
  # The torch.optim.lr_scheduler twins.
  "step_lr": S.step_lr(1e-3, 10, 0.5),
  "multi_step_lr": S.multi_step_lr(1e-3, [3, 9, 9], 0.5),
  "constant_lr": S.constant_lr(1e-3, 0.5, 6),
  "linear_lr": S.linear_lr(1e-3, 0.25, 0.75, 9),
  "polynomial_lr": S.polynomial_lr(1e-3, 20, 1.5),
  "cosine_annealing_lr": S.cosine_annealing_lr(1e-3, 5, 1e-4),
  "cosine_annealing_warm_restarts": S.cosine_annealing_warm_restarts(1e-3, 3, 2, 1e-5),
  "cyclic_lr": S.cyclic_lr(1e-4, 1e-3, 4, 6, mode="triangular2"),
  "cyclic_momentum": S.cyclic_momentum(0.8, 0.9, 4, mode="exp_range", gamma=0.9),
  "one_cycle_lr": S.one_cycle_lr(1e-3, 20, three_phase=True),
  "one_cycle_momentum": S.one_cycle_momentum(20, anneal_strategy="linear"),
  "sequential_lr": S.sequential_lr([S.linear_lr(1e-3, 0.1, 1.0, 4),
                                    S.cosine_annealing_lr(1e-3, 10)], [4]),
  "chained_scheduler": S.chained_scheduler(1e-3, [S.exponential_lr(1.0, 0.99),
                                                  S.step_lr(1.0, 40, 0.5)]),
  "lambda_lr": S.lambda_lr(1e-3, lambda n: 1.0 / (1 + n), 30),
  "multiplicative_lr": S.multiplicative_lr(1e-3, lambda n: 0.95, 30),
}
NOT_SCHEDULES = ["reduce_lr_on_plateau"]  # a gradient transformation (stateful)


def test_all_public_names_exported():
  assert sorted(S.__all__) == sorted([*ALL_SCHEDULES, *NOT_SCHEDULES])
  for name in S.__all__:
    assert callable(getattr(S, name))
    # A name shared with optax would have to mean the same thing; none is shared
    # (exponential_lr is torch's ExponentialLR, not optax.exponential_decay).
    assert not hasattr(optax.schedules, name) and not hasattr(optax, name), name


def test_dtype_shape_jit_vmap():
  names = sorted(ALL_SCHEDULES)
  scheds = [ALL_SCHEDULES[k] for k in names]
  ref = {k: _eager_vmap(ALL_SCHEDULES[k]) for k in names}
  # One jit and one jit(vmap) over all schedules: a single XLA compile each.
  at = jax.jit(lambda t: [sched(t) for sched in scheds])(jnp.int32(7))
  vmapped = jax.jit(jax.vmap(lambda t: [sched(t) for sched in scheds]))(STEPS)
  for i, name in enumerate(names):
    sched = ALL_SCHEDULES[name]
    assert ref[name].shape == (L,) and ref[name].dtype == np.float32, name
    for arg in (7, np.int32(7), np.int64(7), jnp.int32(7), jnp.asarray(7), 7.0):
      out = sched(arg)
      assert out.shape == () and out.dtype == jnp.float32, (name, arg)
      np.testing.assert_allclose(np.asarray(out), ref[name][7], rtol=RTOL, err_msg=name)
    assert at[i].shape == () and at[i].dtype == jnp.float32, name
    # Different compiled programs may round differently in the last ulp.
    np.testing.assert_allclose(np.asarray(at[i]), ref[name][7], rtol=RTOL, err_msg=name)
    assert vmapped[i].dtype == jnp.float32, name
    np.testing.assert_allclose(np.asarray(vmapped[i]), ref[name], rtol=RTOL, err_msg=name)


def test_inside_optax():
  """lr(t) drives optax.scale_by_learning_rate and optax.inject_hyperparams(optax.sgd)."""
  names = sorted(ALL_SCHEDULES)
  scheds = [ALL_SCHEDULES[k] for k in names]
  ref = {k: _eager_vmap(ALL_SCHEDULES[k]) for k in names}
  grad = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32), "b": jnp.float32(3.0)}
  for make in (optax.scale_by_learning_rate,
               lambda sched: optax.inject_hyperparams(optax.sgd)(learning_rate=sched)):
    txs = [make(sched) for sched in scheds]
    states = [tx.init(grad) for tx in txs]

    @jax.jit  # all transformations in one program: one compile
    def update_all(states, txs=txs):
      outs = [tx.update(grad, state) for tx, state in zip(txs, states)]
      return [o[0] for o in outs], [o[1] for o in outs]

    for t in range(12):
      updates, states = update_all(states)
      for name, upd in zip(names, updates):
        lr = ref[name][t]
        for k in grad:
          np.testing.assert_allclose(np.asarray(upd[k]), -lr * np.asarray(grad[k]), rtol=1e-6,
                                     err_msg=f"{name} step {t}")
  # inject_hyperparams records the lr it used last, at step 11.
  for name, state in zip(names, states):
    np.testing.assert_allclose(float(state.hyperparams["learning_rate"]), ref[name][11],
                               rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------
# 4. Invalid arguments raise ValueError naming the argument, at build time.
# ----------------------------------------------------------------------------------------

BAD_ARGS = [
  # warmup_cosine / linear_decay / polynomial_decay share their checks.
  (S.warmup_cosine, dict(peak_lr=-1e-3, warmup_steps=1, total_steps=10), "peak_lr"),
  (S.warmup_cosine, dict(peak_lr=float("nan"), warmup_steps=1, total_steps=10), "peak_lr"),
  (S.warmup_cosine, dict(peak_lr=float("inf"), warmup_steps=1, total_steps=10), "peak_lr"),
  (S.warmup_cosine, dict(peak_lr="1e-3", warmup_steps=1, total_steps=10), "peak_lr"),
  (S.warmup_cosine, dict(peak_lr=None, warmup_steps=1, total_steps=10), "peak_lr"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=-1, total_steps=10), "warmup_steps"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=11, total_steps=10), "warmup_steps"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=1.0, total_steps=10), "warmup_steps"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=0, total_steps=0), "total_steps"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=0, total_steps=-5), "total_steps"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=0, total_steps=10.5), "total_steps"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=1, total_steps=10, min_lr=-1e-5), "min_lr"),
  (S.warmup_cosine, dict(peak_lr=1e-3, warmup_steps=1, total_steps=10, min_lr=2e-3), "min_lr"),
  (S.linear_decay, dict(peak_lr=-1.0, warmup_steps=1, total_steps=10), "peak_lr"),
  (S.linear_decay, dict(peak_lr=1.0, warmup_steps=20, total_steps=10), "warmup_steps"),
  (S.linear_decay, dict(peak_lr=1.0, warmup_steps=True, total_steps=10), "warmup_steps"),
  (S.linear_decay, dict(peak_lr=1.0, warmup_steps=1, total_steps=10, min_lr=1.5), "min_lr"),
  (S.polynomial_decay, dict(peak_lr=1.0, warmup_steps=1, total_steps=10, power=0.0), "power"),
  (S.polynomial_decay, dict(peak_lr=1.0, warmup_steps=1, total_steps=10, power=-1.0), "power"),
  (S.polynomial_decay, dict(peak_lr=1.0, warmup_steps=1, total_steps=10, min_lr=2.0), "min_lr"),
  (S.polynomial_decay, dict(peak_lr=1.0, warmup_steps=-3, total_steps=10), "warmup_steps"),
  # wsd
  (S.wsd, dict(peak_lr=1.0, warmup_steps=1, stable_steps=1, decay_steps=1, decay_type="exp"),
   "decay_type"),
  (S.wsd, dict(peak_lr=1.0, warmup_steps=1, stable_steps=1, decay_steps=1, decay_type="sqrt"),
   "decay_type"),
  (S.wsd, dict(peak_lr=-1.0, warmup_steps=1, stable_steps=1, decay_steps=1), "peak_lr"),
  (S.wsd, dict(peak_lr=1.0, warmup_steps=-1, stable_steps=1, decay_steps=1), "warmup_steps"),
  (S.wsd, dict(peak_lr=1.0, warmup_steps=1, stable_steps=-1, decay_steps=1), "stable_steps"),
  (S.wsd, dict(peak_lr=1.0, warmup_steps=1, stable_steps=1, decay_steps=-1), "decay_steps"),
  (S.wsd, dict(peak_lr=1.0, warmup_steps=1, stable_steps=1, decay_steps=2.5), "decay_steps"),
  (S.wsd, dict(peak_lr=1.0, warmup_steps=0, stable_steps=0, decay_steps=0), "decay_steps"),
  (S.wsd, dict(peak_lr=1.0, warmup_steps=1, stable_steps=1, decay_steps=1, min_lr=2.0),
   "min_lr"),
  # constant_with_warmup / inverse_sqrt
  (S.constant_with_warmup, dict(peak_lr=-1.0, warmup_steps=1), "peak_lr"),
  (S.constant_with_warmup, dict(peak_lr=1.0, warmup_steps=-1), "warmup_steps"),
  (S.constant_with_warmup, dict(peak_lr=1.0, warmup_steps=2.0), "warmup_steps"),
  (S.inverse_sqrt, dict(peak_lr=-1.0, warmup_steps=1), "peak_lr"),
  (S.inverse_sqrt, dict(peak_lr=1.0, warmup_steps=-1), "warmup_steps"),
  (S.inverse_sqrt, dict(peak_lr=1.0, warmup_steps=1, timescale=0), "timescale"),
  (S.inverse_sqrt, dict(peak_lr=1.0, warmup_steps=1, timescale=2.5), "timescale"),
  # step_decay / exponential_lr / cosine_annealing
  (S.step_decay, dict(lr=-1.0, step_size=10), "lr"),
  (S.step_decay, dict(lr=1.0, step_size=0), "step_size"),
  (S.step_decay, dict(lr=1.0, step_size=2.5), "step_size"),
  (S.step_decay, dict(lr=1.0, step_size=10.0), "step_size"),
  (S.step_decay, dict(lr=1.0, step_size=10, gamma=0.0), "gamma"),
  (S.step_decay, dict(lr=1.0, step_size=10, gamma=-0.5), "gamma"),
  (S.step_decay, dict(lr=1.0, step_size=10, gamma=1.5), "gamma"),
  (S.exponential_lr, dict(lr=1.0, gamma=0.0), "gamma"),
  (S.exponential_lr, dict(lr=1.0, gamma=-0.9), "gamma"),
  (S.exponential_lr, dict(lr=1.0, gamma=1.01), "gamma"),
  (S.exponential_lr, dict(lr=1.0, gamma=float("nan")), "gamma"),
  (S.exponential_lr, dict(lr=float("inf"), gamma=0.9), "lr"),
  (S.cosine_annealing, dict(lr=1.0, T_max=0), "T_max"),
  (S.cosine_annealing, dict(lr=1.0, T_max=10.0), "T_max"),
  (S.cosine_annealing, dict(lr=-1.0, T_max=10), "lr"),
  (S.cosine_annealing, dict(lr=1.0, T_max=10, eta_min=-0.1), "eta_min"),
  (S.cosine_annealing, dict(lr=1.0, T_max=10, eta_min=2.0), "eta_min"),
]


@pytest.mark.parametrize("builder,kwargs,arg", BAD_ARGS,
                         ids=[f"{b.__name__}-{a}-{i}" for i, (b, _, a) in enumerate(BAD_ARGS)])
def test_invalid_arguments_raise_at_build_time(builder, kwargs, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    builder(**kwargs)


def test_traced_hyperparameter_rejected():
  @jax.jit
  def build(peak):
    return S.warmup_cosine(peak, 1, 10)(3)

  with pytest.raises(ValueError, match="peak_lr"):
    build(1e-3)


def test_valid_edge_arguments_accepted():
  """Boundary values that are valid: zero lr, min_lr == peak, warmup == total, numpy ints."""
  assert float(S.warmup_cosine(0.0, 0, 1)(5)) == 0.0
  assert float(S.linear_decay(1.0, np.int64(5), np.int32(10), min_lr=1.0)(7)) == 1.0
  assert float(S.step_decay(1.0, 3, gamma=1.0)(100)) == 1.0
  assert float(S.exponential_lr(np.float32(0.5), np.float64(1.0))(100)) == 0.5
  assert float(S.inverse_sqrt(1.0, 0)(30_000)) == pytest.approx(0.5, rel=1e-6)
  assert float(S.wsd(1.0, 0, 5, 0)(4)) == 1.0
  assert float(S.wsd(1.0, 0, 5, 0)(5)) == 0.0


# ----------------------------------------------------------------------------------------
# Hardening (issue 14): the step's type, milestones for the optimizers' build-time check.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
@pytest.mark.parametrize("step", ["5", None, 1 + 1j, np.asarray(["5"])])
def test_a_step_that_is_not_a_real_number_is_a_type_error(name, step):
  """Before: ``"5"`` was parsed by jnp.asarray(step, float32) (a silent lr), None and complex
  steps crashed inside JAX or dropped the imaginary part."""
  with pytest.raises(TypeError, match="schedule: `step`"):
    ALL_SCHEDULES[name](step)


def test_complex_step_under_jit_is_refused():
  with pytest.raises(TypeError, match="`step`"):
    jax.jit(S.exponential_lr(1e-3, 0.9))(jnp.asarray(1 + 1j))


def test_milestones_are_the_phase_boundaries():
  assert S.warmup_cosine(1e-3, 10, 100).milestones == (10, 100)
  assert S.wsd(1e-3, 10, 20, 30).milestones == (10, 30, 60)
  assert S.constant_with_warmup(1e-3, 7).milestones == (7,)
  assert S.step_decay(1e-3, 25).milestones == (25,)
  assert S.cosine_annealing(1e-3, 40).milestones == (0, 40)


# ----------------------------------------------------------------------------------------
# Issue 15: a twin of every torch.optim.lr_scheduler class, against the real class stepped
# N_TORCH steps (past each schedule's end): rel err <= 1e-6, or abs err <= 1e-7 * base lr
# where the values approach 0 (torch computes in Python float64). Each schedule is
# evaluated once on the whole step array (no per-step dispatch, no compile per case).
# ----------------------------------------------------------------------------------------

N_TORCH = 2400
TORCH_STEPS = np.arange(N_TORCH, dtype=np.int32)


def _torch_run(torch, make: Callable, n: int = N_TORCH, opt: str = "sgd", lr: float = 0.1):
  """(lrs, momenta) PyTorch uses for its first n optimizer steps; ``make(optimizer)``
  builds the scheduler. momenta: ``momentum`` (SGD) or ``betas[0]`` (Adam)."""
  param = torch.nn.Parameter(torch.zeros(1))
  if opt == "sgd":
    o = torch.optim.SGD([param], lr=lr, momentum=0.9)
  else:
    o = torch.optim.Adam([param], lr=lr)
  sched = make(o)
  lrs, moms = [], []
  for _ in range(n):
    group = o.param_groups[0]
    lrs.append(float(group["lr"]))
    moms.append(float(group["momentum"] if opt == "sgd" else group["betas"][0]))
    o.step()  # no gradient: a no-op, keeps torch's step-order check quiet
    if len(lrs) < n:  # (OneCycleLR raises one step past total_steps)
      sched.step()
  return np.array(lrs), np.array(moms)


def _assert_torch_close(ours, expected, scale: float, what: str = "") -> None:
  """|ours - torch| <= max(1e-6 |torch|, 1e-7 * scale) at every step."""
  ours = np.asarray(ours, np.float64)
  assert ours.shape == expected.shape, (ours.shape, expected.shape)
  err = np.abs(ours - expected)
  bound = np.maximum(1e-6 * np.abs(expected), 1e-7 * scale)
  bad = np.nonzero(err > bound)[0]
  assert bad.size == 0, (f"{what}: first mismatch at step {bad[0]}: ours {ours[bad[0]]!r} "
                         f"torch {expected[bad[0]]!r} ({bad.size} steps off)")


def _ours_on_steps(schedule, n: int = N_TORCH) -> np.ndarray:
  out = np.asarray(schedule(TORCH_STEPS[:n]))
  assert out.dtype == np.float32 and out.shape == (n,)
  return out


LR0 = 0.1

# (name, our schedule, torch scheduler factory, scale for the abs tolerance)
TWIN_CASES = [
  ("step_lr", S.step_lr(LR0, 300, 0.5), lambda L: L.StepLR(_o(), 300, 0.5)),
  ("multi_step_lr", S.multi_step_lr(LR0, [100, 500, 500, 1500], 0.3),
   lambda L: L.MultiStepLR(_o(), [100, 500, 500, 1500], 0.3)),
  ("multi_step_lr-unsorted-0", S.multi_step_lr(LR0, [1800, 0, 30]),
   lambda L: L.MultiStepLR(_o(), [1800, 0, 30])),
  ("constant_lr-default", S.constant_lr(LR0), lambda L: L.ConstantLR(_o())),
  ("constant_lr", S.constant_lr(LR0, 0.5, 1000), lambda L: L.ConstantLR(_o(), 0.5, 1000)),
  ("constant_lr-0-iters", S.constant_lr(LR0, 0.25, 0), lambda L: L.ConstantLR(_o(), 0.25, 0)),
  ("linear_lr-default", S.linear_lr(LR0), lambda L: L.LinearLR(_o())),
  ("linear_lr-warmup", S.linear_lr(LR0, 0.1, 1.0, 1500),
   lambda L: L.LinearLR(_o(), 0.1, 1.0, 1500)),
  ("linear_lr-to-0", S.linear_lr(LR0, 1.0, 0.0, 2000), lambda L: L.LinearLR(_o(), 1.0, 0.0, 2000)),
  ("linear_lr-0-iters", S.linear_lr(LR0, 0.5, 1.0, 0), lambda L: L.LinearLR(_o(), 0.5, 1.0, 0)),
  ("exponential_lr", S.exponential_lr(LR0, 0.999), lambda L: L.ExponentialLR(_o(), 0.999)),
  ("polynomial_lr-default", S.polynomial_lr(LR0), lambda L: L.PolynomialLR(_o())),
  ("polynomial_lr", S.polynomial_lr(LR0, 2000, 1.0), lambda L: L.PolynomialLR(_o(), 2000, 1.0)),
  ("polynomial_lr-2", S.polynomial_lr(LR0, 1500, 2.0), lambda L: L.PolynomialLR(_o(), 1500, 2.0)),
  ("polynomial_lr-0.5", S.polynomial_lr(LR0, 2000, 0.5),
   lambda L: L.PolynomialLR(_o(), 2000, 0.5)),
  ("cosine_annealing_lr", S.cosine_annealing_lr(LR0, 500),
   lambda L: L.CosineAnnealingLR(_o(), 500)),
  ("cosine_annealing_lr-eta", S.cosine_annealing_lr(LR0, 2000, 1e-3),
   lambda L: L.CosineAnnealingLR(_o(), 2000, 1e-3)),
  ("cosine_annealing_lr-7", S.cosine_annealing_lr(LR0, 7, 0.05),
   lambda L: L.CosineAnnealingLR(_o(), 7, 0.05)),
  ("cosine_annealing_lr-up", S.cosine_annealing_lr(LR0, 300, 0.3),
   lambda L: L.CosineAnnealingLR(_o(), 300, 0.3)),
  ("warm_restarts", S.cosine_annealing_warm_restarts(LR0, 300),
   lambda L: L.CosineAnnealingWarmRestarts(_o(), 300)),
  ("warm_restarts-mult", S.cosine_annealing_warm_restarts(LR0, 50, 2, 1e-3),
   lambda L: L.CosineAnnealingWarmRestarts(_o(), 50, 2, 1e-3)),
  ("warm_restarts-1-3", S.cosine_annealing_warm_restarts(LR0, 1, 3),
   lambda L: L.CosineAnnealingWarmRestarts(_o(), 1, 3)),
  ("sequential_lr", S.sequential_lr([S.linear_lr(LR0, 0.01, 1.0, 100),
                                     S.cosine_annealing_lr(LR0, 1500)], [100]),
   lambda L: L.SequentialLR(_o(), [L.LinearLR(_o(), 0.01, 1.0, 100),
                                   L.CosineAnnealingLR(_o(), 1500)], [100])),
  ("sequential_lr-3", S.sequential_lr([S.constant_lr(LR0, 0.5, 20), S.exponential_lr(LR0, 0.998),
                                       S.step_lr(LR0, 200, 0.5)], [50, 800]),
   lambda L: L.SequentialLR(_o(), [L.ConstantLR(_o(), 0.5, 20), L.ExponentialLR(_o(), 0.998),
                                   L.StepLR(_o(), 200, 0.5)], [50, 800])),
  ("sequential_lr-lambda", S.sequential_lr([S.polynomial_lr(LR0, 10, 1.0),
                                            S.lambda_lr(LR0, lambda n: 0.5 ** (n // 700), 2400)],
                                           [1000]),
   lambda L: L.SequentialLR(_o(), [L.PolynomialLR(_o(), 10, 1.0),
                                   L.LambdaLR(_o(), lambda n: 0.5 ** (n // 700))], [1000])),
  ("chained", S.chained_scheduler(LR0, [S.linear_lr(1.0, 0.1, 1.0, 100),
                                        S.exponential_lr(1.0, 0.999)]),
   lambda L: L.ChainedScheduler([L.LinearLR(_o(), 0.1, 1.0, 100), L.ExponentialLR(_o(), 0.999)])),
  ("chained-3", S.chained_scheduler(LR0, [S.step_lr(1.0, 300, 0.7),
                                          S.multi_step_lr(1.0, [50, 1200], 0.5),
                                          S.polynomial_lr(1.0, 2200, 1.5),
                                          S.constant_lr(1.0, 0.5, 40)]),
   lambda L: L.ChainedScheduler([L.StepLR(_o(), 300, 0.7), L.MultiStepLR(_o(), [50, 1200], 0.5),
                                 L.PolynomialLR(_o(), 2200, 1.5), L.ConstantLR(_o(), 0.5, 40)])),
  ("chained-cos", S.chained_scheduler(LR0, [S.constant_lr(1.0, 0.2, 10),
                                            S.cosine_annealing_lr(1.0, 3000)]),
   lambda L: L.ChainedScheduler([L.ConstantLR(_o(), 0.2, 10), L.CosineAnnealingLR(_o(), 3000)])),
  ("lambda_lr", S.lambda_lr(LR0, lambda n: min(1.0, (n + 1) / 100) * 0.999 ** n, N_TORCH),
   lambda L: L.LambdaLR(_o(), lambda n: min(1.0, (n + 1) / 100) * 0.999 ** n)),
  ("multiplicative_lr", S.multiplicative_lr(LR0, lambda n: 0.99 if n % 3 == 0 else 0.9995,
                                            N_TORCH),
   lambda L: L.MultiplicativeLR(_o(), lambda n: 0.99 if n % 3 == 0 else 0.9995)),
]

_OPT: list = []  # the optimizer the factory lambdas attach to (set by the test)


def _o():
  return _OPT[0]


def _torch_lrs_of(torch, make, n: int = N_TORCH) -> np.ndarray:
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=LR0)
  _OPT[:] = [opt]
  try:
    sched = make(torch.optim.lr_scheduler)
    lrs = []
    for _ in range(n):
      lrs.append(float(opt.param_groups[0]["lr"]))
      opt.step()
      sched.step()
  finally:
    _OPT.clear()
  return np.array(lrs)


@pytest.fixture(scope="module")
def torch_twin_lrs(torch) -> dict[str, np.ndarray]:
  """Each TWIN_CASES torch scheduler's rates, stepped once for the module."""
  return {name: _torch_lrs_of(torch, make) for name, _, make in TWIN_CASES}


@pytest.mark.parametrize("case", TWIN_CASES, ids=[c[0] for c in TWIN_CASES])
def test_twin_vs_torch_lr_scheduler(torch_twin_lrs, case):
  name, ours, _ = case
  _assert_torch_close(_ours_on_steps(ours), torch_twin_lrs[name], LR0, name)


def test_twins_vs_torch_under_jit(torch_twin_lrs):
  """The same comparison with the step traced (one jit of all twins: one compile)."""
  scheds = [ours for _, ours, _ in TWIN_CASES]
  values = jax.jit(lambda t: jnp.stack([s(t) for s in scheds]))(jnp.asarray(TORCH_STEPS))
  assert values.dtype == jnp.float32
  for (name, _, _), v in zip(TWIN_CASES, np.asarray(values)):
    _assert_torch_close(v, torch_twin_lrs[name], LR0, f"{name} (jit)")


CYCLIC_CASES = [
  dict(base_lr=0.01, max_lr=0.1, step_size_up=500),
  dict(base_lr=0.001, max_lr=0.1, step_size_up=200, step_size_down=300, mode="triangular2"),
  dict(base_lr=0.0, max_lr=0.1, step_size_up=250, mode="exp_range", gamma=0.999),
  dict(base_lr=0.02, max_lr=0.05, step_size_up=100, step_size_down=0),
  # A custom scale_fn written so that both torch (Python floats) and we (jnp) can call it.
  dict(base_lr=0.01, max_lr=0.1, step_size_up=150, scale_fn=lambda x: 1.0 / (1.0 + 0.5 * x)),
  dict(base_lr=0.01, max_lr=0.1, step_size_up=150, scale_fn=lambda x: 1.0 / (1.0 + 0.001 * x),
       scale_mode="iterations"),
  dict(base_lr=0.01, max_lr=0.1, step_size_up=70, scale_fn=lambda x: 0.5),  # a constant
]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("kw", CYCLIC_CASES, ids=lambda kw: kw.get("mode", "triangular"))
def test_cyclic_lr_and_momentum_vs_torch(torch, kw, opt):
  moms = dict(base_momentum=0.8, max_momentum=0.9) if opt == "sgd" else dict(
      base_momentum=0.85, max_momentum=0.95)
  lrs, momenta = _torch_run(
      torch, lambda o: torch.optim.lr_scheduler.CyclicLR(o, **kw, **moms), opt=opt)
  _assert_torch_close(_ours_on_steps(S.cyclic_lr(**kw)), lrs, kw["max_lr"], "lr")
  cycle_kw = {k: v for k, v in kw.items() if k not in ("base_lr", "max_lr")}
  _assert_torch_close(_ours_on_steps(S.cyclic_momentum(**moms, **cycle_kw)), momenta, 1.0,
                      "momentum")


ONE_CYCLE_CASES = [
  dict(max_lr=0.1, total_steps=2000),
  dict(max_lr=0.1, total_steps=2000, anneal_strategy="linear"),
  dict(max_lr=0.3, total_steps=1999, pct_start=0.25, three_phase=True),
  dict(max_lr=0.3, total_steps=2101, pct_start=0.123, anneal_strategy="linear", three_phase=True,
       div_factor=10.0, final_div_factor=100.0),
  dict(max_lr=0.05, total_steps=2000, pct_start=0.0),
  dict(max_lr=0.05, total_steps=10, pct_start=0.05),  # phase 1 ends at -0.5: never used
]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("kw", ONE_CYCLE_CASES, ids=lambda kw: str(kw["total_steps"]))
def test_one_cycle_lr_and_momentum_vs_torch(torch, kw, opt):
  """Torch can produce total_steps + 1 values (the next scheduler.step() raises and the
  optimizer keeps the last): that value is held by ours for every later step, at 0 where
  torch's extrapolated linear anneal is negative."""
  n = kw["total_steps"] + 1
  lrs, momenta = _torch_run(
      torch, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, **kw), n=n, opt=opt)
  ours = _ours_on_steps(S.one_cycle_lr(**kw))
  _assert_torch_close(ours[:n], np.maximum(lrs, 0.0), kw["max_lr"], "lr")
  assert np.all(ours[n:] == ours[n - 1])
  mom_kw = {k: v for k, v in kw.items()
            if k in ("total_steps", "pct_start", "anneal_strategy", "three_phase")}
  ours_m = _ours_on_steps(S.one_cycle_momentum(**mom_kw))
  _assert_torch_close(ours_m[:n], momenta, 1.0, "momentum")
  assert np.all(ours_m[n:] == ours_m[n - 1])


def test_lambda_and_multiplicative_tables_clamp_after_total_steps():
  lam = S.lambda_lr(0.5, lambda n: 1.0 / (1 + n), 10)
  mul = S.multiplicative_lr(0.5, lambda n: 0.5, 10)
  for step in (10, 11, 1000, np.int64(2**40), jnp.int32(2**31 - 1), 10.7, 1e9):
    np.testing.assert_allclose(float(lam(step)), 0.5 / 11, rtol=1e-7)
    np.testing.assert_allclose(float(mul(step)), 0.5 * 0.5**10, rtol=1e-7)
  assert float(lam(-3)) == 0.5 and float(lam(2.9)) == np.float32(0.5 / 3)
  assert lam.milestones == (10,)


def _plateau_metrics(n: int, seed: int) -> np.ndarray:
  """A loss that improves, stalls, improves a little, with noise and a NaN."""
  rng = np.random.default_rng(seed)
  base = np.concatenate([np.linspace(2.0, 1.0, n // 4), np.full(n // 4, 1.0),
                         np.linspace(1.0, 0.99995, n // 4), np.full(n - 3 * (n // 4), 0.9)])
  out = base + rng.normal(0, 1e-3, n) * (rng.random(n) < 0.5)
  out[n // 3] = np.nan
  return out


PLATEAU_CASES = [
  dict(),
  dict(mode="max", factor=0.5, patience=3, threshold=1e-3, cooldown=2),
  dict(patience=0, threshold_mode="abs", threshold=1e-3, min_lr=1e-3, factor=0.3),
  dict(patience=2, cooldown=5, eps=2e-3, factor=0.8),
  dict(mode="max", threshold_mode="abs", threshold=0.0, patience=1, min_lr=0.005),
]


@pytest.mark.parametrize("kw", PLATEAU_CASES, ids=[str(i) for i in range(len(PLATEAU_CASES))])
def test_reduce_lr_on_plateau_vs_torch(torch, kw):
  n = 240
  metrics = _plateau_metrics(n, seed=len(kw))
  if kw.get("mode") == "max":
    metrics = -metrics
  param = torch.nn.Parameter(torch.zeros(1))
  o = torch.optim.SGD([param], lr=LR0)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(o, **kw)
  expected = []
  for m in metrics:
    expected.append(o.param_groups[0]["lr"])  # the lr this step uses
    o.step()
    sched.step(float(m))
  expected = np.array(expected)
  assert len(set(expected)) > 2, "the case must reduce the rate more than once"

  tx = S.reduce_lr_on_plateau(LR0, **kw)
  grads = {"w": jnp.ones((2,), jnp.float32), "step": jnp.asarray(3, jnp.int32)}
  state = tx.init(grads)
  update = jax.jit(tx.update)
  used, lrs = [], []
  for m in metrics:
    updates, state = update(grads, state, value=jnp.float32(m))
    used.append(float(updates["w"][0]) * LR0)  # scale * lr: the rate of this step
    lrs.append(float(state.lr))
    assert int(updates["step"]) == 3  # non-float leaves pass through
  _assert_torch_close(np.array(used), expected, LR0, "scaled updates")
  np.testing.assert_allclose(lrs[:-1], expected[1:], rtol=1e-6)
  assert int(state.count) == n


def test_reduce_lr_on_plateau_value_none_only_scales():
  tx = S.reduce_lr_on_plateau(1.0, patience=0, factor=0.5)
  g = {"w": jnp.ones((3,), jnp.bfloat16)}
  state = tx.init(g)
  _, state = tx.update(g, state, value=1.0)
  _, state = tx.update(g, state, value=2.0)  # worse: patience 0 -> halve
  out, state2 = tx.update(g, state, None)
  assert out["w"].dtype == jnp.bfloat16 and float(out["w"][0]) == 0.5
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state, state2))
  with pytest.raises(TypeError, match="`value`"):
    tx.update(g, state, value=jnp.ones(2))
  with pytest.raises(TypeError, match="`state`"):
    tx.update(g, None, value=1.0)


# Properties.


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 40), eta=st.floats(0.0, 0.2), lr=st.floats(1e-4, 1.0))
def test_cosine_annealing_lr_periodic_symmetric_bounded(T, eta, lr):  # noqa: N803
  v = np.asarray(S.cosine_annealing_lr(lr, T, eta)(STEPS))  # one shape for every example
  lo, hi = np.float32(min(lr, eta)), np.float32(max(lr, eta))
  assert np.all((v >= lo) & (v <= hi))
  np.testing.assert_array_equal(v[:2 * T], v[2 * T:4 * T])  # period 2 T_max
  np.testing.assert_array_equal(v[1:2 * T], v[2 * T - 1:0:-1])  # symmetric about T_max
  assert v[0] == np.float32(lr) and v[T] == np.float32(eta)
  # The half period matches our own clamped closed form (cosine_annealing) where defined.
  if eta <= lr:
    np.testing.assert_allclose(v[:T + 1], np.asarray(S.cosine_annealing(lr, T, eta)(
        STEPS))[:T + 1], rtol=2e-6, atol=1e-9 * lr)


@settings(max_examples=8, deadline=None)
@given(up=st.integers(1, 30), down=st.integers(0, 30), lo=st.just(0.0) | st.floats(1e-6, 1.0),
       hi=st.just(0.0) | st.floats(1e-6, 1.0),
       mode=st.sampled_from(["triangular", "triangular2", "exp_range"]))
def test_cyclic_lr_bounds_period_and_momentum_mirror(up, down, lo, hi, mode):
  # One step array for every example (a new shape would recompile every eager op).
  lr = np.asarray(S.cyclic_lr(lo, hi, up, down, mode=mode, gamma=0.99)(STEPS))
  mom = np.asarray(S.cyclic_momentum(0.8, 0.9, up, down, mode=mode, gamma=0.99)(STEPS))
  assert np.all((lr >= np.float32(min(lo, hi)) - 1e-7) & (lr <= np.float32(max(lo, hi)) + 1e-7))
  assert lr[0] == np.float32(lo) and mom[0] == np.float32(0.9)
  amp = 0.99**up if mode == "exp_range" else 1.0  # the first peak (none without a descent:
  if down > 0:                                    # step `up` then starts the next cycle)
    assert np.isclose(lr[up], lo + (hi - lo) * amp, rtol=1e-6, atol=1e-7)
    assert np.isclose(mom[up], 0.9 - 0.1 * amp, rtol=1e-6)
  if mode == "triangular":
    c = up + down
    np.testing.assert_array_equal(lr[:c], lr[c:2 * c])
  if hi != lo:  # momentum is the mirror image of the lr's height
    h_lr = (lr.astype(np.float64) - lo) / (hi - lo)
    h_m = (0.9 - mom.astype(np.float64)) / 0.1
    np.testing.assert_allclose(h_lr, h_m, atol=2e-5 / min(1.0, abs(hi - lo)) + 1e-5)


@settings(max_examples=8, deadline=None)
@given(total=st.integers(2, L), pct=st.floats(0.05, 0.5), three=st.booleans(),
       cos=st.booleans())
def test_one_cycle_bounded_and_peaks(total, pct, three, cos):
  try:
    sched = S.one_cycle_lr(1.0, total, pct, "cos" if cos else "linear", three_phase=three)
  except ValueError as e:  # a zero-length phase torch would divide by
    assert "pct_start" in str(e)
    return
  v = np.asarray(sched(STEPS))[:total]
  if pct * total > 1:  # else phase 1 ends before step 0 and torch starts in phase 2
    assert np.isclose(v[0], 1 / 25, rtol=1e-6)
  assert np.all(v <= 1.0 + 1e-6) and np.all(v >= np.float32(1 / 25 / 1e4) * (1 - 1e-6))
  assert np.isclose(v[-1], 1 / 25 / 1e4, rtol=1e-5)


def test_sequential_and_chained_compose():
  a, b = S.linear_lr(1.0, 0.1, 1.0, 5), S.exponential_lr(1.0, 0.5)
  seq = S.sequential_lr([a, b, a], [5, 7])
  v = np.asarray(seq(jnp.arange(12)))
  np.testing.assert_array_equal(v[:5], np.asarray(a(jnp.arange(5))))
  np.testing.assert_array_equal(v[5:7], np.asarray(b(jnp.arange(2))))
  np.testing.assert_array_equal(v[7:], np.asarray(a(jnp.arange(5))))
  assert seq.milestones == (5, 7, 12)
  ch = S.chained_scheduler(2.0, [a, b])
  np.testing.assert_allclose(np.asarray(ch(jnp.arange(12))),
                             2.0 * np.asarray(a(jnp.arange(12))) * 0.5 ** np.arange(12),
                             rtol=1e-6)


TWIN_BAD_ARGS = [
  (S.step_lr, dict(lr=1.0, step_size=0), "step_size"),
  (S.multi_step_lr, dict(lr=1.0, milestones=[5, -1]), "milestones"),
  (S.multi_step_lr, dict(lr=1.0, milestones="10"), "milestones"),
  (S.multi_step_lr, dict(lr=1.0, milestones=[2.5]), "milestones"),
  (S.multi_step_lr, dict(lr=1.0, milestones=[5], gamma=0.0), "gamma"),
  (S.constant_lr, dict(lr=1.0, factor=1.5), "factor"),
  (S.constant_lr, dict(lr=1.0, factor=0.0, total_iters=3), "factor"),
  (S.constant_lr, dict(lr=1.0, total_iters=-1), "total_iters"),
  (S.linear_lr, dict(lr=1.0, start_factor=0.0), "start_factor"),
  (S.linear_lr, dict(lr=1.0, end_factor=1.5), "end_factor"),
  (S.linear_lr, dict(lr=-1.0), "lr"),
  (S.polynomial_lr, dict(lr=1.0, total_iters=0), "total_iters"),
  (S.polynomial_lr, dict(lr=1.0, power=-1.0), "power"),
  (S.cosine_annealing_lr, dict(lr=1.0, T_max=0), "T_max"),
  (S.cosine_annealing_lr, dict(lr=1.0, T_max=5, eta_min=-1.0), "eta_min"),
  (S.cosine_annealing_warm_restarts, dict(lr=1.0, T_0=0), "T_0"),
  (S.cosine_annealing_warm_restarts, dict(lr=1.0, T_0=5, T_mult=0), "T_mult"),
  (S.cosine_annealing_warm_restarts, dict(lr=1.0, T_0=5, T_mult=1.5), "T_mult"),
  (S.cyclic_lr, dict(base_lr=-0.1, max_lr=1.0), "base_lr"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, step_size_up=0), "step_size_up"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, step_size_down=-1), "step_size_down"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, mode="cosine"), "mode"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, mode="exp_range", gamma=1.5), "gamma"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, scale_fn=lambda x: 1.0, scale_mode="x"),
   "scale_mode"),
  (S.cyclic_momentum, dict(max_momentum=1.0), "max_momentum"),
  (S.one_cycle_lr, dict(max_lr=1.0, total_steps=0), "total_steps"),
  (S.one_cycle_lr, dict(max_lr=1.0, total_steps=10, pct_start=1.5), "pct_start"),
  (S.one_cycle_lr, dict(max_lr=1.0, total_steps=10, pct_start=0.1), "pct_start"),  # 0-length
  (S.one_cycle_lr, dict(max_lr=1.0, total_steps=10, anneal_strategy="exp"), "anneal_strategy"),
  (S.one_cycle_lr, dict(max_lr=1.0, total_steps=10, div_factor=0.0), "div_factor"),
  (S.one_cycle_momentum, dict(total_steps=10, base_momentum=-0.1), "base_momentum"),
  (S.sequential_lr, dict(schedules=[S.step_lr(1.0, 2)], milestones=[3]), "milestones"),
  (S.sequential_lr, dict(schedules=[S.step_lr(1.0, 2)] * 3, milestones=[5, 3]), "milestones"),
  (S.sequential_lr, dict(schedules=[], milestones=[]), "schedules"),
  (S.chained_scheduler, dict(lr=1.0, factors=[]), "factors"),
  (S.lambda_lr, dict(lr=1.0, lr_lambda=lambda n: 1.0, total_steps=-1), "total_steps"),
  (S.lambda_lr, dict(lr=1.0, lr_lambda=lambda n: 1.0 - n, total_steps=5), "lr_lambda"),
  (S.lambda_lr, dict(lr=1.0, lr_lambda=lambda n: float("nan"), total_steps=5), "lr_lambda"),
  (S.multiplicative_lr, dict(lr=1.0, lr_lambda=lambda n: 1e30, total_steps=5), "lr_lambda"),
  (S.reduce_lr_on_plateau, dict(lr=0.0), "lr"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, mode="minimum"), "mode"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, factor=1.0), "factor"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, patience=-1), "patience"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, threshold_mode="x"), "threshold_mode"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, cooldown=1.5), "cooldown"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, min_lr=-1.0), "min_lr"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, eps=float("nan")), "eps"),
]

TWIN_TYPE_ERRORS = [
  (S.lambda_lr, dict(lr=1.0, lr_lambda=0.5, total_steps=5), "lr_lambda"),
  (S.lambda_lr, dict(lr=1.0, lr_lambda=lambda n: "1", total_steps=5), "lr_lambda"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, scale_fn=1.0), "scale_fn"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, scale_fn=lambda x: math.cos(x)), "scale_fn"),
  (S.cyclic_lr, dict(base_lr=0.1, max_lr=1.0, scale_fn=lambda x: jnp.ones(3)), "scale_fn"),
  (S.sequential_lr, dict(schedules=[0.1], milestones=[]), "schedules"),
  (S.chained_scheduler, dict(lr=1.0, factors=[S.step_lr(1.0, 2), "x"]), "factors"),
  (S.one_cycle_lr, dict(max_lr=1.0, total_steps=10, three_phase="yes"), "three_phase"),
  (S.reduce_lr_on_plateau, dict(lr=1.0, factor="0.1"), "factor"),
]


@pytest.mark.parametrize("builder,kwargs,arg", TWIN_BAD_ARGS,
                         ids=[f"{b.__name__}-{a}-{i}" for i, (b, _, a) in enumerate(TWIN_BAD_ARGS)])
def test_twin_invalid_arguments_raise(builder, kwargs, arg):
  with pytest.raises(ValueError, match=f"`{arg}`"):
    builder(**kwargs)


@pytest.mark.parametrize("builder,kwargs,arg", TWIN_TYPE_ERRORS,
                         ids=[f"{b.__name__}-{a}-{i}" for i, (b, _, a)
                              in enumerate(TWIN_TYPE_ERRORS)])
def test_twin_wrong_types_raise(builder, kwargs, arg):
  with pytest.raises(TypeError, match=f"`{arg}`"):
    builder(**kwargs)


def test_one_cycle_linear_never_negative_past_the_end():
  # torch extrapolates the linear anneal one step past T - 1: -9.7e-5 here (a negative lr
  # would climb the loss); ours gives 0 there and keeps every value before T.
  sched = S.one_cycle_lr(0.1, 100, anneal_strategy="linear", three_phase=True)
  values = np.asarray(jax.vmap(sched)(jnp.arange(0, 120)))
  assert values.min() == 0.0 and values[99] > 0.0
  np.testing.assert_array_equal(values[100:], 0.0)


@pytest.mark.parametrize("sched, lo, hi, same_as_first_cycles", [
    (S.cyclic_lr(1e-4, 1e-3, 5), 1e-4, 1e-3, True),
    (S.cyclic_momentum(0.8, 0.9, 5), 0.8, 0.9, True),
    (S.cyclic_lr(1e-4, 1e-3, 3, 4, "exp_range", 0.9), 1e-4, 1e-3, False),  # gamma**n decays
    (S.cosine_annealing_lr(1e-3, 7, 1e-5), 1e-5, 1e-3, True),
    (S.cosine_annealing_warm_restarts(1e-3, 7, 1, 1e-5), 1e-5, 1e-3, True)],
    ids=["cyclic_lr", "cyclic_momentum", "cyclic_exp_range", "cosine_annealing_lr",
         "warm_restarts"])
def test_periodic_position_exact_at_huge_integer_steps(sched, lo, hi, same_as_first_cycles):
  """Fuzz finding: the position in the cycle was t - k * C in float32, which keeps nothing
  once the step passes 2**24: CyclicLR gave -5.7e-3 (below base_lr) at step 2**31 - 1 and
  CyclicMomentum 1.54 (above max). The position is now n mod C in integers: at a huge step
  the value is the one at the same position of the first cycles (every cycle length here
  divides 70), for Python ints, NumPy int64 steps and traced int32 steps."""
  for step in (2**31 - 1, 2**31 - 7, 2**30 + 3, 2**24 + 5):
    want = float(sched(step % 70))
    for s in (step, np.int64(step), np.asarray([step, step], np.int64)):
      got = np.asarray(sched(s), np.float64).reshape(-1)
      assert np.all((got >= lo * (1 - 1e-6)) & (got <= hi * (1 + 1e-6))), (step, got)
      if same_as_first_cycles:
        np.testing.assert_allclose(got, want, rtol=1e-6)
    traced = float(jax.jit(sched)(jnp.asarray(step, jnp.int32)))
    np.testing.assert_allclose(traced, float(sched(step)), rtol=1e-6)


def test_cyclic_scale_fn_outside_unit_interval_is_refused():
  """Fuzz finding: a scale_fn returning NaN or a negative amplitude was accepted and gave a
  NaN rate / a rate below base_lr at every step; its value at cycle 1 is now checked."""
  for fn in (lambda x: jnp.nan * x, lambda x: -1e-3 * x, lambda x: 1.5 + 0 * x):
    for builder in (S.cyclic_lr, S.cyclic_momentum):
      kw = dict(base_lr=0.1, max_lr=1.0) if builder is S.cyclic_lr else {}
      with pytest.raises(ValueError, match=f"{builder.__name__}: `scale_fn`"):
        builder(**kw, scale_fn=fn)
  S.cyclic_lr(0.1, 1.0, scale_fn=lambda x: 1.0 / x)  # 1 at cycle 1: valid


def test_reduce_lr_on_plateau_string_metric_is_named():
  """Fuzz finding: value="1.0" failed inside jnp.asarray with a TypeError naming nothing."""
  tx = S.reduce_lr_on_plateau(1.0)
  p = {"w": jnp.ones(2)}
  for bad in ("1.0", b"1", {"loss": 1.0}):
    with pytest.raises(TypeError, match="reduce_lr_on_plateau: `value`"):
      tx.update(p, tx.init(p), p, value=bad)
