"""Materialized oracles for Polar attention (ATMA_SPEC §3) and its decomposed core op.

Nobody optimizes this file: every backend and the model are tested against it. It builds the
full `[Tq, Tk]` logit matrix, so use it only for small shapes (tests, T <= a few thousand).

Dimension glossary
  B   batch                     Tq  query rows of this call     Tk  key rows
  H   query heads               G   KV heads (H % G == 0; head h uses KV head h // (H // G))
  R   GQA group size H // G     D   head dim
  S   key axis inside a score matrix (= Tk)

Counts are absolute: query row i sits at position `q_offset + i` and sees keys
`j <= q_offset + i` (and `j > q_offset + i - window` with a window).

Shared math helpers used by `api.py` and `cached.py` (one copy): `visible_mask`,
`polar_temperature_null` / `polar_length_terms`, `polar_fold_null`, `safe_normalize`,
`stats_vjp_prologue`, `check_attention_shapes`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite logit for invisible keys: never form -inf * traced value (spec §3.4, §10.11).
MASK_SENTINEL = -1e30
NORM_FLOOR = 1e-6  # floor on ||s|| for the direction (spec §3.2 step 8)
_SPEC_FLOOR = 1e-6  # oracle floors on sum(w_real) and sum(w_hat^2) (spec §3.2 step 9)


def stats_dtype(dtype) -> jnp.dtype:
  """Statistics dtype: fp64 stays fp64, everything else computes in fp32 (spec §3.5)."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def xla_precision(dtype):
  """Precision of the XLA paths' dots (`xla_streaming`, `cached`): HIGHEST for every dtype but
  bf16 (bf16 operands: the default dot, fp32 accumulation through preferred_element_type)."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) != jnp.bfloat16 else None


def check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window, q_offset) -> None:
  """Raises ValueError naming the problem (and the fix) for inputs no backend can take."""
  if q_BTHD.ndim != 4 or k_BTGD.ndim != 4 or v_BTGD.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, heads, D]; got q {q_BTHD.shape}, "
                     f"k {k_BTGD.shape}, v {v_BTGD.shape}")
  B, Tq, H, D = q_BTHD.shape
  Bk, Tk, G, Dk = k_BTGD.shape
  if k_BTGD.shape != v_BTGD.shape or (Bk, Dk) != (B, D):
    raise ValueError(f"k {k_BTGD.shape} and v {v_BTGD.shape} must be [B={B}, Tk, G, D={D}]")
  if G < 1 or H % G:
    raise ValueError(f"query heads H={H} must be a multiple of KV heads G={G} (GQA)")
  if scale_BTH.shape != (B, Tq, H):
    raise ValueError(f"scale must be [B, Tq, H] = {(B, Tq, H)}; got {scale_BTH.shape}")
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"window must be None or a positive int; got {window!r}")
  if isinstance(q_offset, int):
    if q_offset < 0:
      raise ValueError(f"q_offset must be >= 0; got {q_offset}")
    if Tk < q_offset + Tq:
      raise ValueError(
          f"the last query row (absolute position {q_offset + Tq - 1}) needs keys up to that "
          f"position but only Tk={Tk} keys were given; pass the whole KV prefix "
          f"(Tk >= q_offset + Tq = {q_offset + Tq})")


def layout_reason(q, k, v, *, window=None, q_offset=0) -> str | None:
  """The layout every Pallas backend's `unsupported_reason` checks first (q [B,T,H,D], k/v
  [B,T,G,D], G | H, scalar q_offset, int window): None, or what is wrong."""
  if q.ndim != 4 or k.shape != v.shape or k.shape[-1] != q.shape[-1]:
    return f"q [B,T,H,D], k/v [B,T,G,D] expected, got {q.shape}, {k.shape}, {v.shape}"
  if q.shape[2] % k.shape[2]:
    return f"query heads {q.shape[2]} must be a multiple of KV heads {k.shape[2]}"
  if not (isinstance(q_offset, int) or jnp.ndim(q_offset) == 0):
    return f"q_offset must be an int or a scalar (got shape {jnp.shape(q_offset)})"
  if not (window is None or isinstance(window, int)):
    return f"window must be None or an int (got {window!r})"
  return None


def visible_mask(tq: int, tk: int, q_offset=0, window: int | None = None) -> jax.Array:
  """bool[tq, tk]: key j is visible to query row i iff j <= q_offset+i (and j > q_offset+i-W)."""
  pos_T1 = q_offset + jnp.arange(tq)[:, None]
  key_1S = jnp.arange(tk)[None, :]
  mask_TS = key_1S <= pos_T1
  if window is not None:
    mask_TS = mask_TS & (key_1S > pos_T1 - window)
  return mask_TS


def _group_queries(q_BTHD, G):
  """[B, T, H, D] -> [B, T, G, R, D] so that head h = g * R + r uses KV head g."""
  B, T, H, D = q_BTHD.shape
  return q_BTHD.reshape(B, T, G, H // G, D)


def attention_stats_materialized(q_BTHD, k_BTGD, v_BTGD, scale_BTH, *, window=None,
                                 q_offset=0):
  """Oracle of the core op: (o_BTHD, lse_BTH, p2_BTH) in fp32 (fp64 for fp64 inputs).

  a_ij = scale_i * (q_i . k_j) over visible j; pi = softmax(a); o = sum pi v;
  lse = logsumexp(a); p2 = sum pi^2. Plain autodiff gives the VJP.
  """
  check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, scale_BTH, window=window, q_offset=q_offset)
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  cdt = stats_dtype(q_BTHD.dtype)
  q_BTGRD = _group_queries(q_BTHD.astype(cdt), G)
  k_BSGD, v_BSGD = k_BTGD.astype(cdt), v_BTGD.astype(cdt)
  scale_BTGR = scale_BTH.astype(cdt).reshape(B, Tq, G, H // G)

  dots_BGRTS = jnp.einsum("btgrd,bsgd->bgrts", q_BTGRD, k_BSGD,
                          precision=jax.lax.Precision.HIGHEST)
  a_BGRTS = jnp.moveaxis(scale_BTGR, 1, 3)[..., None] * dots_BGRTS
  mask_TS = visible_mask(Tq, Tk, q_offset, window)
  a_BGRTS = jnp.where(mask_TS, a_BGRTS, MASK_SENTINEL)
  m_BGRT = jax.lax.stop_gradient(jnp.max(a_BGRTS, axis=-1))
  p_BGRTS = jnp.where(mask_TS, jnp.exp(a_BGRTS - m_BGRT[..., None]), 0.0)
  l_BGRT = jnp.sum(p_BGRTS, axis=-1)
  pi_BGRTS = p_BGRTS / l_BGRT[..., None]
  o_BGRTD = jnp.einsum("bgrts,bsgd->bgrtd", pi_BGRTS, v_BSGD,
                       precision=jax.lax.Precision.HIGHEST)
  lse_BGRT = m_BGRT + jnp.log(l_BGRT)
  p2_BGRT = jnp.sum(pi_BGRTS * pi_BGRTS, axis=-1)

  o_BTHD = jnp.moveaxis(o_BGRTD, 3, 1).reshape(B, Tq, H, D)
  lse_BTH = jnp.moveaxis(lse_BGRT, 3, 1).reshape(B, Tq, H)
  p2_BTH = jnp.moveaxis(p2_BGRT, 3, 1).reshape(B, Tq, H)
  return o_BTHD, lse_BTH, p2_BTH


def stats_vjp_prologue(o_BTHD, p2_BTH, do_BTHD, dlse_BTH, dp2_BTH):
  """Per-row terms of the closed-form VJP (KERNELS.md §2a), in fp32 (fp64 for fp64).

  With ds_ij = pi_ij (dp_ij - delta'_i) + cq_i pi_ij^2:
    delta' = rowsum(do * o) - dlse + 2 dp2 p2,   cq = 2 dp2.
  """
  cdt = stats_dtype(o_BTHD.dtype)
  o, do = o_BTHD.astype(cdt), do_BTHD.astype(cdt)
  p2, dlse, dp2 = p2_BTH.astype(cdt), dlse_BTH.astype(cdt), dp2_BTH.astype(cdt)
  delta_BTH = jnp.sum(do * o, axis=-1) - dlse + 2.0 * dp2 * p2
  return delta_BTH, 2.0 * dp2


def polar_temperature_null(len_gain_raw_H, null_base_H, null_slope_raw_H, tq: int, *,
                           q_offset=0, window=None, dtype=jnp.float32):
  """Per-row temperature t_TH and null floor nu_TH (spec §3.2 steps 1-3) for the rows at
  absolute positions q_offset + i: `polar_length_terms` of the counts n = q_offset + i + 1.
  """
  n_T = q_offset + jnp.arange(tq) + 1
  return polar_length_terms(len_gain_raw_H, null_base_H, null_slope_raw_H, n_T, window=window,
                            dtype=dtype)


def polar_length_terms(len_gain_raw_H, null_base_H, null_slope_raw_H, n, *, window=None,
                       dtype=jnp.float32):
  """Temperature t and null floor nu, shaped `n.shape + (H,)`, for raw visible counts `n`.

  n~ = max(min(n, W), 1) (capped count for temperature and null; the mask uses the raw count),
  t = 1 + softplus(len_gain_raw) ln n~, nu = null_base + softplus(null_slope_raw) sqrt(ln(n~+1)).
  `n` may be any shape (e.g. [T] for one offset, [B, T] for per-sequence decode positions).
  """
  n = jnp.asarray(n).astype(dtype)
  if window is not None:
    n = jnp.minimum(n, float(window))
  n1 = jnp.maximum(n, 1.0)[..., None]
  g_H = jax.nn.softplus(len_gain_raw_H.astype(dtype))
  sig_H = jax.nn.softplus(null_slope_raw_H.astype(dtype))
  t = 1.0 + g_H * jnp.log(n1)
  nu = null_base_H.astype(dtype) + sig_H * jnp.sqrt(jnp.log(n1 + 1.0))
  return t, nu


def polar_fold_null(o_BTHD, lse_BTH, p2_BTH, t_BTH, nu_BTH, v_null_HD, mag_beta_raw_H):
  """Polar epilogue on the real-key statistics (spec §3.2 steps 6-11, null folded in the log
  domain), all in o's dtype: a dict with `c` [B,T,H,D] unit direction, `mag` [B,T,H],
  `n_eff` = 1/p2 and `w_null` (null-sink probability mass).

  w_N = sigmoid(t nu - lse), c = normalize((1 - w_N) o + w_N v_null), m_eff = (1 - w_N) / p2,
  mag = tanh(softplus(mag_beta_raw) log1p(m_eff)). `t`, `nu` broadcast against [B, T, H].
  """
  cdt = o_BTHD.dtype
  a_null_BTH = t_BTH * nu_BTH
  w_null_BTH = jax.nn.sigmoid(a_null_BTH - lse_BTH)
  w_real_BTH = jax.nn.sigmoid(lse_BTH - a_null_BTH)  # 1 - w_null without cancellation
  s_BTHD = (w_real_BTH[..., None] * o_BTHD
            + w_null_BTH[..., None] * v_null_HD.astype(cdt)[None, None])
  c_BTHD = safe_normalize(s_BTHD)
  m_eff_BTH = w_real_BTH / p2_BTH
  beta_H = jax.nn.softplus(mag_beta_raw_H.astype(cdt))
  mag_BTH = jnp.tanh(beta_H * jnp.log1p(m_eff_BTH))
  return {"c": c_BTHD, "mag": mag_BTH, "n_eff": 1.0 / p2_BTH, "w_null": w_null_BTH}


def safe_normalize(s_BTHD, floor=NORM_FLOOR):
  """s / max(||s||, floor) along the last axis, with a finite gradient at s = 0."""
  sq_BTH1 = jnp.sum(s_BTHD * s_BTHD, axis=-1, keepdims=True)
  return s_BTHD / jnp.sqrt(jnp.maximum(sq_BTH1, floor * floor))


def polar_oracle(q_BTHD, k_BTGD, v_BTGD, v_null_HD, len_gain_raw_H, null_base_H,
                 null_slope_raw_H, mag_beta_raw_H, *, window=None, q_offset=0):
  """Direct transcription of spec §3.2: (c_BTHD, mag_BTH) in q.dtype.

  One softmax over the visible real keys and one virtual null key (logit t * nu, value v_null);
  direction c = normalize(sum w v + w_N v_null); n_eff from the real-key weights renormalized,
  m_eff = n_eff (1 - w_N), mag = tanh(softplus(mag_beta_raw) log1p(m_eff)).
  """
  B, Tq, H, D = q_BTHD.shape
  Tk, G = k_BTGD.shape[1], k_BTGD.shape[2]
  check_attention_shapes(q_BTHD, k_BTGD, v_BTGD, jnp.zeros((B, Tq, H)), window=window,
                         q_offset=q_offset)
  cdt = stats_dtype(q_BTHD.dtype)
  R = H // G
  k_BSHD = jnp.repeat(k_BTGD.astype(cdt), R, axis=2)  # repeat-interleave: h -> h // R
  v_BSHD = jnp.repeat(v_BTGD.astype(cdt), R, axis=2)
  t_TH, nu_TH = polar_temperature_null(len_gain_raw_H, null_base_H, null_slope_raw_H, Tq,
                                       q_offset=q_offset, window=window, dtype=cdt)

  sig_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(cdt), k_BSHD,
                        precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(float(D))
  a_BHTS = t_TH.T[None, :, :, None] * sig_BHTS
  aN_BHT = jnp.broadcast_to((t_TH * nu_TH).T[None], (B, H, Tq))
  mask_TS = visible_mask(Tq, Tk, q_offset, window)
  a_BHTS = jnp.where(mask_TS, a_BHTS, MASK_SENTINEL)
  m_BHT = jax.lax.stop_gradient(jnp.maximum(jnp.max(a_BHTS, axis=-1), aN_BHT))
  e_BHTS = jnp.where(mask_TS, jnp.exp(a_BHTS - m_BHT[..., None]), 0.0)
  eN_BHT = jnp.exp(aN_BHT - m_BHT)
  z_BHT = jnp.sum(e_BHTS, axis=-1) + eN_BHT
  w_BHTS = e_BHTS / z_BHT[..., None]
  wN_BHT = eN_BHT / z_BHT

  s_BHTD = (jnp.einsum("bhts,bshd->bhtd", w_BHTS, v_BSHD, precision=jax.lax.Precision.HIGHEST)
            + wN_BHT[..., None] * v_null_HD.astype(cdt)[None, :, None, :])
  c_BHTD = safe_normalize(s_BHTD)
  w_real_BHT = jnp.sum(w_BHTS, axis=-1)
  w_hat_BHTS = w_BHTS / jnp.maximum(w_real_BHT, _SPEC_FLOOR)[..., None]
  n_eff_BHT = 1.0 / jnp.maximum(jnp.sum(w_hat_BHTS * w_hat_BHTS, axis=-1), _SPEC_FLOOR)
  m_eff_BHT = n_eff_BHT * (1.0 - wN_BHT)
  beta_H = jax.nn.softplus(mag_beta_raw_H.astype(cdt))
  mag_BHT = jnp.tanh(beta_H[None, :, None] * jnp.log1p(m_eff_BHT))

  c_BTHD = jnp.moveaxis(c_BHTD, 1, 2).astype(q_BTHD.dtype)
  mag_BTH = jnp.moveaxis(mag_BHT, 1, 2).astype(q_BTHD.dtype)
  return c_BTHD, mag_BTH
