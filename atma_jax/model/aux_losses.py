"""Auxiliary training losses: the distractor alignment loss (ATMA_SPEC §5.5) and SigReg (§5.6).

Dimension glossary
  B batch   T time   H query heads   G KV heads   d head dim   R random (distractor) keys
  N rows of a flattened representation (= B * T)   D hidden   S sketch dim (64)   Q SigReg
  frequencies (17)

Both are training-only and return fp32 scalars. The model averages the distractor loss over the
global layers and SigReg over all blocks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from atma_jax.model.ops import softmax_attention
from pallas_kernels.polar_attention import polar_temperature_null

SIGREG_MODES = ("baseline", "weak", "discrete", "strong", "zipfian")
SKETCH_DIM = 64
_COV_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Distractor alignment (§5.5)


def polar_distractor(q_BTHd, k_rand_BRGd, len_gain_raw_H, null_base_H, null_slope_raw_H, *,
                     q_offset=0) -> jax.Array:
  """Softmax mass the R random keys steal from the null sink, averaged over (b, t, h).

  One softmax over the R logits t * (q . k_rand) / sqrt(d) and the null logit t * nu (real keys
  excluded); t and nu use the FULL, un-windowed count n = q_offset + t + 1. `k_rand` must already
  be RMS-normed and detached (it bypasses Canon); gradient reaches q and the three null/temperature
  parameters.
  """
  B, T, H, d = q_BTHd.shape
  G = k_rand_BRGd.shape[2]
  q_BTGrd = q_BTHd.reshape(B, T, G, H // G, d)
  sig_BTGrR = jnp.einsum("btgrd,bsgd->btgrs", q_BTGrd, k_rand_BRGd.astype(q_BTHd.dtype))
  sig_BTHR = (sig_BTGrR / math.sqrt(d)).astype(q_BTHd.dtype).reshape(B, T, H, -1)
  t_TH, nu_TH = polar_temperature_null(len_gain_raw_H, null_base_H, null_slope_raw_H, T,
                                       q_offset=q_offset, window=None, dtype=jnp.float32)
  logits_BTHR = sig_BTHR.astype(jnp.float32) * t_TH[None, :, :, None]
  lse_BTH = jax.nn.logsumexp(logits_BTHR, axis=-1)
  # mass of the random keys = 1 - w_null = sigmoid(lse_random - a_null)
  return jnp.mean(jax.nn.sigmoid(lse_BTH - (t_TH * nu_TH)[None]))


def softmax_distractor(q_BTHd, k_BTGd, v_BTGd, k_rand_BRGd, v_rand_BRGd, y_BTHd, *, scale,
                       q_offset=0, impl="auto") -> jax.Array:
  """MSE between the core output with R random keys prepended (seen by every query) and `y`.

  No window in the distractor pass (as in the reference); gradient flows through both outputs.
  """
  R = k_rand_BRGd.shape[1]
  k_cat = jnp.concatenate([k_rand_BRGd.astype(k_BTGd.dtype), k_BTGd], axis=1)
  v_cat = jnp.concatenate([v_rand_BRGd.astype(v_BTGd.dtype), v_BTGd], axis=1)
  # q_offset = R + q_offset: query t sees keys j <= R + t = every random key + causal real keys.
  y_dist = softmax_attention(q_BTHd, k_cat, v_cat, scale=scale, window=None,
                             q_offset=R + q_offset, impl=impl)
  diff = y_dist.astype(jnp.float32) - y_BTHd.astype(jnp.float32)
  return jnp.mean(diff * diff)


# ---------------------------------------------------------------------------------------------
# SigReg (§5.6) on a block output x [B, T, D]


def _sketch(x_ND: jax.Array, key: jax.Array) -> jax.Array:
  """x S^T with S ~ N(0, 1)^{S x D} / sqrt(D) (identity when D <= S), in x's dtype."""
  N, D = x_ND.shape
  if D <= SKETCH_DIM:
    return x_ND
  s_SD = (jax.random.normal(key, (SKETCH_DIM, D), jnp.float32) / math.sqrt(D)).astype(x_ND.dtype)
  return x_ND @ s_SD.T


