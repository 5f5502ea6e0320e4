"""Pallas GPU (Triton lowering) kernels of the chunked gated delta rule, forward and backward.

Math: `chunk_math.py` (KERNELS.md §2b). Kernels (all on the native `[B, T, H, D]` layout, no
transposes; T padded to a multiple of the chunk with identity tokens k = v = q = beta = g = 0):

  forward
    1. `_prepass`   grid (B, H, NC), parallel: T0 by doubling (f32; blocked, `Tuning.inverse_block`
                    = 16: the plain doubling over C = 64 loses T0 in f32 for correlated keys;
                    dot algorithm `Tuning.inverse_precision`), w, u per chunk.
    2. `_state`     grid (B, H, P, V/BV): one program per (b, h, sequence piece, V block) walks the
                    chunks of its piece in order with the state block [K, BV] in registers;
                    writes o, the piece's end state and (for the backward) each chunk's entry
                    state.
    sequence split (B*H*V/BV too small to fill the GPU, e.g. B=1, 64K): each piece's chunk map
    is affine in its start state, `S_end = A S_start + E`. `_state` in "affine" mode runs every
    piece from the augmented start state [0 | I] with values [u | 0] (width V + K) and returns
    [E | A]; a P-step `lax.scan` in XLA composes the pieces exactly; then `_state` reruns each
    piece from its true start state to write o.
  backward (residuals = the primal inputs, plus through api's custom_vjp the forward's prepass
  w, u (input dtype) and T0 (f32 [B, Tp, H, C]) from `gated_delta_fwd_residuals`: B*Tp*H*
  ((K + V)*itemsize + 4*C) bytes per layer, 201 MB at bf16 (16, 2K, H=8, K=V=128, C=64);
  everything else is recomputed)
    1. prepass (only without saved residuals; + T0 for "wy" with `wy_t0="prepass"`) + state
       pass in "states" mode: each chunk's entry state S, [B, H, NC, K, V] in
       `Tuning.states_dtype` ("auto": bf16 for bf16 inputs, f32 for f32), and for "wy" also
       v' = u - w S per chunk, [B, Tp, H, V] in the
       input dtype (computed there anyway; every later use of v' is a dot in that dtype, so this
       loses nothing); split into pieces like the forward.
    2. `_state_bwd` grid (B, H, P, V/BV): reverse chunk walk of dS (same affine piece split:
       dS_in = M dS_out + F); writes the cotangent dS1 leaving each chunk, d(initial state) and,
       for "wy", dv' = P^T dO + (K r) dS1 per chunk (computed there anyway; stored in
       `Tuning.dv_dtype`, "auto" as the states).
    3. gradients, chosen by `Tuning.grads` (static):
       "wy" (default; FLA's decomposition in our convention, chunk_math "WY decomposition"):
         `gdn_dqkw`   grid (B, H, NC, K/BK), BK = `block_k`: V walked in blocks, accumulates
                      dO S^T, v' dS1^T, -dv' S^T (C x BK) and dO v'^T (C x C, recomputed per K
                      block); writes dq (final), dk_direct f32, dw = -dv' S^T f32 and the K
                      block's dgc partial [K/BK, B, Tp, H] (summed in XLA).
         `gdn_wy_bwd` grid (B, H, NC): through u = T(beta V), w = T(beta e K) and T = T0 * D
                      (T0 from the prepass or recomputed): dv, dk (= dk_direct + the terms
                      through T), dbeta, the rest of dgc. Nothing holds more than one C x C
                      accumulator and three C x BK ones.
       "fused": `_grads` grid (B, H, NC): everything per chunk in one program (five f32
         accumulators plus S, dS1 blocks: spills; ~8 ms of the 10.3 ms fwd+bwd measured on an
         H200 at (16, 2K)).
       "split": `_grads_partial` grid (B, H, NC, V/BV) writes each V-block's share of the
         V-sums, `_grads_final` grid (B, H, NC) adds them and finishes (big f32 partials).
    4. XLA: reverse chunk-local cumsum dgc -> dlog_gamma.

Measured (H200, bf16, H=8, K=V=128, C=64; bench/results/gated_delta_h200.json): forward
0.83 ms at (B,T)=(16,2K), 1.92 ms at (1,64K), 4.9-11x the XLA chunked path; forward+backward
10.3 ms at (16,2K) with "fused" gradients (the state passes take 0.2-0.5 ms each). The "wy"
path is interpret-tested; its GPU timing: `bench/gated_delta.py --sweep --breakdown`.

Public: `gated_delta_fwd`, `gated_delta_bwd`, `is_supported`, `unsupported_reason` (contract of
`xla_chunked.py`: residuals = the six primal inputs). Pass `interpret=True` to run on CPU.
Launch knobs: `Tuning` (static). f32 q/k/v are refused at K*V > 64*64 (shared memory).

Dimension glossary
  B batch  T tokens (Tp padded)  H heads  K key dim  V value dim  C chunk  NC chunks
  P sequence pieces  CP chunks per piece  BV value block  BK key block
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta import chunk_math as cm



class Tuning(NamedTuple):
  """Launch knobs (static). `min_programs`: split the sequence into pieces until the state pass
  has at least this many programs."""
  block_v: int = 64
  prepass_warps: int = 4
  state_warps: int = 4
  state_stages: int = 2
  bwd_state_warps: int = 4
  grads_warps: int = 8
  min_programs: int = 256
  states_dtype: str = "auto"  # per-chunk states / cotangents kept for the gradient kernels
  # ("auto": the input dtype for bf16/f16 q/k/v, f32 for f32 ones; or a dtype name)
  grads: str = "wy"  # "wy" | "fused" | "split": which gradient kernels (module docstring)
  block_k: int = 32  # "wy": K columns per `gdn_dqkw` program (H100 sweep: 32 beat 64)
  dqkw_warps: int = 4
  wy_warps: int = 4
  wy_t0: str = "prepass"  # "wy": T0 written by the prepass, or "recompute" in `gdn_wy_bwd`
  dv_dtype: str = "auto"  # "wy": storage of dv' between the passes ("auto" as states_dtype;
  # v' is always stored in the input dtype)
  inverse_precision: str = "bf16x3"  # GPU dots of the doubling inverse: INVERSE_PRECISIONS
  inverse_block: int = 16  # blocked doubling (chunk_math.inverse_unit_lower); 0 = plain


GRADS = ("fused", "split", "wy")


DEFAULT_TUNING = Tuning()


def _check_tuning(tuning):
  if tuning.grads not in GRADS:
    raise ValueError(f"Tuning.grads={tuning.grads!r}: pick one of {GRADS}")
  if tuning.wy_t0 not in ("prepass", "recompute"):
    raise ValueError(f"Tuning.wy_t0={tuning.wy_t0!r}: pick 'prepass' or 'recompute'")
  if tuning.inverse_block < 0 or (tuning.inverse_block and not _pow2(tuning.inverse_block)):
    raise ValueError(f"Tuning.inverse_block={tuning.inverse_block}: 0 or a power of 2")
  if tuning.inverse_precision not in INVERSE_PRECISIONS:
    raise ValueError(f"Tuning.inverse_precision={tuning.inverse_precision!r}: pick one of "
                     f"{tuple(INVERSE_PRECISIONS)}")


def _storage(name: str, in_dtype):
  """A storage dtype knob: "auto" = the input dtype for bf16/f16 inputs, f32 for f32 inputs."""
  if name == "auto":
    return jnp.dtype(in_dtype) if jnp.dtype(in_dtype).itemsize == 2 else jnp.dtype(jnp.float32)
  return jnp.dtype(name)


def _pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def unsupported_reason(q, k, v, *unused, chunk_size: int) -> str | None:
  """None when these kernels take the inputs, else what is wrong (and the fix)."""
  del unused  # log_gamma, beta, initial_state: any shapes check_gated_delta_shapes accepts
  K, V = q.shape[-1], v.shape[-1]
  if not (_pow2(chunk_size) and 16 <= chunk_size <= 128):
    return f"chunk_size={chunk_size}: the Triton kernels need a power of 2 in [16, 128]"
  if not (_pow2(K) and _pow2(V) and 16 <= K <= 256 and 16 <= V <= 256):
    return (f"K={K}, V={V}: the Triton kernels need powers of 2 in [16, 256] (Triton dots need "
            "every dimension >= 16); use impl='xla'")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16) or not (k.dtype == v.dtype == q.dtype):
    return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: need one of f32/bf16/f16 for all three"
  if q.dtype == jnp.float32 and K * V > 64 * 64:
    return (f"f32 q/k/v with K={K}, V={V}: a kernel asked for 273 KiB of shared memory on an "
            "H200 (limit 227 KiB); pass bf16 q/k/v (the state stays f32) or use impl='xla'")
  return None


def is_supported(q, k, v, *unused, chunk_size: int) -> bool:
  """True when `unsupported_reason` finds nothing (extra positional args are ignored)."""
  return unsupported_reason(q, k, v, chunk_size=chunk_size) is None


def _check(q, k, v, chunk_size):
  reason = unsupported_reason(q, k, v, chunk_size=chunk_size)
  if reason is not None:
    raise ValueError(f"gated_delta gpu_triton: {reason}")


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


def _dots(dtype, interpret: bool, tuning=None) -> cm.Dots:
  """bf16/f16 operands for the q/k/v/state dots when the inputs are. On the GPU the inverse runs
  at `Tuning.inverse_precision` (default 3xTF32, near-f32 on tensor cores) and, for bf16/f16
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


