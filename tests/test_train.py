"""The tiny GPT, its data pipeline, and the jitted train step (guards, accumulation, Sophia)."""
import hashlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_llm import losses, optim
from jaxopt_llm.train import data, loop, monitors, optimizers
from jaxopt_llm.train import model as M

TINY = dict(n_layer=1, d_model=16, n_head=2, block_size=16, batch_size=4)


def tiny_cfg(**kw) -> loop.TrainConfig:
  return loop.TrainConfig(**{**TINY, "steps": 100, "schedule": "constant", "eval_windows": 4,
                             "sample_tokens": 0, **kw})


def host(tree):
  """A host copy: the jitted step donates (deletes) the state passed to it."""
  return jax.tree.map(np.array, tree)


def fixed_batch(b=4, t=16, seed=0) -> jnp.ndarray:
  ids = data.encode(data.load_corpus())
  starts = np.random.default_rng(seed).integers(0, len(ids) - t, size=b)
  return jnp.asarray(ids[starts[:, None] + np.arange(t)])


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------

def test_corpus_is_the_committed_file():
  raw = data.load_corpus()
  assert hashlib.sha256(raw).hexdigest() == data.CORPUS_SHA256
  assert len(raw) == 466_195
  text = raw.decode("utf-8")  # valid UTF-8 throughout
  assert 'The "if" statement' in text


def test_encode_decode_round_trip_and_bad_bytes():
  text = "x = “quoted” — ß\n"
  ids = data.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < data.VOCAB_SIZE
  assert len(ids) == len(text.encode("utf-8")) > len(text)
  assert data.decode(ids) == text
  assert data.decode([0xE2, 0x80]) == "\ufffd"  # a truncated sequence never raises
  with pytest.raises(ValueError, match="token ids"):
    data.decode([256])


def test_unigram_entropy_equation_and_corpus_value():
  ids = np.array([0, 0, 1, 2])
  expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
  assert data.unigram_entropy(ids) == pytest.approx(expected, rel=1e-12)
  assert data.unigram_entropy(np.zeros(10, int)) == 0.0
  train_ids, val_ids = data.train_val_split(data.encode(data.load_corpus()))
  h = data.unigram_entropy(train_ids)
  assert 3.0 < h < math.log(256)
  # The smoothed unigram model cannot beat the val split's own entropy (Gibbs' inequality).
  assert data.unigram_cross_entropy(train_ids, val_ids) >= data.unigram_entropy(val_ids)


def test_batch_iterator_windows_are_slices_and_cover_an_epoch_once():
  ids = np.arange(1000, dtype=np.int32)  # token value = its position
  it = data.BatchIterator(ids, batch_size=4, seq_len=10, seed=3)
  per_epoch = it.batches_per_epoch
  starts = []
  for _ in range(per_epoch):
    b = next(it)
    assert b.shape == (4, 10) and b.dtype == np.int32
    np.testing.assert_array_equal(b, b[:, :1] + np.arange(10))  # contiguous slices
    starts.extend(b[:, 0].tolist())
  assert len(set(starts)) == len(starts) == per_epoch * 4  # no window twice in an epoch
  assert len({s % 10 for s in starts}) == 1  # one random offset per epoch
  assert it.epoch == 0
  next(it)
  assert it.epoch == 1


def test_batch_iterator_position_restores_exactly():
  ids = data.encode(data.load_corpus())[:20_000]
  a = data.BatchIterator(ids, batch_size=8, seq_len=32, seed=1)
  for _ in range(a.batches_per_epoch - 2):  # the next batches cross an epoch boundary
    next(a)
  saved = a.state()
  expected = [next(a) for _ in range(5)]
  b = data.BatchIterator(ids, batch_size=8, seq_len=32, seed=1)
  b.restore(saved)
  for e in expected:
    np.testing.assert_array_equal(next(b), e)
  c = data.BatchIterator(ids, batch_size=8, seq_len=32, seed=2)
  assert not np.array_equal(next(c), next(data.BatchIterator(ids, 8, 32, seed=1)))
  with pytest.raises(ValueError, match="seed"):
    c.restore(saved)
  with pytest.raises(ValueError, match="too short"):
    data.BatchIterator(ids[:100], batch_size=8, seq_len=32)


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
  cfg = M.GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=16)
  return nnx.jit(lambda: M.GPT(cfg, nnx.Rngs(0)))()  # jitted: one compilation for all inits


