"""Pallas-Triton (GPU) kernels of the Polar core op `attention_stats` (KERNELS.md §2a).

Forward: `(o f32, lse f32, p2 f32) = attention_stats(q, k, v, scale)` — tempered softmax
attention with the extra row statistic p2 = sum pi^2 (online: Q2 <- alpha^2 Q2 + sum p^2,
p2 = Q2 / L^2). Backward: a dQ kernel (query-parallel; also gives dscale) and a dK/dV kernel
(key-parallel; walks the GQA group's query heads and the query tiles in the band, so dK/dV are
summed in-kernel), both with ds = pi (dp - delta') + cq pi^2. `BlockConfig.bwd_impl="fused"`
selects one key-parallel kernel instead that also adds each (query tile, key tile)'s dQ into an
f32 buffer with relaxed-order atomics (5 tile matmuls instead of 7; dq's last bits then depend
on the order of the adds). dK/dV and fused kernels can walk the group's (head, query tile)
pairs in one loop per phase (`dkv_flat_heads`, `fused_flat_heads`): far fewer register spills.

Every kernel reads the model's batch-major layout `[B, T, heads, D]` directly (strided rows,
no transposes); the backward's per-row vectors go as [B, H, T]. Lengths are padded to a
multiple of the block; padded keys are masked, padded query rows get lse = +1e30 so that
pi = 0 for them in the backward. Query tiles run heaviest (latest) first.

Decode (few query rows over a long prefix, Tq * R <= 64): a split-K forward packs the GQA
group's heads x positions into the rows of one tile, splits the key band over programs and
merges the partial (m, L, Q2, acc) in XLA (Q2 with weight 2^(2 (m_s - m*))).

`q_offset` may be a Python int (folded into the kernels) or a traced int32 scalar (passed as a
one-element input). Launch defaults come from a sweep on an H200
(bench/results/polar_attention_h200*.json).

Each key (or query) loop runs only over the blocks in the causal/window band, split in three
phases: masked edge blocks, unmasked interior blocks, masked edge blocks. Logits are kept in
base 2 (`scale * log2 e` folded into the per-row scale); statistics are fp32; dot operands are
in the input dtype (bf16 in training) with fp32 accumulation.

The Triton backend of Pallas is deprecated in JAX 0.11 but works; its warning is silenced here.
On a machine without a GPU the kernels run in interpret mode (tests).

Dimension glossary
  B batch   Tq/Tk query/key rows   H query heads   G KV heads   R = H // G   D head dim
  bq/bk query/key block   nq/nk number of query/key blocks (after padding)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.polar_attention import reference

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

try:  # a relaxed-order atomic add (Pallas' own atomics are acquire-release): private JAX APIs
  from jax._src import core as _jax_core
  from jax._src.lib.triton import dialect as _tt
  from jax._src.pallas.triton import lowering as _tl
  from jax._src.pallas.triton import primitives as _tp
  from jax._src.state import discharge as _state_discharge
  from jax._src.state import primitives as _state_primitives
  from jax._src.state import indexing as _indexing
except ImportError:  # another JAX version: the fused backward uses pl's acq_rel atomic_add
  _relaxed_add_p = None
else:
  _relaxed_add_p = _jax_core.Primitive("polar_relaxed_atomic_add")
  _relaxed_add_p.def_effectful_abstract_eval(
      functools.partial(_tp._atomic_abstract_eval, atomic_type=_tp.AtomicOpType.ADD))
  _state_discharge.register_discharge_rule(_relaxed_add_p)(
      functools.partial(_tp._atomic_rmw_discharge_rule, atomic_type=_tp.AtomicOpType.ADD))

  @_tl.register_lowering(_relaxed_add_p)
  def _relaxed_add_lowering(ctx, *args_flat, args_tree):
    """x[idx] += val as tt.atomic_rmw fadd with relaxed memory order (the kernel only needs
    the sums once it has finished, so no acquire/release fences per element)."""
    block_info, *_ = ctx.block_infos
    ptr, indexers, val, mask = args_tree.unflatten(args_flat)
    *_, value_aval, _ = args_tree.unflatten(ctx.avals_in)
    if len(indexers) != 1 or not isinstance(indexers[0], _indexing.NDIndexer) or mask is not None:
      raise NotImplementedError("relaxed atomic add: one NDIndexer, no mask")
    ptr = _tl._compute_pointers_from_indices(ptr, block_info, indexers[0])
    val = _tl._ensure_ir_value(val, value_aval)
    return _tl._atomic_rmw(_tt.RMWOp.FADD, ptr, val, semantic=_tt.MemSemantic.RELAXED)


def _atomic_add(ref, idx, val, *, relaxed: bool):
  """ref[idx] += val atomically (float); relaxed order when available and asked for."""
  if not relaxed or _relaxed_add_p is None:
    return pltriton.atomic_add(ref, idx, val)
  ref, transforms = _state_primitives.get_ref_and_transforms(ref, idx, "atomic_rmw")
  flat, tree = jax.tree_util.tree_flatten((ref, transforms, val, None))
  return _relaxed_add_p.bind(*flat, args_tree=tree)

LOG2E = math.log2(math.e)
NEG = reference.MASK_SENTINEL  # finite sentinel for invisible logits (spec §3.4)
PAD_LSE = 1e30  # lse of padded query rows: exp(s - lse) = 0, so they add nothing to dK/dV


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tile sizes and launch parameters (powers of two >= 16 for the blocks).

  Defaults: the fastest of a per-kernel sweep at B=4, T=8K, 8/2 heads, D=128, bf16 on an H200
  (bench/results/polar_attention_h200_run2_sweep.json).
  """
  block_q: int = 128
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  dq_block_q: int = 128
  dq_block_k: int = 128
  dq_num_warps: int = 8
  dq_num_stages: int = 2
  dkv_block_q: int = 64
  dkv_block_k: int = 128
  dkv_num_warps: int = 8
  dkv_num_stages: int = 3
  dkv_flat_heads: bool = True  # True: one loop per phase over (head, query tile) pairs
  # Split-K decode forward (few query rows, long context): used when Tq * R <= decode_max_rows
  # and the key band holds at least decode_min_keys keys.
  decode_max_rows: int = 64
  decode_min_keys: int = 2048
  decode_block_k: int = 128
  decode_num_warps: int = 4
  decode_num_stages: int = 3
  decode_target_programs: int = 264  # ~2 per SM on an H100/H200
  # Backward: "split" = dQ kernel + dK/dV kernel (each recomputes the logits, pi and dP);
  # "fused" = one key-parallel kernel that also adds each tile's dQ into an f32 buffer with
  # atomics (5 tile matmuls instead of 7; dQ summation order, so its last bits, vary run to run).
  bwd_impl: str = "split"
  fused_block_q: int = 64
  fused_block_k: int = 128
  fused_num_warps: int = 8
  fused_num_stages: int = 3  # as the dK/dV kernel's best (3 stages: 2.97 ms, 2: 3.81 ms)
  # Query heads per fused program: 0 = the whole GQA group (dK/dV summed in-kernel); a divisor
  # of H // G gives more, smaller programs and per-head-block f32 dK/dV summed in XLA.
  fused_heads_per_program: int = 0
  fused_relaxed_atomics: bool = True  # False: Pallas' acquire-release atomic_add
  fused_flat_heads: bool = True  # one loop per phase over (head, query tile); False: per head


