"""Tests for jaxopt_llm.losses.contrastive: InfoNCE, in-batch InfoNCE, CLIP.

Checked against the written formulas (float64 numpy), against PyTorch re-implementations
(torch.nn.functional.normalize + cross_entropy, open_clip's ClipLoss), on properties
(scale invariance, zero vectors), and for global negatives on the 8 virtual CPU devices
of tests/conftest.py: under jax.shard_map and jax.pmap the sharded loss and its
gradients equal the single-device loss on the concatenated batch.
"""
import importlib.util
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxopt_llm.losses import (
    clip_loss, in_batch_info_nce, info_nce, l2_normalize, pairwise_cosine_similarity)

B, D, K = 16, 8, 5


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(jnp.asarray(actual), jnp.asarray(expected, jnp.float32),
                              rtol=rtol, atol=atol)


def _feats(seed, *shape):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _np_ce_rows(logits, targets):
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
  return lse - logits[np.arange(len(targets)), targets]


def _np_in_batch(a, b, scale, symmetric):
  s = scale * _np_normalize(a) @ _np_normalize(b).T
  t = np.arange(len(s))
  loss = _np_ce_rows(s, t).mean()
  if symmetric:
    loss = 0.5 * (loss + _np_ce_rows(s.T, t).mean())
  return loss


# ---------------------------------------------------------------------------------------
# Normalisation and similarity.


def test_l2_normalize_matches_torch_and_is_safe_at_zero():
  torch = pytest.importorskip("torch")
  x = _feats(0, 4, D).at[2].set(0.0)
  out = l2_normalize(x)
  ref = torch.nn.functional.normalize(torch.tensor(np.asarray(x)), dim=-1, eps=1e-8)
  _close(out, ref.numpy(), rtol=1e-6)
  assert np.all(np.asarray(out[2]) == 0.0)
  g = jax.jit(jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.arange(D))))(x)
  assert np.all(np.isfinite(g))
  _close(jnp.linalg.norm(out, axis=-1), [1, 1, 0, 1])
  chex.assert_type(l2_normalize(x.astype(jnp.bfloat16)), jnp.float32)


def test_pairwise_cosine_similarity_equation():
  a, b = _feats(1, 5, D), _feats(2, 3, D)
  out = pairwise_cosine_similarity(a, b)
  chex.assert_shape(out, (5, 3))
  _close(out, _np_normalize(a) @ _np_normalize(b).T)
  _close(jnp.diag(pairwise_cosine_similarity(a, 3.0 * a)), np.ones(5))
  # Its diagonal is optax's (matched-row) cosine similarity, a different function.
  _close(jnp.diag(pairwise_cosine_similarity(a, a[::-1])),
         optax.losses.cosine_similarity(a, a[::-1]), rtol=1e-5)
  with pytest.raises(ValueError, match="`b`"):
    pairwise_cosine_similarity(a, _feats(3, 3, D + 1))


# ---------------------------------------------------------------------------------------
# info_nce


def _np_info_nce(q, p, n, tau):
  qn, pn, nn = _np_normalize(q), _np_normalize(p), _np_normalize(n)
  pos = (qn * pn).sum(-1, keepdims=True)
  neg = np.einsum("bd,bkd->bk", qn, nn) if nn.ndim == 3 else qn @ nn.T
  logits = np.concatenate([pos, neg], -1) / tau
  return _np_ce_rows(logits, np.zeros(len(q), int))


@pytest.mark.parametrize("paired", [True, False])
def test_info_nce_matches_equation(paired):
  q, p = _feats(3, B, D), _feats(4, B, D)
  n = _feats(5, B, K, D) if paired else _feats(5, K, D)
  ref = _np_info_nce(q, p, n, 0.1)
  out = info_nce(q, p, n, temperature=0.1)
  chex.assert_type(out, jnp.float32)
  chex.assert_shape(out, ())
  _close(out, ref.mean())
  _close(info_nce(q, p, n, temperature=0.1, reduction="none"), ref)
  _close(info_nce(q, p, n, temperature=0.1, reduction="sum"), ref.sum())


def test_info_nce_layouts_agree_and_no_negatives_is_zero():
  # A shared pool is the per-query layout with the pool repeated for every query.
  q, p, n = _feats(6, B, D), _feats(7, B, D), _feats(8, K, D)
  _close(info_nce(q, p, n), info_nce(q, p, jnp.broadcast_to(n, (B, K, D))))
  # With K = 0 the positive is the only class: loss exactly 0.
  assert float(info_nce(q, p, jnp.zeros((0, D)))) == 0.0


