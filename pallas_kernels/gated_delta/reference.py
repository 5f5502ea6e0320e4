"""Sequential oracle of the gated delta rule (ATMA_SPEC §4.4) and its single-token step.

Nobody optimizes this file: the chunked XLA path, the Pallas kernels and the model's decode are
all tested against it. It walks the tokens one by one with `lax.scan`; autodiff of that scan is
the reference VJP.

Convention (decay first, undecayed delta write, read after the write), state `S` in the FLA /
inference layout `[K, V]` (the transpose of the torch scan's `(V, K)` state), per (b, h), token t:

  S <- gamma_t S                  gamma_t = exp(log_gamma_t) in (0, 1]
  u_t = beta_t (v_t - S^T k_t)    prediction on the decayed state
  S <- S + k_t u_t^T              write, not decayed again
  o_t = S^T q_t                   read after the write (includes token t)

q and k arrive unit-normalized (the caller normalizes); log_gamma <= 0 and beta in [0, 1].

Dimension glossary
  B   batch        T   tokens        H   heads (each with its own state, gates and q)
  K   key / query dim                V   value dim

Shared helpers used by `xla_chunked.py` and `api.py` (one copy): `state_dtype`,
`check_gated_delta_shapes`, `check_gated_delta_step_shapes`. `gated_delta_step` is the oracle
of the step op's backends (`api.STEP_BACKENDS`: `xla_step.py`, `gpu_step.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def state_dtype(*dtypes) -> jnp.dtype:
  """Recurrent-state / compute dtype: fp64 when any input is fp64, else fp32 (bf16 -> fp32)."""
  return jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32



def initial_state_or_zeros(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV):
  """(state dtype, start state [B,H,K,V]): the given state cast, or zeros when None."""
  B, _, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  dt = state_dtype(q_BTHK.dtype, k_BTHK.dtype, v_BTHV.dtype, log_gamma_BTH.dtype, beta_BTH.dtype,
                   jnp.float32 if initial_state_BHKV is None else initial_state_BHKV.dtype)
  if initial_state_BHKV is None:
    return dt, jnp.zeros((B, H, K, V), dt)
  return dt, initial_state_BHKV.astype(dt)

def check_gated_delta_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH,
                             initial_state_BHKV=None) -> None:
  """Raises ValueError naming the problem (and the fix) for inputs no backend can take."""
  if q_BTHK.ndim != 4 or k_BTHK.ndim != 4 or v_BTHV.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, K|V]; got q {q_BTHK.shape}, k {k_BTHK.shape}, "
                     f"v {v_BTHV.shape}")
  B, T, H, K = q_BTHK.shape
  if k_BTHK.shape != q_BTHK.shape:
    raise ValueError(f"k {k_BTHK.shape} must have q's shape {q_BTHK.shape} (memory heads are the "
                     "GQA-expanded heads: repeat-interleave k before the call)")
  if v_BTHV.shape[:3] != (B, T, H):
    raise ValueError(f"v must be [B={B}, T={T}, H={H}, V]; got {v_BTHV.shape}")
  V = v_BTHV.shape[3]
  for name, g in (("log_gamma", log_gamma_BTH), ("beta", beta_BTH)):
    if g.shape != (B, T, H):
      raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)} (one gate per token and head); "
                       f"got {g.shape}")
  if initial_state_BHKV is not None and initial_state_BHKV.shape != (B, H, K, V):
    raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)} (the [K, V] layout; "
                     f"transpose a torch (V, K) state); got {initial_state_BHKV.shape}")


def check_gated_delta_step_shapes(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV):
  """Raises ValueError (naming every shape) unless q, k [B, H, K], v [B, H, V], log_gamma,
  beta [B, H] and state [B, H, K, V] (one decode token)."""
  B, H, K = q_BHK.shape if q_BHK.ndim == 3 else (None,) * 3
  if (q_BHK.ndim != 3 or k_BHK.shape != q_BHK.shape or v_BHV.ndim != 3
      or v_BHV.shape[:2] != (B, H) or log_gamma_BH.shape != (B, H) or beta_BH.shape != (B, H)
      or state_BHKV.shape != (B, H, K, v_BHV.shape[-1])):
    raise ValueError(
        "gated_delta_step expects q, k [B, H, K], v [B, H, V], log_gamma, beta [B, H] and state "
        f"[B, H, K, V]; got q {q_BHK.shape}, k {k_BHK.shape}, v {v_BHV.shape}, log_gamma "
        f"{log_gamma_BH.shape}, beta {beta_BH.shape}, state {state_BHKV.shape}")


def gated_delta_step(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV):
  """One token of the recurrence: returns `(o_BHV, new_state_BHKV)`, both in the state dtype.

  Used by the sequential oracle; the step op's backends are checked against it.
  """
  dt = state_dtype(q_BHK.dtype, k_BHK.dtype, v_BHV.dtype, log_gamma_BH.dtype, beta_BH.dtype,
                   state_BHKV.dtype)
  q_BHK, k_BHK, v_BHV = (x.astype(dt) for x in (q_BHK, k_BHK, v_BHV))
  gamma_BH = jnp.exp(log_gamma_BH.astype(dt))
  beta_BH = beta_BH.astype(dt)
  hi = jax.lax.Precision.HIGHEST
  s_BHKV = gamma_BH[..., None, None] * state_BHKV.astype(dt)  # decay first
  pred_BHV = jnp.einsum("bhkv,bhk->bhv", s_BHKV, k_BHK, precision=hi)
  u_BHV = beta_BH[..., None] * (v_BHV - pred_BHV)
  s_BHKV = s_BHKV + k_BHK[..., :, None] * u_BHV[..., None, :]  # undecayed write
  o_BHV = jnp.einsum("bhkv,bhk->bhv", s_BHKV, q_BHK, precision=hi)  # read after the write
  return o_BHV, s_BHKV


def gated_delta_sequential(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH,
                           initial_state_BHKV=None):
  """The oracle: `lax.scan` of `gated_delta_step` over T. Returns `(o_BTHV, final_state_BHKV)`.

  Outputs are fp32 (fp64 when any input is fp64). `initial_state=None` means a zero state.
  """
  check_gated_delta_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV)
  dt, s0_BHKV = initial_state_or_zeros(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH,
                                       initial_state_BHKV)
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH))

  def body(s_BHKV, x):
    o_BHV, s_BHKV = gated_delta_step(*x, s_BHKV)
    return s_BHKV, o_BHV

  sT_BHKV, o_TBHV = jax.lax.scan(body, s0_BHKV, xs)
  return jnp.moveaxis(o_TBHV, 0, 1), sT_BHKV
