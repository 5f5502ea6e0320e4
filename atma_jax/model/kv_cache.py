"""The attention core over a decode cache: write this call's keys, attend, return the new cache.

Dimension glossary
  B batch   T tokens of this call   S key slots of the cache   G KV heads   d head dim

Slot layout (`atma_jax.model.cache`): a full-context cache holds position p in slot p; a windowed
one is a ring of S slots, position p in slot p % S. Padded tokens (t >= lengths[b]) are never
written.

`attend_cached` picks, per call, the cheapest exact form of the core (lax.switch on the rows'
start positions; a one-token call takes the last, or with `uniform_kernel` form 1 when every row
sits at one position, e.g. batch 1 — see below):
  0. every row starts at 0 (a fresh prompt): the training op on the new tokens alone, q_offset 0
     (the Pallas kernels' prefill path);
  1. every row starts at the same position p: the training op with the traced q_offset on the
     cache laid out in position order (the keys before p, then the new ones);
  2. otherwise (ragged rows, decode): attention at per-row absolute positions
     (`ops.polar_core_at` / `ops.softmax_attention_at`, XLA).
A padded query row never sees a real key of a later position, so right padding does not need a
mask in forms 0 and 1; its outputs are meaningless and dropped by the caller.

One-token decode with `uniform_kernel` (model.decode_attn_kernel; off until measured on a GPU,
bench/decode_attention.py): when every row sits at the same position p (statically at batch 1,
else a lax.cond on the positions) the training op runs with the traced q_offset p (the Triton
split-K decode kernel on GPU) over `keys_in_order` (a full cache as written, no copy; a ring
laid out in order); otherwise form 2.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from atma_jax.model.cache import TokenSpan
from pallas_kernels.polar_attention import INVALID_POS


def _write(cache_BSGd, new_BTGd, slot_BT):
  """cache[b, slot[b, t]] = new[b, t]; slots >= S are dropped."""
  B, T = slot_BT.shape
  rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  return cache_BSGd.at[rows_BT, slot_BT].set(new_BTGd.astype(cache_BSGd.dtype), mode="drop")


def kv_write(k_cache_BSGd, v_cache_BSGd, k_new_BTGd, v_new_BTGd, span: TokenSpan,
             window: int | None):
  """The caches with this call's real keys / values stored: (k cache, v cache).

  A ring keeps only each row's last min(length, S) new tokens (older ones would collide).
  """
  S = k_cache_BSGd.shape[1]
  T = k_new_BTGd.shape[1]
  pos_BT, valid_BT = span.positions_BT(T), span.valid_BT(T)
  if window is None:
    slot_BT = pos_BT if valid_BT is None else jnp.where(valid_BT, pos_BT, S)
  elif valid_BT is None:
    slot_BT = jnp.where(jnp.arange(T)[None, :] >= T - S, jnp.mod(pos_BT, S), S)
  else:
    kept_BT = valid_BT & (jnp.arange(T)[None, :] >= span.lengths_B[:, None] - S)
    slot_BT = jnp.where(kept_BT, jnp.mod(pos_BT, S), S)
  return (_write(k_cache_BSGd, k_new_BTGd, slot_BT), _write(v_cache_BSGd, v_new_BTGd, slot_BT))


def keys_at_positions(k_old_BSGd, v_old_BSGd, k_written_BSGd, v_written_BSGd, k_new_BTGd,
                      v_new_BTGd, span: TokenSpan, window: int | None):
  """Keys for attention at per-row positions: (keys [B, S', G, d], values, key pos [B, S']).

  Full cache: the written cache, slot s at position s (later slots are masked by causality).
  Ring: the old ring (slot s holds the latest position < start congruent to s mod S, or nothing)
  followed by the new tokens, S' = S + T. Missing keys sit at INVALID_POS.
  Ring, one token per row (decode): the written ring, S' = S (no copy of the ring per step).
  The new token took slot start % S from position start - S, which no query sees: outside
  the window when S = W, and before position 0 when S = max_len < W (start < max_len).
  """
  B, S = k_old_BSGd.shape[:2]
  T = k_new_BTGd.shape[1]
  if window is None:
    key_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))
    return k_written_BSGd, v_written_BSGd, key_pos_BS

  def ring_positions(last_B1):
    """Slot s holds the latest position <= last congruent to s mod S (INVALID_POS if < 0)."""
    pos_BS = last_B1 - jnp.mod(last_B1 - jnp.arange(S, dtype=jnp.int32)[None, :], S)
    return jnp.where(pos_BS >= 0, pos_BS, INVALID_POS)

  if T == 1 and span.lengths_B is None:
    return k_written_BSGd, v_written_BSGd, ring_positions(span.starts_B[:, None])
  ring_pos_BS = ring_positions(span.starts_B[:, None] - 1)
  valid_BT = span.valid_BT(T)
  new_pos_BT = span.positions_BT(T)
  if valid_BT is not None:
    new_pos_BT = jnp.where(valid_BT, new_pos_BT, INVALID_POS)
  cat = lambda old, new: jnp.concatenate([old, new.astype(old.dtype)], axis=1)
  return (cat(k_old_BSGd, k_new_BTGd), cat(v_old_BSGd, v_new_BTGd),
          jnp.concatenate([ring_pos_BS, new_pos_BT], axis=1))


def keys_in_order(k_old_BSGd, v_old_BSGd, k_written_BSGd, v_written_BSGd, k_new_BTGd,
                  v_new_BTGd, start, window: int | None):
  """Keys laid out from a local position 0 for rows that all start at `start` (traced scalar):
  (keys [B, S + T, G, d], values, local offset of the first new token).

  Full cache: the written cache (slot = position), local offset = start; for T > 1, T zero
  slots are appended so a padded row's keys never run past the array (one token sits at
  start < S: `check_fit`). Ring: the last L0 = min(start, S)
  old positions in order, then the new tokens at local L0. With S = W the capped Polar count
  min(L0 + i + 1, W) equals the absolute min(start + i + 1, W).
  """
  B, S, G, d = k_old_BSGd.shape
  T = k_new_BTGd.shape[1]
  pad = lambda x: jnp.concatenate([x, jnp.zeros((B, T, G, d), x.dtype)], axis=1)
  if window is None:
    if T == 1:
      return k_written_BSGd, v_written_BSGd, start
    return pad(k_written_BSGd), pad(v_written_BSGd), start
  L0 = jnp.minimum(start, S)
  slot_S = jnp.mod(start - L0 + jnp.arange(S), S)

  def lay_out(old, new):
    ordered = jnp.take(old, slot_S, axis=1)  # j < L0: position start - L0 + j; rest: unused
    return jax.lax.dynamic_update_slice_in_dim(pad(ordered), new.astype(old.dtype), L0, axis=1)

  return lay_out(k_old_BSGd, k_new_BTGd), lay_out(v_old_BSGd, v_new_BTGd), L0


def attend_cached(q_BTHd, k_new_BTGd, v_new_BTGd, k_cache_BSGd, v_cache_BSGd, span: TokenSpan,
                  window: int | None, *, core: Callable, core_at: Callable,
                  uniform_kernel: bool = False):
  """Attention core of this call's queries over the cache plus the new keys.

  `core(q, k, v, q_offset)`: the training op (keys from local position 0, int or traced offset).
  `core_at(q, keys, values, q_pos_BT, key_pos_BS)`: the per-position op.
  `uniform_kernel`: a one-token call whose rows all sit at one position runs `core` (module
  docstring). Returns (core output, new k cache, new v cache).
  """
  T = q_BTHd.shape[1]
  old = (k_cache_BSGd, v_cache_BSGd)
  written = kv_write(k_cache_BSGd, v_cache_BSGd, k_new_BTGd, v_new_BTGd, span, window)
  new = (k_new_BTGd, v_new_BTGd)

  def at_positions():
    keys, values, key_pos_BS = keys_at_positions(*old, *written, *new, span, window)
    return core_at(q_BTHd, keys, values, span.positions_BT(T), key_pos_BS)

  def fresh():
    return core(q_BTHd, k_new_BTGd, v_new_BTGd, 0)

  def same_start():
    keys, values, offset = keys_in_order(*old, *written, *new, span.starts_B[0], window)
    return core(q_BTHd, keys, values, offset)

  starts_B = span.starts_B
  if T == 1:
    if not uniform_kernel:
      return at_positions(), *written
    if starts_B.shape[0] == 1:
      return same_start(), *written
    out = jax.lax.cond(jnp.all(starts_B == starts_B[0]), same_start, at_positions)
    return out, *written
  branch = jnp.where(jnp.all(starts_B == 0), 0, jnp.where(jnp.all(starts_B == starts_B[0]), 1, 2))
  out = jax.lax.switch(branch, (fresh, same_start, at_positions))
  return out, *written
