"""Titans gated-delta compression memory, the additive MAG branch of global blocks (ATMA_SPEC §4).

Dimension glossary
  B batch   T time   D hidden   H memory heads (= query heads)   d head dim

  log_gamma = log_sigmoid(w_gamma(x) + mem_gamma_bias)      fp32, <= 0   (retention)
  beta      = sigmoid(w_beta(x) + mem_beta_bias)             fp32, [0, 1] (write strength)
  q^, k^    = unit-L2 q~, k~ per head (floor 1e-12); v~ as given
  r         = gated_delta_rule(q^, k^, v~, log_gamma, beta)  fp32 [B, T, H, d]
  mem       = proj( rms_norm(r) * sigmoid(gate(x)) )        rms_norm weightless, per head

The constants `mem_gamma_bias` / `mem_beta_bias` are added at run time on top of the learned
biases (they are not part of any parameter). `proj` is zero-initialized, so the branch is an
exact no-op at step 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from atma_jax.config import ModelConfig
from atma_jax.model import remat
from atma_jax.model.layers import Linear, l2_normalize, rms_norm, stats_dtype
from atma_jax.model.ops import gated_delta_rule, gated_delta_step

L2_FLOOR = 1e-12  # F.normalize default eps


class Memory(nnx.Module):
  """Parameters `w_gamma [D, H]`, `w_beta [D, H]`, `gate [D, H*d]`, `proj [H*d, D]`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, H, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.w_gamma = Linear(D, H, axes=("embed", "head_scalars"), param_dtype=pd, rngs=rngs)
    self.w_beta = Linear(D, H, axes=("embed", "head_scalars"), param_dtype=pd, rngs=rngs)
    self.gate = Linear(D, H * d, axes=("embed", "heads"), param_dtype=pd, rngs=rngs)
    self.proj = Linear(H * d, D, axes=("heads", "embed"), param_dtype=pd, rngs=rngs)

  def __call__(self, x_BTD: jax.Array, q_BTHd: jax.Array, k_BTHd: jax.Array,
               v_BTHd: jax.Array, *, state_BHKV: jax.Array | None = None,
               valid_BT: jax.Array | None = None):
    """x: normed block input; q, k, v: memory inputs already expanded to H heads.

    Returns mem [B, T, D]; with `state_BHKV` (decode cache, fp32) the recurrence continues from
    it and the result is (mem, new state). `valid_BT` (with a state) marks real tokens: padded
    ones are no-ops (no decay, no write; their k, v are zeroed so nothing non-finite enters).
    """
    cfg = self.cfg
    B, T, H, d = q_BTHd.shape
    sd = stats_dtype(x_BTD.dtype)
    wg_BTH, wb_BTH, gate_BTF = remat.tag(
        (self.w_gamma(x_BTD), self.w_beta(x_BTD), self.gate(x_BTD)), remat.MIXER_PROJ)
    log_gamma_BTH = jax.nn.log_sigmoid(wg_BTH.astype(sd) + cfg.mem_gamma_bias)
    beta_BTH = jax.nn.sigmoid(wb_BTH.astype(sd) + cfg.mem_beta_bias)
    qn_BTHd = l2_normalize(q_BTHd.astype(sd), L2_FLOOR).astype(x_BTD.dtype)
    kn_BTHd = l2_normalize(k_BTHd.astype(sd), L2_FLOOR).astype(x_BTD.dtype)
    v_BTHd = v_BTHd.astype(x_BTD.dtype)
    if state_BHKV is None:
      r_BTHd, _ = gated_delta_rule(qn_BTHd, kn_BTHd, v_BTHd, log_gamma_BTH, beta_BTH,
                                   chunk_size=cfg.mem_chunk, impl=cfg.kernel_impl)
    else:
      r_BTHd, state_BHKV = self._continue(qn_BTHd, kn_BTHd, v_BTHd, log_gamma_BTH, beta_BTH,
                                          state_BHKV, valid_BT)
    r_BTF = rms_norm(remat.tag(r_BTHd, remat.MEM_CORE)).reshape(B, T, H * d).astype(x_BTD.dtype)
    gate_BTF = jax.nn.sigmoid(gate_BTF.astype(sd)).astype(x_BTD.dtype)
    out_BTD = self.proj(r_BTF * gate_BTF)
    return out_BTD if state_BHKV is None else (out_BTD, state_BHKV)

  def _continue(self, q_BTHd, k_BTHd, v_BTHd, log_gamma_BTH, beta_BTH, state_BHKV, valid_BT):
    """The gated delta rule from `state` over the valid tokens: (r [B,T,H,d] fp32, state)."""
    if valid_BT is not None:
      keep = valid_BT[:, :, None]
      log_gamma_BTH = jnp.where(keep, log_gamma_BTH, 0.0)
      beta_BTH = jnp.where(keep, beta_BTH, 0.0)
      k_BTHd = jnp.where(keep[..., None], k_BTHd, 0)
      v_BTHd = jnp.where(keep[..., None], v_BTHd, 0)
    if q_BTHd.shape[1] == 1:
      r_BHd, state_BHKV = gated_delta_step(q_BTHd[:, 0], k_BTHd[:, 0], v_BTHd[:, 0],
                                           log_gamma_BTH[:, 0], beta_BTH[:, 0], state_BHKV,
                                           impl=self.cfg.mem_step_impl or self.cfg.kernel_impl)
      return r_BHd[:, None], state_BHKV
    return gated_delta_rule(q_BTHd, k_BTHd, v_BTHd, log_gamma_BTH, beta_BTH,
                            initial_state=state_BHKV, output_final_state=True,
                            chunk_size=self.cfg.mem_chunk, impl=self.cfg.kernel_impl)
