"""Shared pieces of the Pallas-Triton Polar kernels: launch config, padding, offsets, masks, bands.

Package-internal (the `_` names are imported by `gpu_forward` and `gpu_backward`; the public
entry is `gpu_triton`). `BlockConfig.interpret=False` lowers the kernels for a GPU on a machine
without one.

Band loops: each key (or query) loop runs only over the blocks in the causal/window band
(`bands.py`), split in three phases: masked edge blocks, unmasked interior blocks, masked edge
blocks.
Logits are kept in base 2 (`scale * log2 e` folded into the per-row scale); statistics are
fp32; dot operands are in the input dtype (bf16 in training) with fp32 accumulation.

The Triton backend of Pallas is deprecated in JAX 0.11 but works; JAX raises its
DeprecationWarning when these kernels are lowered (at jit compile time, so no local filter here
can scope it; Python shows it only with warnings enabled, e.g. under pytest or `-W default`).

Dimension glossary
  B batch   Tq/Tk query/key rows   H query heads   G KV heads   R = H // G   D head dim
  bq/bk query/key block   nq/nk number of query/key blocks (after padding)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.polar_attention import bands, reference

LOG2E = math.log2(math.e)
NEG = reference.MASK_SENTINEL  # finite sentinel for invisible logits (spec §3.4)
PAD_LSE = 1e30  # lse of padded query rows: exp(s - lse) = 0, so they add nothing to dK/dV


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tile sizes and launch parameters (powers of two >= 16 for the blocks).

  Block sizes, warps and stages: the fastest of a per-kernel sweep at B=4, T=8K, 8/2 heads,
  D=128, bf16 on an H200 (bench/results/polar_attention_h200_run2_sweep.json).
  `dkv_flat_heads=True` from an H100 run (bench/results/polar_bwd_variants_h100.json, (4, 8K)):
  backward 4.61 ms vs 4.89 ms with the per-head loops (ptxas spills 1.1 KB vs 4.7 KB).
  """
  block_q: int = 128
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  dq_block_q: int = 128
  dq_block_k: int = 128
  dq_num_warps: int = 8
  dq_num_stages: int = 2
  dkv_block_q: int = 64
  dkv_block_k: int = 128
  dkv_num_warps: int = 8
  dkv_num_stages: int = 3
  # dK/dV kernel: True = one loop per phase over the group's (head, query tile) pairs;
  # False = one three-phase loop per query head (unrolled; more register spills).
  dkv_flat_heads: bool = True
  # Split-K decode forward (few query rows, long context): used when Tq * R <= decode_max_rows
  # and the key band holds at least decode_min_keys keys.
  decode_max_rows: int = 64
  decode_min_keys: int = 2048
  decode_block_k: int = 128
  decode_num_warps: int = 4
  decode_num_stages: int = 3
  decode_target_programs: int = 264  # ~2 per SM on an H100/H200
  # Pallas interpret mode: None = on a machine without a GPU; False lowers the kernels for a GPU
  # from any machine (lowering tests).
  interpret: bool | None = None


DEFAULT_CONFIG = BlockConfig()


def interpret_mode(config: BlockConfig) -> bool:
  return (jax.default_backend() != "gpu") if config.interpret is None else config.interpret


def _fit_block(block: int, t: int) -> int:
  """Largest useful power-of-two block: min(block, next_pow2(t)), at least 16 (Triton dots)."""
  return max(16, min(block, pl.next_power_of_2(t)))


def _pad_axis1(x, t_pad, value=0.0):
  t = x.shape[1]
  if t == t_pad:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, t_pad - t)
  return jnp.pad(x, pad, constant_values=value)


def _rows_bht(x_BTH, t_pad, value=0.0):
  """Per-row vector [B, T, H] -> fp32 [B, H, t_pad] (contiguous row loads in the kernels)."""
  return _pad_axis1(x_BTH.astype(jnp.float32), t_pad, value).transpose(0, 2, 1)


def _static_offset(q_offset):
  """The offset as a Python int when static, else None (then kernels read it from a ref)."""
  return int(q_offset) if isinstance(q_offset, int) else None


def _offset_arg(q_offset):
  """The offset as an int32[1] kernel input (read only when it is traced)."""
  return jnp.asarray(q_offset, jnp.int32).reshape(1)


OFFSET_SPEC = pl.BlockSpec((1,), lambda *_: (0,))


def _with_offset(kernel, q_offset):
  """Kernel taking the offset ref first: the static offset if known, else the loaded one."""
  def wrapped(off_ref, *refs):
    kernel(*refs, q_offset=q_offset if q_offset is not None else off_ref[0])
  return wrapped


def _dot(a, b, *, trans_a=False, trans_b=False):
  """MXU/tensor-core dot with fp32 accumulation (full fp32 precision for fp32 operands)."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


def _key_block_logits(q, k_ref, v_ref, scale2_q, rows_q, start, bk, *, tk, window, masked):
  """Key/value block at `start` and its base-2 logits `scale2 * q k^T` for the query rows.

  With `masked`, invisible (row, key) pairs get the finite sentinel; returns (k, v, s, valid)
  with `valid` None when unmasked.
  """
  k = k_ref[pl.ds(start, bk), :]
  v = v_ref[pl.ds(start, bk), :]
  s_qk = _dot(q, k, trans_b=True) * scale2_q[:, None]
  valid = None
  if masked:
    valid = bands.visible(rows_q[:, None], (start + jnp.arange(bk))[None, :], tk=tk,
                          window=window)
    s_qk = jnp.where(valid, s_qk, NEG)
  return k, v, s_qk, valid


def _rev_q(nq: int, H: int, D: int | None):
  """Index map of a per-(head, query tile) block for the grid (B*H, nq), query tiles visited
  last-first: grid axis 0 is scheduled fastest, so all heads of the heaviest (latest, under
  causal masking) tile run first, which shortens the tail; heads sharing K/V run together."""
  def index(bh, i):
    return (bh // H, nq - 1 - i, bh % H) + (() if D is None else (0,))
  return index


def _three_phase(lo, full_lo, full_hi, hi, body, carry):
  """Runs body(idx, carry, masked) over [lo, full_lo) masked, [full_lo, full_hi), rest masked."""
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _heads_three_phase(band, heads, body, carry, *, flat):
  """Runs body(qb, r, carry, masked) for heads r < `heads` over the query band's 3 phases.

  flat: one loop per phase over (head, query tile) pairs (3 loops; the pipeline fills once
  per phase); else one `_three_phase` per head (3 * heads loops, unrolled in the kernel).
  """
  if not flat:
    for r in range(heads):
      # head index as an int32 scalar (as the loop index is in the flat branch)
      head_body = lambda qb, carry, masked, r=jnp.int32(r): body(qb, r, carry, masked)
      carry = _three_phase(*band, head_body, carry)
    return carry
  lo, full_lo, full_hi, hi = band
  for a, b, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
    n = b - a

    def pair(i, carry, a=a, n=n, masked=masked):  # i -> (head i // n, query tile a + i % n)
      return body(a + lax.rem(i, n), lax.div(i, n), carry, masked)

    carry = lax.fori_loop(0, heads * n, pair, carry)
  return carry

