"""Attention over a decode cache: every query row and key carries its own absolute position.

The training ops (`api.py`) take one `q_offset` for the whole batch and keys laid out from
position 0. A decode cache breaks both: sequences of one batch sit at different positions, and a
windowed cache is a ring buffer whose slots hold positions out of order. Here the caller passes
the absolute position of every query row (`q_pos_BT`) and of every key (`k_pos_BS`, per row);
key j is visible to row i iff

    k_pos[j] <= q_pos[i]   and (window W)   k_pos[j] > q_pos[i] - W

so empty or invalid slots are keys at position `INVALID_POS` (never visible). Polar's
temperature and null floor use the absolute count q_pos + 1 of each row (capped at W), exactly
as the training op with q_offset does.

  attention_stats_at(q, k, v, scale, q_pos, k_pos, *, window, block_k, fold_gqa)
      -> (o, lse, p2) fp32
  polar_core_at(q, k, v, v_null, len_gain_raw, null_base, null_slope_raw, mag_beta_raw,
                q_pos, k_pos, *, window, stats_fn) -> (c_BTHD, mag_BTH) in q.dtype
  softmax_attention_at(q, k, v, q_pos, k_pos, *, scale, window, stats_fn) -> o_BTHD in q.dtype

Plain XLA, streamed over key blocks (online softmax, fp32 statistics); a decode step (one query
row) takes the whole cache as one block, and (B > 1) its two products read the cache as
[B, S, G*D] (the query block-diagonal over the KV heads; G times the FLOPs of a per-head
product, no transpose of the whole cache to make G a batch axis: XLA's dots want batch axes
major). The folded products contract over G*D, so a caller that shards the heads runs
`attention_stats_at` per shard (the `stats_fn` hook of the cores): under
GSPMD alone the head-sharded cache would be gathered whole on every device, every step.
Dimension glossary: B batch, T query rows, S key slots,
H query heads, G KV heads (head h uses KV head h // (H // G)), R = H // G, D head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.polar_attention import bands, reference
from pallas_kernels.polar_attention.reference import MASK_SENTINEL, stats_dtype

INVALID_POS = 2 ** 30  # position of an empty cache slot: after every query, so never visible
DEFAULT_BLOCK_K = 512


def _check(q_BTHD, k_BSGD, v_BSGD, q_pos_BT, k_pos_BS):
  B, T, H, D = q_BTHD.shape
  _, S, G, _ = k_BSGD.shape
  if (k_BSGD.shape != v_BSGD.shape or k_BSGD.shape[0] != B or k_BSGD.shape[3] != D or G < 1
      or H % G):
    raise ValueError(f"k {k_BSGD.shape} and v {v_BSGD.shape} must be [B={B}, S, G, D={D}] with "
                     f"G dividing the {H} query heads")
  if q_pos_BT.shape != (B, T) or k_pos_BS.shape != (B, S):
    raise ValueError(f"q_pos must be [B, T] = {(B, T)} and k_pos [B, S] = {(B, S)}; got "
                     f"{q_pos_BT.shape} and {k_pos_BS.shape}")


def attention_stats_at(q_BTHD, k_BSGD, v_BSGD, scale_BTH, q_pos_BT, k_pos_BS, *, window=None,
                       block_k: int | None = None, fold_gqa: bool | None = None):
  """Softmax over the visible keys of each row: (o_BTHD, lse_BTH, p2_BTH) in fp32.

  a_ij = scale_i (q_i . k_j); o = sum pi v, lse = logsumexp a, p2 = sum pi^2. A row without a
  visible key (only a padded row can be one) gets o = 0, lse = MASK_SENTINEL, p2 = 1 (finite).
  `block_k` keys per streaming step (default: all of them for one query row, else 512).
  `fold_gqa`: the products of one query row read the cache as [B, S, G*D] (module docstring);
  None = when T == 1 and B > 1.
  """
  _check(q_BTHD, k_BSGD, v_BSGD, q_pos_BT, k_pos_BS)
  B, T, H, D = q_BTHD.shape
  if fold_gqa and T != 1:
    raise ValueError(f"fold_gqa=True needs one query row (T == 1); got T={T}")
  S, G = k_BSGD.shape[1], k_BSGD.shape[2]
  R = H // G
  cdt = stats_dtype(q_BTHD.dtype)
  if block_k is None:
    block_k = S if T == 1 else DEFAULT_BLOCK_K
  bk = max(1, min(block_k, S))
  nk = -(-S // bk)
  pad = nk * bk - S
  if pad:
    k_BSGD = jnp.pad(k_BSGD, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v_BSGD = jnp.pad(v_BSGD, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k_pos_BS = jnp.pad(k_pos_BS, ((0, 0), (0, pad)), constant_values=INVALID_POS)
  blocks = lambda x: jnp.moveaxis(x.reshape(B, nk, bk, *x.shape[2:]), 1, 0)
  q_BTGRD = q_BTHD.reshape(B, T, G, R, D)
  scale_BTGR = scale_BTH.astype(cdt).reshape(B, T, G, R)
  q_pos_BT = q_pos_BT.astype(jnp.int32)
  prec = reference.xla_precision(q_BTHD.dtype)

  # One query row of a batch (decode): the GQA-folded products below. By default not at B = 1,
  # where XLA drops the batch axis: there the CPU backend copied the written cache for them
  # (more bytes per step than the per-head form; bench/profile_decode.py --cost).
  folded = (T == 1 and B > 1) if fold_gqa is None else fold_gqa

  def qk(k_BKGD):
    """[B, T, G, R, K] scores q . k (fp32 accumulation)."""
    k_BKGD = k_BKGD.astype(q_BTHD.dtype)
    if not folded:
      return jnp.einsum("btgrd,bkgd->btgrk", q_BTGRD, k_BKGD, preferred_element_type=cdt,
                        precision=prec)
    # one query row: q block-diagonal over the KV heads, so the cache is read as [B, K, G*D]
    # (batch b only; no transpose of the cache to put the G batch axis first)
    eye_GG = jnp.eye(G, dtype=q_BTHD.dtype)
    qbd_BNF = (q_BTGRD[:, 0, :, :, None, :] * eye_GG[None, :, None, :, None]).reshape(
        B, G * R, G * D)
    dots_BKN = jnp.einsum("bkf,bnf->bkn", k_BKGD.reshape(B, -1, G * D), qbd_BNF,
                          preferred_element_type=cdt, precision=prec)
    return jnp.moveaxis(dots_BKN.reshape(B, 1, -1, G, R), 2, -1)

  def pv(p_BTGRK, v_BKGD):
    """[B, T, G, R, D] sum_k p v (fp32 accumulation)."""
    p_BTGRK = p_BTGRK.astype(v_BKGD.dtype)
    if not folded:
      return jnp.einsum("btgrk,bkgd->btgrd", p_BTGRK, v_BKGD, preferred_element_type=cdt,
                        precision=prec)
    # one query row: every (g, r) row against all G*D columns, then each row's own KV head
    out_BNF = jnp.einsum("bnk,bkf->bnf", p_BTGRK.reshape(B, G * R, -1),
                         v_BKGD.reshape(B, -1, G * D), preferred_element_type=cdt,
                         precision=prec)
    out_BRDG = jnp.diagonal(out_BNF.reshape(B, G, R, G, D), axis1=1, axis2=3)
    return jnp.moveaxis(out_BRDG, -1, 1)[:, None]

  def step(carry, blk):
    m, l, q2, acc = carry
    k_BKGD, v_BKGD, kp_BK = blk
    dots = qk(k_BKGD)
    vis_BTK = bands.visible(q_pos_BT[:, :, None], kp_BK[:, None, :], tk=None, window=window)
    vis = vis_BTK[:, :, None, None, :]
    a = jnp.where(vis, scale_BTGR[..., None] * dots, MASK_SENTINEL)
    m_new = jnp.maximum(m, jnp.max(a, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(vis, jnp.exp(a - m_new[..., None]), 0.0)
    l = alpha * l + jnp.sum(p, axis=-1)
    q2 = alpha * alpha * q2 + jnp.sum(p * p, axis=-1)
    return (m_new, l, q2, alpha[..., None] * acc + pv(p, v_BKGD)), None

  init = (jnp.full((B, T, G, R), MASK_SENTINEL, cdt), jnp.zeros((B, T, G, R), cdt),
          jnp.zeros((B, T, G, R), cdt), jnp.zeros((B, T, G, R, D), cdt))
  (m, l, q2, acc), _ = lax.scan(step, init, (blocks(k_BSGD), blocks(v_BSGD), blocks(k_pos_BS)))
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o = acc / l_safe[..., None]
  lse = jnp.where(seen, m + jnp.log(l_safe), MASK_SENTINEL)
  p2 = jnp.where(seen, q2 / (l_safe * l_safe), 1.0)
  return o.reshape(B, T, H, D), lse.reshape(B, T, H), p2.reshape(B, T, H)


def polar_core_at(q_BTHD, k_BSGD, v_BSGD, v_null_HD, len_gain_raw_H, null_base_H,
                  null_slope_raw_H, mag_beta_raw_H, q_pos_BT, k_pos_BS, *, window=None,
                  block_k: int | None = None, stats_fn=None):
  """Polar core (spec §3.2) at absolute positions: (c_BTHD, mag_BTH) in q.dtype.

  Same prologue / epilogue as `api.polar_stats` (`reference.polar_length_terms`,
  `reference.polar_fold_null`) with per-row counts n = q_pos + 1. `stats_fn` (default
  `attention_stats_at`, same signature) runs the attention in the middle, as in `api.polar_stats`
  (a caller that shards passes its shard_mapped one).
  """
  B, T, H, D = q_BTHD.shape
  cdt = stats_dtype(q_BTHD.dtype)
  stats_fn = attention_stats_at if stats_fn is None else stats_fn
  t_BTH, nu_BTH = reference.polar_length_terms(len_gain_raw_H, null_base_H, null_slope_raw_H,
                                               q_pos_BT + 1, window=window, dtype=cdt)
  o, lse, p2 = stats_fn(q_BTHD, k_BSGD, v_BSGD, t_BTH / math.sqrt(D), q_pos_BT, k_pos_BS,
                        window=window, block_k=block_k)
  st = reference.polar_fold_null(o, lse, p2, t_BTH, nu_BTH, v_null_HD, mag_beta_raw_H)
  return st["c"].astype(q_BTHD.dtype), st["mag"].astype(q_BTHD.dtype)


def softmax_attention_at(q_BTHD, k_BSGD, v_BSGD, q_pos_BT, k_pos_BS, *, scale, window=None,
                         block_k: int | None = None, stats_fn=None):
  """Causal (optionally windowed) softmax attention at absolute positions; q.dtype out.
  `stats_fn` as in `polar_core_at`."""
  B, T, H, _ = q_BTHD.shape
  scale_BTH = jnp.full((B, T, H), scale, stats_dtype(q_BTHD.dtype))
  stats_fn = attention_stats_at if stats_fn is None else stats_fn
  o, _, _ = stats_fn(q_BTHD, k_BSGD, v_BSGD, scale_BTH, q_pos_BT, k_pos_BS, window=window,
                     block_k=block_k)
  return o.astype(q_BTHD.dtype)
