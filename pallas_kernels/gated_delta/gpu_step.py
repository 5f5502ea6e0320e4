"""Pallas GPU (Triton lowering) kernel of the one-token gated-delta step (decode): the fused form.

Same math as the oracle's `reference.gated_delta_step`, per (b, h) with the state `S [K, V]`:

  S <- gamma S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q

One program per (b, h, V block): it loads its state tile `S[:, block] [K, BV]` (fp32) once,
decays it, forms `S^T k` for its BV columns (the contraction runs over K, all of it in the
tile), writes `k u^T` into the tile, reads `o = S'^T q` from the updated tile, and stores the
tile once, in place (`input_output_aliases`: the state output IS the state input buffer, so a
donated decode cache is updated without a copy). State traffic: one read and one write of
B*H*K*V*4 bytes (what the XLA step costs depends on XLA's fusion; neither form is timed yet, so
`model.mem_step_impl` defaults to "xla"). Everything is fp32 elementwise work and reductions
over K (no tensor-core dots: a [K] x [K, BV] product per program).

Public (the backend contract of `api.STEP_BACKENDS`): `gated_delta_step`,
`unsupported_reason`. Pass `interpret=True` to run on CPU.

Dimension glossary
  B batch  H heads  K key dim  V value dim  BV value block
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["block_v_for", "gated_delta_step", "unsupported_reason"]

_IN_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MIN_PROGRAMS = 1024  # the automatic V block shrinks (down to 16) until the grid has this many
# (a guess at filling a GPU, not tuned)


def _pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def unsupported_reason(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV, *,
                       block_v=None) -> str | None:
  """None when this kernel takes the call, else what is wrong (and the fix)."""
  K, V = q_BHK.shape[-1], v_BHV.shape[-1]
  if not (_pow2(K) and _pow2(V) and 16 <= K <= 256 and 16 <= V <= 256):
    return f"K={K}, V={V}: the step kernel needs powers of 2 in [16, 256]; use impl='xla'"
  if state_BHKV.dtype != jnp.float32:
    return (f"state dtype {state_BHKV.dtype}: the step kernel updates an fp32 state in place "
            "(the decode cache's dtype); use impl='xla'")
  dts = (q_BHK.dtype, k_BHK.dtype, v_BHV.dtype)
  if any(d not in _IN_DTYPES for d in dts):
    return f"q/k/v dtypes {[str(d) for d in dts]}: need f32/bf16/f16 (fp64 runs on impl='xla')"
  if any(g.dtype not in _IN_DTYPES for g in (log_gamma_BH, beta_BH)):
    return (f"gate dtypes {log_gamma_BH.dtype}, {beta_BH.dtype}: need f32/bf16/f16 (fp64 runs "
            "on impl='xla')")
  if block_v is not None and not (_pow2(block_v) and 16 <= block_v <= V):
    return f"block_v={block_v}: a power of 2 in [16, V={V}]"
  return None


def block_v_for(B: int, H: int, V: int) -> int:
  """The automatic V block: 64 (or V when smaller), halved down to 16 while the grid
  B*H*V/BV has fewer than MIN_PROGRAMS programs (small batches: more, smaller programs)."""
  bv = min(64, V)
  while bv > 16 and B * H * (V // bv) < MIN_PROGRAMS:
    bv //= 2
  return bv


def _step_kernel(q_ref, k_ref, v_ref, lg_ref, beta_ref, s_ref, o_ref, s_out_ref):
  """One (b, h, V block): the state tile [K, BV] read once, written once (aliased)."""
  f32 = jnp.float32
  q_K1 = q_ref[...].astype(f32)[:, None]
  k_K1 = k_ref[...].astype(f32)[:, None]
  gamma = jnp.exp(lg_ref[0].astype(f32))
  beta = beta_ref[0].astype(f32)
  s_KV = gamma * s_ref[...]                              # decay first
  pred_V = jnp.sum(s_KV * k_K1, axis=0)                  # S^T k on the decayed state
  u_1V = (beta * (v_ref[...].astype(f32) - pred_V))[None, :]
  s_KV = s_KV + k_K1 * u_1V                              # undecayed write
  o_ref[...] = jnp.sum(s_KV * q_K1, axis=0)              # read after the write
  s_out_ref[...] = s_KV


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "interpret"))
def gated_delta_step(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV, *, block_v=None,
                     num_warps=4, interpret=False):
  """One decode token: `(o_BHV f32, new_state_BHKV f32)`, the state updated in place.

  q, k [B, H, K], v [B, H, V] (f32/bf16/f16), log_gamma, beta [B, H], state [B, H, K, V] fp32.
  `block_v`: V columns per program (None: `block_v_for`). Under an outer jit the state output
  reuses the state's buffer when the caller no longer needs it (a donated cache).
  """
  why = unsupported_reason(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV,
                           block_v=block_v)
  if why is not None:
    raise ValueError(f"gated_delta gpu_step: {why}")
  B, H, K = q_BHK.shape
  V = v_BHV.shape[-1]
  bv = block_v or block_v_for(B, H, V)
  vec = lambda n: pl.BlockSpec((None, None, n), lambda b, h, j: (b, h, 0))
  vblock = pl.BlockSpec((None, None, bv), lambda b, h, j: (b, h, j))
  gate = pl.BlockSpec((None, None, 1), lambda b, h, j: (b, h, 0))
  tile = pl.BlockSpec((None, None, K, bv), lambda b, h, j: (b, h, 0, j))
  gate_of = lambda g: g.reshape(B, H, 1)
  return pl.pallas_call(
      _step_kernel,
      grid=(B, H, V // bv),
      in_specs=[vec(K), vec(K), vblock, gate, gate, tile],
      out_specs=[vblock, tile],
      out_shape=[jax.ShapeDtypeStruct((B, H, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)],
      input_output_aliases={5: 1},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="gdn_step",
  )(q_BHK, k_BHK, v_BHV, gate_of(log_gamma_BH), gate_of(beta_BH), state_BHKV)
