"""Backward kernels of the Pallas-Triton gated delta rule and their drivers (`gpu_triton.py`).

The gradients follow the WY decomposition (FLA's, in our convention; `chunk_math` "WY
decomposition"): w = T (beta e K) and u = T (beta V) are intermediates of v' = u - w S.

  `gdn_state_bwd` grid (B, H, P, V/BV), BV = `Tuning.bwd_block_v`: reverse chunk walk of dS
                  (the forward's affine piece split: dS_in = M dS_out + F,
                  `gdn_state_bwd_affine`, width V + K; or width V only with M = A^T, the
                  forward's piece transition, `Tuning.bwd_split="reuse"`); writes the
                  cotangent dS1 leaving each chunk, d(initial state) and dv' = P^T dO + (K r) dS1
                  per chunk (stored in `Tuning.dv_dtype`).
  `gdn_dqkw`      grid (B, H, NC, K/BK), BK = `Tuning.block_k`: V walked in blocks, accumulates
                  dO S^T, v' dS1^T, -dv' S^T (C x BK) and dO v'^T (C x C, recomputed per K
                  block); writes dq (final), dk_direct f32, dw = -dv' S^T f32 and the K block's
                  dgc partial [K/BK, B, Tp, H] (summed in XLA).
  `gdn_wy_bwd`    grid (B, H, NC): through u = T (beta V), w = T (beta e K) and T = T0 * D (T0
                  from the prepass or recomputed, `Tuning.wy_t0`): dv, dk (= dk_direct + the
                  terms through T), dbeta, the rest of dgc. Nothing holds more than one C x C
                  accumulator and three C x BK ones.

Dimension glossary
  B batch  T tokens (Tp padded)  H heads  K key dim (kd)  V value dim (vd)  C chunk (c)
  NC chunks (nc)  P sequence pieces  BV value block  BK key block
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta import chunk_math as cm
from pallas_kernels.gated_delta import gpu_common as gpc


def _state_bwd_kernel(q_ref, k_ref, w_ref, do_ref, gc_ref, dsout_ref, *out_refs, c, cp, nvb,
                      mode, cfg):
  """Reverse walk of piece p's chunks. mode "states": writes the cotangent leaving each chunk and
  the one entering the piece; "affine": from [0 | I] with cotangents [do | 0] (width V + K),
  writes the piece's entering cotangent [F | M] (dS_in = M dS_out + F). "states" with a third
  output ref also writes dv' per chunk (for `gdn_dqkw` / `gdn_wy_bwd`)."""
  p = pl.program_id(2)
  vb = pl.program_id(3)
  kdim, bv = dsout_ref.shape
  if mode == "affine":
    (dsin_ref,) = out_refs
    is_m = vb >= nvb
    row, col = cm.iota2(kdim, bv)
    ds_init = jnp.where(is_m, jnp.where(row == col + (vb - nvb) * bv, 1.0, 0.0), 0.0)
  else:
    dstates_ref, dsin_ref, *dvnew_ref = out_refs
    ds_init = dsout_ref[...].astype(jnp.float32)

  def body(i, ds):
    idx = p * cp + cp - 1 - i
    sl = pl.ds(idx * c, c)
    gc = gc_ref[sl]
    do = do_ref[sl, :]
    if mode == "affine":
      do = jnp.where(is_m, 0.0, do)
    else:
      dstates_ref[idx] = ds.astype(dstates_ref.dtype)
    ds_in, dv_new = cm.chunk_state_bwd_step_dv(q_ref[sl, :], k_ref[sl, :], w_ref[sl, :], do,
                                               gc.reshape(c, 1), gc.reshape(1, c), ds, cfg=cfg)
    if mode != "affine" and dvnew_ref:
      dvnew_ref[0][sl, :] = dv_new.astype(dvnew_ref[0].dtype)
    return ds_in

  dsin_ref[...] = jax.lax.fori_loop(0, cp, body, ds_init.astype(jnp.float32))