def _pad_time(x, tp):
  t = x.shape[1]
  return x if t == tp else jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))


def _chunk_cumsum(log_gamma_BTH, nc, c):
  b, _, h = log_gamma_BTH.shape
  g = log_gamma_BTH.astype(jnp.float32).reshape(b, nc, c, h)
  return jnp.cumsum(g, axis=2).reshape(b, nc * c, h)


def _gates(beta_ref, gc_ref, start, c):
  sl = pl.ds(start, c)
  gc = gc_ref[sl]
  return beta_ref[sl].reshape(c, 1), gc.reshape(c, 1), gc.reshape(1, c)


# ------------------------------------------------------------------------------------ kernels


def _prepass_kernel(k_ref, v_ref, beta_ref, gc_ref, w_ref, u_ref, *t0_ref, cfg):
  c = k_ref.shape[0]
  beta_c1, gc_c1, gc_1c = _gates(beta_ref, gc_ref, 0, c)
  _, w, u, t0 = cm.chunk_wy(k_ref[...], v_ref[...], beta_c1, gc_c1, gc_1c, cfg=cfg, with_t0=True)
  w_ref[...] = w.astype(w_ref.dtype)
  u_ref[...] = u.astype(u_ref.dtype)
  if t0_ref:
    t0_ref[0][...] = t0


