"""The ATMA language model (ATMA_SPEC §2.1): embedding, L pre-norm blocks, final norm, capped head.

Dimension glossary: B batch, T time, D hidden, V vocab.

  h0 = E[ids]                          embedding stored in cfg.embed_dtype (bf16 in the reference)
  h_{l+1} = Block_l(h_l)               global (attention + memory) iff cfg.is_global(l); with
                                       cfg.scan_layers the whole groups of global_every blocks
                                       run as one lax.scan (scan.py), same numbers
  h = RMSNorm(h_L)                     returned by __call__ (compute dtype)
  logits = cap(proj(h)) in fp32        cap(z) = 15 z / sqrt(z^2 + 225) (rational, not tanh)

Attribute names mirror the torch state-dict keys (`embed.embedding` <-> `embed.weight`,
`blocks.<i>.…`, `norm.weight`, `proj.kernel/bias` <-> `proj.weight/bias`), so checkpoint
interop is a rename plus a transpose of Linear kernels and conv weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atma_jax.config import ConfigError, ModelConfig
from atma_jax.model import aux_losses
from atma_jax.model.block import ACT_AXES, Block
from atma_jax.model.cache import Cache, CacheError, TokenSpan, check_cache, check_fit
from atma_jax.model.init import INIT_SCHEMES, apply_init_scheme
from atma_jax.model.layers import Embed, Linear, RMSNorm, stats_dtype
from atma_jax.model.remat import checkpoint_block
from atma_jax.model.scan import scan_groups, scanned_layers
from atma_jax.sharding import constrain

SOFT_CAP = 15.0


def soft_cap(z: jax.Array) -> jax.Array:
  """15 z / sqrt(z^2 + 15^2), elementwise in fp32 (fp64 for fp64 input)."""
  return SOFT_CAP * z * jax.lax.rsqrt(z * z + SOFT_CAP * SOFT_CAP)


def capped_logits(z: jax.Array) -> jax.Array:
  """soft_cap of the LM head's output z (compute dtype) in its statistics dtype (fp32)."""
  return soft_cap(z.astype(stats_dtype(z.dtype)))


def check_model_config(cfg: ModelConfig) -> None:
  """cfg.validate() plus the constraints the modules themselves rely on."""
  cfg.validate()
  choices = {"attn_type": ("polar", "nope", "rope"), "init_scheme": INIT_SCHEMES,
             "kernel_impl": ("auto", "pallas", "xla"),
             "mem_step_impl": (None, "auto", "pallas", "xla")}
  for name, allowed in choices.items():
    if getattr(cfg, name) not in allowed:
      raise ConfigError(f"model.{name}={getattr(cfg, name)!r} is not supported; choose one of "
                        f"{', '.join(allowed)}.")
  for name in ("param_dtype", "embed_dtype", "compute_dtype"):
    if getattr(cfg, name) not in ("float32", "bfloat16", "float16", "float64"):
      raise ConfigError(f"model.{name}={getattr(cfg, name)!r} is not a dtype name; use float32, "
                        "bfloat16, float16 or float64.")
  if cfg.attn_type == "rope" and cfg.head_dim % 4:
    raise ConfigError(f"model.attn_type='rope' needs model.head_dim divisible by 4 (got "
                      f"{cfg.head_dim}): RoPE rotates head_dim/4 frequency pairs.")
  if cfg.num_kv_heads < 1:
    raise ConfigError(f"num_heads={cfg.num_heads} < model.gqa_ratio={cfg.gqa_ratio}: no KV head "
                      "left; lower gqa_ratio or raise hidden_size / head_dim.")