def _state_bwd_pass(q, k, w, do, gc, ds_out, *, c, mode, tuning, interpret, with_dv=False,
                    with_m=True):
  """ds_out [B, H, P, K, V]: cotangent leaving each piece (ignored in "affine" mode).
  `with_dv` ("states" mode): also dv' per chunk, [B, Tp, H, V] in `tuning.dv_dtype`.
  `with_m` ("affine" mode): [F | M] (width V + K); False: F alone (width V)."""
  b, tp, h, kd = q.shape
  vd = do.shape[-1]
  npieces = ds_out.shape[2]
  nc = tp // c
  bv = gpc.bwd_block_v(kd, vd, tuning)
  nvb = vd // bv
  clamp = (lambda n: jnp.minimum(n, nvb - 1)) if mode == "affine" else (lambda n: n)
  full = lambda d: pl.BlockSpec((None, tp, None, d), lambda i, j, p, n: (i, 0, j, 0))
  piece_in = pl.BlockSpec((None, None, None, kd, bv), lambda i, j, p, n: (i, j, p, 0, clamp(n)))
  piece_out = pl.BlockSpec((None, None, None, kd, bv), lambda i, j, p, n: (i, j, p, 0, n))
  if mode == "affine":
    width = vd + kd if with_m else vd
    nblocks = width // bv
    out_specs = [piece_out]
    out_shape = [jax.ShapeDtypeStruct((b, h, npieces, kd, width), jnp.float32)]
  else:
    nblocks = nvb
    out_specs = [pl.BlockSpec((None, None, nc, kd, bv), lambda i, j, p, n: (i, j, 0, 0, n)),
                 piece_out]
    out_shape = [jax.ShapeDtypeStruct((b, h, nc, kd, vd),
                                      gpc.storage(tuning.states_dtype, q.dtype)),
                 jax.ShapeDtypeStruct((b, h, npieces, kd, vd), jnp.float32)]
    if with_dv:
      out_specs.append(pl.BlockSpec((None, tp, None, bv), lambda i, j, p, n: (i, 0, j, n)))
      out_shape.append(jax.ShapeDtypeStruct((b, tp, h, vd),
                                            gpc.storage(tuning.dv_dtype, q.dtype)))
  return pl.pallas_call(
      functools.partial(_state_bwd_kernel, c=c, cp=nc // npieces, nvb=nvb, mode=mode,
                        cfg=gpc.dots(q.dtype, interpret, tuning)),
      grid=(b, h, npieces, nblocks),
      in_specs=[full(kd), full(kd), full(kd),
                pl.BlockSpec((None, tp, None, bv), lambda i, j, p, n: (i, 0, j, clamp(n))),
                pl.BlockSpec((None, tp, None), lambda i, j, p, n: (i, 0, j)),
                piece_in],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=gpc.params(tuning.bwd_state_warps, gpc.stages(q.dtype, tuning)),
      interpret=interpret, name="gdn_state_bwd_affine" if mode == "affine" else "gdn_state_bwd",
  )(q, k, w, do, gc, ds_out)


