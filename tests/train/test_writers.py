"""writers: metrics.jsonl + TensorBoard events (read back with TensorBoard's own reader),
W&B (a fake module, and the real one offline), config.json, the progress lines."""
import glob
import hashlib
import io
import json
import os
import sys
import time
import types

import jax
import numpy as np
import pytest

from jaxopt_llm.train import writers
from jaxopt_llm.train.config import TrainConfig

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def train_rec(step, loss):
  return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3 * step,
          "grad_norm": 0.5 + step, "skipped_nonfinite": 0, "tokens": 64 * step,
          "param_norm": 10.0 + step, "state_norm/mu": 0.25 * step}


def eval_rec(step, loss):
  return {"kind": "eval", "step": step, "val_loss": loss, "val_ppl": float(np.exp(loss)),
          "val_acc": 0.125 * step}


def read_events(out_dir) -> dict[str, list[tuple[int, float]]]:
  acc = event_accumulator.EventAccumulator(str(out_dir))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_records_go_to_metrics_jsonl_and_tensorboard_event_files(tmp_path):
  cfg = TrainConfig(steps=4)
  recs = [eval_rec(0, 5.5), train_rec(1, 5.0), train_rec(2, 4.0), eval_rec(2, 4.25),
          {"kind": "summary", "step": 2, "val_loss": 4.25, "optimizer": "adamw",
           "sample": "The end", "unigram_entropy": 3.0}]
  with writers.MetricWriter(str(tmp_path), cfg, plot=False) as w:
    for r in recs:
      w.write(r)
  assert read_jsonl(tmp_path / "metrics.jsonl") == recs == w.history
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  ev = read_events(tmp_path)
  f32 = lambda x: float(np.float32(x))  # TensorBoard stores float32  # noqa: E731
  assert ev["train/loss"] == [(1, 5.0), (2, 4.0)]
  assert ev["train/lr"] == [(1, f32(1e-3)), (2, f32(2e-3))]
  assert ev["train/grad_norm"] == [(1, 1.5), (2, 2.5)]
  assert ev["train/param_norm"] == [(1, 11.0), (2, 12.0)]
  assert ev["train/state_norm/mu"] == [(1, 0.25), (2, 0.5)]
  assert ev["train/tokens"] == [(1, 64.0), (2, 128.0)]
  assert ev["val/loss"] == [(0, 5.5), (2, 4.25)]
  assert ev["val/ppl"] == [(0, f32(np.exp(5.5))), (2, f32(np.exp(4.25)))]
  assert ev["val/acc"] == [(0, 0.0), (2, 0.25)]
  assert ev["summary/val_loss"] == [(2, 4.25)]
  assert not any("optimizer" in t or "sample" in t for t in ev)  # strings are not scalars


def test_no_tensorboard_writes_only_the_jsonl_and_out_dir_none_writes_nothing(tmp_path):
  with writers.MetricWriter(str(tmp_path / "a"), TrainConfig(tensorboard=False)) as w:
    w.write(train_rec(1, 3.0))
  assert os.listdir(tmp_path / "a") == ["metrics.jsonl"]
  with writers.MetricWriter(None, TrainConfig()) as w:
    w.write(train_rec(1, 3.0))
  assert w.history == [train_rec(1, 3.0)]
  assert os.listdir(tmp_path) == ["a"]


def test_resume_keeps_the_records_up_to_the_checkpoint_and_purges_later_events(tmp_path):
  cfg = TrainConfig(steps=6)
  with writers.MetricWriter(str(tmp_path), cfg, plot=False) as w:
    for s in range(1, 6):  # killed after step 5; the checkpoint is at step 3
      w.write(train_rec(s, 10.0 - s))
    w.write(eval_rec(4, 7.0))
  with writers.MetricWriter(str(tmp_path), cfg, resume=True, resume_step=3, plot=False) as w:
    assert [r["step"] for r in w.history] == [1, 2, 3]
    for s in range(4, 7):  # the resumed run writes steps 4.. again, other numbers
      w.write(train_rec(s, 100.0 + s))
  steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4, 5, 6]
  ev = read_events(tmp_path)
  assert ev["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0),
                              (6, 106.0)]
  assert ev.get("val/loss", []) == []  # step 4's eval came after the checkpoint: purged
  with pytest.raises(ValueError, match="resume_step"):
    writers.MetricWriter(str(tmp_path), cfg, resume=True)


