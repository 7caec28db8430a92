"""The ``jaxopt-llm`` command: every subcommand end to end with tiny settings, bad arguments."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from jaxopt_llm import cli

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


def test_parity_without_torch_is_a_clear_error(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  assert cli.main(["parity"]) == 2
  err = capsys.readouterr().err
  assert "needs PyTorch" in err and "Traceback" not in err


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
