"""Monitors: optimizer-state norms equal the buffers' norms; the global gradient norm."""
import math

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxopt_llm import optim
from jaxopt_llm.train import monitors


def test_optimizer_state_norms_equal_the_buffers_norms():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
  tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(1e-2)), 2)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  _, state = tx.update(grads, state, params)
  norms = monitors.optimizer_state_norms(state)
  inner = state.inner_opt_state[1][0]  # (clip, (scale_by_adam, ...))
  assert set(norms) == {"mu", "nu", "acc_grads"}
  assert float(norms["mu"]) == pytest.approx(float(optax.tree.norm(inner.mu)), rel=1e-6)
  assert float(norms["nu"]) == pytest.approx(float(optax.tree.norm(inner.nu)), rel=1e-6)
  assert float(monitors.global_norm(grads)) == pytest.approx(
      math.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads))), rel=1e-6)


def test_monitor_reports_sophias_refused_hessian_estimates():
  params = {"w": jnp.ones((2, 3))}
  tx = optim.sophia(1e-3)
  state = tx.init(params)
  bad = {"w": jnp.full((2, 3), jnp.nan)}
  _, state = tx.update(params, state, params, hessian=bad)
  out = monitors.monitor(params, state)
  assert int(out["sophia_hessian_rejected"]) == 1
  assert float(out["sophia_hessian_norm"]) == 0.0  # the NaN estimate never reached h
  assert "sophia_hessian_rejected" not in monitors.monitor(params, optim.adamw(1e-3).init(params))
