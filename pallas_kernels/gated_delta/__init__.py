"""Gated delta rule (ATMA_SPEC §4.4-4.5): sequential oracle, chunked XLA path, Pallas kernels.

The public API: what this package exports (the ops, their shape checks, the `BACKENDS` and
`STEP_BACKENDS` tables); the modules `api`, `reference` (oracle), `chunk_math` (the chunk math
every backend shares) and the backend modules the tables name (xla_chunked, gpu_triton, tpu;
reference, gpu_step). gpu_common, gpu_forward and gpu_backward are private
(tests/test_kernel_library.py). The op is mesh-free: a caller that
shards wraps it in shard_map.
"""

from pallas_kernels.gated_delta.api import (BACKENDS, IMPLS, STEP_BACKENDS, gated_delta_rule,
                                            gated_delta_step)
from pallas_kernels.gated_delta.reference import (check_gated_delta_shapes,
                                                  check_gated_delta_step_shapes)

__all__ = ["BACKENDS", "IMPLS", "STEP_BACKENDS", "check_gated_delta_shapes",
           "check_gated_delta_step_shapes", "gated_delta_rule", "gated_delta_step"]
