"""Polar attention core op: materialized oracle (`reference`), streaming XLA backend
(`xla_streaming`), Pallas GPU/TPU kernels, and the one custom-VJP op with dispatch (`api`).

The public API is what this package exports (the op, its shape check, the helpers the model's
prologue shares); callers outside the kernel library import these names, not the backend
modules. The ops are mesh-free: a caller that shards wraps them (atma_jax/model/ops.py).
"""

from pallas_kernels.polar_attention.api import (BACKENDS, IMPLS, attention_stats, polar_core,
                                                polar_stats, select_backend, softmax_attention)
from pallas_kernels.polar_attention.reference import (check_attention_shapes,
                                                      polar_temperature_null, stats_dtype)

__all__ = ["BACKENDS", "IMPLS", "attention_stats", "check_attention_shapes", "polar_core",
           "polar_stats", "polar_temperature_null", "select_backend", "softmax_attention",
           "stats_dtype"]
