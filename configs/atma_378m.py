"""The canonical ATMA: 378,220,864 parameters, Polar + gated-delta memory, Stage II recipe.

12 LFM2 conv blocks + 4 global blocks (indices 2, 6, 10, 14), D=1024, 8 query / 2 KV heads of
128, full causal context (no window), trained at 2K context, 256 x 2048 tokens per step.

`remat="dots"`: each block keeps its matmul and kernel outputs for the backward pass and
recomputes norms, activations, gates and convs. Measured on one H200 in one call at micro-batch
16 (bench/results/train_remat_h200.json): none 187.6K tok/s at a 46.5 GiB peak, dots 177.7K at
28.7 GiB, dots_no_mlp_fc 164.3K at 20.8 GiB; the original trainer's peak at this micro-batch is
33.1 GiB (bench/results/train_vs_original_h200.json), so `dots` is the default that fits it.
`--set model.remat=none` trades 17.8 GiB for 5.6% more throughput.
"""

from atma_jax.config import Config, ModelConfig, TrainConfig


def config() -> Config:
  return Config(
      name="atma_378m",
      model=ModelConfig(remat="dots"),
      train=TrainConfig(seq_len=2048, global_batch=256, micro_batch=16, steps=18722,
                        run_dir="runs/atma_378m"),
  )
