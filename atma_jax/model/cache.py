"""Decode state of the ATMA model: one pytree of arrays carried between prefill and decode steps.

Dimension glossary
  B batch (sequences)   S key slots (max_len, or min(W, max_len) for a window-W model)
  G KV heads   H query / memory heads   d head dim   D hidden
  Kc LFM2 conv taps   Ka Canon conv taps

Per layer (ATMA_SPEC §4.7):
  conv blocks    `ConvLayerCache.tail_BKD`   the last Kc-1 inputs of the LFM2 conv (b * u)
  global blocks  `GlobalLayerCache`          K/V of the attention core ([B, S, G, d], post-Canon
                 or post-rotary, compute dtype), the Canon q/k/v conv tails (last Ka-1 inputs;
                 polar / nope only), the gated-delta memory state [B, H, K, V] (fp32; memory
                 models only)
and `Cache.positions` int32 [B]: tokens consumed so far per sequence = absolute position of its
next token. A full-context cache stores position p in slot p; a windowed one is a ring buffer,
position p in slot p % S. Slots at or after `positions` hold nothing meaningful.

The memory needs no partial-chunk data: its chunked scan is exact, so the state after any prefix
continues the recurrence token by token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from atma_jax.config import ModelConfig
from atma_jax.errors import AtmaError
from atma_jax.model.layers import stats_dtype
from atma_jax.sharding import current_mesh, entry_size, logical_to_spec


class CacheError(AtmaError, ValueError):
  """A decode cache or prompt that does not fit the model (message says how to fix it)."""


@struct.dataclass
class ConvLayerCache:
  tail_BKD: jax.Array  # [B, Kc-1, D] LFM2 conv inputs, oldest first

  def axes(self) -> dict[str, tuple]:
    return {"tail_BKD": ("batch", None, "mixer")}


@struct.dataclass
class GlobalLayerCache:
  k_BSGd: jax.Array  # [B, S, G, d] keys as the attention core sees them
  v_BSGd: jax.Array  # [B, S, G, d]
  canon_q_BKF: jax.Array | None  # [B, Ka-1, H*d] Canon q inputs (None for rope)
  canon_k_BKF: jax.Array | None  # [B, Ka-1, G*d]
  canon_v_BKF: jax.Array | None  # [B, Ka-1, G*d]
  mem_BHKV: jax.Array | None  # [B, H, d, d] gated-delta state, fp32 (None without memory)

  def axes(self) -> dict[str, tuple]:
    kv = ("batch", "seq", "act_kv_heads", "head_dim")
    return {"k_BSGd": kv, "v_BSGd": kv, "canon_q_BKF": ("batch", None, "heads"),
            "canon_k_BKF": ("batch", None, "kv"), "canon_v_BKF": ("batch", None, "kv"),
            "mem_BHKV": ("batch", "act_heads", "head_dim", "head_dim")}


@struct.dataclass
class Cache:
  positions: jax.Array  # int32 [B]: tokens consumed per sequence (position of the next one)
  layers: tuple  # ConvLayerCache | GlobalLayerCache per block, in block order
  max_len: int = struct.field(pytree_node=False)  # the longest sequence the cache may hold

  @property
  def batch_size(self) -> int:
    return self.positions.shape[0]


class TokenSpan(struct.PyTreeNode):
  """Where the tokens of one prefill / decode call go: row b's tokens t < lengths[b] are real,
  at absolute positions starts[b] + t; the rest is right padding that must not touch a state.
  `lengths_B=None` says statically that every token is real (decode): no masks, static slices."""

  starts_B: jax.Array  # int32 [B]
  lengths_B: jax.Array | None  # int32 [B], or None = all T tokens of every row

  def positions_BT(self, T: int) -> jax.Array:
    return self.starts_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]

  def valid_BT(self, T: int) -> jax.Array | None:
    """bool [B, T] real-token mask, None when every token is real."""
    if self.lengths_B is None:
      return None
    return jnp.arange(T, dtype=jnp.int32)[None, :] < self.lengths_B[:, None]

  def advanced(self, T: int) -> jax.Array:
    """Positions after this call: starts + lengths."""
    return self.starts_B + (T if self.lengths_B is None else self.lengths_B)


def cache_slots(cfg: ModelConfig, max_len: int) -> int:
  """Key slots per sequence: max_len, or a ring of min(W, max_len) for a window-W model."""
  return max_len if cfg.attn_window is None else min(cfg.attn_window, max_len)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Cache:
  """An empty decode state for `batch_size` sequences of up to `max_len` tokens (zeros,
  positions 0), activations in cfg.compute_dtype, memory state in fp32."""
  if batch_size < 1 or max_len < 1:
    raise CacheError(f"init_cache needs batch_size >= 1 and max_len >= 1; got {batch_size}, "
                     f"{max_len}")
  B, D, H, G, d = (batch_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
  act = jnp.dtype(cfg.compute_dtype)
  S = cache_slots(cfg, max_len)
  layers = []
  for l in range(cfg.num_layers):
    if not cfg.is_global(l):
      layers.append(ConvLayerCache(jnp.zeros((B, cfg.conv_kernel_size - 1, D), act)))
      continue
    Ka = cfg.attn_kernel_size
    canon = cfg.attn_type != "rope"
    tail = lambda F: jnp.zeros((B, Ka - 1, F), act) if canon else None
    layers.append(GlobalLayerCache(
        k_BSGd=jnp.zeros((B, S, G, d), act), v_BSGd=jnp.zeros((B, S, G, d), act),
        canon_q_BKF=tail(H * d), canon_k_BKF=tail(G * d), canon_v_BKF=tail(G * d),
        mem_BHKV=(jnp.zeros((B, H, d, d), stats_dtype(act)) if cfg.mem_enabled else None)))
  return Cache(positions=jnp.zeros((B,), jnp.int32), layers=tuple(layers), max_len=max_len)


def reset_rows(cache: Cache, rows_B: jax.Array) -> Cache:
  """The cache with the sequences where `rows_B` (bool [B]) is set emptied (position 0, zero
  conv tails and memory state), ready for a new prompt; the other rows are untouched. Their
  K/V slots are left as they are: nothing at or past a row's position is ever read."""
  def clear(x):
    if x is None:
      return None
    return jnp.where(rows_B.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), x)

  layers = []
  for layer in cache.layers:
    keep_kv = ("k_BSGd", "v_BSGd")
    layers.append(layer.replace(**{f: clear(getattr(layer, f)) for f in layer.axes()
                                   if f not in keep_kv}))
  return cache.replace(positions=clear(cache.positions), layers=tuple(layers))


