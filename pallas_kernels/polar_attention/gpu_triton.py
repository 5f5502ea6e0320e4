"""Pallas-Triton (GPU) kernels of the Polar core op `attention_stats` (KERNELS.md §2a): the
public entry the api imports (`is_supported`, `attention_stats_fwd`, `attention_stats_bwd`,
`BlockConfig`, `DEFAULT_CONFIG`).

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
On Hopper the api pairs this backward with the faster Mosaic-GPU forward (`gpu_mosaic`).
The launch defaults (blocks, warps, stages) come from a sweep on an H200
(bench/results/polar_attention_h200_run2_sweep.json).

Dimension glossary
  B batch   T rows   H query heads   G KV heads   D head dim
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.polar_attention.gpu_backward import attention_stats_bwd
from pallas_kernels.polar_attention.gpu_forward import attention_stats_fwd
from pallas_kernels.polar_attention.gpu_tiles import DEFAULT_CONFIG, BlockConfig

__all__ = ["BlockConfig", "DEFAULT_CONFIG", "attention_stats_bwd", "attention_stats_fwd",
           "is_supported"]


def is_supported(q, k, v, *, window=None, q_offset=0) -> bool:
  """True when these kernels can run this call (else the api falls back to XLA)."""
  D = q.shape[-1]
  return (q.ndim == 4 and k.shape == v.shape and k.shape[-1] == D
          and D >= 16 and D & (D - 1) == 0 and D <= 256
          and q.shape[2] % k.shape[2] == 0
          and (isinstance(q_offset, int) or jnp.ndim(q_offset) == 0)
          and (window is None or isinstance(window, int))
          and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                     jnp.dtype(jnp.float32)))
