"""In-kernel chunk math of the gated delta rule, shared by the Pallas GPU (Triton) and TPU kernels.

Every function here works on values already loaded into a kernel (registers / VMEM): plain 2-D
`jnp` arrays, `lax.dot_general`, `iota` masks, `exp`, row/column sums. Nothing here calls
`cumsum` or `triangular_solve` (neither Mosaic backend lowers them). The same functions run
unchanged outside a kernel, which is how `tests/` checks them against the sequential oracle.

Chunk math (KERNELS.md §2b), one chunk of C tokens, `gc` = chunk-local inclusive cumsum of
`log_gamma` (so `gc <= 0` and non-increasing), `D_ij = exp(gc_i - gc_j)` for `i >= j` else 0:

  A   = strict_tril(diag(beta) K K^T)          T0 = (I + A)^-1   (doubling, f32)
  T   = T0 * D                                  (gate-free inverse: exact for scalar gates)
  u   = T (beta V),   w = T (beta e^gc K)
  v'  = u - w S                                 (v_new)
  o   = (Q e^gc) S + ((Q K^T) * D) v'
  S  <- e^gc_C S + (K e^(gc_C - gc))^T v'

Every exponent is <= 0. Backward (one chunk; S = state entering the chunk, dS1 = cotangent of
the state leaving it; Y = V - e^gc (K S) so that v' = T diag(beta) Y):

  dv'  = P^T dO + (K r) dS1                     P = (Q K^T) * D,  r = e^(gc_C - gc)
  dS   = e^gc_C dS1 + (Q e)^T dO - w^T dv'      (reverse state pass)
  dZ   = T^T dv',  dY = beta dZ,  dV = dY,  dT = dv' (beta Y)^T (lower)
  dP   = (dO v'^T) (lower),  dQ = e (dO S^T) + (dP * D) K
  dA   = -T0^T (dT * D) T0^T (strict lower)
  dK   = (dP * D)^T Q + r (v' dS1^T) - e (dY S^T) + beta (dA K) + dA^T (beta K)
  dbeta = rowsum(dZ * Y) + rowsum(dA * K K^T)
  dgc  = rowsum(M) - colsum(M) + e rowsum(dO * Q S) - e rowsum(dY * K S) - s
         + [i = C-1] (e^gc_C <dS1, S> + sum s)
         M = (dO v'^T) * P + dT * T,  s = r rowsum(K * (v' dS1^T))
  dlog_gamma = reverse chunk-local cumsum of dgc (done by the caller).

The same backward split the way the "wy" kernels run it (w and u as intermediates; dqkw per K
block, wy per chunk) is the "WY decomposition" section at the end of this file.

Layout convention: per-token gate vectors are passed both as a column `(C, 1)` and a row
`(1, C)` so no kernel needs a narrow transpose; the gate gradient comes back as a column part
plus a row part (the caller adds them).

Dimension glossary
  C   chunk length        K   key / query dim        V   value dim (or a block of it)
  BK  key-column block (the "wy" backward)
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from typing import Any, NamedTuple

HIGHEST = lax.Precision.HIGHEST


class Dots(NamedTuple):
  """How the kernel's matmuls run.

  `dtype`: operand dtype of the big q/k/v/state dots (bf16 feeds tensor cores / MXU directly).
  `f32_precision`: precision of the f32 dots of the inverse (doubling products):
  `lax.Precision.HIGHEST` (exact f32: CPU interpret, TPU) or a `lax.DotAlgorithmPreset` such as
  `TF32_TF32_F32_X3` (near-f32 on GPU tensor cores).
  `mid_precision`: the other f32 dots (through T: w, u, v', dT, dA); None = `f32_precision`.
  `inverse_block`: None (default) = `stable_inverse_block(C)`, the blocked doubling every path
  uses; 0 = plain doubling over the whole chunk; B (a power of 2 dividing C, < C) = doubling
  within the B-wide diagonal blocks, then across blocks (`inverse_unit_lower`).
  """
  dtype: Any = jnp.float32
  f32_precision: Any = HIGHEST
  mid_precision: Any = None
  inverse_block: int | None = None


def mm(a, b, *, ta: bool = False, tb: bool = False, cfg: Dots = Dots(), low: bool = False,
       inverse: bool = False):
  """`op(a) @ op(b)` with f32 accumulation. `low`: operands in `cfg.dtype`, else f32."""
  wide = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)  # f32 (f64 oracle)
  dt = cfg.dtype if low else wide
  acc = jnp.promote_types(dt, jnp.float32) if low else wide  # f32 (f64 for f64 operands)
  a = a.astype(dt)
  b = b.astype(dt)
  if dt not in (jnp.float32, jnp.float64):
    prec = HIGHEST
  elif inverse or cfg.mid_precision is None:
    prec = cfg.f32_precision
  else:
    prec = cfg.mid_precision
  dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=acc)


def _wide(x):
  """`x` in f32, or f64 when it is f64 (the fp64 oracle tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def iota2(n: int, m: int):
  """(row index, column index) int32 grids of shape (n, m)."""
  return (lax.broadcasted_iota(jnp.int32, (n, m), 0), lax.broadcasted_iota(jnp.int32, (n, m), 1))


def _doubling(x, p, steps, cfg):
  """x (I + p^2)(I + p^4)... over `steps` squarings: `x = x + x p` after each `p = p p`."""
  for _ in range(steps):
    p = mm(p, p, cfg=cfg, inverse=True)
    x = x + mm(x, p, cfg=cfg, inverse=True)
  return x


def inverse_unit_lower(a_CC, cfg: Dots = Dots()):
  """`(I + a)^-1` for strictly-lower `a` by doubling, in f32 or wider (`cfg.f32_precision`).

  With `N = -a` (nilpotent, N^C = 0): `(I - N)^-1 = prod_{i<m} (I + N^(2^i))`, 2^m >= C.
  m - 1 squarings and as many products; no triangular solve.

  `cfg.inverse_block = B` (blocked; same 2 (m - 1) products): split N = Nd + No into its B-wide
  diagonal blocks and the rest (iota masks, no slicing); Xd = (I - Nd)^-1 by doubling (N_d^B = 0)
  and then `(I - N)^-1 = (I - M)^-1 Xd` with M = Xd No block-strictly-lower (M^(C/B) = 0), by
  doubling again. The plain doubling's high powers N^(2^i) of a chunk of correlated keys reach
  entries of 1e3+ that cancel in f32 (T0 error 5e-2 in exact f32 at pairwise key cosine 0.5,
  C = 64); the blocked one keeps every factor an inverse of a unit-lower block (error ~1e-6).
  """
  C = a_CC.shape[0]
  dt = jnp.promote_types(a_CC.dtype, jnp.float32)  # f32 in kernels, f64 for the fp64 oracle tests
  row, col = iota2(C, C)
  eye = jnp.where(row == col, 1.0, 0.0).astype(dt)
  n = -a_CC.astype(dt)
  blk = stable_inverse_block(C) if cfg.inverse_block is None else cfg.inverse_block
  if not blk or blk >= C:
    return _doubling(eye + n, n, (C - 1).bit_length() - 1, cfg)
  if C % blk or blk & (blk - 1):
    raise ValueError(f"Dots.inverse_block={blk} must be a power of 2 dividing the chunk {C}")
  same = (row // blk) == (col // blk)
  n_d = jnp.where(same, n, 0.0)
  x_d = _doubling(eye + n_d, n_d, (blk - 1).bit_length() - 1, cfg)
  m = mm(x_d, jnp.where(same, 0.0, n), cfg=cfg, inverse=True)
  y = _doubling(eye + m, m, (C // blk - 1).bit_length() - 1, cfg)
  return mm(y, x_d, cfg=cfg, inverse=True)


STABLE_INVERSE_BLOCK = 16  # the blocked inverse's diagonal block on every path (GPU, TPU, XLA)


def stable_inverse_block(C: int, block: int = STABLE_INVERSE_BLOCK) -> int:
  """`Dots.inverse_block` for a chunk of C: the largest power of 2 <= `block` dividing C, or 0
  (the plain doubling) when that is 1 or the whole chunk (a single block is the plain doubling)."""
  b = block
  while b > 1 and C % b:
    b //= 2
  return b if 1 < b < C else 0


def decay_lower(gc_C1, gc_1C):
  """`D_ij = exp(gc_i - gc_j)` on and below the diagonal, 0 above (exponents <= 0)."""
  C = gc_C1.shape[0]
  row, col = iota2(C, C)
  diff = jnp.where(row >= col, gc_C1 - gc_1C, -jnp.inf)
  return jnp.exp(diff)


def last_of(x_C1):
  """The last entry of a column as a scalar (a masked sum: no dynamic indexing)."""
  C = x_C1.shape[0]
  row = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
  return jnp.sum(jnp.where(row == C - 1, x_C1, 0.0))


def chunk_inverse(k_CK, beta_C1, *, cfg):
  """T0 = (I + strict_tril(diag(beta) K K^T))^-1 (f32)."""
  C = k_CK.shape[0]
  row, col = iota2(C, C)
  kk = mm(k_CK, k_CK, tb=True, cfg=cfg, low=True)
  a = jnp.where(row > col, beta_C1 * kk, 0.0)
  return inverse_unit_lower(a, cfg)


def chunk_wy(k_CK, v_CV, beta_C1, gc_C1, gc_1C, *, cfg, with_t0=False):
  """Per-chunk prepass: (T = T0*D, w = T(beta e^gc K), u = T(beta V)[, T0]), all f32."""
  t0 = chunk_inverse(k_CK, beta_C1, cfg=cfg)
  t = t0 * decay_lower(gc_C1, gc_1C)
  kf = _wide(k_CK)
  w = mm(t, kf * (beta_C1 * jnp.exp(gc_C1)), cfg=cfg)
  u = mm(t, _wide(v_CV) * beta_C1, cfg=cfg)
  return (t, w, u, t0) if with_t0 else (t, w, u)


def chunk_state_step(q_CK, k_CK, w_CK, u_CV, gc_C1, gc_1C, s_KV, *, cfg, with_output=True):
  """One chunk of the sequential state pass: returns (o_CV | None, new state S_KV), f32.

  `s_KV` may be a V-block of the state (all columns are independent).
  """
  o, s_new, _ = chunk_state_step_vnew(q_CK, k_CK, w_CK, u_CV, gc_C1, gc_1C, s_KV, cfg=cfg,
                                      with_output=with_output)
  return o, s_new


def chunk_state_step_vnew(q_CK, k_CK, w_CK, u_CV, gc_C1, gc_1C, s_KV, *, cfg, with_output=True):
  """`chunk_state_step` that also returns v' = u - w S: (o_CV | None, S_new_KV, v'_CV), f32."""
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  gl = last_of(gc_C1)
  v_new = u_CV - mm(w_CK, s_KV, cfg=cfg, low=True)
  o = None
  if with_output:
    qf = _wide(q_CK)
    p = (jnp.where(row >= col, mm(q_CK, k_CK, tb=True, cfg=cfg, low=True), 0.0)
         * decay_lower(gc_C1, gc_1C))
    o = mm(qf * jnp.exp(gc_C1), s_KV, cfg=cfg, low=True) + mm(p, v_new, cfg=cfg, low=True)
  kr = _wide(k_CK) * jnp.exp(gl - gc_C1)
  s_new = jnp.exp(gl) * s_KV + mm(kr, v_new, ta=True, cfg=cfg, low=True)
  return o, s_new, v_new


def chunk_state_bwd_step(q_CK, k_CK, w_CK, do_CV, gc_C1, gc_1C, ds_KV, *, cfg):
  """One chunk of the reverse state pass: cotangent of the state leaving the chunk -> entering."""
  return chunk_state_bwd_step_dv(q_CK, k_CK, w_CK, do_CV, gc_C1, gc_1C, ds_KV, cfg=cfg)[0]


def chunk_state_bwd_step_dv(q_CK, k_CK, w_CK, do_CV, gc_C1, gc_1C, ds_KV, *, cfg):
  """`chunk_state_bwd_step` that also returns dv' = P^T dO + (K r) dS1: (dS_in_KV, dv'_CV)."""
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  gl = last_of(gc_C1)
  p = (jnp.where(row >= col, mm(q_CK, k_CK, tb=True, cfg=cfg, low=True), 0.0)
       * decay_lower(gc_C1, gc_1C))
  kr = _wide(k_CK) * jnp.exp(gl - gc_C1)
  dv_new = mm(p, do_CV, ta=True, cfg=cfg, low=True) + mm(kr, ds_KV, cfg=cfg, low=True)
  qe = _wide(q_CK) * jnp.exp(gc_C1)
  ds_in = (jnp.exp(gl) * ds_KV + mm(qe, do_CV, ta=True, cfg=cfg, low=True)
           - mm(w_CK, dv_new, ta=True, cfg=cfg, low=True))
  return ds_in, dv_new


class GradCtx(NamedTuple):
  """Per-chunk quantities of the backward that do not depend on the value dim."""
  kk: Any       # K K^T            (C, C)
  t0: Any       # gate-free inverse (C, C)
  t: Any        # T = T0 * D
  d: Any        # decay matrix D
  p: Any        # P = (Q K^T) * D (lower)
  e: Any        # e^gc             (C, 1)
  r: Any        # e^(gc_C - gc)    (C, 1)
  gl: Any       # gc_C (scalar)


class GradAcc(NamedTuple):
  """Sums over the value dim, accumulated V-block by V-block."""
  dq: Any       # e (dO S^T)                   (C, K)
  vds: Any      # v' dS1^T                      (C, K)
  dk: Any       # -e (dY S^T)                  (C, K)
  dt: Any       # dv' (beta Y)^T (lower)        (C, C)
  dp: Any       # dO v'^T (lower)               (C, C)
  dbeta: Any    # rowsum(dZ * Y)                (C, 1)
  dgc: Any      # e rowsum(dO * QS) - e rowsum(dY * KS)   (C, 1)
  tail: Any     # <dS1, S> (scalar, as (1, 1))


def grads_prologue(q_CK, k_CK, beta_C1, gc_C1, gc_1C, *, cfg) -> GradCtx:
  """Value-independent backward quantities of `chunk_grads`."""
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  gl = last_of(gc_C1)
  d = decay_lower(gc_C1, gc_1C)
  kk = mm(k_CK, k_CK, tb=True, cfg=cfg, low=True)
  t0 = inverse_unit_lower(jnp.where(row > col, beta_C1 * kk, 0.0), cfg)
  p = jnp.where(row >= col, mm(q_CK, k_CK, tb=True, cfg=cfg, low=True), 0.0) * d
  return GradCtx(kk=kk, t0=t0, t=t0 * d, d=d, p=p, e=jnp.exp(gc_C1), r=jnp.exp(gl - gc_C1), gl=gl)


def grads_init(C: int, K: int) -> GradAcc:
  z = lambda *sh: jnp.zeros(sh, jnp.float32)
  return GradAcc(dq=z(C, K), vds=z(C, K), dk=z(C, K), dt=z(C, C), dp=z(C, C), dbeta=z(C, 1),
                 dgc=z(C, 1), tail=z(1, 1))


def grads_vblock(ctx: GradCtx, acc: GradAcc, q_CK, k_CK, beta_C1, v_CV, do_CV, s_KV, ds1_KV, *,
                 cfg):
  """One V-block (columns of v, dO, S, dS1): returns (dv block, updated accumulators)."""
  f32 = jnp.float32
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  lower = row >= col
  e, r = ctx.e, ctx.r
  do = do_CV.astype(f32)
  ks = mm(k_CK, s_KV, cfg=cfg, low=True)               # K S   (C, BV)
  y = v_CV.astype(f32) - e * ks                         # Y = V - e K S
  by = beta_C1 * y
  v_new = mm(ctx.t, by, cfg=cfg)                        # v' = T beta Y
  dv_new = (mm(ctx.p, do, ta=True, cfg=cfg, low=True)
            + mm(k_CK.astype(f32) * r, ds1_KV, cfg=cfg, low=True))
  dz = mm(ctx.t, dv_new, ta=True, cfg=cfg)
  dy = beta_C1 * dz
  qs = mm(q_CK, s_KV, cfg=cfg, low=True)
  acc = GradAcc(
      dq=acc.dq + e * mm(do, s_KV, tb=True, cfg=cfg, low=True),
      vds=acc.vds + mm(v_new, ds1_KV, tb=True, cfg=cfg, low=True),
      dk=acc.dk - e * mm(dy, s_KV, tb=True, cfg=cfg, low=True),
      dt=acc.dt + jnp.where(lower, mm(dv_new, by, tb=True, cfg=cfg), 0.0),
      dp=acc.dp + jnp.where(lower, mm(do, v_new, tb=True, cfg=cfg, low=True), 0.0),
      dbeta=acc.dbeta + jnp.sum(dz * y, axis=1, keepdims=True),
      dgc=acc.dgc + e * (jnp.sum(do * qs, axis=1, keepdims=True)
                         - jnp.sum(dy * ks, axis=1, keepdims=True)),
      tail=acc.tail + jnp.sum(ds1_KV * s_KV, keepdims=True))
  return dy, acc


def grads_epilogue(ctx: GradCtx, acc: GradAcc, q_CK, k_CK, beta_C1, *, cfg):
  """(dq, dk, dbeta, dgc column part, dgc row part) from the accumulated sums."""
  f32 = jnp.float32
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  qf, kf = q_CK.astype(f32), k_CK.astype(f32)
  dpd = acc.dp * ctx.d
  dq = acc.dq + mm(dpd, kf, cfg=cfg, low=True)
  da = -mm(mm(ctx.t0, acc.dt * ctx.d, ta=True, cfg=cfg), ctx.t0, tb=True, cfg=cfg)
  da = jnp.where(row > col, da, 0.0)
  dbeta = acc.dbeta + jnp.sum(da * ctx.kk, axis=1, keepdims=True)
  dk = (mm(dpd, qf, ta=True, cfg=cfg, low=True) + ctx.r * acc.vds + acc.dk
        + beta_C1 * mm(da, kf, cfg=cfg) + mm(da, kf * beta_C1, ta=True, cfg=cfg))
  m = acc.dp * ctx.p + acc.dt * ctx.t
  s_vec = ctx.r * jnp.sum(kf * acc.vds, axis=1, keepdims=True)
  last = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
  tail = jnp.exp(ctx.gl) * jnp.sum(acc.tail) + jnp.sum(s_vec)
  dgc_col = (jnp.sum(m, axis=1, keepdims=True) + acc.dgc - s_vec + jnp.where(last, tail, 0.0))
  dgc_row = -jnp.sum(m, axis=0, keepdims=True)
  return dq, dk, dbeta, dgc_col, dgc_row


def chunk_grads(q_CK, k_CK, v_CV, beta_C1, gc_C1, gc_1C, do_CV, s_KV, ds1_KV, *, cfg):
  """All input gradients of one chunk, given the state entering it and the cotangent leaving it
  (the whole value dim as one block).

  Returns (dq_CK, dk_CK, dv_CV, dbeta_C1, dgc_C1, dgc_1C): the gate-cumsum gradient is the sum
  of the column part and the row part (f32 throughout).

  The TPU gradient kernel (`tpu._grads_kernel`) runs this per chunk; it is also the direct
  statement of the backward in the module docstring that the WY decomposition below
  (`chunk_grads_wy`, the GPU kernels' split) re-derives.
  """
  C, K = k_CK.shape
  ctx = grads_prologue(q_CK, k_CK, beta_C1, gc_C1, gc_1C, cfg=cfg)
  dv, acc = grads_vblock(ctx, grads_init(C, K), q_CK, k_CK, beta_C1, v_CV, do_CV, s_KV, ds1_KV,
                         cfg=cfg)
  dq, dk, dbeta, dgc_col, dgc_row = grads_epilogue(ctx, acc, q_CK, k_CK, beta_C1, cfg=cfg)
  return dq, dk, dv, dbeta, dgc_col, dgc_row


# ----------------------------------------------------------------- backward, WY decomposition
#
# The same gradients as `chunk_grads`, split the way FLA splits them: w = T (beta e K) and
# u = T (beta V) are treated as intermediates of v' = u - w S, so
#   du = dv',  dw = -dv' S^T                                   (through v')
# and the rest is two independent pieces:
#   dqkw  (per K-column block kb, V walked in blocks): dq, dk_direct, dw, dgc partials from
#         dO, v', dv', S, dS1 -- nothing through T;
#   wy    (per chunk): through u = T (beta V), w = T (beta e K), T = T0 * D, T0 = (I + A)^-1:
#         dT = du (beta V)^T + dw (beta e K)^T,  dV = beta T^T du,
#         dA = -T0^T (dT * D) T0^T (strict lower),
#         dK = dk_direct + beta e T^T dw + beta (dA K) + dA^T (beta K),
#         dbeta = rowsum(V * T^T du) + rowsum(e K * T^T dw) + rowsum(dA * K K^T),
#         dgc  += beta e rowsum(K * T^T dw) + rowsum(dT * T) - colsum(dT * T).
# dgc of dqkw for K block kb (gate terms of o = (Q e) S + P v' and of S_new):
#   e rowsum(Q_kb * (dO S_kb^T)) - s_kb + rowsum(M_kb) - colsum(M_kb)
#   + [i = C-1] (e^gc_C <dS1_kb, S_kb> + sum s_kb),
#   M_kb = (dO v'^T * D) * (Q_kb K_kb^T),  s_kb = r rowsum(K_kb * (v' dS1_kb^T)).
# Summing the partials over kb gives the rowsum(dP * P) term exactly (P is a sum over K).


class DqkwAcc(NamedTuple):
  """Sums over the value dim for one K-column block (BK columns)."""
  dqs: Any      # dO S^T                        (C, BK)
  vds: Any      # v' dS1^T                      (C, BK)
  dw: Any       # -dv' S^T                      (C, BK)
  dp: Any       # dO v'^T  (masked by D later)  (C, C)
  tail: Any     # <dS1, S> over the block's rows (1, 1)


def dqkw_init(C: int, BK: int) -> DqkwAcc:
  z = lambda *sh: jnp.zeros(sh, jnp.float32)
  return DqkwAcc(dqs=z(C, BK), vds=z(C, BK), dw=z(C, BK), dp=z(C, C), tail=z(1, 1))


def dqkw_vblock(acc: DqkwAcc, do_CV, vnew_CV, dvnew_CV, s_KV, ds1_KV, *, cfg) -> DqkwAcc:
  """One V-block: `s_KV` / `ds1_KV` are the (K-block rows, V-block columns) of S and dS1."""
  return DqkwAcc(
      dqs=acc.dqs + mm(do_CV, s_KV, tb=True, cfg=cfg, low=True),
      vds=acc.vds + mm(vnew_CV, ds1_KV, tb=True, cfg=cfg, low=True),
      dw=acc.dw - mm(dvnew_CV, s_KV, tb=True, cfg=cfg, low=True),
      dp=acc.dp + mm(do_CV, vnew_CV, tb=True, cfg=cfg, low=True),
      tail=acc.tail + jnp.sum(_wide(ds1_KV) * _wide(s_KV),
                              keepdims=True))


def dqkw_epilogue(acc: DqkwAcc, q_CK, k_CK, gc_C1, gc_1C, *, cfg):
  """(dq, dk_direct, dgc column part, dgc row part) of one K block (`q_CK`, `k_CK`: its columns).

  dq is final; dk_direct = (dP * D)^T Q + r (v' dS1^T) still lacks the terms through T (wy).
  """
  C = q_CK.shape[0]
  gl = last_of(gc_C1)
  e, r = jnp.exp(gc_C1), jnp.exp(gl - gc_C1)
  qf, kf = _wide(q_CK), _wide(k_CK)
  dpd = acc.dp * decay_lower(gc_C1, gc_1C)              # (dO v'^T) * D, lower
  dq = e * acc.dqs + mm(dpd, k_CK, cfg=cfg, low=True)
  dkd = mm(dpd, q_CK, ta=True, cfg=cfg, low=True) + r * acc.vds
  m = dpd * mm(q_CK, k_CK, tb=True, cfg=cfg, low=True)  # this block's share of dP * P
  s_vec = r * jnp.sum(kf * acc.vds, axis=1, keepdims=True)
  last = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
  tail = jnp.exp(gl) * jnp.sum(acc.tail) + jnp.sum(s_vec)
  dgc_col = (e * jnp.sum(qf * acc.dqs, axis=1, keepdims=True) - s_vec
             + jnp.sum(m, axis=1, keepdims=True) + jnp.where(last, tail, 0.0))
  dgc_row = -jnp.sum(m, axis=0, keepdims=True)
  return dq, dkd, dgc_col, dgc_row


class WyCtx(NamedTuple):
  """What the wy backward keeps live across its V and K walks (T0 is needed only at the end:
  a kernel that has it in memory reloads it there instead of holding it in registers)."""
  t: Any        # T = T0 * D        (C, C)
  e: Any        # e^gc              (C, 1)


class WyAcc(NamedTuple):
  dt: Any       # du (beta V)^T + dw (beta e K)^T   (C, C)
  dbeta: Any    # (C, 1)
  dgc: Any      # (C, 1)


def wy_prologue(k_CK, beta_C1, gc_C1, gc_1C, *, cfg, t0_CC=None):
  """(WyCtx, zero accumulators, T0); `t0_CC` (from the prepass) skips recomputing the inverse."""
  C = k_CK.shape[0]
  t0 = chunk_inverse(k_CK, beta_C1, cfg=cfg) if t0_CC is None else _wide(t0_CC)
  z = lambda *sh: jnp.zeros(sh, jnp.float32)
  ctx = WyCtx(t=t0 * decay_lower(gc_C1, gc_1C), e=jnp.exp(gc_C1))
  return ctx, WyAcc(dt=z(C, C), dbeta=z(C, 1), dgc=z(C, 1)), t0


def wy_vblock(ctx: WyCtx, acc: WyAcc, v_CV, du_CV, beta_C1, *, cfg):
  """One V-block through u = T (beta V): returns (dv block, updated accumulators)."""
  vf = _wide(v_CV)
  du = _wide(du_CV)
  tdu = mm(ctx.t, du, ta=True, cfg=cfg)                 # T^T du
  acc = WyAcc(dt=acc.dt + mm(du, vf * beta_C1, tb=True, cfg=cfg),
              dbeta=acc.dbeta + jnp.sum(vf * tdu, axis=1, keepdims=True), dgc=acc.dgc)
  return beta_C1 * tdu, acc


def wy_kblock(ctx: WyCtx, acc: WyAcc, k_CK, dw_CK, beta_C1, *, cfg) -> WyAcc:
  """One K-block through w = T (beta e K)."""
  ek = ctx.e * _wide(k_CK)
  dw = _wide(dw_CK)
  x = jnp.sum(ek * mm(ctx.t, dw, ta=True, cfg=cfg), axis=1, keepdims=True)
  return WyAcc(dt=acc.dt + mm(dw, ek * beta_C1, tb=True, cfg=cfg), dbeta=acc.dbeta + x,
               dgc=acc.dgc + beta_C1 * x)


def wy_finish(ctx: WyCtx, acc: WyAcc, t0_CC, k_CK, gc_C1, gc_1C, *, cfg):
  """After both walks: (dA strict lower, dbeta, dgc column part, dgc row part); `k_CK` whole."""
  C = k_CK.shape[0]
  row, col = iota2(C, C)
  t0 = _wide(t0_CC)
  da = -mm(mm(t0, acc.dt * decay_lower(gc_C1, gc_1C), ta=True, cfg=cfg), t0, tb=True, cfg=cfg)
  da = jnp.where(row > col, da, 0.0)
  kk = mm(k_CK, k_CK, tb=True, cfg=cfg, low=True)
  dbeta = acc.dbeta + jnp.sum(da * kk, axis=1, keepdims=True)
  m = acc.dt * ctx.t                                    # dT * T
  return (da, dbeta, acc.dgc + jnp.sum(m, axis=1, keepdims=True),
          -jnp.sum(m, axis=0, keepdims=True))


def wy_dk(ctx: WyCtx, da_CC, k_CK, dw_CK, dkd_CK, beta_C1, *, cfg):
  """Final dk of one K block: dk_direct + beta e T^T dw + beta (dA K) + dA^T (beta K)."""
  kf = _wide(k_CK)
  tdw = mm(ctx.t, _wide(dw_CK), ta=True, cfg=cfg)
  return (_wide(dkd_CK) + beta_C1 * ctx.e * tdw + beta_C1 * mm(da_CC, kf, cfg=cfg)
          + mm(da_CC, kf * beta_C1, ta=True, cfg=cfg))


def chunk_grads_wy(q_CK, k_CK, v_CV, beta_C1, gc_C1, gc_1C, do_CV, s_KV, ds1_KV, *, cfg,
                   block_k: int, block_v: int):
  """`chunk_grads` by the WY decomposition, walked in the kernels' K and V blocks (the
  composition the Pallas kernels run, in one place for the tests). Same returns."""
  C, K = k_CK.shape
  V = v_CV.shape[1]
  _, w, u = chunk_wy(k_CK, v_CV, beta_C1, gc_C1, gc_1C, cfg=cfg)
  _, _, vnew = chunk_state_step_vnew(q_CK, k_CK, w, u, gc_C1, gc_1C, s_KV, cfg=cfg,
                                     with_output=False)
  _, dvnew = chunk_state_bwd_step_dv(q_CK, k_CK, w, do_CV, gc_C1, gc_1C, ds1_KV, cfg=cfg)
  kbs = [slice(i, i + block_k) for i in range(0, K, block_k)]
  vbs = [slice(j, j + block_v) for j in range(0, V, block_v)]
  dq, dkd, dw = [], [], []
  dgc_col, dgc_row = 0.0, 0.0
  for kb in kbs:
    acc = dqkw_init(C, kb.stop - kb.start)
    for vb in vbs:
      acc = dqkw_vblock(acc, do_CV[:, vb], vnew[:, vb], dvnew[:, vb], s_KV[kb, vb],
                        ds1_KV[kb, vb], cfg=cfg)
    dq_b, dkd_b, col_b, row_b = dqkw_epilogue(acc, q_CK[:, kb], k_CK[:, kb], gc_C1, gc_1C,
                                              cfg=cfg)
    dq.append(dq_b), dkd.append(dkd_b), dw.append(acc.dw)
    dgc_col, dgc_row = dgc_col + col_b, dgc_row + row_b
  ctx, wacc, t0 = wy_prologue(k_CK, beta_C1, gc_C1, gc_1C, cfg=cfg)
  dv = []
  for vb in vbs:
    dv_b, wacc = wy_vblock(ctx, wacc, v_CV[:, vb], dvnew[:, vb], beta_C1, cfg=cfg)
    dv.append(dv_b)
  for i, kb in enumerate(kbs):
    wacc = wy_kblock(ctx, wacc, k_CK[:, kb], dw[i], beta_C1, cfg=cfg)
  da, dbeta, col_w, row_w = wy_finish(ctx, wacc, t0, k_CK, gc_C1, gc_1C, cfg=cfg)
  dk = [wy_dk(ctx, da, k_CK[:, kb], dw[i], dkd[i], beta_C1, cfg=cfg) for i, kb in enumerate(kbs)]
  cat = lambda xs: jnp.concatenate(xs, axis=1)
  return cat(dq), cat(dk), cat(dv), dbeta, dgc_col + col_w, dgc_row + row_w
