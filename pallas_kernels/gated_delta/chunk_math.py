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

Layout convention: per-token gate vectors are passed both as a column `(C, 1)` and a row
`(1, C)` so no kernel needs a narrow transpose; the gate gradient comes back as a column part
plus a row part (the caller adds them).

Dimension glossary
  C   chunk length        K   key / query dim        V   value dim (or a block of it)
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
  """
  dtype: Any = jnp.float32
  f32_precision: Any = HIGHEST
  mid_precision: Any = None


def mm(a, b, *, ta: bool = False, tb: bool = False, cfg: Dots = Dots(), low: bool = False,
       inverse: bool = False):
  """`op(a) @ op(b)` with f32 accumulation. `low`: operands in `cfg.dtype`, else f32."""
  wide = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)  # f32 (f64 oracle)
  dt = cfg.dtype if low else wide
  acc = jnp.float32 if low else wide
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


def iota2(n: int, m: int):
  """(row index, column index) int32 grids of shape (n, m)."""
  return (lax.broadcasted_iota(jnp.int32, (n, m), 0), lax.broadcasted_iota(jnp.int32, (n, m), 1))


def inverse_unit_lower(a_CC, cfg: Dots = Dots()):
  """`(I + a)^-1` for strictly-lower `a` by doubling, in f32 or wider (`cfg.f32_precision`).

  With `N = -a` (nilpotent, N^C = 0): `(I - N)^-1 = prod_{i<m} (I + N^(2^i))`, 2^m >= C.
  m - 1 squarings and as many products; no triangular solve.
  """
  C = a_CC.shape[0]
  dt = jnp.promote_types(a_CC.dtype, jnp.float32)  # f32 in kernels, f64 for the fp64 oracle tests
  row, col = iota2(C, C)
  eye = jnp.where(row == col, 1.0, 0.0).astype(dt)
  n = -a_CC.astype(dt)
  x = eye + n
  p = n
  steps = (C - 1).bit_length() - 1  # m - 1 with 2^m >= C
  for _ in range(steps):
    p = mm(p, p, cfg=cfg, inverse=True)
    x = x + mm(x, p, cfg=cfg, inverse=True)
  return x


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
  kf = k_CK.astype(jnp.float32)
  w = mm(t, kf * (beta_C1 * jnp.exp(gc_C1)), cfg=cfg)
  u = mm(t, v_CV.astype(jnp.float32) * beta_C1, cfg=cfg)
  return (t, w, u, t0) if with_t0 else (t, w, u)


def chunk_state_step(q_CK, k_CK, w_CK, u_CV, gc_C1, gc_1C, s_KV, *, cfg, with_output=True):
  """One chunk of the sequential state pass: returns (o_CV | None, new state S_KV), f32.

  `s_KV` may be a V-block of the state (all columns are independent).
  """
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  gl = last_of(gc_C1)
  v_new = u_CV - mm(w_CK, s_KV, cfg=cfg, low=True)
  o = None
  if with_output:
    qf = q_CK.astype(jnp.float32)
    p = (jnp.where(row >= col, mm(q_CK, k_CK, tb=True, cfg=cfg, low=True), 0.0)
         * decay_lower(gc_C1, gc_1C))
    o = mm(qf * jnp.exp(gc_C1), s_KV, cfg=cfg, low=True) + mm(p, v_new, cfg=cfg, low=True)
  kr = k_CK.astype(jnp.float32) * jnp.exp(gl - gc_C1)
  s_new = jnp.exp(gl) * s_KV + mm(kr, v_new, ta=True, cfg=cfg, low=True)
  return o, s_new


def chunk_state_bwd_step(q_CK, k_CK, w_CK, do_CV, gc_C1, gc_1C, ds_KV, *, cfg):
  """One chunk of the reverse state pass: cotangent of the state leaving the chunk -> entering."""
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  gl = last_of(gc_C1)
  p = (jnp.where(row >= col, mm(q_CK, k_CK, tb=True, cfg=cfg, low=True), 0.0)
       * decay_lower(gc_C1, gc_1C))
  kr = k_CK.astype(jnp.float32) * jnp.exp(gl - gc_C1)
  dv_new = mm(p, do_CV, ta=True, cfg=cfg, low=True) + mm(kr, ds_KV, cfg=cfg, low=True)
  qe = q_CK.astype(jnp.float32) * jnp.exp(gc_C1)
  return (jnp.exp(gl) * ds_KV + mm(qe, do_CV, ta=True, cfg=cfg, low=True)
          - mm(w_CK, dv_new, ta=True, cfg=cfg, low=True))


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


def grads_prologue(q_CK, k_CK, beta_C1, gc_C1, gc_1C, *, cfg, t0_CC=None) -> GradCtx:
  """Value-independent backward quantities; `t0_CC` (if given) skips recomputing the inverse."""
  C = q_CK.shape[0]
  row, col = iota2(C, C)
  gl = last_of(gc_C1)
  d = decay_lower(gc_C1, gc_1C)
  kk = mm(k_CK, k_CK, tb=True, cfg=cfg, low=True)
  t0 = (inverse_unit_lower(jnp.where(row > col, beta_C1 * kk, 0.0), cfg) if t0_CC is None
        else t0_CC.astype(jnp.float32))
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
  """
  C, K = k_CK.shape
  ctx = grads_prologue(q_CK, k_CK, beta_C1, gc_C1, gc_1C, cfg=cfg)
  dv, acc = grads_vblock(ctx, grads_init(C, K), q_CK, k_CK, beta_C1, v_CV, do_CV, s_KV, ds1_KV,
                         cfg=cfg)
  dq, dk, dbeta, dgc_col, dgc_row = grads_epilogue(ctx, acc, q_CK, k_CK, beta_C1, cfg=cfg)
  return dq, dk, dv, dbeta, dgc_col, dgc_row
