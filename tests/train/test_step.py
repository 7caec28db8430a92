"""The jitted train step: learning, the guard's skips, accumulation, Sophia's every-k estimate,
the fused loss, evaluation, and data-parallel sharding on 8 virtual CPU devices."""
import dataclasses
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_llm import losses, optim, parallel
from jaxopt_llm.train import data, step
from jaxopt_llm.train import model as M
from jaxopt_llm.train.config import TrainConfig

# d_model=12: some leaves (LayerNorm scales, biases) do not divide over 8 devices.
TINY = dict(n_layer=1, d_model=12, n_head=2, block_size=16, batch_size=8)


def tiny_cfg(**kw) -> TrainConfig:
  return TrainConfig(**{**TINY, "steps": 100, "schedule": "constant", "eval_windows": 4,
                        "sample_tokens": 0, **kw})


def host(tree):
  """A host copy: the jitted step donates (deletes) the state passed to it."""
  return jax.tree.map(np.array, tree)


def fixed_batch(b=8, t=16, seed=0) -> jnp.ndarray:
  ids = data.encode(data.load_corpus())
  starts = np.random.default_rng(seed).integers(0, len(ids) - t, size=b)
  return jnp.asarray(ids[starts[:, None] + np.arange(t)])


def run_steps(cfg, batches, state=None):
  prog = step.build_program(cfg)
  state = prog.init(cfg.seed) if state is None else state
  out = []
  for b in batches:
    state, m = prog.step(state, b)
    out.append(jax.device_get(m))
  return state, out


def test_train_step_decreases_loss_on_a_fixed_batch():
  cfg = tiny_cfg()
  state, ms = run_steps(cfg, [fixed_batch()] * 40)
  first, last = float(ms[0]["loss"]), float(ms[-1]["loss"])
  assert all(bool(m["accepted"]) for m in ms)
  assert math.isfinite(last) and last < 0.8 * first, (first, last)
  assert int(state.opt_step) == 40 == int(state.step)
  # the lr metric is the schedule's value (constant here), the one the update used
  assert float(ms[-1]["lr"]) == pytest.approx(cfg.peak_lr, rel=1e-6)


def test_nonfinite_loss_skips_the_update_exactly():
  cfg = tiny_cfg()
  prog = step.build_program(cfg)
  state, _ = run_steps(cfg, [fixed_batch()] * 3)
  before = host(state)
  poisoned = fixed_batch().at[0, 5].set(256)  # label outside [0, V): the loss is NaN
  state, m = prog.step(state, poisoned)
  assert bool(m["nonfinite"]) and not bool(m["accepted"]) and not math.isfinite(m["loss"])
  after = host(state)
  chex.assert_trees_all_equal(after.params, before.params)
  chex.assert_trees_all_equal(after.opt_state.inner_state, before.opt_state.inner_state)
  assert int(after.opt_step) == int(before.opt_step) and int(after.step) == 4
  assert int(after.guard.skipped_nonfinite) == 1
  chex.assert_trees_all_equal(after.guard.history, before.guard.history)  # NaN not recorded
  state, m = prog.step(state, fixed_batch())
  assert bool(m["accepted"]) and int(state.opt_step) == int(before.opt_step) + 1


def test_loss_spike_is_skipped_then_accepted_after_max_consecutive():
  cfg = tiny_cfg()  # spike_k=6, window 64, min_history 16, max_consecutive_skips 25
  prog = step.build_program(cfg)
  state = prog.init(0)
  # A history of losses 1.0 +- 0.1: threshold 1 + 6 * std; the real loss (~5.5) is a spike.
  hist = jnp.asarray([0.9, 1.1] * 32, jnp.float32)
  state = state._replace(opt_state=state.opt_state._replace(
      history=hist, count=jnp.int32(64), consecutive=jnp.int32(23)))
  threshold = float(np.mean(hist) + 6 * np.std(np.asarray(hist), ddof=1))
  before = host(state)
  state, m1 = prog.step(state, fixed_batch())
  assert float(m1["threshold"]) == pytest.approx(threshold, rel=1e-6)
  assert bool(m1["spike"]) and not bool(m1["accepted"]) and float(m1["loss"]) > threshold
  chex.assert_trees_all_equal(host(state).params, before.params)
  chex.assert_trees_all_equal(host(state).opt_state.inner_state, before.opt_state.inner_state)
  state, m2 = prog.step(state, fixed_batch())
  assert bool(m2["spike"]) and int(state.guard.consecutive) == 25
  state, m3 = prog.step(state, fixed_batch())  # 25 in a row: accept the new level
  assert bool(m3["accepted"]) and not bool(m3["spike"])
  g = host(state.guard)
  assert int(g.skipped_spike) == 2 and int(g.consecutive) == 0 and int(g.count) == 65
  assert g.history[0] == pytest.approx(float(m3["loss"]))  # ring buffer slot 64 % 64
  assert not np.array_equal(host(state).params["wte"]["embedding"],
                            before.params["wte"]["embedding"])


