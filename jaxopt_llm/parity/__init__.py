"""PyTorch reference comparisons. torch is an optional dependency, imported lazily."""