DEFAULT_CONFIG = BlockConfig()


def is_supported(q, k, v, *, window=None, q_offset=0) -> bool:
  """True when these kernels can run this call (else the api falls back to XLA)."""
  D = q.shape[-1]
  return (q.ndim == 4 and k.shape == v.shape and k.shape[-1] == D
          and D >= 16 and D & (D - 1) == 0 and D <= 256
          and q.shape[2] % k.shape[2] == 0
          and (isinstance(q_offset, int) or jnp.ndim(q_offset) == 0)
          and (window is None or isinstance(window, int))
          and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                     jnp.dtype(jnp.float32)))


def _interpret() -> bool:
  return jax.default_backend() != "gpu"


def _fit_block(block: int, t: int) -> int:
  """Largest useful power-of-two block: min(block, next_pow2(t)), at least 16 (Triton dots)."""
  return max(16, min(block, pl.next_power_of_2(t)))


def _pad_axis1(x, t_pad, value=0.0):
  t = x.shape[1]
  if t == t_pad:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, t_pad - t)
  return jnp.pad(x, pad, constant_values=value)


def _rows_bht(x_BTH, t_pad, value=0.0):
  """Per-row vector [B, T, H] -> fp32 [B, H, t_pad] (contiguous row loads in the kernels)."""
  return _pad_axis1(x_BTH.astype(jnp.float32), t_pad, value).transpose(0, 2, 1)


def _static_offset(q_offset):
  """The offset as a Python int when static, else None (then kernels read it from a ref)."""
  return int(q_offset) if isinstance(q_offset, int) else None


def _offset_arg(q_offset):
  """The offset as an int32[1] kernel input (read only when it is traced)."""
  return jnp.asarray(q_offset, jnp.int32).reshape(1)


OFFSET_SPEC = pl.BlockSpec((1,), lambda *_: (0,))


def _with_offset(kernel, q_offset):
  """Kernel taking the offset ref first: the static offset if known, else the loaded one."""
  def wrapped(off_ref, *refs):
    kernel(*refs, q_offset=q_offset if q_offset is not None else off_ref[0])
  return wrapped


def _cdiv(x, n: int):
  """ceil(x / n) for a traced x >= 0."""
  return lax.div(x + (n - 1), n)


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _visible(rows, cols, *, tk, window):
  """bool mask of visible (row, key) pairs; rows/cols are absolute positions, broadcastable."""
  valid = (cols <= rows) & (cols < tk)
  if window is not None:
    valid = valid & (cols > rows - window)
  return valid


