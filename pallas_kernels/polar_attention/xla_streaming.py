"""Streaming XLA backend of `attention_stats`: O(T * block) memory in forward and backward.

Forward: for each query block (lax.map), stream the key blocks it can see (fori_loop over the
causal/window band of `bands.py`) keeping online statistics per row, in fp32 (fp64 for fp64
inputs):
  M  running max (finite sentinel start)    L  = sum p      Q2 = sum p^2 (rescaled by alpha^2)
  S  = sum p v                               with p = exp(a - M), forced to 0 on invisible keys.
Then o = S / L, lse = M + log L, p2 = Q2 / L^2.

Backward (KERNELS.md §2a closed form): for each key block (lax.scan), loop over the query blocks
that see it, recompute pi = exp(a - lse) and
  ds = pi (dp - delta') + cq pi^2,  dp = do . v_j
  dq_i += scale_i ds k_j,  dk_j += scale_i ds q_i,  dv_j += pi do_i,  dscale_i += ds (q_i . k_j).
dk / dv live in the scan carry of their key block; dq / dscale accumulate in [B, Tq, ...]
buffers. No [Tq, Tk] array exists anywhere.

Dimension glossary
  B batch   Tq / Tk query / key rows (padded to Tqp / Tkp)   H query heads   G KV heads
  R = H // G group size   D head dim   bq / bk query / key block   nq / nk number of blocks
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.polar_attention import bands, reference
from pallas_kernels.polar_attention.reference import MASK_SENTINEL, stats_dtype

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def unsupported_reason(q, k, v, *, window=None, q_offset=0) -> str | None:
  """None: the XLA path takes every valid shape."""
  del q, k, v, window, q_offset
  return None


def _blocks(t: int, block: int) -> tuple[int, int]:
  """(block size, number of blocks) for a length t: the block is clamped to t."""
  b = max(1, min(block, t))
  return b, -(-t // b)


def _pad_to(x, axis: int, size: int):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _block_logits(q_BqGRD, k_BkGD, scale_BGRq, qb, kb, bq, bk, tk, q_offset, window):
  """dots_BGRqk (q.k in fp32/fp64), a_BGRqk (masked with the sentinel) and the mask."""
  cdt = scale_BGRq.dtype
  dots = jnp.einsum("bqgrd,bkgd->bgrqk", q_BqGRD, k_BkGD, preferred_element_type=cdt,
                    precision=reference.xla_precision(q_BqGRD.dtype))
  pos_q1 = q_offset + qb * bq + jnp.arange(bq)[:, None]
  key_1k = kb * bk + jnp.arange(bk)[None, :]
  mask_qk = bands.visible(pos_q1, key_1k, tk=tk, window=window)
  a = jnp.where(mask_qk, scale_BGRq[..., None] * dots, MASK_SENTINEL)
  return dots, a, mask_qk


def _split_heads(q_BTHD, scale_BTH, G):
  B, T, H, D = q_BTHD.shape
  return q_BTHD.reshape(B, T, G, H // G, D), scale_BTH.reshape(B, T, G, H // G)


def attention_stats_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None, q_offset=0,
                        block_k=DEFAULT_BLOCK_K, block_q=DEFAULT_BLOCK_Q):
  """(o_BTHD, lse_BTH, p2_BTH), all fp32 (fp64 for fp64 inputs)."""
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R, cdt, dt = H // G, stats_dtype(q_BTHD.dtype), q_BTHD.dtype
  bq, nq = _blocks(Tq, block_q)
  bk, nk = _blocks(Tk, block_k)
  q_BTGRD, scale_BTGR = _split_heads(q_BTHD, scale_BTH.astype(cdt), G)
  q_BTGRD, scale_BTGR = _pad_to(q_BTGRD, 1, nq * bq), _pad_to(scale_BTGR, 1, nq * bq)
  k_BTGD, v_BTGD = _pad_to(k_BTGD, 1, nk * bk), _pad_to(v_BTGD.astype(dt), 1, nk * bk)

  def one_query_block(qb):
    q_blk = lax.dynamic_slice_in_dim(q_BTGRD, qb * bq, bq, axis=1)
    s_blk = jnp.moveaxis(lax.dynamic_slice_in_dim(scale_BTGR, qb * bq, bq, axis=1), 1, 3)

    def key_step(kb, carry):
      m, l, q2, acc = carry
      k_blk = lax.dynamic_slice_in_dim(k_BTGD, kb * bk, bk, axis=1)
      v_blk = lax.dynamic_slice_in_dim(v_BTGD, kb * bk, bk, axis=1)
      _, a, mask = _block_logits(q_blk, k_blk, s_blk, qb, kb, bq, bk, Tk, q_offset, window)
      m_new = jnp.maximum(m, jnp.max(a, axis=-1))
      alpha = jnp.exp(m - m_new)
      p = jnp.where(mask, jnp.exp(a - m_new[..., None]), 0.0)
      l = alpha * l + jnp.sum(p, axis=-1)
      q2 = alpha * alpha * q2 + jnp.sum(p * p, axis=-1)
      pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(dt), v_blk, preferred_element_type=cdt,
                      precision=reference.xla_precision(dt))
      return m_new, l, q2, alpha[..., None] * acc + pv

    stat0 = jnp.full((B, G, R, bq), MASK_SENTINEL, cdt)
    init = (stat0, jnp.zeros_like(stat0), jnp.zeros_like(stat0),
            jnp.zeros((B, G, R, bq, D), cdt))
    lo, _, _, hi = bands.keys_of_query_block(qb, bq=bq, bk=bk, tk=Tk, q_offset=q_offset,
                                             window=window)
    m, l, q2, acc = lax.fori_loop(lo, hi, key_step, init)
    l_safe = jnp.where(l > 0, l, 1.0)  # rows without visible keys exist only in the padding
    return acc / l_safe[..., None], m + jnp.log(l_safe), q2 / (l_safe * l_safe)

  o_nBGRqD, lse_nBGRq, p2_nBGRq = lax.map(one_query_block, jnp.arange(nq))
  o_BTHD = jnp.transpose(o_nBGRqD, (1, 0, 4, 2, 3, 5)).reshape(B, nq * bq, H, D)[:, :Tq]
  to_rows = lambda x: jnp.transpose(x, (1, 0, 4, 2, 3)).reshape(B, nq * bq, H)[:, :Tq]
  return o_BTHD, to_rows(lse_nBGRq), to_rows(p2_nBGRq)


def attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD, delta_BTH,
                        cq_BTH, *, window=None, q_offset=0, block_k=DEFAULT_BLOCK_K,
                        block_q=DEFAULT_BLOCK_Q):
  """(dq, dk, dv) in the input dtype and dscale in fp32 (fp64 for fp64 inputs).

  `delta_BTH` is delta' = rowsum(do * o) - dlse + 2 dp2 p2 and `cq_BTH` = 2 dp2
  (`reference.stats_vjp_prologue`).
  """
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R, cdt, dt = H // G, stats_dtype(q_BTHD.dtype), q_BTHD.dtype
  bq, nq = _blocks(Tq, block_q)
  bk, nk = _blocks(Tk, block_k)
  Tqp, Tkp = nq * bq, nk * bk
  q_BTGRD, scale_BTGR = _split_heads(q_BTHD, scale_BTH.astype(cdt), G)
  do_BTGRD = do_BTHD.astype(dt).reshape(B, Tq, G, R, D)
  # Per-row vectors as [B, G, R, Tqp] so a query block is a slice of the last axis.
  rows = lambda x: _pad_to(jnp.moveaxis(x.astype(cdt).reshape(B, Tq, G, R), 1, 3), 3, Tqp)
  scale_BGRT, lse_BGRT, delta_BGRT, cq_BGRT = map(rows, (scale_BTH, lse_BTH, delta_BTH, cq_BTH))
  q_BTGRD, do_BTGRD = _pad_to(q_BTGRD, 1, Tqp), _pad_to(do_BTGRD, 1, Tqp)
  k_BTGD, v_BTGD = _pad_to(k_BTGD, 1, Tkp), _pad_to(v_BTGD.astype(dt), 1, Tkp)
  prec = reference.xla_precision(dt)

  def one_key_block(carry, kb):
    k_blk = lax.dynamic_slice_in_dim(k_BTGD, kb * bk, bk, axis=1)
    v_blk = lax.dynamic_slice_in_dim(v_BTGD, kb * bk, bk, axis=1)

    def query_step(qb, inner):
      dk, dv, dq_all, dscale_all = inner
      row_slice = lambda x: lax.dynamic_slice_in_dim(x, qb * bq, bq, axis=3)
      q_blk = lax.dynamic_slice_in_dim(q_BTGRD, qb * bq, bq, axis=1)
      do_blk = lax.dynamic_slice_in_dim(do_BTGRD, qb * bq, bq, axis=1)
      s_blk, lse_blk = row_slice(scale_BGRT), row_slice(lse_BGRT)
      delta_blk, cq_blk = row_slice(delta_BGRT), row_slice(cq_BGRT)
      dots, a, mask = _block_logits(q_blk, k_blk, s_blk, qb, kb, bq, bk, Tk, q_offset, window)
      pi = jnp.where(mask, jnp.exp(a - lse_blk[..., None]), 0.0)
      dp = jnp.einsum("bqgrd,bkgd->bgrqk", do_blk, v_blk, preferred_element_type=cdt,
                      precision=prec)
      ds = pi * (dp - delta_blk[..., None]) + cq_blk[..., None] * pi * pi
      dv = dv + jnp.einsum("bgrqk,bqgrd->bkgd", pi.astype(dt), do_blk,
                           preferred_element_type=cdt, precision=prec)
      ds_scaled = (s_blk[..., None] * ds).astype(dt)
      dk = dk + jnp.einsum("bgrqk,bqgrd->bkgd", ds_scaled, q_blk, preferred_element_type=cdt,
                           precision=prec)
      dq_blk = jnp.einsum("bgrqk,bkgd->bqgrd", ds_scaled, k_blk, preferred_element_type=cdt,
                          precision=prec)
      dq_all = lax.dynamic_update_slice_in_dim(
          dq_all, lax.dynamic_slice_in_dim(dq_all, qb * bq, bq, axis=1) + dq_blk, qb * bq, 1)
      dscale_blk = row_slice(dscale_all) + jnp.sum(ds * dots, axis=-1)
      dscale_all = lax.dynamic_update_slice_in_dim(dscale_all, dscale_blk, qb * bq, 3)
      return dk, dv, dq_all, dscale_all

    zeros_kv = jnp.zeros((B, bk, G, D), cdt)
    lo, _, _, hi = bands.queries_of_key_block(kb, bq=bq, bk=bk, nq=nq, tk=Tk, q_offset=q_offset,
                                              window=window)  # hi <= lo: no step
    dk, dv, dq_all, dscale_all = lax.fori_loop(lo, hi, query_step, (zeros_kv, zeros_kv) + carry)
    return (dq_all, dscale_all), (dk.astype(dt), dv.astype(dt))

  init = (jnp.zeros((B, Tqp, G, R, D), cdt), jnp.zeros((B, G, R, Tqp), cdt))
  (dq_all, dscale_all), (dk_nBkGD, dv_nBkGD) = lax.scan(one_key_block, init, jnp.arange(nk))
  to_keys = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, Tkp, G, D)[:, :Tk]
  dq = dq_all[:, :Tq].reshape(B, Tq, H, D).astype(dt)
  dscale = jnp.moveaxis(dscale_all, 3, 1).reshape(B, Tqp, H)[:, :Tq]
  return dq, to_keys(dk_nBkGD), to_keys(dv_nBkGD), dscale
