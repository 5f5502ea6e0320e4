"""The canonical ATMA: 378,220,864 parameters, Polar + gated-delta memory, Stage II recipe.

12 LFM2 conv blocks + 4 global blocks (indices 2, 6, 10, 14), D=1024, 8 query / 2 KV heads of
128, full causal context (no window), trained at 2K context, 256 x 2048 tokens per step.
"""

from atma_jax.config import Config, ModelConfig, TrainConfig


def config() -> Config:
  return Config(
      name="atma_378m",
      model=ModelConfig(),
      train=TrainConfig(seq_len=2048, global_batch=256, micro_batch=16, steps=18722,
                        run_dir="runs/atma_378m"),
  )