def _dot(a, b, *, trans_a=False, trans_b=False):
  """MXU/tensor-core dot with fp32 accumulation (full fp32 precision for fp32 operands)."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return pltriton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


def _key_block_logits(q, k_ref, v_ref, scale2_q, rows_q, start, bk, *, tk, window, masked):
  """Key/value block at `start` and its base-2 logits `scale2 * q k^T` for the query rows.

  With `masked`, invisible (row, key) pairs get the finite sentinel; returns (k, v, s, valid)
  with `valid` None when unmasked.
  """
  k = k_ref[pl.ds(start, bk), :]
  v = v_ref[pl.ds(start, bk), :]
  s_qk = _dot(q, k, trans_b=True) * scale2_q[:, None]
  valid = None
  if masked:
    valid = _visible(rows_q[:, None], (start + jnp.arange(bk))[None, :], tk=tk, window=window)
    s_qk = jnp.where(valid, s_qk, NEG)
  return k, v, s_qk, valid


def _key_band(p0, p1, *, bk, tk, window):
  """Key blocks for query rows at positions [p0, p1] -> (lo, full_lo, full_hi, hi).

  Blocks [full_lo, full_hi) are visible to every row (no mask); [lo, full_lo) and
  [full_hi, hi) need the mask; blocks outside [lo, hi) are wholly invisible and skipped.
  """
  hi = _cdiv(jnp.minimum(p1 + 1, tk), bk)
  if window is None:
    lo = jnp.int32(0)
    full_lo = jnp.int32(0)
  else:
    lo = lax.div(jnp.maximum(p0 - window + 1, 0), bk)
    full_lo = _cdiv(jnp.maximum(p1 - window + 1, 0), bk)
  full_hi = jnp.minimum(lax.div(p0 + 1, bk), tk // bk)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _query_band(k0, k1, *, bq, nq, q_offset, tk_block_ok, window):
  """Query blocks whose rows see keys [k0, k1] -> (lo, full_lo, full_hi, hi) as in _key_band."""
  lo = lax.div(jnp.maximum(k0 - q_offset, 0), bq)
  full_lo = _cdiv(jnp.maximum(k1 - q_offset, 0), bq)
  if window is None:
    hi = jnp.int32(nq)
    full_hi = jnp.int32(nq)
  else:
    hi = jnp.minimum(_cdiv(jnp.maximum(k1 + window - q_offset, 0), bq), nq)
    full_hi = _cdiv(jnp.maximum(k0 + window - q_offset - bq + 1, 0), bq)
  full_hi = jnp.where(tk_block_ok, full_hi, 0)  # a key block crossing Tk is always masked
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _rev_q(nq: int, H: int, D: int | None):
  """Index map of a per-(head, query tile) block for the grid (B*H, nq), query tiles visited
  last-first: grid axis 0 is scheduled fastest, so all heads of the heaviest (latest, under
  causal masking) tile run first, which shortens the tail; heads sharing K/V run together."""
  def index(bh, i):
    return (bh // H, nq - 1 - i, bh % H) + (() if D is None else (0,))
  return index


def _three_phase(lo, full_lo, full_hi, hi, body, carry):
  """Runs body(idx, carry, masked) over [lo, full_lo) masked, [full_lo, full_hi), rest masked."""
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _heads_three_phase(band, heads, body, carry, *, flat):
  """Runs body(qb, r, carry, masked) for heads r < `heads` over the query band's 3 phases.

  flat: one loop per phase over (head, query tile) pairs (3 loops; the pipeline fills once
  per phase); else one `_three_phase` per head (3 * heads loops, unrolled in the kernel).
  """
  if not flat:
    for r in range(heads):
      # head index as an int32 scalar: the interpret-mode atomic discharge rule needs .shape
      head_body = lambda qb, carry, masked, r=jnp.int32(r): body(qb, r, carry, masked)
      carry = _three_phase(*band, head_body, carry)
    return carry
  lo, full_lo, full_hi, hi = band
  for a, b, masked in ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True)):
    n = b - a

    def pair(i, carry, a=a, n=n, masked=masked):  # i -> (head i // n, query tile a + i % n)
      return body(a + lax.rem(i, n), lax.div(i, n), carry, masked)

    carry = lax.fori_loop(0, heads * n, pair, carry)
  return carry


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, s_ref, o_ref, lse_ref, p2_ref, *, bq, bk, tk,
                q_offset, window):
  i = pl.num_programs(1) - 1 - pl.program_id(1)  # must match _rev_q in the BlockSpecs
  q = q_ref[...]
  scale2_q = s_ref[...].astype(jnp.float32) * LOG2E
  p0 = q_offset + i * bq
  rows_q = p0 + jnp.arange(bq)

  def body(kb, carry, masked):
    m_q, l_q, q2_q, acc_qd = carry
    start = pl.multiple_of(kb * bk, bk)
    k, v, s_qk, valid = _key_block_logits(q, k_ref, v_ref, scale2_q, rows_q, start, bk, tk=tk,
                                          window=window, masked=masked)
    m_new = jnp.maximum(m_q, jnp.max(s_qk, axis=1))
    alpha = jnp.exp2(m_q - m_new)
    p_qk = jnp.exp2(s_qk - m_new[:, None])
    if masked:
      p_qk = jnp.where(valid, p_qk, 0.0)
    l_q = alpha * l_q + jnp.sum(p_qk, axis=1)
    q2_q = alpha * alpha * q2_q + jnp.sum(p_qk * p_qk, axis=1)
    acc_qd = acc_qd * alpha[:, None] + _dot(p_qk.astype(v.dtype), v)
    return m_new, l_q, q2_q, acc_qd

  band = _key_band(p0, p0 + bq - 1, bk=bk, tk=tk, window=window)
  zeros_q = jnp.zeros((bq,), jnp.float32)
  init = (zeros_q + NEG, zeros_q, zeros_q, jnp.zeros(q.shape, jnp.float32))
  m_q, l_q, q2_q, acc_qd = _three_phase(*band, body, init)
  l_safe = jnp.where(l_q > 0.0, l_q, 1.0)
  o_ref[...] = acc_qd / l_safe[:, None]
  lse_ref[...] = (m_q + jnp.log2(l_safe)) / LOG2E
  p2_ref[...] = q2_q / (l_safe * l_safe)


# ----------------------------------------------------------------------------- split-K decode


def _decode_kernel(q_ref, k_ref, v_ref, s_ref, acc_ref, m_ref, l_ref, q2_ref, *, rows, R,
                   tq, bk, tk, q_offset, window, band_lo, blocks_per_split, band_hi):
  """One (batch, KV head, key split): the group's R heads x Tq positions packed as rows."""
  s_idx = pl.program_id(1)
  q = q_ref[...]
  scale2_m = s_ref[...] * LOG2E
  pos_m = q_offset + jnp.minimum(lax.div(jnp.arange(rows), R), tq - 1)
  lo = band_lo // bk + s_idx * blocks_per_split
  hi = jnp.minimum(lo + blocks_per_split, _cdiv(jnp.int32(band_hi), bk))
  # Intersect with the rows' own band (a no-op for a static offset, needed for a traced one).
  hi = jnp.minimum(hi, _cdiv(jnp.minimum(q_offset + tq, tk), bk))
  if window is not None:
    lo = jnp.maximum(lo, lax.div(jnp.maximum(q_offset - window + 1, 0), bk))

  def body(kb, carry):
    m_m, l_m, q2_m, acc_md = carry
    start = pl.multiple_of(kb * bk, bk)
    k, v, s_mk, valid = _key_block_logits(q, k_ref, v_ref, scale2_m, pos_m, start, bk, tk=tk,
                                          window=window, masked=True)
    m_new = jnp.maximum(m_m, jnp.max(s_mk, axis=1))
    alpha = jnp.exp2(m_m - m_new)
    p_mk = jnp.where(valid, jnp.exp2(s_mk - m_new[:, None]), 0.0)
    l_m = alpha * l_m + jnp.sum(p_mk, axis=1)
    q2_m = alpha * alpha * q2_m + jnp.sum(p_mk * p_mk, axis=1)
    acc_md = acc_md * alpha[:, None] + _dot(p_mk.astype(v.dtype), v)
    return m_new, l_m, q2_m, acc_md

  zeros_m = jnp.zeros((rows,), jnp.float32)
  m_m, l_m, q2_m, acc_md = lax.fori_loop(
      lo, hi, body, (zeros_m + NEG, zeros_m, zeros_m, jnp.zeros(q.shape, jnp.float32)))
  acc_ref[...] = acc_md
  m_ref[...] = m_m
  l_ref[...] = l_m
  q2_ref[...] = q2_m


