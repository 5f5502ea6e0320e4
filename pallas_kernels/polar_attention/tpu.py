"""Mosaic-TPU Pallas kernels of the Polar core op `attention_stats` (KERNELS.md §2a).

Splash/flash structure. Inputs are moved to head-major `[B, heads, T, D]` (TPU blocks tile the
last two dims by (8, 128)); per-row vectors travel as `[B, heads, T, 1]` fp32 (`(bq, 1)` blocks).

- Forward: grid (B, H, nq, nk), key axis "arbitrary" and last; fp32 VMEM scratch m, L, Q2
  (bq, 1) and acc (bq, D) (online softmax with Q2 <- alpha^2 Q2 + sum p^2); o = acc / L,
  lse = m + log L, p2 = Q2 / L^2 written on the last key step.
- dQ kernel (also dscale): same grid; acc (bq, D) scratch.
- dK/dV kernel: grid (B, G, nk, R * nq): the last ("arbitrary") axis walks the GQA group's R
  query heads and the query blocks, so dK/dV are summed over the group in VMEM.

Blocks wholly outside the causal/window band (`bands.py`) are skipped with `pl.when`, and their
index_map clamps the block index into the band so the pipeline re-uses the resident block (no
DMA). Blocks inside the band split into unmasked interior blocks and masked edge blocks. Logits of
invisible keys take a finite sentinel and p is zeroed explicitly (spec §3.4). Lengths are padded
to the block; padded query rows get lse = +1e30 so that they add nothing to dK/dV.

On a machine without a TPU the kernels run in TPU interpret mode (tests).

Dimension glossary
  B batch   Tq/Tk query/key rows   H query heads   G KV heads   R = H // G   D head dim
  bq/bk query/key block   nq/nk number of query/key blocks (after padding)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.polar_attention import bands, reference

NEG = reference.MASK_SENTINEL
PAD_LSE = 1e30
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Block sizes (multiples of 8; 128-multiples on hardware: 512 suits v5e/v5p)."""
  block_q: int = 512
  block_k: int = 512
  dq_block_q: int = 512
  dq_block_k: int = 512
  dkv_block_q: int = 512
  dkv_block_k: int = 512
  # Pallas interpret mode: None = on a machine without a TPU; False lowers the kernels for a TPU
  # from any machine (lowering tests).
  interpret: bool | None = None


DEFAULT_CONFIG = BlockConfig()


def unsupported_reason(q, k, v, *, window=None, q_offset=0) -> str | None:
  """None when these kernels can run this call, else why not (dispatch then falls back to XLA)."""
  why = reference.layout_reason(q, k, v, window=window, q_offset=q_offset)
  if why is not None:
    return why
  D = q.shape[-1]
  if not (D >= 16 and D & (D - 1) == 0):
    return f"head dim {D}: the TPU kernels need a power of 2 >= 16"
  return None


def _interpret_mode(config: BlockConfig):
  interpret = (jax.default_backend() != "tpu") if config.interpret is None else config.interpret
  return pltpu.InterpretParams() if interpret else False


