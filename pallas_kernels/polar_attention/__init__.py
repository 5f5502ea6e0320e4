"""Polar attention core op: materialized oracle (`reference`), streaming XLA backend
(`xla_streaming`), Pallas GPU/TPU kernels, and the one custom-VJP op with dispatch (`api`).

The public API: what this package exports (the op, its shape check, the helpers the model's
prologue shares, the `BACKENDS` table); the modules `api`, `reference` (oracles), `bands`
(band arithmetic), the decode ops over a cache at per-row positions (`cached`: the
`*_at` functions, exported here) and the backend modules `BACKENDS` names (xla_streaming, gpu_mosaic,
gpu_triton, tpu: each one's fwd / bwd / unsupported_reason / config). gpu_tiles, gpu_forward,
gpu_backward (Triton) and gpu_mosaic_backward, gpu_mosaic_common (Mosaic-GPU) are private
(tests/test_kernel_library.py). The ops are mesh-free: a caller that shards wraps them in
shard_map.
"""

from pallas_kernels.dispatch import KernelUnavailable
from pallas_kernels.polar_attention.api import (BACKENDS, IMPLS, attention_stats, polar_core,
                                                polar_stats, select_backend, softmax_attention)
from pallas_kernels.polar_attention.cached import (INVALID_POS, attention_stats_at,
                                                   polar_core_at, softmax_attention_at)
from pallas_kernels.polar_attention.reference import (check_attention_shapes,
                                                      polar_temperature_null, stats_dtype)

__all__ = ["BACKENDS", "IMPLS", "INVALID_POS", "KernelUnavailable", "attention_stats", "attention_stats_at",
           "check_attention_shapes", "polar_core", "polar_core_at", "polar_stats",
           "polar_temperature_null", "select_backend", "softmax_attention",
           "softmax_attention_at", "stats_dtype"]
