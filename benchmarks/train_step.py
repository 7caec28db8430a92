"""The default ``jaxopt-llm train`` step against the same model in plain PyTorch eager.

    python benchmarks/train_step.py                 # 3 interleaved rounds of 40 steps per side
    python benchmarks/train_step.py --variants      # + where the time goes (JAX variants)
    python benchmarks/train_step.py --rounds 5 --steps 40 --variants

Ours: ``prog = build_program(TrainConfig()); state = prog.init(0)``, then
``state, metrics = prog.step(state, batch)`` with the batch placed as the trainer places it,
and, every ``log_every`` steps, what the trainer does on a logging step (metrics to the host,
the jitted monitors). Default config: 'nano' GPT (2 layers, 2 heads, d=64, context 64, tied
head, byte vocabulary 256), batch 32x64, AdamW (betas (0.9, 0.95), eps 1e-8, weight decay 0.1
on matrices only) after ``clip_by_global_norm(1.0)``, warmup-cosine lr (peak 1e-2, warmup 60
of 600 steps, down to 1e-3), the loss-spike / non-finite guard on.

PyTorch: nanoGPT's ``model.py``/``train.py`` loop for the same architecture (pre-LN blocks,
fused QKV ``Linear(d, 3d)``, ``F.scaled_dot_product_attention(is_causal=True)``, tanh GELU
(``jax.nn.gelu``'s default), LayerNorm eps 1e-5 with bias, learned positions, head tied to the
token embedding) loaded with *our* initial parameters (the first losses are checked equal),
``torch.optim.AdamW(fused=True)`` with the decay / no-decay groups, the same lr schedule set on
the param groups every step, ``clip_grad_norm_(1.0)``, ``zero_grad(set_to_none=True)``, and
``loss.item()`` only on logging steps (as nanoGPT). ``torch.set_num_threads(2)``.

Timing: both sides train on the same batches (``train.data.BatchIterator``, seed 0); a round
is ``--steps`` steps timed from the first dispatch until the result is on the host; the sides
(and the variants) run interleaved, round after round, after one warm-up round each, and each
reports the *best* round's mean step time (the least disturbed by other processes), in wall
time and in CPU time of the process (``time.process_time``: all threads). Ratios are within
this run. On a shared machine read the CPU column too: torch's two OpenMP threads stall at
every barrier when another process holds a core (its wall time then varies 5-20x from round
to round), while the CPU time measures the work done.

``--variants`` also times:

* ``minimal``: one ``jax.jit`` step, ``value_and_grad`` + ``optax.chain(clip_by_global_norm,
  optim.adamw)`` + ``apply_updates``, params and state donated, the loss as the only output;
* ``+ monitors every step``: the same + grad norm, param norm and state norms every step;
* ``+ guard``: the same wrapped in ``optim.guards.skip_spikes`` (the trainer's guard, a
  ``lax.cond``), or a non-finite guard applied with ``jnp.where`` selects instead;
* ``no donation``; ``3-D matmuls``: the model with ``model.rows`` undone (the products on
  ``[B, T, d]``, as before issue 12); ``attention = ...``: other attention implementations
  (``ATTENTION_VARIANTS``, swapped in for ``model.causal_attention`` while tracing);
* torch with 1 thread (robust to the machine's load).

Findings (figures in ``benchmarks/RESULTS.md``; ``jax.profiler.trace`` of the loss's
``value_and_grad``, read with ``jax.profiler.ProfileData``, pinned to one core): the step is
the model's forward (~8.5 ms CPU) and backward (~38 ms); the optimizer, clip, guard and
monitors are < 1 ms together. In the backward, the weight gradients ``x^T dy`` are plain
(non-YNNPACK) dots with a transposed operand, ~1.2 ms each for a [256, 64] result; and with
YNN reduction fusions on (XLA:CPU's default in jax 0.10.2) the neighbouring dots and
elementwise fusions (GELU, softmax) run ~1.5-3x slower than with them off, although each
reduction alone is faster under YNN: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce``
cuts the whole step by ~30%.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_llm import losses, optim, schedules
from jaxopt_llm.train import TrainConfig, build_program
from jaxopt_llm.train import data as corpus_data
from jaxopt_llm.train import model as model_lib
from jaxopt_llm.train import monitors

# TrainConfig() defaults, spelled out for the hand-written variants and the torch side (checked
# against the config below where the config says them).
PEAK_LR, WARMUP, TOTAL, MIN_LR = 1e-2, 60, 600, 1e-3
BETAS, EPS, WEIGHT_DECAY, CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0


def load(args) -> tuple[TrainConfig, list[np.ndarray]]:
  cfg = TrainConfig()
  assert (cfg.steps, cfg.clip, cfg.batch_size, cfg.block_size) == (TOTAL, CLIP, 32, 64), cfg
  train_ids, _ = corpus_data.train_val_split(corpus_data.encode(corpus_data.load_corpus()))
  it = corpus_data.BatchIterator(train_ids, cfg.batch_size, cfg.block_size, seed=0)
  # Warm-up round + timed rounds, each on its own batches, the same for both sides.
  n = args.steps * (args.rounds + 1)
  return cfg, [np.asarray(next(it), np.int32) for _ in range(n)]


def schedule() -> optax.Schedule:
  return schedules.warmup_cosine(PEAK_LR, WARMUP, TOTAL, min_lr=MIN_LR)


def optimizer() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(CLIP),
                     optim.adamw(schedule(), b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                 weight_decay=WEIGHT_DECAY, mask=optim.weight_decay_mask))


# --------------------------------------------------------------------------------------------
# Our side


def trainer_side(cfg: TrainConfig, log_every: int):
  """``prog.step`` as the trainer's loop drives it, with its logging-step work."""
  prog = build_program(cfg)
  state = prog.init(0)
  put = getattr(prog, "put_batch", jax.device_put)
  monitor = getattr(prog, "monitor", None) or jax.jit(
      lambda s: monitors.monitor(s.params, s.opt_state))
  holder = {"state": state}

  def run(batches) -> tuple[float, float]:
    state = holder["state"]
    t0, c0 = time.perf_counter(), time.process_time()
    window = []
    for i, batch in enumerate(batches):
      state, m = prog.step(state, put(batch))
      window.append(m)
      if (i + 1) % log_every == 0:
        jax.device_get(window)
        window = []
        jax.device_get(monitor(state))
    jax.block_until_ready(state)
    holder["state"] = state
    return time.perf_counter() - t0, time.process_time() - c0

  return run, prog


