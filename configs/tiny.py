"""Tiny ATMA for CPU tests and the embedded default run (a few minutes on 2 cores).

Same family and layer pattern as the canonical model (conv, conv, global, conv), scaled down:
4 layers, D=128, 4 query / 1 KV heads of 32, fp32 activations. The `live_mixers` init keeps the
LFM2 mixers trainable (see README: the reference init leaves them dead).
"""

from atma_jax.config import Config, EvalConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> Config:
  return Config(
      name="tiny",
      model=ModelConfig(
          num_layers=4, hidden_size=128, head_dim=32, mem_chunk=32,
          init_scheme="live_mixers", compute_dtype="float32", embed_dtype="float32"),
      optim=OptimConfig(loss_reduction="sum"),
      train=TrainConfig(seq_len=128, global_batch=8, micro_batch=8, steps=200,
                        run_dir="runs/tiny", log_every=10, eval_every=50, eval_batches=4,
                        checkpoint_every=100),
      eval=EvalConfig(trials=4, num_docs=2, logits_chunk=1024),
  )
