"""Small ATMA for matched sweeps on one GPU (`configs/sweep_small.py`): 86M parameters.

Same family and layer pattern as the canonical model (conv, conv, global, conv, ...), scaled
down: 8 layers (2 global), D=512, 8 query / 2 KV heads of 64, bf16 activations; trained at
seq_len 512 on the Debian english corpus (CPython + Linux kernel docs) from prepared shards, and
evaluated on held-out Austen novels. 34.5M parameters outside the embedding and LM head (25.8M
each). Token budget: `train.steps` x 65,536 (128 rows of 512).

Data, once (network + Debian packages; the GPU machine gets the result as carried files):
  apt-get update && apt-get install -y python3.11-doc linux-source-6.1 r-cran-janeaustenr bible-kjv
  python -m atma_jax.data.prepare --source english --out data_cache/sweep_small/english \\
      --heldout-cache data_cache/sweep_small
"""

from atma_jax.config import (Config, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                             TrainConfig)

DATA_DIR = "data_cache/sweep_small"


def config() -> Config:
  return Config(
      name="small",
      model=ModelConfig(num_layers=8, hidden_size=512, head_dim=64, mem_chunk=64),
      data=DataConfig(source="english", path=f"{DATA_DIR}/english", cache_dir=DATA_DIR),
      optim=OptimConfig(),
      train=TrainConfig(seq_len=512, global_batch=128, micro_batch=32, steps=600,
                        run_dir="runs/small", log_every=10, eval_every=100, eval_batches=8,
                        checkpoint_every=0, keep_checkpoints=1),
      eval=EvalConfig(trials=16, num_docs=4, logits_chunk=8192),
  )
