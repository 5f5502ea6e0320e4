"""ATMA in JAX/Flax."""
