"""from_torch.schedulers: each torch scheduler (two param groups, different base lrs) read
and rebuilt, values vs torch's own stepping; Hugging Face lambdas recognised; tabulation."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxopt_llm import from_torch  # noqa: E402
from jaxopt_llm.from_torch import schedulers  # noqa: E402

S = torch.optim.lr_scheduler
N = 400


def _torch_values(make, n=N, optimizer="SGD"):
  """(spec, lrs[n, 2], momenta[n, 2]) of a scheduler stepped n times without gradients."""
  ps = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
  if optimizer == "SGD":
    opt = torch.optim.SGD([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.05}], lr=0.1,
                          momentum=0.9)
  else:
    opt = torch.optim.AdamW([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.05}], lr=0.1)
  sched = make(opt)
  spec = from_torch.describe(opt, sched, steps=n)
  lrs, moms = [], []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _ in range(n):
      lrs.append([g["lr"] for g in opt.param_groups])
      moms.append([g["betas"][0] if "betas" in g else g["momentum"] for g in opt.param_groups])
      opt.step()
      sched.step()
  return spec, np.array(lrs), np.array(moms)


def _ours(spec, n=N):
  lrs, moms = [], []
  for i, g in enumerate(spec["groups"]):
    lr, mom = schedulers.build(spec["scheduler"], i, g["hyper"])
    lrs.append(np.asarray(jax.vmap(lr)(jnp.arange(n)), np.float64))
    moms.append(None if mom is None else np.asarray(jax.vmap(mom)(jnp.arange(n)), np.float64))
  return np.stack(lrs, 1), moms


def _close(ours, ref, base):
  # rel 1e-6, or 1e-7 x the base lr where the values approach 0 (torch: Python float64)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7 * base)


MAKERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=30, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[40, 90, 90, 200], gamma=0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.25, total_iters=37),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.05, end_factor=0.7, total_iters=123),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.99),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=300, power=1.5),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=150, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=25,
                                                                           T_mult=2),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, 0.1, total_iters=20), S.CosineAnnealingLR(o, T_max=200)],
        milestones=[20]),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, factor=0.5, total_iters=50), S.ExponentialLR(o, gamma=0.995)]),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda n: 0.999 if n % 3 else 0.99),
    "LambdaLR": lambda o: S.LambdaLR(o, [lambda n: 1 / (1 + n), lambda n: 0.5 ** (n // 50)]),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=[0.01, 0.005], max_lr=0.1, step_size_up=30,
                                     step_size_down=50, mode="triangular2"),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=[1.0, 0.3], total_steps=N, pct_start=0.25,
                                         div_factor=10.0, final_div_factor=100.0),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_converted_scheduler_values_match_torch(name):
  spec, lrs, moms = _torch_values(MAKERS[name])
  ours, our_moms = _ours(spec)
  _close(ours, lrs, base=0.1)
  cycles = name in ("CyclicLR", "OneCycleLR")
  assert all((m is not None) == cycles for m in our_moms)
  if cycles:
    _close(np.stack(our_moms, 1), moms, base=1.0)


def test_one_cycle_cycles_adam_beta1():
  make = lambda o: S.OneCycleLR(o, max_lr=0.2, total_steps=100, three_phase=True)
  spec, lrs, moms = _torch_values(make, n=100, optimizer="AdamW")
  ours, our_moms = _ours(spec, n=100)
  _close(ours, lrs, base=0.1)
  _close(np.stack(our_moms, 1), moms, base=1.0)


@pytest.mark.parametrize("kind", ["cosine", "cosine_min_lr", "linear", "constant",
                                  "hard_restarts", "polynomial", "inverse_sqrt"])
def test_hugging_face_lambdas_map_to_closed_forms(kind, ft):
  total = 300
  spec, lrs, _ = _torch_values(lambda o: S.LambdaLR(o, ft.HF[kind](40, total)))
  lam = spec["scheduler"]["lambdas"][0]
  assert "hf" in lam and "tabulated" not in lam
  ours, _ = _ours(spec)
  # N > total: past num_training_steps too (HF's cosine rises again there)
  _close(ours, lrs, base=0.1)


# transformers < 4.3x built the lambda as a closure inside the public function (module
# level there, hence here)
def get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps):
  def lr_lambda(current_step):
    if current_step < num_warmup_steps:
      return float(current_step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - current_step) / float(
        max(1, num_training_steps - num_warmup_steps)))
  return S.LambdaLR(optimizer, lr_lambda)


def test_old_transformers_closures_are_recognised():
  spec, lrs, _ = _torch_values(lambda o: get_linear_schedule_with_warmup(o, 30, 250))
  lam = spec["scheduler"]["lambdas"][1]
  assert lam == {"hf": "_get_linear_schedule_with_warmup_lr_lambda",
                 "kwargs": {"num_warmup_steps": 30, "num_training_steps": 250}}
  _close(_ours(spec)[0], lrs, base=0.1)


def test_hf_keywords_without_a_closed_form_are_tabulated(ft):
  import functools
  fn = ft.HF["cosine"](10, 100)
  odd = functools.partial(fn.func, **dict(fn.keywords, num_cycles=1.5))
  spec, lrs, _ = _torch_values(lambda o: S.LambdaLR(o, odd), n=150)
  assert len(spec["scheduler"]["lambdas"][0]["tabulated"]) == 150
  _close(_ours(spec, n=150)[0], lrs, base=0.1)


def test_tabulated_lambda_holds_its_last_value():
  spec, lrs, _ = _torch_values(lambda o: S.LambdaLR(o, lambda n: 0.9 ** n), n=20)
  lr, _ = schedulers.build(spec["scheduler"], 0, spec["groups"][0]["hyper"])
  assert float(lr(19)) == pytest.approx(lrs[19, 0], rel=1e-6)
  assert float(lr(500)) == float(lr(19))


def test_unknown_scheduler_class_is_refused():
  class MyScheduler(S.LRScheduler):
    def get_lr(self):
      return [g["lr"] for g in self.optimizer.param_groups]

  p = torch.zeros(1, requires_grad=True)
  opt = torch.optim.SGD([p], lr=0.1)
  with pytest.raises(TypeError, match="`scheduler` must be a torch.optim.lr_scheduler.*"
                                      "MyScheduler"):
    from_torch.optimizer(opt, MyScheduler(opt))
