"""Move a PyTorch training to JAX: a ``torch.optim`` optimizer and scheduler as optax, their
state both ways, and a gradient-replay parity report on your own run.

* ``optimizer(torch_optimizer, scheduler=None, *, named_parameters=None)``: one
  ``optax.GradientTransformation`` over ``{name: array}`` (param groups become an
  ``optax.multi_transform``; ``optimizers.py``).
* ``params(model.named_parameters())``: that dict, from the torch tensors.
* ``opt_state(torch_optimizer, tx, params)`` / ``to_torch_state(state, torch_optimizer)``:
  the optimizer state (moments, step counts, scheduler position) both ways (``state.py``).
* ``Recorder(torch_optimizer)`` saves N steps of a real torch run (gradients, parameters
  after each step, learning rates) to one ``.npz``; ``replay(path)`` (or ``jaxopt-llm
  parity --replay run.npz``) feeds the same gradients through the converted optimizer and
  reports the divergence per step and param group (``replay.py``).

torch is imported only where a torch object is read or written; ``replay`` of a saved file
needs numpy only. Files are data: ``np.load(..., allow_pickle=False)``.
"""
from jaxopt_llm.from_torch.optimizers import build, describe, optimizer, params
from jaxopt_llm.from_torch.replay import Recorder, ReplayReport, replay
from jaxopt_llm.from_torch.state import opt_state, to_torch_state

__all__ = ["optimizer", "params", "opt_state", "to_torch_state", "Recorder", "replay",
           "ReplayReport", "describe", "build"]
