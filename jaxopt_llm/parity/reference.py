"""PyTorch reference implementations of update rules that ``torch.optim`` does not ship.

Written from the papers' algorithms (not copied), so the parity tests compare our JAX code
against an independent implementation of the same equations. Requires ``torch``.
"""
from __future__ import annotations

import torch


class LionReference(torch.optim.Optimizer):
  r"""Lion, Algorithm 2 of Chen et al. (2023), in the order of the official release.

  For each parameter: decoupled decay :math:`p \leftarrow p(1 - lr\cdot wd)`; step
  :math:`p \leftarrow p - lr\cdot\operatorname{sign}(b_1 m + (1-b_1) g)`; then momentum
  :math:`m \leftarrow b_2 m + (1-b_2) g`.
  """

  def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
    super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

  @torch.no_grad()
  def step(self, closure=None):
    for group in self.param_groups:
      lr, wd = group["lr"], group["weight_decay"]
      b1, b2 = group["betas"]
      for p in group["params"]:
        if p.grad is None:
          continue
        state = self.state[p]
        if not state:
          state["exp_avg"] = torch.zeros_like(p)
        m = state["exp_avg"]
        p.mul_(1.0 - lr * wd)
        direction = m * b1 + p.grad * (1.0 - b1)
        p.add_(torch.sign(direction), alpha=-lr)
        m.mul_(b2).add_(p.grad, alpha=1.0 - b2)
    return None


class SophiaGReference(torch.optim.Optimizer):
  r"""SophiaG, Algorithm 3 of Liu et al. (2023), in the order of the official release.

  ``step(bs=1)`` for each parameter: decoupled decay :math:`p \leftarrow p(1 - lr\cdot wd)`;
  momentum :math:`m \leftarrow b_1 m + (1-b_1) g` (no bias correction); step
  :math:`p \leftarrow p - lr\cdot\operatorname{sign}(m)\,\min(|m| / (\rho\cdot bs\cdot h +
  \epsilon), 1)`. ``update_hessian(estimates)`` folds the given estimates (one tensor per
  parameter, in order) into :math:`h \leftarrow b_2 h + (1-b_2)\hat H`; the official code calls
  it with :math:`\hat H = \hat g^2` (Gauss-Newton-Bartlett) after ``step`` every k steps and
  passes the token batch size as ``bs``. ``h`` starts at zero. The official formula is kept
  verbatim (no guard for negative ``h``): this is the reference for non-negative estimates.
  """

  def __init__(self, params, lr: float = 1e-4, betas=(0.965, 0.99), rho: float = 0.04,
               weight_decay: float = 1e-1, eps: float = 1e-15):
    super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay,
                                  eps=eps))

  def _state(self, p):
    state = self.state[p]
    if not state:
      state["exp_avg"] = torch.zeros_like(p)
      state["hessian"] = torch.zeros_like(p)
    return state

  @torch.no_grad()
  def update_hessian(self, estimates) -> None:
    estimates = list(estimates)
    params = [p for group in self.param_groups for p in group["params"]]
    if len(estimates) != len(params):
      raise ValueError(f"update_hessian: expected {len(params)} estimates, got {len(estimates)}")
    i = 0
    for group in self.param_groups:
      b2 = group["betas"][1]
      for p in group["params"]:
        self._state(p)["hessian"].mul_(b2).add_(estimates[i], alpha=1.0 - b2)
        i += 1

  @torch.no_grad()
  def step(self, closure=None, bs: int = 1):
    for group in self.param_groups:
      lr, wd, rho, eps = group["lr"], group["weight_decay"], group["rho"], group["eps"]
      b1 = group["betas"][0]
      for p in group["params"]:
        if p.grad is None:
          continue
        state = self._state(p)
        m, h = state["exp_avg"], state["hessian"]
        p.mul_(1.0 - lr * wd)
        m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
        ratio = (m.abs() / (rho * bs * h + eps)).clamp(max=1.0)
        p.addcmul_(m.sign(), ratio, value=-lr)
    return None
