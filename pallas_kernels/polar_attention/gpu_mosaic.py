"""Mosaic-GPU (Hopper: TMA, wgmma, warp specialization) forward of the Polar core op
`attention_stats` (KERNELS.md §2a), an opt-in alternative to the Pallas-Triton forward.

`(o f32, lse f32, p2 f32) = attention_stats_fwd(q, k, v, scale, window=...)` computes exactly
the contract of `gpu_forward.attention_stats_fwd` / `reference.attention_stats_materialized`
for the training / evaluation scope: q_offset = 0 (Tq == Tk), bf16 / f16 inputs, D in
{64, 128}, causal, window None or int. Anything else raises ValueError (`unsupported_reason` says
why). `attention_stats_bwd` (it takes lse, not how the forward ran) runs the Mosaic-GPU backward
of `gpu_mosaic_backward` by default (`MosaicConfig.backward="mosaic"`, same scope as this
forward; `MosaicConfig.bwd` holds its launch config) or, with `backward="triton"`, the Triton
backward. Measured on an H200 in one call (bench/results/polar_mosaic_bwd_h200.json; bf16, 8/2
heads, D 128, causal), fwd+bwd with the Mosaic vs the Triton backward vs cuDNN: (16, 2K)
1.80 / 2.20 / 2.00 ms, (4, 8K) 4.65 / 5.95 / 3.95 ms; (1, 32K) was not reached by that call.
A config passed to neither function means `DEFAULT_CONFIG`, read at call time, so assigning
`gpu_mosaic.DEFAULT_CONFIG = dataclasses.replace(DEFAULT_CONFIG, backward="triton")` switches
every call the api dispatches here. This module has the backend contract of `gpu_triton`.
A compiled call whose config does not fit Hopper's SMEM (227 KiB a block) at its shape is refused
before Mosaic compiles, in one line naming the bytes, the limit and a config that fits
(`smem_refusal`, from the integer count `smem_bytes`; the backward's in `gpu_mosaic_backward`);
`unsupported_reason` gives dispatch that refusal for `DEFAULT_CONFIG`.

Kernel layout (one program per (head, query tile of 2*bq rows, batch)): three warpgroups.
Warpgroup 2 is the producer: it TMA-copies the K / V blocks of the tile's causal / window band
into a ring of `stages` SMEM slots (a "loaded" barrier per slot, a "consumed" barrier per slot
that both consumers arrive on). Warpgroups 0 and 1 each own bq = 64 query rows: S = Q K^T by
wgmma into an f32 accumulator, the tempered online softmax with the extra statistic
Q2 <- alpha^2 Q2 + sum p^2 (base 2, finite sentinel masking; blocks fully inside the band skip
the mask), then acc += P V by wgmma (P from registers; through SMEM in interpret mode, which
only models SMEM operands, or with `p_via_smem=True`). Both consumers walk the whole tile band
so every consumed barrier gets its two arrivals. Two opt-in FlashAttention-3 overlaps (off by
default until timed on a GPU; `bench/polar_attention.py --mosaic-fwd` times them):
`pingpong=True` puts a schedule barrier between the consumers so they take turns (one's
elementwise block while the other's wgmmas run); `intra_overlap=True` has each consumer issue
block i+1's S = Q K^T with block i's O += P V and run block i+1's softmax while the P V wgmma
runs (`gpu_mosaic_common.overlapped`; a prologue S / softmax and an epilogue P V); both
together are FlashAttention-3's schedule (the consumers take turns issuing those two wgmmas).
Lengths are padded to a multiple of 2*bq and bk (padded keys lie after every real row, so
causality masks them; padded rows are dropped).

On a machine without a GPU the kernel runs in Mosaic-GPU interpret mode (tests). `api.py`
selects it on Hopper GPUs for the calls it supports. Measured on an H100 (bf16, 8/2 heads,
D 128, causal; bench/results/polar_mosaic_h100.json), forward vs the Triton forward vs cuDNN:
(16, 2K) 0.62 / 0.69 / 0.47 ms, (4, 8K) 1.36 / 1.66 / 1.23, (1, 32K) 4.24 / 5.30 / 3.76,
(1, 64K) 16.8 / 19.9 / 15.0; with the Triton backward, fwd+bwd (4, 8K) 5.78 vs 6.37 ms.

Dimension glossary
  B batch   T rows (Tq == Tk)   H query heads   G KV heads   R = H // G   D head dim
  bq query rows per consumer warpgroup   bk key block   nq number of query tiles (2*bq rows)
  S ring slots (stages)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.polar_attention import bands, reference
from pallas_kernels.polar_attention import gpu_backward, gpu_mosaic_backward
from pallas_kernels.polar_attention.gpu_mosaic_backward import BwdConfig
from pallas_kernels.polar_attention import gpu_mosaic_common
from pallas_kernels.polar_attention.gpu_mosaic_common import (
    COMPUTE_WGS, SMEM_LIMIT, config_repr, interpret_params, kv_block_issue, launch, operand,
    overlapped, producer_warpgroup, three_phases, tiled_smem, visible_tile, wgmmas)
from pallas_kernels.polar_attention.gpu_tiles import LOG2E, NEG, _pad_axis1

__all__ = ["BACKWARDS", "BwdConfig", "MosaicConfig", "DEFAULT_CONFIG", "attention_stats_bwd",
           "attention_stats_fwd", "smem_bytes", "smem_refusal", "unsupported_reason"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BACKWARDS = ("triton", "mosaic")  # what attention_stats_bwd runs (MosaicConfig.backward)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Launch config. bq is fixed at 64 rows per consumer warpgroup (one wgmma M tile)."""
  block_k: int = 128
  stages: int = 2
  p_via_smem: bool = False  # P V with P staged in SMEM (forced on in interpret mode)
  o_splits: int = 2  # o leaves SMEM in this many column slabs (SMEM: 2 * 64 * D * 4 / o_splits)
  # Warpgroup ping-pong (FlashAttention-3): a schedule barrier makes the two consumers take
  # turns, so one's elementwise block overlaps the other's S = Q K^T / O += P V wgmmas.
  pingpong: bool = False
  # Intra-warpgroup overlap (FlashAttention-3): each consumer issues the next block's S = Q K^T
  # with this block's O += P V and runs the softmax while the P V wgmma runs (one more S
  # accumulator in registers; needs stages >= 2: K_{i+1} and V_i are held together). With
  # `pingpong` too, the consumers take turns issuing those two wgmmas (FA3's schedule).
  intra_overlap: bool = False
  # None: interpret when the default backend is not a GPU; or explicit InterpretGPUParams
  # (e.g. detect_races=True in tests).
  interpret: bool | plgpu.InterpretGPUParams | None = None
  backward: str = "mosaic"  # one of BACKWARDS
  bwd: BwdConfig = BwdConfig()  # the Mosaic backward's launch (its interpret None: as above)

  def __post_init__(self):
    if self.backward not in BACKWARDS:
      raise ValueError(f"backward={self.backward!r} must be one of {BACKWARDS}")
    if self.block_k % 64 or self.block_k <= 0:
      raise ValueError(f"block_k={self.block_k} must be a positive multiple of 64")
    if self.o_splits not in (1, 2, 4):
      raise ValueError(f"o_splits={self.o_splits} must be 1, 2 or 4")
    if self.stages < 1:
      raise ValueError(f"stages={self.stages} must be >= 1")
    if self.intra_overlap and self.stages < 2:
      raise ValueError(f"intra_overlap holds K_(i+1) and V_i at once: stages={self.stages} "
                       "must be >= 2")


