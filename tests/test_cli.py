"""The ``jaxopt-llm`` command: every subcommand end to end with tiny settings, bad arguments."""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from jaxopt_llm import cli

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")

TINY = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--block-size", "16",
        "--batch-size", "4", "--eval-windows", "4", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 5000


def records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_train_writes_metrics_curve_and_summary_then_resumes(tmp_path, capsys):
  out = str(tmp_path / "run")
  rc = cli.main(["train", "--steps", "4", "--eval-every", "2", "--log-every", "1",
                 "--sample-tokens", "12", "--sample-prompt", "def ", "--out", out, *TINY])
  assert rc == 0
  text = capsys.readouterr().out
  for needle in ("val loss", "unigram entropy", "perplexity", "token accuracy", "sample",
                 "'def ", "wrote"):
    assert needle in text, needle
  recs = records(os.path.join(out, "metrics.jsonl"))
  train = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for key in ("loss", "lr", "grad_norm", "param_norm", "state_norm/mu", "state_norm/nu"):
    assert key in train[-1], key
  assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 2, 4]
  summary = recs[-1]
  assert summary["kind"] == "summary" and summary["step"] == 4
  assert summary["val_ppl"] == pytest.approx(2.718281828 ** summary["val_loss"], rel=1e-6)
  assert is_png(os.path.join(out, "loss_curve.png"))
  assert os.path.isdir(os.path.join(out, "checkpoints", "4"))
  # config.json beside the metrics; TensorBoard's reader finds the same numbers
  saved = json.load(open(os.path.join(out, "config.json")))
  assert saved["config"]["steps"] == 4 and saved["versions"]["jax"]
  acc = event_accumulator.EventAccumulator(out)
  acc.Reload()
  for tag, kind, key in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                         ("train/grad_norm", "train", "grad_norm"),
                         ("val/loss", "eval", "val_loss"), ("val/acc", "eval", "val_acc")):
    logged = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in recs if r["kind"] == kind]
    assert [(e.step, e.value) for e in acc.Scalars(tag)] == logged, tag
  # `sample` continues a prompt with the run's checkpoint
  assert cli.main(["sample", out, "--prompt", "def ", "--tokens", "12", "--seed", "1"]) == 0
  captured = capsys.readouterr()
  assert captured.out.startswith("def ") and len(captured.out) > len("def \n")
  assert "checkpoint of step 4" in captured.err
  # resuming a finished run: nothing left to train, the same final numbers
  rc = cli.main(["train", "--steps", "4", "--resume", "--sample-tokens", "0", "--out", out,
                 *TINY])
  assert rc == 0
  assert "resuming at step 4" in capsys.readouterr().out
  again = records(os.path.join(out, "metrics.jsonl"))
  assert again[-1]["val_loss"] == summary["val_loss"]
  assert [r["step"] for r in again if r["kind"] == "eval"] == [0, 2, 4]  # none duplicated


def test_compare_prints_a_table_and_draws_all_curves(tmp_path, capsys):
  names = "adamw,sophia"
  out = str(tmp_path / "cmp")
  rc = cli.main(["compare", "--optimizers", names, "--steps", "4", "--eval-every", "0",
                 "--sample-tokens", "0", "--out", out, *TINY])
  assert rc == 0
  text = capsys.readouterr().out
  lines = [ln for ln in text.splitlines() if ln.split() and ln.split()[0] in names.split(",")]
  assert len(lines) == 2, text
  assert "val loss" in text and "vs unigram" in text
  assert is_png(os.path.join(out, "compare.png"))
  rows = json.load(open(os.path.join(out, "compare.json")))
  assert [r["optimizer"] for r in rows] == names.split(",")
  for n in names.split(","):
    assert os.path.exists(os.path.join(out, n, "metrics.jsonl"))


