"""Shared fixtures of the from_torch tests: a small multi-leaf problem run in torch and JAX.

Both sides compute, at every step, ``g_t = noise_t + pull * p_t`` from their *own* current
parameters (the feedback makes a divergence grow rather than stay at one step's rounding).
"""
import functools
import math

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

SHAPES = {"embed.weight": (12, 8), "block.weight": (8, 6), "block.bias": (6,),
          "norm.weight": (6,), "head.weight": (6, 5)}
MATRICES = ("embed.weight", "block.weight", "head.weight")
PULL = 0.1


class Problem:
  def __init__(self, steps: int, seed: int = 0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    self.shapes = dict(shapes)
    self.p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in self.shapes.items()}
    scales = [1.0, 0.05, 3.0, 1e-2, 0.5]
    self.noise = {k: (rng.normal(size=(steps,) + s) * scales[i % len(scales)]).astype(np.float32)
                  for i, (k, s) in enumerate(self.shapes.items())}
    self.steps = steps

  def torch_params(self) -> dict:
    return {k: torch.tensor(v, requires_grad=True) for k, v in self.p0.items()}

  def torch_steps(self, tp, opt, sched, start: int, stop: int) -> None:
    for t in range(start, stop):
      with torch.no_grad():
        for k, p in tp.items():
          p.grad = torch.from_numpy(self.noise[k][t]) + PULL * p.detach()
      opt.step()
      if sched is not None:
        sched.step()

  def jax_steps(self, tx, params, state, start: int, stop: int):
    noise = {k: self.noise[k][start:stop] for k in params}

    @jax.jit
    def run(params, state, noise):
      def step(carry, n):
        p, s = carry
        g = jax.tree.map(lambda a, x: a + PULL * x, n, p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

      return jax.lax.scan(step, (params, state), noise)[0]

    return run(params, state, noise)

  @staticmethod
  def rel(params, tp) -> float:
    worst = 0.0
    for k, p in tp.items():
      ref = p.detach().numpy().astype(np.float64)
      ours = np.asarray(params[k], np.float64)
      worst = max(worst, float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30)))
    return worst


def two_groups(tp, **vector_overrides):
  """Decay on matrices only: the usual LLM split."""
  return [{"params": [tp[k] for k in MATRICES]},
          {"params": [tp[k] for k in tp if k not in MATRICES], "weight_decay": 0.0,
           **vector_overrides}]


def three_groups(tp, **head_overrides):
  return [{"params": [tp["embed.weight"], tp["block.weight"]]},
          {"params": [tp["block.bias"], tp["norm.weight"]], "weight_decay": 0.0},
          {"params": [tp["head.weight"]], **head_overrides}]


# Hugging Face lambdas, re-implemented in the test from transformers' optimization.py
# (5.x), named as there: from_torch recognises them by name and keywords.
def _get_cosine_schedule_with_warmup_lr_lambda(current_step, *, num_warmup_steps,
                                               num_training_steps, num_cycles,
                                               min_lr_rate=0.0):
  if current_step < num_warmup_steps:
    return float(current_step) / float(max(1, num_warmup_steps))
  progress = float(current_step - num_warmup_steps) / float(
      max(1, num_training_steps - num_warmup_steps))
  factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
  factor = factor * (1 - min_lr_rate) + min_lr_rate
  return max(0, factor)


def _get_linear_schedule_with_warmup_lr_lambda(current_step, *, num_warmup_steps,
                                               num_training_steps):
  if current_step < num_warmup_steps:
    return float(current_step) / float(max(1, num_warmup_steps))
  return max(0.0, float(num_training_steps - current_step) / float(
      max(1, num_training_steps - num_warmup_steps)))


def _get_constant_schedule_with_warmup_lr_lambda(current_step, *, num_warmup_steps):
  if current_step < num_warmup_steps:
    return float(current_step) / float(max(1.0, num_warmup_steps))
  return 1.0


def _get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda(
    current_step, *, num_warmup_steps, num_training_steps, num_cycles):
  if current_step < num_warmup_steps:
    return float(current_step) / float(max(1, num_warmup_steps))
  progress = float(current_step - num_warmup_steps) / float(
      max(1, num_training_steps - num_warmup_steps))
  if progress >= 1.0:
    return 0.0
  return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _get_polynomial_decay_schedule_with_warmup_lr_lambda(current_step, *, num_warmup_steps,
                                                         num_training_steps, lr_end, power,
                                                         lr_init):
  if current_step < num_warmup_steps:
    return float(current_step) / float(max(1, num_warmup_steps))
  elif current_step > num_training_steps:
    return lr_end / lr_init
  lr_range = lr_init - lr_end
  decay_steps = num_training_steps - num_warmup_steps
  pct_remaining = 1 - (current_step - num_warmup_steps) / decay_steps
  return (lr_range * pct_remaining**power + lr_end) / lr_init


def _get_inverse_sqrt_schedule_lr_lambda(current_step, *, num_warmup_steps, timescale=None):
  if current_step < num_warmup_steps:
    return float(current_step) / float(max(1, num_warmup_steps))
  shift = timescale - num_warmup_steps
  return 1.0 / math.sqrt((current_step + shift) / timescale)


