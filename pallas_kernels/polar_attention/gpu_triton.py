"""Pallas-Triton (GPU) kernels of the Polar core op `attention_stats` (KERNELS.md §2a): the
public entry the api imports (`unsupported_reason`, `attention_stats_fwd`, `attention_stats_bwd`,
`BlockConfig` (tiles, launch, `interpret`), `DEFAULT_CONFIG`, `uses_split_k_decode`).

  gpu_tiles     launch config, padding, traced/static offsets, masks, causal/window bands
  gpu_forward   query-tile forward (o, lse, p2) and the split-K decode forward
  gpu_backward  dQ (+ dscale) and dK/dV kernels

`q_offset` may be a Python int (folded into the kernels) or a traced int32 scalar (passed as a
one-element input). On a machine without a GPU the kernels run in interpret mode (tests).

Measured on an H100 (bf16, 8/2 heads, D=128, causal; bench/results/polar_mosaic_h100.json),
Pallas-Triton vs cuDNN (plain softmax, no p2 / per-row scale):
  (B, T)    fwd            fwd+bwd
  (16, 2K)  0.69 vs 0.47   2.33 vs 1.72
  (4, 8K)   1.66 vs 1.23   6.37 vs 4.25
  (1, 32K)  5.30 vs 3.76   22.4 vs 14.8
  (1, 64K)  19.9 vs 15.0   -
On Hopper the api takes `gpu_mosaic` (Mosaic-GPU forward and backward) for the calls it supports.
The launch defaults (blocks, warps, stages) come from a sweep on an H200
(bench/results/polar_attention_h200_run2_sweep.json).

Dimension glossary
  B batch   T rows   H query heads   G KV heads   D head dim
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.polar_attention import reference
from pallas_kernels.polar_attention.gpu_backward import attention_stats_bwd
from pallas_kernels.polar_attention.gpu_forward import attention_stats_fwd, uses_split_k_decode
from pallas_kernels.polar_attention.gpu_tiles import DEFAULT_CONFIG, BlockConfig

__all__ = ["BlockConfig", "DEFAULT_CONFIG", "attention_stats_bwd", "attention_stats_fwd",
           "unsupported_reason", "uses_split_k_decode"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def unsupported_reason(q, k, v, *, window=None, q_offset=0) -> str | None:
  """None when these kernels can run this call, else why not (dispatch then falls back to XLA)."""
  why = reference.layout_reason(q, k, v, window=window, q_offset=q_offset)
  if why is not None:
    return why
  D = q.shape[-1]
  if not (16 <= D <= 256 and D & (D - 1) == 0):
    return f"head dim {D}: the Triton kernels need a power of 2 in [16, 256]"
  if jnp.dtype(q.dtype) not in _DTYPES:
    return f"dtype {q.dtype}: the Triton kernels take bf16, f16 or f32"
  return None
