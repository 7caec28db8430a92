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