def _state_kernel(q_ref, k_ref, w_ref, u_ref, gc_ref, s0_ref, *out_refs, c, cp, nvb, mode, cfg):
  """mode: "output" (o + end state), "states" (end state + each chunk's entry state, for the
  backward) or "affine" (end state from [0 | I] with values [u | 0])."""
  p = pl.program_id(2)
  vb = pl.program_id(3)
  states_ref = []
  vnew_ref = None
  if mode == "output":
    o_ref, send_ref = out_refs
  elif mode == "states":
    send_ref, *states_ref = out_refs
    if len(states_ref) == 2:
      states_ref, vnew_ref = states_ref[:1], states_ref[1]
  else:
    (send_ref,) = out_refs
  kdim, bv = s0_ref.shape
  if mode == "affine":
    is_a = vb >= nvb
    row, col = cm.iota2(kdim, bv)
    eye = jnp.where(row == col + (vb - nvb) * bv, 1.0, 0.0)
    s_init = jnp.where(is_a, eye, 0.0).astype(jnp.float32)
  else:
    s_init = s0_ref[...].astype(jnp.float32)

  def body(i, s):
    idx = p * cp + i
    sl = pl.ds(idx * c, c)
    gc = gc_ref[sl]
    u = u_ref[sl, :].astype(jnp.float32)
    if mode == "affine":
      u = jnp.where(is_a, 0.0, u)
    if states_ref:
      states_ref[0][idx] = s.astype(states_ref[0].dtype)
    o, s_new, v_new = cm.chunk_state_step_vnew(q_ref[sl, :], k_ref[sl, :], w_ref[sl, :], u,
                                               gc.reshape(c, 1), gc.reshape(1, c), s, cfg=cfg,
                                               with_output=mode == "output")
    if mode == "output":
      o_ref[sl, :] = o.astype(o_ref.dtype)
    if vnew_ref is not None:
      vnew_ref[sl, :] = v_new.astype(vnew_ref.dtype)
    return s_new

  s_end = jax.lax.fori_loop(0, cp, body, s_init)
  send_ref[...] = s_end


def _state_bwd_kernel(q_ref, k_ref, w_ref, do_ref, gc_ref, dsout_ref, *out_refs, c, cp, nvb,
                      mode, cfg):
  """Reverse walk of piece p's chunks. mode "states": writes the cotangent leaving each chunk and
  the one entering the piece; "affine": from [0 | I] with cotangents [do | 0] (width V + K),
  writes the piece's entering cotangent [F | M] (dS_in = M dS_out + F). "states" with a third
  output ref also writes dv' per chunk (the "wy" gradients)."""
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


def _state_bwd_pass(q, k, w, do, gc, ds_out, *, c, mode, tuning, interpret, with_dv=False):
  """ds_out [B, H, P, K, V]: cotangent leaving each piece (ignored in "affine" mode).
  `with_dv` ("states" mode): also dv' per chunk, [B, Tp, H, V] in `tuning.dv_dtype`."""
  b, tp, h, kd = q.shape
  vd = do.shape[-1]
  npieces = ds_out.shape[2]
  nc = tp // c
  bv = _block_v(kd, vd, tuning)
  nvb = vd // bv
  clamp = (lambda n: jnp.minimum(n, nvb - 1)) if mode == "affine" else (lambda n: n)
  full = lambda d: pl.BlockSpec((None, tp, None, d), lambda i, j, p, n: (i, 0, j, 0))
  piece_in = pl.BlockSpec((None, None, None, kd, bv), lambda i, j, p, n: (i, j, p, 0, clamp(n)))
  piece_out = pl.BlockSpec((None, None, None, kd, bv), lambda i, j, p, n: (i, j, p, 0, n))
  if mode == "affine":
    nblocks = (vd + kd) // bv
    out_specs = [piece_out]
    out_shape = [jax.ShapeDtypeStruct((b, h, npieces, kd, vd + kd), jnp.float32)]
  else:
    nblocks = nvb
    out_specs = [pl.BlockSpec((None, None, nc, kd, bv), lambda i, j, p, n: (i, j, 0, 0, n)),
                 piece_out]
    out_shape = [jax.ShapeDtypeStruct((b, h, nc, kd, vd),
                                         _storage(tuning.states_dtype, q.dtype)),
                 jax.ShapeDtypeStruct((b, h, npieces, kd, vd), jnp.float32)]
    if with_dv:
      out_specs.append(pl.BlockSpec((None, tp, None, bv), lambda i, j, p, n: (i, 0, j, n)))
      out_shape.append(jax.ShapeDtypeStruct((b, tp, h, vd),
                                          _storage(tuning.dv_dtype, q.dtype)))
  return pl.pallas_call(
      functools.partial(_state_bwd_kernel, c=c, cp=nc // npieces, nvb=nvb, mode=mode,
                        cfg=_dots(q.dtype, interpret, tuning)),
      grid=(b, h, npieces, nblocks),
      in_specs=[full(kd), full(kd), full(kd),
                pl.BlockSpec((None, tp, None, bv), lambda i, j, p, n: (i, 0, j, clamp(n))),
                pl.BlockSpec((None, tp, None), lambda i, j, p, n: (i, 0, j)),
                piece_in],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(tuning.bwd_state_warps, _stages(q.dtype, tuning)),
      interpret=interpret, name="gdn_state_bwd_affine" if mode == "affine" else "gdn_state_bwd",
  )(q, k, w, do, gc, ds_out)