@nnx.jit
def forward(model, x):  # one compilation per shape, instead of one per op when eager
  return model(x), model.hidden(x) @ model.head_kernel()


def test_model_is_causal_and_logits_are_hidden_times_head(tiny_model):
  x = fixed_batch(2, 16)
  logits, from_hidden = forward(tiny_model, x)
  chex.assert_shape(logits, (2, 16, 256))
  chex.assert_type(logits, jnp.float32)
  y = x.at[:, 9:].set((x[:, 9:] + 17) % 256)  # change the future from position 9 on
  changed, _ = forward(tiny_model, y)
  np.testing.assert_array_equal(changed[:, :9], logits[:, :9])
  assert not np.allclose(changed[:, 9:], logits[:, 9:])
  np.testing.assert_array_equal(from_hidden, logits)
  # tied head: the kernel is the embedding, transposed
  np.testing.assert_array_equal(tiny_model.head_kernel(), tiny_model.wte.embedding[...].T)


def test_attention_equals_reference_softmax_attention(tiny_model):
  @nnx.jit
  def both(attn, x):
    q, k, v = jnp.split(attn.qkv(x), 3, axis=-1)
    heads = lambda z: z.reshape(2, 16, 2, 8)  # noqa: E731
    ref = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True,
                                       implementation="xla")
    return attn(x), attn.proj(ref.reshape(2, 16, 16))

  ours, ref = both(tiny_model.blocks[0].attn, jax.random.normal(jax.random.PRNGKey(0),
                                                                  (2, 16, 16)))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_untied_head_has_its_own_kernel():
  cfg = M.GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=8, tied_head=False)
  m = nnx.jit(lambda: M.GPT(cfg, nnx.Rngs(0)))()
  chex.assert_shape(m.head_kernel(), (16, 256))
  assert not np.allclose(m.head_kernel(), m.wte.embedding[...].T)
  assert "head" in nnx.to_pure_dict(nnx.state(m))
  logits, from_hidden = forward(m, jnp.zeros((1, 8), jnp.int32))
  np.testing.assert_array_equal(logits, from_hidden)


def test_model_config_validation():
  with pytest.raises(ValueError, match="d_model"):
    M.GPTConfig(d_model=10, n_head=4)
  with pytest.raises(ValueError, match="size"):
    M.GPTConfig.from_size("huge")
  abstract = nnx.eval_shape(
      lambda: M.GPT(M.GPTConfig(n_layer=1, n_head=1, d_model=8, block_size=4), nnx.Rngs(0)))
  with pytest.raises(ValueError, match="block_size"):
    abstract(jnp.zeros((1, 5), jnp.int32))