def _leaf_names(cache: Cache):
  """[(name, array, logical axes)] for every array of the cache."""
  out = [("positions", cache.positions, ("batch",))]
  for l, layer in enumerate(cache.layers):
    for field, axes in layer.axes().items():
      x = getattr(layer, field)
      if x is not None:
        out.append((f"layers[{l}].{field}", x, axes))
  return out


def check_cache(cfg: ModelConfig, cache: Any, batch_size: int | None = None) -> None:
  """Raises CacheError when `cache` is not a `Cache` of this model's layout (shapes, dtypes),
  or (given `batch_size`) holds a different number of sequences."""
  if not isinstance(cache, Cache):
    raise CacheError(f"expected an atma_jax.model.cache.Cache, got {type(cache).__name__}; "
                     "build one with init_cache(cfg, batch_size, max_len)")
  B = cache.positions.shape[0] if cache.positions.ndim == 1 else None
  if B is None:
    raise CacheError(f"cache.positions must be int32 [B]; got shape {cache.positions.shape}")
  if batch_size is not None and batch_size != B:
    raise CacheError(f"the batch has {batch_size} rows but the cache holds {B} sequences; "
                     f"build the cache with init_cache(cfg, batch_size={batch_size}, max_len)")
  want = jax.eval_shape(lambda: init_cache(cfg, B, cache.max_len))
  if len(cache.layers) != len(want.layers):
    raise CacheError(f"the cache has {len(cache.layers)} layers but the model has "
                     f"{len(want.layers)}; build it with init_cache(model.cfg, batch, max_len)")
  for l, (g, w) in enumerate(zip(cache.layers, want.layers)):
    if type(g) is not type(w):
      raise CacheError(f"the cache does not fit this model: layer {l} holds a "
                       f"{type(g).__name__}, the model's block {l} needs a {type(w).__name__}; "
                       "build it with init_cache(model.cfg, batch_size, max_len)")
  got_leaves, want_leaves = _leaf_names(cache), _leaf_names(want)
  got_d = {n: x for n, x, _ in got_leaves}
  for name, w, _ in want_leaves:
    g = got_d.get(name)
    if g is None or (g.shape, g.dtype) != (w.shape, w.dtype):
      got = "missing" if g is None else f"{g.dtype}{list(g.shape)}"
      raise CacheError(f"the cache does not fit this model: {name} is {got}, expected "
                       f"{w.dtype}{list(w.shape)}; build it with init_cache(model.cfg, "
                       f"batch_size, max_len) for this model's config")
  if len(got_leaves) != len(want_leaves):
    extra = sorted(set(got_d) - {n for n, _, _ in want_leaves})
    raise CacheError(f"the cache does not fit this model: unexpected state {extra}; build it "
                     "with init_cache(model.cfg, batch_size, max_len)")


