"""XLA backend of the one-token gated-delta step (`api.STEP_BACKENDS`): the oracle's math,
reordered so that the state is read twice and written once.

The oracle (`reference.gated_delta_step`) decays the state first, S' = gamma S, and then reads
S' three times (S'^T k, the write S' + k u^T, then o = S''^T q after the write): XLA
materializes gamma S and reads the written state again, about six passes over the fp32 state
per step. Here, with the same S' = gamma S + k u^T:

  [a | c] = S^T [k | q]                 one read of S for both products
  u = beta (v - gamma a)                gamma S^T k = (gamma S)^T k
  o = gamma c + (q . k) u               S'^T q = gamma S^T q + q^T k u
  S' = gamma S + k u^T                  one read, one write (in place when S is donated)

Equal to the oracle's step up to fp32 rounding (the products are summed in another order).
Dimension glossary: B batch, H heads, K key dim, V value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta.reference import state_dtype


def unsupported_reason(*args, **static) -> None:
  """None: the XLA backend takes every input the op's shape check accepts."""
  del args, static


def gated_delta_step(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV):
  """One token of the recurrence: `(o_BHV, new_state_BHKV)` in the state dtype (see the
  module docstring for the order of the products)."""
  dt = state_dtype(q_BHK.dtype, k_BHK.dtype, v_BHV.dtype, log_gamma_BH.dtype, beta_BH.dtype,
                   state_BHKV.dtype)
  q_BHK, k_BHK, v_BHV = (x.astype(dt) for x in (q_BHK, k_BHK, v_BHV))
  gamma_BH1 = jnp.exp(log_gamma_BH.astype(dt))[..., None]
  beta_BH1 = beta_BH.astype(dt)[..., None]
  s_BHKV = state_BHKV.astype(dt)
  hi = jax.lax.Precision.HIGHEST
  kq_BH2K = jnp.stack([k_BHK, q_BHK], axis=2)
  sk_sq_BH2V = jnp.einsum("bhkv,bhnk->bhnv", s_BHKV, kq_BH2K, precision=hi)
  u_BHV = beta_BH1 * (v_BHV - gamma_BH1 * sk_sq_BH2V[:, :, 0])
  qk_BH1 = jnp.sum(q_BHK * k_BHK, axis=-1, keepdims=True)
  o_BHV = gamma_BH1 * sk_sq_BH2V[:, :, 1] + qk_BH1 * u_BHV
  s_BHKV = gamma_BH1[..., None] * s_BHKV + k_BHK[..., :, None] * u_BHV[..., None, :]
  return o_BHV, s_BHKV
