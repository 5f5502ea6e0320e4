"""Pure prefill and decode steps over a decode cache (`atma_jax.model.cache`).

  prefill(graphdef, params, ids_BT, lengths_B, cache) -> (last_logits_BV f32, cache)
  decode(graphdef, params, tokens_B, cache) -> (logits_BV f32, cache)

`graphdef, params = nnx.split(model)` (or `nnx.split(model, nnx.Param)`). Both are pure and
jittable; jit them with the cache donated (`jit_prefill`, `jit_decode` do, with shardings from
the active mesh). The logits are the model's capped logits (`Atma.logits`), identical to the
full forward's at the same positions.

Dimension glossary: B batch, T prompt tokens of this call, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from atma_jax.model.cache import Cache, CacheError, cache_shardings
from atma_jax.sharding import entry_size, logical_to_spec, use_mesh


def prefill(graphdef, params, ids_BT: jax.Array, lengths_B: jax.Array, cache: Cache, *,
            mem: bool = True):
  """Feeds right-padded prompts `ids_BT` (row b: its first lengths[b] tokens are real; 0 leaves
  the row unchanged) after what `cache` holds: (capped logits at each row's last real token
  [B, V] fp32, cache advanced by lengths). Two calls on two halves equal one on the whole.
  A row with lengths 0 gets meaningless (finite) logits.
  """
  if ids_BT.ndim != 2:
    raise CacheError(f"ids must be [B, T]; got shape {ids_BT.shape}")
  T = ids_BT.shape[1]
  model = nnx.merge(graphdef, params)
  h_BTD, _, cache = model(ids_BT, cache=cache, lengths=lengths_B, mem=mem)  # checks the fit
  last_B = jnp.clip(jnp.asarray(lengths_B, jnp.int32) - 1, 0, T - 1)
  h_BD = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
  return model.logits(h_BD), cache


def decode(graphdef, params, tokens_B: jax.Array, cache: Cache, *, mem: bool = True):
  """One token per row at position cache.positions: (capped logits [B, V] fp32, cache + 1)."""
  if tokens_B.ndim != 1:
    raise CacheError(f"tokens must be [B] (one per sequence); got shape {tokens_B.shape}")
  model = nnx.merge(graphdef, params)
  h_B1D, _, cache = model(tokens_B[:, None], cache=cache, mem=mem)  # checks the fit
  return model.logits(h_B1D[:, 0]), cache


def _batch_sharding(mesh, ndim: int, B: int):
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh)
  if B % entry_size(mesh, spec[0]):
    spec = jax.sharding.PartitionSpec()
  return NamedSharding(mesh, spec)


def jit_prefill(graphdef, *, mem: bool = True, mesh=None):
  """`prefill` jitted with the cache donated: fn(params, ids_BT, lengths_B, cache). Under
  `mesh` the cache keeps its logical sharding (batch over data/fsdp, heads over tensor)."""

  def run(params, ids_BT, lengths_B, cache):
    return prefill(graphdef, params, ids_BT, lengths_B, cache, mem=mem)

  return _jit_with_cache_out(run, mesh, cache_argnum=3)


def jit_decode(graphdef, *, mem: bool = True, mesh=None):
  """`decode` jitted with the cache donated: fn(params, tokens_B, cache)."""

  def run(params, tokens_B, cache):
    return decode(graphdef, params, tokens_B, cache, mem=mem)

  return _jit_with_cache_out(run, mesh, cache_argnum=2)


def _jit_with_cache_out(run, mesh, *, cache_argnum: int):
  if mesh is None:
    return jax.jit(run, donate_argnums=(cache_argnum,))
  compiled = {}

  def call(*args):
    cache = args[cache_argnum]
    key = (jax.tree.structure(cache), cache.positions.shape[0])
    if key not in compiled:
      B = cache.positions.shape[0]
      out = (_batch_sharding(mesh, 2, B), cache_shardings(cache, mesh))
      compiled[key] = jax.jit(run, donate_argnums=(cache_argnum,), out_shardings=out)
    with use_mesh(mesh):  # the model's sharding constraints and kernel shard_maps see the mesh
      return compiled[key](*args)

  return call
