"""The one builder: every recipe and schedule, the layers of the optimizer it returns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm.optim import guards
from jaxopt_llm.train.config import TrainConfig
from jaxopt_llm.train.optimizers import OPTIMIZERS, SCHEDULES, build


def test_every_schedule_recipe_builds_and_stays_within_the_peak():
  for name in SCHEDULES:
    schedule, _ = build(TrainConfig(schedule=name, lr=1e-3, steps=100, warmup_steps=10))
    values = np.asarray(schedule(np.arange(0, 120)))
    assert np.isfinite(values).all() and values.max() <= 1e-3 * (1 + 1e-6), name
  with pytest.raises(ValueError, match="schedule"):
    build(TrainConfig(schedule="nope"))
  with pytest.raises(ValueError, match="exceed"):
    build(TrainConfig(schedule="wsd", steps=100, warmup_steps=90, decay_steps=20))


def test_schedule_reaches_min_lr_ratio_and_peak():
  schedule, _ = build(TrainConfig(lr=2e-3, steps=100, warmup_steps=10, min_lr_ratio=0.1))
  assert float(schedule(10)) == pytest.approx(2e-3)
  assert float(schedule(100)) == pytest.approx(2e-4)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_recipe_minimises_a_quadratic_through_the_guard(name):
  # One jitted step per recipe on a 2-leaf quadratic: the recipe, the clip, the guard and
  # the schedule in the optimizer work together (the trainer runs exactly this `tx`).
  cfg = TrainConfig(optimizer=name, schedule="constant", steps=60, lr=0.1)
  _, tx = build(cfg)
  target = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full(4, 0.5)}
  loss_fn = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)  # noqa: E731

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      extra = {"hessian": jax.tree.map(lambda x: 2.0 * jnp.ones_like(x), p)} \
          if OPTIMIZERS[name].uses_hessian else {}
      u, s = tx.update(g, s, p, loss=loss, **extra)
      return (optax.apply_updates(p, u), s), loss
    (_, s), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=60)
    return losses, s

  losses, state = run(jax.tree.map(jnp.zeros_like, target))
  assert isinstance(state, guards.SkipSpikesState) and int(state.count) == 60
  assert float(losses[-1]) < 0.5 * float(losses[0]), (name, losses[0], losses[-1])


def test_optimizer_layers_guard_outside_accumulation_outside_clip():
  params = {"w": jnp.ones((2, 2))}
  _, tx = build(TrainConfig(accum=1))
  state = tx.init(params)
  assert isinstance(state, guards.SkipSpikesState)
  assert not isinstance(state.inner_state, optax.MultiStepsState)  # no wrapper at accum 1
  _, tx = build(TrainConfig(accum=4, clip=0.0))
  inner = tx.init(params).inner_state
  assert isinstance(inner, optax.MultiStepsState)
