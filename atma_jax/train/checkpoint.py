"""Checkpoints: orbax `CheckpointManager` in `<run_dir>/checkpoints/<step>/`.

Items per step (docs/DESIGN.md "Checkpoints"):
  state   the TrainState (params, optimizer state, step, rng), sharded, via StandardSave
  data    the data iterator state, one JSON file per process (grain's checkpoint handler)
  config  the resolved Config as JSON

`load_model(path) -> (Config, graphdef, params)` accepts a run dir, its `checkpoints` dir or one
step dir. A missing, partial (interrupted save, missing item) or architecture-mismatched
checkpoint raises `CheckpointError` naming the problem before anything is computed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from atma_jax.config import Config, ConfigError, from_dict, to_dict
from atma_jax.errors import AtmaError
from atma_jax.train.optimizer import dotted_path

ITEMS = ("state", "data", "config")


class CheckpointError(AtmaError, RuntimeError):
  """A checkpoint that cannot be used (missing, partial, other architecture)."""


class IteratorAdapter:
  """Gives any iterator with get_state()/set_state() (dict or bytes) grain's checkpoint API."""

  def __init__(self, it):
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
      raise TypeError(f"data iterator {type(it).__name__} has no get_state()/set_state(); it "
                      "cannot be checkpointed (use a grain iterator).")
    self.it = it

  def get_state(self) -> bytes:
    s = self.it.get_state()
    return s if isinstance(s, bytes) else json.dumps({"__json__": s}).encode()

  def set_state(self, b: bytes) -> None:
    try:
      obj = json.loads(b.decode())
    except (ValueError, UnicodeDecodeError):
      obj = None
    self.it.set_state(obj["__json__"] if isinstance(obj, dict) and "__json__" in obj else b)

  def start_prefetch(self) -> None:
    pass


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
  return Path(run_dir).absolute() / "checkpoints"


def make_manager(run_dir, *, keep: int, async_save: bool, create: bool = True
                 ) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(run_dir), options=opts, item_names=ITEMS,
                               item_handlers=_item_handlers())


def _item_handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler(),
          "config": ocp.JsonCheckpointHandler()}


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, cfg: Config,
         *, force: bool = False) -> bool:
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(IteratorAdapter(data_iter)),
      config=ocp.args.JsonSave(to_dict(cfg)))
  return mngr.save(step, args=args, force=force)


# ---------------------------------------------------------------------------------------------
# Validation (before any compute)


def _step_dirs(ckpt_dir: Path) -> list[int]:
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def check_step_dir(step_dir: Path) -> None:
  """Raises CheckpointError unless `step_dir` is a finished save with every item."""
  if not step_dir.exists():
    raise CheckpointError(f"checkpoint {step_dir} does not exist.")
  if ".orbax-checkpoint-tmp" in step_dir.name or not (step_dir / "_CHECKPOINT_METADATA").exists():
    raise CheckpointError(
        f"checkpoint {step_dir} is partial (the save was interrupted before it was committed); "
        "delete it and resume from an earlier step.")
  missing = [i for i in ITEMS if not (step_dir / i).is_dir()]
  if missing:
    raise CheckpointError(f"checkpoint {step_dir} is partial: item(s) {missing} missing "
                          f"(expected {list(ITEMS)}); delete it or pick another step.")


def resolve_step_dir(path) -> Path:
  """A run dir, `<run>/checkpoints` or `<run>/checkpoints/<step>` -> the step dir to load."""
  p = Path(path).absolute()
  if not p.exists():
    raise CheckpointError(f"checkpoint path {p} does not exist; pass a run directory "
                          "(with checkpoints/) or a step directory checkpoints/<step>.")
  if p.name.isdigit() and (p.parent.name == "checkpoints" or (p / "config").exists()):
    check_step_dir(p)
    return p
  ckpt = p if p.name == "checkpoints" else p / "checkpoints"
  steps = _step_dirs(ckpt)
  if not steps:
    raise CheckpointError(f"no checkpoints under {ckpt}; train first (python train.py) or pass "
                          "the path of a run directory that has checkpoints/<step>/.")
  step_dir = ckpt / str(steps[-1])
  check_step_dir(step_dir)
  return step_dir