def _fit_block(block: int, t: int) -> int:
  """min(block, t rounded up to 8): one block for short inputs, sublane-aligned."""
  return min(block, -(-t // 8) * 8)


def _head_major(x_BTND, t_pad, value=0.0):
  """[B, T, N, ...] -> [B, N, t_pad, ...] (padded along T with `value`)."""
  t = x_BTND.shape[1]
  if t_pad != t:
    pad = [(0, 0)] * x_BTND.ndim
    pad[1] = (0, t_pad - t)
    x_BTND = jnp.pad(x_BTND, pad, constant_values=value)
  return jnp.swapaxes(x_BTND, 1, 2)


def _rows(x_BTH, t_pad, value=0.0):
  """Per-row vector [B, T, H] -> fp32 [B, H, t_pad, 1]."""
  return _head_major(x_BTH.astype(jnp.float32), t_pad, value)[..., None]


def _static_offset(q_offset):
  """The offset as a Python int when static, else None (then read from the prefetched ref)."""
  return int(q_offset) if isinstance(q_offset, int) else None


def _offset_of(static, off_ref):
  return static if static is not None else off_ref[0]


def _with_offset(kernel, static):
  """Kernel taking the scalar-prefetched offset ref first."""
  def wrapped(off_ref, *refs):
    kernel(*refs, q_offset=_offset_of(static, off_ref))
  return wrapped


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch_shapes, name, q_offset,
          config):
  """pallas_call with the query offset as a scalar-prefetch operand (index maps get its ref)."""
  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                           out_specs=out_specs, scratch_shapes=scratch_shapes)
  call = pl.pallas_call(
      _with_offset(kernel, _static_offset(q_offset)), grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret_mode(config), name=name)
  return lambda *args: call(jnp.asarray(q_offset, jnp.int32).reshape(1), *args)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _masked_and_full(idx, band, body):
  """Runs body(masked) under pl.when for an in-band block; nothing for a skipped block."""
  lo, full_lo, full_hi, hi = band
  in_band = (idx >= lo) & (idx < hi)
  full = (idx >= full_lo) & (idx < full_hi)

  @pl.when(in_band & full)
  def _():
    body(False)

  @pl.when(in_band & jnp.logical_not(full))
  def _():
    body(True)


def _clamp(idx, band, n):
  """Block index clamped into the band [lo, hi - 1] (and into [0, n - 1] for an empty band):
  skipped steps re-use the resident block."""
  lo, _, _, hi = band
  return jnp.minimum(jnp.clip(idx, lo, jnp.maximum(hi - 1, lo)), n - 1)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, s_ref, o_ref, lse_ref, p2_ref, m_sc, l_sc, q2_sc, acc_sc,
                *, bq, bk, tk, q_offset, window):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    q2_sc[...] = jnp.zeros(q2_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(masked):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    prec = _precision(q.dtype)
    a_qk = s_ref[...] * lax.dot_general(q, k, _NT, precision=prec,
                                        preferred_element_type=jnp.float32)
    if masked:
      rows = q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
      cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      valid = bands.visible(rows, cols, tk=tk, window=window)
      a_qk = jnp.where(valid, a_qk, NEG)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(a_qk, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p_qk = jnp.exp(a_qk - m_new)
    if masked:
      p_qk = jnp.where(valid, p_qk, 0.0)
    m_sc[...] = m_new
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p_qk, axis=1, keepdims=True)
    q2_sc[...] = alpha * alpha * q2_sc[...] + jnp.sum(p_qk * p_qk, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
        p_qk.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=prec,
        preferred_element_type=jnp.float32)

  band = bands.keys_of_query_block(i, bq=bq, bk=bk, tk=tk, q_offset=q_offset, window=window)
  _masked_and_full(j, band, body)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_sc[...]
    l_safe = jnp.where(l > 0.0, l, 1.0)
    o_ref[...] = acc_sc[...] / l_safe
    lse_ref[...] = m_sc[...] + jnp.log(l_safe)
    p2_ref[...] = q2_sc[...] / (l_safe * l_safe)


def attention_stats_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None, q_offset=0,
                        block_k=None, config: BlockConfig = DEFAULT_CONFIG):
  """Forward kernel: (o_BTHD f32, lse_BTH f32, p2_BTH f32)."""
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R = H // G
  bq = _fit_block(config.block_q, Tq)
  bk = _fit_block(block_k or config.block_k, Tk)
  nq, nk = pl.cdiv(Tq, bq), pl.cdiv(Tk, bk)
  q = _head_major(q_BTHD, nq * bq)
  k, v = _head_major(k_BTGD, nk * bk), _head_major(v_BTGD, nk * bk)
  scale = _rows(scale_BTH, nq * bq)
  static = _static_offset(q_offset)

  def kv_index(b, h, i, j, off_ref):
    band = bands.keys_of_query_block(i, bq=bq, bk=bk, tk=Tk,
                                     q_offset=_offset_of(static, off_ref), window=window)
    return b, h // R, _clamp(j, band, nk), 0

  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, _: (b, h, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, _: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D), kv_index)
  f32 = jnp.float32
  o, lse, p2 = _call(
      functools.partial(_fwd_kernel, bq=bq, bk=bk, tk=Tk, window=window),
      q_offset=q_offset, config=config,
      grid=(B, H, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, row_spec],
      out_specs=[q_spec, row_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, nq * bq, D), f32),
                 jax.ShapeDtypeStruct((B, H, nq * bq, 1), f32),
                 jax.ShapeDtypeStruct((B, H, nq * bq, 1), f32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, 1), f32),
                      pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, D), f32)],
      name="polar_attention_fwd_tpu",
  )(q, k, v, scale)
  to_bth = lambda x: jnp.swapaxes(x[:, :, :Tq, 0], 1, 2)
  return jnp.swapaxes(o[:, :, :Tq], 1, 2), to_bth(lse), to_bth(p2)


