"""Our optimizers vs torch.optim (and the official Lion rule), 200 steps, fp32.

Metric: per-leaf norm-wise relative error max|ours - torch| / max|torch| (see
``jaxopt_llm.parity.optimizers.relative_error``), required <= 1e-5.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxopt_llm import optim, schedules  # noqa: E402
from jaxopt_llm.parity import optimizers as po  # noqa: E402

CASES = po.cases()
STEPS = 200


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_200_steps(name):
  err = po.run_case(CASES[name], steps=STEPS, seed=0)
  assert err <= 1e-5, f"{name}: relative error {err:.3e} after {STEPS} steps"


def test_metric_detects_a_wrong_optimizer():
  # The harness must be able to fail: Adam's eps inside the sqrt (optax's eps_root) and
  # AdamW with optax's default decay differ from torch visibly.
  wrong_eps = po.ParityCase(lambda: optim.adam(1e-3, eps=1e-3), CASES["adam"].torch)
  assert po.run_case(wrong_eps, steps=STEPS) > 1e-4
  import optax
  wrong_wd = po.ParityCase(lambda: optax.adamw(1e-3), CASES["adamw"].torch)
  assert po.run_case(wrong_wd, steps=STEPS) > 1e-5


@pytest.mark.parametrize("name", ["adamw_b0.95_wd0.1", "adam", "lion_b0.95_wd0.1",
                                  "rmsprop_centered_momentum_wd0.1"])
def test_no_further_from_float64_than_torch_fp32(name):
  """Where we differ from torch fp32, torch's own rounding is the cause, not ours.

  torch rounds ``1 - lr * wd`` to float32 before multiplying, so its AdamW drifts from the
  exact result by a few 1e-6; ours must be at least as close to a float64 run.
  """
  case = CASES[name]
  params0, noise = po.make_problem(STEPS, seed=1)
  ours = po.run_jax(case.ours(), params0, noise)
  ref32 = po.run_torch(case.torch, params0, noise)
  f64 = lambda d: {k: v.astype(np.float64) for k, v in d.items()}
  ref64 = po.run_torch(case.torch, f64(params0), f64(noise))
  ours_err = po.relative_error(ours, ref64)
  torch_err = po.relative_error(ref32, ref64)
  assert ours_err <= max(1.5 * torch_err, 2e-6), (ours_err, torch_err)


@pytest.mark.parametrize("sched_name", ["warmup_cosine", "wsd", "inverse_sqrt"])
def test_scheduled_adamw_matches_torch_lambdalr(sched_name):
  """lr schedules drive our chain exactly as LambdaLR drives torch.optim.AdamW."""
  peak = 3e-3
  sched = {
      "warmup_cosine": lambda: schedules.warmup_cosine(peak, 20, STEPS, min_lr=3e-4),
      "wsd": lambda: schedules.wsd(peak, 20, 100, 80, decay_type="1-sqrt"),
      "inverse_sqrt": lambda: schedules.inverse_sqrt(peak, 20),
  }[sched_name]()
  lam = lambda t: float(sched(t)) / peak
  case = po.ParityCase(
      lambda: optim.adamw(sched, b2=0.95, weight_decay=0.1),
      lambda ps: torch.optim.AdamW(ps, lr=peak, betas=(0.9, 0.95), weight_decay=0.1),
      lr_lambda=lam)
  assert po.run_case(case, steps=STEPS) <= 1e-5
