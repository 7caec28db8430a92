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
}


def test_all_public_names_exported():
  assert sorted(S.__all__) == sorted(ALL_SCHEDULES)
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