def backward_states(q, k, w, do, gc, dsT, *, c, pieces, tuning, interpret, with_dv=False,
                    transition=None):
  """Reverse state pass (split into pieces when useful): (per-chunk leaving cotangents, dS0)
  [+ dv' per chunk with `with_dv`]. `transition`: the forward's piece transitions A
  [B, H, P, K, K] (S_end = A S_start + E) for a split call: the reverse map of a piece is
  dS_in = A^T dS_out + F, so the affine pass computes F alone (width V, not V + K)."""
  b, tp, h, kd = q.shape
  vd = do.shape[-1]
  npieces = gpc.num_pieces(b, h, tp // c, kd, vd, pieces, tuning)
  if npieces == 1:
    ds_out = dsT[:, :, None]
  else:
    zeros = jnp.zeros((b, h, npieces, kd, vd), jnp.float32)
    aug = _state_bwd_pass(q, k, w, do, gc, zeros, c=c, mode="affine", tuning=tuning,
                          interpret=interpret, with_m=transition is None)[0]
    if transition is not None:
      if transition.shape != (b, h, npieces, kd, kd):
        raise ValueError(f"transition has shape {transition.shape}; expected "
                         f"{(b, h, npieces, kd, kd)} (the forward's A at the same pieces)")
      aug = jnp.concatenate([aug, jnp.swapaxes(transition, -1, -2)], axis=-1)
    ds_out = gpc.piece_starts(aug, dsT, reverse=True, unroll=tuning.piece_scan_unroll)
  dstates, ds_in, *dv = _state_bwd_pass(q, k, w, do, gc, ds_out, c=c, mode="states",
                                        tuning=tuning, interpret=interpret, with_dv=with_dv)
  return (dstates, ds_in[:, :, 0], *dv)


def _dqkw_kernel(q_ref, k_ref, gc_ref, do_ref, vn_ref, dvn_ref, s_ref, ds_ref,
                 dq_ref, dkd_ref, dw_ref, pdgc_ref, *, bv, cfg):
  """Gradients, part 1: one (chunk, K-column block): dq (final), dk_direct, dw and this
  block's share of dgc; the value dim walked in blocks of `bv`. Nothing through T."""
  c, bk = q_ref.shape
  vd = do_ref.shape[-1]
  gc = gc_ref[...]
  acc = cm.dqkw_init(c, bk)
  for j in range(vd // bv):
    cols = slice(j * bv, (j + 1) * bv)
    acc = cm.dqkw_vblock(acc, do_ref[:, cols], vn_ref[:, cols].astype(jnp.float32),
                         dvn_ref[:, cols].astype(jnp.float32),
                         s_ref[:, cols].astype(jnp.float32), ds_ref[:, cols].astype(jnp.float32),
                         cfg=cfg)
  dq, dkd, dgc_col, dgc_row = cm.dqkw_epilogue(acc, q_ref[...], k_ref[...], gc.reshape(c, 1),
                                               gc.reshape(1, c), cfg=cfg)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dkd_ref[...] = dkd
  dw_ref[...] = acc.dw
  pdgc_ref[...] = dgc_col.reshape(c) + dgc_row.reshape(c)


def _wy_bwd_kernel(k_ref, v_ref, beta_ref, gc_ref, dvn_ref, dw_ref, dkd_ref, *refs, bk, bv, cfg):
  """Gradients, part 2: one chunk, through u = T (beta V), w = T (beta e K) and T:
  dk, dv, dbeta, and the dgc terms through T. `refs`: [t0_ref,] then the outputs."""
  t0_ref, (dk_ref, dv_ref, dbeta_ref, dgc_ref) = (refs[0] if len(refs) == 5 else None), refs[-4:]
  c, kd = k_ref.shape
  vd = v_ref.shape[-1]
  beta_c1, gc_c1, gc_1c = gpc.gates(beta_ref, gc_ref, 0, c)
  ctx, acc, t0 = cm.wy_prologue(k_ref[...], beta_c1, gc_c1, gc_1c, cfg=cfg,
                                t0_CC=None if t0_ref is None else t0_ref[...])
  for j in range(vd // bv):
    cols = slice(j * bv, (j + 1) * bv)
    dv, acc = cm.wy_vblock(ctx, acc, v_ref[:, cols], dvn_ref[:, cols], beta_c1, cfg=cfg)
    dv_ref[:, cols] = dv.astype(dv_ref.dtype)
  for j in range(kd // bk):
    cols = slice(j * bk, (j + 1) * bk)
    acc = cm.wy_kblock(ctx, acc, k_ref[:, cols], dw_ref[:, cols], beta_c1, cfg=cfg)
  t0 = t0 if t0_ref is None else t0_ref[...]  # reload: not held in registers across the walks
  da, dbeta, dgc_col, dgc_row = cm.wy_finish(ctx, acc, t0, k_ref[...], gc_c1, gc_1c, cfg=cfg)
  for j in range(kd // bk):
    cols = slice(j * bk, (j + 1) * bk)
    dk = cm.wy_dk(ctx, da, k_ref[:, cols], dw_ref[:, cols], dkd_ref[:, cols], beta_c1, cfg=cfg)
    dk_ref[:, cols] = dk.astype(dk_ref.dtype)
  dbeta_ref[...] = dbeta.reshape(c)
  dgc_ref[...] = dgc_col.reshape(c) + dgc_row.reshape(c)


def dqkw(q, k, gc, do, vnew, dvnew, states, dstates, *, c, dq_dtype, tuning, interpret):
  """`gdn_dqkw`, grid (B, H, NC, K/BK): (dq, dk_direct f32, dw f32, dgc partials
  [K/BK, B, Tp, H])."""
  b, tp, h, kd = q.shape
  vd = do.shape[-1]
  nc = tp // c
  bk = gpc.block_k(kd, tuning)
  nkb = kd // bk
  kblk = pl.BlockSpec((None, c, None, bk), lambda i, j, n, m: (i, n, j, m))
  vall = pl.BlockSpec((None, c, None, vd), lambda i, j, n, m: (i, n, j, 0))
  gate = pl.BlockSpec((None, c, None), lambda i, j, n, m: (i, n, j))
  st = pl.BlockSpec((None, None, None, bk, vd), lambda i, j, n, m: (i, j, n, m, 0))
  f32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.float32)
  return pl.pallas_call(
      functools.partial(_dqkw_kernel, bv=gpc.block_v(kd, vd, tuning),
                        cfg=gpc.dots(q.dtype, interpret, tuning)),
      grid=(b, h, nc, nkb),
      in_specs=[kblk, kblk, gate, vall, vall, vall, st, st],
      out_specs=[kblk, kblk, kblk,
                 pl.BlockSpec((None, None, c, None), lambda i, j, n, m: (m, i, n, j))],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), dq_dtype), f32(b, tp, h, kd),
                 f32(b, tp, h, kd), f32(nkb, b, tp, h)],
      compiler_params=gpc.params(tuning.dqkw_warps, 1), interpret=interpret, name="gdn_dqkw",
  )(q, k, gc, do, vnew, dvnew, states, dstates)


def wy_bwd(k, v, beta, gc, dvnew, dw, dkd, t0, *, c, out_dtypes, tuning, interpret):
  """`gdn_wy_bwd`, grid (B, H, NC): (dk, dv, dbeta, dgc through T) of every chunk; `t0` None =
  recompute the inverse."""
  b, tp, h, kd = k.shape
  vd = v.shape[-1]
  nc = tp // c
  tok = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  gate = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  in_specs = [tok(kd), tok(vd), gate, gate, tok(vd), tok(kd), tok(kd)]
  args = [k, v, beta, gc, dvnew, dw, dkd]
  if t0 is not None:
    in_specs.append(tok(c))
    args.append(t0)
  f32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.float32)
  return pl.pallas_call(
      functools.partial(_wy_bwd_kernel, bk=gpc.block_k(kd, tuning), bv=gpc.block_v(kd, vd, tuning),
                        cfg=gpc.dots(k.dtype, interpret, tuning)),
      grid=(b, h, nc),
      in_specs=in_specs,
      out_specs=[tok(kd), tok(vd), gate, gate],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), out_dtypes[1]),
                 jax.ShapeDtypeStruct((b, tp, h, vd), out_dtypes[2]), f32(b, tp, h),
                 f32(b, tp, h)],
      compiler_params=gpc.params(tuning.wy_warps, 1), interpret=interpret, name="gdn_wy_bwd",
  )(*args)
