"""from_torch.optimizer: torch optimizers with 2-3 param groups x schedulers, 200 steps, vs
torch; options honoured or refused; params()."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxopt_llm import from_torch  # noqa: E402
from jaxopt_llm.from_torch import optimizers as ft_optimizers  # noqa: E402

O = torch.optim
S = torch.optim.lr_scheduler
STEPS = 200  # (the schedules of conftest's CASES are written for 200 steps)


# The others (in conftest's CASES) run in test_state.py, converted mid-run.
CASE_NAMES = ["adamw_2groups_hf_cosine", "adam_3groups_amsgrad_l2_steplr",
              "sgd_nesterov_2groups_multisteplr", "adagrad_tabulated_lambda",
              "sgd_onecycle_momentum", "adamw_onecycle_beta1_three_phase",
              "nadam_decoupled_cyclic_exp_range", "radam_sequential", "adamax_chained"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_torch_for_200_steps(name, ft, problem200):
  make, tol = ft.CASES[name]
  tp = problem200.torch_params()
  opt, sched = make(tp)
  tx = from_torch.optimizer(opt, sched, named_parameters=tp.items(), steps=STEPS)
  params = from_torch.params(tp.items())
  ours, _ = problem200.jax_steps(tx, params, tx.init(params), 0, STEPS)
  problem200.torch_steps(tp, opt, sched, 0, STEPS)
  err = problem200.rel(ours, tp)
  assert err <= tol, err
  # the run moved: a conversion that did nothing would not pass by accident
  moved = problem200.rel(params, tp)
  assert moved > 100 * tol, moved


def test_muon_matrices_bf16_newton_schulz(ft):
  # torch's Muon takes 2-D parameters only; it runs Newton-Schulz in bfloat16, hence the
  # issue's 5e-4 after 100 steps.
  shapes = {"a.weight": (8, 6), "b.weight": (6, 10)}
  problem = ft.Problem(100, seed=3, shapes=shapes)
  tp = problem.torch_params()
  opt = O.Muon([{"params": [tp["a.weight"]]}, {"params": [tp["b.weight"]], "lr": 5e-3,
                                                "adjust_lr_fn": "match_rms_adamw"}],
               lr=1e-2, weight_decay=0.05)
  sched = S.StepLR(opt, 25, 0.5)
  tx = from_torch.optimizer(opt, sched, named_parameters=tp.items())
  params = from_torch.params(tp.items())
  ours, _ = problem.jax_steps(tx, params, tx.init(params), 0, 100)
  problem.torch_steps(tp, opt, sched, 0, 100)
  assert problem.rel(ours, tp) <= 5e-4


def test_hf_cosine_is_recognised_not_tabulated(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.AdamW(ft.two_groups(tp), lr=1e-3)
  spec = from_torch.describe(opt, S.LambdaLR(opt, ft.HF["cosine"](10, 100)))
  lam = spec["scheduler"]["lambdas"]
  assert [x.get("hf") for x in lam] == ["_get_cosine_schedule_with_warmup_lr_lambda"] * 2
  assert lam[0]["kwargs"] == {"num_warmup_steps": 10, "num_training_steps": 100,
                              "num_cycles": 0.5}


def test_param_groups_become_a_partition_with_group_names(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.AdamW(ft.three_groups(tp), lr=1e-3)
  spec = from_torch.describe(opt, named_parameters=tp.items())
  assert [g["names"] for g in spec["groups"]] == [
      ["embed.weight", "block.weight"], ["block.bias", "norm.weight"], ["head.weight"]]
  assert spec["groups"][1]["hyper"]["weight_decay"] == 0.0
  assert spec["groups"][0]["hyper"]["weight_decay"] == 0.01
  # without names: "group{i}.{j}"
  plain = from_torch.describe(opt, named_parameters=None)
  assert plain["groups"][2]["names"] == ["group2.0"]
  assert set(from_torch.params(opt)) == {"group0.0", "group0.1", "group1.0", "group1.1",
                                         "group2.0"}


def test_parameter_outside_the_optimizer_is_left_unchanged(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.SGD([tp["embed.weight"]], lr=0.1)
  tx = from_torch.optimizer(opt, named_parameters=tp.items())
  params = from_torch.params(tp.items())
  grads = {k: jnp.ones_like(v) for k, v in params.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.max(jnp.abs(updates["head.weight"]))) == 0.0
  np.testing.assert_allclose(np.asarray(updates["embed.weight"]), -0.1, rtol=1e-6)


def test_params_keeps_dtypes_and_copies():
  w = torch.randn(3, 4, dtype=torch.bfloat16)
  b = torch.randn(4, dtype=torch.float64)
  out = from_torch.params({"w": w, "b": b})
  assert out["w"].dtype == jnp.bfloat16
  assert out["b"].dtype == (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), w.float().numpy())


@pytest.mark.parametrize("flag", ["foreach", "capturable", "differentiable"])
def test_flags_that_change_no_number_are_ignored(flag, ft):
  tp = ft.Problem(1).torch_params()
  opt = O.Adam(list(tp.values()), lr=1e-3, **{flag: flag != "foreach"})
  spec = from_torch.describe(opt)
  assert flag not in spec["groups"][0]["hyper"]


def test_lbfgs_and_sparse_adam_are_refused_naming_why(ft):
  tp = ft.Problem(1).torch_params()
  with pytest.raises(NotImplementedError, match="LBFGS.*closure"):
    from_torch.optimizer(O.LBFGS(list(tp.values())))
  with pytest.raises(NotImplementedError, match="SparseAdam.*sparse"):
    from_torch.optimizer(O.SparseAdam(list(tp.values())))


def test_custom_optimizer_subclass_is_refused(ft):
  class MyAdam(O.Adam):
    pass

  tp = ft.Problem(1).torch_params()
  with pytest.raises(TypeError, match="MyAdam.*custom Optimizer subclass"):
    from_torch.optimizer(MyAdam(list(tp.values())))
  with pytest.raises(TypeError, match="`optimizer` must be a torch.optim optimizer"):
    from_torch.optimizer(object())


def test_unknown_lambda_needs_steps_and_scheduler_must_match(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.SGD(list(tp.values()), lr=0.1)
  sched = S.LambdaLR(opt, lambda n: 1.0 / (n + 1))
  with pytest.raises(ValueError, match="pass `steps`"):
    from_torch.optimizer(opt, sched)
  other = O.SGD(list(tp.values()), lr=0.1)
  with pytest.raises(ValueError, match="not built on this `optimizer`"):
    from_torch.optimizer(other, sched, steps=10)


def test_plateau_on_a_step_not_linear_in_lr_and_custom_cyclic_scale_fn_are_refused(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.Rprop(list(tp.values()), lr=0.1)
  with pytest.raises(NotImplementedError, match="ReduceLROnPlateau with torch.optim.Rprop"):
    from_torch.optimizer(opt, S.ReduceLROnPlateau(opt))
  opt = O.SGD(list(tp.values()), lr=0.1, momentum=0.9)
  with pytest.raises(NotImplementedError, match="scale_fn"):
    from_torch.optimizer(opt, S.CyclicLR(opt, 0.01, 0.1, scale_fn=lambda x: 1.0))


def test_unnamed_parameter_is_an_error(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.SGD(list(tp.values()), lr=0.1)
  with pytest.raises(ValueError, match="parameter 0 of param group 0.*not in"):
    from_torch.optimizer(opt, named_parameters=[("x", torch.zeros(1))])


def test_registry_has_every_torch_optimizer():
  names = {n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
           and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
           and n != "Optimizer"}
  covered = set(ft_optimizers.REGISTRY) | set(ft_optimizers.UNSUPPORTED)
  assert names <= covered, names - covered
