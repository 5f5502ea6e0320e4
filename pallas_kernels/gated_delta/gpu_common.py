"""Launch knobs and shared helpers of the Pallas-Triton gated-delta kernels (`gpu_triton.py`).

`Tuning` (static launch knobs, `DEFAULT_TUNING` = the H100 sweep's winners), the dot algorithms
of the chunk inverse (`INVERSE_PRECISIONS`), the `chunk_math.Dots` a kernel runs with, storage
dtypes, V / K block sizes, the sequence split's piece count, Triton compiler params and the
small XLA-side helpers (time padding, chunk-local gate cumsum) and the in-kernel gate loads.

Dimension glossary
  B batch  T tokens (Tp padded)  H heads  K key dim (kd)  V value dim (vd)  C chunk (c)
  NC chunks (nc)  P sequence pieces
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta import chunk_math as cm


class Tuning(NamedTuple):
  """Launch knobs (static). `min_programs`: split the sequence into pieces until the state pass
  has at least this many programs (`num_pieces`; one piece count for every sequential pass of a
  call). `bwd_block_v`: V block of the reverse state pass (0 = `block_v`; smaller = more programs
  at the same piece count). `bwd_split` (only matters when the sequence is split): "recompute"
  = the backward reruns the forward's affine pass and scan for each piece's start state and runs
  its own reverse affine pass of width V + K; "reuse" = the residual forward saves each piece's
  start state and transition A ([B, H, P, K, V + K] f32), so the backward's forward pass skips
  its affine pass and scan, and the reverse affine pass runs width V only (its transition is
  A^T, exactly). `piece_scan_unroll`: unroll the P-step XLA scan that composes the pieces
  (same ops in the same order: straight-line code instead of a while loop)."""
  block_v: int = 64
  prepass_warps: int = 4
  state_warps: int = 4
  state_stages: int = 2
  bwd_state_warps: int = 4
  min_programs: int = 256
  states_dtype: str = "auto"  # per-chunk states / cotangents kept for the gradient kernels
  # ("auto": the input dtype for bf16/f16 q/k/v, f32 for f32 ones; or a dtype name)
  block_k: int = 32  # K columns per `gdn_dqkw` program (H100 sweep: 32 beat 64)
  dqkw_warps: int = 4
  wy_warps: int = 4
  wy_t0: str = "prepass"  # T0 written by the prepass, or "recompute" in `gdn_wy_bwd`
  dv_dtype: str = "auto"  # storage of dv' between the passes ("auto" as states_dtype;
  # v' is always stored in the input dtype)
  inverse_precision: str = "bf16x3"  # GPU dots of the doubling inverse: INVERSE_PRECISIONS
  inverse_block: int = 16  # blocked doubling (chunk_math.inverse_unit_lower); 0 = plain
  # defaults from one H200 call (bench/results/gated_delta_split_fla_h200.json), fwd+bwd ms with
  # (recompute, bwd_block_v 0) -> (reuse, 32): 16x2K 2.75 -> 2.64, 4x8K 3.38 -> 3.13,
  # 1x32K 3.59 -> 3.35
  bwd_block_v: int = 32
  bwd_split: str = "reuse"
  piece_scan_unroll: bool = False


DEFAULT_TUNING = Tuning()
BWD_SPLITS = ("recompute", "reuse")


def check_tuning(tuning):
  """A clear error for a `Tuning` value the kernels do not take."""
  if tuning.wy_t0 not in ("prepass", "recompute"):
    raise ValueError(f"Tuning.wy_t0={tuning.wy_t0!r}: pick 'prepass' or 'recompute'")
  if tuning.inverse_block < 0 or (tuning.inverse_block and not pow2(tuning.inverse_block)):
    raise ValueError(f"Tuning.inverse_block={tuning.inverse_block}: 0 or a power of 2")
  if tuning.bwd_split not in BWD_SPLITS:
    raise ValueError(f"Tuning.bwd_split={tuning.bwd_split!r}: pick one of {BWD_SPLITS}")
  if tuning.bwd_block_v < 0 or (tuning.bwd_block_v and not pow2(tuning.bwd_block_v)):
    raise ValueError(f"Tuning.bwd_block_v={tuning.bwd_block_v}: 0 (= block_v) or a power of 2")
  if tuning.inverse_precision not in INVERSE_PRECISIONS:
    raise ValueError(f"Tuning.inverse_precision={tuning.inverse_precision!r}: pick one of "
                     f"{tuple(INVERSE_PRECISIONS)}")


# `Tuning.inverse_precision` -> the dot algorithm of the doubling inverse on the GPU (all lower in
# Pallas-Triton: jax/_src/pallas/triton/lowering.py). "bf16x3"/"bf16x6" split each f32 operand
# into bf16 pieces and run 3/6 bf16 dots; "tf32" one TF32 dot (10-bit mantissa operands);
# "3xtf32" three TF32 dots (near-f32); "ieee" plain f32 FMA (no tensor cores; slow).
INVERSE_PRECISIONS = {
    "3xtf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
    "bf16x3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    "bf16x6": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "ieee": jax.lax.DotAlgorithmPreset.F32_F32_F32,
}


def dots(dtype, interpret: bool, tuning=None) -> cm.Dots:
  """bf16/f16 operands for the q/k/v/state dots when the inputs are. On the GPU the inverse runs
  at `Tuning.inverse_precision` (default bf16x3, near-f32 on tensor cores) and, for bf16/f16
  inputs, the other f32 dots as 1xTF32; exact f32 in interpret mode."""
  tuning = tuning or DEFAULT_TUNING
  if interpret:
    return cm.Dots(dtype=jnp.dtype(dtype), f32_precision=jax.lax.Precision.HIGHEST,
                   inverse_block=tuning.inverse_block)
  presets = jax.lax.DotAlgorithmPreset
  mid = None if jnp.dtype(dtype) == jnp.float32 else presets.TF32_TF32_F32
  inv = INVERSE_PRECISIONS[tuning.inverse_precision]
  if mid is None and inv != presets.TF32_TF32_F32_X3:
    mid = presets.TF32_TF32_F32_X3  # f32 inputs: the other f32 dots keep 3xTF32
  return cm.Dots(dtype=jnp.dtype(dtype), f32_precision=inv, mid_precision=mid,
                 inverse_block=tuning.inverse_block)


def storage(name: str, in_dtype):
  """A storage dtype knob: "auto" = the input dtype for bf16/f16 inputs, f32 for f32 inputs."""
  if name == "auto":
    return jnp.dtype(in_dtype) if jnp.dtype(in_dtype).itemsize == 2 else jnp.dtype(jnp.float32)
  return jnp.dtype(name)


def pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def block_v(kd, vd, tuning):
  return min(tuning.block_v, kd, vd)


def bwd_block_v(kd, vd, tuning):
  """V block of the reverse state pass (`Tuning.bwd_block_v`, 0 = `block_v`)."""
  return min(tuning.bwd_block_v or tuning.block_v, kd, vd)


def block_k(kd, tuning):
  return min(tuning.block_k, kd)


def num_pieces(b, h, nc, kd, vd, pieces, tuning):
  """Sequence pieces of the state passes: `pieces` if given (must divide the chunk count), else
  the fewest (a power of 2, >= 4 chunks each) that give the forward state pass B*H*(V/BV)*P >=
  `Tuning.min_programs` programs. The forward and both backward passes use this one count."""
  if pieces is not None:
    if nc % pieces:
      raise ValueError(f"pieces={pieces} must divide the number of chunks {nc}")
    return pieces
  programs = b * h * (vd // block_v(kd, vd, tuning))
  p = 1
  while programs * p < tuning.min_programs and nc % (2 * p) == 0 and nc // (2 * p) >= 4:
    p *= 2
  return p


def piece_starts(aug_BHPKW, init_BHKV, *, reverse=False, unroll=False):
  """Exact composition of the sequence pieces' affine maps: `aug` = [E | A] per piece (width
  V + K, from a state pass in "affine" mode), x_next = A x + E. Returns the value entering each
  piece [B, H, P, K, V] (walking the pieces backwards with `reverse`, as the reverse state pass
  does for cotangents; `unroll`: the P steps as straight-line code)."""
  vd = init_BHKV.shape[-1]
  e_PBHKV = jnp.moveaxis(aug_BHPKW[..., :vd], 2, 0)
  a_PBHKK = jnp.moveaxis(aug_BHPKW[..., vd:], 2, 0)

  def step(x, ea):
    e, a = ea
    return jnp.einsum("bhkj,bhjv->bhkv", a, x, precision=cm.HIGHEST) + e, x

  _, entering = jax.lax.scan(step, init_BHKV, (e_PBHKV, a_PBHKK), reverse=reverse,
                             unroll=bool(unroll))
  return jnp.moveaxis(entering, 0, 2)


def stages(dtype, tuning):
  """Software-pipelining depth of the chunk loops. f32 operands at K = V = 128 with 2 stages
  asked for 273 KiB of shared memory on an H200 (limit 227 KiB): no pipelining for f32."""
  return 1 if jnp.dtype(dtype) == jnp.float32 else tuning.state_stages


def params(num_warps, num_stages=2):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pad_time(x, tp):
  t = x.shape[1]
  return x if t == tp else jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))


def chunk_cumsum(log_gamma_BTH, nc, c):
  b, _, h = log_gamma_BTH.shape
  g = log_gamma_BTH.astype(jnp.float32).reshape(b, nc, c, h)
  return jnp.cumsum(g, axis=2).reshape(b, nc * c, h)


def gates(beta_ref, gc_ref, start, c):
  sl = pl.ds(start, c)
  gc = gc_ref[sl]
  return beta_ref[sl].reshape(c, 1), gc.reshape(c, 1), gc.reshape(1, c)
