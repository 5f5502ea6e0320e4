"""Helpers shared by the model tests (and handy in notebooks): tiny configs, fast init, noise.

Keep test shapes few and shared: eager op compilation is cached per shape across tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from atma_jax.config import ModelConfig
from atma_jax.model.atma import Atma


# XLA:CPU compile options for tests: LLVM at -O0 roughly halves compile time, which dominates
# tiny-shape tests; the HLO (and so the math) is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(fn=None, **kwargs):
  """`jax.jit` with FAST_COMPILE options (usable as a decorator with or without arguments)."""
  if fn is None:
    return functools.partial(jit, **kwargs)
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def tiny_config(**overrides) -> ModelConfig:
  """D=32, 4 query / 2 KV heads of 8, fp32, one global block then one conv block."""
  base = dict(vocab_size=64, num_layers=2, hidden_size=32, head_dim=8, gqa_ratio=2,
              global_every=2, global_offset=0, mem_chunk=4, compute_dtype="float32",
              embed_dtype="float32", param_dtype="float32", init_scheme="reference")
  base.update(overrides)
  return dataclasses.replace(ModelConfig(), **base)


def init_model(cfg: ModelConfig, seed: int = 0):
  """(graphdef, params) of `Atma(cfg, rngs=nnx.Rngs(seed))`, built eagerly.

  Eager construction compiles each op once per shape, so a second model of the same shapes
  (another seed or init scheme) costs ~0.1 s on CPU; a jitted build recompiles every time.
  """
  return nnx.split(Atma(cfg, rngs=nnx.Rngs(seed)), nnx.Param)


@jit(static_argnames="scale")
def perturb(params: nnx.State, key: jax.Array, scale: float = 0.3) -> nnx.State:
  """Adds noise to every parameter so no path is dead (zero-init projections come alive).

  2-D kernels get U(+-scale/sqrt(fan_in)) noise, vectors U(+-scale). Jitted: one compile per
  parameter-tree structure instead of one eager op per shape.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, x in zip(keys, leaves):
    bound = scale / (x.shape[0] ** 0.5) if x.ndim == 2 else scale
    out.append((x.astype(jnp.float32) + jax.random.uniform(k, x.shape, jnp.float32, -bound, bound)
                ).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)