def _backward_states(q, k, w, do, gc, dsT, *, c, pieces, tuning, interpret, with_dv=False):
  """Reverse state pass (split into pieces when useful): (per-chunk leaving cotangents, dS0)
  [+ dv' per chunk with `with_dv`]."""
  b, tp, h, kd = q.shape
  vd = do.shape[-1]
  npieces = _num_pieces(b, h, tp // c, kd, vd, pieces, tuning)
  if npieces == 1:
    ds_out = dsT[:, :, None]
  else:
    aug = _state_bwd_pass(q, k, w, do, gc, jnp.zeros((b, h, npieces, kd, vd), jnp.float32),
                          c=c, mode="affine", tuning=tuning, interpret=interpret)[0]
    f_PBHKV = jnp.moveaxis(aug[..., :vd], 2, 0)
    m_PBHKK = jnp.moveaxis(aug[..., vd:], 2, 0)

    def step(ds, fm):
      f, m = fm
      return jnp.einsum("bhkj,bhjv->bhkv", m, ds, precision=cm.HIGHEST) + f, ds

    _, outs = jax.lax.scan(step, dsT, (f_PBHKV, m_PBHKK), reverse=True)
    ds_out = jnp.moveaxis(outs, 0, 2)
  dstates, ds_in, *dv = _state_bwd_pass(q, k, w, do, gc, ds_out, c=c, mode="states",
                                        tuning=tuning, interpret=interpret, with_dv=with_dv)
  return (dstates, ds_in[:, :, 0], *dv)


def _grads_kernel(q_ref, k_ref, v_ref, beta_ref, gc_ref, do_ref, s_ref, ds_ref,
                  dq_ref, dk_ref, dv_ref, dbeta_ref, dgc_ref, *, bv, cfg):
  """One chunk's gradients, the value dim walked in blocks of `bv` (bounded register use)."""
  c, kd = k_ref.shape
  vd = v_ref.shape[-1]
  beta_c1, gc_c1, gc_1c = _gates(beta_ref, gc_ref, 0, c)
  q, k = q_ref[...], k_ref[...]
  ctx = cm.grads_prologue(q, k, beta_c1, gc_c1, gc_1c, cfg=cfg)
  acc = cm.grads_init(c, kd)
  for j in range(vd // bv):
    cols = slice(j * bv, (j + 1) * bv)
    dv, acc = cm.grads_vblock(ctx, acc, q, k, beta_c1, v_ref[:, cols], do_ref[:, cols],
                              s_ref[:, cols].astype(jnp.float32),
                              ds_ref[:, cols].astype(jnp.float32), cfg=cfg)
    dv_ref[:, cols] = dv.astype(dv_ref.dtype)
  dq, dk, dbeta, dgc_col, dgc_row = cm.grads_epilogue(ctx, acc, q, k, beta_c1, cfg=cfg)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dbeta_ref[...] = dbeta.reshape(c)
  dgc_ref[...] = dgc_col.reshape(c) + dgc_row.reshape(c)


def _grads_partial_kernel(q_ref, k_ref, t0_ref, v_ref, beta_ref, gc_ref, do_ref, s_ref, ds_ref,
                          dv_ref, pdq_ref, pvds_ref, pdk_ref, pdt_ref, pdp_ref, pdbeta_ref,
                          pdgc_ref, *, cfg):
  """Split gradients, part 1: one (chunk, V-block): dv and this block's share of the V-sums."""
  c, kd = k_ref.shape
  beta_c1, gc_c1, gc_1c = _gates(beta_ref, gc_ref, 0, c)
  q, k = q_ref[...], k_ref[...]
  ctx = cm.grads_prologue(q, k, beta_c1, gc_c1, gc_1c, cfg=cfg, t0_CC=t0_ref[...])
  dv, acc = cm.grads_vblock(ctx, cm.grads_init(c, kd), q, k, beta_c1, v_ref[...], do_ref[...],
                            s_ref[...].astype(jnp.float32), ds_ref[...].astype(jnp.float32),
                            cfg=cfg)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  last = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  dgc = acc.dgc + jnp.where(last, jnp.exp(ctx.gl) * acc.tail, 0.0)
  pdq_ref[...] = acc.dq
  pvds_ref[...] = acc.vds
  pdk_ref[...] = acc.dk
  pdt_ref[...] = acc.dt
  pdp_ref[...] = acc.dp
  pdbeta_ref[...] = acc.dbeta.reshape(c)
  pdgc_ref[...] = dgc.reshape(c)


def _grads_final_kernel(q_ref, k_ref, t0_ref, beta_ref, gc_ref, pdq_ref, pvds_ref, pdk_ref,
                        pdt_ref, pdp_ref, pdbeta_ref, pdgc_ref, dq_ref, dk_ref, dbeta_ref,
                        dgc_ref, *, nvb, cfg):
  """Split gradients, part 2: one chunk: sum the V-block shares, then the epilogue."""
  c, kd = k_ref.shape
  beta_c1, gc_c1, gc_1c = _gates(beta_ref, gc_ref, 0, c)
  q, k = q_ref[...], k_ref[...]
  ctx = cm.grads_prologue(q, k, beta_c1, gc_c1, gc_1c, cfg=cfg, t0_CC=t0_ref[...])
  tot = lambda ref: functools.reduce(lambda a, j: a + ref[j], range(1, nvb), ref[0])
  acc = cm.GradAcc(dq=tot(pdq_ref), vds=tot(pvds_ref), dk=tot(pdk_ref), dt=tot(pdt_ref),
                   dp=tot(pdp_ref), dbeta=tot(pdbeta_ref).reshape(c, 1),
                   dgc=tot(pdgc_ref).reshape(c, 1), tail=jnp.zeros((1, 1), jnp.float32))
  dq, dk, dbeta, dgc_col, dgc_row = cm.grads_epilogue(ctx, acc, q, k, beta_c1, cfg=cfg)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dbeta_ref[...] = dbeta.reshape(c)
  dgc_ref[...] = dgc_col.reshape(c) + dgc_row.reshape(c)


def _fused_grads(q, k, v, beta, gc, do, states, dstates, *, c, out_dtypes, tuning, interpret):
  """(dq, dk, dv, dbeta, dgc) by the one per-chunk gradient kernel `gdn_grads`."""
  b, tp, h, kd = q.shape
  vd = v.shape[-1]
  tok = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  gate = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  st = pl.BlockSpec((None, None, None, kd, vd), lambda i, j, n: (i, j, n, 0, 0))
  f32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.float32)
  return pl.pallas_call(
      functools.partial(_grads_kernel, bv=_block_v(kd, vd, tuning),
                        cfg=_dots(q.dtype, interpret, tuning)),
      grid=(b, h, tp // c),
      in_specs=[tok(kd), tok(kd), tok(vd), gate, gate, tok(vd), st, st],
      out_specs=[tok(kd), tok(kd), tok(vd), gate, gate],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), out_dtypes[0]),
                 jax.ShapeDtypeStruct((b, tp, h, kd), out_dtypes[1]),
                 jax.ShapeDtypeStruct((b, tp, h, vd), out_dtypes[2]), f32(b, tp, h),
                 f32(b, tp, h)],
      compiler_params=_params(tuning.grads_warps, 1), interpret=interpret, name="gdn_grads",
  )(q, k, v, beta, gc, do, states, dstates)


