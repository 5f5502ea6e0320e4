"""Text generation (ATMA decode): `generate(model, prompts, SamplingParams(...))`.

Files, one concept each: `steps` (pure prefill / decode steps over the decode cache,
`atma_jax.model.cache`), `sampler` (SamplingParams, the jittable sampler, done flags), `loop`
(chunked prefill of ragged prompts, the on-device decode loop, `Generator`), `text` (prompt
encoding and streamed detokenization), `load` (a Generator from a checkpoint directory), `cli`
(`generate.py`).
"""

from atma_jax.generate.loop import GenerateError, Generator, generate
from atma_jax.generate.sampler import SamplingError, SamplingParams, sample
from atma_jax.generate.steps import decode, jit_decode, jit_prefill, prefill
from atma_jax.model.cache import (Cache, CacheError, cache_partition_specs, cache_shardings,
                                  check_cache, init_cache, reset_rows)

__all__ = ["generate", "Generator", "GenerateError", "SamplingParams", "SamplingError", "sample",
           "prefill", "decode", "jit_prefill", "jit_decode", "Cache", "CacheError",
           "init_cache", "reset_rows", "check_cache", "cache_partition_specs",
           "cache_shardings"]