def test_generate_top1_equals_a_greedy_reference_loop(tiny_model):
  graphdef, params = nnx.split(tiny_model)
  block = tiny_model.cfg.block_size
  for prompt in (data.encode("The "), data.encode("x" * 20)):  # shorter / longer than block
    out = M.generate(graphdef, params, prompt, 24, jax.random.PRNGKey(0), top_k=1)
    chex.assert_shape(out, (24,))
    ref = list(prompt)
    for _ in range(24):
      # Greedy, on the last `block` tokens: zero-padded on the right to one fixed shape
      # (a single compilation); position len-1 cannot see the padding (causal, tested above).
      window = ref[-block:]
      x = jnp.zeros((1, block), jnp.int32).at[0, :len(window)].set(jnp.asarray(window))
      ref.append(int(jnp.argmax(forward(tiny_model, x)[0][0, len(window) - 1])))
    np.testing.assert_array_equal(out, ref[len(prompt):])
  a = M.generate(graphdef, params, prompt, 10, jax.random.PRNGKey(1))
  b = M.generate(graphdef, params, prompt, 10, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert ((a >= 0) & (a < 256)).all()


# ---------------------------------------------------------------------------------------
# the train step
# ---------------------------------------------------------------------------------------

def run_steps(cfg, batches, state=None):
  prog = loop.build_program(cfg)
  state = prog.init(cfg.seed) if state is None else state
  out = []
  for b in batches:
    state, m = prog.step(state, b)
    out.append(jax.device_get(m))
  return state, out


@pytest.mark.parametrize("name", optimizers.optimizer_names())
def test_train_step_decreases_loss_on_a_fixed_batch(name):
  cfg = tiny_cfg(optimizer=name)
  batch = fixed_batch()
  state, ms = run_steps(cfg, [batch] * 80)
  first, last = float(ms[0]["loss"]), float(ms[-1]["loss"])
  assert all(bool(m["accepted"]) for m in ms)
  assert math.isfinite(last) and last < 0.8 * first, (name, first, last)
  assert int(state.opt_step) == 80 == int(state.step)
  # the lr metric is the schedule's value (constant here), the one the update used
  assert float(ms[-1]["lr"]) == pytest.approx(cfg.peak_lr, rel=1e-6)


def test_nonfinite_loss_skips_the_update_exactly():
  cfg = tiny_cfg()
  prog = loop.build_program(cfg)
  state, _ = run_steps(cfg, [fixed_batch()] * 3)
  before = host(state)
  poisoned = fixed_batch().at[0, 5].set(256)  # label outside [0, V): the loss is NaN
  state, m = prog.step(state, poisoned)
  assert bool(m["nonfinite"]) and not bool(m["accepted"]) and not math.isfinite(m["loss"])
  after = host(state)
  chex.assert_trees_all_equal(after.params, before.params)
  chex.assert_trees_all_equal(after.opt_state, before.opt_state)
  assert int(after.opt_step) == int(before.opt_step) and int(after.step) == 4
  assert int(after.guard.skipped_nonfinite) == 1
  chex.assert_trees_all_equal(after.guard.history, before.guard.history)  # NaN not recorded
  state, m = prog.step(state, fixed_batch())
  assert bool(m["accepted"]) and int(state.opt_step) == int(before.opt_step) + 1


def test_loss_spike_is_skipped_then_accepted_after_max_consecutive():
  cfg = tiny_cfg()  # spike_k=6, window 64, min_history 16, max_consecutive_skips 25
  prog = loop.build_program(cfg)
  state = prog.init(0)
  # A history of losses 1.0 +- 0.1: threshold 1 + 6 * std; the real loss (~5.5) is a spike.
  hist = jnp.asarray([0.9, 1.1] * 32, jnp.float32)
  state = state._replace(guard=state.guard._replace(
      history=hist, count=jnp.int32(64), consecutive=jnp.int32(23)))
  threshold = float(np.mean(hist) + 6 * np.std(np.asarray(hist), ddof=1))
  before = host(state)
  state, m1 = prog.step(state, fixed_batch())
  assert float(m1["threshold"]) == pytest.approx(threshold, rel=1e-6)
  assert bool(m1["spike"]) and not bool(m1["accepted"]) and float(m1["loss"]) > threshold
  chex.assert_trees_all_equal(host(state).params, before.params)
  chex.assert_trees_all_equal(host(state).opt_state, before.opt_state)
  state, m2 = prog.step(state, fixed_batch())
  assert bool(m2["spike"]) and int(state.guard.consecutive) == 25
  state, m3 = prog.step(state, fixed_batch())  # 25 in a row: accept the new level
  assert bool(m3["accepted"]) and not bool(m3["spike"])
  g = host(state.guard)
  assert int(g.skipped_spike) == 2 and int(g.consecutive) == 0 and int(g.count) == 65
  assert g.history[0] == pytest.approx(float(m3["loss"]))  # ring buffer slot 64 % 64
  assert not np.array_equal(host(state).params["wte"]["embedding"],
                            before.params["wte"]["embedding"])


@pytest.mark.parametrize("count", [0, 3, 5, 8, 13])
def test_guard_threshold_is_mean_plus_k_std_of_the_window(count):
  window, k = 8, 2.5
  g = loop.guard_init(window)
  losses_seen = np.random.default_rng(count).normal(3.0, 0.5, size=count).astype(np.float32)
  for v in losses_seen:
    g = loop.guard_update(g, jnp.float32(v), jnp.asarray(True), jnp.asarray(False),
                          jnp.asarray(False))
  t = float(loop.guard_threshold(g, k, min_history=5))
  recent = losses_seen[-window:]
  if count < 5:
    assert t == math.inf
  else:
    assert t == pytest.approx(recent.mean() + k * recent.std(ddof=1), rel=1e-5)
  assert float(loop.guard_threshold(g, 0.0, min_history=5)) == math.inf  # k=0: off


def test_accumulation_equals_one_step_on_the_concatenated_batch():
  # SGD: the update is linear in the gradient, so the comparison is well conditioned (an
  # Adam first step is m / sqrt(v) = g / |g|, ill-conditioned where g ~ 0).
  a, b = fixed_batch(seed=1), fixed_batch(seed=2)
  big, _ = run_steps(tiny_cfg(optimizer="sgd", batch_size=8), [jnp.concatenate([a, b])] * 2)
  acc_cfg = tiny_cfg(optimizer="sgd", accum=2)
  half, _ = run_steps(acc_cfg, [a])
  init = loop.build_program(acc_cfg).init(0)
  chex.assert_trees_all_equal(host(half.params), host(init.params))  # nothing moved yet
  acc_state, ms = run_steps(acc_cfg, [b, a, b], state=half)
  assert int(acc_state.opt_step) == 2 and int(acc_state.step) == 4
  assert [bool(m["accepted"]) for m in ms] == [True] * 3
  chex.assert_trees_all_close(acc_state.params, big.params, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not hasattr(optim, "sophia"), reason="Sophia not in this version")
def test_sophia_estimates_the_hessian_every_k_optimizer_steps():
  cfg = tiny_cfg(optimizer="sophia")  # hessian_every=10
  state, ms = run_steps(cfg, [fixed_batch(seed=i) for i in range(21)])
  assert [i for i, m in enumerate(ms) if bool(m["estimated"])] == [0, 10, 20]
  sophia_state = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optim.ScaleBySophiaState))
      if isinstance(s, optim.ScaleBySophiaState)][0]
  assert int(sophia_state.hessian_count) == 3
  stats = jax.jit(monitors.sophia_stats)(state.opt_state)
  assert 0.0 <= float(stats["sophia_win_rate"]) <= 1.0
  assert float(stats["sophia_hessian_norm"]) > 0.0