def test_accumulation_equals_one_step_on_the_concatenated_batch():
  # SGD: the update is linear in the gradient, so the comparison is well conditioned (an
  # Adam first step is m / sqrt(v) = g / |g|, ill-conditioned where g ~ 0).
  a, b = fixed_batch(4, seed=1), fixed_batch(4, seed=2)
  big, _ = run_steps(tiny_cfg(optimizer="sgd"), [jnp.concatenate([a, b])] * 2)
  acc_cfg = tiny_cfg(optimizer="sgd", accum=2, batch_size=4)
  half, _ = run_steps(acc_cfg, [a])
  init = step.build_program(acc_cfg).init(0)
  chex.assert_trees_all_equal(host(half.params), host(init.params))  # nothing moved yet
  acc_state, ms = run_steps(acc_cfg, [b, a, b], state=half)
  assert int(acc_state.opt_step) == 2 and int(acc_state.step) == 4
  assert [bool(m["accepted"]) for m in ms] == [True] * 3
  chex.assert_trees_all_close(acc_state.params, big.params, rtol=1e-5, atol=1e-7)


# The config of the Sophia resume test too (tests/train/test_checkpoint.py): one program.
SOPHIA_ACCUM = dict(optimizer="sophia", accum=2, hessian_every=2, steps=10)


def test_sophia_estimates_on_the_applying_micro_step_every_k_optimizer_steps():
  cfg = TrainConfig(**{**TINY, "batch_size": 4}, **SOPHIA_ACCUM)
  state, ms = run_steps(cfg, [fixed_batch(4, seed=i) for i in range(12)])
  # micro-steps 1, 5, 9 apply optimizer steps 0, 2, 4 (k=2): the estimate lands there, on
  # the micro-step whose inner update MultiSteps keeps.
  assert [i for i, m in enumerate(ms) if bool(m["estimated"])] == [1, 5, 9]
  sophia_state = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optim.ScaleBySophiaState))
      if isinstance(s, optim.ScaleBySophiaState)][0]
  assert int(sophia_state.hessian_count) == 3 and int(state.opt_step) == 6
  stats = step.build_program(cfg).monitor(state)
  assert 0.0 <= float(stats["sophia_win_rate"]) <= 1.0
  assert float(stats["sophia_hessian_norm"]) > 0.0


def test_sophia_with_the_fused_loss_estimates_from_hidden_states(monkeypatch):
  """With the fused loss on, Sophia's estimate is the fused GNB (a spy counts its traces; the
  logits-path estimator raises if called) and the step never builds [B, T, V] logits; with
  the fused loss off, the same lowering does build them (so the check can fail)."""
  from jaxopt_llm.optim import hessian
  fused_calls = []
  real_fused = hessian.gauss_newton_bartlett_fused

  def spy(*args, **kwargs):
    fused_calls.append(1)
    return real_fused(*args, **kwargs)

  def logits_path(*args, **kwargs):
    raise AssertionError("the fused trainer fell back to the logits-path estimator")

  cfg = tiny_cfg(optimizer="sophia", fused_ce="on", hessian_every=2)
  with monkeypatch.context() as patched:
    patched.setattr(hessian, "gauss_newton_bartlett_fused", spy)
    patched.setattr(hessian, "gauss_newton_bartlett", logits_path)
    prog = step.build_program(cfg, cached=False)
    assert prog.fused
    state = prog.init(0)
    batch = fixed_batch()
    fused_text = prog.step.lower(state, batch).as_text()
    ms = []
    for _ in range(3):
      state, m = prog.step(state, batch)
      ms.append(jax.device_get(m))
  assert fused_calls, "the fused estimator was never traced"
  assert [bool(m["estimated"]) for m in ms] == [True, False, True]
  assert all(math.isfinite(float(m["loss"])) for m in ms)
  stats = prog.monitor(state)
  assert float(stats["sophia_hessian_norm"]) > 0.0
  assert int(optim.sophia_hessian_rejected(state.opt_state)) == 0

  vocab_size = cfg.model_config().vocab_size
  logits_shapes = (f"tensor<8x16x{vocab_size}xf32>", f"tensor<128x{vocab_size}xf32>")
  assert not any(s in fused_text for s in logits_shapes)
  off = step.build_program(dataclasses.replace(cfg, fused_ce="off"), cached=False)
  off_text = off.step.lower(jax.eval_shape(off.init, 0), batch).as_text()  # lowered only
  assert any(s in off_text for s in logits_shapes)