def test_schedule_plots_and_prints_the_values(tmp_path, capsys):
  png = str(tmp_path / "s" / "wc.png")
  rc = cli.main(["schedule", "warmup_cosine", "--warmup-steps", "1000", "--steps", "10000",
                 "--lr", "1e-4", "--out", png])
  assert rc == 0
  text = capsys.readouterr().out
  rows = {int(ln.split()[0]): float(ln.split()[1]) for ln in text.splitlines()
          if ln.strip() and ln.split()[0].isdigit()}
  assert rows[0] == 0.0 and rows[500] == pytest.approx(5e-5) and rows[1000] == pytest.approx(1e-4)
  assert rows[10000] == pytest.approx(0.0, abs=1e-12)
  assert is_png(png)
  for name in ("wsd", "inverse_sqrt", "step_decay", "exponential_lr", "cosine_annealing"):
    assert cli.main(["schedule", name, "--steps", "100", "--warmup-steps", "10",
                     "--out", str(tmp_path / f"{name}.png")]) == 0, name


def test_parity_runs_the_table(monkeypatch, capsys):
  pytest.importorskip("torch")
  from jaxopt_llm.parity import optimizers as po
  every = po.cases()
  monkeypatch.setattr(po, "cases", lambda: {k: every[k] for k in ("adamw", "lion")})
  assert cli.main(["parity", "--steps", "5"]) == 0
  text = capsys.readouterr().out
  assert "adamw" in text and "lion" in text and "worst" in text


MISSING = [
    (["parity"], "torch", "jaxopt_llm[torch]"),
    (["train"], "flax", "jaxopt_llm[train]"),
    (["train"], "orbax.checkpoint", "orbax-checkpoint"),
    (["train"], "tqdm", "jaxopt_llm[train]"),
    (["train"], "tensorboardX", "--no-tensorboard"),
    (["train", "--wandb"], "wandb", "jaxopt_llm[wandb]"),
    (["train", "--tokenizer", "tok.json"], "tokenizers", "jaxopt_llm[train]"),
    (["compare"], "flax", "jaxopt_llm[train]"),
    (["sample", "somewhere"], "flax", "jaxopt_llm[train]"),
    (["schedule", "wsd"], "matplotlib", "jaxopt_llm[plots]"),
]


@pytest.mark.parametrize("argv,module,needle", MISSING,
                         ids=[f"{a[0]}-{m}" for a, m, _ in MISSING])
def test_a_missing_extra_is_one_line_naming_the_pip_install(argv, module, needle, monkeypatch,
                                                            capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == module else real(name, *a))
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not installed" in err and needle in err, err
  assert "Traceback" not in err


def test_the_extras_check_follows_the_flags(monkeypatch, capsys):
  real = importlib.util.find_spec
  gone = {"tensorboardX", "wandb", "matplotlib"}
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in gone else real(name, *a))
  # without TensorBoard, W&B or a tokenizer the train extra's core suffices: the error is
  # the next one, the bad --steps
  assert cli.main(["train", "--no-tensorboard", "--steps", "0"]) == 2
  assert "--steps" in capsys.readouterr().err
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  assert cli.main(["parity"]) == 2
  assert "jaxopt_llm[torch]" in capsys.readouterr().err


