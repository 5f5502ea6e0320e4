"""The Polar attention op: one custom VJP and backend dispatch, on plain (per-shard) arrays.

  attention_stats(q, k, v, scale, *, window, q_offset, impl) -> (o f32, lse f32, p2 f32)
  polar_core(q, k, v, v_null, len_gain_raw, null_base, null_slope_raw, mag_beta_raw, ...)
      -> (c_BTHD, mag_BTH) in q.dtype      (spec §3.2 as prologue + attention_stats + epilogue)
  softmax_attention(q, k, v, *, scale, window, q_offset, impl) -> o_BTHD in q.dtype

Backends are modules with `attention_stats_fwd`, `attention_stats_bwd` and `unsupported_reason`
(`xla_streaming`; Pallas `gpu_mosaic` on Hopper, `gpu_triton` on GPU and `tpu` on TPU), chosen
by `pallas_kernels.dispatch` from the `BACKENDS` table (`impl` = "auto" | "pallas" | "xla",
decided at trace time). On a Hopper GPU both Pallas choices take the Mosaic-GPU forward
`gpu_mosaic` (with its Mosaic-GPU backward, same scope) for the calls it supports (training /
prefill: q_offset 0, bf16/f16, D 64 or 128) and `gpu_triton` for the rest (decode, f32, other head
dims, other GPUs).

Mesh-free: every function here works on the arrays it is given. A caller that shards wraps
`attention_stats` in `jax.shard_map` over batch and heads and hands that wrapper to `polar_stats` / `polar_core` / `softmax_attention` as
`stats_fn`, so the jnp prologue and epilogue stay outside the shard_map.

Dimension glossary: B batch, Tq query rows, Tk key rows, H query heads, G KV heads (head h uses
KV head h // (H // G)), D head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.polar_attention import reference

IMPLS = dispatch.IMPLS

_P = "pallas_kernels.polar_attention."
# platform -> Pallas candidates, preferred first (dispatch takes the first that this hardware has
# and that takes the call). Hopper: the Mosaic-GPU forward and backward (gpu_mosaic docstring);
# forward measured on an H100 (bench/results/polar_mosaic_h100.json): 0.62 vs 0.69 ms (Triton) at
# (16, 2K), 1.36 vs 1.66 at (4, 8K), 16.8 vs 19.9 at (1, 64K); fwd+bwd on an H200
# (bench/results/polar_mosaic_bwd_h200.json): 4.65 ms vs 5.95 with the Triton backward at (4, 8K).
BACKENDS = dispatch.Backends(
    op="Polar attention", xla=_P + "xla_streaming",
    pallas={"gpu": (dispatch.Candidate(_P + "gpu_mosaic", needs="hopper"),
                    dispatch.Candidate(_P + "gpu_triton")),
            "tpu": (dispatch.Candidate(_P + "tpu"),)},
    exports=("attention_stats_fwd", "attention_stats_bwd"), arg_names=("q", "k", "v"))


def select_backend(q, k, v, *, window=None, q_offset=0, impl="auto"):
  """The backend module `attention_stats` uses for these inputs (trace-time decision)."""
  return dispatch.select(BACKENDS, impl, (q, k, v), {"window": window, "q_offset": q_offset})


# ----------------------------------------------------------------------------- custom VJP

@dataclasses.dataclass(frozen=True)
class _Static:
  backend: Any         # module
  window: int | None
  q_offset: int | None  # None: the offset is the traced primal argument


def _offset(cfg: _Static, off):
  return cfg.q_offset if cfg.q_offset is not None else off


def _run_fwd(cfg, q, k, v, scale, off):
  return cfg.backend.attention_stats_fwd(q, k, v, scale, window=cfg.window,
                                         q_offset=_offset(cfg, off))


def _run_bwd(cfg, q, k, v, scale, lse, do, delta, cq, off):
  return cfg.backend.attention_stats_bwd(q, k, v, scale, lse, do, delta, cq, window=cfg.window,
                                         q_offset=_offset(cfg, off))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(cfg, q, k, v, scale, off):
  return _run_fwd(cfg, q, k, v, scale, off)


def _stats_fwd(cfg, q, k, v, scale, off):
  o, lse, p2 = _run_fwd(cfg, q, k, v, scale, off)
  return (o, lse, p2), (q, k, v, scale, off, o, lse, p2)


def _stats_bwd(cfg, res, cotangents):
  q, k, v, scale, off, o, lse, p2 = res
  do, dlse, dp2 = cotangents
  delta, cq = reference.stats_vjp_prologue(o, p2, do, dlse, dp2)
  dq, dk, dv, dscale = _run_bwd(cfg, q, k, v, scale, lse, do.astype(q.dtype), delta, cq, off)
  return dq, dk, dv, dscale.astype(scale.dtype), None


_stats.defvjp(_stats_fwd, _stats_bwd)


def attention_stats(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None, q_offset=0,
                    impl="auto"):
  """Tempered softmax attention with row statistics: (o_BTHD, lse_BTH, p2_BTH), fp32.

  a_ij = scale_i,h (q_i . k_j) over visible keys; o = sum pi v; lse = logsumexp a;
  p2 = sum pi^2. Differentiable in q, k, v and scale. `q_offset` may be an int or a traced
  int32 scalar (then the caller guarantees Tk >= q_offset + Tq).
  """
  reference.check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                   q_offset=q_offset)
  backend = select_backend(q_BTHD, k_BTGD, v_BTGD, window=window, q_offset=q_offset, impl=impl)
  static_off = int(q_offset) if isinstance(q_offset, int) else None
  cfg = _Static(backend, window, static_off)
  sdt = reference.stats_dtype(q_BTHD.dtype)
  off = jnp.asarray(q_offset, jnp.int32)
  return _stats(cfg, q_BTHD, k_BTGD, v_BTGD, scale_BTH.astype(sdt), off)


# ----------------------------------------------------------------------------- model-facing ops

def polar_stats(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
                null_slope_raw_H, mag_beta_raw_H, *, window=None, q_offset=0, impl="auto",
                stats_fn=None):
  """Polar core with its internals, all fp32 (statistics dtype): a dict with
  `c` [B,T,H,D] unit direction, `mag` [B,T,H], `n_eff` = 1/p2 (participation ratio over the real
  keys), `w_null` (null-sink probability mass) and `temp` (per-row temperature t).

  Prologue: t = 1 + softplus(len_gain_raw) ln n~, nu = null_base + softplus(null_slope_raw)
  sqrt(ln(n~+1)) with n~ = min(n, W); the real keys use scale t / sqrt(D) in attention_stats.
  Epilogue (null fold in the log domain): w_N = sigmoid(t nu - lse),
  c = normalize((1 - w_N) o + w_N v_null), m_eff = (1 - w_N) / p2,
  mag = tanh(softplus(mag_beta_raw) log1p(m_eff)). Differentiated by autodiff.
  `stats_fn` (default `attention_stats`, same signature) runs the attention in the middle; a
  caller that shards passes its shard_map-wrapped `attention_stats` here.
  """
  B, Tq, H, D = q_BTHD.shape
  if v_null_HD.shape != (H, D):
    raise ValueError(f"v_null must be [H, D] = {(H, D)}; got {v_null_HD.shape}")
  for name, x in (("len_gain_raw", len_gain_raw_H), ("null_base", null_base_H),
                  ("null_slope_raw", null_slope_raw_H), ("mag_beta_raw", mag_beta_raw_H)):
    if x.shape != (H,):
      raise ValueError(f"{name} must be [H] = {(H,)} (one value per query head); got {x.shape}")
  cdt = reference.stats_dtype(q_BTHD.dtype)
  t_TH, nu_TH = reference.polar_temperature_null(
      len_gain_raw_H, null_base_H, null_slope_raw_H, Tq, q_offset=q_offset, window=window,
      dtype=cdt)
  scale_BTH = jnp.broadcast_to(t_TH / math.sqrt(D), (B, Tq, H))
  stats_fn = attention_stats if stats_fn is None else stats_fn
  o_BTHD, lse_BTH, p2_BTH = stats_fn(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window,
                                     q_offset=q_offset, impl=impl)
  st = reference.polar_fold_null(o_BTHD, lse_BTH, p2_BTH, t_TH, nu_TH, v_null_HD,
                                 mag_beta_raw_H)
  return {**st, "temp": jnp.broadcast_to(t_TH, (B, Tq, H))}


def polar_core(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
               null_slope_raw_H, mag_beta_raw_H, *, window=None, q_offset=0, impl="auto",
               stats_fn=None):
  """Polar attention core (spec §3.2): (c_BTHD unit direction, mag_BTH), both in q.dtype.

  The math is `polar_stats`; this keeps only the two outputs the model consumes.
  """
  st = polar_stats(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
                   null_slope_raw_H, mag_beta_raw_H, window=window, q_offset=q_offset, impl=impl,
                   stats_fn=stats_fn)
  return st["c"].astype(q_BTHD.dtype), st["mag"].astype(q_BTHD.dtype)


def softmax_attention(q_BTHD, k_BTGD, v_BTGD, *, scale, window=None, q_offset=0, impl="auto",
                      stats_fn=None):
  """Plain causal (optionally windowed) softmax attention with a constant scale; q.dtype out.

  NoPE uses scale = 1/sqrt(D), RoPE scale = 0.12 (spec §5). `stats_fn` as in `polar_stats`.
  """
  B, Tq, H, _ = q_BTHD.shape
  sdt = reference.stats_dtype(q_BTHD.dtype)
  scale_BTH = jnp.full((B, Tq, H), scale, sdt)
  stats_fn = attention_stats if stats_fn is None else stats_fn
  o_BTHD, _, _ = stats_fn(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window, q_offset=q_offset,
                          impl=impl)
  return o_BTHD.astype(q_BTHD.dtype)
