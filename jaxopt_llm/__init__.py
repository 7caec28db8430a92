"""jaxopt_llm: losses, optimizers and learning-rate schedules for LLM training in JAX.

Subpackages: ``jaxopt_llm.losses``, ``jaxopt_llm.optim``, ``jaxopt_llm.schedules``.
"""
from jaxopt_llm import losses, optim, schedules

__version__ = "0.1.0"
__all__ = ["losses", "optim", "schedules", "__version__"]
