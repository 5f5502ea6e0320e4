"""Gated delta rule (ATMA_SPEC §4.4-4.5): sequential oracle, chunked XLA path, Pallas kernels.

The public API: what this package exports (the op, its shape check, the `BACKENDS` table); the
modules `api`, `reference` (oracle), `chunk_math` (the chunk math every backend shares) and the
backend modules `BACKENDS` names (xla_chunked, gpu_triton, tpu). gpu_common, gpu_forward and
gpu_backward are private (tests/test_kernel_library.py). The op is mesh-free: a caller that
shards wraps it in shard_map.
"""

from pallas_kernels.gated_delta.api import BACKENDS, IMPLS, gated_delta_rule, gated_delta_step
from pallas_kernels.gated_delta.reference import check_gated_delta_shapes

__all__ = ["BACKENDS", "IMPLS", "check_gated_delta_shapes", "gated_delta_rule", "gated_delta_step"]