def test_fused_loss_equals_the_unfused_loss_and_gradients(tiny_model):
  if not loop.fused_ce_available():
    pytest.skip("fused_linear_cross_entropy not in this version")
  x = fixed_batch(2, 16)
  graphdef, params = nnx.split(tiny_model)

  def f(p, fused):
    return loop.lm_loss(nnx.merge(graphdef, p), x, z_loss=1e-3, fused=fused)

  vg = jax.jit(jax.value_and_grad(f), static_argnums=1)
  v0, g0 = vg(params, False)
  v1, g1 = vg(params, True)
  assert float(v1) == pytest.approx(float(v0), rel=1e-5)
  chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-6)
  assert loop.use_fused_ce("auto", 256) is False
  assert loop.use_fused_ce("auto", 32_000) is True
  assert loop.use_fused_ce("on", 256) is True and loop.use_fused_ce("off", 10**6) is False


def test_eval_matches_the_library_metrics_on_all_windows(tiny_model):
  graphdef, params = nnx.split(tiny_model)
  params = nnx.to_pure_dict(params)
  windows = np.asarray(fixed_batch(5, 16, seed=3))  # 5 windows, batches of 2: one padded
  got = loop.make_eval_fn(graphdef, batch_size=2)(params, windows)
  logits, _ = forward(tiny_model, jnp.asarray(windows))
  labels = windows[:, 1:]
  ce = float(losses.causal_lm_loss(logits, windows))
  assert got["val_loss"] == pytest.approx(ce, rel=1e-5)
  assert got["val_ppl"] == pytest.approx(float(losses.perplexity(logits[:, :-1], labels)),
                                         rel=1e-5)
  assert got["val_acc"] == pytest.approx(float(losses.token_accuracy(logits[:, :-1], labels)),
                                         abs=1e-7)


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


def test_every_schedule_recipe_builds_and_is_finite():
  for name in optimizers.SCHEDULES:
    s = optimizers.build_schedule(name, 1e-3, 10, 100, 1e-4)
    values = np.asarray(s(np.arange(0, 120)))
    assert np.isfinite(values).all() and values.max() <= 1e-3 * (1 + 1e-6), name
  with pytest.raises(ValueError, match="schedule"):
    optimizers.build_schedule("nope", 1e-3, 10, 100)


def test_train_config_rejects_bad_values():
  with pytest.raises(ValueError, match="optimizer"):
    loop.TrainConfig(optimizer="nope").validate()
  with pytest.raises(ValueError, match="warmup_steps"):
    loop.TrainConfig(steps=10, warmup_steps=20).validate()
  with pytest.raises(ValueError, match="lr"):
    loop.TrainConfig(lr=-1.0).validate()
  with pytest.raises(ValueError, match="d_model"):
    loop.TrainConfig(d_model=64, n_head=3).validate()
