"""Global mixer: the attention surround shared by the Polar / NoPE / RoPE cores (ATMA_SPEC §2.6, §3, §5).

Dimension glossary
  B batch   T time   D hidden   H query heads   G KV heads (H / gqa_ratio)   d head dim
  r GQA group size (H / G)   K Canon taps (4)   R distractor keys

Given the normed block input x:
  1. [q | gate] = q(x) reshaped [B, T, H, 2d]: per head the first d are the query, the last d
     the output gate (interleaved per head, NOT [all q | all gates]).
  2. k(x), v(x) -> [B, T, G, d].
  3. QK-norm: weightless per-head RMS-norm (eps 2^-23) on q and k; v is not normed.
  4. polar / nope: Canon residual depthwise conv (width K) on flattened q, k, v, after the norm.
     rope: no Canon; rotary on q and k instead.
  5. core: polar_core (-> direction c, magnitude mag) or softmax_attention (-> y), GQA handled
     by the core (head h uses KV head h // r).
  6. out = proj(flat(y) * sigmoid(flat(gate))) [+ mu_proj(mag) for polar] [+ mem(...)].
Memory inputs (GQA expanded by repeat-interleave): post-norm post-Canon q, k, v (polar, nope);
post-norm pre-rotary q, k and raw v (rope).

With a decode cache (`cache`, `span`; see `atma_jax.model.cache`) the same steps continue the
cached sequences: the Canon convs start from their cached tails, RoPE rotates at each row's
absolute positions, the core runs over the K/V cache (`kv_cache.attend_cached`) and the memory
continues from its state; the new layer cache is returned beside the output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from atma_jax.config import ModelConfig
from atma_jax.model import aux_losses, init, remat
from atma_jax.model.kv_cache import attend_cached
from atma_jax.model.layers import DepthwiseConv, Linear, rms_norm, stats_dtype
from atma_jax.model.memory import Memory
from atma_jax.model.rope import apply_rope
from atma_jax.model.ops import (polar_core, polar_core_at, softmax_attention,
                                softmax_attention_at)


class CoreInputs(NamedTuple):
  """What `GlobalMixer.core_inputs` returns (k, v not GQA-expanded)."""
  gate_BTHd: jax.Array  # the output gate, before its sigmoid
  core: tuple[jax.Array, jax.Array, jax.Array]  # the core's q [B,T,H,d], k, v [B,T,G,d]
  mem: tuple[jax.Array, jax.Array, jax.Array]   # the memory's q, k, v (same shapes)
  tails: dict  # with a decode cache: the updated Canon tails {field: [B, Ka-1, F]}; else {}


class GlobalMixer(nnx.Module):
  """Attention (+ memory) mixer of a global block; attribute names are the torch names."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    K = cfg.attn_kernel_size
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.q = Linear(D, 2 * H * d, axes=("embed", "heads"), param_dtype=pd, rngs=rngs)
    self.k = Linear(D, G * d, axes=("embed", "kv"), param_dtype=pd, rngs=rngs)
    self.v = Linear(D, G * d, axes=("embed", "kv"), param_dtype=pd, rngs=rngs)
    if cfg.attn_type != "rope":
      self.canon_q = DepthwiseConv(H * d, K, channel_axis="heads", param_dtype=pd, rngs=rngs)
      self.canon_k = DepthwiseConv(G * d, K, channel_axis="kv", param_dtype=pd, rngs=rngs)
      self.canon_v = DepthwiseConv(G * d, K, channel_axis="kv", param_dtype=pd, rngs=rngs)
    self.proj = Linear(H * d, D, axes=("heads", "embed"), param_dtype=pd, rngs=rngs)
    if cfg.attn_type == "polar":
      self.mu_proj = Linear(H, D, axes=("head_scalars", "embed"), param_dtype=pd, rngs=rngs)
      self.v_null = init.param(jnp.zeros((H, d), pd), ("head_scalars", "head_dim"))
      self.null_base = init.param(jnp.full((H,), init.NULL_BASE_INIT, pd), ("head_scalars",))
      self.null_slope_raw = init.param(jnp.full((H,), init.NULL_SLOPE_RAW_INIT, pd),
                                       ("head_scalars",))
      self.len_gain_raw = init.param(jnp.full((H,), init.LEN_GAIN_RAW_INIT, pd),
                                     ("head_scalars",))
      self.mag_beta_raw = init.param(jnp.full((H,), init.MAG_BETA_RAW_INIT, pd),
                                     ("head_scalars",))
    if cfg.mem_enabled:
      self.mem = Memory(cfg, rngs=rngs)

  # -- pieces ------------------------------------------------------------------------------------

  def _canon(self, conv: DepthwiseConv, x_BTNd: jax.Array, tail_BKC=None, lengths_B=None):
    """Canon-B residual conv on head-major flattened channels: x + conv(x). With a cached
    `tail_BKC` the conv continues from it: returns (x + conv(x), new tail)."""
    B, T, N, d = x_BTNd.shape
    x_BTC = x_BTNd.reshape(B, T, N * d)
    if tail_BKC is None:
      return (x_BTC + conv(x_BTC)).reshape(B, T, N, d)
    y_BTC, tail_BKC = conv.cached(x_BTC, tail_BKC, lengths_B)
    return (x_BTC + y_BTC).reshape(B, T, N, d), tail_BKC

  def project_qkv(self, x_BTD: jax.Array):
    """q [B,T,H,d] (QK-normed), gate [B,T,H,d], k [B,T,G,d] (QK-normed), v [B,T,G,d] (raw)."""
    cfg = self.cfg
    B, T, _ = x_BTD.shape
    H, G, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qg, k, v = remat.tag((self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)), remat.MIXER_PROJ)
    qg_BTH2d = qg.reshape(B, T, H, 2 * d)
    q_BTHd, gate_BTHd = qg_BTH2d[..., :d], qg_BTH2d[..., d:]
    k_BTGd = k.reshape(B, T, G, d)
    v_BTGd = v.reshape(B, T, G, d)
    return rms_norm(q_BTHd), gate_BTHd, rms_norm(k_BTGd), v_BTGd

  def _random_kv(self, x_BTD: jax.Array, rng: jax.Array, normed: bool):
    """Detached distractor keys/values k(xi), v(xi) for xi ~ N(0, 1) [B, R, D] (no Canon)."""
    cfg = self.cfg
    B, _, D = x_BTD.shape
    R, G, d = cfg.num_random_keys, cfg.num_kv_heads, cfg.head_dim
    xi_BRD = jax.random.normal(rng, (B, R, D), jnp.float32).astype(x_BTD.dtype)
    k_BRGd = self.k(xi_BRD).reshape(B, R, G, d)
    if normed:
      k_BRGd = rms_norm(k_BRGd)
    v_BRGd = self.v(xi_BRD).reshape(B, R, G, d)
    return jax.lax.stop_gradient(k_BRGd), jax.lax.stop_gradient(v_BRGd)

  def core_inputs(self, x_BTD: jax.Array, q_offset=0, cache=None, span=None) -> CoreInputs:
    """`CoreInputs`: gate [B,T,H,d], the core's (q, k, v), the memory's (q, k, v) (k, v not
    GQA-expanded) and the updated Canon tails.

    polar / nope: QK-norm then Canon, shared by core and memory. rope: rotary on the core's q, k;
    the memory takes the pre-rotary QK-normed q, k and raw v.
    With a decode `cache` (a `GlobalLayerCache`) and `span` the Canon convs continue from the
    cached tails and RoPE rotates at each row's start position; `tails` holds the updated Canon
    tails {field: [B, Ka-1, F]} ({} for rope, and without a cache).
    """
    q_BTHd, gate_BTHd, k_BTGd, v_BTGd = self.project_qkv(x_BTD)
    tails = {}
    if self.cfg.attn_type == "rope":
      pos = q_offset if cache is None else span.starts_B
      core = (apply_rope(q_BTHd, pos), apply_rope(k_BTGd, pos), v_BTGd)
      mem = (q_BTHd, k_BTGd, v_BTGd)
    else:
      def canon(conv, x, field):
        if cache is None:
          return self._canon(conv, x)
        y, tails[field] = self._canon(conv, x, getattr(cache, field), span.lengths_B)
        return y

      core = (canon(self.canon_q, q_BTHd, "canon_q_BKF"),
              canon(self.canon_k, k_BTGd, "canon_k_BKF"),
              canon(self.canon_v, v_BTGd, "canon_v_BKF"))
      mem = core
    return CoreInputs(gate_BTHd, core, mem, tails)

  # -- forward -----------------------------------------------------------------------------------

  def __call__(self, x_BTD: jax.Array, *, q_offset=0, mem: bool = True,
               rng: jax.Array | None = None, cache=None, span=None):
    """Returns (out [B, T, D], align f32 scalar). `rng` enables the distractor loss.

    With `cache` (a `GlobalLayerCache`) and `span` (a `TokenSpan`: each row's start position and
    number of real tokens) the tokens continue the cached sequences: attention over the cached
    keys, Canon / memory state carried; returns (out, align = 0, new cache). `mem=False` then
    leaves the memory state untouched.
    """
    cfg = self.cfg
    B, T, D = x_BTD.shape
    H, G, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    r = H // G
    W = cfg.attn_window
    with jax.named_scope("core_inputs"):
      gate_BTHd, (q_att, k_att, v_att), (q_mem, k_mem, v_mem), tails = self.core_inputs(
          x_BTD, q_offset, cache, span)
    new = dict(tails)  # the layer cache's updated fields

    def run_core(core, core_at):
      """core(q, k, v, q_offset) without a cache; over the cache (kv_cache.attend_cached)."""
      if cache is None:
        return core(q_att, k_att, v_att, q_offset)
      out, new["k_BSGd"], new["v_BSGd"] = attend_cached(
          q_att, k_att, v_att, cache.k_BSGd, cache.v_BSGd, span, W, core=core, core_at=core_at,
          uniform_kernel=cfg.decode_attn_kernel)
      return out

    distract = rng is not None and cfg.num_random_keys > 0 and cache is None
    align = jnp.zeros((), jnp.float32)
    gate_BTF = jax.nn.sigmoid(gate_BTHd.astype(stats_dtype(x_BTD.dtype))).astype(x_BTD.dtype)
    gate_BTF = gate_BTF.reshape(B, T, H * d)

    if cfg.attn_type == "polar":
      len_gain_raw_H, null_base_H, null_slope_raw_H = (
          self.len_gain_raw.get_value(), self.null_base.get_value(),
          self.null_slope_raw.get_value())
      polar_params = (self.v_null.get_value(), len_gain_raw_H, null_base_H, null_slope_raw_H,
                      self.mag_beta_raw.get_value())
      with jax.named_scope("polar_core"):
        c_BTHd, mag_BTH = run_core(
            lambda q, k, v, off: polar_core(q, k, v, *polar_params, window=W, q_offset=off,
                                            impl=cfg.kernel_impl),
            lambda q, k, v, q_pos, k_pos: polar_core_at(q, k, v, *polar_params, q_pos, k_pos,
                                                        window=W))
      c_BTHd, mag_BTH = remat.tag((c_BTHd, mag_BTH), remat.ATTN_CORE)
      chex.assert_shape([c_BTHd, mag_BTH], [(B, T, H, d), (B, T, H)])  # at trace time
      out_BTD = self.proj(c_BTHd.reshape(B, T, H * d) * gate_BTF)
      out_BTD = out_BTD + self.mu_proj(mag_BTH.astype(x_BTD.dtype))
      if distract:
        k_rand, _ = self._random_kv(x_BTD, rng, normed=True)
        align = aux_losses.polar_distractor(q_att, k_rand, len_gain_raw_H, null_base_H,
                                            null_slope_raw_H, q_offset=q_offset)
    else:
      scale = cfg.rope_scale if cfg.attn_type == "rope" else 1.0 / math.sqrt(d)
      y_BTHd = run_core(
          lambda q, k, v, off: softmax_attention(q, k, v, scale=scale, window=W, q_offset=off,
                                                 impl=cfg.kernel_impl),
          lambda q, k, v, q_pos, k_pos: softmax_attention_at(q, k, v, q_pos, k_pos, scale=scale,
                                                             window=W))
      y_BTHd = remat.tag(y_BTHd, remat.ATTN_CORE)
      chex.assert_shape(y_BTHd, (B, T, H, d))
      out_BTD = self.proj(y_BTHd.reshape(B, T, H * d) * gate_BTF)
      if distract:
        k_rand, v_rand = self._random_kv(x_BTD, rng, normed=cfg.attn_type == "rope")
        align = aux_losses.softmax_distractor(
            q_att, k_att, v_att, k_rand, v_rand, y_BTHd, scale=scale, q_offset=q_offset,
            impl=cfg.kernel_impl)

    if cfg.mem_enabled and mem:
      expand = lambda t: jnp.repeat(t, r, axis=2)  # repeat-interleave: head h <- KV head h // r
      with jax.named_scope("memory"):
        if cache is None:
          mem_BTD = self.mem(x_BTD, q_mem, expand(k_mem), expand(v_mem))
        else:
          mem_BTD, new["mem_BHKV"] = self.mem(x_BTD, q_mem, expand(k_mem), expand(v_mem),
                                              state_BHKV=cache.mem_BHKV,
                                              valid_BT=span.valid_BT(T))
        chex.assert_equal_shape([out_BTD, mem_BTD])  # no silent broadcast into the residual
        out_BTD = out_BTD + mem_BTD
    if cache is None:
      return out_BTD, align
    return out_BTD, align, cache.replace(**new)