def test_info_nce_pytorch_parity_values_and_grads():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  q, p, n = _feats(9, B, D), _feats(10, B, D), _feats(11, B, K, D)
  tq, tp, tn = (torch.tensor(np.asarray(x), requires_grad=True) for x in (q, p, n))
  qn, pn, nn = F.normalize(tq, dim=-1), F.normalize(tp, dim=-1), F.normalize(tn, dim=-1)
  pos = (qn * pn).sum(-1, keepdim=True)
  neg = (qn.unsqueeze(1) @ nn.transpose(-2, -1)).squeeze(1)
  logits = torch.cat([pos, neg], 1) / 0.07
  ref = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
  ref.backward()
  loss, grads = jax.jit(jax.value_and_grad(info_nce, argnums=(0, 1, 2)))(q, p, n)
  _close(loss, ref.item())
  for g, t in zip(grads, (tq, tp, tn)):
    _close(g, t.grad.numpy(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# in_batch_info_nce and clip_loss, single device


@pytest.mark.parametrize("symmetric", [False, True])
def test_in_batch_matches_equation_and_torch(symmetric):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  a, b = _feats(12, B, D), _feats(13, B, D)
  out, grads = jax.jit(jax.value_and_grad(
      lambda a, b: in_batch_info_nce(a, b, temperature=0.1, symmetric=symmetric),
      argnums=(0, 1)))(a, b)
  chex.assert_type(out, jnp.float32)
  _close(out, _np_in_batch(a, b, 10.0, symmetric))
  ta, tb = (torch.tensor(np.asarray(x), requires_grad=True) for x in (a, b))
  s = F.normalize(ta, dim=-1) @ F.normalize(tb, dim=-1).T / 0.1
  labels = torch.arange(B)
  ref = F.cross_entropy(s, labels)
  if symmetric:
    ref = 0.5 * (ref + F.cross_entropy(s.T, labels))
  ref.backward()
  _close(out, ref.item())
  _close(grads[0], ta.grad.numpy(), rtol=1e-4, atol=1e-6)
  _close(grads[1], tb.grad.numpy(), rtol=1e-4, atol=1e-6)


class _TorchClipLoss:
  """open_clip's ClipLoss (single process), re-written: features are normalised by the
  model (F.normalize) and the learnable log-scale is clamped to log(100), then exp-ed."""

  def __init__(self, torch):
    self.torch = torch

  def __call__(self, image_features, text_features, log_scale):
    F = self.torch.nn.functional
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logit_scale = self.torch.clamp(log_scale, max=math.log(100)).exp()
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = self.torch.arange(image_features.shape[0])
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


_clip_value_and_grads = jax.jit(jax.value_and_grad(clip_loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), 1.0, 5.0])
def test_clip_loss_pytorch_open_clip_parity(log_scale):
  torch = pytest.importorskip("torch")
  a, b = _feats(14, B, D), _feats(15, B, D)
  ta, tb = (torch.tensor(np.asarray(x), requires_grad=True) for x in (a, b))
  ts = torch.tensor(log_scale, dtype=torch.float32, requires_grad=True)
  ref = _TorchClipLoss(torch)(ta, tb, ts)
  ref.backward()
  loss, grads = _clip_value_and_grads(a, b, jnp.float32(log_scale))
  _close(loss, ref.item())
  _close(grads[0], ta.grad.numpy(), rtol=1e-4, atol=1e-6)
  _close(grads[1], tb.grad.numpy(), rtol=1e-4, atol=1e-6)
  _close(grads[2], ts.grad.numpy(), rtol=1e-4, atol=1e-6)
  if log_scale > math.log(100):
    assert float(grads[2]) == 0.0
  else:
    assert float(grads[2]) != 0.0


def test_clip_loss_gradient_at_the_clamp_is_torchs():
  # open_clip clamps the parameter in place, so it often sits exactly at log(100): the
  # gradient there must be the full one (torch.clamp's), not half of it.
  torch = pytest.importorskip("torch")
  a, b = _feats(14, B, D), _feats(15, B, D)
  at_max = np.float32(math.log(100))
  ts = torch.tensor(at_max, requires_grad=True)
  _TorchClipLoss(torch)(torch.tensor(np.asarray(a)), torch.tensor(np.asarray(b)),
                        ts).backward()
  g = _clip_value_and_grads(a, b, jnp.float32(at_max))[1][2]
  _close(g, ts.grad.numpy(), rtol=1e-4)
  g_below = _clip_value_and_grads(a, b, jnp.float32(at_max) - 1e-3)[1][2]
  _close(g, g_below, rtol=1e-2)


def test_clip_loss_is_symmetric_in_batch_info_nce_and_clamps():
  a, b = _feats(16, B, D), _feats(17, B, D)
  for s in (0.0, 2.0, math.log(1 / 0.07)):
    _close(clip_loss(a, b, s),
           in_batch_info_nce(a, b, temperature=math.exp(-s), symmetric=True))
  _close(clip_loss(a, b, 7.0), clip_loss(a, b, math.log(100)))
  _close(clip_loss(a, b, 7.0), _np_in_batch(a, b, 100.0, True))
  _close(clip_loss(a, b, 7.0, max_logit_scale=8.0), _np_in_batch(a, b, math.exp(7), True),
         rtol=1e-4)
  # The default is CLIP's initialisation, log(1 / 0.07).
  _close(clip_loss(a, b), in_batch_info_nce(a, b, temperature=0.07, symmetric=True))


def test_zero_vectors_give_finite_loss_and_grads():
  a, b = _feats(18, B, D), _feats(19, B, D)
  a = a.at[0].set(0.0)
  b = b.at[3].set(0.0)
  n = _feats(20, B, K, D).at[1, 2].set(0.0)
  fns = {
      "info_nce": lambda a, b: info_nce(a, b, n),
      "in_batch": lambda a, b: in_batch_info_nce(a, b, symmetric=True),
      "clip": lambda a, b: clip_loss(a, b, 2.0),
  }
  out = jax.jit(lambda a, b: {k: jax.value_and_grad(f, argnums=(0, 1))(a, b)
                              for k, f in fns.items()})(a, b)
  for name, (loss, grads) in out.items():
    assert np.isfinite(loss), name
    for g in grads:
      assert np.all(np.isfinite(g)), name
  # A zero vector's similarities are all 0, so its row's CE is exactly log(B).
  _close(in_batch_info_nce(jnp.zeros((B, D)), b), math.log(B))


@jax.jit
def _in_batch_pair(a, b, scale):
  return (in_batch_info_nce(a, b, symmetric=True),
          in_batch_info_nce(scale * a, b, symmetric=True))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_in_batch_scale_invariant_and_bounded(seed, scale):
  a, b = _feats(seed, B, D), _feats(seed + 1, B, D)
  l1, l2 = _in_batch_pair(a, b, scale)
  _close(l1, l2, rtol=1e-4)
  # Cosine similarities are in [-1, 1], so each row's CE lies in
  # [log(1 + (B - 1) e^{-2/tau}), log(1 + (B - 1) e^{2/tau})].
  tau = 0.07
  assert math.log1p((B - 1) * math.exp(-2 / tau)) - 1e-6 <= float(l1)
  assert float(l1) <= math.log1p((B - 1) * math.exp(2 / tau)) + 1e-4


def test_in_batch_learns_toward_zero_when_aligned():
  # Identical, mutually orthogonal features: the positive dominates, loss ~ 0.
  a = jnp.eye(B, D * 2)
  assert float(in_batch_info_nce(a, a, temperature=0.01)) < 1e-6


def test_bad_arguments():
  a, b = _feats(21, B, D), _feats(22, B, D)
  for t in (0.0, -1.0, float("inf")):
    with pytest.raises(ValueError, match="temperature"):
      in_batch_info_nce(a, b, temperature=t)
    with pytest.raises(ValueError, match="temperature"):
      info_nce(a, b, b, temperature=t)
  with pytest.raises(ValueError, match="`b`"):
    in_batch_info_nce(a, b[:-1])
  with pytest.raises(ValueError, match="`a`"):
    clip_loss(a.astype(jnp.int32), b, 1.0)
  with pytest.raises(ValueError, match="logit_scale"):
    clip_loss(a, b, jnp.ones(2))
  with pytest.raises(ValueError, match="logit_scale"):
    clip_loss(a, b, float("nan"))
  with pytest.raises(ValueError, match="negatives"):
    info_nce(a, b, _feats(23, B + 1, K, D))
  with pytest.raises(ValueError, match="positive"):
    info_nce(a, b[:3], b)
  with pytest.raises(ValueError, match="reduction"):
    info_nce(a, b, b, reduction="avg")
  with pytest.raises(ValueError, match="eps"):
    l2_normalize(a, eps=0.0)


# ---------------------------------------------------------------------------------------
# Global negatives on 8 devices.


def _mesh(shape, names):
  assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 virtual CPU devices"
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _single(fn_name, symmetric):
  if fn_name == "clip":
    return lambda a, b, axis_name=None: clip_loss(a, b, 2.5, axis_name=axis_name)
  return lambda a, b, axis_name=None: in_batch_info_nce(
      a, b, temperature=0.1, symmetric=symmetric, axis_name=axis_name)


# info_nce with symmetric=True: the same gather of both towers as clip's (symmetric), and
# run from outside the shard_map by the tuple-of-axes test below.
@pytest.mark.parametrize("fn_name,symmetric", [("info_nce", False), ("clip", True)])
def test_shard_map_global_negatives_match_single_device(fn_name, symmetric):
  a, b = _feats(24, B, D), _feats(25, B, D)
  fn = _single(fn_name, symmetric)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(a, b)
  mesh = _mesh((8,), ("d",))
  spec = P("d")

  # Gradient taken inside the shard_map, per device.
  inner = jax.jit(jax.shard_map(
      lambda a, b: jax.value_and_grad(
          lambda a, b: fn(a, b, axis_name="d"), argnums=(0, 1))(a, b),
      mesh=mesh, in_specs=(spec, spec), out_specs=(P(), (spec, spec))))
  loss, grads = inner(a, b)
  _close(loss, ref_loss)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)

  # Gradient of the whole sharded computation, from outside.
  outer = jax.shard_map(lambda a, b: fn(a, b, axis_name="d"), mesh=mesh,
                        in_specs=(spec, spec), out_specs=P())
  loss, grads = jax.jit(jax.value_and_grad(outer, argnums=(0, 1)))(a, b)
  _close(loss, ref_loss)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)

  if fn_name == "clip":
    # Without the gather every device sees only its 2 examples: a different (smaller)
    # loss, so the checks above can fail.
    local = jax.jit(jax.shard_map(
        lambda a, b: jax.lax.pmean(fn(a, b), "d"), mesh=mesh, in_specs=(spec, spec),
        out_specs=P()))(a, b)
    assert abs(float(local) - float(ref_loss)) > 0.1


