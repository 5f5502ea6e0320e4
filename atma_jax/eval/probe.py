"""Polar internals per global layer and context length (`eval.py --probe`).

Dimension glossary: B batch, T time, D hidden, H query heads, G KV heads, d head dim.

The probe runs the evaluation model block by block (embedding, then each `Block` in order, the
same calls `Atma.forward_embeddings` makes) and, at every Polar global block, rebuilds that
block's attention inputs with `GlobalMixer.core_inputs` (the method its `__call__` uses) and
hands them to `polar_stats` (the model ops seam: the kernel op's statistics of the same prologue/epilogue as
`polar_core`, window removed). Per layer it reports, mean over positions
(and heads), the effective key count `n_eff = 1/p2`, the magnitude `mag`, the null-sink
mass `w_N` and the temperature `temp`, plus the per-head means. The final hidden state is
returned too, so a test can check the block-by-block run against `Atma.__call__`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atma_jax.eval.forward import Forward
from atma_jax.model.ops import polar_stats

STATS = ("n_eff", "mag", "w_null", "temp")


def probe_fn(fwd: Forward):
  """A jitted `(params, ids_BT) -> ({layer: {stat: [H] mean over B, T}}, h_BTD)`."""
  graphdef, use_mem, impl = fwd.graphdef, fwd.mem, fwd.cfg.kernel_impl

  def run(params, ids_BT):
    model = nnx.merge(graphdef, params)
    x_BTD = model.embed_tokens(ids_BT)
    out = {}
    for layer, block in enumerate(model.blocks):
      if block.is_global:
        attn = block.attn
        q_BTHd, k_BTGd, v_BTGd = attn.core_inputs(block.norm1(x_BTD)).core
        st = polar_stats(q_BTHd, k_BTGd, v_BTGd, attn.v_null.get_value(),
                         attn.len_gain_raw.get_value(), attn.null_base.get_value(),
                         attn.null_slope_raw.get_value(), attn.mag_beta_raw.get_value(),
                         window=None, q_offset=0, impl=impl)
        out[str(layer)] = {k: jnp.mean(st[k].astype(jnp.float32), axis=(0, 1)) for k in STATS}
      x_BTD, _, _ = block(x_BTD, mem=use_mem)
    return out, model.norm(x_BTD)

  return jax.jit(run)


def polar_probe(fwd: Forward, seqs: Sequence[Sequence[int]], lengths: Sequence[int],
                progress=lambda n: None) -> dict[str, dict[str, dict]]:
  """`report[str(L)][str(layer)] = {n_eff, mag, w_null (means), per_head: {stat: [H]}}`.

  Every length reads the first L tokens of each sequence in `seqs` (batched together).
  """
  if fwd.cfg.attn_type != "polar":
    raise ValueError(f"--probe reports Polar internals; this model's attn_type is "
                     f"{fwd.cfg.attn_type!r}")
  run = probe_fn(fwd)
  report: dict[str, dict[str, dict]] = {}
  for length in lengths:
    ids = jnp.asarray(np.asarray([list(s[:length]) for s in seqs], np.int32))
    stats, _ = run(fwd.params, ids)
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
    report[str(length)] = {
        layer: {**{k: float(v[k].mean()) for k in STATS},
                "per_head": {k: [float(x) for x in v[k]] for k in STATS}}
        for layer, v in stats.items()}
    progress(len(seqs))
  return report