def _use_decode(Tq, R, Tk, window, q_offset, config) -> bool:
  off = _static_offset(q_offset)
  if off is None:  # traced offset: the band is at most min(Tk, window)
    band = Tk if window is None else min(Tk, window)
  else:
    band = min(Tk, off + Tq) - (0 if window is None else max(0, off - window + 1))
  return Tq * R <= config.decode_max_rows and band >= config.decode_min_keys


def _decode_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window, q_offset, config):
  """Split-K (flash-decoding) forward for few query rows over a long KV prefix.

  The R query heads of a KV head and the Tq positions are packed into M = Tq*R rows (padded to
  a power of two >= 16), the key band is split over programs, and the partial statistics
  (m, L, Q2 in base 2, unnormalized acc) are merged here: m* = max m_s, w_s = 2^(m_s - m*),
  L = sum w_s L_s, Q2 = sum w_s^2 Q2_s, acc = sum w_s acc_s.
  """
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R = H // G
  rows = max(16, pl.next_power_of_2(Tq * R))
  bk = _fit_block(config.decode_block_k, Tk)
  tk_pad = pl.cdiv(Tk, bk) * bk
  off = _static_offset(q_offset)
  band_lo = 0 if (window is None or off is None) else max(0, off - window + 1)
  band_hi = Tk if off is None else min(Tk, off + Tq)
  n_blocks = pl.cdiv(band_hi, bk) - band_lo // bk
  n_split = max(1, min(n_blocks, pl.cdiv(config.decode_target_programs, B * G)))
  per_split = pl.cdiv(n_blocks, n_split)
  n_split = pl.cdiv(n_blocks, per_split)

  def pack(x_BTH_):  # [B, Tq, H, ...] -> [B*G, rows, ...], row = t * R + r
    x = x_BTH_.reshape((B, Tq, G, R) + x_BTH_.shape[3:])
    x = jnp.moveaxis(x, 2, 1).reshape((B * G, Tq * R) + x_BTH_.shape[3:])
    return _pad_axis1(x, rows)

  q = pack(q_BTHD)
  scale = pack(scale_BTH.astype(jnp.float32))
  k, v = _pad_axis1(k_BTGD, tk_pad), _pad_axis1(v_BTGD, tk_pad)
  kv_spec = pl.BlockSpec((None, tk_pad, None, D), lambda bg, s: (bg // G, 0, bg % G, 0))
  part_md = pl.BlockSpec((None, None, rows, D), lambda bg, s: (bg, s, 0, 0))
  part_m = pl.BlockSpec((None, None, rows), lambda bg, s: (bg, s, 0))
  f32 = jnp.float32
  acc, m, l, q2 = pl.pallas_call(
      _with_offset(functools.partial(_decode_kernel, rows=rows, R=R, tq=Tq, bk=bk, tk=Tk,
                                     window=window, band_lo=band_lo, blocks_per_split=per_split,
                                     band_hi=band_hi), off),
      grid=(B * G, n_split),
      in_specs=[OFFSET_SPEC, pl.BlockSpec((None, rows, D), lambda bg, s: (bg, 0, 0)), kv_spec,
                kv_spec, pl.BlockSpec((None, rows), lambda bg, s: (bg, 0))],
      out_specs=[part_md, part_m, part_m, part_m],
      out_shape=[jax.ShapeDtypeStruct((B * G, n_split, rows, D), f32)]
      + [jax.ShapeDtypeStruct((B * G, n_split, rows), f32)] * 3,
      compiler_params=pltriton.CompilerParams(num_warps=config.decode_num_warps,
                                              num_stages=config.decode_num_stages),
      interpret=_interpret(), name="polar_attention_decode",
  )(_offset_arg(q_offset), q, k, v, scale)
  m_max = jnp.max(m, axis=1, keepdims=True)
  w = jnp.exp2(m - m_max)
  l_tot = jnp.sum(w * l, axis=1)
  l_safe = jnp.where(l_tot > 0.0, l_tot, 1.0)
  o = jnp.sum(w[..., None] * acc, axis=1) / l_safe[..., None]
  lse = (m_max[:, 0] + jnp.log2(l_safe)) / LOG2E
  p2 = jnp.sum(w * w * q2, axis=1) / (l_safe * l_safe)

  def unpack(x):  # [B*G, rows, ...] -> [B, Tq, H, ...]
    x = x[:, :Tq * R].reshape((B, G, Tq, R) + x.shape[2:])
    return jnp.moveaxis(x, 1, 2).reshape((B, Tq, H) + x.shape[4:])

  return unpack(o), unpack(lse), unpack(p2)


# ----------------------------------------------------------------------------- forward entry


def attention_stats_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None, q_offset=0,
                        block_k=None, config: BlockConfig = DEFAULT_CONFIG):
  """Forward kernel: (o_BTHD f32, lse_BTH f32, p2_BTH f32).

  Few query rows over a long prefix (decode, Tq * R <= config.decode_max_rows) take the
  split-K kernel; everything else the query-tile kernel.
  """
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  R = H // G
  if _use_decode(Tq, R, Tk, window, q_offset, config):
    return _decode_fwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window, q_offset=q_offset,
                       config=config)
  bq = _fit_block(config.block_q, Tq)
  bk = _fit_block(block_k or config.block_k, Tk)
  tq_pad, tk_pad = pl.cdiv(Tq, bq) * bq, pl.cdiv(Tk, bk) * bk
  q = _pad_axis1(q_BTHD, tq_pad)
  k, v = _pad_axis1(k_BTGD, tk_pad), _pad_axis1(v_BTGD, tk_pad)
  scale = _pad_axis1(scale_BTH.astype(jnp.float32), tq_pad)

  kernel = _with_offset(functools.partial(_fwd_kernel, bq=bq, bk=bk, tk=Tk, window=window),
                        _static_offset(q_offset))
  nq = tq_pad // bq
  row_spec = pl.BlockSpec((None, bq, None), _rev_q(nq, H, None))
  tile_spec = pl.BlockSpec((None, bq, None, D), _rev_q(nq, H, D))
  kv_spec = pl.BlockSpec((None, tk_pad, None, D), lambda bh, i: (bh // H, 0, (bh % H) // R, 0))
  o, lse, p2 = pl.pallas_call(
      kernel,
      grid=(B * H, nq),
      in_specs=[OFFSET_SPEC, tile_spec, kv_spec, kv_spec, row_spec],
      out_specs=[tile_spec, row_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((B, tq_pad, H, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, tq_pad, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, tq_pad, H), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                              num_stages=config.num_stages),
      interpret=_interpret(),
      name="polar_attention_fwd",
  )(_offset_arg(q_offset), q, k, v, scale)
  return o[:, :Tq], lse[:, :Tq], p2[:, :Tq]


# ----------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, s_ref, do_ref, lse_ref, dl_ref, cq_ref, dq_ref, dsc_ref,
               *, bq, bk, tk, q_offset, window):
  i = pl.num_programs(1) - 1 - pl.program_id(1)  # must match _rev_q in the BlockSpecs
  q = q_ref[...]
  do = do_ref[...]
  scale_q = s_ref[...]
  scale2_q = scale_q * LOG2E
  lse2_q = lse_ref[...] * LOG2E
  delta_q = dl_ref[...]
  cq_q = cq_ref[...]
  p0 = q_offset + i * bq
  rows_q = p0 + jnp.arange(bq)

  def body(kb, acc_qd, masked):
    start = pl.multiple_of(kb * bk, bk)
    k, v, s_qk, _ = _key_block_logits(q, k_ref, v_ref, scale2_q, rows_q, start, bk, tk=tk,
                                      window=window, masked=masked)
    pi_qk = jnp.exp2(s_qk - lse2_q[:, None])
    dp_qk = _dot(do, v, trans_b=True)
    ds_qk = pi_qk * (dp_qk - delta_q[:, None]) + cq_q[:, None] * pi_qk * pi_qk
    return acc_qd + _dot(ds_qk.astype(k.dtype), k)

  band = _key_band(p0, p0 + bq - 1, bk=bk, tk=tk, window=window)
  acc_qd = _three_phase(*band, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (acc_qd * scale_q[:, None]).astype(dq_ref.dtype)
  dsc_ref[...] = jnp.sum(acc_qd * q.astype(jnp.float32), axis=1)


def _dkv_kernel(q_ref, k_ref, v_ref, s_ref, do_ref, lse_ref, dl_ref, cq_ref, dk_ref, dv_ref,
                *, bq, bk, tk, nq, q_offset, window, group, flat):
  kb = pl.program_id(1)
  k = k_ref[...]
  v = v_ref[...]
  k0 = kb * bk
  cols_k = k0 + jnp.arange(bk)
  band = _query_band(k0, k0 + bk - 1, bq=bq, nq=nq, q_offset=q_offset,
                     tk_block_ok=(kb + 1) * bk <= tk, window=window)

  def body(qb, r, carry, masked):  # query tile qb of the group's head r; dK/dV summed here
    dk_kd, dv_kd = carry
    start = pl.multiple_of(qb * bq, bq)
    rows = pl.ds(start, bq)
    q = q_ref.at[rows, r, :][...]
    do = do_ref.at[rows, r, :][...]
    scale_q = s_ref.at[r, rows][...]
    lse2_q = lse_ref.at[r, rows][...] * LOG2E
    delta_q = dl_ref.at[r, rows][...]
    cq_q = cq_ref.at[r, rows][...]
    s_kq = _dot(k, q, trans_b=True) * (scale_q * LOG2E)[None, :]
    if masked:
      valid = _visible((q_offset + start + jnp.arange(bq))[None, :], cols_k[:, None], tk=tk,
                       window=window)
      s_kq = jnp.where(valid, s_kq, NEG)
    pi_kq = jnp.exp2(s_kq - lse2_q[None, :])
    dv_kd = dv_kd + _dot(pi_kq.astype(do.dtype), do)
    dp_kq = _dot(v, do, trans_b=True)
    ds_kq = pi_kq * (dp_kq - delta_q[None, :]) + cq_q[None, :] * pi_kq * pi_kq
    dk_kd = dk_kd + _dot((ds_kq * scale_q[None, :]).astype(q.dtype), q)
    return dk_kd, dv_kd

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk_kd, dv_kd = _heads_three_phase(band, group, body, carry, flat=flat)
  dk_ref[...] = dk_kd.astype(dk_ref.dtype)
  dv_ref[...] = dv_kd.astype(dv_ref.dtype)


def _bwd_dq(off, q, k, v, scale, do, lse, delta, cq, *, H, R, bq, bk, tk, q_offset, window,
            num_warps, num_stages):
  """dQ (+ dscale) kernel on padded inputs: query-parallel, grid (query blocks, B*H)."""
  B, tq_pad, _, D = q.shape
  tk_pad = k.shape[1]
  nq = tq_pad // bq
  row_spec = pl.BlockSpec((None, None, bq), lambda bh, i: (bh // H, bh % H, nq - 1 - i))
  tile_spec = pl.BlockSpec((None, bq, None, D), _rev_q(nq, H, D))
  kv_spec = pl.BlockSpec((None, tk_pad, None, D), lambda bh, i: (bh // H, 0, (bh % H) // R, 0))
  return pl.pallas_call(
      _with_offset(functools.partial(_dq_kernel, bq=bq, bk=bk, tk=tk, window=window), q_offset),
      grid=(B * H, nq),
      in_specs=[OFFSET_SPEC, tile_spec, kv_spec, kv_spec, row_spec, tile_spec, row_spec,
                row_spec, row_spec],
      out_specs=[tile_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((B, tq_pad, H, D), q.dtype),
                 jax.ShapeDtypeStruct((B, H, tq_pad), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=_interpret(), name="polar_attention_bwd_dq",
  )(off, q, k, v, scale, do, lse, delta, cq)


def _bwd_dkv(off, q, k, v, scale, do, lse, delta, cq, *, G, bq, bk, tk, q_offset, window,
             num_warps, num_stages, flat):
  """dK/dV kernel on padded inputs: key-parallel, grid (key blocks, B*G); the kernel walks
  the group's R query heads, so dK/dV are summed over the GQA group in-kernel."""
  B, tq_pad, H, D = q.shape
  tk_pad = k.shape[1]
  R = H // G
  grp_rows = pl.BlockSpec((None, R, tq_pad), lambda bg, j: (bg // G, bg % G, 0))
  grp_tiles = pl.BlockSpec((None, tq_pad, R, D), lambda bg, j: (bg // G, 0, bg % G, 0))
  key_tile = pl.BlockSpec((None, bk, None, D), lambda bg, j: (bg // G, j, bg % G, 0))
  return pl.pallas_call(
      _with_offset(functools.partial(_dkv_kernel, bq=bq, bk=bk, nq=tq_pad // bq, group=R, tk=tk,
                                     window=window, flat=flat), q_offset),
      grid=(B * G, tk_pad // bk),  # early key tiles (most query rows) first
      in_specs=[OFFSET_SPEC, grp_tiles, key_tile, key_tile, grp_rows, grp_tiles, grp_rows, grp_rows,
                grp_rows],
      out_specs=[key_tile, key_tile],
      out_shape=[jax.ShapeDtypeStruct((B, tk_pad, G, D), k.dtype),
                 jax.ShapeDtypeStruct((B, tk_pad, G, D), v.dtype)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=_interpret(), name="polar_attention_bwd_dkv",
  )(off, q, k, v, scale, do, lse, delta, cq)


def _fused_bwd_kernel(q_ref, k_ref, v_ref, s_ref, do_ref, lse_ref, dl_ref, cq_ref, _dq0_ref,
                      dk_ref, dv_ref, dq_ref, *, bq, bk, tk, nq, q_offset, window, heads,
                      relaxed, flat):
  """One key tile x `heads` query heads: dK/dV accumulated in registers, each (query tile,
  key tile)'s unscaled dQ contribution ds^T k atomically added to the f32 buffer dq_ref.

  `flat`: see `_heads_three_phase`.
  """
  kb = pl.program_id(1)
  k = k_ref[...]
  v = v_ref[...]
  k0 = kb * bk
  cols_k = k0 + jnp.arange(bk)
  band = _query_band(k0, k0 + bk - 1, bq=bq, nq=nq, q_offset=q_offset,
                     tk_block_ok=(kb + 1) * bk <= tk, window=window)

  def body(qb, r, carry, masked):
    dk_kd, dv_kd = carry
    start = pl.multiple_of(qb * bq, bq)
    rows = pl.ds(start, bq)
    q = q_ref.at[rows, r, :][...]
    do = do_ref.at[rows, r, :][...]
    scale_q = s_ref.at[r, rows][...]
    delta_q = dl_ref.at[r, rows][...]
    cq_q = cq_ref.at[r, rows][...]
    # base-2 logit minus base-2 lse: one FMA per element
    x_kq = (_dot(k, q, trans_b=True) * (scale_q * LOG2E)[None, :]
            - (lse_ref.at[r, rows][...] * LOG2E)[None, :])
    if masked:
      valid = _visible((q_offset + start + jnp.arange(bq))[None, :], cols_k[:, None], tk=tk,
                       window=window)
      x_kq = jnp.where(valid, x_kq, NEG)
    pi_kq = jnp.exp2(x_kq)
    dv_kd = dv_kd + _dot(pi_kq.astype(do.dtype), do)
    dp_kq = _dot(v, do, trans_b=True)
    ds_kq = pi_kq * (dp_kq - delta_q[None, :] + cq_q[None, :] * pi_kq)
    # dQ before dK: ptxas spills 1.5 KB instead of 2.1 KB (q64 k128, 8 warps, 3 stages)
    dq_qd = _dot(ds_kq.astype(k.dtype), k, trans_a=True)
    _atomic_add(dq_ref, (rows, r, slice(None)), dq_qd, relaxed=relaxed)
    dk_kd = dk_kd + _dot((ds_kq * scale_q[None, :]).astype(q.dtype), q)
    return dk_kd, dv_kd

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk_kd, dv_kd = _heads_three_phase(band, heads, body, carry, flat=flat)
  dk_ref[...] = dk_kd.astype(dk_ref.dtype)
  dv_ref[...] = dv_kd.astype(dv_ref.dtype)


def _fused_heads(config: BlockConfig, R: int) -> int:
  hp = config.fused_heads_per_program or R
  if hp < 1 or R % hp:
    raise ValueError(f"BlockConfig.fused_heads_per_program={config.fused_heads_per_program} "
                     f"must be 0 (the whole group) or a divisor of H // G = {R}")
  return hp


def _bwd_fused(off, q, k, v, scale, do, lse, delta, cq, *, G, hp, bq, bk, tk, q_offset, window,
               num_warps, num_stages, relaxed, flat):
  """Fused backward on padded inputs: grid (B * H/hp head blocks, key blocks). Returns
  (dq_acc f32 = sum_j ds_ij k_j, unscaled, [B, tq_pad, H, D]; dk; dv), dK/dV summed over GQA."""
  B, tq_pad, H, D = q.shape
  tk_pad = k.shape[1]
  R = H // G
  nh, per_g = H // hp, R // hp  # head blocks; head blocks per KV head
  blk_rows = pl.BlockSpec((None, hp, tq_pad), lambda x, j: (x // nh, x % nh, 0))
  blk_tiles = pl.BlockSpec((None, tq_pad, hp, D), lambda x, j: (x // nh, 0, x % nh, 0))
  key_tile = pl.BlockSpec((None, bk, None, D), lambda x, j: (x // nh, j, (x % nh) // per_g, 0))
  part_tile = pl.BlockSpec((None, bk, None, D), lambda x, j: (x // nh, j, x % nh, 0))
  # per_g > 1: each head block writes its own f32 dK/dV partial, summed over the group below
  part_shape = (B, tk_pad, nh, D)
  part_dt = (k.dtype, v.dtype) if per_g == 1 else (jnp.float32, jnp.float32)
  dq0 = jnp.zeros((B, tq_pad, H, D), jnp.float32)
  dk, dv, dq_acc = pl.pallas_call(
      _with_offset(functools.partial(_fused_bwd_kernel, bq=bq, bk=bk, nq=tq_pad // bq, heads=hp,
                                     tk=tk, window=window, relaxed=relaxed, flat=flat),
                 q_offset),
      grid=(B * nh, tk_pad // bk),  # early key tiles (most query rows) first
      in_specs=[OFFSET_SPEC, blk_tiles, key_tile, key_tile, blk_rows, blk_tiles, blk_rows,
                blk_rows, blk_rows, blk_tiles],
      out_specs=[part_tile, part_tile, blk_tiles],
      out_shape=[jax.ShapeDtypeStruct(part_shape, part_dt[0]),
                 jax.ShapeDtypeStruct(part_shape, part_dt[1]),
                 jax.ShapeDtypeStruct(dq0.shape, jnp.float32)],
      input_output_aliases={9: 2},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=_interpret(), name="polar_attention_bwd_fused",
  )(off, q, k, v, scale, do, lse, delta, cq, dq0)
  if per_g > 1:
    dk = dk.reshape(B, tk_pad, G, per_g, D).sum(3).astype(k.dtype)
    dv = dv.reshape(B, tk_pad, G, per_g, D).sum(3).astype(v.dtype)
  return dq_acc, dk, dv


def attention_stats_bwd(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD, delta_BTH, cq_BTH,
                        *, window=None, q_offset=0, block_k=None,
                        config: BlockConfig = DEFAULT_CONFIG, parts=("dq", "dkv")):
  """Backward kernels: (dq, dk, dv in the input dtype, dscale f32), dK/dV summed over GQA.

  `parts` (benchmarks only) runs just one of the two split kernels; the other outputs are
  None (ignored by the fused backward). `config.bwd_impl` picks split or fused kernels.
  """
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  if config.bwd_impl == "fused":
    return _attention_stats_bwd_fused(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD,
                                      delta_BTH, cq_BTH, window=window, q_offset=q_offset,
                                      block_k=block_k, config=config)
  if config.bwd_impl != "split":
    raise ValueError(f"BlockConfig.bwd_impl must be 'split' or 'fused'; got {config.bwd_impl!r}")
  dq_bq = _fit_block(config.dq_block_q, Tq)
  dq_bk = _fit_block(block_k or config.dq_block_k, Tk)
  kv_bq = _fit_block(config.dkv_block_q, Tq)
  kv_bk = _fit_block(block_k or config.dkv_block_k, Tk)
  tq_pad = pl.cdiv(Tq, max(dq_bq, kv_bq)) * max(dq_bq, kv_bq)
  tk_pad = pl.cdiv(Tk, max(dq_bk, kv_bk)) * max(dq_bk, kv_bk)
  args = (_offset_arg(q_offset), _pad_axis1(q_BTHD, tq_pad), _pad_axis1(k_BTGD, tk_pad),
          _pad_axis1(v_BTGD, tk_pad), _rows_bht(scale_BTH, tq_pad),
          _pad_axis1(do_BTHD.astype(q_BTHD.dtype), tq_pad),
          _rows_bht(lse_BTH, tq_pad, PAD_LSE), _rows_bht(delta_BTH, tq_pad),
          _rows_bht(cq_BTH, tq_pad))
  common = dict(tk=Tk, q_offset=_static_offset(q_offset), window=window)
  dq = dk = dv = dscale = None
  if "dq" in parts:
    dq, dscale = _bwd_dq(*args, H=H, R=H // G, bq=dq_bq, bk=dq_bk,
                         num_warps=config.dq_num_warps, num_stages=config.dq_num_stages,
                         **common)
    dq, dscale = dq[:, :Tq], dscale[:, :, :Tq].transpose(0, 2, 1)
  if "dkv" in parts:
    dk, dv = _bwd_dkv(*args, G=G, bq=kv_bq, bk=kv_bk, num_warps=config.dkv_num_warps,
                      num_stages=config.dkv_num_stages, flat=config.dkv_flat_heads, **common)
    dk, dv = dk[:, :Tk], dv[:, :Tk]
  return dq, dk, dv, dscale


def _attention_stats_bwd_fused(q_BTHD, k_BTGD, v_BTGD, scale_BTH, lse_BTH, do_BTHD, delta_BTH,
                               cq_BTH, *, window, q_offset, block_k, config):
  """`attention_stats_bwd` with the fused kernel; dq = scale * dq_acc, dscale = q . dq_acc."""
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  hp = _fused_heads(config, H // G)
  bq = _fit_block(config.fused_block_q, Tq)
  bk = _fit_block(block_k or config.fused_block_k, Tk)
  tq_pad, tk_pad = pl.cdiv(Tq, bq) * bq, pl.cdiv(Tk, bk) * bk
  dq_acc, dk, dv = _bwd_fused(
      _offset_arg(q_offset), _pad_axis1(q_BTHD, tq_pad), _pad_axis1(k_BTGD, tk_pad),
      _pad_axis1(v_BTGD, tk_pad), _rows_bht(scale_BTH, tq_pad),
      _pad_axis1(do_BTHD.astype(q_BTHD.dtype), tq_pad), _rows_bht(lse_BTH, tq_pad, PAD_LSE),
      _rows_bht(delta_BTH, tq_pad), _rows_bht(cq_BTH, tq_pad), G=G, hp=hp, bq=bq, bk=bk, tk=Tk,
      q_offset=_static_offset(q_offset), window=window, num_warps=config.fused_num_warps,
      num_stages=config.fused_num_stages, relaxed=config.fused_relaxed_atomics,
      flat=config.fused_flat_heads)
  dq_acc = dq_acc[:, :Tq]
  dq = (dq_acc * scale_BTH.astype(jnp.float32)[..., None]).astype(q_BTHD.dtype)
  dscale = jnp.sum(dq_acc * q_BTHD.astype(jnp.float32), axis=-1)
  return dq, dk[:, :Tk], dv[:, :Tk], dscale
