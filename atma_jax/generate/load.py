"""A `Generator` from a checkpoint directory, through the trainer's loader (as `eval.py`).

Accepts what `eval.py --checkpoint` accepts: a run directory written by `train.py` (its latest
checkpoint), one of its `checkpoints/<step>` folders, or a run directory written by
`python -m atma_jax.interop import` from the original's weights. Generation runs the evaluation
architecture (ATMA_SPEC §7: the training window removed, no distractor keys) unless
`keep_window` asks for the trained window.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from atma_jax.config import Config
from atma_jax.generate.loop import Generator


def checkpoint_config(path: str, step: int | None = None) -> tuple[Path, Config]:
  """(step_dir, Config) of a checkpoint, as eval.py resolves it; reads no arrays. `step` picks
  checkpoints/<step> of a run directory. Raises `atma_jax.train.checkpoint.CheckpointError`
  naming the problem."""
  from atma_jax.train import checkpoint as ckpt

  step_dir = ckpt.resolve_step_dir(path, step=step)
  return step_dir, ckpt.read_config(step_dir)


def generation_model_config(cfg: Config, *, keep_window: bool = False, impl: str | None = None):
  """The architecture generation runs: eval's (window removed) unless `keep_window`."""
  from atma_jax.eval.forward import eval_model_config

  model = eval_model_config(cfg.model)
  if keep_window:
    model = dataclasses.replace(model, attn_window=cfg.model.attn_window)
  if impl is not None:
    model = dataclasses.replace(model, kernel_impl=impl)
  return model


def load_generator(step_dir: Path, cfg: Config, *, keep_window: bool = False,
                   impl: str | None = None, prefill_chunk: int | None = None) -> Generator:
  """Reads the parameters of `step_dir` (from `checkpoint_config`) into a Generator."""
  from atma_jax.eval.forward import eval_graphdef
  from atma_jax.train import checkpoint as ckpt

  _, _, params = ckpt.load_model(step_dir)
  model_cfg = generation_model_config(cfg, keep_window=keep_window, impl=impl)
  kw = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
  return Generator(model_cfg, eval_graphdef(model_cfg), params, **kw)
