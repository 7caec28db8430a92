"""Optimizers as ``optax.GradientTransformation`` chains with PyTorch / official semantics.

Building blocks live in ``transforms`` (``scale_by_*``), named optimizers in ``aliases``.
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
# Fast paths (issue 8): fused one-pass transformations and the ordered in-place step.
from jaxopt_llm.optim.fused import (
    fused_adam,
    fused_lion,
    fused_sophia,
    is_fused,
    state_bytes,
    update_and_apply,
)
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
# Sophia's estimators, every-k helper and monitors (module: jaxopt_llm.optim.hessian).
from jaxopt_llm.optim import hessian
from jaxopt_llm.optim.hessian import (
    gauss_newton_bartlett,
    hutchinson,
    is_estimate_step,
    sophia_hessian_norm,
    sophia_win_rate,
    update_every_k,
)

__all__ = [
    "fused_adam", "fused_lion", "fused_sophia", "is_fused", "state_bytes", "update_and_apply",
    "adagrad", "adam", "adam_l2", "adamw", "lion", "momentum", "rmsprop", "sgd",
    "weight_decay_mask",
    "scale_by_adagrad", "scale_by_adam", "scale_by_lion", "scale_by_momentum",
    "scale_by_rmsprop",
    "ScaleByAdagradState", "ScaleByAdamState", "ScaleByLionState", "ScaleByMomentumState",
    "ScaleByRmspropState",
    # Sophia
    "sophia", "scale_by_sophia", "ScaleBySophiaState", "hessian", "gauss_newton_bartlett",
    "hutchinson", "update_every_k", "is_estimate_step", "sophia_win_rate",
    "sophia_hessian_norm",
]
