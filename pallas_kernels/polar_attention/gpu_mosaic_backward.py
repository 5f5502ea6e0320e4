"""Mosaic-GPU (Hopper: TMA, wgmma, warp specialization) backward of the Polar core op
`attention_stats` (KERNELS.md §2a); package-internal, reached through `gpu_mosaic`.

`(dq, dk, dv, dscale) = attention_stats_bwd(q, k, v, scale, lse, do, delta', cq, window=...)`
has the contract of the Triton `gpu_backward.attention_stats_bwd` for the scope of the Mosaic
forward (q_offset = 0, Tq == Tk, bf16 / f16, D in {64, 128}, causal, window None or int):
with pi = exp(a - lse) and ds = pi (dp - delta') + cq pi^2 (delta', cq from the api's per-row
prologue), dq = scale (ds K), dk = sum over the GQA group of (scale ds)^T Q, dv = the same sum of
pi^T dO, dscale = rowsum(q * (ds K)). Logits are recomputed in base 2 (scale * log2 e folded in).

Two kernels, each with three warpgroups: two consumers of 64 rows (one wgmma M tile) and one
TMA producer that streams the band through a ring of `stages` SMEM slots ("loaded" barriers per
slot; one "used" barrier per slot that both consumers arrive on; both consumers walk the whole
tile band, so blocks outside one consumer's own band are masked to zero).
  dQ    one program per (query head, query tile of 128 rows, batch), heaviest tiles first; the
        producer streams the K / V blocks of the tile's key band. Per block: S = Q K^T,
        dP = dO V^T (both wgmma), ds in registers, acc += ds K. Epilogue: dq = scale acc,
        dscale = rowsum(q acc) (q read back from SMEM).
  dK/dV one program per (KV head, key tile of 128 rows, batch), earliest (heaviest) tiles first;
        the producer streams, for each of the group's R query heads, the Q / dO blocks of the
        tile's query band and the per-row vectors (scale, lse, delta', cq packed as [4, bq]).
        Per block: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += (scale dS)^T Q; dK / dV are
        summed over the GQA group in registers and leave once, in the input dtype.
P / dS feed the second wgmma from registers (through SMEM in interpret mode, which only models
SMEM operands, or with `ds_via_smem=True`). Lengths are padded to a multiple of 128 (padded keys
lie after every real row, so causality masks them; padded rows get lse = +1e30, so pi = 0).
A compiled config whose kernels exceed Hopper's SMEM at the call's D / T is refused before
Mosaic compiles (`smem_refusal`; `smem_bytes` counts both kernels, `fitting_config` finds one
that fits).

Not (yet) FA3-complete: no ping-pong schedule between the consumers, no intra-warpgroup overlap
of the softmax with the next block's wgmma, dQ and dK/dV are separate passes that each recompute
the logits, and the ring holds whole blocks (no separate K and V stages in dK/dV). A one-pass
variant (the dK/dV kernel also TMA-reduce-adding each dQ part in f32, as FA3) was slower than
these two kernels at every shape timed on an H200 and was removed
(bench/results/polar_mosaic_bwd_fused_h200.json).

Dimension glossary
  B batch   T rows (Tq == Tk)   H query heads   G KV heads   R = H // G   D head dim
  bq query rows per block   bk key rows per block   S ring slots (stages)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.polar_attention import bands
from pallas_kernels.polar_attention import gpu_mosaic_common
from pallas_kernels.polar_attention.gpu_mosaic_common import (
    COMPUTE_WGS, SMEM_LIMIT, config_repr, interpret_params, kv_block_issue, launch, operand,
    producer_warpgroup, three_phases, tiled_smem, visible_tile, wgmmas)
from pallas_kernels.polar_attention.gpu_tiles import LOG2E, NEG, PAD_LSE, _pad_axis1

_ROWS = 64  # rows per consumer warpgroup (one wgmma M tile): query rows in dQ, keys in dK/dV
# Per-row vectors, packed [B, H, 4, T] so one TMA brings all four for a block.
_SCALE, _LSE2, _DELTA, _CQ = range(4)


@dataclasses.dataclass(frozen=True)
class BwdConfig:
  """Launch config of the two backward kernels."""
  dq_block_k: int = 64    # keys per K / V ring slot in the dQ kernel
  dkv_block_q: int = 64   # query rows per Q / dO ring slot in the dK/dV kernel
  stages: int = 2
  ds_via_smem: bool = False  # P / dS through SMEM for their wgmma (forced on in interpret mode)
  # None: interpret when the default backend is not a GPU; or explicit InterpretGPUParams.
  interpret: bool | plgpu.InterpretGPUParams | None = None

  def __post_init__(self):
    for name in ("dq_block_k", "dkv_block_q"):
      if getattr(self, name) not in (64, 128):
        raise ValueError(f"{name}={getattr(self, name)} must be 64 or 128")
    if self.stages < 1:
      raise ValueError(f"stages={self.stages} must be >= 1")


DEFAULT_BWD_CONFIG = BwdConfig()


def _row(ref, layout_dim):
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(layout_dim))


def _bcast(x, shape, dim):
  return lax.broadcast_in_dim(x, shape, [dim])


# ----------------------------------------------------------------------------- dQ (+ dscale)

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, rows_ref, dq_ref, dsc_ref, scoped, *, bk, D, R,
               n_q_tiles, stages, window, via_smem):
  (q_smem2, do_smem2, rows_smem2, dsc_smem2, k_smem, v_smem, ds_smem2), bars = scoped
  in_bars, k_bars, v_bars, used = bars
  bq = _ROWS
  b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  t0 = (n_q_tiles - 1 - lax.axis_index("q_seq")) * (2 * bq)  # heaviest tiles first
  kv_lo, kv_hi = bands.key_range(t0, t0 + 2 * bq - 1, bk=bk, tk=None, window=window)
  n_steps = kv_hi - kv_lo
  wgmma_layout = plgpu.Layout.WGMMA

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_smem, do_smem, rows_smem = q_smem2.at[wg], do_smem2.at[wg], rows_smem2.at[wg]
    r0 = t0 + wg * bq
    rows = pl.ds(r0, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, in_bars.at[3 * wg + 0])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, in_bars.at[3 * wg + 1])
    plgpu.copy_gmem_to_smem(rows_ref.at[b, h, :, rows], rows_smem, in_bars.at[3 * wg + 2])
    plgpu.barrier_wait(in_bars.at[3 * wg + 2])
    scale_q = _row(rows_smem.at[_SCALE], 1)
    scale2_q = scale_q * LOG2E
    lse2_q = _row(rows_smem.at[_LSE2], 1)
    delta_q = _row(rows_smem.at[_DELTA], 1)
    cq_q = _row(rows_smem.at[_CQ], 1)
    plgpu.barrier_wait(in_bars.at[3 * wg + 0])
    plgpu.barrier_wait(in_bars.at[3 * wg + 1])
    shape = (bq, bk)

    def step(i, acc_qd, masked):
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_bars.at[slot])
      plgpu.barrier_wait(v_bars.at[slot])
      s_qk, dp_qk = wgmmas((None, q_smem, k_smem.at[slot].T, shape),
                            (None, do_smem, v_smem.at[slot].T, shape), fresh=True)
      s_qk = s_qk * _bcast(scale2_q, shape, 0)
      if masked:
        s_qk = jnp.where(visible_tile(r0, (kv_lo + i) * bk, shape, window=window), s_qk, NEG)
      p_qk = jnp.exp2(s_qk - _bcast(lse2_q, shape, 0))
      ds_qk = p_qk * (dp_qk - _bcast(delta_q, shape, 0) + _bcast(cq_q, shape, 0) * p_qk)
      ds = operand(ds_qk.astype(q_ref.dtype), ds_smem2.at[wg] if via_smem else None, via_smem)
      acc_qd, = wgmmas((acc_qd, ds, k_smem.at[slot], (bq, D)), fresh=via_smem)
      plgpu.barrier_arrive(used.at[slot])
      return acc_qd

    u_lo, u_hi = bands.unmasked_steps(
        bands.key_band(r0, r0 + bq - 1, bk=bk, tk=None, window=window), kv_lo, kv_hi)
    acc0 = plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), wgmma_layout)
    acc_qd = three_phases(step, u_lo, u_hi, n_steps, acc0)
    q_qd = plgpu.load(q_smem, layout=wgmma_layout).astype(jnp.float32)
    dsc_smem = dsc_smem2.at[wg]
    dsc_smem[...] = (acc_qd * q_qd).sum(axis=1)
    q_smem[...] = (acc_qd * _bcast(scale_q, (bq, D), 0)).astype(q_smem.dtype)  # dq
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
    plgpu.copy_smem_to_gmem(dsc_smem, dsc_ref.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)

  producer_warpgroup(wg, n_steps, stages, lambda: kv_block_issue(
      k_ref, v_ref, k_smem, v_smem, k_bars, v_bars, b, lax.div(h, R), kv_lo, bk), used)


# ----------------------------------------------------------------------------- dK / dV

def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, rows_ref, dk_ref, dv_ref, scoped, *, bq, D, R, nq,
                stages, window, via_smem):
  (k_all, v_smem2, q_smem, do_smem, rows_smem, ds_smem2), bars = scoped
  kv_bars, q_bars, do_bars, rows_bars, used = bars
  bk = _ROWS
  b, g, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  k0 = lax.axis_index("kv_seq") * (2 * bk)  # early key tiles (most query rows) first
  q_lo, _, _, q_hi = bands.query_band(k0, k0 + 2 * bk - 1, bq=bq, nq=nq, q_offset=0,
                                      tk_block_ok=True, window=window)
  n_q = q_hi - q_lo  # query blocks per head; steps walk (head r, block q_lo + j), r outer
  n_steps = R * n_q
  wgmma_layout = plgpu.Layout.WGMMA

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    k_smem, v_smem = k_all.at[pl.ds(wg * bk, bk)], v_smem2.at[wg]
    c0 = k0 + wg * bk
    keys = (b, pl.ds(c0, bk), g)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_bars.at[2 * wg + 0])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_bars.at[2 * wg + 1])
    plgpu.barrier_wait(kv_bars.at[2 * wg + 0])
    plgpu.barrier_wait(kv_bars.at[2 * wg + 1])
    shape = (bk, bq)

    def step(j, carry, masked, r):
      dk_kd, dv_kd = carry
      slot = lax.rem(r * n_q + j, stages)
      plgpu.barrier_wait(q_bars.at[slot])
      plgpu.barrier_wait(rows_bars.at[slot])
      s_kq, = wgmmas((None, k_smem, q_smem.at[slot].T, shape), fresh=True)
      scale_q = _row(rows_smem.at[slot, _SCALE], 0)
      s_kq = s_kq * _bcast(scale_q * LOG2E, shape, 1)
      if masked:
        valid = visible_tile((q_lo + j) * bq, c0, shape, window=window, query_axis=1)
        s_kq = jnp.where(valid, s_kq, NEG)
      p_kq = jnp.exp2(s_kq - _bcast(_row(rows_smem.at[slot, _LSE2], 0), shape, 1))
      ds_smem = ds_smem2.at[wg] if via_smem else None
      plgpu.barrier_wait(do_bars.at[slot])
      p16 = operand(p_kq.astype(q_ref.dtype), ds_smem, via_smem)
      dv_kd, dp_kq = wgmmas((dv_kd, p16, do_smem.at[slot], (bk, D)),
                             (None, v_smem, do_smem.at[slot].T, shape), fresh=via_smem)
      delta_q = _row(rows_smem.at[slot, _DELTA], 0)
      cq_q = _row(rows_smem.at[slot, _CQ], 0)
      ds_kq = p_kq * (dp_kq - _bcast(delta_q, shape, 1) + _bcast(cq_q, shape, 1) * p_kq)
      ds_kq = ds_kq * _bcast(scale_q, shape, 1)
      ds16 = operand(ds_kq.astype(q_ref.dtype), ds_smem, via_smem)
      dk_kd, = wgmmas((dk_kd, ds16, q_smem.at[slot], (bk, D)), fresh=via_smem)
      plgpu.barrier_arrive(used.at[slot])
      return dk_kd, dv_kd

    u_lo, u_hi = bands.unmasked_steps(
        bands.query_band(c0, c0 + bk - 1, bq=bq, nq=nq, q_offset=0, tk_block_ok=True,
                         window=window), q_lo, q_hi)
    zeros = plgpu.layout_cast(jnp.zeros((bk, D), jnp.float32), wgmma_layout)

    def head(r, carry):
      return three_phases(functools.partial(step, r=r), u_lo, u_hi, n_q, carry)

    dk_kd, dv_kd = lax.fori_loop(0, R, head, (zeros, zeros))
    k_smem[...] = dk_kd.astype(k_smem.dtype)
    v_smem[...] = dv_kd.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)

  def issue(i, slot):
    h = g * R + lax.div(i, n_q)
    rows = pl.ds((q_lo + lax.rem(i, n_q)) * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bars.at[slot])
    plgpu.copy_gmem_to_smem(rows_ref.at[b, h, :, rows], rows_smem.at[slot], rows_bars.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bars.at[slot])

  producer_warpgroup(wg, n_steps, stages, lambda: issue, used)


# ----------------------------------------------------------------------------- launch

def attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD, delta_BTH, cq_BTH,
                        *, window=None, config: BwdConfig = DEFAULT_BWD_CONFIG,
                        parts=("dq", "dkv")):
  """Backward kernels: (dq, dk, dv in the input dtype, dscale f32), dK/dV summed over GQA.
  The caller (`gpu_mosaic`) has checked the scope; see the module docstring. `parts`
  (benchmarks only) runs just one of the two kernels; the other outputs are None."""
  T, H, G, D = q_BTHD.shape[1], q_BTHD.shape[2], k_BTGD.shape[2], q_BTHD.shape[3]
  dtype = q_BTHD.dtype
  params = interpret_params(config.interpret)
  if params is None and (why := smem_refusal(config, D, dtype, T)) is not None:
    raise ValueError(f"gpu_mosaic_backward.attention_stats_bwd: {why}")
  via_smem = config.ds_via_smem or params is not None
  bq_kv, bk_q = config.dkv_block_q, config.dq_block_k
  t_pad = _padded(T)
  q, do = _pad_axis1(q_BTHD, t_pad), _pad_axis1(do_BTHD.astype(dtype), t_pad)
  k, v = _pad_axis1(k_BTGD, t_pad), _pad_axis1(v_BTGD, t_pad)
  f32 = lambda x, pad: _pad_axis1(x.astype(jnp.float32), t_pad, pad)
  rows_BH4T = jnp.stack([f32(scale_BTH, 1.0), f32(lse_BTH, PAD_LSE) * LOG2E, f32(delta_BTH, 0.0),
                         f32(cq_BTH, 0.0)], axis=-1).transpose(0, 2, 3, 1)
  stages = config.stages
  args = (q, k, v, do, rows_BH4T)

  dq = dk = dv = dsc = None
  if "dq" in parts:
    dq, dsc = _bwd_dq(args, bk_q, stages, via_smem, window, H // G, params)
    dq, dsc = dq[:, :T], jnp.swapaxes(dsc, 1, 2)[:, :T]
  if "dkv" in parts:
    dk, dv = _bwd_dkv(args, G, bq_kv, stages, via_smem, window, H // G, params)
    dk, dv = dk[:, :T], dv[:, :T]
  return dq, dk, dv, dsc


def _dq_scratch(D, dtype, bk_q, stages_q, via_smem):
  """The dQ kernel's scoped (SMEM buffers, barriers)."""
  smem = (tiled_smem((COMPUTE_WGS, _ROWS, D), dtype), tiled_smem((COMPUTE_WGS, _ROWS, D), dtype),
          plgpu.SMEM((COMPUTE_WGS, 4, _ROWS), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, _ROWS), jnp.float32),
          tiled_smem((stages_q, bk_q, D), dtype), tiled_smem((stages_q, bk_q, D), dtype),
          tiled_smem((COMPUTE_WGS, _ROWS, bk_q), dtype) if via_smem else None)
  bars = (plgpu.Barrier(num_barriers=3 * COMPUTE_WGS),  # q, dO, rows of each consumer
          plgpu.Barrier(num_barriers=stages_q), plgpu.Barrier(num_barriers=stages_q),
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages_q))
  return smem, bars


