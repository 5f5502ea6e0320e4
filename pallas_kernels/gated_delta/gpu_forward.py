"""Forward kernels of the Pallas-Triton gated delta rule and their drivers (`gpu_triton.py`).

  `gdn_prepass` grid (B, H, NC), parallel: T0 by the blocked doubling (f32;
                `Tuning.inverse_block` = 16, dot algorithm `Tuning.inverse_precision`), w, u per
                chunk (and T0 itself for the backward).
  `gdn_state`   grid (B, H, P, V/BV): one program per (b, h, sequence piece, V block) walks the
                chunks of its piece in order with the state block [K, BV] in registers; writes
                o, the piece's end state and (for the backward, "states" mode) each chunk's
                entry state [B, H, NC, K, V] in `Tuning.states_dtype` and v' = u - w S per chunk.
  sequence split (B*H*V/BV too small to fill the GPU, e.g. B=1, 64K): each piece's chunk map is
  affine in its start state, `S_end = A S_start + E`. `gdn_state_affine` runs every piece from
  the augmented start state [0 | I] with values [u | 0] (width V + K) and returns [E | A]; a
  P-step `lax.scan` in XLA composes the pieces exactly; then `gdn_state` reruns each piece from
  its true start state. The backward can reuse both: each piece's start state (no affine pass in
  its forward rerun) and A (its reverse pass's piece transition is A^T; `Tuning.bwd_split`).

Dimension glossary
  B batch  T tokens (Tp padded)  H heads  K key dim (kd)  V value dim (vd)  C chunk (c)
  NC chunks (nc)  P sequence pieces  CP chunks per piece  BV value block
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta import chunk_math as cm
from pallas_kernels.gated_delta import gpu_common as gpc


def _prepass_kernel(k_ref, v_ref, beta_ref, gc_ref, w_ref, u_ref, *t0_ref, cfg):
  c = k_ref.shape[0]
  beta_c1, gc_c1, gc_1c = gpc.gates(beta_ref, gc_ref, 0, c)
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


def prepass(k, v, beta, gc, *, c, tuning, interpret, with_t0=False):
  b, tp, h, kd = k.shape
  vd = v.shape[-1]
  nc = tp // c
  tok = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, n: (i, n, j, 0))
  gate = pl.BlockSpec((None, c, None), lambda i, j, n: (i, n, j))
  wdt = k.dtype
  return pl.pallas_call(
      functools.partial(_prepass_kernel, cfg=gpc.dots(k.dtype, interpret, tuning)),
      grid=(b, h, nc),
      in_specs=[tok(kd), tok(vd), gate, gate],
      out_specs=[tok(kd), tok(vd)] + ([tok(c)] if with_t0 else []),
      out_shape=[jax.ShapeDtypeStruct((b, tp, h, kd), wdt),
                 jax.ShapeDtypeStruct((b, tp, h, vd), wdt)]
                + ([jax.ShapeDtypeStruct((b, tp, h, c), jnp.float32)] if with_t0 else []),
      compiler_params=gpc.params(tuning.prepass_warps, 1), interpret=interpret,
      name="gdn_prepass",
  )(k, v, beta, gc)


def state_pass(q, k, w, u, gc, s_start, *, c, mode, tuning, interpret, with_v=False):
  """s_start [B, H, P, K, V]. Returns per mode (see `_state_kernel`); `with_v` ("states"
  mode): also v' per chunk, [B, Tp, H, V] in the input dtype (all its uses are dots in it)."""
  b, tp, h, kd = q.shape
  vd = u.shape[-1]
  npieces = s_start.shape[2]
  nc = tp // c
  cp = nc // npieces
  bv = gpc.block_v(kd, vd, tuning)
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
                                            gpc.storage(tuning.states_dtype, q.dtype)))
      if with_v:
        out_specs.append(vblock)
        out_shape.append(jax.ShapeDtypeStruct((b, tp, h, vd), q.dtype))
  gate = pl.BlockSpec((None, tp, None), lambda i, j, p, n: (i, 0, j))
  return pl.pallas_call(
      functools.partial(_state_kernel, c=c, cp=cp, nvb=nvb, mode=mode,
                        cfg=gpc.dots(q.dtype, interpret, tuning)),
      grid=(b, h, npieces, nblocks),
      in_specs=[full(kd), full(kd), full(kd), vblock, gate, s0_spec],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=gpc.params(tuning.state_warps, gpc.stages(q.dtype, tuning)),
      interpret=interpret,
      name="gdn_state_affine" if mode == "affine" else "gdn_state",
  )(q, k, w, u, gc, s_start)


def forward_states(q, k, w, u, gc, s0, *, c, pieces, save_states, tuning, interpret,
                   with_v=False, split=None, return_split=False):
  """Runs the state pass (split into pieces when useful).

  Returns (o, final state), or (None, final state, per-chunk entry states[, v' per chunk with
  `with_v`]) with `save_states`. `split`: each piece's start state and transition
  (s_start [B, H, P, K, V], A [B, H, P, K, K]) saved by an earlier pass over the same inputs:
  no affine pass and no scan here. `return_split`: also return that pair (None unsplit) last.
  """
  b, tp, h, kd = q.shape
  vd = u.shape[-1]
  npieces = gpc.num_pieces(b, h, tp // c, kd, vd, pieces, tuning)
  if split is not None:
    s_start, a = split
    if s_start.shape != (b, h, npieces, kd, vd) or a.shape != (b, h, npieces, kd, kd):
      raise ValueError(f"saved split has shapes {s_start.shape}, {a.shape}; expected "
                       f"{(b, h, npieces, kd, vd)}, {(b, h, npieces, kd, kd)} ({npieces} pieces):"
                       " pass what gated_delta_fwd_residuals returned with the same pieces")
  elif npieces == 1:
    s_start = s0[:, :, None]
  else:
    aug = state_pass(q, k, w, u, gc, jnp.zeros((b, h, npieces, kd, vd), jnp.float32), c=c,
                     mode="affine", tuning=tuning, interpret=interpret)[0]
    s_start = gpc.piece_starts(aug, s0, unroll=tuning.piece_scan_unroll)
    split = (s_start, aug[..., vd:])
  tail = (split,) if return_split else ()
  if save_states:
    s_end, states, *vnew = state_pass(q, k, w, u, gc, s_start, c=c, mode="states",
                                      tuning=tuning, interpret=interpret, with_v=with_v)
    return (None, s_end[:, :, -1], states, *vnew, *tail)
  o, s_end = state_pass(q, k, w, u, gc, s_start, c=c, mode="output", tuning=tuning,
                        interpret=interpret)
  return (o, s_end[:, :, -1], *tail)
