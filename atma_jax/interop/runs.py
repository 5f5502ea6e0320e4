"""Our run directories, through the trainer's checkpoint API (`atma_jax.train.checkpoint`).

`load_run(path) -> (Config, graphdef, params)` and `save_run(run_dir, cfg, graphdef, params)`
delegate to the trainer's module, so an imported checkpoint has exactly the layout `eval.py` and
`load_model` read (docs/DESIGN.md "Checkpoints").
"""

from __future__ import annotations

import os

from atma_jax.interop.convert import InteropError


def _checkpoint_module():
  try:
    from atma_jax.train import checkpoint
  except ImportError as e:
    raise InteropError(f"atma_jax.train.checkpoint is not importable ({e}); run directories "
                       "cannot be read or written without it.") from None
  return checkpoint


def load_run(path: str):
  """(Config, graphdef, params) of a run directory or one of its checkpoints/<step> dirs."""
  if not os.path.exists(path):
    raise InteropError(f"checkpoint {path} does not exist; pass a run directory (holding "
                       "checkpoints/) or one checkpoints/<step> directory.")
  return _checkpoint_module().load_model(path)


def check_out_dir(run_dir: str) -> None:
  """An import must not overwrite a run: refuse a directory that already holds checkpoints."""
  ck = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(ck) and os.listdir(ck):
    raise InteropError(f"{run_dir} already holds checkpoints; import into a new run directory "
                       "(--out) so no training state is overwritten.")


def save_run(run_dir: str, cfg, graphdef, params) -> str:
  """Writes an eval-loadable step-0 checkpoint of `params` under `run_dir`; returns its path."""
  check_out_dir(run_dir)
  return _checkpoint_module().save_model(run_dir, cfg, params, graphdef=graphdef)
