"""A tiny trained-looking checkpoint for evaluation tests, saved through the trainer's API.

`tiny_eval_config()` is a 2-layer Polar + memory model over the real GPT-2 vocabulary (so the
held-out documents and needles tokenize as in a real run) with D=32; `save_tiny_checkpoint`
writes `<run_dir>/checkpoints/0/` with `atma_jax.train.checkpoint.save`. Weights are random
host draws (`random_like`), so zero-initialized paths (memory `proj`, `mu_proj`, `v_null`) are
alive and nothing is compiled to make them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from atma_jax.config import Config, EvalConfig, MeshConfig, ModelConfig, TrainConfig


def tiny_eval_config(**model_overrides) -> Config:
  model = dict(vocab_size=50304, num_layers=2, hidden_size=32, head_dim=8, gqa_ratio=2,
               global_every=2, global_offset=0, mem_chunk=16, compute_dtype="float32",
               embed_dtype="float32", param_dtype="float32", attn_window=32)
  model.update(model_overrides)
  return Config(name="tiny_eval", model=dataclasses.replace(ModelConfig(), **model),
                mesh=MeshConfig(data=1, fsdp=1, tensor=1),
                train=TrainConfig(seq_len=64, global_batch=1, micro_batch=1, steps=10,
                                  async_checkpoint=False),
                eval=EvalConfig(depths=(0.25, 0.75), trials=2, num_docs=2,
                                logits_chunk=48)).validate()


class _StaticIterator:
  """The smallest checkpointable data iterator (the checkpoint's `data` item)."""

  def get_state(self):
    return {"pos": 0}

  def set_state(self, state):
    del state


def random_like(abstract, seed: int = 0, scale: float = 0.3):
  """Host-drawn parameters shaped like `abstract` (a State of ShapeDtypeStructs): 2-D leaves
  U(-scale, scale)/sqrt(fan_in), vectors U(-scale, scale), RMSNorm weights 1 + that. Every path
  is alive (no zero-initialized projection); no per-leaf compile, so it is instant on CPU."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    bound = scale / np.sqrt(x.shape[0]) if len(x.shape) == 2 else scale
    val = rng.uniform(-bound, bound, size=x.shape)
    if "norm" in jax.tree_util.keystr(path) and len(x.shape) == 1:
      val = val + 1.0
    return jnp.asarray(val, x.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def tiny_params(cfg: Config | None = None, seed: int = 0):
  """(graphdef, params) of `Atma(cfg.model)` with `random_like` weights."""
  from flax import nnx

  from atma_jax.model import Atma

  cfg = cfg or tiny_eval_config()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Atma(cfg.model, rngs=nnx.Rngs(0))),
                                 nnx.Param)
  return graphdef, random_like(abstract, seed)


@jax.jit
def noisy(params, key: jax.Array, scale: float = 0.3):
  """Adds U(-scale, scale) / sqrt(fan_in) noise to every 2-D leaf and U(-scale, scale) to others
  (on device; for large models whose parameters should not travel through the host)."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for k, x in zip(jax.random.split(key, len(leaves)), leaves):
    bound = scale / (x.shape[0] ** 0.5) if x.ndim == 2 else scale
    out.append((x + jax.random.uniform(k, x.shape, jnp.float32, -bound, bound)).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


def save_tiny_checkpoint(run_dir, cfg: Config | None = None, seed: int = 0) -> Path:
  """Writes a step-0 checkpoint with `random_like` params (optimizer state zeros) through
  `atma_jax.train.checkpoint.save`; returns its step directory."""
  from atma_jax.train import checkpoint as ckpt
  from atma_jax.train.mesh import make_mesh
  from atma_jax.train.state import setup_state

  cfg = cfg or tiny_eval_config()
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  setup = setup_state(cfg, mesh)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), setup.abstract)
  state = zeros._replace(params=random_like(setup.abstract.params, seed))
  mngr = ckpt.make_manager(run_dir, keep=1, async_save=False)
  ckpt.save(mngr, 0, state, _StaticIterator(), cfg, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return ckpt.checkpoint_dir(run_dir) / "0"