DEFAULT_CONFIG = MosaicConfig()
BLOCK_Q = 64


def attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD, delta_BTH, cq_BTH,
                        *, window=None, q_offset=0, config=None, **kw):
  """(dq, dk, dv in the input dtype, dscale f32), dK/dV summed over GQA.

  `config` None or a MosaicConfig (the forward's, when a caller binds one config for the pair):
  its `backward` picks the Triton backward (gpu_backward.attention_stats_bwd, any call it takes;
  `kw` goes to it) or the Mosaic one (this forward's scope only; of `kw` it takes `parts`, as
  benchmarks use it). A Triton BlockConfig `config` runs the Triton backward with it."""
  if config is not None and not isinstance(config, MosaicConfig):
    kw["config"] = config
  mcfg = config if isinstance(config, MosaicConfig) else DEFAULT_CONFIG
  if "config" in kw or mcfg.backward == "triton":
    return gpu_backward.attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD,
                                            delta_BTH, cq_BTH, window=window, q_offset=q_offset,
                                            **kw)
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  why = _scope_reason(q_BTHD, k_BTGD, v_BTGD, window=window, q_offset=q_offset)
  if why is None and set(kw) - {"parts"}:
    why = f"the Mosaic backward takes no Triton options (got {sorted(set(kw) - {'parts'})})"
  if why is not None:
    raise ValueError(f"gpu_mosaic.attention_stats_bwd (backward='mosaic'): {why}. Use "
                     "backward='triton' (or gpu_triton) for this call.")
  return gpu_mosaic_backward.attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH,
                                                 do_BTHD, delta_BTH, cq_BTH, window=window,
                                                 config=_bwd_config(mcfg), **kw)


