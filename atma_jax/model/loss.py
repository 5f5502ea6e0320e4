"""Token-level cross-entropy without materializing all logits (ATMA_SPEC §2.1 step 5, §10.16, §10.23).

Dimension glossary: B batch, T time, D hidden, V vocab (all V logits, padding ids included, enter
the softmax), C time chunk, N number of chunks.

`token_nll` evaluates the LM head and soft cap chunk by chunk along T (`lax.map`, each chunk
rematerialized in the backward pass), so a 64K context never holds [T, V] logits at once; the
reference loss is the SUM over tokens (`loss_sum`). `capped_nll` is the cap + cross-entropy with
a hand-written backward (one elementwise pass writing dz) and no max pass: its logits passes
took 7.2% of an H100 train step where autodiff of `logsumexp` took 8.5%
(bench/results/train_step_profile_h100_run3.json vs _run2.json).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atma_jax.model.atma import SOFT_CAP, capped_logits
from atma_jax.model.layers import stats_dtype


def _chunk_nll(model, h_BCD: jax.Array, t_BC: jax.Array) -> jax.Array:
  return capped_nll(model.proj(h_BCD), t_BC)


@jax.custom_vjp
def capped_nll(z_BCV: jax.Array, t_BC: jax.Array) -> jax.Array:
  """-log softmax(cap(z))[t] per row in fp32, from the head's pre-cap output z (`model.logits`
  is cap(z)). |cap(z)| < 15, so the log-sum-exp needs no max shift (the sum of V = 50K terms
  stays below 2e11)."""
  return _capped_nll_fwd(z_BCV, t_BC)[0]


def _capped_nll_fwd(z_BCV, t_BC):
  c_BCV = capped_logits(z_BCV)
  lse_BC = jnp.log(jnp.sum(jnp.exp(c_BCV), axis=-1))
  nll_BC = lse_BC - jnp.take_along_axis(c_BCV, t_BC[..., None], axis=-1)[..., 0]
  return nll_BC, (z_BCV, t_BC, lse_BC)


def _capped_nll_bwd(res, dnll_BC):
  """dz = dnll (softmax(c) - onehot(t)) cap'(z), cap'(z) = 15^3 / (z^2 + 15^2)^(3/2): one
  elementwise pass over z writing dz in z's dtype."""
  z_BCV, t_BC, lse_BC = res
  zf = z_BCV.astype(stats_dtype(z_BCV.dtype))
  inv = jax.lax.rsqrt(zf * zf + SOFT_CAP * SOFT_CAP)
  p_BCV = jnp.exp(SOFT_CAP * zf * inv - lse_BC[..., None])
  hit_BCV = jax.lax.broadcasted_iota(t_BC.dtype, z_BCV.shape, z_BCV.ndim - 1) == t_BC[..., None]
  dc_BCV = dnll_BC[..., None] * (p_BCV - hit_BCV.astype(p_BCV.dtype))
  dz_BCV = dc_BCV * (SOFT_CAP ** 3) * inv * inv * inv
  return dz_BCV.astype(z_BCV.dtype), None


capped_nll.defvjp(_capped_nll_fwd, _capped_nll_bwd)


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
