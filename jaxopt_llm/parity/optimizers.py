"""Step-for-step comparison of our optimizers with ``torch.optim`` (and reference rules).

Both sides start from the same multi-leaf parameters and, at every step, compute the same
gradient from their *own* current parameters:

    g_t = noise_t * scale + pull * p_t

(fixed noise drawn once with numpy, a per-leaf scale from 1e-3 to 10, a leaf whose gradient
is exactly zero in half its entries at every step, and a quadratic pull that feeds the
parameters back into the gradient). After ``steps`` updates the parameters are compared.
``torch`` is imported lazily: the rest of the library never needs it.

Use ``run_case(name)`` or ``python -m jaxopt_llm.parity`` (see ``__main__.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_llm import optim

# name -> (shape, gradient scale, pull); 'sparse' gets exact zeros and no pull.
LEAVES: dict[str, tuple[tuple[int, ...], float, float]] = {
    "embed": ((16, 8), 1.0, 0.1),
    "dense/kernel": ((8, 12), 0.05, 0.1),
    "dense/bias": ((12,), 10.0, 0.1),
    "norm/scale": ((12,), 1e-3, 0.1),
    "sparse": ((6, 5), 1.0, 0.0),
    "scalar": ((), 0.3, 0.1),
}


def make_problem(steps: int, seed: int = 0):
  """Initial parameters and the noise sequence (dicts of float32 numpy arrays)."""
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _, _) in LEAVES.items()}
  noise = {}
  for k, (shape, scale, _) in LEAVES.items():
    n = rng.normal(size=(steps,) + shape).astype(np.float32) * np.float32(scale)
    if k == "sparse":
      n *= (rng.random(size=n.shape) < 0.5).astype(np.float32)
    noise[k] = n
  return params, noise


def run_jax(opt: optax.GradientTransformation, params0: dict, noise: dict) -> dict:
  """Runs ``opt`` for as many steps as ``noise`` has, inside one jitted ``lax.scan``."""
  pulls = {k: np.float32(pull) for k, (_, _, pull) in LEAVES.items()}

  @jax.jit
  def run(params, noise):
    def step(carry, noise_t):
      p, s = carry
      g = jax.tree.map(lambda n, x, c: n + c * x, noise_t, p, pulls)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), noise)
    return p

  out = run(jax.tree.map(jnp.asarray, params0), jax.tree.map(jnp.asarray, noise))
  return jax.tree.map(np.asarray, out)


def run_torch(make_opt: Callable, params0: dict, noise: dict,
              lr_lambda: Optional[Callable[[int], float]] = None) -> dict:
  """The same loop in PyTorch; ``make_opt(list_of_tensors)`` builds the torch optimizer."""
  import torch

  params = {k: torch.tensor(v, requires_grad=True) for k, v in params0.items()}
  opt = make_opt(list(params.values()))
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
  steps = next(iter(noise.values())).shape[0]
  for t in range(steps):
    with torch.no_grad():
      for k, p in params.items():
        pull = LEAVES[k][2]
        p.grad = torch.from_numpy(np.asarray(noise[k][t])) + pull * p.detach()
    opt.step()
    if sched is not None:
      sched.step()
  return {k: p.detach().numpy() for k, p in params.items()}


def relative_error(ours: dict, ref: dict) -> float:
  """Norm-wise relative error: the max over leaves of max|ours - ref| / max|ref|.

  Per leaf rather than per entry: an entry that crosses zero has an undefined entrywise
  relative error, while a few ulps of the leaf's scale is what fp32 arithmetic can promise.
  """
  worst = 0.0
  for k in ref:
    a, b = np.asarray(ours[k], np.float64), np.asarray(ref[k], np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    worst = max(worst, float(np.max(np.abs(a - b))) / scale)
  return worst


@dataclasses.dataclass(frozen=True)
class ParityCase:
  """One optimizer configuration and its PyTorch twin."""
  ours: Callable[[], optax.GradientTransformation]
  torch: Callable[[list], object]
  lr_lambda: Optional[Callable[[int], float]] = None


def _torch_opt(name: str, **kw):
  def build(ps):
    import torch
    return getattr(torch.optim, name)(ps, **kw)
  return build


def _lion_ref(**kw):
  def build(ps):
    from jaxopt_llm.parity.reference import LionReference
    return LionReference(ps, **kw)
  return build


def cases() -> dict[str, ParityCase]:
  """Every optimizer with its defaults and with betas (0.9, 0.95) and weight decay 0.1."""
  c = {}
  c["sgd"] = ParityCase(lambda: optim.sgd(0.05), _torch_opt("SGD", lr=0.05))
  c["sgd_momentum0.9"] = ParityCase(
      lambda: optim.sgd(0.05, momentum=0.9), _torch_opt("SGD", lr=0.05, momentum=0.9))
  c["sgd_momentum_nesterov_wd"] = ParityCase(
      lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
      _torch_opt("SGD", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1))
  c["momentum"] = ParityCase(
      lambda: optim.momentum(0.05), _torch_opt("SGD", lr=0.05, momentum=0.9, dampening=0.9))
  c["momentum_buffer_init_grad"] = ParityCase(  # the default, spelled out
      lambda: optim.momentum(0.05, buffer_init="grad"),
      _torch_opt("SGD", lr=0.05, momentum=0.9, dampening=0.9))
  c["momentum_b0.95_wd0.1"] = ParityCase(
      lambda: optim.momentum(0.05, beta=0.95, weight_decay=0.1),
      _torch_opt("SGD", lr=0.05, momentum=0.95, dampening=0.95, weight_decay=0.1))
  c["adagrad"] = ParityCase(lambda: optim.adagrad(), _torch_opt("Adagrad"))
  c["adagrad_wd0.1_decay"] = ParityCase(
      lambda: optim.adagrad(0.05, lr_decay=0.01, weight_decay=0.1,
                            initial_accumulator_value=0.1),
      _torch_opt("Adagrad", lr=0.05, lr_decay=0.01, weight_decay=0.1,
                 initial_accumulator_value=0.1))
  c["rmsprop"] = ParityCase(lambda: optim.rmsprop(), _torch_opt("RMSprop"))
  c["rmsprop_centered_momentum_wd0.1"] = ParityCase(
      lambda: optim.rmsprop(1e-3, alpha=0.95, momentum=0.9, centered=True, weight_decay=0.1),
      _torch_opt("RMSprop", lr=1e-3, alpha=0.95, momentum=0.9, centered=True,
                 weight_decay=0.1))
  c["adam"] = ParityCase(lambda: optim.adam(1e-3), _torch_opt("Adam", lr=1e-3))
  c["adam_b0.95"] = ParityCase(
      lambda: optim.adam(1e-3, b1=0.9, b2=0.95), _torch_opt("Adam", lr=1e-3, betas=(0.9, 0.95)))
  c["adam_amsgrad"] = ParityCase(
      lambda: optim.adam(1e-3, amsgrad=True), _torch_opt("Adam", lr=1e-3, amsgrad=True))
  c["adam_l2"] = ParityCase(
      lambda: optim.adam_l2(1e-3), _torch_opt("Adam", lr=1e-3, weight_decay=0.01))
  c["adam_l2_wd0.1_b0.95"] = ParityCase(
      lambda: optim.adam_l2(1e-3, b2=0.95, weight_decay=0.1),
      _torch_opt("Adam", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1))
  c["adamw"] = ParityCase(lambda: optim.adamw(1e-3), _torch_opt("AdamW", lr=1e-3))
  c["adamw_b0.95_wd0.1"] = ParityCase(
      lambda: optim.adamw(1e-3, b2=0.95, weight_decay=0.1),
      _torch_opt("AdamW", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1))
  c["adamw_amsgrad"] = ParityCase(
      lambda: optim.adamw(1e-3, amsgrad=True), _torch_opt("AdamW", lr=1e-3, amsgrad=True))
  c["lion"] = ParityCase(lambda: optim.lion(1e-4), _lion_ref(lr=1e-4))
  c["lion_b0.95_wd0.1"] = ParityCase(
      lambda: optim.lion(3e-4, b2=0.95, weight_decay=0.1),
      _lion_ref(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1))
  c.update(hessian_cases())  # Sophia: HessianParityCase, see below
  return c


def run_case(case: ParityCase, steps: int = 200, seed: int = 0) -> float:
  """Max relative parameter error after ``steps`` updates (ours vs PyTorch)."""
  params0, noise = make_problem(steps, seed)
  if isinstance(case, HessianParityCase):
    return relative_error(run_jax_hessian(case, params0, noise),
                          run_torch_hessian(case, params0, noise))
  ours = run_jax(case.ours(), params0, noise)
  ref = run_torch(case.torch, params0, noise, case.lr_lambda)
  return relative_error(ours, ref)


# --------------------------------------------------------------------------------------------
# Sophia: the same loop, plus a Hessian estimate every `every` steps given to both sides.


@dataclasses.dataclass(frozen=True)
class HessianParityCase:
  """A Sophia configuration and its reference; both receive the same Hessian estimates.

  The estimates are a fixed positive schedule (``make_hessian_estimates``): on steps t with
  ``t % every == 0`` each side folds in ``scale * E_t`` after its update. Ours receives it
  through ``hessian.update_every_k`` as ``bs * scale * E_t`` (the batch size folded into the
  estimate, as our GNB does); the reference stores ``scale * E_t`` and is stepped with
  ``step(bs=bs)``, as the official SophiaG is. ``bs=1`` gives both sides identical numbers.

  Fixed estimates (rather than ``g**2`` of each side's own gradient) keep the problem
  well-conditioned: ``g**2`` vanishes at the quadratic's minimum, so the rule would stay
  clipped there and ``sign(m)`` of an ``m`` near 0 would turn ulp-level differences into
  full ``2 * lr`` jumps, a property of any sign rule and not a parity failure.
  """
  ours: Callable[[], optax.GradientTransformation]
  torch: Callable[[list], object]
  every: int = 10
  scale: float = 1.0
  bs: int = 1


def make_hessian_estimates(steps: int, seed: int = 1) -> dict:
  """Positive estimates per leaf and step: the quadratic's curvature plus noise of the leaf's
  gradient scale, ``pull + scale_leaf * |z|`` (0.1 for the pull-free 'sparse' leaf)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, (shape, scale, pull) in LEAVES.items():
    z = np.abs(rng.normal(size=(steps,) + shape)).astype(np.float32)
    out[k] = np.float32(pull or 0.1) + np.float32(scale) * z
  return out


def run_jax_hessian(case: HessianParityCase, params0: dict, noise: dict,
                    with_win_rates: bool = False):
  """``run_jax`` with ``hessian.update_every_k`` folding ``bs * scale * E_t`` every k steps.

  With ``with_win_rates`` also returns Sophia's win rate after every step (numpy [steps]).
  """
  from jaxopt_llm.optim import hessian

  opt = case.ours()
  pulls = {k: np.float32(pull) for k, (_, _, pull) in LEAVES.items()}
  steps = next(iter(noise.values())).shape[0]
  estimates = make_hessian_estimates(steps)
  factor = np.float32(case.bs * case.scale)

  @jax.jit
  def run(params, noise, estimates):
    def step(carry, xs):
      p, s = carry
      noise_t, est_t, t = xs
      g = jax.tree.map(lambda n, x, c: n + c * x, noise_t, p, pulls)
      estimate = lambda _: jax.tree.map(lambda e: factor * e, est_t)
      u, s = hessian.update_every_k(opt, g, s, p, step=t, estimate_fn=estimate, k=case.every)
      return (optax.apply_updates(p, u), s), hessian.sophia_win_rate(s)

    (p, _), rates = jax.lax.scan(step, (params, opt.init(params)),
                                 (noise, estimates, jnp.arange(steps, dtype=jnp.int32)))
    return p, rates

  out, rates = run(*(jax.tree.map(jnp.asarray, x) for x in (params0, noise, estimates)))
  out = jax.tree.map(np.asarray, out)
  return (out, np.asarray(rates)) if with_win_rates else out


def run_torch_hessian(case: HessianParityCase, params0: dict, noise: dict) -> dict:
  """The reference loop: ``step(bs=bs)``, then ``update_hessian(scale * E_t)`` every k."""
  import torch

  params = {k: torch.tensor(v, requires_grad=True) for k, v in params0.items()}
  opt = case.torch(list(params.values()))
  steps = next(iter(noise.values())).shape[0]
  estimates = make_hessian_estimates(steps)
  for t in range(steps):
    with torch.no_grad():
      for k, p in params.items():
        p.grad = torch.from_numpy(np.asarray(noise[k][t])) + LEAVES[k][2] * p.detach()
    opt.step(bs=case.bs)
    if t % case.every == 0:
      opt.update_hessian([case.scale * torch.tensor(np.asarray(estimates[k][t])) for k in params])
  return {k: p.detach().numpy() for k, p in params.items()}


def _sophia_ref(**kw):
  def build(ps):
    from jaxopt_llm.parity.reference import SophiaGReference
    return SophiaGReference(ps, **kw)
  return build


def hessian_cases() -> dict[str, HessianParityCase]:
  """Sophia with the official betas, rho and eps, and with other betas, rho, bs and k.

  The estimate scales put the win rate (coordinates not clipped) around 0.5 on average over
  the run (from ~0.05 at the start to ~0.8), so both branches of the rule are compared.
  ``lr * weight_decay`` is a power of two: the official code decays with
  ``p.mul_(1 - lr*wd)``, and torch rounds that factor to float32 (for lr=1e-2, wd=0.1:
  0.99900001, a relative decay error of 1.3e-5 per step), which alone drifts the reference by
  ~3e-6 relative over 200 steps (it is also most of AdamW's parity error). With an exactly
  representable factor the comparison measures the update rule: ~1e-6.
  """
  c = {}
  c["sophia_lr2^-7_wd2^-3"] = HessianParityCase(
      lambda: optim.sophia(2.0**-7, weight_decay=2.0**-3),
      _sophia_ref(lr=2.0**-7, weight_decay=2.0**-3), every=10, scale=30.0)
  c["sophia_b0.9,0.95_rho0.1_bs512_k5"] = HessianParityCase(
      lambda: optim.sophia(2.0**-8, b1=0.9, b2=0.95, rho=0.1, weight_decay=2.0**-2),
      _sophia_ref(lr=2.0**-8, betas=(0.9, 0.95), rho=0.1, weight_decay=2.0**-2),
      every=5, scale=30.0 / 5120, bs=512)
  return c
