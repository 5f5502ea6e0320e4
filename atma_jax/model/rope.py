"""Half-truncated rotary embedding of the RoPE ablation (ATMA_SPEC §5.2).

Dimension glossary
  B batch   T time   H heads   d head dim   F frequencies (= d / 2)

d/4 log-spaced frequencies `omega_k = 1024^(-k/(d/4-1))` (1.0 down to 1/1024) followed by d/4
zero frequencies; pairs are split halves `(x[m], x[m + d/2])`; with `theta = pos * omega_m`:
  y[m]       =  x[m] cos(theta) + x[m + d/2] sin(theta)
  y[m + d/2] = -x[m] sin(theta) + x[m + d/2] cos(theta)
computed in fp32 and cast back. Positions are absolute (`q_offset + t`), 0-based.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atma_jax.model.layers import stats_dtype

ROPE_BASE_INV = 1.0 / 1024.0


def rope_frequencies(head_dim: int) -> jax.Array:
  """fp32 [d/2]: d/4 frequencies (1/1024)^linspace(0, 1, d/4), then d/4 zeros (torch buffer)."""
  if head_dim % 4:
    raise ValueError(f"RoPE needs head_dim divisible by 4 (got {head_dim}); choose another "
                     "model.head_dim or model.attn_type")
  quarter = head_dim // 4
  freq = jnp.power(jnp.float32(ROPE_BASE_INV), jnp.linspace(0.0, 1.0, quarter, dtype=jnp.float32))
  return jnp.concatenate([freq, jnp.zeros((quarter,), jnp.float32)])


def apply_rope(x_BTHd: jax.Array, q_offset=0) -> jax.Array:
  """Rotates `x [B, T, H, d]` at absolute positions q_offset + t; returns x's dtype.

  `q_offset` is an int, a scalar, or an int array [B] (per-sequence decode positions).
  """
  T, d = x_BTHd.shape[1], x_BTHd.shape[-1]
  freq_F = rope_frequencies(d)
  offset = jnp.reshape(jnp.asarray(q_offset), (-1, 1))  # [1, 1] or [B, 1]
  pos_bT = (jnp.arange(T)[None, :] + offset).astype(jnp.float32)
  theta_bTF = pos_bT[..., None] * freq_F
  cos = jnp.cos(theta_bTF)[:, :, None, :]
  sin = jnp.sin(theta_bTF)[:, :, None, :]
  xf = x_BTHd.astype(stats_dtype(x_BTHd.dtype))
  x1, x2 = jnp.split(xf, 2, axis=-1)
  y1 = x1 * cos + x2 * sin
  y2 = -x1 * sin + x2 * cos
  return jnp.concatenate([y1, y2], axis=-1).astype(x_BTHd.dtype)