# ----------------------------------------------------------------------------- backward


def _ds_block(q, k, v, do, scale, lse, delta, cq, *, rows0, cols0, bq, bk, tk, window, masked):
  """pi, ds for a (bq, bk) block; rows0/cols0 are absolute positions of the first row/key."""
  prec = _precision(q.dtype)
  a_qk = scale * lax.dot_general(q, k, _NT, precision=prec, preferred_element_type=jnp.float32)
  if masked:
    rows = rows0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = cols0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    a_qk = jnp.where(bands.visible(rows, cols, tk=tk, window=window), a_qk, NEG)
  pi_qk = jnp.exp(a_qk - lse)
  dp_qk = lax.dot_general(do, v, _NT, precision=prec, preferred_element_type=jnp.float32)
  ds_qk = pi_qk * (dp_qk - delta) + cq * pi_qk * pi_qk
  return pi_qk, ds_qk


def _dq_kernel(q_ref, k_ref, v_ref, s_ref, do_ref, lse_ref, dl_ref, cq_ref, dq_ref, dsc_ref,
               acc_sc, *, bq, bk, tk, q_offset, window):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def body(masked):
    k = k_ref[...]
    _, ds_qk = _ds_block(q_ref[...], k, v_ref[...], do_ref[...], s_ref[...], lse_ref[...],
                         dl_ref[...], cq_ref[...], rows0=q_offset + i * bq, cols0=j * bk,
                         bq=bq, bk=bk, tk=tk, window=window, masked=masked)
    acc_sc[...] += lax.dot_general(ds_qk.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                   precision=_precision(k.dtype),
                                   preferred_element_type=jnp.float32)

  band = bands.keys_of_query_block(i, bq=bq, bk=bk, tk=tk, q_offset=q_offset, window=window)
  _masked_and_full(j, band, body)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    acc = acc_sc[...]
    dq_ref[...] = (s_ref[...] * acc).astype(dq_ref.dtype)
    dsc_ref[...] = jnp.sum(acc * q_ref[...].astype(jnp.float32), axis=1, keepdims=True)