def _cov_identity_gap(y_NS: jax.Array) -> jax.Array:
  N, S = y_NS.shape
  y = y_NS.astype(jnp.float32)
  y = y - jnp.mean(y, axis=0, keepdims=True)
  cov_SS = (y.T @ y) / (N - 1 + _COV_EPS)
  return jnp.linalg.norm(cov_SS - jnp.eye(S, dtype=jnp.float32))


def sigreg_weak(x_ND, key):
  return _cov_identity_gap(_sketch(x_ND, key))


def sigreg_discrete(x_ND, key):
  N, D = x_ND.shape
  xf = x_ND.astype(jnp.float32)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(xf * xf, axis=-1, keepdims=True), 1e-24))
  x_ND = (xf / norm * math.sqrt(D)).astype(x_ND.dtype)
  return _cov_identity_gap(_sketch(x_ND, key))


def sigreg_strong(x_ND, key):
  """Characteristic-function match to N(0, 1) of 64 random unit projections."""
  N, D = x_ND.shape
  a_DS = jax.random.normal(key, (D, SKETCH_DIM), jnp.float32)
  a_DS = a_DS / (jnp.linalg.norm(a_DS, axis=0, keepdims=True) + 1e-6)
  p_NS = (x_ND @ a_DS.astype(x_ND.dtype)).astype(jnp.float32)
  tau_Q = jnp.linspace(-5.0, 5.0, 17, dtype=jnp.float32)
  phi_Q = jnp.exp(-0.5 * tau_Q * tau_Q)
  arg_NSQ = p_NS[:, :, None] * tau_Q
  cos_SQ = jnp.mean(jnp.cos(arg_NSQ), axis=0)
  sin_SQ = jnp.mean(jnp.sin(arg_NSQ), axis=0)
  err_SQ = ((cos_SQ - phi_Q) ** 2 + sin_SQ ** 2) * phi_Q
  return jnp.mean(jnp.trapezoid(err_SQ, tau_Q, axis=1) * N)


def sigreg_zipfian(x_ND, key, eps=1e-6):
  """Angular decorrelation + distance of the sorted row-norm profile from Zipf (s = 1)."""
  N, _ = x_ND.shape
  y = _sketch(x_ND, key).astype(jnp.float32)
  y = y - jnp.mean(y, axis=0, keepdims=True)
  norms_N1 = jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), eps)
  u = y / norms_N1
  g_SS = (u.T @ u) / (N - 1 + eps)
  angular = jnp.linalg.norm(g_SS - jnp.diag(jnp.diag(g_SS)))
  sorted_N = -jnp.sort(-norms_N1[:, 0])
  zipf_N = 1.0 / jnp.arange(1, N + 1, dtype=jnp.float32)
  zipf_N = zipf_N / (jnp.sum(zipf_N) + eps)
  sorted_N = sorted_N / (jnp.sum(sorted_N) + eps)
  return angular + jnp.linalg.norm(sorted_N - zipf_N)


_SIGREG = {"weak": sigreg_weak, "discrete": sigreg_discrete, "strong": sigreg_strong,
           "zipfian": sigreg_zipfian}


def check_sigreg_mode(mode: str) -> None:
  if mode not in SIGREG_MODES:
    raise ValueError(f"unknown SigReg mode {mode!r}; set optim.sigreg_mode to one of "
                     f"{', '.join(SIGREG_MODES)}")


def sigreg(x_BTD: jax.Array, mode: str, key: jax.Array | None) -> jax.Array:
  """SigReg loss of one block output (fresh sketch from `key`); 0 for "baseline" or no key."""
  check_sigreg_mode(mode)
  if mode == "baseline" or key is None:
    return jnp.zeros((), jnp.float32)
  B, T, D = x_BTD.shape
  return _SIGREG[mode](x_BTD.reshape(B * T, D), key).astype(jnp.float32)