def _split_grads(q, k, v, beta, gc, do, states, dstates, t0, *, c, out_dtypes, tuning,
                 interpret):
  """(dq, dk, dv, dbeta, dgc) by the two split-gradient kernels."""
  b, tp, h, kd = q.shape
  vd = v.shape[-1]
  nc = tp // c
  bv = _block_v(kd, vd, tuning)
  nvb = vd // bv
  cfg = _dots(q.dtype, interpret, tuning)
  tok4 = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n, m: (i, n, j, 0))
  vblk4 = pl.BlockSpec((None, c, None, bv), lambda i, j, n, m: (i, n, j, m))
  gate4 = pl.BlockSpec((None, c, None), lambda i, j, n, m: (i, n, j))
  st4 = pl.BlockSpec((None, None, None, kd, bv), lambda i, j, n, m: (i, j, n, 0, m))
  part = lambda d: pl.BlockSpec((None, None, c, None, d), lambda i, j, n, m: (m, i, n, j, 0))
  part_g = pl.BlockSpec((None, None, c, None), lambda i, j, n, m: (m, i, n, j))
  f32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.float32)
  dv, pdq, pvds, pdk, pdt, pdp, pdbeta, pdgc = pl.pallas_call(
      functools.partial(_grads_partial_kernel, cfg=cfg),
      grid=(b, h, nc, nvb),
      in_specs=[tok4(kd), tok4(kd), tok4(c), vblk4, gate4, gate4, vblk4, st4, st4],
      out_specs=[vblk4, part(kd), part(kd), part(kd), part(c), part(c), part_g, part_g],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, vd), out_dtypes[2]),
                 f32(nvb, b, tp, h, kd), f32(nvb, b, tp, h, kd), f32(nvb, b, tp, h, kd),
                 f32(nvb, b, tp, h, c), f32(nvb, b, tp, h, c), f32(nvb, b, tp, h),
                 f32(nvb, b, tp, h)],
      compiler_params=_params(tuning.grads_warps, 1), interpret=interpret,
      name="gdn_grads_partial",
  )(q, k, t0, v, beta, gc, do, states, dstates)
  tok = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  gate = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  allp = lambda d: pl.BlockSpec((nvb, None, c, None, d), lambda i, j, n: (0, i, n, j, 0))
  allp_g = pl.BlockSpec((nvb, None, c, None), lambda i, j, n: (0, i, n, j))
  dq, dk, dbeta, dgc = pl.pallas_call(
      functools.partial(_grads_final_kernel, nvb=nvb, cfg=cfg),
      grid=(b, h, nc),
      in_specs=[tok(kd), tok(kd), tok(c), gate, gate, allp(kd), allp(kd), allp(kd), allp(c),
                allp(c), allp_g, allp_g],
      out_specs=[tok(kd), tok(kd), gate, gate],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), out_dtypes[0]),
                 jax.ShapeDtypeStruct((b, tp, h, kd), out_dtypes[1]),
                 f32(b, tp, h), f32(b, tp, h)],
      compiler_params=_params(tuning.grads_warps, 1), interpret=interpret,
      name="gdn_grads_final",
  )(q, k, t0, beta, gc, pdq, pvds, pdk, pdt, pdp, pdbeta, pdgc)
  return dq, dk, dv, dbeta, dgc


