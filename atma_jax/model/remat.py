"""Named rematerialization policies (`model.remat`): what a block keeps for its backward pass.

Every block runs under `checkpoint_block(fn, cfg.remat)`; the policy decides which of the
block's intermediates autodiff stores and which the backward recomputes from the block input:

  none         no jax.checkpoint: every residual autodiff wants is kept (fastest, most memory)
  block        nothing but the block input is kept; the whole block runs again in the backward
               (the old `remat=true`)
  dots         the matmul outputs (every projection, tagged below) and the attention / memory
               kernel outputs are kept; norms, activations, gates and other elementwise work
               are recomputed
  dots_no_mlp_fc  as dots, except the MLP's two fc outputs a, g (each F = mlp_ratio * D wide,
               the largest tensors of a block): the fc matmul runs again in the backward
  kernels      only the attention / memory kernel outputs are kept (and the block input):
               projections, norms and the MLP are recomputed, the kernels are not

"Kernel outputs" are the tagged core outputs plus the outputs of every `pallas_call` (on a GPU
or TPU these are the Pallas kernels' forward residuals, e.g. attention's o / lse, so the
backward does not rerun a kernel forward; the XLA fallback on a CPU has no pallas_call).

Tags (`jax.ad_checkpoint.checkpoint_name`) are placed in the block's modules; names outside a
checkpointed block have no effect. Every policy is built from "save only these": JAX's "save
anything except these names" keeps the untagged input of a tagged value, which is the same
array. `bench/remat_memory.py` measures what each policy keeps.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from atma_jax.config import REMAT_POLICIES

# Tags on block intermediates. Matmul outputs:
MIXER_PROJ = "mixer_proj"  # mixer input projections: LFM2 in_proj, q / k / v, memory gates
MIXER_OUT = "mixer_out"  # the mixer's output (its output projections summed)
MLP_FC = "mlp_fc"  # the MLP's fc outputs a, g [.., F] (F = mlp_ratio * D)
MLP_OUT = "mlp_out"  # the MLP's output projection
# Kernel outputs:
ATTN_CORE = "attn_core"  # the attention core's outputs (Polar c, mag; softmax y)
MEM_CORE = "mem_core"  # the gated delta rule's output r

MATMUL_TAGS = (MIXER_PROJ, MIXER_OUT, MLP_FC, MLP_OUT)
KERNEL_TAGS = (ATTN_CORE, MEM_CORE)


def tag(x, name: str):
  """`x` (an array or a tuple of arrays) named `name` for the remat policies."""
  return checkpoint_name(x, name)


def _pallas_outputs(prim, *_, **__) -> bool:
  return prim.name == "pallas_call"


def _names_and_kernels(*names: str):
  return jax.checkpoint_policies.save_from_both_policies(
      jax.checkpoint_policies.save_only_these_names(*names), _pallas_outputs)


POLICIES: dict[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": _names_and_kernels(*MATMUL_TAGS, *KERNEL_TAGS),
    "dots_no_mlp_fc": _names_and_kernels(MIXER_PROJ, MIXER_OUT, MLP_OUT, *KERNEL_TAGS),
    "kernels": _names_and_kernels(*KERNEL_TAGS),
}
assert tuple(POLICIES) == REMAT_POLICIES, "config.REMAT_POLICIES and POLICIES disagree"


def checkpoint_block(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
  """`fn` wrapped in `jax.checkpoint` with the named policy (`fn` itself for "none").

  `fn` is a pure function of arrays (e.g. a block's split state, x, rng). Pass
  `prevent_cse=False` when calling it inside `lax.scan` (the scan already keeps the recompute
  from being merged with the forward)."""
  if policy not in POLICIES:
    raise ValueError(f"remat policy {policy!r} is not one of {', '.join(POLICIES)}")
  saveable = POLICIES[policy]
  if saveable is None:
    return fn
  return jax.checkpoint(fn, policy=saveable, prevent_cse=prevent_cse)
