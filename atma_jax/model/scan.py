"""The repeating block group under `jax.lax.scan` (`ModelConfig.scan_layers`, issue #13).

Dimension glossary: B batch, T time, D hidden, P period (`global_every`), G groups.

Block l is global iff l % P == global_offset, so blocks [gP, gP + P) have the same structure for
every group g. `scan_groups` runs the first G = num_layers // P groups as one `lax.scan` over g
whose body is the P blocks of one group; the remaining num_layers % P blocks (and every block when
scanning is off) run unrolled in `Atma.forward_embeddings`. XLA then compiles one group instead
of num_layers blocks.

Where the stacked layout lives: inside the traced forward only. The model, the train state,
the optimizer (Muon orthogonalizes each 2-D kernel), checkpoints, interop, eval and generate
all keep the per-layer layout `blocks.<l>.…`; the P position-j parameter trees of the G groups
are stacked along a new leading axis ("layers", mapped to no mesh axis) at every forward, and
autodiff slices the stacked gradient back to the per-layer tree. That costs a copy of the block
parameters, alive from the forward to the backward, and of their gradients (the executable's
static peak grows by about one parameter-sized buffer; `bench/train_throughput.py --scan
false,true` measures it), in exchange for no second layout anywhere else.

Numerics equal the unrolled loop: block l draws `fold_in(rng, l)` with l = gP + j (the same
uint32 data, traced instead of constant), and the aux terms are summed in block order.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from atma_jax.sharding import constrain

LAYERS_AXIS = "layers"  # logical name of the stacked axis; no mesh axis (sharding.LOGICAL_RULES)


def scanned_layers(num_layers: int, period: int) -> int:
  """Blocks covered by the scan: the whole groups of `period` blocks from block 0."""
  return (num_layers // period) * period


def _stack(variables: list[nnx.Variable]) -> nnx.Variable:
  """The G per-layer copies of one parameter as one Variable [G, *shape] (same metadata)."""
  first = variables[0]
  stacked = jnp.stack([v.get_value() for v in variables])
  axes = first.get_metadata().get("out_sharding")
  if axes is not None:
    stacked = constrain(stacked, (LAYERS_AXIS, *axes))
  return first.replace(stacked)


def stack_group_states(blocks, period: int) -> tuple[list, list]:
  """([graphdef of position j], [state of position j, every leaf stacked over the G groups]).

  Raises ValueError if two blocks of one position differ in structure (not a repeating group).
  """
  groups = len(blocks) // period
  graphdefs, states = [], []
  for j in range(period):
    parts = [nnx.split(blocks[g * period + j]) for g in range(groups)]
    graphdef = parts[0][0]
    for g, (other, _) in enumerate(parts[1:], start=1):
      if other != graphdef:
        raise ValueError(f"blocks {j} and {g * period + j} differ in structure; scan_layers "
                         f"needs every group of {period} blocks to repeat (set "
                         "model.scan_layers=false)")
    states.append(jax.tree.map(lambda *vs: _stack(list(vs)), *[s for _, s in parts],
                               is_leaf=lambda x: isinstance(x, nnx.Variable)))
    graphdefs.append(graphdef)
  return graphdefs, states


def scan_groups(blocks, period: int, run_block: Callable, x_BTD: jax.Array,
                rng: jax.Array | None):
  """Blocks [0, G*P) as a scan over G groups: (x_BTD out, reg sum, align sum) in fp32.

  `run_block(block, x_BTD, rng_l) -> (x_BTD, reg, align)` runs one block (the one place that
  decides rematerialization, `Atma._run_block`); `rng_l = fold_in(rng, l)` as unrolled.
  """
  graphdefs, states = stack_group_states(blocks, period)
  groups = len(blocks) // period

  def group(carry, xs):
    x, reg, align = carry
    g, group_states = xs
    for j, (graphdef, state) in enumerate(zip(graphdefs, group_states)):
      layer = g * period + j
      rng_l = None if rng is None else jax.random.fold_in(rng, layer)
      x, reg_l, align_l = run_block(nnx.merge(graphdef, state), x, rng_l)
      reg = reg + reg_l
      align = align + align_l
    return (x, reg, align), None

  zero = jnp.zeros((), jnp.float32)
  (x, reg, align), _ = jax.lax.scan(group, (x_BTD, zero, zero),
                                    (jnp.arange(groups, dtype=jnp.int32), states))
  return x, reg, align
