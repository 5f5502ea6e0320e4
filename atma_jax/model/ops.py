"""The model's one seam to the kernel library: every kernel call of the model goes through here.

  attention_stats(q, k, v, scale, *, window, q_offset, impl) -> (o f32, lse f32, p2 f32)
  polar_stats / polar_core(q, k, v, v_null, len_gain_raw, null_base, null_slope_raw,
                           mag_beta_raw, *, window, q_offset, impl)
  softmax_attention(q, k, v, *, scale, window, q_offset, impl) -> o_BTHD
  attention_stats_at(q, k, v, scale, q_pos_BT, k_pos_BS, *, window, block_k)
  polar_core_at / softmax_attention_at(q, k, v, ..., q_pos_BT, k_pos_BS, *, window)
      the same over a decode cache, every query row and key at its own absolute position
  gated_delta_rule(q, k, v, log_gamma, beta, *, initial_state, output_final_state, chunk_size,
                   impl) -> (o_BTHV f32, final_state_BHKV f32 | None)
  gated_delta_step(q, k, v, log_gamma, beta, state, *, impl) -> (o_BHV f32, state_BHKV f32)

Same names, signatures and math as the kernel ops in `pallas_kernels.polar_attention` and
`pallas_kernels.gated_delta` (docs/DESIGN.md, "Kernel op contracts"); this module adds the one
thing the mesh-free kernel library leaves to the model: under an active `atma_jax.sharding`
mesh the kernel call runs in `jax.shard_map`, batch over the mesh axes of "batch" and heads over
those of "act_heads". A batch or head count those axes do not divide is replicated (e.g. batch-1
decode on a data-parallel mesh; attention needs both H and G divisible so that each shard holds
whole GQA groups with their KV heads). Batch rows and heads are independent in both ops, so the
shard_map needs no communication. Without a mesh each function is the kernel op itself.

For attention only `attention_stats` and `attention_stats_at` are wrapped; the Polar prologue
and epilogue stay outside the shard_map, as the kernel ops' `stats_fn` hook allows.

Dimension glossary: B batch, T / Tq / Tk rows, H query (memory) heads, G KV heads, D head dim,
K key dim, V value dim of the memory state.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from atma_jax import sharding
from pallas_kernels import gated_delta as gd
from pallas_kernels import polar_attention as pa


def _axes_size(mesh, entry) -> int:
  return sharding.entry_size(mesh, entry)


def _batch_head_axes(mesh, B: int, head_counts: tuple[int, ...]):
  """(batch mesh axes, head mesh axes) for these sizes; None where the axes do not divide."""
  spec = sharding.logical_to_spec(("batch", "seq", "act_heads", "head_dim"), mesh)
  batch, heads = spec[0], spec[2]
  if batch is not None and B % _axes_size(mesh, batch):
    batch = None
  if heads is not None and any(n % _axes_size(mesh, heads) for n in head_counts):
    heads = None
  return batch, heads


def _shard_map(fn, mesh, in_specs, out_specs):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ----------------------------------------------------------------------------- attention

def attention_stats(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None, q_offset=0,
                    impl="auto"):
  """`pallas_kernels.polar_attention.attention_stats`, split over the active mesh."""
  mesh = sharding.current_mesh()
  if mesh is None:
    return pa.attention_stats(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                              q_offset=q_offset, impl=impl)
  pa.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                            q_offset=q_offset)  # errors in global shapes, before shard_map
  batch, heads = _batch_head_axes(mesh, q_BTHD.shape[0], (q_BTHD.shape[2], k_BTGD.shape[2]))
  x_spec, row_spec = P(batch, None, heads, None), P(batch, None, heads)
  stats = functools.partial(pa.attention_stats, window=window, impl=impl)
  args, in_specs = (q_BTHD, k_BTGD, v_BTGD, scale_BTH), (x_spec,) * 3 + (row_spec,)
  if isinstance(q_offset, int):  # stays a Python int: backends specialize on a static offset
    fn = functools.partial(stats, q_offset=q_offset)
  else:  # a traced offset (decode inside a jitted loop) enters replicated
    fn = lambda q, k, v, s, off: stats(q, k, v, s, q_offset=off)  # noqa: E731
    args, in_specs = args + (q_offset,), in_specs + (P(),)
  return _shard_map(fn, mesh, in_specs, (x_spec, row_spec, row_spec))(*args)


def polar_stats(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
                null_slope_raw_H, mag_beta_raw_H, *, window=None, q_offset=0, impl="auto"):
  """`pallas_kernels.polar_attention.polar_stats` (the eval probe's internals), sharded."""
  return pa.polar_stats(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
                        null_slope_raw_H, mag_beta_raw_H, window=window, q_offset=q_offset,
                        impl=impl, stats_fn=attention_stats)


def polar_core(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
               null_slope_raw_H, mag_beta_raw_H, *, window=None, q_offset=0, impl="auto"):
  """`pallas_kernels.polar_attention.polar_core`: (c_BTHD, mag_BTH) in q.dtype, sharded."""
  return pa.polar_core(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
                       null_slope_raw_H, mag_beta_raw_H, window=window, q_offset=q_offset,
                       impl=impl, stats_fn=attention_stats)


def softmax_attention(q_BTHD, k_BTGD, v_BTGD, *, scale, window=None, q_offset=0, impl="auto"):
  """`pallas_kernels.polar_attention.softmax_attention` (NoPE / RoPE cores), sharded."""
  return pa.softmax_attention(q_BTHD, k_BTGD, v_BTGD, scale=scale, window=window,
                              q_offset=q_offset, impl=impl, stats_fn=attention_stats)


def attention_stats_at(q_BTHD, k_BSGD, v_BSGD, scale_BTH, q_pos_BT, k_pos_BS, *, window=None,
                       block_k=None):
  """`pallas_kernels.polar_attention.attention_stats_at`, split over the active mesh: each
  shard reads only its own rows and KV heads of the cache (the one-row GQA-folded products
  contract over G*D, so GSPMD alone would gather the head-sharded cache on every device)."""
  mesh = sharding.current_mesh()
  stats = functools.partial(pa.attention_stats_at, window=window, block_k=block_k)
  if mesh is None:
    return stats(q_BTHD, k_BSGD, v_BSGD, scale_BTH, q_pos_BT, k_pos_BS)
  batch, heads = _batch_head_axes(mesh, q_BTHD.shape[0], (q_BTHD.shape[2], k_BSGD.shape[2]))
  x_spec, row_spec, pos_spec = P(batch, None, heads, None), P(batch, None, heads), P(batch, None)
  return _shard_map(stats, mesh, (x_spec,) * 3 + (row_spec, pos_spec, pos_spec),
                    (x_spec, row_spec, row_spec))(q_BTHD, k_BSGD, v_BSGD, scale_BTH, q_pos_BT,
                                                  k_pos_BS)


def polar_core_at(q_BTHD, k_BSGD, v_BSGD, v_null_HD, len_gain_raw_H, null_base_H,
                  null_slope_raw_H, mag_beta_raw_H, q_pos_BT, k_pos_BS, *, window=None):
  """`pallas_kernels.polar_attention.polar_core_at`: the Polar core over a decode cache at
  per-row positions, (c_BTHD, mag_BTH) in q.dtype, its attention sharded."""
  return pa.polar_core_at(q_BTHD, k_BSGD, v_BSGD, v_null_HD, len_gain_raw_H, null_base_H,
                          null_slope_raw_H, mag_beta_raw_H, q_pos_BT, k_pos_BS, window=window,
                          stats_fn=attention_stats_at)


def softmax_attention_at(q_BTHD, k_BSGD, v_BSGD, q_pos_BT, k_pos_BS, *, scale, window=None):
  """`pallas_kernels.polar_attention.softmax_attention_at`: the NoPE / RoPE core over a decode
  cache at per-row positions, o_BTHD in q.dtype, its attention sharded."""
  return pa.softmax_attention_at(q_BTHD, k_BSGD, v_BSGD, q_pos_BT, k_pos_BS, scale=scale,
                                 window=window, stats_fn=attention_stats_at)


# ----------------------------------------------------------------------------- memory

def gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, *, initial_state=None,
                     output_final_state: bool = False, chunk_size: int = 64,
                     impl: str = "auto"):
  """`pallas_kernels.gated_delta.gated_delta_rule`, split over the active mesh."""
  run = functools.partial(gd.gated_delta_rule, chunk_size=chunk_size, impl=impl)
  mesh = sharding.current_mesh()
  if mesh is None:
    return run(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state=initial_state,
               output_final_state=output_final_state)
  gd.check_gated_delta_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, initial_state)
  batch, heads = _batch_head_axes(mesh, q_BTHK.shape[0], (q_BTHK.shape[2],))
  x_spec, g_spec, s_spec = P(batch, None, heads, None), P(batch, None, heads), \
      P(batch, heads, None, None)
  args = (q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH)
  in_specs = (x_spec,) * 3 + (g_spec,) * 2
  if initial_state is not None:
    args, in_specs = args + (initial_state,), in_specs + (s_spec,)

  def fn(q, k, v, log_gamma, beta, *s0):
    return run(q, k, v, log_gamma, beta, initial_state=s0[0] if s0 else None,
               output_final_state=True)

  o_BTHV, sT_BHKV = _shard_map(fn, mesh, in_specs, (x_spec, s_spec))(*args)
  return o_BTHV, (sT_BHKV if output_final_state else None)


def gated_delta_step(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV, *,
                     impl: str = "auto"):
  """`pallas_kernels.gated_delta.gated_delta_step` (one decode token; the fused in-place kernel
  on GPU), split over the active mesh like `gated_delta_rule`."""
  run = functools.partial(gd.gated_delta_step, impl=impl)
  args = (q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV)
  mesh = sharding.current_mesh()
  if mesh is None:
    return run(*args)
  gd.check_gated_delta_step_shapes(*args)  # errors in global shapes, before shard_map
  batch, heads = _batch_head_axes(mesh, q_BHK.shape[0], (q_BHK.shape[1],))
  x_spec, g_spec, s_spec = P(batch, heads, None), P(batch, heads), P(batch, heads, None, None)
  return _shard_map(run, mesh, (x_spec,) * 3 + (g_spec,) * 2 + (s_spec,),
                    (x_spec, s_spec))(*args)
