"""Text generation: pure prefill / decode steps over the decode cache (`atma_jax.model.cache`)."""

from atma_jax.generate.steps import decode, jit_decode, jit_prefill, prefill
from atma_jax.model.cache import (Cache, CacheError, cache_partition_specs, cache_shardings,
                                  check_cache, init_cache, reset_rows)

__all__ = ["prefill", "decode", "jit_prefill", "jit_decode", "Cache", "CacheError",
           "init_cache", "reset_rows", "check_cache", "cache_partition_specs",
           "cache_shardings"]
