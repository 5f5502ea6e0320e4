"""Gated delta rule (ATMA_SPEC §4.4-4.5): sequential oracle, chunked XLA path, Pallas kernels.

The public API is what this package exports; callers outside the kernel library import these
names, not the backend modules. The op is mesh-free: a caller that shards wraps it
(atma_jax/model/ops.py).
"""

from pallas_kernels.gated_delta.api import BACKENDS, IMPLS, gated_delta_rule, gated_delta_step
from pallas_kernels.gated_delta.reference import check_gated_delta_shapes

__all__ = ["BACKENDS", "IMPLS", "check_gated_delta_shapes", "gated_delta_rule", "gated_delta_step"]
