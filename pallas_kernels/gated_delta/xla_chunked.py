"""Chunked (UT / WY) gated delta rule in plain XLA: the production path off Pallas, and the
backend contract every Pallas backend of `api.py` implements.

Math (ATMA_SPEC §4.5, KERNELS.md §2b), re-derived for our convention (decay first, undecayed
write, read after the write, state `S` in `[K, V]`). Inside a chunk of C tokens with entry state
`S0` and inclusive log-decay cumsum `gc_i = sum_{l <= i} log_gamma_l`, unrolling the recurrence
gives, with `D_ij = exp(gc_i - gc_j)` for i >= j (else 0):

  S_i  = e^{gc_i} S0 + sum_{j <= i} D_ij k_j u_j^T
  u_i  = beta_i (v_i - e^{gc_i} S0^T k_i - sum_{j < i} D_ij (k_i . k_j) u_j)
  =>  (I + strict_tril(diag(beta) (K K^T) ⊙ D)) U = diag(beta) V - diag(beta e^{gc}) K S0.

`strict_tril(diag(beta) K K^T) ⊙ D = G A0 G^{-1}` with `G = diag(e^{gc})`, so its inverse is
`T = T0 ⊙ D` with the gate-free `T0 = (I + strict_tril(diag(beta) K K^T))^{-1}` (exact for
scalar gates). Then

  u     = T (beta ⊙ V)                       w = T (beta e^{gc} ⊙ K)
  v_new = U = u - w S0
  o     = (q ⊙ e^{gc}) S0 + ((q k^T) ⊙ D) v_new
  S_C   = e^{gc_C} S0 + (K ⊙ e^{gc_C - gc})^T v_new

Every exponent is <= 0 (D is formed only below the diagonal); nothing overflows. `T0` comes
from `unit_lower_inverse` (blocked doubling, matmuls only: no triangular solve). T is padded to a
multiple of C with identity steps (log_gamma = 0, beta = 0, q = k = v = 0) and sliced back.

Structure: a parallel prepass over all chunks (T0, u, w, the masked score matrix, decayed q/k)
and a sequential `lax.scan` over chunks carrying S. Both are under `jax.checkpoint`, so autodiff
(the backward of this path) keeps O(T·C + NC·K·V) residuals: the prepass outputs and one state
per chunk. All math in fp32 (fp64 when an input is fp64), matmuls at HIGHEST precision.

Backend contract (the Pallas modules `gpu_triton.py` / `tpu.py` export the same three names and
signatures; `api.py` wires `fwd` + `bwd` into one `custom_vjp`):

  gated_delta_fwd(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV, *,
                  chunk_size) -> (o_BTHV f32, final_state_BHKV f32)
  gated_delta_bwd(q, k, v, log_gamma, beta, initial_state, do_BTHV, dfinal_state_BHKV, *,
                  chunk_size) -> (dq, dk, dv, dlog_gamma, dbeta, dinitial_state)
  unsupported_reason(q, k, v, log_gamma, beta, initial_state, *, chunk_size) -> str | None
      (None: the backend takes the call; else the reason, which `impl="pallas"` errors name)

Residual format: the residuals ARE the six primal inputs, exactly as passed to `fwd` (q, k, v in
their input dtype, possibly bf16; log_gamma, beta, initial_state fp32; initial_state is always
an array, zeros when the caller gave none). `bwd` recomputes gc, T0 and the per-chunk states
itself (KERNELS.md §2b "store vs recompute"). Cotangents come back in the primal dtypes.
`do` and `dfinal_state` are fp32 and always materialized (zeros when unused).

Dimension glossary
  B batch   T tokens   H heads   K key/query dim   V value dim
  C chunk size   NC number of chunks (ceil(T / C))   Tp = NC·C padded length
  In the prepass, `...` leading dims are (NC, B, H); the scan carries S_BHKV.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta import chunk_math
from pallas_kernels.gated_delta.reference import check_gated_delta_shapes, initial_state_or_zeros

_HI = jax.lax.Precision.HIGHEST


def _mm(spec: str, a, b):
  return jnp.einsum(spec, a, b, precision=_HI)


def unit_lower_inverse(a_CC: jax.Array) -> jax.Array:
  """`(I + A)^{-1}` for strictly lower-triangular `A` (any leading dims), matmuls only.

  The blocked doubling of `chunk_math.inverse_unit_lower` (the kernels' own; 16-wide diagonal
  blocks first, `chunk_math.stable_inverse_block`), vectorized over chunks. The plain doubling
  loses T0 in f32 when the keys of a chunk are correlated (5e-2 at key cosine 0.5, C = 64).
  """
  return jnp.vectorize(chunk_math.inverse_unit_lower, signature="(c,c)->(c,c)")(a_CC)


def decay_matrix(gc_C: jax.Array) -> jax.Array:
  """`D_ij = exp(gc_i - gc_j)` for i >= j, 0 above the diagonal (exponent never positive)."""
  C = gc_C.shape[-1]
  lower_CC = jnp.tril(jnp.ones((C, C), dtype=bool))
  diff_CC = gc_C[..., :, None] - gc_C[..., None, :]
  return jnp.where(lower_CC, jnp.exp(jnp.where(lower_CC, diff_CC, 0.0)), 0.0)


def chunk_prepass(q_CK, k_CK, v_CV, log_gamma_C, beta_C):
  """Everything inside a chunk that does not need the state (parallel over chunks).

  Returns (u_CV, w_CK, p_CC, qg_CK, kd_CK, gend): see the module docstring; `p = (q k^T) ⊙ D`,
  `qg = q e^{gc}`, `kd = k e^{gc_C - gc}`, `gend = e^{gc_C}` (shape `...`).
  """
  C = q_CK.shape[-2]
  gc_C = jnp.cumsum(log_gamma_C, axis=-1)
  decay_CC = decay_matrix(gc_C)
  strict_CC = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
  kk_CC = _mm("...ik,...jk->...ij", k_CK, k_CK)
  t0_CC = unit_lower_inverse(jnp.where(strict_CC, beta_C[..., :, None] * kk_CC, 0.0))
  t_CC = t0_CC * decay_CC
  u_CV = _mm("...ij,...jv->...iv", t_CC, beta_C[..., None] * v_CV)
  w_CK = _mm("...ij,...jk->...ik", t_CC, (beta_C * jnp.exp(gc_C))[..., None] * k_CK)
  p_CC = _mm("...ik,...jk->...ij", q_CK, k_CK) * decay_CC
  qg_CK = q_CK * jnp.exp(gc_C)[..., None]
  kd_CK = k_CK * jnp.exp(gc_C[..., -1:] - gc_C)[..., None]
  return u_CV, w_CK, p_CC, qg_CK, kd_CK, jnp.exp(gc_C[..., -1])


def chunk_state_step(s_KV, u_CV, w_CK, p_CC, qg_CK, kd_CK, gend):
  """One chunk of the sequential pass: `(o_CV, next_state_KV)` from the entry state."""
  vnew_CV = u_CV - _mm("...ck,...kv->...cv", w_CK, s_KV)
  o_CV = _mm("...ck,...kv->...cv", qg_CK, s_KV) + _mm("...cj,...jv->...cv", p_CC, vnew_CV)
  s_KV = gend[..., None, None] * s_KV + _mm("...ck,...cv->...kv", kd_CK, vnew_CV)
  return o_CV, s_KV


def _to_chunks(x_BTH_, C: int):
  """[B, T, H, ...] (T a multiple of C) -> [NC, B, H, C, ...]."""
  B, T, H = x_BTH_.shape[:3]
  x = x_BTH_.reshape(B, T // C, C, H, *x_BTH_.shape[3:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)


def gated_delta_fwd(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV, *,
                    chunk_size: int = 64):
  """Chunked forward `(o_BTHV, final_state_BHKV)`; differentiable by autodiff (checkpointed).

  The effective chunk is `min(chunk_size, T)`; T need not be a multiple of it.
  """
  check_gated_delta_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int (e.g. 64); got {chunk_size!r}")
  B, T, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  dt, s0_BHKV = initial_state_or_zeros(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH,
                                       initial_state_BHKV)
  if T == 0:
    return jnp.zeros((B, 0, H, V), dt), s0_BHKV
  C = min(chunk_size, T)
  NC = -(-T // C)
  pad = NC * C - T
  # Identity steps: log_gamma = 0 (no decay), beta = 0 (no write), q = k = v = 0.
  padded = [jnp.pad(x.astype(dt), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            for x in (q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH)]
  chunks = [_to_chunks(x, C) for x in padded]  # [NC, B, H, C, ...]

  pre = jax.checkpoint(chunk_prepass)(*chunks)

  def body(s_BHKV, xs):
    o_BHCV, s_BHKV = chunk_state_step(s_BHKV, *xs)
    return s_BHKV, o_BHCV

  sT_BHKV, o_NBHCV = jax.lax.scan(jax.checkpoint(body), s0_BHKV, pre)
  o_BTHV = jnp.moveaxis(o_NBHCV, 3, 1).reshape(NC * C, B, H, V)  # [NC, C, B, H, V] -> rows
  o_BTHV = jnp.moveaxis(o_BTHV, 0, 1)[:, :T]
  return o_BTHV, sT_BHKV


def gated_delta_bwd(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV,
                    do_BTHV, dfinal_state_BHKV, *, chunk_size: int = 64):
  """VJP of `gated_delta_fwd` from the residuals (= the primal inputs): recompute + autodiff.

  Returns `(dq, dk, dv, dlog_gamma, dbeta, dinitial_state)` in the primal dtypes. Also the
  fallback backward of `api.py` when a Pallas backend ships only a forward.
  """
  fwd = functools.partial(gated_delta_fwd, chunk_size=chunk_size)
  (o, sT), vjp = jax.vjp(fwd, q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV)
  return vjp((do_BTHV.astype(o.dtype), dfinal_state_BHKV.astype(sT.dtype)))


def unsupported_reason(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV,
                       *, chunk_size: int = 64) -> str | None:
  """None: the XLA path takes every shape and dtype `check_gated_delta_shapes` accepts."""
  del q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state_BHKV, chunk_size
  return None
