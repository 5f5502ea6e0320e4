"""Pre-norm residual block (ATMA_SPEC §2.2): y = x + Mixer(norm1(x)); out = y + MLP(norm2(y)).

Dimension glossary: B batch, T time, D hidden.

The mixer is the LFM2 gated conv (conv blocks) or the attention + memory `GlobalMixer` (global
blocks, `cfg.is_global(layer)`). SigReg is computed on the block output.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from atma_jax.config import ModelConfig
from atma_jax.model import aux_losses, remat
from atma_jax.model.attention import GlobalMixer
from atma_jax.model.layers import MLP, RMSNorm
from atma_jax.model.lfm2 import LFM2Conv
from atma_jax.sharding import constrain

ACT_AXES = ("batch", "seq", "act_embed")


class Block(nnx.Module):
  """Attributes `norm1`, `attn` (LFM2Conv or GlobalMixer), `norm2`, `mlp` (torch names)."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.is_global = cfg.is_global(layer)
    self.norm1 = RMSNorm(cfg.hidden_size, param_dtype=pd)
    self.attn = GlobalMixer(cfg, rngs=rngs) if self.is_global else LFM2Conv(cfg, rngs=rngs)
    self.norm2 = RMSNorm(cfg.hidden_size, param_dtype=pd)
    self.mlp = MLP(cfg.hidden_size, cfg.mlp_ratio, param_dtype=pd, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, *, q_offset=0, mem: bool = True,
               rng: jax.Array | None = None, sigreg_mode: str = "baseline", cache=None,
               span=None):
    """Returns (out [B, T, D], reg f32, align f32). `rng` draws distractor keys and sketches.

    With `cache` (this block's layer cache) and `span` (a `TokenSpan`) the mixer continues the
    cached sequences and a fourth item, the new layer cache, is returned.
    """
    rng_attn = rng_reg = None
    if rng is not None:
      rng_attn, rng_reg = jax.random.split(rng)
    h_BTD = self.norm1(x_BTD)
    state = {} if cache is None else {"cache": cache, "span": span}
    # Named scopes label the ops in profiles (bench/profile_train_step.py); no numerical effect.
    if self.is_global:
      with jax.named_scope("global_mixer"):
        mix = self.attn(h_BTD, q_offset=q_offset, mem=mem, rng=rng_attn, **state)
      mix_BTD, align, new_cache = mix if cache is not None else (*mix, None)
    else:
      with jax.named_scope("lfm2_mixer"):
        mix = self.attn(h_BTD, **state)
      mix_BTD, new_cache = mix if cache is not None else (mix, None)
      align = jnp.zeros((), jnp.float32)
    chex.assert_equal_shape([x_BTD, mix_BTD])  # at trace time: a mixer must not broadcast
    y_BTD = constrain(x_BTD + remat.tag(mix_BTD, remat.MIXER_OUT), ACT_AXES)
    with jax.named_scope("mlp"):
      mlp_BTD = remat.tag(self.mlp(self.norm2(y_BTD)), remat.MLP_OUT)
      out_BTD = constrain(y_BTD + mlp_BTD, ACT_AXES)
    with jax.named_scope("sigreg"):
      reg = aux_losses.sigreg(out_BTD, sigreg_mode, rng_reg)
    if cache is None:
      return out_BTD, reg, align
    return out_BTD, reg, align, new_cache