def test_tensorboard_without_tensorboardx_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(ImportError, match=r"jaxopt_llm\[train\].*--no-tensorboard"):
    writers.MetricWriter(str(tmp_path), TrainConfig())


def test_resume_reads_a_metrics_file_whose_last_line_was_cut(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps(train_rec(1, 2.0)) + "\n" + '{"kind": "tr')
  with writers.MetricWriter(str(tmp_path), TrainConfig(tensorboard=False), resume=True,
                            resume_step=5) as w:
    assert w.history == [train_rec(1, 2.0)]
  assert read_jsonl(path) == [train_rec(1, 2.0)]


class FakeRun:
  def __init__(self, **init):
    self.init, self.logged, self.summary, self.finished = init, [], {}, False

  def log(self, values, step):
    self.logged.append((step, dict(values)))

  def finish(self):
    self.finished = True


def fake_wandb(monkeypatch):
  runs = []

  def init(**kw):
    runs.append(FakeRun(**kw))
    return runs[-1]

  mod = types.SimpleNamespace(init=init)
  monkeypatch.setitem(sys.modules, "wandb", mod)
  return runs


def test_wandb_gets_the_same_scalars_and_resumes_its_run(tmp_path, monkeypatch):
  runs = fake_wandb(monkeypatch)
  cfg = TrainConfig(wandb=True, tensorboard=False)
  notes = []
  with writers.MetricWriter(str(tmp_path), cfg, log=notes.append, plot=False) as w:
    w.write(train_rec(1, 5.0))
    w.write(eval_rec(1, 4.5))
    w.write({"kind": "summary", "step": 1, "val_loss": 4.5, "sample": "hi"})
  run = runs[0]
  assert run.finished and run.init["dir"] == str(tmp_path) and run.init["resume"] == "allow"
  assert run.init["config"]["config"] == cfg.to_dict()
  assert run.logged[0] == (1, writers.scalars(train_rec(1, 5.0)))
  assert run.logged[1] == (1, {"val/loss": 4.5, "val/ppl": float(np.exp(4.5)),
                               "val/acc": 0.125})
  assert run.summary["val_loss"] == 4.5 and run.summary["sample"] == "hi"
  assert (tmp_path / "wandb_run_id").read_text().strip() == run.init["id"]
  assert len(notes) == 1 and "wandb" in notes[0]
  with writers.MetricWriter(str(tmp_path), cfg, resume=True, resume_step=1, plot=False):
    pass
  assert runs[1].init["id"] == run.init["id"]  # the same W&B run continues
  with writers.MetricWriter(str(tmp_path), cfg, plot=False):
    pass
  assert runs[2].init["id"] != run.init["id"]  # a fresh run is a new W&B run


def test_wandb_missing_or_failing_is_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)
  with pytest.raises(ValueError, match=r"pip install 'jaxopt_llm\[wandb\]'"):
    writers.MetricWriter(str(tmp_path), TrainConfig(wandb=True))

  def init(**kw):
    raise RuntimeError("api_key not configured (no-tty).\nCall wandb.login()")

  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
  with pytest.raises(ValueError, match="api_key not configured.*WANDB_MODE=offline") as e:
    writers.MetricWriter(str(tmp_path), TrainConfig(wandb=True))
  assert "\n" not in str(e.value)


def test_real_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  with writers.MetricWriter(str(tmp_path), TrainConfig(wandb=True, tensorboard=False),
                            plot=False) as w:
    w.write(train_rec(1, 5.0))
    w.write(eval_rec(1, 4.5))
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  files = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
  assert len(files) == 1
  keys = (b"train/loss", b"train/grad_norm", b"val/loss", b"val/acc")
  for _ in range(300):  # W&B's service process may still be writing the records after finish()
    raw = open(files[0], "rb").read()  # protobuf records: the keys are stored verbatim
    if all(k in raw for k in keys):
      break
    time.sleep(0.1)
  for key in keys:
    assert key in raw, key


