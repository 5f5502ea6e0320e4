"""Pallas GPU (Triton lowering) kernels of the chunked gated delta rule: the public entry.

Math: `chunk_math.py` (KERNELS.md §2b). All kernels run on the native `[B, T, H, D]` layout (no
transposes; T padded to a multiple of the chunk with identity tokens k = v = q = beta = g = 0):

  forward (`gpu_forward.py`): `gdn_prepass` (T0 by the blocked doubling inverse, w, u per chunk),
    then `gdn_state` (sequential chunk walk per (b, h, sequence piece, V block), the state block
    in registers; pieces composed exactly through their affine maps when B*H*V/BV is too small
    to fill the GPU).
  backward (`gpu_backward.py`, the WY decomposition of `chunk_math`): the forward state pass
    again in "states" mode (each chunk's entry state and v'), `gdn_state_bwd` (reverse walk:
    dS1 per chunk, d(initial state), dv'), `gdn_dqkw` per (chunk, K block) and `gdn_wy_bwd` per
    chunk; then XLA: reverse chunk-local cumsum dgc -> dlog_gamma.
  residuals: the six primal inputs, plus, through api's custom_vjp, the forward's prepass w, u
    (input dtype) and T0 (f32 [B, Tp, H, C]) from `gated_delta_fwd_residuals`:
    B*Tp*H*((K + V)*itemsize + 4*C) bytes per layer, 201 MB at bf16 (16, 2K, H=8, K=V=128,
    C=64); with `Tuning.bwd_split="reuse"` and a split sequence also each piece's start state
    and transition (f32, B*H*P*K*(V + K)*4 bytes); everything else is recomputed.
  sequence split: one piece count per call (`gpu_common.num_pieces`: the fewest power-of-2
    pieces giving B*H*(V/BV)*P >= `Tuning.min_programs` = 256, >= 4 chunks each) for the
    forward's state pass, the backward's forward rerun and its reverse pass.

Measured (H100, bf16, H=8, K=V=128, C=64, the defaults: blocked bf16x3 inverse, K block 32,
bf16 storage; bench/results/gated_delta_h100.json): forward 0.74 ms at (B, T) = (16, 2K), 1.71
ms at (1, 64K); forward+backward 2.97 ms at (16, 2K), 3.62 at (4, 8K), 3.84 at (1, 32K). The
gradient kernels these replaced lost at (16, 2K) fwd+bwd: one fused per-chunk kernel 11.7 ms
(gated_delta_bwd_h100_run2.json), a (chunk, V block) split 6.7 ms (gated_delta_h100_run1.json).

Public: `gated_delta_fwd`, `gated_delta_fwd_residuals`, `gated_delta_bwd`,
`unsupported_reason` (contract of `xla_chunked.py`), `Tuning` / `DEFAULT_TUNING` /
`INVERSE_PRECISIONS` (launch knobs, `gpu_common.py`), `num_pieces` (the sequence split a call
uses). Pass `interpret=True` to run on CPU.
f32 q/k/v are refused at K*V > 64*64 (shared memory).

Dimension glossary
  B batch  T tokens (Tp padded)  H heads  K key dim  V value dim  C chunk  NC chunks
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta import gpu_backward, gpu_forward
from pallas_kernels.gated_delta import gpu_common as gpc
from pallas_kernels.gated_delta.gpu_common import (DEFAULT_TUNING, INVERSE_PRECISIONS, Tuning,
                                                   num_pieces)

__all__ = ["DEFAULT_TUNING", "INVERSE_PRECISIONS", "Tuning", "gated_delta_bwd", "gated_delta_fwd",
           "gated_delta_fwd_residuals", "num_pieces", "unsupported_reason"]


def unsupported_reason(q, k, v, *unused, chunk_size: int) -> str | None:
  """None when these kernels take the inputs, else what is wrong (and the fix)."""
  del unused  # log_gamma, beta, initial_state: any shapes check_gated_delta_shapes accepts
  K, V = q.shape[-1], v.shape[-1]
  if not (gpc.pow2(chunk_size) and 16 <= chunk_size <= 128):
    return f"chunk_size={chunk_size}: the Triton kernels need a power of 2 in [16, 128]"
  if not (gpc.pow2(K) and gpc.pow2(V) and 16 <= K <= 256 and 16 <= V <= 256):
    return (f"K={K}, V={V}: the Triton kernels need powers of 2 in [16, 256] (Triton dots need "
            "every dimension >= 16); use impl='xla'")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16) or not (k.dtype == v.dtype == q.dtype):
    return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: need one of f32/bf16/f16 for all three"
  if q.dtype == jnp.float32 and K * V > 64 * 64:
    return (f"f32 q/k/v with K={K}, V={V}: a kernel asked for 273 KiB of shared memory on an "
            "H200 (limit 227 KiB); pass bf16 q/k/v (the state stays f32) or use impl='xla'")
  return None


def _check(q, k, v, chunk_size):
  reason = unsupported_reason(q, k, v, chunk_size=chunk_size)
  if reason is not None:
    raise ValueError(f"gated_delta gpu_triton: {reason}")


def _prepare(q, k, v, log_gamma, beta, initial_state, chunk_size):
  _check(q, k, v, chunk_size)
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  c = chunk_size
  nc = max(1, -(-t // c))
  tp = nc * c
  q, k, v = (gpc.pad_time(x, tp) for x in (q, k, v))
  gc = gpc.chunk_cumsum(gpc.pad_time(log_gamma, tp), nc, c)
  beta = gpc.pad_time(beta.astype(jnp.float32), tp)
  s0 = (jnp.zeros((b, h, kd, vd), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  return q, k, v, gc, beta, s0


def _needs_t0(tuning) -> bool:
  """Whether the gradient kernels read T0 written by the prepass."""
  return tuning.wy_t0 == "prepass"


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
  (o_BTHV, final_state_BHKV, (w_BTpHK, u_BTpHV, t0_BTpHC or None, split or None)), T padded
  to Tp.

  w, u in the input dtype, T0 f32 (None with `Tuning.wy_t0="recompute"`). Per layer that is
  B*Tp*H*((K + V)*itemsize + 4*C) bytes: 201 MB at bf16 (B, T, H, K, V, C) = (16, 2K, 8, 128,
  128, 64), against the 0.52 ms (H100) of rerunning the prepass in the backward. `split`, only
  with `Tuning.bwd_split="reuse"` and the sequence split into P > 1 pieces: each piece's start
  state [B, H, P, K, V] and transition A [B, H, P, K, K], f32 (B*H*P*K*(V + K)*4 bytes: 4 MB at
  (4, 8K) with P = 4).
  """
  return _forward(q, k, v, log_gamma, beta, initial_state, chunk_size=chunk_size, pieces=pieces,
                  tuning=tuning, interpret=interpret, residuals=True)