def unsupported_reason(q, k, v, *, window=None, q_offset=0,
                       config: MosaicConfig | None = None) -> str | None:
  """None when this kernel can run this call (training / prefill scope only) with `config`
  (None: `DEFAULT_CONFIG`, read now), else why not: out of scope, or, when compiled, the
  forward's or the Mosaic backward's kernels do not fit Hopper's SMEM at this shape."""
  why = _scope_reason(q, k, v, window=window, q_offset=q_offset)
  if why is not None:
    return why
  config = DEFAULT_CONFIG if config is None else config
  D, T = q.shape[-1], q.shape[1]
  if interpret_params(config.interpret) is None:
    why = smem_refusal(config, D, q.dtype, T)
  bwd = _bwd_config(config)
  if why is None and config.backward == "mosaic" and interpret_params(bwd.interpret) is None:
    why = gpu_mosaic_backward.smem_refusal(bwd, D, q.dtype, T)
  return why


def _bwd_config(config: MosaicConfig) -> BwdConfig:
  """The Mosaic backward's launch config; its `interpret` None inherits the forward's."""
  bwd = config.bwd
  if bwd.interpret is None and config.interpret is not None:
    bwd = dataclasses.replace(bwd, interpret=config.interpret)
  return bwd


def _scope_reason(q, k, v, *, window=None, q_offset=0) -> str | None:
  """None when the call is in the kernels' scope (shapes, dtypes, offsets, window)."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    return f"q [B,T,H,D], k/v [B,T,G,D] expected, got {q.shape}, {k.shape}, {v.shape}"
  if not (isinstance(q_offset, int) and q_offset == 0):
    return f"q_offset must be the Python int 0 (got {q_offset!r}); use gpu_triton for decode"
  if q.shape[1] != k.shape[1]:
    return f"Tq == Tk required (got {q.shape[1]} vs {k.shape[1]}); use gpu_triton"
  if q.shape[-1] not in (64, 128) or k.shape[-1] != q.shape[-1]:
    return f"head dim must be 64 or 128 (got q {q.shape[-1]}, k {k.shape[-1]})"
  if q.shape[2] % k.shape[2]:
    return f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}"
  if not all(jnp.dtype(x.dtype) in _DTYPES for x in (q, k, v)) or not (
      q.dtype == k.dtype == v.dtype):
    return f"q, k, v must share a bf16 / f16 dtype (got {q.dtype}, {k.dtype}, {v.dtype})"
  if window is not None and not (isinstance(window, int) and window >= 1):
    return f"window must be None or a positive int (got {window!r})"
  return None


def _kernel(q_ref, k_ref, v_ref, s_ref, o_ref, lse_ref, p2_ref, scoped, *, bk, D, R,
            n_q_tiles, stages, window, p_via_smem, o_splits, pingpong, intra_overlap):
  (q_smem2, k_smem, v_smem, o_smem2, s_smem2, lse_smem2, p2_smem2, p_smem2), bars = scoped
  q_bars, s_bars, k_bars, v_bars, k_used, v_used, turn = bars
  bq = BLOCK_Q
  b = lax.axis_index("batch")
  h = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  tile = n_q_tiles - 1 - lax.axis_index("q_seq")  # heaviest (latest) tiles first
  t0 = tile * (2 * bq)
  # the tile's key blocks (both warpgroups' rows; Tq == Tk padded alike, so no key bound)
  kv_lo, kv_hi = bands.key_range(t0, t0 + 2 * bq - 1, bk=bk, tk=None, window=window)
  n_steps = kv_hi - kv_lo

  @pl.when(wg < COMPUTE_WGS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
    s_smem, lse_smem, p2_smem = s_smem2.at[wg], lse_smem2.at[wg], p2_smem2.at[wg]
    r0 = t0 + wg * bq
    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, bq), h], q_smem, q_bars.at[wg])
    plgpu.copy_gmem_to_smem(s_ref.at[b, h, pl.ds(r0, bq)], s_smem, s_bars.at[wg])
    plgpu.barrier_wait(s_bars.at[wg])
    scale2_q = plgpu.load(s_smem, layout=plgpu.Layout.WGMMA.reduce(1)) * LOG2E
    plgpu.barrier_wait(q_bars.at[wg])

    def rendezvous():  # both consumers meet on the schedule barrier (ping-pong turns)
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    def my_turn(values, *data_bars):
      """ping-pong: this consumer's elementwise work is done (`values`: its results, kept
      before the arrival); wait for the data and for the other consumer to have issued its
      wgmmas."""
      values = lax.optimization_barrier(values)
      plgpu.barrier_arrive(turn)
      for bar in data_bars:
        plgpu.barrier_wait(bar)
      plgpu.barrier_wait(turn)
      return values

    def online_softmax(s_qk, m_q, l_q, q2_q, i, masked):
      """Key block i's logits -> (m, alpha, l, q2, p f32): the tempered online softmax (base 2)
      and Q2 <- alpha^2 Q2 + sum p^2."""
      s_qk = s_qk * lax.broadcast_in_dim(scale2_q, (bq, bk), [0])
      if masked:
        valid = visible_tile(r0, (kv_lo + i) * bk, (bq, bk), window=window)
        s_qk = jnp.where(valid, s_qk, NEG)
      m_new = jnp.maximum(m_q, s_qk.max(axis=1))
      alpha = jnp.exp2(m_q - m_new)
      p_qk = jnp.exp2(s_qk - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
      if masked:
        p_qk = jnp.where(valid, p_qk, 0.0)
      l_q = l_q * alpha + p_qk.sum(axis=1)
      q2_q = q2_q * (alpha * alpha) + (p_qk * p_qk).sum(axis=1)
      return m_new, alpha, l_q, q2_q, p_qk

    def p_operand(p16):
      return operand(p16, p_smem2.at[wg] if p_via_smem else None, p_via_smem)

    def pv_block(carry, slot):
      """O += P V of the block in `slot` (the loop step's, or intra_overlap's epilogue): waits
      for V (with pingpong, on this consumer's turn: P V waits until the other consumer has
      issued its S wgmma, so the two alternate on the tensor cores), then frees the slot."""
      m_q, l_q, q2_q, acc_qd, p16 = carry
      if pingpong:
        m_q, l_q, q2_q, acc_qd, p16 = my_turn(carry, v_bars.at[slot])
      else:
        plgpu.barrier_wait(v_bars.at[slot])
      # in place on the running accumulator; P V into a fresh one with P in SMEM (interpret
      # mode models no run_state)
      acc_qd, = wgmmas((acc_qd, p_operand(p16), v_smem.at[slot], (bq, D)), fresh=p_via_smem)
      plgpu.barrier_arrive(v_used.at[slot])
      return m_q, l_q, q2_q, acc_qd

    def step(i, carry, masked):
      m_q, l_q, q2_q, acc_qd = carry
      slot = lax.rem(i, stages)
      plgpu.barrier_wait(k_bars.at[slot])
      # ping-pong: once this S wgmma is issued, the other consumer may run its elementwise block
      s_qk, = wgmmas((None, q_smem, k_smem.at[slot].T, (bq, bk)), fresh=True,
                     issued=rendezvous if pingpong else None)
      plgpu.barrier_arrive(k_used.at[slot])
      m_new, alpha, l_q, q2_q, p_qk = online_softmax(s_qk, m_q, l_q, q2_q, i, masked)
      acc_qd = acc_qd * lax.broadcast_in_dim(alpha, (bq, D), [0])
      return pv_block((m_new, l_q, q2_q, acc_qd, p_qk.astype(q_ref.dtype)), slot)

    def overlapped_step(i, carry, masked):
      """intra_overlap, i in [1, n_steps): S_i = Q K_i^T and O += P_{i-1} V_{i-1} issued
      together; block i's softmax runs while the P V wgmma does; then O *= alpha_i. With
      pingpong: a turn before the issue and one after it."""
      slot, prev = lax.rem(i, stages), lax.rem(i - 1, stages)
      if pingpong:
        carry = my_turn(carry, k_bars.at[slot], v_bars.at[prev])
      else:
        plgpu.barrier_wait(k_bars.at[slot])
        plgpu.barrier_wait(v_bars.at[prev])
      m_q, l_q, q2_q, acc_qd, p16 = carry

      def between(s_qk):  # S_i landed (K_i free); P_{i-1} V_{i-1} still on the tensor cores
        plgpu.barrier_arrive(k_used.at[slot])
        m_new, alpha, l_q_new, q2_q_new, p_qk = online_softmax(s_qk, m_q, l_q, q2_q, i, masked)
        return m_new, alpha, l_q_new, q2_q_new, p_qk.astype(q_ref.dtype)

      acc_qd, (m_new, alpha, l_q, q2_q, p16) = overlapped(
          (q_smem, k_smem.at[slot].T, (bq, bk)), (acc_qd, p_operand(p16), v_smem.at[prev]),
          between, (m_q, m_q, l_q, q2_q, p16), fresh=p_via_smem,
          issued=rendezvous if pingpong else None)
      plgpu.barrier_arrive(v_used.at[prev])
      acc_qd = acc_qd * lax.broadcast_in_dim(alpha, (bq, D), [0])
      return m_new, l_q, q2_q, acc_qd, p16

    # Blocks fully visible to this warpgroup's bq rows run unmasked; the rest of the tile's
    # band is masked. Steps count from kv_lo.
    u_lo, u_hi = bands.unmasked_steps(
        bands.key_band(r0, r0 + bq - 1, bk=bk, tk=None, window=window), kv_lo, kv_hi)
    wgmma_row = plgpu.Layout.WGMMA.reduce(1)
    carry = (plgpu.layout_cast(jnp.full((bq,), NEG, jnp.float32), wgmma_row),
             plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), wgmma_row),
             plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), wgmma_row),
             plgpu.layout_cast(jnp.full((bq, D), 0.0, jnp.float32), plgpu.Layout.WGMMA))
    # ping-pong: consumer 1 starts a turn behind consumer 0 and consumer 0 ends with the extra
    # turn, so both meet the schedule barrier 2 * n_steps + 1 times (both walk the whole band;
    # with intra_overlap: once after the prologue S, twice per loop step, once before the
    # epilogue P V)
    if pingpong:
      pl.when(wg == 1)(rendezvous)
    if intra_overlap:
      # prologue: block 0's S and softmax (masked unless fully visible, decided at run time);
      # the loop; epilogue: the last block's P V (n_steps >= 1: every row sees its own key)
      m_q, l_q, q2_q, acc_qd = carry
      plgpu.barrier_wait(k_bars.at[0])
      s_qk, = wgmmas((None, q_smem, k_smem.at[0].T, (bq, bk)), fresh=True,
                     issued=rendezvous if pingpong else None)
      plgpu.barrier_arrive(k_used.at[0])

      def first(masked):
        m_new, _, l_new, q2_new, p_qk = online_softmax(s_qk, m_q, l_q, q2_q, 0, masked)
        return m_new, l_new, q2_new, p_qk.astype(q_ref.dtype)

      m_q, l_q, q2_q, p16 = lax.cond((u_lo > 0) | (u_hi <= 0), functools.partial(first, True),
                                     functools.partial(first, False))
      m_q, l_q, q2_q, acc_qd, p16 = three_phases(overlapped_step, u_lo, u_hi, n_steps,
                                                 (m_q, l_q, q2_q, acc_qd, p16), start=1)
      m_q, l_q, q2_q, acc_qd = pv_block((m_q, l_q, q2_q, acc_qd, p16),
                                        lax.rem(n_steps - 1, stages))
    else:
      m_q, l_q, q2_q, acc_qd = three_phases(step, u_lo, u_hi, n_steps, carry)
    if pingpong:
      pl.when(wg == 0)(rendezvous)
    l_safe = jnp.where(l_q > 0.0, l_q, 1.0)
    o_qd = acc_qd / lax.broadcast_in_dim(l_safe, (bq, D), [0])
    lse_smem[...] = (m_q + jnp.log2(l_safe)) * (1.0 / LOG2E)
    p2_smem[...] = q2_q / (l_safe * l_safe)
    # o (f32) leaves through a [bq, D / o_splits] SMEM buffer, one column slab at a time.
    dc = D // o_splits
    for j in range(o_splits):
      if j:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      o_smem[...] = o_qd[:, j * dc:(j + 1) * dc]
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(r0, bq), h, pl.ds(j * dc, dc)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(r0, bq)])
    plgpu.copy_smem_to_gmem(p2_smem, p2_ref.at[b, h, pl.ds(r0, bq)])
    plgpu.wait_smem_to_gmem(0)

  producer_warpgroup(wg, n_steps, stages, lambda: kv_block_issue(
      k_ref, v_ref, k_smem, v_smem, k_bars, v_bars, b, lax.div(h, R), kv_lo, bk), k_used, v_used)


def attention_stats_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None, q_offset=0,
                        config: MosaicConfig | None = None):
  """Forward kernel: (o_BTHD f32, lse_BTH f32, p2_BTH f32); see the module docstring."""
  config = DEFAULT_CONFIG if config is None else config
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  why = _scope_reason(q_BTHD, k_BTGD, v_BTGD, window=window, q_offset=q_offset)
  if why is not None:
    raise ValueError(f"gpu_mosaic.attention_stats_fwd: {why}. Use gpu_triton (or the xla "
                     "backend) for this call.")
  B, T, H, D = q_BTHD.shape
  G = k_BTGD.shape[2]
  bq, bk = BLOCK_Q, config.block_k
  params = interpret_params(config.interpret)
  if params is None and (why := smem_refusal(config, D, q_BTHD.dtype, T)) is not None:
    raise ValueError(f"gpu_mosaic.attention_stats_fwd: {why}")
  p_via_smem = config.p_via_smem or params is not None
  t_pad = _padded(T, bk)
  q = _pad_axis1(q_BTHD, t_pad)
  k, v = _pad_axis1(k_BTGD, t_pad), _pad_axis1(v_BTGD, t_pad)
  scale_BHT = jnp.swapaxes(_pad_axis1(scale_BTH.astype(jnp.float32), t_pad, 1.0), 1, 2)
  nq = t_pad // (2 * bq)
  dtype = q.dtype
  stages = min(config.stages, t_pad // bk)  # static prefetch slices stay inside the keys
  smem, bars = _scratch(D, dtype, bk, stages, p_via_smem, config.o_splits, config.pingpong)
  body = functools.partial(_kernel, bk=bk, D=D, R=H // G, n_q_tiles=nq, stages=stages,
                           window=window, p_via_smem=p_via_smem, o_splits=config.o_splits,
                           pingpong=config.pingpong, intra_overlap=config.intra_overlap)
  o, lse_BHT, p2_BHT = launch(
      body, "polar_attention_fwd_mosaic", smem, bars, (q, k, v, scale_BHT),
      (jax.ShapeDtypeStruct((B, t_pad, H, D), jnp.float32),
       jax.ShapeDtypeStruct((B, H, t_pad), jnp.float32),
       jax.ShapeDtypeStruct((B, H, t_pad), jnp.float32)),
      (H, nq, B), ("heads", "q_seq", "batch"), params)
  return (o[:, :T], jnp.swapaxes(lse_BHT, 1, 2)[:, :T], jnp.swapaxes(p2_BHT, 1, 2)[:, :T])


def _padded(T, bk):
  return pl.cdiv(T, math.lcm(2 * BLOCK_Q, bk)) * math.lcm(2 * BLOCK_Q, bk)


def _scratch(D, dtype, bk, stages, p_via_smem, o_splits, pingpong):
  """The forward kernel's scoped (SMEM buffers, barriers)."""
  bq = BLOCK_Q
  smem = (tiled_smem((COMPUTE_WGS, bq, D), dtype),
          tiled_smem((stages, bk, D), dtype), tiled_smem((stages, bk, D), dtype),
          plgpu.SMEM((COMPUTE_WGS, bq, D // o_splits), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
          plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
          tiled_smem((COMPUTE_WGS, bq, bk), dtype) if p_via_smem else None)
  bars = (plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=COMPUTE_WGS),
          plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
          plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
          plgpu.Barrier(num_arrivals=COMPUTE_WGS) if pingpong else None)
  return smem, bars


# ----------------------------------------------------------------------------- SMEM fit

def smem_bytes(config: MosaicConfig, D: int, dtype, T: int) -> int:
  """SMEM bytes the compiled forward kernel asks for at head dim D, input `dtype` and T rows,
  by `gpu_mosaic_common.smem_bytes` over the buffers the launch allocates (ring stages clipped
  to the padded length, as the launch does; the online softmax reduces). The backward's count
  is `gpu_mosaic_backward.smem_bytes`."""
  stages = min(config.stages, _padded(T, config.block_k) // config.block_k)
  return gpu_mosaic_common.smem_bytes(
      *_scratch(D, dtype, config.block_k, stages, config.p_via_smem, config.o_splits,
                config.pingpong),
      reduces=True)


def fitting_config(config: MosaicConfig, D: int, dtype, T: int) -> MosaicConfig | None:
  """`config` when its forward fits Hopper's SMEM, else the nearest that does (P in registers
  first, then o in more slabs, smaller key blocks, fewer stages), None when none does."""
  if smem_bytes(config, D, dtype, T) <= SMEM_LIMIT:
    return config
  for p_via_smem in dict.fromkeys((False, config.p_via_smem)):
    for o_splits in (o for o in (1, 2, 4) if o >= config.o_splits):
      for block_k in range(config.block_k, 0, -64):
        for stages in range(config.stages, 1 if config.intra_overlap else 0, -1):
          cand = dataclasses.replace(config, p_via_smem=p_via_smem, o_splits=o_splits,
                                     block_k=block_k, stages=stages)
          if smem_bytes(cand, D, dtype, T) <= SMEM_LIMIT:
            return cand
  return None


def smem_refusal(config: MosaicConfig, D: int, dtype, T: int) -> str | None:
  """None when the compiled forward of `config` fits Hopper's SMEM (`SMEM_LIMIT`) at this call's
  D, dtype and T; else one line with the bytes needed, the limit and a config that fits."""
  need = smem_bytes(config, D, dtype, T)
  if need <= SMEM_LIMIT:
    return None
  fit = fitting_config(config, D, dtype, T)
  fix = ("no MosaicConfig fits; use gpu_triton" if fit is None else
         f"use {config_repr(fit)} ({smem_bytes(fit, D, dtype, T)} bytes)")
  return (f"{config_repr(config)} needs {need} bytes of shared memory in its forward kernel at "
          f"D={D} {jnp.dtype(dtype).name}, over the {SMEM_LIMIT} a Hopper block can use; {fix}")
