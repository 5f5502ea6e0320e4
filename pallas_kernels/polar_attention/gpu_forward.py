"""Pallas-Triton forward of the Polar core op `attention_stats` (KERNELS.md §2a), with decode.

`(o f32, lse f32, p2 f32) = attention_stats(q, k, v, scale)`: tempered softmax attention with
the extra row statistic p2 = sum pi^2 (online: Q2 <- alpha^2 Q2 + sum p^2, p2 = Q2 / L^2).
The query-tile kernel reads the model's batch-major layout `[B, T, heads, D]` directly (strided
rows, no transposes), pads lengths to a multiple of the block (padded keys masked) and runs
query tiles heaviest (latest) first; its key loop covers only the causal/window band.

Decode (few query rows over a long prefix, Tq * R <= 64): a split-K forward packs the GQA
group's heads x positions into the rows of one tile, splits the key band over programs and
merges the partial (m, L, Q2, acc) in XLA (Q2 with weight 2^(2 (m_s - m*))).

Measured on an H100 (bench/results/polar_attention_h100_run1.json; bf16, 8/2 heads, D=128,
causal): forward 0.78 ms at (B, T) = (16, 2K) (cuDNN 0.54), 1.58 ms at (4, 8K) (cuDNN 1.36),
20.3 ms at (1, 64K) (cuDNN 15.1). Decode of one row over 64K keys: split-K 0.24 ms vs 1.33 ms
for the query-tile kernel (B=1), 0.67 vs 1.18 ms (B=8).

Dimension glossary
  B batch   Tq/Tk query/key rows   H query heads   G KV heads   R = H // G   D head dim
  bq/bk query/key block   nq number of query blocks (after padding)   M = Tq * R packed rows
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.polar_attention import bands, gpu_tiles, reference
from pallas_kernels.polar_attention.gpu_tiles import (
    DEFAULT_CONFIG, LOG2E, NEG, OFFSET_SPEC, BlockConfig, _dot, _fit_block, _key_block_logits,
    _offset_arg, _pad_axis1, _rev_q, _static_offset, _three_phase, _with_offset)


# ----------------------------------------------------------------------------- query tiles


def _online_update(carry, s_rk, valid_rk, v_kd):
  """One key block of the online softmax with the extra statistic: rows' running max m,
  normalizer L, Q2 = sum p^2 (rescaled by alpha^2) and the unnormalized output (base-2 logits;
  `valid_rk` None = no mask needed)."""
  m_r, l_r, q2_r, acc_rd = carry
  m_new = jnp.maximum(m_r, jnp.max(s_rk, axis=1))
  alpha = jnp.exp2(m_r - m_new)
  p_rk = jnp.exp2(s_rk - m_new[:, None])
  if valid_rk is not None:
    p_rk = jnp.where(valid_rk, p_rk, 0.0)
  l_r = alpha * l_r + jnp.sum(p_rk, axis=1)
  q2_r = alpha * alpha * q2_r + jnp.sum(p_rk * p_rk, axis=1)
  acc_rd = acc_rd * alpha[:, None] + _dot(p_rk.astype(v_kd.dtype), v_kd)
  return m_new, l_r, q2_r, acc_rd


def _fwd_kernel(q_ref, k_ref, v_ref, s_ref, o_ref, lse_ref, p2_ref, *, bq, bk, tk,
                q_offset, window):
  i = pl.num_programs(1) - 1 - pl.program_id(1)  # must match _rev_q in the BlockSpecs
  q = q_ref[...]
  scale2_q = s_ref[...].astype(jnp.float32) * LOG2E
  p0 = q_offset + i * bq
  rows_q = p0 + jnp.arange(bq)

  def body(kb, carry, masked):
    start = pl.multiple_of(kb * bk, bk)
    _, v, s_qk, valid = _key_block_logits(q, k_ref, v_ref, scale2_q, rows_q, start, bk, tk=tk,
                                          window=window, masked=masked)
    return _online_update(carry, s_qk, valid if masked else None, v)

  band = bands.key_band(p0, p0 + bq - 1, bk=bk, tk=tk, window=window)
  zeros_q = jnp.zeros((bq,), jnp.float32)
  init = (zeros_q + NEG, zeros_q, zeros_q, jnp.zeros(q.shape, jnp.float32))
  m_q, l_q, q2_q, acc_qd = _three_phase(*band, body, init)
  l_safe = jnp.where(l_q > 0.0, l_q, 1.0)
  o_ref[...] = acc_qd / l_safe[:, None]
  lse_ref[...] = (m_q + jnp.log2(l_safe)) / LOG2E
  p2_ref[...] = q2_q / (l_safe * l_safe)


# ----------------------------------------------------------------------------- split-K decode


def _decode_kernel(q_ref, k_ref, v_ref, s_ref, acc_ref, m_ref, l_ref, q2_ref, *, rows, R,
                   tq, bk, tk, q_offset, window, blocks_lo, blocks_per_split, blocks_hi):
  """One (batch, KV head, key split): the group's R heads x Tq positions packed as rows; the
  splits share the static key blocks [blocks_lo, blocks_hi)."""
  s_idx = pl.program_id(1)
  q = q_ref[...]
  scale2_m = s_ref[...] * LOG2E
  pos_m = q_offset + jnp.minimum(lax.div(jnp.arange(rows), R), tq - 1)
  lo = blocks_lo + s_idx * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, blocks_hi)
  # Intersect with the rows' own band (a no-op for a static offset, needed for a traced one).
  rows_lo, rows_hi = bands.key_range(q_offset, q_offset + tq - 1, bk=bk, tk=tk, window=window)
  hi = jnp.minimum(hi, rows_hi)
  if window is not None:
    lo = jnp.maximum(lo, rows_lo)

  def body(kb, carry):
    start = pl.multiple_of(kb * bk, bk)
    _, v, s_mk, valid = _key_block_logits(q, k_ref, v_ref, scale2_m, pos_m, start, bk, tk=tk,
                                          window=window, masked=True)
    return _online_update(carry, s_mk, valid, v)

  zeros_m = jnp.zeros((rows,), jnp.float32)
  m_m, l_m, q2_m, acc_md = lax.fori_loop(
      lo, hi, body, (zeros_m + NEG, zeros_m, zeros_m, jnp.zeros(q.shape, jnp.float32)))
  acc_ref[...] = acc_md
  m_ref[...] = m_m
  l_ref[...] = l_m
  q2_ref[...] = q2_m


def uses_split_k_decode(Tq, R, Tk, window, q_offset, config) -> bool:
  """True when `attention_stats_fwd` takes the split-K decode kernel for this call."""
  off = _static_offset(q_offset)
  if off is None:  # traced offset: the band is at most min(Tk, window)
    band = Tk if window is None else min(Tk, window)
  else:
    first, end = bands.key_span(off, off + Tq - 1, tk=Tk, window=window)
    band = end - first
  return Tq * R <= config.decode_max_rows and band >= config.decode_min_keys


def _decode_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window, q_offset, config):
  """Split-K (flash-decoding) forward for few query rows over a long KV prefix.

  The R query heads of a KV head and the Tq positions are packed into M = Tq*R rows (padded to
  a power of two >= 16), the key band is split over programs, and the partial statistics
  (m, L, Q2 in base 2, unnormalized acc) are merged here: m* = max m_s, w_s = 2^(m_s - m*),
  L = sum w_s L_s, Q2 = sum w_s^2 Q2_s, acc = sum w_s acc_s.
  """
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R = H // G
  rows = max(16, pl.next_power_of_2(Tq * R))
  bk = _fit_block(config.decode_block_k, Tk)
  tk_pad = pl.cdiv(Tk, bk) * bk
  off = _static_offset(q_offset)
  if off is None:  # traced offset: any key block may be in the rows' band
    blocks_lo, blocks_hi = 0, pl.cdiv(Tk, bk)
  else:
    blocks_lo, blocks_hi = bands.key_range(off, off + Tq - 1, bk=bk, tk=Tk, window=window)
  n_blocks = blocks_hi - blocks_lo
  n_split = max(1, min(n_blocks, pl.cdiv(config.decode_target_programs, B * G)))
  per_split = pl.cdiv(n_blocks, n_split)
  n_split = pl.cdiv(n_blocks, per_split)

  def pack(x_BTH_):  # [B, Tq, H, ...] -> [B*G, rows, ...], row = t * R + r
    x = x_BTH_.reshape((B, Tq, G, R) + x_BTH_.shape[3:])
    x = jnp.moveaxis(x, 2, 1).reshape((B * G, Tq * R) + x_BTH_.shape[3:])
    return _pad_axis1(x, rows)

  q = pack(q_BTHD)
  scale = pack(scale_BTH.astype(jnp.float32))
  k, v = _pad_axis1(k_BTGD, tk_pad), _pad_axis1(v_BTGD, tk_pad)
  kv_spec = pl.BlockSpec((None, tk_pad, None, D), lambda bg, s: (bg // G, 0, bg % G, 0))
  part_md = pl.BlockSpec((None, None, rows, D), lambda bg, s: (bg, s, 0, 0))
  part_m = pl.BlockSpec((None, None, rows), lambda bg, s: (bg, s, 0))
  f32 = jnp.float32
  acc, m, l, q2 = pl.pallas_call(
      _with_offset(functools.partial(_decode_kernel, rows=rows, R=R, tq=Tq, bk=bk, tk=Tk,
                                     window=window, blocks_lo=blocks_lo,
                                     blocks_per_split=per_split, blocks_hi=blocks_hi), off),
      grid=(B * G, n_split),
      in_specs=[OFFSET_SPEC, pl.BlockSpec((None, rows, D), lambda bg, s: (bg, 0, 0)), kv_spec,
                kv_spec, pl.BlockSpec((None, rows), lambda bg, s: (bg, 0))],
      out_specs=[part_md, part_m, part_m, part_m],
      out_shape=[jax.ShapeDtypeStruct((B * G, n_split, rows, D), f32)]
      + [jax.ShapeDtypeStruct((B * G, n_split, rows), f32)] * 3,
      compiler_params=pltriton.CompilerParams(num_warps=config.decode_num_warps,
                                              num_stages=config.decode_num_stages),
      interpret=gpu_tiles.interpret_mode(config), name="polar_attention_decode",
  )(_offset_arg(q_offset), q, k, v, scale)
  m_max = jnp.max(m, axis=1, keepdims=True)
  w = jnp.exp2(m - m_max)
  l_tot = jnp.sum(w * l, axis=1)
  l_safe = jnp.where(l_tot > 0.0, l_tot, 1.0)
  o = jnp.sum(w[..., None] * acc, axis=1) / l_safe[..., None]
  lse = (m_max[:, 0] + jnp.log2(l_safe)) / LOG2E
  p2 = jnp.sum(w * w * q2, axis=1) / (l_safe * l_safe)

  def unpack(x):  # [B*G, rows, ...] -> [B, Tq, H, ...]
    x = x[:, :Tq * R].reshape((B, G, Tq, R) + x.shape[2:])
    return jnp.moveaxis(x, 1, 2).reshape((B, Tq, H) + x.shape[4:])

  return unpack(o), unpack(lse), unpack(p2)


# ----------------------------------------------------------------------------- forward entry


def attention_stats_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None, q_offset=0,
                        block_k=None, config: BlockConfig = DEFAULT_CONFIG):
  """Forward kernel: (o_BTHD f32, lse_BTH f32, p2_BTH f32).

  Few query rows over a long prefix (decode, Tq * R <= config.decode_max_rows) take the
  split-K kernel; everything else the query-tile kernel.
  """
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R = H // G
  if uses_split_k_decode(Tq, R, Tk, window, q_offset, config):
    return _decode_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window, q_offset=q_offset,
                       config=config)
  bq = _fit_block(config.block_q, Tq)
  bk = _fit_block(block_k or config.block_k, Tk)
  tq_pad, tk_pad = pl.cdiv(Tq, bq) * bq, pl.cdiv(Tk, bk) * bk
  q = _pad_axis1(q_BTHD, tq_pad)
  k, v = _pad_axis1(k_BTGD, tk_pad), _pad_axis1(v_BTGD, tk_pad)
  scale = _pad_axis1(scale_BTH.astype(jnp.float32), tq_pad)

  kernel = _with_offset(functools.partial(_fwd_kernel, bq=bq, bk=bk, tk=Tk, window=window),
                        _static_offset(q_offset))
  nq = tq_pad // bq
  row_spec = pl.BlockSpec((None, bq, None), _rev_q(nq, H, None))
  tile_spec = pl.BlockSpec((None, bq, None, D), _rev_q(nq, H, D))
  kv_spec = pl.BlockSpec((None, tk_pad, None, D), lambda bh, i: (bh // H, 0, (bh % H) // R, 0))
  o, lse, p2 = pl.pallas_call(
      kernel,
      grid=(B * H, nq),
      in_specs=[OFFSET_SPEC, tile_spec, kv_spec, kv_spec, row_spec],
      out_specs=[tile_spec, row_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((B, tq_pad, H, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, tq_pad, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, tq_pad, H), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                              num_stages=config.num_stages),
      interpret=gpu_tiles.interpret_mode(config),
      name="polar_attention_fwd",
  )(_offset_arg(q_offset), q, k, v, scale)
  return o[:, :Tq], lse[:, :Tq], p2[:, :Tq]

