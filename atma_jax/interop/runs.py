"""Our run directories, through the trainer's checkpoint API (`atma_jax.train.checkpoint`).

`load_run(path) -> (Config, graphdef, params)` and `save_run(run_dir, cfg, graphdef, params)`
delegate to the trainer's module, so an imported checkpoint has exactly the layout `eval.py` and
`load_model` read (docs/DESIGN.md "Checkpoints").
"""

from __future__ import annotations

import os

from atma_jax.errors import check_writable_dir
from atma_jax.interop.convert import InteropError


def _checkpoint_module():
  try:
    from atma_jax.train import checkpoint
  except ImportError as e:
    raise InteropError(f"atma_jax.train.checkpoint is not importable ({e}); run directories "
                       "cannot be read or written without it.") from None
  return checkpoint


def load_run(path: str, step: int | None = None):
  """(Config, graphdef, params) of a run directory (its newest intact step, or `step`) or of
  one of its checkpoints/<step> dirs."""
  if not os.path.exists(path):
    raise InteropError(f"checkpoint {path} does not exist; pass a run directory (holding "
                       "checkpoints/) or one checkpoints/<step> directory.")
  return _checkpoint_module().load_model(path, step=step)


def check_out_dir(run_dir: str) -> None:
  """An import must not overwrite a run: refuse a directory that already holds checkpoints, or
  one that cannot be written."""
  check_writable_dir(run_dir, "--out")
  ck = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(ck) and os.listdir(ck):
    raise InteropError(f"{run_dir} already holds checkpoints; import into a new run directory "
                       "(--out) so no training state is overwritten.")


class _ImportedDataState:
  """Data item of an imported checkpoint: no data has been consumed yet.

  The trainer's checkpoints carry the data iterator state; an imported model has none. Its
  state says so; restoring it into a real iterator is refused with a clear message.
  """

  STATE = {"atma_interop": "imported checkpoint: no data consumed; start the data from scratch"}

  def get_state(self):
    return dict(self.STATE)

  def set_state(self, state):
    raise InteropError("this checkpoint was made by `atma_jax.interop import` and has no data "
                       "iterator state; start a new run from its params instead of resuming.")


def save_run(run_dir: str, cfg, graphdef, params) -> str:
  """Writes an eval-loadable step-0 checkpoint of `params` under `run_dir`; returns its path.

  Uses the trainer's own pieces (`setup_state`, `make_manager`, `save`): the `state` item is a
  fresh TrainState (step 0, optimizer state initialized from the imported params), `config` the
  resolved Config, `data` a marker that no data was consumed.
  """
  del graphdef  # the trainer rebuilds it from the config
  check_out_dir(run_dir)
  ck = _checkpoint_module()
  import jax
  from atma_jax.config import MeshConfig
  from atma_jax.train import state as state_mod
  from atma_jax.train.mesh import make_mesh

  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  setup = state_mod.setup_state(cfg, mesh)
  params = jax.device_put(params, setup.shardings.params)
  train_state = jax.jit(lambda p: state_mod._fresh(p, setup.optimizer, cfg.train.seed),
                        out_shardings=setup.shardings)(params)
  mngr = ck.make_manager(run_dir, keep=max(1, cfg.train.keep_checkpoints), async_save=False)
  ck.save(mngr, 0, train_state, _ImportedDataState(), cfg, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return str(ck.checkpoint_dir(run_dir) / "0")
