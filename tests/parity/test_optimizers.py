"""Our optimizers vs torch.optim (and the official Lion and SophiaG rules), 200 steps, fp32.

Metric: per-leaf norm-wise relative error max|ours - torch| / max|torch| (see
``jaxopt_llm.parity.optimizers.relative_error``), required <= 1e-5.
"""
import jax
import jax.numpy as jnp
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


# ---------------------------------------------------------------------------------------------
# Sophia (official SophiaG rule, written from the paper in parity/reference.py)


def test_sophia_reference_one_step_by_hand():
  """The torch reference on the same hand-computed numbers (h >= 0 entries only)."""
  from jaxopt_llm.parity.reference import SophiaGReference
  p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
  opt = SophiaGReference([p], lr=0.1, betas=(0.9, 0.9), rho=0.5, weight_decay=0.5, eps=0.0)
  opt.update_hessian([torch.tensor([1.0, 0.2, 4.0])])  # h = 0.1 * H
  opt.state[p]["hessian"].mul_(10.0)  # h = [1.0, 0.2, 4.0]
  opt.state[p]["exp_avg"].copy_(torch.tensor([0.1, 0.1, -0.2]))
  p.grad = torch.tensor([0.5, -1.0, 0.2])
  opt.step()
  np.testing.assert_allclose(p.detach().numpy(), [0.922, -1.89, 0.483], rtol=1e-6)
  with pytest.raises(ValueError, match="estimates"):
    opt.update_hessian([])


@pytest.mark.parametrize("name", ["sophia_lr2^-7_wd2^-3", "sophia_b0.9,0.95_rho0.1_bs512_k5"])
def test_sophia_matches_torch_reference_200_steps(name):
  case = po.hessian_cases()[name]
  params0, noise = po.make_problem(200, seed=0)
  ours, rates = po.run_jax_hessian(case, params0, noise, with_win_rates=True)
  ref = po.run_torch_hessian(case, params0, noise)
  err = po.relative_error(ours, ref)
  assert err <= 1e-5, f"{name}: relative error {err:.3e} after 200 steps"
  # Both branches of the rule were exercised: many clipped and many unclipped coordinates.
  assert rates.min() < 0.15 and rates.max() > 0.7, rates


def test_sophia_parity_harness_detects_a_wrong_rule():
  """The comparison can fail: the batch size applied twice (once in the estimate, once
  more on our side) differs visibly from the reference."""
  import dataclasses
  case = po.hessian_cases()["sophia_b0.9,0.95_rho0.1_bs512_k5"]
  params0, noise = po.make_problem(200, seed=0)
  ref = po.run_torch_hessian(case, params0, noise)
  wrong_bs = dataclasses.replace(case, scale=case.scale * case.bs)
  assert po.relative_error(po.run_jax_hessian(wrong_bs, params0, noise), ref) > 1e-3


# ---------------------------------------------------------------------------------------------
# update_and_apply (the one-pass step) against torch


@pytest.mark.parametrize("make, torch_name, kw", [
    (lambda: optim.adamw(1e-3, b2=0.95, weight_decay=0.1, amsgrad=True), "AdamW",
     dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=True)),
])
def test_update_and_apply_matches_torch_200_steps(make, torch_name, kw):
  params0, noise = po.make_problem(200, seed=0)
  tx = make()
  pulls = {k: np.float32(pull) for k, (_, _, pull) in po.LEAVES.items()}

  @jax.jit
  def run(params, noise):
    def body(carry, noise_t):
      p, s = carry
      g = jax.tree.map(lambda n, x, c: n + c * x, noise_t, p, pulls)
      return optim.update_and_apply(tx, g, s, p), None
    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), noise)
    return p

  ours = jax.tree.map(np.asarray, run(jax.tree.map(jnp.asarray, params0),
                                      jax.tree.map(jnp.asarray, noise)))
  ref = po.run_torch(lambda ps: getattr(torch.optim, torch_name)(ps, **kw), params0, noise)
  assert po.relative_error(ours, ref) <= 1e-5
