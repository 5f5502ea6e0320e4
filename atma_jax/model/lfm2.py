"""LFM2 gated short-convolution mixer of the conv blocks (ATMA_SPEC §2.5).

Dimension glossary
  B batch   T time   D hidden   K conv taps (3)

  [b | c | u] = in_proj(x)         thirds in the order B, C, x
  w = causal_conv(b * u)           depthwise, width K, zero left padding, NO residual
  out = out_proj(c * w)

Under the "reference" init both projections are zero and the mixer only ever outputs
`out_proj.bias` (see `atma_jax.model.init`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atma_jax.config import ModelConfig
from atma_jax.model import remat
from atma_jax.model.layers import DepthwiseConv, Linear


class LFM2Conv(nnx.Module):
  """Parameters `in_proj [D, 3D]`, `conv.kernel [K, D]`, `out_proj [D, D]` (torch names)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D = cfg.hidden_size
    pd = jnp.dtype(cfg.param_dtype)
    self.in_proj = Linear(D, 3 * D, axes=("embed", "mixer"), param_dtype=pd, rngs=rngs)
    self.conv = DepthwiseConv(D, cfg.conv_kernel_size, channel_axis="mixer", param_dtype=pd,
                              rngs=rngs)
    self.out_proj = Linear(D, D, axes=("mixer", "embed"), param_dtype=pd, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, *, cache=None, span=None):
    """out [B, T, D]; with `cache` (a `ConvLayerCache`) and `span` (a `TokenSpan`) the conv
    continues from the cached tail and the result is (out, new cache)."""
    b_BTD, c_BTD, u_BTD = remat.tag(self.in_proj.column_blocks(x_BTD, 3), remat.MIXER_PROJ)
    if cache is None:
      return self.out_proj(c_BTD * self.conv(b_BTD * u_BTD))
    w_BTD, tail_BKD = self.conv.cached(b_BTD * u_BTD, cache.tail_BKD, span.lengths_B)
    return self.out_proj(c_BTD * w_BTD), cache.replace(tail_BKD=tail_BKD)
