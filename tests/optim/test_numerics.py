"""jaxopt_llm.optim.numerics: saturating storage, safe division, bias correction, counting,
torch's single-rounding lerp and fma."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_llm.optim import numerics

BF16, F16 = jnp.bfloat16, jnp.float16


def test_store_saturates_and_never_rounds_a_second_moment_to_zero():
  x = jnp.array([1e-12, 1e-9, 0.0, 1e6, -1e6, 1.0], jnp.float32)
  v = numerics.store(x, F16, keep_nonzero=True)
  tiny = jnp.finfo(F16).smallest_subnormal
  np.testing.assert_array_equal(np.asarray(v, np.float32),
                                np.asarray([tiny, tiny, 0.0, 65504.0, -65504.0, 1.0],
                                           np.float32))
  m = numerics.store(x, F16)
  assert float(m[0]) == 0.0 and float(m[3]) == 65504.0
  # bf16 has float32's exponent range: a plain cast, no extra ops
  chex.assert_trees_all_equal(numerics.store(x, BF16), x.astype(BF16))


def test_fp16_nu_without_the_guard_would_overflow():
  """The failure the guard prevents: with v stored by a plain fp16 cast, v underflows to 0
  and the next update m / eps overflows fp16."""
  m = jnp.float32(0.1 * 2e-3)          # first moment after one 2e-3 gradient
  v_plain = (jnp.float32(0.001) * jnp.float32(2e-3) ** 2).astype(F16)   # 4e-9 -> 0
  assert float(v_plain) == 0.0
  u_plain = (m / 0.1) / (jnp.sqrt(v_plain.astype(jnp.float32)) / jnp.sqrt(0.001) + 1e-8)
  assert not np.isfinite(np.float32(u_plain.astype(F16)))
  v_safe = numerics.store(jnp.float32(0.001) * jnp.float32(2e-3) ** 2, F16,
                             keep_nonzero=True)
  u_safe = (m / 0.1) / (jnp.sqrt(v_safe.astype(jnp.float32)) / jnp.sqrt(0.001) + 1e-8)
  assert np.isfinite(np.float32(u_safe.astype(F16)))


def test_bias_correction_is_accurate_for_b_close_to_one():
  """1 - 0.999**1 = 1e-3 exactly; the float32 form 1 - 0.999 is off by ~1e-5 relative."""
  got = float(numerics.bias_correction(0.999, jnp.int32(1)))
  np.testing.assert_allclose(got, 1e-3, rtol=1e-6)
  assert abs(float(1 - jnp.float32(0.999)) - 1e-3) / 1e-3 > 1e-6  # what it avoids
  assert float(numerics.bias_correction(0.0, jnp.int32(3))) == 1.0


@pytest.mark.parametrize("eps", [0.0, 1e-8, jnp.float32(0.0)])
def test_safe_div_zero_for_a_zero_or_infinite_denominator_plain_division_elsewhere(eps):
  num = jnp.array([1.0, 0.0, jnp.nan, jnp.inf, 3.0, 1.0, jnp.nan])
  den = jnp.array([0.0, 0.0, 1.0, jnp.inf, 1e30, 3.0, jnp.nan])
  out = np.asarray(numerics.safe_div(num, den, eps))
  np.testing.assert_array_equal(out[:2], [0.0, 0.0])       # 1/0, 0/0 (eps = 0, zero history)
  assert np.isnan(out[2]) and np.isnan(out[6])            # NaN stays NaN
  assert out[3] == 0.0                                    # inf/inf: overflowed moment -> 0
  assert out[4] == np.float32(3.0) / np.float32(1e30) and out[5] == np.float32(1.0) / 3


def test_fraction_true_counts_exactly_in_int32():
  masks = [jnp.ones(3, bool), jnp.zeros((2, 2), bool), jnp.array(True)]
  assert float(numerics.fraction_true(masks)) == np.float32(4 / 8)
  assert float(numerics.fraction_true([])) == 0.0
  # 2**24 + 1 ones: a float32 running count would stop at 2**24.
  n = 2**24 + 1
  frac = numerics.fraction_true([jnp.ones(n, bool), jnp.zeros(n, bool)])
  assert frac.dtype == jnp.float32 and float(frac) == 0.5


def test_map_leaves_keeps_tuple_params_apart():
  tree = (jnp.ones(2), jnp.zeros(3))
  a, b = numerics.map_leaves(lambda x: (x + 1, x * 2), tree, n_outputs=2)
  chex.assert_trees_all_equal(a, (jnp.full(2, 2.0), jnp.ones(3)))
  chex.assert_trees_all_equal(b, (jnp.full(2, 2.0), jnp.zeros(3)))
  assert numerics.map_leaves(lambda x: (x,), {}, n_outputs=1) == ({},)


def test_lerp_and_fma_round_as_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(4)
  s, e = (rng.normal(size=20000).astype(np.float32) for _ in range(2))
  for w in (0.05, 0.95, 0.5, 0.3):
    ref = torch.from_numpy(s).lerp(torch.from_numpy(e), w).numpy()
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b: numerics.lerp(a, b, w))(s, e)),
                                  ref)
  # A traced weight picks the branch per value.
  for w in (0.05, 0.95):
    ours = jax.jit(numerics.lerp)(s, e, jnp.float32(w))
    np.testing.assert_array_equal(np.asarray(ours), torch.from_numpy(s).lerp(
        torch.from_numpy(e), w).numpy())
  # torch's add(alpha=) on CPU is an FMA: so is ours.
  a = rng.normal(size=20000).astype(np.float32)
  ref = torch.from_numpy(s).add(torch.from_numpy(a), alpha=-0.0123).numpy()
  np.testing.assert_array_equal(
      np.asarray(numerics.fma(jnp.asarray(a), jnp.float32(-0.0123), jnp.asarray(s))), ref)