def test_config_json_is_the_resolved_config_with_versions_and_data_checksums(tmp_path):
  text = tmp_path / "my.txt"
  text.write_bytes(b"hello world\n" * 100)
  cfg = TrainConfig(data=str(text), steps=50, n_layer=1)
  path = writers.write_run_config(str(tmp_path / "run"), cfg)
  saved = json.load(open(path))
  assert TrainConfig(**saved["config"]) == cfg
  assert writers.read_run_config(str(tmp_path / "run")) == cfg.to_dict()
  r = saved["resolved"]
  assert r["peak_lr"] == 1e-2 and r["weight_decay"] == 0.1  # AdamW's recipe
  assert r["warmup_steps"] == 5  # steps // 10
  assert r["model"]["n_layer"] == 1 and r["model"]["vocab_size"] == 256
  assert r["fused_ce"] is False
  assert saved["versions"]["jax"] == jax.__version__
  assert saved["versions"]["jaxopt_llm"]
  assert saved["devices"]["count"] == jax.device_count()
  (entry,) = saved["data"]["files"]
  assert entry["path"] == str(text) and entry["bytes"] == 1200
  assert entry["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
  assert saved["data"]["tokenizer"] is None and saved["resumed_at_step"] is None
  assert not glob.glob(str(tmp_path / "run" / "*.tmp.*"))  # written atomically


def test_progress_lines_every_tenth_of_the_run_and_at_the_end():
  lines, now = [], [0.0]
  p = writers.ProgressLines(100, 20, lines.append, clock=lambda: now[0])
  assert p.every == 8  # a tenth of the 80 steps left
  for i in range(80):
    now[0] += 20.0 if i == 0 else 0.5  # the first step compiles: not part of the rate
    p.set_postfix(loss=f"{3 - i / 100:.3f}", refresh=False)
    p.update(1)
  assert len(lines) == 10
  assert lines[0] == "step 28/100 (28%)  loss 2.930  |  2 steps/s, 36 s left"
  assert lines[-1] == "step 100/100 (100%)  loss 2.210  |  2 steps/s"
  p.write("step 100: val loss 2.0")
  assert lines[-1] == "step 100: val loss 2.0"


def test_progress_lines_also_every_interval_seconds():
  lines, now = [], [0.0]
  p = writers.ProgressLines(1000, 0, lines.append, interval_s=30.0, clock=lambda: now[0])
  for _ in range(10):
    now[0] += 40.0  # a slow model: 40 s per step
    p.update(1)
  assert len(lines) == 10 and lines[0] == "step 1/1000 (0%)"  # no rate from one step
  assert lines[1] == "step 2/1000 (0%)  |  0.025 steps/s, 11 h 05 min left"


class Stream(io.StringIO):
  def __init__(self, tty):
    super().__init__()
    self.tty = tty

  def isatty(self):
    return self.tty


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
  lines = []
  bar = writers.progress(10, 0, True, lines.append, stream=Stream(True), out=Stream(True))
  assert type(bar).__name__ == "tqdm" or "tqdm" in type(bar).__module__
  bar.close()
  for err_tty, out_tty in ((False, True), (True, False), (False, False)):
    plain = writers.progress(10, 0, True, lines.append, stream=Stream(err_tty),
                             out=Stream(out_tty))  # `> run.log`, `2> err.log`, both
    assert isinstance(plain, writers.ProgressLines)
  quiet = writers.progress(10, 0, False, lines.append, stream=Stream(True), out=Stream(True))
  quiet.update(10)
  quiet.write("eval line")
  assert lines == ["eval line"]  # --no-progress: no bar, no lines; evals still logged
  done = writers.progress(10, 10, True, lines.append, stream=Stream(False), out=Stream(False))
  assert not isinstance(done, writers.ProgressLines)  # nothing left to do
