"""Tests for jaxopt_llm.losses.combine: the weighted multi-loss combiner."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.losses import combine_losses


def _close(actual, expected, rtol=1e-6, atol=1e-6):
  chex.assert_trees_all_close(jnp.asarray(actual), jnp.asarray(expected, jnp.float32),
                              rtol=rtol, atol=atol)


def test_combine_losses_total_and_parts():
  ce, z, aux = jnp.float32(2.5), jnp.float32(40.0), jnp.asarray(0.3, jnp.bfloat16)
  total, parts = combine_losses({"ce": ce, "z": (z, 1e-4), "aux": (aux, 0.01)})
  chex.assert_type(total, jnp.float32)
  chex.assert_shape(total, ())
  _close(total, 2.5 + 1e-4 * 40.0 + 0.01 * float(aux))
  assert list(parts) == ["ce", "z", "aux"]
  _close(parts["z"], 40.0)
  chex.assert_type(parts["aux"], jnp.float32)
  # Weights for bare losses from the second argument.
  total, _ = combine_losses({"a": 1.0, "b": 2.0}, {"b": 0.5})
  _close(total, 2.0)


def test_combine_losses_jit_grad_and_traced_weights():
  def objective(x, w):
    total, parts = combine_losses({"quad": (jnp.sum(x**2), 1.0),
                                   "lin": (jnp.sum(x), w)})
    return total, parts

  x = jnp.arange(3.0)
  (total, parts), g = jax.jit(jax.value_and_grad(objective, has_aux=True))(x, 0.25)
  _close(total, 5.0 + 0.25 * 3.0)
  _close(parts["lin"], 3.0)
  _close(g, 2 * x + 0.25)


def test_combine_losses_zero_weight_drops_a_nan_term():
  total, parts = combine_losses({"ce": 1.0, "off": (jnp.float32(jnp.nan), 0.0)})
  assert float(total) == 1.0 and np.isnan(parts["off"])
  # A nonzero weight on a NaN term is not hidden.
  total, _ = combine_losses({"ce": 1.0, "on": (jnp.float32(jnp.nan), 0.1)})
  assert np.isnan(total)


def test_combine_losses_bad_arguments():
  with pytest.raises(ValueError, match="losses"):
    combine_losses({})
  with pytest.raises(ValueError, match="losses"):
    combine_losses({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match="losses"):
    combine_losses({"a": (1.0, 2.0, 3.0)})
  with pytest.raises(ValueError, match="weights"):
    combine_losses({"a": 1.0}, {"b": 1.0})
  with pytest.raises(ValueError, match="weights"):
    combine_losses({"a": (1.0, 2.0)}, {"a": 1.0})
  with pytest.raises(ValueError, match="weights"):
    combine_losses({"a": (1.0, float("inf"))})
  with pytest.raises(ValueError, match="weights"):
    combine_losses({"a": (1.0, jnp.ones(2))})