class Atma(nnx.Module):
  """ATMA LM. `Atma(cfg, rngs=nnx.Rngs(seed))`; see the module docstring."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    check_model_config(cfg)
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.embed_dtype),
                       rngs=rngs)
    self.blocks = nnx.List([Block(cfg, l, rngs=rngs) for l in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, param_dtype=pd)
    self.proj = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), param_dtype=pd,
                       rngs=rngs)
    apply_init_scheme(self, cfg.init_scheme)

  @property
  def num_global(self) -> int:
    return sum(1 for b in self.blocks if b.is_global)

  def embed_tokens(self, ids_BT: jax.Array) -> jax.Array:
    if ids_BT.ndim != 2 or not jnp.issubdtype(ids_BT.dtype, jnp.integer):
      raise ValueError(f"ids must be an integer array [B, T]; got {ids_BT.dtype}{ids_BT.shape}")
    return constrain(self.embed(ids_BT, jnp.dtype(self.cfg.compute_dtype)), ACT_AXES)

  def forward_embeddings(self, x_BTD: jax.Array, *, rng: jax.Array | None = None, q_offset=0,
                         mem: bool = True, sigreg_mode: str = "baseline", cache=None,
                         lengths=None):
    """Blocks + final norm on given input embeddings: (h_BTD, aux), or (h_BTD, aux, cache)
    when a decode `cache` is given (see `__call__`)."""
    aux_losses.check_sigreg_mode(sigreg_mode)
    if cache is not None:
      return self._forward_cached(x_BTD, cache, lengths, mem=mem)
    if not (isinstance(q_offset, int) and q_offset == 0):
      raise ValueError(
          f"q_offset={q_offset!r}: without a cache Atma.__call__ recomputes the whole context, "
          "so its rows must start at position 0; pass the full sequence, or continue a sequence "
          "with cache=init_cache(...) (atma_jax.generate.prefill / decode).")
    def run(block, x, rng_l):
      return self._run_block(block, x, rng_l, q_offset=q_offset, mem=mem,
                             sigreg_mode=sigreg_mode)

    reg = jnp.zeros((), jnp.float32)
    align = jnp.zeros((), jnp.float32)
    x = x_BTD
    blocks = list(self.blocks)
    first = scanned_layers(len(blocks), self.cfg.global_every) if self.cfg.scan_layers else 0
    if first:  # the whole groups of global_every blocks as one lax.scan (model/scan.py)
      x, reg, align = scan_groups(blocks[:first], self.cfg.global_every, run, x, rng)
    for l in range(first, len(blocks)):  # the rest (all blocks without scan_layers) unrolled
      rng_l = None if rng is None else jax.random.fold_in(rng, l)
      x, reg_l, align_l = run(blocks[l], x, rng_l)
      reg = reg + reg_l
      align = align + align_l
    h_BTD = self.norm(x)
    aux = {"reg": reg / len(self.blocks), "align": align / max(self.num_global, 1)}
    return h_BTD, aux

  def _forward_cached(self, x_BTD: jax.Array, cache: Cache, lengths, *, mem: bool):
    """The blocks continuing `cache`: (h_BTD, zero aux, cache advanced by `lengths`)."""
    B, T, _ = x_BTD.shape
    check_cache(self.cfg, cache, B)
    if T > cache.max_len:
      raise CacheError(f"{T} tokens do not fit a cache of max_len={cache.max_len}; build the "
                       "cache with a larger max_len or feed the prompt in shorter chunks")
    lengths_B = None if lengths is None else jnp.asarray(lengths).astype(jnp.int32)
    if lengths_B is not None and lengths_B.shape != (B,):
      raise CacheError(f"lengths must be int [B={B}] (real tokens per row); got shape "
                       f"{lengths_B.shape}")
    check_fit(cache, np.full((B,), T, np.int32) if lengths is None else lengths, T)
    span = TokenSpan(starts_B=cache.positions, lengths_B=lengths_B)
    x = x_BTD
    layers = []
    for block, layer_cache in zip(self.blocks, cache.layers):
      x, _, _, layer_cache = block(x, mem=mem, cache=layer_cache, span=span)
      layers.append(layer_cache)
    zero = jnp.zeros((), jnp.float32)
    new_cache = cache.replace(positions=span.advanced(T), layers=tuple(layers))
    return self.norm(x), {"reg": zero, "align": zero}, new_cache

  def _run_block(self, block: Block, x, rng, **kw):
    """block(x, rng=rng, **kw) under the remat policy cfg.remat (atma_jax/model/remat.py)."""
    if self.cfg.remat == "none":
      return block(x, rng=rng, **kw)
    graphdef, state = nnx.split(block)

    def run(state, x, rng):
      return nnx.merge(graphdef, state)(x, rng=rng, **kw)

    return checkpoint_block(run, self.cfg.remat)(state, x, rng)

  def __call__(self, ids_BT: jax.Array, *, rng: jax.Array | None = None, q_offset=0,
               mem: bool = True, sigreg_mode: str = "baseline", cache=None, lengths=None):
    """ids [B, T] -> (h [B, T, D] final-normed, compute dtype; aux {"reg", "align"} fp32).

    `rng` (training only) draws distractor keys (when cfg.num_random_keys > 0) and SigReg
    sketches; without it both aux losses are 0. `mem=False` drops the memory branch (eval's
    --no-mem). `q_offset` must be 0 without a cache.
    `sigreg_mode` is `optim.sigreg_mode` (baseline | weak | discrete | strong | zipfian).

    With `cache` (`atma_jax.model.cache.init_cache`) the tokens continue the cached sequences:
    row b's first `lengths[b]` tokens (default all T; the rest is right padding that touches no
    state) sit at positions cache.positions[b] + t. Returns (h, aux, new cache), the cache
    advanced by `lengths`; outputs at padded positions are meaningless.
    """
    return self.forward_embeddings(self.embed_tokens(ids_BT), rng=rng, q_offset=q_offset,
                                   mem=mem, sigreg_mode=sigreg_mode, cache=cache,
                                   lengths=lengths)

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Biased LM head (rounded to the compute dtype, as the reference) then the fp32 soft cap."""
    return capped_logits(self.proj(h_BTD))
