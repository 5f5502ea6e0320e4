"""Pallas kernels with their jnp references."""
