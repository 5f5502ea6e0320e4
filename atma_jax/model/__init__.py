"""ATMA model family in Flax NNX (ATMA_SPEC §2-§5): `Atma`, `token_nll`, `loss_sum`.

Files, one concept each: `layers` (Linear, Embed, RMSNorm, depthwise causal conv, MLP), `lfm2`
(gated conv mixer), `rope`, `memory` (gated-delta MAG branch), `attention` (global mixer surround
+ cores), `block`, `atma` (the LM), `init` (init schemes), `aux_losses` (distractor, SigReg),
`loss` (chunked token NLL), `axes` (logical-axis metadata helpers), `cache` (the decode state
pytree), `kv_cache` (the attention core over a decode cache).
"""

from atma_jax.model.atma import Atma, soft_cap
from atma_jax.model.axes import logical_axes, param_partition_specs
from atma_jax.model.loss import loss_sum, token_nll

__all__ = ["Atma", "soft_cap", "token_nll", "loss_sum", "logical_axes", "param_partition_specs"]