def test_a_run_without_matplotlib_trains_and_skips_the_png_in_one_line(tmp_path, monkeypatch,
                                                                       capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  out = tmp_path / "run"
  with_progress = [a for a in TINY if a != "--no-progress"]
  assert cli.main(["train", "--steps", "4", "--eval-every", "0", "--sample-tokens", "0",
                   "--out", str(out), *with_progress]) == 0
  text = capsys.readouterr().out
  skipped = [ln for ln in text.splitlines() if "not installed" in ln]
  assert len(skipped) == 1 and "jaxopt_llm[plots]" in skipped[0], text
  assert not (out / "loss_curve.png").exists() and (out / "metrics.jsonl").exists()
  # stdout is not a terminal here: progress lines instead of a bar
  progress = [ln for ln in text.splitlines() if re.match(r"step \d+/4 \(\d+%\)", ln)]
  assert [ln.split()[1] for ln in progress] == ["1/4", "2/4", "3/4", "4/4"], text


BAD = [
    ([], "required"),
    (["fly"], "invalid choice"),
    (["train", "--steps", "0"], "--steps"),
    (["train", "--steps", "ten"], "--steps"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--optimizer", "adamx"], "--optimizer"),
    (["train", "--schedule", "linear"], "--schedule"),
    (["train", "--steps", "10", "--warmup-steps", "50"], "--warmup-steps"),
    (["train", "--n-head", "3"], "--d-model"),
    (["train", "--shard", "zero3"], "--shard"),
    (["train", "--num-processes", "2"], "--num-processes"),
    (["train", "--layers", "2"], "unrecognized"),  # the flags are the config's field names
    (["train", "--fused-ce", "maybe"], "--fused-ce"),
    (["train", "--bogus"], "unrecognized"),
    (["compare", "--optimizers", "adamw,nope"], "nope"),
    (["compare", "--optimizers", "adamw", "--lrs", "adamw=fast"], "--lrs"),
    (["schedule", "cosine"], "invalid choice"),
    (["schedule", "wsd", "--warmup-steps", "900", "--decay-steps", "200", "--steps", "1000"],
     "exceed"),
    (["schedule", "wsd", "--decay-type", "exp"], "--decay-type"),
    (["schedule", "warmup_cosine", "--warmup-steps", "2000", "--steps", "1000"],
     "--warmup-steps"),
    (["parity", "--tol", "0"], "--tol"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) or "<none>" for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line_and_no_traceback(argv, needle, capsys):
  try:
    rc = cli.main(argv)
  except SystemExit as e:
    rc = e.code
  assert rc == 2
  captured = capsys.readouterr()
  err = [ln for ln in captured.err.splitlines() if ln.strip()]
  assert len(err) == 1, captured.err
  assert err[0].startswith("jaxopt-llm") and "error:" in err[0] and needle in err[0], err[0]
  assert "Traceback" not in captured.err + captured.out


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
  assert cli.main(["train", "--resume", "--out", str(tmp_path / "none"), *TINY]) == 2
  assert "no checkpoints" in capsys.readouterr().err


def one_error_line(capsys, needle):
  captured = capsys.readouterr()
  err = [ln for ln in captured.err.splitlines() if ln.strip()]
  assert len(err) == 1 and needle in err[0], captured.err
  assert "Traceback" not in captured.err + captured.out
  return err[0]


def test_bad_paths_are_one_line(tmp_path, capsys):
  a_file = tmp_path / "f.txt"
  a_file.write_text("not a folder")
  earlier = tmp_path / "earlier"
  os.makedirs(earlier / "lion")
  (earlier / "lion" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
  cases = [
      (["train", "--out", str(earlier / "lion")], "--overwrite"),
      (["compare", "--optimizers", "adamw,lion", "--out", str(earlier)], "--overwrite"),
      (["train", "--out", str(a_file)], "is a file, not a folder"),
      (["train", "--out", str(a_file / "run")], "is a file"),
      (["compare", "--out", str(a_file)], "is a file, not a folder"),
      (["schedule", "wsd", "--out", str(tmp_path)], "is a folder"),
      (["schedule", "wsd", "--out", str(a_file / "x.png")], "is a file"),
      (["train", "--resume", "--overwrite", "--out", str(tmp_path)], "exclude each other"),
      (["sample", str(tmp_path / "nothing")], "does not exist"),
      (["sample", str(a_file)], "not a folder"),
      (["sample", str(tmp_path)], "not a run folder"),
      (["sample", str(tmp_path), "--temperature", "0"], "--temperature"),
      (["sample", str(tmp_path), "--top-k", "0"], "--top-k"),
      (["sample", str(tmp_path), "--tokens", "-1"], "--tokens"),
      (["sample", str(tmp_path), "--temperature", "warm"], "--temperature"),
  ]
  for argv, needle in cases:
    try:
      rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
      rc = e.code
    assert rc == 2, argv
    one_error_line(capsys, needle)
  assert a_file.read_text() == "not a folder"
  assert os.listdir(earlier) == ["lion"]  # refused before anything was trained or written


def test_debug_shows_the_traceback_and_an_unforeseen_failure_is_one_line(tmp_path, capsys,
                                                                         monkeypatch):
  a_file = tmp_path / "f.txt"
  a_file.write_text("x")
  monkeypatch.setenv("JAXOPT_LLM_DEBUG", "1")
  with pytest.raises(ValueError, match="is a file"):
    cli.main(["train", "--out", str(a_file)])
  monkeypatch.delenv("JAXOPT_LLM_DEBUG")

  def broken(args):
    raise RuntimeError("something\nunexpected")

  monkeypatch.setitem(cli._RUN, "schedule", broken)
  assert cli.main(["schedule", "wsd"]) == 1
  line = one_error_line(capsys, "RuntimeError: something unexpected")
  assert "JAXOPT_LLM_DEBUG=1" in line


def _console_script() -> str:
  path = pathlib.Path(sys.executable).with_name("jaxopt-llm")
  return str(path) if path.exists() else shutil.which("jaxopt-llm")


def test_console_script_runs_and_reports_bad_arguments(tmp_path):
  exe = _console_script()
  if exe is None:
    pytest.skip("the jaxopt-llm console script is not installed (pip install -e .)")
  png = tmp_path / "c.png"
  ok = subprocess.run([exe, "schedule", "constant_with_warmup", "--warmup-steps", "2",
                       "--steps", "20", "--out", str(png)], capture_output=True, text=True,
                      timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "wrote" in ok.stdout and is_png(png)
  bad = subprocess.run([exe, "train", "--steps", "-3"], capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().count("\n") == 0 and "--steps" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_train_flags_are_the_config_fields_and_schedule_needs_no_flax(tmp_path):
  import dataclasses
  from jaxopt_llm.train.config import TrainConfig
  flags = {a.option_strings[0] for a in cli._build_parser("train")._subparsers._group_actions[0]
           .choices["train"]._actions if a.option_strings}
  for f in dataclasses.fields(TrainConfig):
    assert "--" + f.name.replace("_", "-") in flags, f.name
  code = ("import sys; from jaxopt_llm import cli; "
          "rc = cli.main(['schedule', 'wsd', '--steps', '500', '--out', sys.argv[1]]); "
          "assert 'flax' not in sys.modules and 'orbax' not in sys.modules; sys.exit(rc)")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.png")],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr


def test_help_texts_are_the_field_comments_without_section_headings():
  helps = cli._field_help()
  assert helps["tied_head"] == "output matrix = the token embedding, transposed"
  assert helps["hessian_every"] == "Sophia: Hessian estimate every k optimizer steps"
  # A comment continued on the next line belongs to its field.
  assert helps["gamma"].endswith("(default: reaches min lr at the end) factor")


def _replay_file(tmp_path, steps=4):
  """A tiny from_torch.Recorder recording: AdamW, two param groups, a LambdaLR."""
  torch = pytest.importorskip("torch")
  from jaxopt_llm import from_torch
  gen = torch.Generator().manual_seed(0)
  w = torch.randn(4, 3, generator=gen, requires_grad=True)
  b = torch.randn(3, generator=gen, requires_grad=True)
  opt = torch.optim.AdamW([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=1e-2)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 0.9 ** n)
  rec = from_torch.Recorder(opt, sched, named_parameters={"w": w, "b": b}, max_steps=steps)
  for _ in range(steps):
    w.grad, b.grad = torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)
    opt.step()
    sched.step()
  return rec.save(str(tmp_path / "run.npz"))


def test_parity_replay_reports_and_plots(tmp_path, capsys):
  path = _replay_file(tmp_path)
  png = tmp_path / "div.png"
  argv = ["parity", "--replay", path]
  if importlib.util.find_spec("matplotlib") is not None:
    argv += ["--out", str(png)]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "replay of torch.optim.AdamW + LambdaLR: 4 steps" in out and "ok: worst" in out
  if "--out" in argv:
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_parity_replay_needs_no_torch_and_fails_over_tol(tmp_path, monkeypatch, capsys):
  path = _replay_file(tmp_path)
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  assert cli.main(["parity", "--replay", path, "--tol", "1e-30"]) == 1
  assert "FAIL: worst" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["parity", "--replay", "nowhere.npz"], "--replay: 'nowhere.npz' is not a file"),
    (["parity", "--out", "x.png"], "--out goes with --replay"),
])
def test_parity_replay_bad_arguments_are_one_line(argv, needle, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_parity_replay_refuses_a_pickle_in_one_line(tmp_path, capsys):
  import numpy as np
  bad = tmp_path / "bad.npz"
  np.savez(bad, format=np.array("jaxopt_llm.replay/1"), x=np.array([object()], dtype=object))
  assert cli.main(["parity", "--replay", str(bad)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "pickled Python object" in err
