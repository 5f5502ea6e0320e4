"""Token-level cross-entropy without materializing all logits (ATMA_SPEC §2.1 step 5, §10.16, §10.23).

Dimension glossary: B batch, T time, D hidden, V vocab (all V logits, padding ids included, enter
the softmax), C time chunk, N number of chunks.

`token_nll` evaluates the LM head and soft cap chunk by chunk along T (`lax.map`, each chunk
rematerialized in the backward pass), so a 64K context never holds [T, V] logits at once; the
reference loss is the SUM over tokens (`loss_sum`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_nll(model, h_BCD: jax.Array, t_BC: jax.Array) -> jax.Array:
  logits_BCV = model.logits(h_BCD)
  lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  tgt_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
  return lse_BC - tgt_BC


def token_nll(model, h_BTD: jax.Array, targets_BT: jax.Array, chunk: int | None = None
              ) -> jax.Array:
  """Per-token NLL [B, T] in fp32 of `targets` under `model.logits(h)`.

  `chunk`: tokens of T per logits evaluation (None or >= T: all at once). T need not be a
  multiple of `chunk` (the tail is padded and dropped).
  """
  B, T, _ = h_BTD.shape
  if targets_BT.shape != (B, T):
    raise ValueError(f"targets {targets_BT.shape} must match the hidden states' [B, T] = {(B, T)}")
  if chunk is not None and chunk < 1:
    raise ValueError(f"chunk={chunk} must be a positive number of tokens (or None)")
  if chunk is None or chunk >= T:
    return _chunk_nll(model, h_BTD, targets_BT)
  n = -(-T // chunk)
  pad = n * chunk - T
  h_p = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
  t_p = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  h_NBCD = jnp.moveaxis(h_p.reshape(B, n, chunk, -1), 1, 0)
  t_NBC = jnp.moveaxis(t_p.reshape(B, n, chunk), 1, 0)
  step = jax.checkpoint(lambda args: _chunk_nll(model, *args))
  nll_NBC = jax.lax.map(step, (h_NBCD, t_NBC))
  return jnp.moveaxis(nll_NBC, 0, 1).reshape(B, n * chunk)[:, :T]


def loss_sum(model, h_BTD: jax.Array, targets_BT: jax.Array, chunk: int | None = None,
             mask_BT: jax.Array | None = None) -> jax.Array:
  """Summed token NLL (the reference objective); `mask` (bool/0-1) drops tokens from the sum."""
  nll_BT = token_nll(model, h_BTD, targets_BT, chunk)
  if mask_BT is not None:
    nll_BT = jnp.where(mask_BT.astype(bool), nll_BT, 0.0)
  return jnp.sum(nll_BT)