def _dqkw_kernel(q_ref, k_ref, gc_ref, do_ref, vn_ref, dvn_ref, s_ref, ds_ref,
                 dq_ref, dkd_ref, dw_ref, pdgc_ref, *, bv, cfg):
  """"wy" gradients, part 1: one (chunk, K-column block): dq (final), dk_direct, dw and this
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
  """"wy" gradients, part 2: one chunk, through u = T (beta V), w = T (beta e K) and T:
  dk, dv, dbeta, and the dgc terms through T. `refs`: [t0_ref,] then the outputs."""
  t0_ref, (dk_ref, dv_ref, dbeta_ref, dgc_ref) = (refs[0] if len(refs) == 5 else None), refs[-4:]
  c, kd = k_ref.shape
  vd = v_ref.shape[-1]
  beta_c1, gc_c1, gc_1c = _gates(beta_ref, gc_ref, 0, c)
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


def _block_k(kd, tuning):
  return min(tuning.block_k, kd)


def _dqkw(q, k, gc, do, vnew, dvnew, states, dstates, *, c, dq_dtype, tuning, interpret):
  """`gdn_dqkw`, grid (B, H, NC, K/BK): (dq, dk_direct f32, dw f32, dgc partials
  [K/BK, B, Tp, H])."""
  b, tp, h, kd = q.shape
  vd = do.shape[-1]
  nc = tp // c
  bk = _block_k(kd, tuning)
  nkb = kd // bk
  kblk = pl.BlockSpec((None, c, None, bk), lambda i, j, n, m: (i, n, j, m))
  vall = pl.BlockSpec((None, c, None, vd), lambda i, j, n, m: (i, n, j, 0))
  gate = pl.BlockSpec((None, c, None), lambda i, j, n, m: (i, n, j))
  st = pl.BlockSpec((None, None, None, bk, vd), lambda i, j, n, m: (i, j, n, m, 0))
  f32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.float32)
  return pl.pallas_call(
      functools.partial(_dqkw_kernel, bv=_block_v(kd, vd, tuning), cfg=_dots(q.dtype, interpret, tuning)),
      grid=(b, h, nc, nkb),
      in_specs=[kblk, kblk, gate, vall, vall, vall, st, st],
      out_specs=[kblk, kblk, kblk,
                 pl.BlockSpec((None, None, c, None), lambda i, j, n, m: (m, i, n, j))],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), dq_dtype), f32(b, tp, h, kd),
                 f32(b, tp, h, kd), f32(nkb, b, tp, h)],
      compiler_params=_params(tuning.dqkw_warps, 1), interpret=interpret, name="gdn_dqkw",
  )(q, k, gc, do, vnew, dvnew, states, dstates)


def _wy_bwd(k, v, beta, gc, dvnew, dw, dkd, t0, *, c, out_dtypes, tuning, interpret):
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
      functools.partial(_wy_bwd_kernel, bk=_block_k(kd, tuning), bv=_block_v(kd, vd, tuning),
                        cfg=_dots(k.dtype, interpret, tuning)),
      grid=(b, h, nc),
      in_specs=in_specs,
      out_specs=[tok(kd), tok(vd), gate, gate],
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), out_dtypes[1]),
                 jax.ShapeDtypeStruct((b, tp, h, vd), out_dtypes[2]), f32(b, tp, h),
                 f32(b, tp, h)],
      compiler_params=_params(tuning.wy_warps, 1), interpret=interpret, name="gdn_wy_bwd",
  )(*args)


# ------------------------------------------------------------------------------------ drivers


def _stages(dtype, tuning):
  """Software-pipelining depth of the chunk loops. f32 operands at K = V = 128 with 2 stages
  asked for 273 KiB of shared memory on an H200 (limit 227 KiB): no pipelining for f32."""
  return 1 if jnp.dtype(dtype) == jnp.float32 else tuning.state_stages


def _params(num_warps, num_stages=2):
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _prepass(k, v, beta, gc, *, c, tuning, interpret, with_t0=False):
  b, tp, h, kd = k.shape
  vd = v.shape[-1]
  nc = tp // c
  tok = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  gate = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  wdt = k.dtype
  return pl.pallas_call(
      functools.partial(_prepass_kernel, cfg=_dots(k.dtype, interpret, tuning)),
      grid=(b, h, nc),
      in_specs=[tok(kd), tok(vd), gate, gate],
      out_specs=[tok(kd), tok(vd)] + ([tok(c)] if with_t0 else []),
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), wdt),
                 jax.ShapeDtypeStruct((b, tp, h, vd), wdt)]
                + ([jax.ShapeDtypeStruct((b, tp, h, c), jnp.float32)] if with_t0 else []),
      compiler_params=_params(tuning.prepass_warps, 1), interpret=interpret,
      name="gdn_prepass",
  )(k, v, beta, gc)


def _block_v(kd, vd, tuning):
  return min(tuning.block_v, kd, vd)


def _state_pass(q, k, w, u, gc, s_start, *, c, mode, tuning, interpret, with_v=False):
  """s_start [B, H, P, K, V]. Returns per mode (see `_state_kernel`); `with_v` ("states"
  mode): also v' per chunk, [B, Tp, H, V] in the input dtype (all its uses are dots in it)."""
  b, tp, h, kd = q.shape
  vd = u.shape[-1]
  npieces = s_start.shape[2]
  nc = tp // c
  cp = nc // npieces
  bv = _block_v(kd, vd, tuning)
  nvb = vd // bv
  full = lambda d: pl.BlockSpec((None, tp, None, d), lambda i, j, p, n: (i, 0, j, 0))
  if mode == "affine":
    nblocks = (vd + kd) // bv
    vblock = pl.BlockSpec((None, tp, None, bv),
                          lambda i, j, p, n: (i, 0, j, jnp.minimum(n, nvb - 1)))
    s0_spec = pl.BlockSpec((None, None, None, kd, bv),
                           lambda i, j, p, n: (i, j, p, 0, jnp.minimum(n, nvb - 1)))
    out_specs = [pl.BlockSpec((None, None, None, kd, bv), lambda i, j, p, n: (i, j, p, 0, n))]
    out_shape = [jax.ShapeDtypeStruct((b, h, npieces, kd, vd + kd), jnp.float32)]
  else:
    nblocks = nvb
    vblock = pl.BlockSpec((None, tp, None, bv), lambda i, j, p, n: (i, 0, j, n))
    s0_spec = pl.BlockSpec((None, None, None, kd, bv), lambda i, j, p, n: (i, j, p, 0, n))
    out_specs = [s0_spec]
    out_shape = [jax.ShapeDtypeStruct((b, h, npieces, kd, vd), jnp.float32)]
    if mode == "output":
      out_specs.insert(0, vblock)
      out_shape.insert(0, jax.ShapeDtypeStruct((b, tp, h, vd), jnp.float32))
    else:
      out_specs.append(pl.BlockSpec((None, None, nc, kd, bv), lambda i, j, p, n: (i, j, 0, 0, n)))
      out_shape.append(jax.ShapeDtypeStruct((b, h, nc, kd, vd),
                                         _storage(tuning.states_dtype, q.dtype)))
      if with_v:
        out_specs.append(vblock)
        out_shape.append(jax.ShapeDtypeStruct((b, tp, h, vd), q.dtype))
  gate = pl.BlockSpec((None, tp, None), lambda i, j, p, n: (i, 0, j))
  return pl.pallas_call(
      functools.partial(_state_kernel, c=c, cp=cp, nvb=nvb, mode=mode,
                        cfg=_dots(q.dtype, interpret, tuning)),
      grid=(b, h, npieces, nblocks),
      in_specs=[full(kd), full(kd), full(kd), vblock, gate, s0_spec],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_params(tuning.state_warps, _stages(q.dtype, tuning)), interpret=interpret,
      name="gdn_state_affine" if mode == "affine" else "gdn_state",
  )(q, k, w, u, gc, s_start)


