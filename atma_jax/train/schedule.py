"""Learning-rate multiplier of the reference recipe (ATMA_SPEC §6.4).

No warm-up: the multiplier is 1 for the first `1 - cooldown_frac` of the run, then falls
linearly towards 0. With `progress = step / total_steps` (step = 0 .. total_steps - 1 is the
optimizer step being taken):

    eta(step) = 1                                  if progress < 1 - cooldown_frac
              = (1 - progress) / cooldown_frac     otherwise

Every group (AdamW and Muon, including Muon's decoupled weight-decay product) uses
`lr_initial * eta(step)`.
"""

from __future__ import annotations

import jax.numpy as jnp


def lr_multiplier(step, total_steps: int, cooldown_frac: float):
  """`eta(step)` as a float32 array (works on traced or Python integer steps)."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1 (set train.steps).")
  progress = jnp.asarray(step, jnp.float32) / jnp.float32(total_steps)
  if cooldown_frac <= 0.0:
    return jnp.ones_like(progress)
  decay = (1.0 - progress) / jnp.float32(cooldown_frac)
  return jnp.where(progress < 1.0 - cooldown_frac, jnp.float32(1.0), decay)
