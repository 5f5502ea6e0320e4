"""Config presets: each module exposes `config() -> atma_jax.config.Config`."""
