"""Optimizers as ``optax.GradientTransformation`` chains with PyTorch / official semantics.

Where each piece lives:

* ``transforms``: each optimizer's per-leaf formula (``adam_leaf``, ``lion_leaf``,
  ``sophia_leaf``, ...) and the ``scale_by_*`` building blocks that map it over a pytree.
* ``aliases``: the named optimizers (``adamw``, ``lion``, ``sophia``, ...), short
  ``optax.chain``s of those blocks; ``learning_rate`` first, as in optax.
* ``adam_variants``: torch.optim's NAdam, RAdam and Adamax (``nadam``, ``radam``,
  ``adamax``, their ``scale_by_*`` blocks and states, whose fields name torch's state keys).
* ``classic``: torch.optim's Adadelta, ASGD and Rprop (``adadelta``, ``asgd``, ``rprop``,
  their ``scale_by_*`` blocks and states, whose fields name torch's state keys;
  ``asgd_averaged_params``).
* ``factored``: torch.optim.Adafactor's rule (``adafactor``, ``scale_by_adafactor``), not
  optax.adafactor's.
* ``orthogonalized``: torch.optim.Muon (``muon``, ``scale_by_muon``, ``newton_schulz``, its bfloat16
  roundings included) for 2-D parameters, and ``muon_with_adamw`` / ``muon_labels`` for the
  rest of a model (AdamW).
* ``fused``: ``update_and_apply``, the copy-free whole step, calling the same per-leaf
  formulas in one ordered pass; ``state_bytes``.
* ``hessian``: Sophia's Hessian-diagonal estimators, ``update_every_k`` and monitors.
* ``numerics``: arithmetic shared by all of them (dtype policy, EMA, saturating storage,
  and the one rule for integer/bool parameter leaves: never changed, no state).
* ``guards``: ``skip_spikes``, a wrapper that skips an update on a non-finite or spiking loss.
"""
from jaxopt_llm.optim.aliases import (
    adagrad,
    adam,
    adam_l2,
    adamw,
    lion,
    momentum,
    rmsprop,
    sgd,
    sophia,
    weight_decay_mask,
)
from jaxopt_llm.optim.adam_variants import (
    ScaleByAdamaxState,
    ScaleByNadamState,
    ScaleByRadamState,
    adamax,
    nadam,
    radam,
    scale_by_adamax,
    scale_by_nadam,
    scale_by_radam,
)
from jaxopt_llm.optim.classic import (
    ScaleByAdadeltaState,
    ScaleByAsgdState,
    ScaleByRpropState,
    adadelta,
    asgd,
    asgd_averaged_params,
    rprop,
    scale_by_adadelta,
    scale_by_asgd,
    scale_by_rprop,
)
from jaxopt_llm.optim.factored import ScaleByAdafactorState, adafactor, scale_by_adafactor
from jaxopt_llm.optim.orthogonalized import (
    ScaleByAdjustedLearningRateState,
    ScaleByMuonState,
    muon,
    muon_labels,
    muon_with_adamw,
    newton_schulz,
    scale_by_adjusted_learning_rate,
    scale_by_muon,
)
from jaxopt_llm.optim.fused import is_fused, state_bytes, update_and_apply
from jaxopt_llm.optim.transforms import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByLionState,
    ScaleByMomentumState,
    ScaleByRmspropState,
    ScaleBySophiaState,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_lion,
    scale_by_momentum,
    scale_by_rmsprop,
    scale_by_sophia,
)
from jaxopt_llm.optim import guards
from jaxopt_llm.optim.guards import SkipSpikesState, skip_spikes
# Sophia's estimators, every-k helper and monitors (module: jaxopt_llm.optim.hessian).
from jaxopt_llm.optim import hessian
from jaxopt_llm.optim.hessian import (
    gauss_newton_bartlett,
    gauss_newton_bartlett_fused,
    hutchinson,
    is_estimate_step,
    sophia_hessian_norm,
    sophia_hessian_rejected,
    sophia_win_rate,
    update_every_k,
)

__all__ = [
    "is_fused", "state_bytes", "update_and_apply",
    "adagrad", "adam", "adam_l2", "adamw", "lion", "momentum", "rmsprop", "sgd",
    "weight_decay_mask",
    "scale_by_adagrad", "scale_by_adam", "scale_by_lion", "scale_by_momentum",
    "scale_by_rmsprop",
    "ScaleByAdagradState", "ScaleByAdamState", "ScaleByLionState", "ScaleByMomentumState",
    "ScaleByRmspropState",
    # torch's Adam variants (adam_variants.py)
    "nadam", "radam", "adamax", "scale_by_nadam", "scale_by_radam", "scale_by_adamax",
    "ScaleByNadamState", "ScaleByRadamState", "ScaleByAdamaxState",
    # torch's Adadelta, ASGD, Rprop (classic.py) and Adafactor (factored.py)
    "adadelta", "asgd", "rprop", "scale_by_adadelta", "scale_by_asgd", "scale_by_rprop",
    "ScaleByAdadeltaState", "ScaleByAsgdState", "ScaleByRpropState", "asgd_averaged_params",
    "adafactor", "scale_by_adafactor", "ScaleByAdafactorState",
    # torch's Muon (muon.py)
    "muon", "muon_with_adamw", "muon_labels", "scale_by_muon", "newton_schulz",
    "scale_by_adjusted_learning_rate", "ScaleByMuonState", "ScaleByAdjustedLearningRateState",
    # Sophia
    "sophia", "scale_by_sophia", "ScaleBySophiaState", "hessian", "gauss_newton_bartlett",
    "gauss_newton_bartlett_fused",
    "hutchinson", "update_every_k", "is_estimate_step", "sophia_win_rate",
    "sophia_hessian_norm", "sophia_hessian_rejected",
    # guards
    "guards", "skip_spikes", "SkipSpikesState",
]
