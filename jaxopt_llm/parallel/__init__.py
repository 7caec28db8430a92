"""Multi-device and multi-process training: mesh, sharding plan, jit step, pmap step.

Two engines, both generic over a ``loss_fn(params, batch) -> loss`` and any
``optax.GradientTransformation`` (ours, optax's, and compositions such as ``optax.chain``,
``optax.MultiSteps`` and ``optax.inject_hyperparams``):

* **jit + NamedSharding** (``plan_shardings``, ``make_train_step``, ``shard_step``), the
  engine to use. A ``("data", "model")`` mesh; the batch is split over ``"data"``; params and
  optimizer state are laid out by a ``ShardingPlan`` in one of three modes, ``"replicated"``
  (plain data parallelism), ``"zero1"`` (optimizer state split, ZeRO stage 1) and ``"fsdp"``
  (params split too); XLA inserts the collectives.
* **pmap** (``make_pmap_train_step``, ``replicate``, ``unreplicate``, ``split_batch``): the
  classic data-parallel step, gradients averaged by ``lax.pmean``.

Many processes (many hosts, or several processes on one machine over gloo on CPU):
``initialize_distributed`` joins the run, ``launch_local`` starts one on this machine,
``process_local_slice`` cuts each process's rows from a global batch for ``shard_batch``,
``to_host`` brings (possibly cross-process) results back to numpy on every process.

Layout, one concept per module (everything is re-exported here, use ``parallel.X``):

=================  ============================================================================
``mesh``           ``make_mesh``, ``DATA_AXIS``, ``MODEL_AXIS``
``batch``          ``shard_batch``, ``process_local_slice``: the global batch over the data axis
``sharding``       ``MODES``, ``zero_spec``, ``param_shardings``, ``opt_state_shardings``,
                   ``plan_shardings`` / ``ShardingPlan``, ``train_state_shardings``,
                   ``place_params``, ``init_opt_state``, ``bytes_per_device``
``jit_step``       ``make_train_step``, ``shard_step``
``pmap_step``      ``make_pmap_train_step``, ``replicate``, ``unreplicate``, ``split_batch``
``distributed``    ``initialize_distributed``, ``to_host``
``launch``         ``launch_local``
``_common``        the step body both engines share (``gradient_step``), ``leaf_shape``
=================  ============================================================================

Each module's docstring has the details: the layout rule and how the state follows the
params (``sharding``), rounding differences against one device (``jit_step``), averaging
Sophia's Hessian estimate and masked token losses (``pmap_step``), the environment variables
of a multi-process run (``distributed``).

References: JAX "Distributed arrays and automatic parallelization", "Introduction to
parallel programming" and "Multi-process" guides; Rajbhandari et al., "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models" (2020); Zhao et al., "PyTorch FSDP"
(2023).
"""
from jaxopt_llm.parallel.batch import process_local_slice, shard_batch
from jaxopt_llm.parallel.distributed import initialize_distributed, to_host
from jaxopt_llm.parallel.jit_step import make_train_step, shard_step
from jaxopt_llm.parallel.launch import launch_local
from jaxopt_llm.parallel.mesh import DATA_AXIS, MODEL_AXIS, make_mesh
from jaxopt_llm.parallel.pmap_step import (
    make_pmap_train_step, replicate, split_batch, unreplicate)
from jaxopt_llm.parallel.sharding import (
    MODES, ShardingPlan, bytes_per_device, init_opt_state, opt_state_shardings,
    param_shardings, place_params, plan_shardings, train_state_shardings, zero_spec)

__all__ = [
    "DATA_AXIS", "MODEL_AXIS", "MODES", "ShardingPlan",
    "make_mesh", "zero_spec", "param_shardings", "opt_state_shardings", "plan_shardings",
    "train_state_shardings", "shard_batch", "place_params", "init_opt_state", "shard_step",
    "make_train_step", "bytes_per_device",
    "replicate", "unreplicate", "split_batch", "make_pmap_train_step",
    "initialize_distributed", "launch_local", "process_local_slice", "to_host",
]