@pytest.fixture(scope="module")
def tiny_model():
  cfg = M.GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=16)
  return nnx.jit(lambda: M.GPT(cfg, nnx.Rngs(0)))()


def test_fused_loss_equals_the_unfused_loss_and_gradients(tiny_model):
  x = fixed_batch(2, 16)
  graphdef, params = nnx.split(tiny_model)

  def f(p, fused):
    return step.lm_loss(nnx.merge(graphdef, p), x, z_loss=1e-3, fused=fused)

  vg = jax.jit(jax.value_and_grad(f), static_argnums=1)
  v0, g0 = vg(params, False)
  v1, g1 = vg(params, True)
  assert float(v1) == pytest.approx(float(v0), rel=1e-5)
  chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-6)
  assert step.use_fused_ce("auto", 256) is False
  assert step.use_fused_ce("auto", 32_000) is True
  assert step.use_fused_ce("on", 256) is True and step.use_fused_ce("off", 10**6) is False


def test_eval_matches_the_library_metrics_on_all_windows(tiny_model):
  graphdef, params = nnx.split(tiny_model)
  params = nnx.to_pure_dict(params)
  windows = np.asarray(fixed_batch(5, 16, seed=3))  # 5 windows, batches of 2: one padded
  got = step.make_eval_fn(graphdef, batch_size=2)(params, windows)
  logits = tiny_model(jnp.asarray(windows))
  labels = windows[:, 1:]
  ce = float(losses.causal_lm_loss(logits, windows))
  assert got["val_loss"] == pytest.approx(ce, rel=1e-5)
  assert got["val_ppl"] == pytest.approx(float(losses.perplexity(logits[:, :-1], labels)),
                                         rel=1e-5)
  assert got["val_acc"] == pytest.approx(float(losses.token_accuracy(logits[:, :-1], labels)),
                                         abs=1e-7)


# ---------------------------------------------------------------------------------------
# Sharded: data parallel over the 8 virtual CPU devices (tests/conftest.py)
# ---------------------------------------------------------------------------------------

def losses_over(cfg, n=20):
  it = data.BatchIterator(data.encode(data.load_corpus())[:50_000], cfg.batch_size,
                          cfg.block_size, seed=0)
  prog = step.build_program(cfg)
  state = prog.init(0)
  out = []
  for _ in range(n):
    state, m = prog.step(state, prog.put_batch(next(it)))
    out.append(m["loss"])
  return np.asarray(jax.device_get(out)), state


@pytest.fixture(scope="module")
def one_device_losses():
  return losses_over(tiny_cfg())[0]  # the program of the tests above


