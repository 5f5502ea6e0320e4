"""Pallas-Triton backward of the Polar core op `attention_stats` (KERNELS.md §2a).

Two kernels, both with ds = pi (dp - delta') + cq pi^2 (delta', cq from the api's per-row
prologue) and each recomputing the base-2 logits, pi and dP:
  dQ   query-parallel, grid (B*H, query tiles, heaviest first); also gives dscale = q . dQ/scale.
  dK/dV  key-parallel, grid (B*G, key tiles); walks the GQA group's R query heads and the query
       tiles in the band, so dK/dV are summed over the group in-kernel. `dkv_flat_heads` (the
       default) walks the (head, query tile) pairs in one loop per phase (ptxas: 1.1 KB register
       spills vs 4.7 KB for the per-head loops).
Inputs are read in the batch-major layout `[B, T, heads, D]`; the per-row vectors go as
[B, H, T]. Padded query rows get lse = +1e30, so pi = 0 for them.

Measured on an H100 (bf16, 8/2 heads, D=128, causal):
  (B, T) = (4, 8K), bench/results/polar_bwd_variants_h100.json: backward alone 4.61 ms with
  flat dK/dV loops (4.89 ms per-head); forward+backward 6.26 ms (6.45 per-head); cuDNN 4.02 ms.
  A fused key-parallel backward adding dQ with atomics was 2.6x slower (11.96 ms) and removed.
  bench/results/polar_attention_h100_run1.json (per-head dK/dV loops, before the flat default):
  forward+backward 2.57 ms at (16, 2K) (cuDNN 1.80), 22.5 ms at (1, 32K) (cuDNN 14.8).

Dimension glossary
  B batch   Tq/Tk query/key rows   H query heads   G KV heads   R = H // G   D head dim
  bq/bk query/key block   nq number of query blocks (after padding)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.polar_attention import bands, gpu_tiles, reference
from pallas_kernels.polar_attention.gpu_tiles import (
    DEFAULT_CONFIG, LOG2E, NEG, OFFSET_SPEC, PAD_LSE, BlockConfig, _dot, _fit_block,
    _heads_three_phase, _key_block_logits, _offset_arg, _pad_axis1, _rev_q, _rows_bht,
    _static_offset, _three_phase, _with_offset)


def _dq_kernel(q_ref, k_ref, v_ref, s_ref, do_ref, lse_ref, dl_ref, cq_ref, dq_ref, dsc_ref,
               *, bq, bk, tk, q_offset, window):
  i = pl.num_programs(1) - 1 - pl.program_id(1)  # must match _rev_q in the BlockSpecs
  q = q_ref[...]
  do = do_ref[...]
  scale_q = s_ref[...]
  scale2_q = scale_q * LOG2E
  lse2_q = lse_ref[...] * LOG2E
  delta_q = dl_ref[...]
  cq_q = cq_ref[...]
  p0 = q_offset + i * bq
  rows_q = p0 + jnp.arange(bq)

  def body(kb, acc_qd, masked):
    start = pl.multiple_of(kb * bk, bk)
    k, v, s_qk, _ = _key_block_logits(q, k_ref, v_ref, scale2_q, rows_q, start, bk, tk=tk,
                                      window=window, masked=masked)
    pi_qk = jnp.exp2(s_qk - lse2_q[:, None])
    dp_qk = _dot(do, v, trans_b=True)
    ds_qk = pi_qk * (dp_qk - delta_q[:, None]) + cq_q[:, None] * pi_qk * pi_qk
    return acc_qd + _dot(ds_qk.astype(k.dtype), k)

  band = bands.key_band(p0, p0 + bq - 1, bk=bk, tk=tk, window=window)
  acc_qd = _three_phase(*band, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (acc_qd * scale_q[:, None]).astype(dq_ref.dtype)
  dsc_ref[...] = jnp.sum(acc_qd * q.astype(jnp.float32), axis=1)


def _dkv_kernel(q_ref, k_ref, v_ref, s_ref, do_ref, lse_ref, dl_ref, cq_ref, dk_ref, dv_ref,
                *, bq, bk, tk, nq, q_offset, window, group, flat):
  kb = pl.program_id(1)
  k = k_ref[...]
  v = v_ref[...]
  k0 = kb * bk
  cols_k = k0 + jnp.arange(bk)
  band = bands.query_band(k0, k0 + bk - 1, bq=bq, nq=nq, q_offset=q_offset,
                          tk_block_ok=(kb + 1) * bk <= tk, window=window)

  def body(qb, r, carry, masked):  # query tile qb of the group's head r; dK/dV summed here
    dk_kd, dv_kd = carry
    start = pl.multiple_of(qb * bq, bq)
    rows = pl.ds(start, bq)
    q = q_ref.at[rows, r, :][...]
    do = do_ref.at[rows, r, :][...]
    scale_q = s_ref.at[r, rows][...]
    lse2_q = lse_ref.at[r, rows][...] * LOG2E
    delta_q = dl_ref.at[r, rows][...]
    cq_q = cq_ref.at[r, rows][...]
    s_kq = _dot(k, q, trans_b=True) * (scale_q * LOG2E)[None, :]
    if masked:
      valid = bands.visible((q_offset + start + jnp.arange(bq))[None, :], cols_k[:, None],
                            tk=tk, window=window)
      s_kq = jnp.where(valid, s_kq, NEG)
    pi_kq = jnp.exp2(s_kq - lse2_q[None, :])
    dv_kd = dv_kd + _dot(pi_kq.astype(do.dtype), do)
    dp_kq = _dot(v, do, trans_b=True)
    ds_kq = pi_kq * (dp_kq - delta_q[None, :]) + cq_q[None, :] * pi_kq * pi_kq
    dk_kd = dk_kd + _dot((ds_kq * scale_q[None, :]).astype(q.dtype), q)
    return dk_kd, dv_kd

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk_kd, dv_kd = _heads_three_phase(band, group, body, carry, flat=flat)
  dk_ref[...] = dk_kd.astype(dk_ref.dtype)
  dv_ref[...] = dv_kd.astype(dv_ref.dtype)


def _bwd_dq(off, q, k, v, scale, do, lse, delta, cq, *, H, R, bq, bk, tk, q_offset, window,
            num_warps, num_stages, interpret):
  """dQ (+ dscale) kernel on padded inputs: query-parallel, grid (query blocks, B*H)."""
  B, tq_pad, _, D = q.shape
  tk_pad = k.shape[1]
  nq = tq_pad // bq
  row_spec = pl.BlockSpec((None, None, bq), lambda bh, i: (bh // H, bh % H, nq - 1 - i))
  tile_spec = pl.BlockSpec((None, bq, None, D), _rev_q(nq, H, D))
  kv_spec = pl.BlockSpec((None, tk_pad, None, D), lambda bh, i: (bh // H, 0, (bh % H) // R, 0))
  return pl.pallas_call(
      _with_offset(functools.partial(_dq_kernel, bq=bq, bk=bk, tk=tk, window=window), q_offset),
      grid=(B * H, nq),
      in_specs=[OFFSET_SPEC, tile_spec, kv_spec, kv_spec, row_spec, tile_spec, row_spec,
                row_spec, row_spec],
      out_specs=[tile_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((B, tq_pad, H, D), q.dtype),
                 jax.ShapeDtypeStruct((B, H, tq_pad), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="polar_attention_bwd_dq",
  )(off, q, k, v, scale, do, lse, delta, cq)


def _bwd_dkv(off, q, k, v, scale, do, lse, delta, cq, *, G, bq, bk, tk, q_offset, window,
             num_warps, num_stages, flat, interpret):
  """dK/dV kernel on padded inputs: key-parallel, grid (key blocks, B*G); the kernel walks
  the group's R query heads, so dK/dV are summed over the GQA group in-kernel."""
  B, tq_pad, H, D = q.shape
  tk_pad = k.shape[1]
  R = H // G
  grp_rows = pl.BlockSpec((None, R, tq_pad), lambda bg, j: (bg // G, bg % G, 0))
  grp_tiles = pl.BlockSpec((None, tq_pad, R, D), lambda bg, j: (bg // G, 0, bg % G, 0))
  key_tile = pl.BlockSpec((None, bk, None, D), lambda bg, j: (bg // G, j, bg % G, 0))
  return pl.pallas_call(
      _with_offset(functools.partial(_dkv_kernel, bq=bq, bk=bk, nq=tq_pad // bq, group=R, tk=tk,
                                     window=window, flat=flat), q_offset),
      grid=(B * G, tk_pad // bk),  # early key tiles (most query rows) first
      in_specs=[OFFSET_SPEC, grp_tiles, key_tile, key_tile, grp_rows, grp_tiles, grp_rows, grp_rows,
                grp_rows],
      out_specs=[key_tile, key_tile],
      out_shape=[jax.ShapeDtypeStruct((B, tk_pad, G, D), k.dtype),
                 jax.ShapeDtypeStruct((B, tk_pad, G, D), v.dtype)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="polar_attention_bwd_dkv",
  )(off, q, k, v, scale, do, lse, delta, cq)



def attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD, delta_BTH, cq_BTH,
                        *, window=None, q_offset=0, block_k=None,
                        config: BlockConfig = DEFAULT_CONFIG, parts=("dq", "dkv")):
  """Backward kernels: (dq, dk, dv in the input dtype, dscale f32), dK/dV summed over GQA.

  `parts` (benchmarks only) runs just one of the two kernels; the other outputs are None.
  """
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  dq_bq = _fit_block(config.dq_block_q, Tq)
  dq_bk = _fit_block(block_k or config.dq_block_k, Tk)
  kv_bq = _fit_block(config.dkv_block_q, Tq)
  kv_bk = _fit_block(block_k or config.dkv_block_k, Tk)
  tq_pad = pl.cdiv(Tq, max(dq_bq, kv_bq)) * max(dq_bq, kv_bq)
  tk_pad = pl.cdiv(Tk, max(dq_bk, kv_bk)) * max(dq_bk, kv_bk)
  args = (_offset_arg(q_offset), _pad_axis1(q_BTHD, tq_pad), _pad_axis1(k_BTGD, tk_pad),
          _pad_axis1(v_BTGD, tk_pad), _rows_bht(scale_BTH, tq_pad),
          _pad_axis1(do_BTHD.astype(q_BTHD.dtype), tq_pad),
          _rows_bht(lse_BTH, tq_pad, PAD_LSE), _rows_bht(delta_BTH, tq_pad),
          _rows_bht(cq_BTH, tq_pad))
  common = dict(tk=Tk, q_offset=_static_offset(q_offset), window=window,
                interpret=gpu_tiles.interpret_mode(config))
  dq = dk = dv = dscale = None
  if "dq" in parts:
    dq, dscale = _bwd_dq(*args, H=H, R=H // G, bq=dq_bq, bk=dq_bk,
                         num_warps=config.dq_num_warps, num_stages=config.dq_num_stages,
                         **common)
    dq, dscale = dq[:, :Tq], dscale[:, :, :Tq].transpose(0, 2, 1)
  if "dkv" in parts:
    dk, dv = _bwd_dkv(*args, G=G, bq=kv_bq, bk=kv_bk, num_warps=config.dkv_num_warps,
                      num_stages=config.dkv_num_stages, flat=config.dkv_flat_heads, **common)
    dk, dv = dk[:, :Tk], dv[:, :Tk]
  return dq, dk, dv, dscale

