"""from_torch.opt_state / to_torch_state: a run converted mid-way continues on torch's
trajectory, both ways."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import optax  # noqa: E402

from jaxopt_llm import from_torch  # noqa: E402

O = torch.optim
S = torch.optim.lr_scheduler
HALF = 50

MID_RUN = ["adamw_onecycle_beta1_three_phase", "sgd_nesterov_2groups_multisteplr",
           "rmsprop_centered_momentum_linearlr", "adam_maximize_cosine_annealing",
           "nadam_decoupled_cyclic_exp_range", "adadelta_polynomiallr", "asgd_warm_restarts",
           "rprop_2groups", "adafactor_multiplicative", "adagrad_tabulated_lambda"]


@pytest.mark.parametrize("name", MID_RUN)
def test_torch_run_continues_in_jax_after_50_steps(name, ft, problem200):
  make, tol = ft.CASES[name]
  tp = problem200.torch_params()
  opt, sched = make(tp)
  problem200.torch_steps(tp, opt, sched, 0, HALF)
  tx = from_torch.optimizer(opt, sched, named_parameters=tp.items(), steps=200)
  params = from_torch.params(tp.items())
  state = from_torch.opt_state(opt, tx, params, scheduler=sched, named_parameters=tp.items())
  ours, _ = problem200.jax_steps(tx, params, state, HALF, 2 * HALF)
  problem200.torch_steps(tp, opt, sched, HALF, 2 * HALF)
  assert problem200.rel(ours, tp) <= tol
  assert problem200.rel(params, tp) > 100 * tol  # the last 50 steps moved the parameters


@pytest.mark.parametrize("name", ["adamw_2groups_hf_cosine", "sgd_onecycle_momentum",
                                  "nadam_decoupled_cyclic_exp_range", "asgd_warm_restarts",
                                  "adafactor_multiplicative"])
def test_jax_run_continues_in_torch(name, ft, problem200):
  make, tol = ft.CASES[name]
  # reference: torch alone for 100 steps
  ref = problem200.torch_params()
  opt, sched = make(ref)
  problem200.torch_steps(ref, opt, sched, 0, 2 * HALF)
  # JAX for 50 steps from the start, then a fresh torch optimizer takes over
  tp = problem200.torch_params()
  opt, sched = make(tp)
  tx = from_torch.optimizer(opt, sched, named_parameters=tp.items(), steps=200)
  params = from_torch.params(tp.items())
  params, state = problem200.jax_steps(tx, params, tx.init(params), 0, HALF)
  from_torch.to_torch_state(state, opt, sched, params=params, named_parameters=tp.items())
  problem200.torch_steps(tp, opt, sched, HALF, 2 * HALF)
  assert problem200.rel({k: p.detach().numpy() for k, p in tp.items()}, ref) <= tol


def test_state_fields_hold_torch_values(ft):
  problem = ft.Problem(5)
  tp = problem.torch_params()
  opt = O.Adam(ft.two_groups(tp), lr=1e-2, amsgrad=True)
  problem.torch_steps(tp, opt, None, 0, 5)
  tx = from_torch.optimizer(opt, named_parameters=tp.items())
  state = from_torch.opt_state(opt, tx, from_torch.params(tp.items()),
                               named_parameters=tp.items())
  adam = state.inner_states["group1"].inner_state[0]
  assert int(adam.count) == 5
  np.testing.assert_array_equal(np.asarray(adam.mu["norm.weight"]),
                                opt.state[tp["norm.weight"]]["exp_avg"].numpy())
  np.testing.assert_array_equal(np.asarray(adam.nu_max["block.bias"]),
                                opt.state[tp["block.bias"]]["max_exp_avg_sq"].numpy())
  # the other group's parameters are not this group's business
  assert isinstance(adam.mu["embed.weight"], optax.MaskedNode)


def test_fresh_optimizer_gives_the_initial_state(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.AdamW(ft.two_groups(tp), lr=1e-3)
  sched = S.StepLR(opt, 10)
  tx = from_torch.optimizer(opt, sched, named_parameters=tp.items())
  params = from_torch.params(tp.items())
  state = from_torch.opt_state(opt, tx, params, scheduler=sched, named_parameters=tp.items())
  flat_a = [np.asarray(x) for x in jax.tree.leaves(state)]
  flat_b = [np.asarray(x) for x in jax.tree.leaves(tx.init(params))]
  assert len(flat_a) == len(flat_b)
  for a, b in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b)


def test_state_mismatch_is_an_error_naming_it(ft):
  problem = ft.Problem(2)
  tp = problem.torch_params()
  opt = O.Adam(list(tp.values()), lr=1e-2)
  problem.torch_steps(tp, opt, None, 0, 2)
  tx = from_torch.optimizer(opt, named_parameters=tp.items())
  params = from_torch.params(tp.items())
  opt.state[tp["block.bias"]]["surprise"] = torch.zeros(1)
  with pytest.raises(NotImplementedError, match="surprise.*no field"):
    from_torch.opt_state(opt, tx, params, named_parameters=tp.items())
  del opt.state[tp["block.bias"]]["surprise"]
  opt.state[tp["block.bias"]]["exp_avg"] = torch.zeros(7)
  with pytest.raises(ValueError, match="exp_avg.*block.bias.*shape"):
    from_torch.opt_state(opt, tx, params, named_parameters=tp.items())
  with pytest.raises(TypeError, match="from_torch.optimizer"):
    from_torch.to_torch_state(optax.EmptyState(), opt)


def test_to_torch_state_refuses_a_scheduler_ahead_of_the_state(ft):
  tp = ft.Problem(1).torch_params()
  opt = O.SGD(list(tp.values()), lr=0.1, momentum=0.9)
  sched = S.StepLR(opt, 5)
  tx = from_torch.optimizer(opt, sched)
  params = from_torch.params(opt)
  state = tx.init(params)
  opt.step()
  sched.step()
  with pytest.raises(ValueError, match="at step 1, past the state's 0"):
    from_torch.to_torch_state(state, opt, sched)


def _metric(t):
  return 1.0 if t % 4 else 0.5 ** (t // 20)  # plateaus, with an improvement now and then


def _plateau_run(ft, problem, tp, start, stop, opt, sched):
  for t in range(start, stop):
    with torch.no_grad():
      for k, p in tp.items():
        p.grad = torch.from_numpy(problem.noise[k][t]) + 0.1 * p.detach()
    opt.step()
    sched.step(_metric(t))


def _plateau_make(ft, tp):
  opt = O.AdamW(ft.two_groups(tp, lr=3e-3), lr=1e-2)
  return opt, S.ReduceLROnPlateau(opt, patience=2, factor=0.5, cooldown=1,
                                  min_lr=[0.0, 2e-3])


def _jax_plateau(tx, params, state, problem, start, stop):
  update = jax.jit(tx.update)
  for t in range(start, stop):
    g = {k: problem.noise[k][t] + 0.1 * params[k] for k in params}
    u, state = update(g, state, params, value=_metric(t))
    params = optax.apply_updates(params, u)
  return params, state


def test_reduce_lr_on_plateau_both_ways(ft):
  # torch's ReduceLROnPlateau becomes schedules.reduce_lr_on_plateau after each group's
  # twin, fed the metric as update(..., value=metric); its counters convert both ways
  problem = ft.Problem(60)
  ref = problem.torch_params()
  opt, sched = _plateau_make(ft, ref)
  _plateau_run(ft, problem, ref, 0, 60, opt, sched)
  assert opt.param_groups[0]["lr"] < 1e-4  # it did reduce, several times
  # torch 20 steps -> JAX 40 steps
  tp = problem.torch_params()
  opt, sched = _plateau_make(ft, tp)
  _plateau_run(ft, problem, tp, 0, 20, opt, sched)
  tx = from_torch.optimizer(opt, sched, named_parameters=tp.items())
  params = from_torch.params(tp.items())
  state = from_torch.opt_state(opt, tx, params, scheduler=sched, named_parameters=tp.items())
  params, _ = _jax_plateau(tx, params, state, problem, 20, 60)
  assert problem.rel(params, ref) <= 1e-5
  # JAX 20 steps -> torch 40 steps
  tp = problem.torch_params()
  opt, sched = _plateau_make(ft, tp)
  tx = from_torch.optimizer(opt, sched, named_parameters=tp.items())
  params = from_torch.params(tp.items())
  params, state = _jax_plateau(tx, params, tx.init(params), problem, 0, 20)
  from_torch.to_torch_state(state, opt, sched, params=params, named_parameters=tp.items())
  _plateau_run(ft, problem, tp, 20, 60, opt, sched)
  assert problem.rel({k: p.detach().numpy() for k, p in tp.items()}, ref) <= 1e-5