def read_config(step_dir: Path) -> Config:
  files = [f for f in (step_dir / "config").iterdir() if f.is_file()]
  if not files:
    raise CheckpointError(f"checkpoint {step_dir}: config item is empty (partial save).")
  try:
    return from_dict(json.loads(files[0].read_text()))
  except (ValueError, ConfigError) as e:
    raise CheckpointError(f"checkpoint {step_dir}: unreadable config item ({e}).") from None


def check_same_model(saved: Config, requested: Config, where) -> None:
  """Raises CheckpointError if the architectures differ (fields that change parameters)."""
  shape_free = {"kernel_impl", "remat", "mem_chunk", "compute_dtype"}
  diffs = [f"model.{f.name}: checkpoint {getattr(saved.model, f.name)!r} vs requested "
           f"{getattr(requested.model, f.name)!r}"
           for f in dataclasses.fields(saved.model)
           if f.name not in shape_free
           and getattr(saved.model, f.name) != getattr(requested.model, f.name)]
  if diffs:
    raise CheckpointError(f"checkpoint {where} is from another architecture: " + "; ".join(diffs)
                          + ". Resume with the saved config (--config <run>/config.json) or "
                          "start a new run_dir.")


def check_shapes(mngr: ocp.CheckpointManager, step: int, abstract_state, where) -> None:
  """Saved array shapes must equal the target's (catches a changed model under equal configs)."""
  try:
    meta = mngr.item_metadata(step)["state"]
  except Exception as e:  # noqa: BLE001 - any unreadable metadata means a broken checkpoint
    raise CheckpointError(f"checkpoint {where}: cannot read the state metadata ({e}).") from None
  if meta is None:
    return
  saved = {dotted_path(k): tuple(v.shape)
           for k, v in jax.tree_util.tree_flatten_with_path(meta)[0] if hasattr(v, "shape")}
  want = {dotted_path(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  bad = [f"{k}: saved {saved.get(k)} vs expected {v}" for k, v in want.items()
         if saved.get(k) != v]
  if bad:
    raise CheckpointError(f"checkpoint {where} does not match the model: {len(bad)} array(s) "
                          f"differ, e.g. {bad[:3]}.")


# ---------------------------------------------------------------------------------------------
# Restore


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter,
            cfg: Config) -> Any:
  """Restores `step` into the (sharded) abstract state and `data_iter`; returns the state."""
  step_dir = Path(mngr.directory) / str(step)
  check_step_dir(step_dir)
  check_same_model(read_config(step_dir), cfg, step_dir)
  check_shapes(mngr, step, abstract_state, step_dir)
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(IteratorAdapter(data_iter))
  out = mngr.restore(step, args=ocp.args.Composite(**args))
  return out["state"]


def load_model(path, requested: Config | None = None, model_fn=None):
  """(Config, graphdef, params) from a run dir or step dir; params on the default device."""
  from atma_jax.train.mesh import make_mesh
  from atma_jax.train.state import setup_state
  from atma_jax.config import MeshConfig

  step_dir = resolve_step_dir(path)
  cfg = read_config(step_dir)
  if requested is not None:
    check_same_model(cfg, requested, step_dir)
  mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  setup = setup_state(cfg, mesh, model_fn)
  mngr = ocp.CheckpointManager(step_dir.parent, item_names=ITEMS, item_handlers=_item_handlers(),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = int(step_dir.name)
  check_shapes(mngr, step, setup.abstract, step_dir)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(setup.abstract)))
  mngr.close()
  return cfg, setup.graphdef, out["state"].params