def check_fit(cache: Cache, lengths_B, T: int) -> None:
  """Raises CacheError unless lengths are in [0, T] and no row runs past the cache's max_len
  (checked on concrete values; under jit, where they are traced, it does nothing)."""
  if isinstance(lengths_B, jax.core.Tracer) or isinstance(cache.positions, jax.core.Tracer):
    return
  lengths = np.asarray(lengths_B)
  if lengths.size and (lengths.min() < 0 or lengths.max() > T):
    raise CacheError(f"lengths must be in [0, {T}] (real tokens of each right-padded row); got "
                     f"{lengths.tolist()}")
  end = np.asarray(cache.positions) + lengths
  if end.size and end.max() > cache.max_len:
    row = int(np.argmax(end))
    raise CacheError(f"row {row} would reach position {int(end[row])} > the cache's max_len="
                     f"{cache.max_len}; build the cache with init_cache(cfg, batch, "
                     f"max_len>={int(end.max())}) or shorten the prompt")


def _fitting_spec(names, shape, mesh) -> P:
  """logical_to_spec, with every mesh axis that does not divide its dimension dropped."""
  spec = logical_to_spec(names, mesh)
  out = []
  for entry, n in zip(spec, shape):
    size = entry_size(mesh, entry) if mesh is not None else 1
    out.append(entry if n % size == 0 else None)
  return P(*out)


def cache_partition_specs(cache: Cache, mesh=None) -> Cache:
  """Same tree as `cache` with a PartitionSpec per array (default mesh: the active one): batch
  over data/fsdp, heads over tensor, each only where the mesh axes divide the dimension."""
  mesh = mesh if mesh is not None else current_mesh()

  def layer_specs(layer):
    return layer.replace(**{f: (None if getattr(layer, f) is None else
                                _fitting_spec(a, getattr(layer, f).shape, mesh))
                            for f, a in layer.axes().items()})

  return cache.replace(positions=_fitting_spec(("batch",), cache.positions.shape, mesh),
                       layers=tuple(layer_specs(l) for l in cache.layers))


def cache_shardings(cache: Cache, mesh) -> Cache:
  """`cache_partition_specs` as NamedShardings on `mesh` (for jit / device_put)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_partition_specs(cache, mesh),
                      is_leaf=lambda x: isinstance(x, P))