HF = {
    "cosine": lambda w, t: functools.partial(
        _get_cosine_schedule_with_warmup_lr_lambda, num_warmup_steps=w, num_training_steps=t,
        num_cycles=0.5),
    "cosine_min_lr": lambda w, t: functools.partial(
        _get_cosine_schedule_with_warmup_lr_lambda, num_warmup_steps=w, num_training_steps=t,
        num_cycles=0.5, min_lr_rate=0.1),
    "linear": lambda w, t: functools.partial(
        _get_linear_schedule_with_warmup_lr_lambda, num_warmup_steps=w, num_training_steps=t),
    "constant": lambda w, t: functools.partial(
        _get_constant_schedule_with_warmup_lr_lambda, num_warmup_steps=w),
    "hard_restarts": lambda w, t: functools.partial(
        _get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda, num_warmup_steps=w,
        num_training_steps=t, num_cycles=1),
    "polynomial": lambda w, t: functools.partial(
        _get_polynomial_decay_schedule_with_warmup_lr_lambda, num_warmup_steps=w,
        num_training_steps=t, lr_end=1e-4, power=2.0, lr_init=1e-2),
    "inverse_sqrt": lambda w, t: functools.partial(
        _get_inverse_sqrt_schedule_lr_lambda, num_warmup_steps=w, timescale=w),
}


def _cases():
  """name -> (make(tp) -> (optimizer, scheduler), tolerance)."""
  two, three, hf = two_groups, three_groups, HF
  O, S, STEPS = torch.optim, torch.optim.lr_scheduler, 200
  return {
      "adamw_2groups_hf_cosine": (lambda tp: (
          o := O.AdamW(two(tp, lr=3e-3), lr=1e-2, weight_decay=0.1),
          S.LambdaLR(o, hf["cosine"](20, STEPS))), 1e-5),
      "adam_3groups_amsgrad_l2_steplr": (lambda tp: (
          o := O.Adam(three(tp, betas=(0.8, 0.99), lr=5e-3), lr=1e-2, weight_decay=1e-2,
                      amsgrad=True),
          S.StepLR(o, step_size=30, gamma=0.5)), 1e-5),
      "sgd_nesterov_2groups_multisteplr": (lambda tp: (
          o := O.SGD(two(tp, lr=3e-2), lr=1e-2, momentum=0.9, nesterov=True,
                     weight_decay=1e-3),
          S.MultiStepLR(o, milestones=[50, 120, 120], gamma=0.3)), 1e-5),
      "rmsprop_centered_momentum_linearlr": (lambda tp: (
          o := O.RMSprop(two(tp), lr=1e-3, centered=True, momentum=0.5, weight_decay=1e-3),
          S.LinearLR(o, start_factor=0.1, total_iters=40)), 1e-5),
      "adagrad_tabulated_lambda": (lambda tp: (
          o := O.Adagrad(two(tp, lr=0.05), lr=0.1, lr_decay=1e-3),
          S.LambdaLR(o, lambda n: 0.99 ** n if n % 7 else 0.5)), 1e-5),
      "sgd_onecycle_momentum": (lambda tp: (
          o := O.SGD(two(tp), lr=1e-2, momentum=0.9),
          S.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=STEPS)), 1e-5),
      "adamw_onecycle_beta1_three_phase": (lambda tp: (
          o := O.AdamW(three(tp), lr=1e-3),
          S.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS, three_phase=True)), 1e-5),
      "adam_maximize_cosine_annealing": (lambda tp: (
          o := O.Adam(two(tp), lr=1e-3, maximize=True),
          S.CosineAnnealingLR(o, T_max=60, eta_min=1e-5)), 1e-5),
      "nadam_decoupled_cyclic_exp_range": (lambda tp: (
          o := O.NAdam(two(tp), lr=2e-3, weight_decay=0.1, decoupled_weight_decay=True),
          S.CyclicLR(o, base_lr=1e-3, max_lr=4e-3, step_size_up=15, step_size_down=25,
                     mode="exp_range", gamma=0.995)), 1e-5),
      "radam_sequential": (lambda tp: (
          o := O.RAdam(three(tp), lr=1e-2, weight_decay=1e-2),
          S.SequentialLR(o, [S.LinearLR(o, 0.2, total_iters=10),
                             S.ExponentialLR(o, gamma=0.99)], milestones=[10])), 1e-5),
      "adamax_chained": (lambda tp: (
          o := O.Adamax(two(tp), lr=2e-3, weight_decay=1e-2),
          S.ChainedScheduler([S.ConstantLR(o, factor=0.5, total_iters=20),
                              S.ExponentialLR(o, gamma=0.995)])), 1e-5),
      "adadelta_polynomiallr": (lambda tp: (
          o := O.Adadelta(two(tp), lr=1.0, weight_decay=1e-3),
          S.PolynomialLR(o, total_iters=150, power=2.0)), 1e-5),
      "asgd_warm_restarts": (lambda tp: (
          o := O.ASGD(two(tp), lr=1e-2, t0=50),
          S.CosineAnnealingWarmRestarts(o, T_0=20, T_mult=2)), 1e-5),
      "rprop_2groups": (lambda tp: (O.Rprop(two(tp, lr=1e-3), lr=1e-2), None), 1e-5),
      "adafactor_multiplicative": (lambda tp: (
          o := O.Adafactor(two(tp), lr=1e-2, weight_decay=1e-2),
          S.MultiplicativeLR(o, lambda n: 0.995)), 1e-5),
  }


CASES = _cases()


@pytest.fixture(scope="session")
def problem200():
  return Problem(200)


@pytest.fixture(scope="session")
def problem100():
  return Problem(100, seed=1)


@pytest.fixture(scope="session")
def ft():
  """The helpers above, for the test modules (conftest is not importable as a module)."""
  import types
  return types.SimpleNamespace(Problem=Problem, two_groups=two_groups,
                               three_groups=three_groups, HF=HF, CASES=CASES, MATRICES=MATRICES,
                               SHAPES=SHAPES)
