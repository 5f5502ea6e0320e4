"""Sweeps: a grid of matched cells, trained and evaluated by the project's own entry points,
compared in one report (`python -m atma_jax.sweep --config sweep_small`)."""
