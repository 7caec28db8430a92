"""optim.guards.skip_spikes: the rule, state untouched on a skip, extra args, a plain optax loop."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import optim
from jaxopt_llm.optim import guards

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}


def grads_like(params, scale=1.0):
  return jax.tree.map(lambda p: scale * (0.5 * p + 1.0), params)


def test_accepted_steps_equal_the_inner_transformation_bit_for_bit():
  inner = optax.chain(optax.clip_by_global_norm(1.0), optim.adamw(1e-2))
  tx = guards.skip_spikes(inner)
  s_in, s_g = inner.init(PARAMS), tx.init(PARAMS)
  p_in = p_g = PARAMS
  update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
  for i in range(5):
    g = grads_like(p_in, 1.0 + i)
    u_in, s_in = inner_update(g, s_in, p_in)
    u_g, s_g = update(g, s_g, p_g, loss=jnp.float32(3.0 - 0.1 * i))
    p_in, p_g = optax.apply_updates(p_in, u_in), optax.apply_updates(p_g, u_g)
  chex.assert_trees_all_equal(p_g, p_in)
  chex.assert_trees_all_equal(s_g.inner_state, s_in)
  assert int(s_g.count) == 5 and int(s_g.skipped_nonfinite) == 0
  np.testing.assert_allclose(s_g.history[:5], [3.0, 2.9, 2.8, 2.7, 2.6], rtol=1e-6)


@pytest.mark.parametrize("bad", ["loss_nan", "loss_inf", "grad_nan", "grad_inf"])
def test_nonfinite_step_returns_zero_updates_and_keeps_the_inner_state(bad):
  tx = guards.skip_spikes(optim.adamw(1e-2))
  state = tx.init(PARAMS)
  _, state = tx.update(grads_like(PARAMS), state, PARAMS, loss=2.0)
  g = grads_like(PARAMS)
  loss = 2.0
  if bad.startswith("loss"):
    loss = float("nan") if bad == "loss_nan" else float("inf")
  else:
    g["w"] = g["w"].at[1, 2].set(jnp.nan if bad == "grad_nan" else -jnp.inf)
  updates, new = tx.update(g, state, PARAMS, loss=loss)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
  chex.assert_trees_all_equal(new.inner_state, state.inner_state)
  chex.assert_trees_all_equal(new.history, state.history)  # not recorded
  assert (int(new.skipped_nonfinite), int(new.skipped_spike), int(new.count)) == (1, 0, 1)


@pytest.mark.parametrize("count", [0, 3, 5, 8, 13])
def test_threshold_is_mean_plus_k_std_of_the_last_window_accepted_losses(count):
  window, k = 8, 2.5
  # The guard itself with a k large enough that none of the normal sample is a spike.
  tx = guards.skip_spikes(optax.sgd(0.1), k=100.0, window=window, min_history=5)
  state = tx.init(PARAMS)
  seen = np.random.default_rng(count).normal(3.0, 0.5, size=count).astype(np.float32)
  update = jax.jit(tx.update)
  for v in seen:
    _, state = update(grads_like(PARAMS), state, PARAMS, loss=jnp.float32(v))
  assert int(state.count) == count
  t = float(guards.spike_threshold(state, k, min_history=5))
  recent = seen[-window:]
  if count < 5:
    assert t == math.inf
  else:
    assert t == pytest.approx(recent.mean() + k * recent.std(ddof=1), rel=1e-5)
  assert float(guards.spike_threshold(state, 0.0, min_history=5)) == math.inf  # k=0: off


def test_spike_is_skipped_then_accepted_after_max_consecutive_skips():
  tx = guards.skip_spikes(optax.sgd(0.1), k=6.0, window=64, min_history=16,
                          max_consecutive_skips=3)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for i in range(20):  # 1.0 +- 0.1: threshold 1 + 6 * std ~ 1.6
    _, state = update(grads_like(PARAMS), state, PARAMS, loss=0.9 if i % 2 else 1.1)
  before = state
  for i in range(3):
    updates, state = update(grads_like(PARAMS), state, PARAMS, loss=5.0)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
    assert int(state.consecutive) == i + 1
  chex.assert_trees_all_equal(state.inner_state, before.inner_state)
  chex.assert_trees_all_equal(state.history, before.history)
  updates, state = update(grads_like(PARAMS), state, PARAMS, loss=5.0)  # a new level
  assert float(jnp.abs(updates["w"]).sum()) > 0
  assert (int(state.skipped_spike), int(state.consecutive), int(state.count)) == (3, 0, 21)
  assert float(state.history[20]) == 5.0


def test_extra_args_reach_the_inner_transformation():
  # Sophia folds `hessian=` into its EMA: through the guard and through MultiSteps.
  for inner in (optim.sophia(1e-3), optax.MultiSteps(optim.sophia(1e-3), 1)):
    if isinstance(inner, optax.MultiSteps):
      inner = optax.GradientTransformationExtraArgs(inner.init, inner.update)
    tx = guards.skip_spikes(inner)
    state = tx.init(PARAMS)
    _, state = tx.update(grads_like(PARAMS), state, PARAMS, loss=1.0,
                         hessian=jax.tree.map(jnp.ones_like, PARAMS))
    assert float(optim.sophia_hessian_norm(state)) > 0


def test_a_plain_optax_training_loop_survives_a_poisoned_batch():
  # Least squares; batch 7 has a NaN target: the guard skips it, training goes on.
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5])
  tx = guards.skip_spikes(optax.adam(0.1))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(w, state, y):
    loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    updates, state = tx.update(g, state, w, loss=loss)
    return optax.apply_updates(w, updates), state, loss

  w = jnp.zeros(3)
  state = jax.jit(tx.init)(w)  # jitted: every leaf its own buffer, as donation needs
  for i in range(150):
    w, state, loss = step(w, state, y.at[0].set(jnp.nan) if i == 7 else y)
  assert int(state.skipped_nonfinite) == 1 and float(loss) < 1e-3
  np.testing.assert_allclose(w, [1.0, -2.0, 0.5], atol=1e-2)


def test_bad_arguments_name_the_argument():
  for kwargs, name in ((dict(k=-1.0), "k"), (dict(window=0), "window"),
                       (dict(min_history=-1), "min_history"),
                       (dict(max_consecutive_skips=-2), "max_consecutive_skips")):
    with pytest.raises(ValueError, match=f"`{name}`"):
      guards.skip_spikes(optax.sgd(0.1), **kwargs)
  tx = guards.skip_spikes(optax.sgd(0.1))
  with pytest.raises(ValueError, match="loss"):
    tx.update(PARAMS, tx.init(PARAMS), PARAMS)