@pytest.mark.parametrize("shard", ["replicated", "zero1", "fsdp"])
def test_sharded_runs_follow_the_one_device_loss_curve(shard, one_device_losses):
  assert jax.device_count() == 8
  cfg = tiny_cfg(shard=shard)
  got, state = losses_over(cfg)
  np.testing.assert_allclose(got, one_device_losses, rtol=1e-5, atol=0)
  assert one_device_losses[-1] < one_device_losses[0] - 0.5  # it did learn something
  # Optimizer-state bytes per device, as the mode predicts: ZeRO-1 / FSDP split every leaf
  # with a dimension divisible by 8 (LayerNorm scales and biases of width 12 stay whole), replicated keeps every leaf whole on every device.
  expected = {}
  for x in jax.tree.leaves(state.opt_state):
    splits = shard != "replicated" and any(d % 8 == 0 for d in x.shape)
    for dev, b in parallel.bytes_per_device(x).items():
      assert b == (x.nbytes // 8 if splits else x.nbytes), (shard, x.shape, b)
      expected[dev] = expected.get(dev, 0) + b
  assert len(expected) == 8 and parallel.bytes_per_device(state.opt_state) == expected


# ---------------------------------------------------------------------------------------
# Mixed precision: compute_dtype="bfloat16"
# ---------------------------------------------------------------------------------------

def dot_types(lowered_text: str) -> list[str]:
  """The ``(operand types) -> result type`` of every dot_general in a lowered program."""
  return re.findall(r"stablehlo\.dot_general.*?: \((.*?)\) -> (\S+)", lowered_text)


def test_bf16_compiled_step_multiplies_in_bf16_and_keeps_float32_state_and_loss():
  x = fixed_batch()
  for fused in ("off", "on"):
    prog = step.build_program(tiny_cfg(compute_dtype="bfloat16", fused_ce=fused))
    state = prog.init(0)
    dots = dot_types(prog.step.lower(state, x).as_text())
    # Every product takes bf16 operands, forward and backward (1 layer: 6 products + the
    # head, each with two gradient products); the forward ones give float32. (A backend
    # without bf16 x bf16 -> f32 products computes the forward ones in float32 from the
    # bf16-rounded operands: the same numbers.)
    low = [out for ops, out in dots if ops.count("bf16") == 2]
    assert len(dots) >= 3 * 7, dots
    if fused == "on" and jax.default_backend() in losses.fused.UPCAST_BACKENDS:
      # The fused head on CPU multiplies float32 blocks widened from the bf16 operands
      # (the same products, faster on XLA:CPU; losses/fused.py): exactly its 4 products,
      # each with the vocabulary dimension.
      head = [ops for ops, _ in dots if f"x{data.VOCAB_SIZE}x" in ops]
      assert len(head) == 4 and not any("bf16" in ops for ops in head), dots
    else:
      head = []
    if M.mixed_dot_supported():
      assert len(low) == len(dots) - len(head), dots
    else:  # the model's gradient products stay bf16 x bf16 -> bf16
      assert len(low) >= 2 * 6, dots
    assert sum(out.endswith("xf32>") for _, out in dots) >= 7
  state, m = prog.step(state, x)  # runs (the fused program)
  chex.assert_type(m["loss"], jnp.float32)
  assert math.isfinite(float(m["loss"])) and bool(m["accepted"])
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state.inner_state))
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  f32 = step.build_program(tiny_cfg())
  assert not any("bf16" in ops for ops, _ in dot_types(
      f32.step.lower(f32.init(0), x).as_text()))


@pytest.mark.slow
def test_bf16_val_loss_after_200_steps_is_within_0_05_nats_of_float32():
  # nano model, 16 x 32 tokens a step, lr 3e-3: past the early plateau by step 200, where
  # the two runs differ by rounding only (measured: 0.003-0.015 nats over seeds 0-2).
  def val_loss(compute_dtype):
    cfg = TrainConfig(batch_size=16, block_size=32, lr=3e-3, steps=200,
                      compute_dtype=compute_dtype)
    ds = data.load_dataset(cfg)
    prog = step.build_program(cfg)
    state = prog.init(0)
    it = data.BatchIterator(ds.train_ids, cfg.batch_size, cfg.block_size, seed=0)
    for _ in range(cfg.steps):
      state, _ = prog.step(state, prog.put_batch(next(it)))
    return prog.evaluate(state.params, data.eval_windows(ds.val_ids, 32, 256))["val_loss"], ds

  f32, ds = val_loss("float32")
  bf16, _ = val_loss("bfloat16")
  assert f32 < ds.summary["unigram_entropy"] - 0.4  # learned: the regime the bound is for
  assert abs(bf16 - f32) < 0.05, (f32, bf16)
