"""Pallas TPU (Mosaic) kernels of the chunked gated delta rule, forward and backward.

Math: `chunk_math.py` (KERNELS.md §2b). The wrapper moves heads before time (`[B, H, T, D]`, so a
chunk is a `(C, D)` tile obeying the (8, 128) rule: C a multiple of 8, D = 128 or the full dim)
passes the gate vectors as columns `(C, 1)`. The chunk-local cumsum of log_gamma is a
lower-triangular-ones matmul inside the kernels (Mosaic has no cumsum); its row form comes from a
(C, C) transpose, never a narrow one, and the inverse is the blocked doubling of
`chunk_math.inverse_unit_lower` (16-wide diagonal blocks first, `chunk_math.stable_inverse_block`;
no triangular solve). f32 dots run at HIGHEST precision.

Kernels
  `_prepass`    grid (B, H, NC), all parallel: T0, w, u per chunk.
  `_state_fwd`  grid (B, H, NC), chunk axis "arbitrary": the state lives in a `VMEM((K, V), f32)`
                scratch across the chunk axis; writes o (or, for the backward, each chunk's
                entry state) and the final state.
  `_state_bwd`  grid (B, H, NC), chunk axis "arbitrary", walked backwards (index map
                c -> NC-1-c): dS in VMEM scratch; writes the cotangent leaving each chunk and
                d(initial state).
  `_grads`      grid (B, H, NC), all parallel: dq, dk, dv, dbeta, and dlog_gamma (reverse
                chunk-local cumsum as an upper-triangular-ones matmul; column + row parts).

Public: `gated_delta_fwd`, `gated_delta_bwd`, `unsupported_reason` (contract of
`xla_chunked.py`). Residuals = the primal inputs (the backward recomputes the states).
Run on CPU with `interpret=True` (or `pltpu.InterpretParams()`).

Dimension glossary
  B batch  T tokens (Tp padded)  H heads  K key dim  V value dim  C chunk  NC chunks
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta import chunk_math as cm

_F32 = jnp.float32


def unsupported_reason(q, k, v, *unused, chunk_size: int) -> str | None:
  """None when these kernels take the inputs, else what is wrong (and the fix)."""
  del unused
  if chunk_size % 8 or not 8 <= chunk_size <= 256:
    return (f"chunk_size={chunk_size}: the TPU kernels need a multiple of 8 in [8, 256] "
            "(64 or 128 recommended)")
  if q.dtype not in (jnp.float32, jnp.bfloat16) or not (k.dtype == v.dtype == q.dtype):
    return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: need one of f32/bf16 for all three"
  return None


def _dots(dtype) -> cm.Dots:
  """Exact f32 dots (the inverse: the default blocked doubling, `cm.stable_inverse_block`)."""
  return cm.Dots(dtype=jnp.dtype(dtype), f32_precision=cm.HIGHEST)


def _cumsum_gates(g_C1):
  """Chunk-local inclusive cumsum as a lower-triangular-ones matmul: (gc column, gc row).

  `G = tril(1) @ broadcast(g)` holds gc_i in every column of row i; the row form is read off its
  (C, C) transpose, so gc_i - gc_j uses the very same numbers for (i, j) and (j, i) and the
  decay matrix has an exact unit diagonal.
  """
  c = g_C1.shape[0]
  row, col = cm.iota2(c, c)
  g_cc = cm.mm(jnp.where(row >= col, 1.0, 0.0), jnp.broadcast_to(g_C1, (c, c)))
  return g_cc[:, 0:1], g_cc.T[0:1, :]


# ------------------------------------------------------------------------------------ kernels


def _prepass_kernel(k_ref, v_ref, beta_ref, gcol_ref, w_ref, u_ref, *, cfg):
  gc_c1, gc_1c = _cumsum_gates(gcol_ref[...])
  _, w, u = cm.chunk_wy(k_ref[...], v_ref[...], beta_ref[...], gc_c1, gc_1c, cfg=cfg)
  w_ref[...] = w.astype(w_ref.dtype)
  u_ref[...] = u.astype(u_ref.dtype)


def _state_fwd_kernel(q_ref, k_ref, w_ref, u_ref, gcol_ref, s0_ref, *refs, save_states, cfg):
  out_ref, send_ref, s_scr = refs
  c_idx = pl.program_id(2)

  @pl.when(c_idx == 0)
  def _():
    s_scr[...] = s0_ref[...].astype(_F32)

  gc_c1, gc_1c = _cumsum_gates(gcol_ref[...])
  s = s_scr[...]
  if save_states:
    out_ref[...] = s
  o, s_new = cm.chunk_state_step(q_ref[...], k_ref[...], w_ref[...], u_ref[...].astype(_F32),
                                 gc_c1, gc_1c, s, cfg=cfg, with_output=not save_states)
  if not save_states:
    out_ref[...] = o.astype(out_ref.dtype)
  s_scr[...] = s_new

  @pl.when(c_idx == pl.num_programs(2) - 1)
  def _():
    send_ref[...] = s_new


def _state_bwd_kernel(q_ref, k_ref, w_ref, do_ref, gcol_ref, dsT_ref, dstates_ref, ds0_ref, ds_scr,
                      *, cfg):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    ds_scr[...] = dsT_ref[...].astype(_F32)

  gc_c1, gc_1c = _cumsum_gates(gcol_ref[...])
  ds = ds_scr[...]
  dstates_ref[...] = ds
  ds = cm.chunk_state_bwd_step(q_ref[...], k_ref[...], w_ref[...], do_ref[...], gc_c1, gc_1c, ds,
                               cfg=cfg)
  ds_scr[...] = ds

  @pl.when(i == pl.num_programs(2) - 1)
  def _():
    ds0_ref[...] = ds


def _grads_kernel(q_ref, k_ref, v_ref, beta_ref, gcol_ref, do_ref, s_ref, ds_ref,
                  dq_ref, dk_ref, dv_ref, dbeta_ref, dgcol_ref, dgrow_ref, *, cfg):
  gc_c1, gc_1c = _cumsum_gates(gcol_ref[...])
  dq, dk, dv, dbeta, dgc_col, dgc_row = cm.chunk_grads(
      q_ref[...], k_ref[...], v_ref[...], beta_ref[...], gc_c1, gc_1c, do_ref[...], s_ref[...],
      ds_ref[...], cfg=cfg)
  c = dgc_col.shape[0]
  row, col = cm.iota2(c, c)
  # dlog_gamma_j = sum_{i >= j} dgc_i, for the column part and for the row part
  dgcol_ref[...] = cm.mm(jnp.where(row <= col, 1.0, 0.0), dgc_col)
  dgrow_ref[...] = cm.mm(dgc_row, jnp.where(row >= col, 1.0, 0.0))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dbeta_ref[...] = dbeta


# ------------------------------------------------------------------------------------ drivers


def _params(*sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


_PAR3 = ("parallel", "parallel", "parallel")
_SEQ3 = ("parallel", "parallel", "arbitrary")


def _specs(c, reverse=False, nc=None):
  """BlockSpec factories over [B, H, Tp, D] tokens, [B, H, Tp, 1] columns, [B, H, NC, 1, C] rows,
  [B, H, NC, K, V] per-chunk states."""
  cc = (lambda n: nc - 1 - n) if reverse else (lambda n: n)
  tok = lambda d: pl.BlockSpec((None, None, c, d), lambda b, h, n: (b, h, cc(n), 0))
  colv = pl.BlockSpec((None, None, c, 1), lambda b, h, n: (b, h, cc(n), 0))
  rowv = pl.BlockSpec((None, None, None, 1, c), lambda b, h, n: (b, h, cc(n), 0, 0))
  st = lambda kd, vd: pl.BlockSpec((None, None, None, kd, vd), lambda b, h, n: (b, h, cc(n), 0, 0))
  whole = lambda kd, vd: pl.BlockSpec((None, None, kd, vd), lambda b, h, n: (b, h, 0, 0))
  return tok, colv, rowv, st, whole


def _prepare(q, k, v, log_gamma, beta, initial_state, chunk_size):
  reason = unsupported_reason(q, k, v, chunk_size=chunk_size)
  if reason is not None:
    raise ValueError(f"gated_delta tpu: {reason}")
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  c = chunk_size
  nc = max(1, -(-t // c))
  tp = nc * c

  def heads_first(x):  # [B, T, H, ...] -> [B, H, Tp, ...], identity tokens as padding
    x = jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x, 2, 1)

  q, k, v = (heads_first(x) for x in (q, k, v))
  g = heads_first(log_gamma.astype(_F32))                   # [B, H, Tp]
  beta_col = heads_first(beta.astype(_F32))[..., None]       # [B, H, Tp, 1]
  g_col = g[..., None]                                       # [B, H, Tp, 1]
  s0 = (jnp.zeros((b, h, kd, vd), _F32) if initial_state is None
        else initial_state.astype(_F32))
  return q, k, v, beta_col, g_col, s0


def _prepass(k, v, beta_col, g_col, *, c, interpret):
  b, h, tp, kd = k.shape
  vd = v.shape[-1]
  nc = tp // c
  tok, colv, rowv, _, _ = _specs(c)
  return pl.pallas_call(
      functools.partial(_prepass_kernel, cfg=_dots(k.dtype)),
      grid=(b, h, nc),
      in_specs=[tok(kd), tok(vd), colv, colv],
      out_specs=[tok(kd), tok(vd)],
      out_shape=[jax.ShapeDtypeStruct((b, h, tp, kd), k.dtype),
                 jax.ShapeDtypeStruct((b, h, tp, vd), k.dtype)],
      compiler_params=_params(*_PAR3), interpret=interpret, name="gdn_tpu_prepass",
  )(k, v, beta_col, g_col)


def _state_fwd(q, k, w, u, g_col, s0, *, c, save_states, interpret):
  b, h, tp, kd = q.shape
  vd = u.shape[-1]
  nc = tp // c
  tok, colv, rowv, st, whole = _specs(c)
  if save_states:
    first = (st(kd, vd), jax.ShapeDtypeStruct((b, h, nc, kd, vd), _F32))
  else:
    first = (tok(vd), jax.ShapeDtypeStruct((b, h, tp, vd), _F32))
  return pl.pallas_call(
      functools.partial(_state_fwd_kernel, save_states=save_states, cfg=_dots(q.dtype)),
      grid=(b, h, nc),
      in_specs=[tok(kd), tok(kd), tok(kd), tok(vd), colv, whole(kd, vd)],
      out_specs=[first[0], whole(kd, vd)],
      out_shape=[first[1], jax.ShapeDtypeStruct((b, h, kd, vd), _F32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), _F32)],
      compiler_params=_params(*_SEQ3), interpret=interpret, name="gdn_tpu_state_fwd",
  )(q, k, w, u, g_col, s0)


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def gated_delta_fwd(q, k, v, log_gamma, beta, initial_state=None, *, chunk_size=128,
                    interpret=False):
  """(o_BTHV f32, final_state_BHKV f32)."""
  t = q.shape[1]
  c = chunk_size
  q, k, v, beta_col, g_col, s0 = _prepare(q, k, v, log_gamma, beta, initial_state, c)
  w, u = _prepass(k, v, beta_col, g_col, c=c, interpret=interpret)
  o, s_final = _state_fwd(q, k, w, u, g_col, s0, c=c, save_states=False, interpret=interpret)
  return jnp.moveaxis(o, 1, 2)[:, :t], s_final


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def gated_delta_bwd(q, k, v, log_gamma, beta, initial_state, do, dfinal_state, *, chunk_size=128,
                    interpret=False):
  """VJP from the primal inputs: (dq, dk, dv, dlog_gamma, dbeta, dinitial_state)."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  c = chunk_size
  if do.shape != (b, t, h, vd):
    raise ValueError(f"do must have o's shape {(b, t, h, vd)}; got {do.shape}")
  in_dtypes = (q.dtype, k.dtype, v.dtype, log_gamma.dtype, beta.dtype)
  q, k, v, beta_col, g_col, s0 = _prepare(q, k, v, log_gamma, beta, initial_state, c)
  tp = q.shape[2]
  nc = tp // c
  do = jnp.moveaxis(jnp.pad(do.astype(_F32), [(0, 0), (0, tp - t), (0, 0), (0, 0)]), 2, 1)
  dsT = (jnp.zeros((b, h, kd, vd), _F32) if dfinal_state is None
         else dfinal_state.astype(_F32))
  cfg = _dots(q.dtype)
  w, u = _prepass(k, v, beta_col, g_col, c=c, interpret=interpret)
  states, _ = _state_fwd(q, k, w, u, g_col, s0, c=c, save_states=True, interpret=interpret)
  tok, colv, rowv, st, whole = _specs(c, reverse=True, nc=nc)
  dstates, ds0 = pl.pallas_call(
      functools.partial(_state_bwd_kernel, cfg=cfg),
      grid=(b, h, nc),
      in_specs=[tok(kd), tok(kd), tok(kd), tok(vd), colv, whole(kd, vd)],
      out_specs=[st(kd, vd), whole(kd, vd)],
      out_shape=[jax.ShapeDtypeStruct((b, h, nc, kd, vd), _F32),
                 jax.ShapeDtypeStruct((b, h, kd, vd), _F32)],
      scratch_shapes=[pltpu.VMEM((kd, vd), _F32)],
      compiler_params=_params(*_SEQ3), interpret=interpret, name="gdn_tpu_state_bwd",
  )(q, k, w, do, g_col, dsT)
  tok, colv, rowv, st, _ = _specs(c)
  dq, dk, dv, dbeta, dg_col, dg_row = pl.pallas_call(
      functools.partial(_grads_kernel, cfg=cfg),
      grid=(b, h, nc),
      in_specs=[tok(kd), tok(kd), tok(vd), colv, colv, tok(vd), st(kd, vd), st(kd, vd)],
      out_specs=[tok(kd), tok(kd), tok(vd), colv, colv, rowv],
      out_shape=[jax.ShapeDtypeStruct((b, h, tp, kd), in_dtypes[0]),
                 jax.ShapeDtypeStruct((b, h, tp, kd), in_dtypes[1]),
                 jax.ShapeDtypeStruct((b, h, tp, vd), in_dtypes[2]),
                 jax.ShapeDtypeStruct((b, h, tp, 1), _F32),
                 jax.ShapeDtypeStruct((b, h, tp, 1), _F32),
                 jax.ShapeDtypeStruct((b, h, nc, 1, c), _F32)],
      compiler_params=_params(*_PAR3), interpret=interpret, name="gdn_tpu_grads",
  )(q, k, v, beta_col, g_col, do, states, dstates)
  dlog_gamma = dg_col[..., 0] + dg_row.reshape(b, h, tp)
  back = lambda x: jnp.moveaxis(x, 1, 2)[:, :t]
  return (back(dq), back(dk), back(dv), back(dlog_gamma).astype(in_dtypes[3]),
          back(dbeta[..., 0]).astype(in_dtypes[4]), ds0)