def _num_pieces(b, h, nc, kd, vd, pieces, tuning):
  if pieces is not None:
    if nc % pieces:
      raise ValueError(f"pieces={pieces} must divide the number of chunks {nc}")
    return pieces
  programs = b * h * (vd // _block_v(kd, vd, tuning))
  p = 1
  while programs * p < tuning.min_programs and nc % (2 * p) == 0 and nc // (2 * p) >= 4:
    p *= 2
  return p


def _forward_states(q, k, w, u, gc, s0, *, c, pieces, save_states, tuning, interpret,
                    with_v=False):
  """Runs the state pass (split into pieces when useful).

  Returns (o, final state), or (None, final state, per-chunk entry states[, v' per chunk with
  `with_v`]) with `save_states`.
  """
  b, tp, h, kd = q.shape
  vd = u.shape[-1]
  npieces = _num_pieces(b, h, tp // c, kd, vd, pieces, tuning)
  if npieces == 1:
    s_start = s0[:, :, None]
  else:
    aug = _state_pass(q, k, w, u, gc, jnp.zeros((b, h, npieces, kd, vd), jnp.float32), c=c,
                      mode="affine", tuning=tuning, interpret=interpret)[0]
    e_PBHKV = jnp.moveaxis(aug[..., :vd], 2, 0)
    a_PBHKK = jnp.moveaxis(aug[..., vd:], 2, 0)

    def step(s, ea):
      e, a = ea
      return jnp.einsum("bhkj,bhjv->bhkv", a, s, precision=cm.HIGHEST) + e, s

    _, starts = jax.lax.scan(step, s0, (e_PBHKV, a_PBHKK))
    s_start = jnp.moveaxis(starts, 0, 2)
  if save_states:
    s_end, states, *vnew = _state_pass(q, k, w, u, gc, s_start, c=c, mode="states",
                                       tuning=tuning, interpret=interpret, with_v=with_v)
    return (None, s_end[:, :, -1], states, *vnew)
  o, s_end = _state_pass(q, k, w, u, gc, s_start, c=c, mode="output", tuning=tuning,
                         interpret=interpret)
  return o, s_end[:, :, -1]


def _prepare(q, k, v, log_gamma, beta, initial_state, chunk_size):
  _check(q, k, v, chunk_size)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  c = chunk_size
  nc = max(1, -(-t // c))
  tp = nc * c
  q, k, v = (_pad_time(x, tp) for x in (q, k, v))
  gc = _chunk_cumsum(_pad_time(log_gamma, tp), nc, c)
  beta = _pad_time(beta.astype(jnp.float32), tp)
  s0 = (jnp.zeros((b, h, kd, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  return q, k, v, gc, beta, s0


def _needs_t0(tuning) -> bool:
  """Whether the gradient kernels read T0 written by the prepass."""
  return tuning.grads == "split" or (tuning.grads == "wy" and tuning.wy_t0 == "prepass")


@functools.partial(jax.jit, static_argnames=("chunk_size", "pieces", "tuning", "interpret"))
def gated_delta_fwd(q, k, v, log_gamma, beta, initial_state=None, *, chunk_size=64, pieces=None,
                    tuning=DEFAULT_TUNING, interpret=False):
  """(o_BTHV f32, final_state_BHKV f32). `pieces`: sequence split (None = automatic)."""
  o, s_final, _ = _forward(q, k, v, log_gamma, beta, initial_state, chunk_size=chunk_size,
                           pieces=pieces, tuning=tuning, interpret=interpret, residuals=False)
  return o, s_final


@functools.partial(jax.jit, static_argnames=("chunk_size", "pieces", "tuning", "interpret"))
def gated_delta_fwd_residuals(q, k, v, log_gamma, beta, initial_state=None, *, chunk_size=64,
                              pieces=None, tuning=DEFAULT_TUNING, interpret=False):
  """`gated_delta_fwd` plus the prepass outputs for `gated_delta_bwd(..., prepass=...)`:
  (o_BTHV, final_state_BHKV, (w_BTpHK, u_BTpHV, t0_BTpHC or None)), T padded to Tp.

  w, u in the input dtype, T0 f32 (None unless `Tuning.grads` reads it). Per layer that is
  B*Tp*H*((K + V)*itemsize + 4*C) bytes: 201 MB at bf16 (B, T, H, K, V, C) = (16, 2K, 8, 128,
  128, 64), against the 0.52 ms (H100) of rerunning the prepass in the backward.
  """
  return _forward(q, k, v, log_gamma, beta, initial_state, chunk_size=chunk_size, pieces=pieces,
                  tuning=tuning, interpret=interpret, residuals=True)


def _forward(q, k, v, log_gamma, beta, initial_state, *, chunk_size, pieces, tuning, interpret,
             residuals):
  _check_tuning(tuning)
  t = q.shape[1]
  q, k, v, gc, beta, s0 = _prepare(q, k, v, log_gamma, beta, initial_state, chunk_size)
  with_t0 = residuals and _needs_t0(tuning)
  w, u, *t0 = _prepass(k, v, beta, gc, c=chunk_size, tuning=tuning, interpret=interpret,
                       with_t0=with_t0)
  o, s_final = _forward_states(q, k, w, u, gc, s0, c=chunk_size, pieces=pieces,
                               save_states=False, tuning=tuning, interpret=interpret)
  res = (w, u, t0[0] if with_t0 else None) if residuals else None
  return o[:, :t], s_final, res


def _check_prepass(prepass, k, v, c, tuning):
  """The saved (w, u, t0) match the padded inputs (error naming the mismatch otherwise)."""
  b, tp, h, kd = k.shape
  vd = v.shape[-1]
  if not (isinstance(prepass, tuple) and len(prepass) == 3):
    raise ValueError("prepass must be the (w, u, t0) tuple gated_delta_fwd_residuals returns")
  w, u, t0 = prepass
  want = {"w": (w, (b, tp, h, kd)), "u": (u, (b, tp, h, vd))}
  if _needs_t0(tuning):
    if t0 is None:
      raise ValueError(f"Tuning(grads={tuning.grads!r}, wy_t0={tuning.wy_t0!r}) reads T0: call "
                       "gated_delta_fwd_residuals with the same tuning")
    want["t0"] = (t0, (b, tp, h, c))
  for name, (x, shape) in want.items():
    if tuple(x.shape) != shape:
      raise ValueError(f"prepass {name} has shape {tuple(x.shape)}, expected {shape} (T padded "
                       "to the chunk); pass what gated_delta_fwd_residuals returned for these "
                       "inputs and chunk_size")


@functools.partial(jax.jit, static_argnames=("chunk_size", "pieces", "tuning", "interpret"))
def gated_delta_bwd(q, k, v, log_gamma, beta, initial_state, do, dfinal_state, *, chunk_size=64,
                    pieces=None, tuning=DEFAULT_TUNING, interpret=False, prepass=None):
  """VJP from the primal inputs: (dq, dk, dv, dlog_gamma, dbeta, dinitial_state).

  dq/dk/dv in the input dtype, the rest f32. `dfinal_state=None` means a zero cotangent.
  `prepass`: the (w, u, t0) of `gated_delta_fwd_residuals` (same inputs, chunk_size and tuning)
  to skip rerunning the prepass; None = recompute it.
  """
  _check_tuning(tuning)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  c = chunk_size
  if do.shape != (b, t, h, vd):
    raise ValueError(f"do must have o's shape {(b, t, h, vd)}; got {do.shape}")
  if dfinal_state is not None and dfinal_state.shape != (b, h, kd, vd):
    raise ValueError(f"dfinal_state must be [B, H, K, V] = {(b, h, kd, vd)}; got "
                     f"{dfinal_state.shape}")
  in_dtypes = (q.dtype, k.dtype, v.dtype)
  gates_dtype = (log_gamma.dtype, beta.dtype)
  q, k, v, gc, beta_p, s0 = _prepare(q, k, v, log_gamma, beta, initial_state, c)
  tp = q.shape[1]
  nc = tp // c
  do = _pad_time(do.astype(jnp.float32), tp)
  dsT = (jnp.zeros((b, h, kd, vd), jnp.float32) if dfinal_state is None
         else dfinal_state.astype(jnp.float32))
  wy = tuning.grads == "wy"
  if prepass is None:
    w, u, *t0 = _prepass(k, v, beta_p, gc, c=c, tuning=tuning, interpret=interpret,
                         with_t0=_needs_t0(tuning))
  else:
    _check_prepass(prepass, k, v, c, tuning)
    w, u, t0 = prepass
    t0 = [t0] if _needs_t0(tuning) else []
  _, _, states, *vnew = _forward_states(q, k, w, u, gc, s0, c=c, pieces=pieces,
                                        save_states=True, tuning=tuning, interpret=interpret,
                                        with_v=wy)
  dstates, ds0, *dvnew = _backward_states(q, k, w, do, gc, dsT, c=c, pieces=pieces,
                                          tuning=tuning, interpret=interpret, with_dv=wy)
  if wy:
    dq, dkd, dw, pdgc = _dqkw(q, k, gc, do, vnew[0], dvnew[0], states, dstates, c=c,
                              dq_dtype=in_dtypes[0], tuning=tuning, interpret=interpret)
    dk, dv, dbeta, dgc = _wy_bwd(k, v, beta_p, gc, dvnew[0], dw, dkd, t0[0] if t0 else None,
                                 c=c, out_dtypes=in_dtypes, tuning=tuning, interpret=interpret)
    dgc = dgc + jnp.sum(pdgc, axis=0)  # the K-block partials of gdn_dqkw (tiny)
  elif tuning.grads == "split":
    dq, dk, dv, dbeta, dgc = _split_grads(q, k, v, beta_p, gc, do, states, dstates, t0[0], c=c,
                                          out_dtypes=in_dtypes, tuning=tuning,
                                          interpret=interpret)
  else:
    dq, dk, dv, dbeta, dgc = _fused_grads(q, k, v, beta_p, gc, do, states, dstates, c=c,
                                          out_dtypes=in_dtypes, tuning=tuning,
                                          interpret=interpret)
  dg = dgc.reshape(b, nc, c, h)
  dlog_gamma = jnp.flip(jnp.cumsum(jnp.flip(dg, 2), 2), 2).reshape(b, tp, h)
  return (dq[:, :t], dk[:, :t], dv[:, :t], dlog_gamma[:, :t].astype(gates_dtype[0]),
          dbeta[:, :t].astype(gates_dtype[1]), ds0)