def _forward(q, k, v, log_gamma, beta, initial_state, *, chunk_size, pieces, tuning, interpret,
             residuals):
  gpc.check_tuning(tuning)
  t = q.shape[1]
  q, k, v, gc, beta, s0 = _prepare(q, k, v, log_gamma, beta, initial_state, chunk_size)
  with_t0 = residuals and _needs_t0(tuning)
  w, u, *t0 = gpu_forward.prepass(k, v, beta, gc, c=chunk_size, tuning=tuning,
                                  interpret=interpret, with_t0=with_t0)
  save_split = residuals and tuning.bwd_split == "reuse"
  o, s_final, *split = gpu_forward.forward_states(
      q, k, w, u, gc, s0, c=chunk_size, pieces=pieces, save_states=False, tuning=tuning,
      interpret=interpret, return_split=save_split)
  res = ((w, u, t0[0] if with_t0 else None, split[0] if split else None) if residuals
         else None)
  return o[:, :t], s_final, res


def _check_prepass(prepass, k, v, c, tuning):
  """The saved (w, u, t0, split) match the padded inputs (error naming the mismatch otherwise;
  the split's shapes are checked where it is used, `gpu_forward.forward_states`)."""
  b, tp, h, kd = k.shape
  vd = v.shape[-1]
  if not (isinstance(prepass, tuple) and len(prepass) == 4):
    raise ValueError("prepass must be the (w, u, t0, split) tuple gated_delta_fwd_residuals "
                     "returns")
  w, u, t0, _ = prepass
  want = {"w": (w, (b, tp, h, kd)), "u": (u, (b, tp, h, vd))}
  if _needs_t0(tuning):
    if t0 is None:
      raise ValueError(f"Tuning(wy_t0={tuning.wy_t0!r}) reads T0: call "
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
  `prepass`: the (w, u, t0, split) of `gated_delta_fwd_residuals` (same inputs, chunk_size,
  pieces and tuning) to skip rerunning the prepass (and, with a saved split, the forward's
  affine pass); None = recompute it.
  """
  gpc.check_tuning(tuning)
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
  do = gpc.pad_time(do.astype(jnp.float32), tp)
  dsT = (jnp.zeros((b, h, kd, vd), jnp.float32) if dfinal_state is None
         else dfinal_state.astype(jnp.float32))
  split = None  # each piece's (start state, transition A), saved by the forward
  if prepass is None:
    w, u, *t0 = gpu_forward.prepass(k, v, beta_p, gc, c=c, tuning=tuning, interpret=interpret,
                                    with_t0=_needs_t0(tuning))
  else:
    _check_prepass(prepass, k, v, c, tuning)
    w, u, t0, split = prepass
    t0 = [t0] if _needs_t0(tuning) else []
  reuse = tuning.bwd_split == "reuse"
  _, _, states, vnew, *got = gpu_forward.forward_states(
      q, k, w, u, gc, s0, c=c, pieces=pieces, save_states=True, tuning=tuning,
      interpret=interpret, with_v=True, split=split, return_split=reuse)
  transition = got[0][1] if reuse and got[0] is not None else None
  dstates, ds0, dvnew = gpu_backward.backward_states(q, k, w, do, gc, dsT, c=c, pieces=pieces,
                                                     tuning=tuning, interpret=interpret,
                                                     with_dv=True, transition=transition)
  dq, dkd, dw, pdgc = gpu_backward.dqkw(q, k, gc, do, vnew, dvnew, states, dstates, c=c,
                                        dq_dtype=in_dtypes[0], tuning=tuning, interpret=interpret)
  dk, dv, dbeta, dgc = gpu_backward.wy_bwd(k, v, beta_p, gc, dvnew, dw, dkd,
                                           t0[0] if t0 else None, c=c, out_dtypes=in_dtypes,
                                           tuning=tuning, interpret=interpret)
  dgc = dgc + jnp.sum(pdgc, axis=0)  # the K-block partials of gdn_dqkw (tiny)
  dg = dgc.reshape(b, nc, c, h)
  dlog_gamma = jnp.flip(jnp.cumsum(jnp.flip(dg, 2), 2), 2).reshape(b, tp, h)
  return (dq[:, :t], dk[:, :t], dv[:, :t], dlog_gamma[:, :t].astype(gates_dtype[0]),
          dbeta[:, :t].astype(gates_dtype[1]), ds0)
