"""from_torch.Recorder and replay: the report's numbers, mid-run recordings, files as data."""
import importlib
import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxopt_llm import from_torch  # noqa: E402

O = torch.optim
S = torch.optim.lr_scheduler
STEPS = 30


def _record(ft, tmp_path, *, start=0, steps=STEPS, halve_lr_at=None, name="run.npz"):
  problem = ft.Problem(start + steps, seed=2)
  tp = problem.torch_params()
  opt = O.AdamW(ft.two_groups(tp, lr=3e-3), lr=1e-2, weight_decay=0.1)
  sched = S.LambdaLR(opt, ft.HF["cosine"](5, start + steps))
  problem.torch_steps(tp, opt, sched, 0, start)
  rec = from_torch.Recorder(opt, sched, named_parameters=tp.items(), max_steps=steps)
  for t in range(start, start + steps):
    if halve_lr_at is not None and t == halve_lr_at:
      opt.param_groups[1]["lr"] *= 0.5  # a change the converted schedule does not know
    problem.torch_steps(tp, opt, sched, t, t + 1)
  problem.torch_steps(tp, opt, sched, start + steps, start + steps)  # (no-op)
  assert rec.steps == steps
  path = rec.save(str(tmp_path / name))
  return path, tp


def test_replay_of_a_converted_run_is_within_1e_5(ft, tmp_path):
  path, tp = _record(ft, tmp_path)
  report = from_torch.replay(path)
  assert report.divergence.shape == (STEPS, 2)
  assert report.worst <= 1e-5, str(report)
  assert report.lr_divergence <= 1e-6
  assert report.scheduler == "LambdaLR" and report.optimizer == "AdamW"
  assert report.groups[0] == list(ft.MATRICES)
  text = str(report)
  assert "worst divergence" in text and f"{report.worst:.3e}" in text
  # the file alone is enough: the recorded last parameters are torch's
  with np.load(path, allow_pickle=False) as f:
    names = list(f["names"])
    k = names.index("head.weight")
    np.testing.assert_array_equal(f[f"after/{k}"][-1], tp["head.weight"].detach().numpy())


def test_replay_shows_where_torch_did_something_else(ft, tmp_path):
  # the user halves group 1's lr by hand at step 12: the replay's divergence jumps there,
  # in group 1 only, and the lr comparison says why
  path, _ = _record(ft, tmp_path, halve_lr_at=12)
  report = from_torch.replay(path)
  assert report.divergence[:12, 1].max() <= 1e-5
  assert report.divergence[12:, 1].max() > 1e-4
  assert report.divergence[:, 0].max() <= 1e-5
  assert report.lr_divergence > 0.5


def test_recording_started_mid_run(ft, tmp_path):
  path, _ = _record(ft, tmp_path, start=20, steps=15)
  report = from_torch.replay(path)
  assert report.start_position == 20 and report.steps == 15
  assert report.worst <= 1e-5, str(report)


def test_missing_gradient_is_flagged(ft, tmp_path):
  problem = ft.Problem(3)
  tp = problem.torch_params()
  opt = O.SGD(list(tp.values()), lr=0.1)
  rec = from_torch.Recorder(opt, named_parameters=tp.items(), max_steps=2)
  for _ in range(3):
    for k, p in tp.items():
      p.grad = None if k == "norm.weight" else torch.ones_like(p)
    opt.step()
  assert rec.steps == 2  # max_steps
  report = from_torch.replay(rec.save(str(tmp_path / "r.npz")))
  assert report.missing_grad == ["norm.weight"]
  assert "no gradient" in str(report)
  assert report.worst <= 1e-6  # plain SGD: a zero gradient is no step either way


def test_pickled_object_in_a_replay_file_is_refused(ft, tmp_path):
  path, _ = _record(ft, tmp_path, steps=3)
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  arrays["evil"] = np.array([{"__reduce__": "os.system"}], dtype=object)  # a pickle
  bad = tmp_path / "bad.npz"
  np.savez(bad, **arrays)
  with pytest.raises(ValueError, match="'evil' is a pickled Python object.*refused"):
    from_torch.replay(str(bad))


def test_not_a_replay_file(tmp_path):
  np.savez(tmp_path / "x.npz", a=np.zeros(3))
  with pytest.raises(ValueError, match="not a jaxopt_llm.replay/1 file"):
    from_torch.replay(str(tmp_path / "x.npz"))
  (tmp_path / "y.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a replay .npz"):
    from_torch.replay(str(tmp_path / "y.npz"))


def test_spec_in_the_file_is_json(ft, tmp_path):
  path, _ = _record(ft, tmp_path, steps=6)
  with np.load(path, allow_pickle=False) as f:
    spec = json.loads(str(f["spec"]))
    assert str(f["format"]) == importlib.import_module("jaxopt_llm.from_torch.replay").FORMAT
  assert spec["optimizer"] == "AdamW"
  assert spec["scheduler"]["lambdas"][0]["hf"] == "_get_cosine_schedule_with_warmup_lr_lambda"
  # a warmup (5) longer than the run (4) has no closed form here: tabulated, and said so
  path, _ = _record(ft, tmp_path, steps=4, name="short.npz")
  report = from_torch.replay(path)
  assert "tabulated over 4 steps" in str(report) and report.worst <= 1e-5


def test_save_never_replaces_an_earlier_recording_unless_asked(ft, tmp_path):
  path, _ = _record(ft, tmp_path, name="run.npz")
  before = open(path, "rb").read()
  tp = ft.Problem(1).torch_params()
  opt = O.SGD(list(tp.values()), lr=0.1)
  rec = from_torch.Recorder(opt)
  for p in tp.values():
    p.grad = torch.ones_like(p)
  opt.step()
  for target in (path, path[:-len(".npz")]):  # np.savez appends .npz to a bare name
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
      rec.save(target)
  assert open(path, "rb").read() == before
  assert rec.save(path, overwrite=True) == path and open(path, "rb").read() != before


def test_save_before_any_step_is_an_error(ft, tmp_path):
  tp = ft.Problem(1).torch_params()
  opt = O.SGD(list(tp.values()), lr=0.1)
  rec = from_torch.Recorder(opt)
  with pytest.raises(ValueError, match="nothing recorded"):
    rec.save(str(tmp_path / "r.npz"))
  with pytest.raises(ValueError, match="max_steps"):
    from_torch.Recorder(opt, max_steps=0)
  with pytest.raises(NotImplementedError, match="ReduceLROnPlateau.*metrics"):
    from_torch.Recorder(opt, S.ReduceLROnPlateau(opt))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="no matplotlib")
def test_plot_writes_a_png(ft, tmp_path):
  path, _ = _record(ft, tmp_path, steps=6)
  out = from_torch.replay(path).plot(str(tmp_path / "div.png"))
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
