"""moenas_jax: fairness- and robustness-aware MoE neural architecture search in JAX."""

__version__ = "0.1.0"