def _attention_xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


# Attention implementations the variants swap in for ``model.causal_attention``.
ATTENTION_VARIANTS = {
    "jax.nn.dot_product_attention": _attention_xla,
}


@contextlib.contextmanager
def patched(name: str, value):
  """Traces the model with ``model.<name>`` replaced (benchmark-only monkeypatch)."""
  saved = getattr(model_lib, name)
  setattr(model_lib, name, value)
  try:
    yield
  finally:
    setattr(model_lib, name, saved)


def initial_params(mcfg: model_lib.GPTConfig) -> dict:
  return nnx.to_pure_dict(nnx.state(nnx.jit(lambda: model_lib.GPT(mcfg, nnx.Rngs(0)))()))


def minimal_side(mcfg: model_lib.GPTConfig, *, monitor: bool = False, guard: str | None = None,
                 attention: str | None = None, matmul_3d: bool = False, donate: bool = True,
                 log_every: int = 10):
  """The minimal jitted step (+ optional monitors / guard / model variant)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.GPT(mcfg, nnx.Rngs(0))))
  tx = optimizer()
  if guard == "skip_spikes":
    from jaxopt_llm.optim import guards
    tx = guards.skip_spikes(tx)

  def loss_fn(params, tokens):
    with contextlib.ExitStack() as stack:
      if attention:
        stack.enter_context(patched("causal_attention", ATTENTION_VARIANTS[attention]))
      if matmul_3d:
        stack.enter_context(patched("rows", lambda layer, x: layer(x)))
      return losses.causal_lm_loss(nnx.merge(graphdef, params)(tokens), tokens)

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    out = {"loss": loss}
    if guard == "skip_spikes":
      updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
      params = optax.apply_updates(params, updates)
    elif guard == "select":
      # The same decision as skip_spikes' non-finite test, applied with selects, no cond.
      accept = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
      updates, new_opt = tx.update(grads, opt_state, params)
      params, opt_state = jax.tree.map(lambda a, b: jnp.where(accept, a, b),
                                       (optax.apply_updates(params, updates), new_opt),
                                       (params, opt_state))
    else:
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    if monitor:
      out["grad_norm"] = monitors.global_norm(grads)
      out.update(monitors.monitor(params, opt_state))
    return params, opt_state, out

  jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  # Under jit, every leaf of the initial state is its own buffer, as donation needs.
  holder = {"s": jax.jit(lambda p: (p, tx.init(p)))(initial_params(mcfg))}

  def run(batches) -> tuple[float, float]:
    params, opt_state = holder["s"]
    t0, c0 = time.perf_counter(), time.process_time()
    window = []
    for i, batch in enumerate(batches):
      params, opt_state, out = jitted(params, opt_state, jax.device_put(batch))
      window.append(out)
      if (i + 1) % log_every == 0:
        jax.device_get(window)
        window = []
    jax.block_until_ready((params, opt_state))
    holder["s"] = (params, opt_state)
    return time.perf_counter() - t0, time.process_time() - c0

  return run


# --------------------------------------------------------------------------------------------
# PyTorch side (nanoGPT)


def torch_side(mcfg: model_lib.GPTConfig, params: dict, log_every: int, first_batch,
               threads: int = 2):
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  torch.set_num_threads(threads)
  d, nh = mcfg.d_model, mcfg.n_head

  class Attention(tnn.Module):
    def __init__(self):
      super().__init__()
      self.c_attn = tnn.Linear(d, 3 * d)
      self.c_proj = tnn.Linear(d, d)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.c_attn(x).split(d, dim=2)
      q, k, v = (z.view(b, t, nh, d // nh).transpose(1, 2) for z in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1 = tnn.LayerNorm(d, eps=1e-5)
      self.attn = Attention()
      self.ln_2 = tnn.LayerNorm(d, eps=1e-5)
      self.c_fc = tnn.Linear(d, mcfg.mlp_ratio * d)
      self.c_proj = tnn.Linear(mcfg.mlp_ratio * d, d)

    def forward(self, x):
      x = x + self.attn(self.ln_1(x))
      return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

  class GPT(tnn.Module):
    def __init__(self):
      super().__init__()
      self.wte = tnn.Embedding(mcfg.vocab_size, d)
      self.wpe = tnn.Embedding(mcfg.block_size, d)
      self.h = tnn.ModuleList([Block() for _ in range(mcfg.n_layer)])
      self.ln_f = tnn.LayerNorm(d, eps=1e-5)

    def forward(self, idx):
      pos = torch.arange(idx.shape[1])
      x = self.wte(idx) + self.wpe(pos)
      for block in self.h:
        x = block(x)
      logits = self.ln_f(x) @ self.wte.weight.T  # tied head
      return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             idx[:, 1:].reshape(-1))

  model = GPT()
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
  with torch.no_grad():
    model.wte.weight.copy_(t(params["wte"]["embedding"]))
    model.wpe.weight.copy_(t(params["wpe"]["embedding"]))
    model.ln_f.weight.copy_(t(params["ln_f"]["scale"]))
    model.ln_f.bias.copy_(t(params["ln_f"]["bias"]))
    for i, blk in enumerate(model.h):
      p = params["blocks"][i]
      for ours, theirs in ((p["ln1"], blk.ln_1), (p["ln2"], blk.ln_2)):
        theirs.weight.copy_(t(ours["scale"]))
        theirs.bias.copy_(t(ours["bias"]))
      for ours, theirs in ((p["attn"]["qkv"], blk.attn.c_attn),
                           (p["attn"]["proj"], blk.attn.c_proj),
                           (p["mlp"]["fc"], blk.c_fc), (p["mlp"]["proj"], blk.c_proj)):
        theirs.weight.copy_(t(ours["kernel"]).T)
        theirs.bias.copy_(t(ours["bias"]))
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=PEAK_LR, betas=BETAS, eps=EPS, fused=True)
  # The schedule as Python floats up front: nanoGPT's get_lr is plain math, not a jax call.
  lrs = [float(v) for v in jax.jit(jax.vmap(schedule()))(jnp.arange(TOTAL + 1))]
  holder = {"it": 0}
  with torch.no_grad():
    first_loss = float(model(torch.from_numpy(first_batch).long()))

  def run(batches) -> tuple[float, float]:
    torch.set_num_threads(threads)  # process-wide: another torch side may have changed it
    t0, c0 = time.perf_counter(), time.process_time()
    for i, batch in enumerate(batches):
      lr = lrs[min(holder["it"], TOTAL)]
      for g in opt.param_groups:
        g["lr"] = lr
      loss = model(torch.from_numpy(batch).long())
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
      opt.step()
      opt.zero_grad(set_to_none=True)
      holder["it"] += 1
      if (i + 1) % log_every == 0:
        loss.item()
    return time.perf_counter() - t0, time.process_time() - c0

  return run, first_loss


# --------------------------------------------------------------------------------------------


TRAINER, TORCH, MINIMAL = "ours: prog.step (trainer)", "torch eager (nanoGPT)", "minimal"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--variants", action="store_true", help="also time our variants")
  parser.add_argument("--only", default=None,
                      help="comma-separated substrings: run only the sides whose name has one")
  parser.add_argument("--torch-threads", type=int, default=2)
  args = parser.parse_args(argv)

  cfg, batches = load(args)
  mcfg = cfg.model_config()
  log_every = cfg.log_every
  print(f"# {platform.platform()}; jax {jax.__version__} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
  print(f"# model {mcfg}; batch {cfg.batch_size}x{cfg.block_size}; {args.rounds} rounds x "
        f"{args.steps} steps, log every {log_every}", flush=True)

  makers: dict[str, Callable] = {
      TRAINER: lambda: trainer_side(cfg, log_every)[0],
      TORCH: lambda: make_torch(args.torch_threads, mcfg, log_every, batches[0]),
  }
  if args.variants:
    variants = {
        MINIMAL: {},
        "minimal + monitors every step": dict(monitor=True),
        "minimal + guard (optim.guards.skip_spikes, lax.cond)": dict(guard="skip_spikes"),
        "minimal + non-finite guard as jnp.where selects": dict(guard="select"),
        "minimal, no donation": dict(donate=False),
        "minimal, 3-D matmuls (model before rows())": dict(matmul_3d=True),
        **{f"minimal, attention = {name}": dict(attention=name) for name in ATTENTION_VARIANTS},
    }
    for name, kw in variants.items():
      makers[name] = functools.partial(minimal_side, mcfg, log_every=log_every, **kw)
    makers["torch eager (nanoGPT), 1 thread"] = functools.partial(
        make_torch, 1, mcfg, log_every, batches[0])
  if args.only:
    keep = [s.strip() for s in args.only.split(",")]
    makers = {k: v for k, v in makers.items() if any(s in k for s in keep)}
  sides = {name: make() for name, make in makers.items()}

  n = args.steps
  wall: dict[str, list[float]] = {k: [] for k in sides}
  cpu: dict[str, list[float]] = {k: [] for k in sides}
  for run in sides.values():  # warm-up round: compilation, first touch
    run(batches[:n])
  loads = []
  for r in range(args.rounds):
    chunk = batches[(r + 1) * n:(r + 2) * n]
    for name, run in sides.items():
      w, c = run(chunk)
      wall[name].append(w / n * 1e3)
      cpu[name].append(c / n * 1e3)
    loads.append(os.getloadavg()[0])
    print(f"# round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in wall.items())
          + f" ms; load {loads[-1]:.2f}", flush=True)

  def ratio(table, name, ref):
    return f"{min(table[name]) / min(table[ref]):.2f}x" if ref in table else ""

  print()
  print("| step | wall ms/step (best round) | rounds | CPU ms/step (best round) | wall vs "
        "torch | wall vs minimal | CPU vs minimal |")
  print("|---|---|---|---|---|---|---|")
  for name in sides:
    print(f"| {name} | {min(wall[name]):.1f} | {', '.join(f'{t:.1f}' for t in wall[name])} "
          f"| {min(cpu[name]):.1f} | {ratio(wall, name, TORCH)} | {ratio(wall, name, MINIMAL)} "
          f"| {ratio(cpu, name, MINIMAL)} |")
  if TRAINER in wall and TORCH in wall:
    print(f"\nratio ours/torch = {min(wall[TRAINER]) / min(wall[TORCH]):.2f}x wall "
          f"(goal <= 0.80x); load average during the rounds "
          f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")


def make_torch(threads, mcfg, log_every, first_batch):
  import torch
  mcfg_params = initial_params(mcfg)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.GPT(mcfg, nnx.Rngs(0))))
  ours = float(jax.jit(lambda p, x: losses.causal_lm_loss(nnx.merge(graphdef, p)(x), x))(
      mcfg_params, first_batch))
  run, theirs = torch_side(mcfg, mcfg_params, log_every, first_batch, threads)
  print(f"# first loss: ours {ours:.6f}, torch {theirs:.6f} (same initial parameters); torch "
        f"{torch.__version__}, {threads} thread(s)", flush=True)
  if not abs(ours - theirs) < 1e-4 * abs(ours):
    raise SystemExit("the torch model does not compute our model's loss")
  return run


if __name__ == "__main__":
  sys.exit(main())