def _dkv_scratch(D, dtype, bq_kv, stages_kv, via_smem):
  """The dK/dV kernel's scoped (SMEM buffers, barriers)."""
  smem = (tiled_smem((COMPUTE_WGS * _ROWS, D), dtype),  # K, both consumers' blocks
          tiled_smem((COMPUTE_WGS, _ROWS, D), dtype),
          tiled_smem((stages_kv, bq_kv, D), dtype), tiled_smem((stages_kv, bq_kv, D), dtype),
          plgpu.SMEM((stages_kv, 4, bq_kv), jnp.float32),
          tiled_smem((COMPUTE_WGS, _ROWS, bq_kv), dtype) if via_smem else None)
  bars = (plgpu.Barrier(num_barriers=2 * COMPUTE_WGS),
          plgpu.Barrier(num_barriers=stages_kv), plgpu.Barrier(num_barriers=stages_kv),
          plgpu.Barrier(num_barriers=stages_kv),
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages_kv))
  return smem, bars


def _padded(T):
  return pl.cdiv(T, 2 * _ROWS) * (2 * _ROWS)  # 64 / 128 blocks divide 128


def smem_bytes(config: BwdConfig, D: int, dtype, T: int) -> dict[str, int]:
  """SMEM bytes each compiled kernel asks for at head dim D, input `dtype` and T rows:
  {"dq": ..., "dkv": ...}, by `gpu_mosaic_common.smem_bytes` over the buffers the launch
  allocates (ring stages clipped to the padded length, as the launch does; the dQ kernel
  reduces, for dscale, the dK/dV kernel does not). Mosaic counted 267384 bytes for
  BwdConfig(dq_block_k=128, stages=3)'s dQ kernel and 233568 for
  BwdConfig(dkv_block_q=128, ds_via_smem=True)'s dK/dV kernel at D=128 bf16 on an H200
  (bench/results/gpu_tests_new_kernels_h200.txt); this count gives the same two numbers."""
  t_pad = _padded(T)
  bk_q, bq_kv, stages = config.dq_block_k, config.dkv_block_q, config.stages
  count = gpu_mosaic_common.smem_bytes
  return {"dq": count(*_dq_scratch(D, dtype, bk_q, min(stages, t_pad // bk_q),
                                   config.ds_via_smem), reduces=True),
          "dkv": count(*_dkv_scratch(D, dtype, bq_kv, min(stages, t_pad // bq_kv),
                                     config.ds_via_smem), reduces=False)}


def _fits(config, D, dtype, T) -> bool:
  return max(smem_bytes(config, D, dtype, T).values()) <= SMEM_LIMIT


def fitting_config(config: BwdConfig, D: int, dtype, T: int) -> BwdConfig | None:
  """`config` when its kernels fit Hopper's SMEM, else the nearest that does (P / dS staged
  in registers first, then 64-row blocks, then fewer stages), None when none does."""
  if _fits(config, D, dtype, T):
    return config
  blocks = dict.fromkeys([(config.dq_block_k, config.dkv_block_q), (config.dq_block_k, 64),
                          (64, config.dkv_block_q), (64, 64)])
  for via_smem in dict.fromkeys((False, config.ds_via_smem)):
    for dq_bk, dkv_bq in blocks:
      for stages in range(config.stages, 0, -1):
        cand = dataclasses.replace(config, ds_via_smem=via_smem, dq_block_k=dq_bk,
                                   dkv_block_q=dkv_bq, stages=stages)
        if _fits(cand, D, dtype, T):
          return cand
  return None


def smem_refusal(config: BwdConfig, D: int, dtype, T: int) -> str | None:
  """None when both compiled kernels of `config` fit Hopper's SMEM (`SMEM_LIMIT`) at this
  call's D, dtype and T; else one line with the bytes needed, the limit and a config that fits."""
  need = smem_bytes(config, D, dtype, T)
  kernel = max(need, key=need.get)
  if need[kernel] <= SMEM_LIMIT:
    return None
  fit = fitting_config(config, D, dtype, T)
  fix = ("no BwdConfig fits; use backward='triton'" if fit is None else
         f"use {config_repr(fit)} ({max(smem_bytes(fit, D, dtype, T).values())} bytes)")
  return (f"{config_repr(config)} needs {need[kernel]} bytes of shared memory in its {kernel} "
          f"kernel at D={D} {jnp.dtype(dtype).name}, over the {SMEM_LIMIT} a Hopper block can "
          f"use; {fix}")


def _bwd_dq(args, bk_q, stages, via_smem, window, R, params):
  """dQ (+ dscale) kernel on padded inputs: grid (H, query tiles, B)."""
  B, t_pad, H, D = args[0].shape
  dtype = args[0].dtype
  stages_q = min(stages, t_pad // bk_q)
  smem, bars = _dq_scratch(D, dtype, bk_q, stages_q, via_smem)
  body = functools.partial(_dq_kernel, bk=bk_q, D=D, R=R, n_q_tiles=t_pad // (2 * _ROWS),
                           stages=stages_q, window=window, via_smem=via_smem)
  return launch(
      body, "polar_attention_bwd_dq_mosaic", smem, bars, args,
      (jax.ShapeDtypeStruct((B, t_pad, H, D), dtype),
       jax.ShapeDtypeStruct((B, H, t_pad), jnp.float32)),
      (H, t_pad // (2 * _ROWS), B), ("heads", "q_seq", "batch"), params)


def _bwd_dkv(args, G, bq_kv, stages, via_smem, window, R, params):
  """dK/dV kernel on padded inputs: grid (G, key tiles, B); sums over the GQA group."""
  B, t_pad, H, D = args[0].shape
  dtype = args[0].dtype
  stages_kv = min(stages, t_pad // bq_kv)
  smem, bars = _dkv_scratch(D, dtype, bq_kv, stages_kv, via_smem)
  body = functools.partial(_dkv_kernel, bq=bq_kv, D=D, R=R, nq=t_pad // bq_kv,
                           stages=stages_kv, window=window, via_smem=via_smem)
  return launch(
      body, "polar_attention_bwd_dkv_mosaic", smem, bars, args,
      (jax.ShapeDtypeStruct((B, t_pad, G, D), dtype),
       jax.ShapeDtypeStruct((B, t_pad, G, D), dtype)),
      (G, t_pad // (2 * _ROWS), B), ("heads", "kv_seq", "batch"), params)