def _dkv_kernel(q_ref, k_ref, v_ref, s_ref, do_ref, lse_ref, dl_ref, cq_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, bq, bk, nq, tk, q_offset, window):
  j, t = pl.program_id(2), pl.program_id(3)
  i = t % nq  # query block; t // nq is the head inside the GQA group

  @pl.when(t == 0)
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def body(masked):
    q, do, scale = q_ref[...], do_ref[...], s_ref[...]
    pi_qk, ds_qk = _ds_block(q, k_ref[...], v_ref[...], do, scale, lse_ref[...], dl_ref[...],
                             cq_ref[...], rows0=q_offset + i * bq, cols0=j * bk, bq=bq, bk=bk,
                             tk=tk, window=window, masked=masked)
    prec = _precision(q.dtype)
    dv_sc[...] += lax.dot_general(pi_qk.astype(do.dtype), do, _TN, precision=prec,
                                  preferred_element_type=jnp.float32)
    dk_sc[...] += lax.dot_general((scale * ds_qk).astype(q.dtype), q, _TN, precision=prec,
                                  preferred_element_type=jnp.float32)

  band = bands.queries_of_key_block(j, bq=bq, bk=bk, nq=nq, tk=tk, q_offset=q_offset,
                                    window=window)
  _masked_and_full(i, band, body)

  @pl.when(t == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD, delta_BTH, cq_BTH,
                        *, window=None, q_offset=0, block_k=None,
                        config: BlockConfig = DEFAULT_CONFIG):
  """Backward kernels: (dq, dk, dv in the input dtype, dscale f32), dK/dV summed over GQA."""
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R = H // G
  f32 = jnp.float32
  common = dict(tk=Tk, window=window)
  static = _static_offset(q_offset)

  def padded(bq, bk):
    tq_pad, tk_pad = pl.cdiv(Tq, bq) * bq, pl.cdiv(Tk, bk) * bk
    return (_head_major(q_BTHD, tq_pad), _head_major(k_BTGD, tk_pad),
            _head_major(v_BTGD, tk_pad), _rows(scale_BTH, tq_pad),
            _head_major(do_BTHD.astype(q_BTHD.dtype), tq_pad), _rows(lse_BTH, tq_pad, PAD_LSE),
            _rows(delta_BTH, tq_pad), _rows(cq_BTH, tq_pad))

  # dQ (+ dscale): grid (B, H, nq, nk), key axis last.
  bq = _fit_block(config.dq_block_q, Tq)
  bk = _fit_block(block_k or config.dq_block_k, Tk)
  nq, nk = pl.cdiv(Tq, bq), pl.cdiv(Tk, bk)

  def kv_index(b, h, i, j, off_ref, bq=bq, bk=bk, nk=nk):
    band = bands.keys_of_query_block(i, bq=bq, bk=bk, q_offset=_offset_of(static, off_ref),
                                     **common)
    return b, h // R, _clamp(j, band, nk), 0

  q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, j, _: (b, h, i, 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, _: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, D), kv_index)
  dq, dscale = _call(
      functools.partial(_dq_kernel, bq=bq, bk=bk, **common), q_offset=q_offset, config=config,
      grid=(B, H, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, row_spec, q_spec, row_spec, row_spec, row_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((B, H, nq * bq, D), q_BTHD.dtype),
                 jax.ShapeDtypeStruct((B, H, nq * bq, 1), f32)],
      scratch_shapes=[pltpu.VMEM((bq, D), f32)], name="polar_attention_dq_tpu",
  )(*padded(bq, bk))

  # dK/dV: grid (B, G, nk, R * nq); the last axis walks the group's heads and query blocks.
  bq = _fit_block(config.dkv_block_q, Tq)
  bk = _fit_block(block_k or config.dkv_block_k, Tk)
  nq, nk = pl.cdiv(Tq, bq), pl.cdiv(Tk, bk)

  def q_index(b, g, j, t, off_ref, bq=bq, bk=bk, nq=nq):
    band = bands.queries_of_key_block(j, bq=bq, bk=bk, nq=nq,
                                      q_offset=_offset_of(static, off_ref), **common)
    return b, g * R + t // nq, _clamp(t % nq, band, nq), 0

  q_spec = pl.BlockSpec((None, None, bq, D), q_index)
  row_spec = pl.BlockSpec((None, None, bq, 1), q_index)
  k_spec = pl.BlockSpec((None, None, bk, D), lambda b, g, j, t, _: (b, g, j, 0))
  dk, dv = _call(
      functools.partial(_dkv_kernel, bq=bq, bk=bk, nq=nq, **common), q_offset=q_offset,
      config=config,
      grid=(B, G, nk, R * nq),
      in_specs=[q_spec, k_spec, k_spec, row_spec, q_spec, row_spec, row_spec, row_spec],
      out_specs=[k_spec, k_spec],
      out_shape=[jax.ShapeDtypeStruct((B, G, nk * bk, D), k_BTGD.dtype),
                 jax.ShapeDtypeStruct((B, G, nk * bk, D), v_BTGD.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, D), f32), pltpu.VMEM((bk, D), f32)],
      name="polar_attention_dkv_tpu",
  )(*padded(bq, bk))
  return (jnp.swapaxes(dq[:, :, :Tq], 1, 2), jnp.swapaxes(dk[:, :, :Tk], 1, 2),
          jnp.swapaxes(dv[:, :, :Tk], 1, 2), jnp.swapaxes(dscale[:, :, :Tq, 0], 1, 2))