def test_shard_map_over_a_tuple_of_mesh_axes():
  a, b = _feats(26, B, D), _feats(27, B, D)
  fn = _single("info_nce", True)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(a, b)
  mesh = _mesh((2, 4), ("x", "y"))
  spec = P(("x", "y"))
  outer = jax.shard_map(lambda a, b: fn(a, b, axis_name=("x", "y")), mesh=mesh,
                        in_specs=(spec, spec), out_specs=P())
  loss, grads = jax.jit(jax.value_and_grad(outer, argnums=(0, 1)))(a, b)
  _close(loss, ref_loss)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


def _towers(params, x, y):
  return jnp.tanh(x @ params["wa"]), y @ params["wb"]


def test_pmap_global_negatives_match_single_device():
  # The data-parallel recipe: replicated parameters (two towers and CLIP's learnable
  # log-scale), sharded data, gradients pmean-ed.
  params = {"wa": _feats(28, 6, D), "wb": _feats(29, 5, D), "s": jnp.float32(2.5)}
  x, y = _feats(30, B, 6), _feats(31, B, 5)

  def loss_fn(params, x, y, axis_name=None):
    return clip_loss(*_towers(params, x, y), params["s"], axis_name=axis_name)

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(params, x, y)

  def step(params, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, axis_name="d")
    return loss, jax.lax.pmean(grads, "d")

  n = 8
  rep = jax.tree.map(lambda p: jnp.broadcast_to(p, (n,) + p.shape), params)
  loss, grads = jax.pmap(step, axis_name="d")(rep, x.reshape(n, B // n, 6),
                                              y.reshape(n, B // n, 5))
  for i in range(n):
    _close(loss[i], ref_loss)
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[i], grads), ref_grads,
                                rtol=1e-5, atol=1e-6)


def test_contrastive_toy_example_aligns_the_towers(capsys):
  path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "contrastive_toy.py"
  spec = importlib.util.spec_from_file_location("contrastive_toy_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # --sharded: the InfoNCE run is data-parallel over the 8 test devices. (clip_loss's
  # run is the same code with another loss, tested above: left out to save time.)
  res = module.main(["--steps", "40", "--eval-every", "40", "--batch", "64", "--sharded",
                     "--losses", "in_batch_info_nce"])
  assert list(res) == ["in_batch_info_nce"]
  for kind, h in res.items():
    # 512 held-out pairs: chance is 0.2%.
    assert h["accuracy"][0] < 0.05 and h["accuracy"][-1] > 0.15, (kind, h)
    assert h["loss"][-1] < h["loss"][0]
  assert "sharded over 8 devices" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# Numerics of issue 14: tiny losses of well-separated pairs, empty batches.


def _np_exact_row_nll(s, y):
  """float64 -log softmax(s)_y per row, as log1p(sum_{c != y} exp(s_c - s_y)) where the
  positive is the max (float64 lse - s_y would keep only ~1e-14 / loss of the value)."""
  others = np.where(np.arange(s.shape[-1]) == y[:, None], -np.inf,
                    s - s[np.arange(len(y)), y][:, None])
  m = np.maximum(others.max(-1), 0.0)
  rest = np.exp(others - m[:, None]).sum(-1)
  return np.where(m == 0, np.log1p(rest), m + np.log(np.exp(-m) + rest))


def _separated_pairs(b=32, d=64, noise=1.5, seed=0):
  """Unit-norm a_i and b_i = a_i + noise: at logit scale 100 the positive leads every
  negative by ~13 logits, so each row's loss is ~1e-6 (open_clip's well-fit regime)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  a = q[:b]
  return (a.astype(np.float32),
          (a + noise * rng.standard_normal((b, d)) / np.sqrt(d)).astype(np.float32))


def test_tiny_losses_of_well_separated_pairs_keep_relative_precision():
  """open_clip at logit scale 100, B = 32: the loss (~2e-6) within 1e-3 of the float64
  value from the same float32 features (logsumexp - z_pos was 1.2% off here)."""
  a, b = _separated_pairs()
  a64, b64 = _np_normalize(a.astype(np.float64)), _np_normalize(b.astype(np.float64))
  s = 100.0 * a64 @ b64.T
  y = np.arange(len(a))
  a_to_b, b_to_a = _np_exact_row_nll(s, y), _np_exact_row_nll(s.T, y)
  exact_clip = 0.5 * (a_to_b.mean() + b_to_a.mean())
  assert 1e-7 < exact_clip < 1e-5
  np.testing.assert_allclose(float(clip_loss(a, b, math.log(100.0))), exact_clip, rtol=1e-3)
  np.testing.assert_allclose(
      float(in_batch_info_nce(a, b, temperature=0.01)), a_to_b.mean(), rtol=1e-3)
  np.testing.assert_allclose(
      float(in_batch_info_nce(a, b, temperature=0.01, symmetric=True)), exact_clip,
      rtol=1e-3)
  # info_nce: the other rows of b as a shared pool of negatives for query 0.. (row-wise).
  per_row = info_nce(a, b, b[::-1][:8], temperature=0.01, reduction="none")
  neg = 100.0 * a64 @ b64[::-1][:8].T
  exact_rows = _np_exact_row_nll(np.concatenate([np.diag(s)[:, None], neg], 1),
                                 np.zeros(len(a), int))
  np.testing.assert_allclose(np.asarray(per_row), exact_rows, rtol=1e-3)


def test_empty_batch_gives_zero_and_zero_gradient():
  z = jnp.zeros((0, 4))
  for f in (lambda a, b: in_batch_info_nce(a, b),
            lambda a, b: in_batch_info_nce(a, b, symmetric=True),
            lambda a, b: clip_loss(a, b),
            lambda a, b: info_nce(a, b, jnp.zeros((3, 4)) + 1.0),
            lambda a, b: info_nce(a, b, jnp.zeros((0, 2, 4)))):
    loss, grads = jax.value_and_grad(f, (0, 1))(z, z)
    assert float(loss) == 0.0
    chex.assert_trees_all_equal(grads, (z, z))
