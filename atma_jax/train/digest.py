"""Per-array digests and finiteness of a (sharded) pytree, computed on device.

    digest(x) = sum_i  w_i * (i * 0x9E3779B1 | 1)   (mod 2**32)

over the 32-bit words `w_i` of the array's bits (8- and 16-bit elements widened, 64-bit ones
split in two) at linear position `i`. Every multiplier is odd, so changing any ONE word always
changes the digest, and moving values between positions usually does; integer sums are exact in
any order, so the digest of a sharded array equals the digest of the same array on one device.
A checkpoint stores the digests of the state it saved and compares them with what it restores
(`checkpoint.py`): random bytes inside a state file are caught instead of loading silently.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atma_jax.train.optimizer import dotted_path

_GOLDEN = 0x9E3779B1


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (64-bit elements -> a trailing axis of 2)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _linear_index(shape) -> jax.Array:
  """uint32 row-major position of every element of `shape` (built per dim: keeps shardings)."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
    stride *= shape[dim]
  return idx


def leaf_digest(x: jax.Array) -> jax.Array:
  """uint32 scalar digest of one array (module docstring)."""
  w = _words(jnp.asarray(x))
  mult = (_linear_index(w.shape) * jnp.uint32(_GOLDEN)) | jnp.uint32(1)
  return jnp.sum(w * mult, dtype=jnp.uint32)


def leaf_finite(x: jax.Array) -> jax.Array:
  """bool scalar: every element finite (always true for integer arrays)."""
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.asarray(True)
  return jnp.all(jnp.isfinite(x))


@jax.jit
def _digest_tree(tree):
  return jax.tree.map(leaf_digest, tree), jax.tree.map(leaf_finite, tree)


def summarize(tree: Any) -> tuple[dict[str, str], list[str]]:
  """({dotted path: digest as 8 hex digits}, [paths of leaves with non-finite values]).

  One jitted pass over the tree, one host transfer of the scalars."""
  digests_tree, finite_tree = jax.device_get(_digest_tree(tree))
  digests = {dotted_path(path): f"{int(np.asarray(d)):08x}"
             for path, d in jax.tree_util.tree_flatten_with_path(digests_tree)[0]}
  nonfinite = [dotted_path(path)
               for path, ok in jax.tree_util.tree_flatten_with_path(finite_tree)[0]
               if not bool(ok)]
  return digests, nonfinite


def mismatches(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
  """Paths whose digest differs, or that only one side has."""
  keys = sorted(set(saved) | set(restored))
  return [k for k in keys if saved.get(k) != restored.get(k)]
