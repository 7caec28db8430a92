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
    weight_decay_mask,
)
from jaxopt_llm.optim.transforms import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByLionState,
    ScaleByMomentumState,
    ScaleByRmspropState,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_lion,
    scale_by_momentum,
    scale_by_rmsprop,
)

__all__ = [
    "adagrad", "adam", "adam_l2", "adamw", "lion", "momentum", "rmsprop", "sgd",
    "weight_decay_mask",
    "scale_by_adagrad", "scale_by_adam", "scale_by_lion", "scale_by_momentum",
    "scale_by_rmsprop",
    "ScaleByAdagradState", "ScaleByAdamState", "ScaleByLionState", "ScaleByMomentumState",
    "ScaleByRmspropState",
]
