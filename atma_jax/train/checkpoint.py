"""Checkpoints: orbax `CheckpointManager` in `<run_dir>/checkpoints/<step>/`.

Items per step (docs/DESIGN.md "Checkpoints"):
  state   the TrainState (params, optimizer state, step, rng), sharded, via StandardSave
  data    the data iterator state, one JSON file per process (grain's checkpoint handler)
  config  the resolved Config as JSON (`config/metadata`)

`save` refuses a state with a non-finite value and stores a digest of every array of the state
(`digest.py`) in the step's `_CHECKPOINT_METADATA`; every restore recomputes them and compares.

`load_checkpoint(path, step=...)` / `load_model(path)` accept a run dir, its `checkpoints` dir or
one step dir. A missing, partial (interrupted save, missing item or file), corrupt (unreadable or
truncated file, digest mismatch) or architecture-mismatched checkpoint raises `CheckpointError`
naming the file before anything is computed with it. Given a run dir and no step, a corrupt or
partial newest step falls back to the newest intact one with a one-line warning
(`CorruptCheckpointError` is the kind that falls back; a mismatch with the request does not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import grain
import jax
import orbax.checkpoint as ocp

from atma_jax.config import Config, ConfigError, from_dict, to_dict
from atma_jax.errors import AtmaError
from atma_jax.train import digest
from atma_jax.train.divergence import DivergenceError
from atma_jax.train.optimizer import dotted_path

ITEMS = ("state", "data", "config")
CONFIG_FILE = "metadata"  # JsonCheckpointHandler's file name inside the config item
DIGEST_KEY = "atma_state_digest"  # custom_metadata entry: {array path: 8 hex digits}
SET_ASIDE = "checkpoints_set_aside"  # <run_dir>/<this>/<step>: steps newer than a resume point
# Fields whose change reinterprets the saved data position (a batch index into the token stream).
DATA_POSITION_FIELDS = (("train", "seq_len"), ("train", "global_batch"), ("data", "source"),
                        ("data", "seed"), ("data", "val_fraction"), ("data", "hf_name"))


class CheckpointError(AtmaError, RuntimeError):
  """A checkpoint that cannot be used (missing, partial, other architecture)."""


class CorruptCheckpointError(CheckpointError):
  """One step's files are partial or damaged; an earlier step may still be intact."""


def _warn(msg: str) -> None:
  print(msg, file=sys.stderr)


class IteratorAdapter:
  """Gives any iterator with get_state()/set_state() (dict or bytes) grain's checkpoint API.

  `source` (the state file) is named when a restored state cannot be applied."""

  def __init__(self, it, source: str | None = None):
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
      raise TypeError(f"data iterator {type(it).__name__} has no get_state()/set_state(); it "
                      "cannot be checkpointed (use a grain iterator).")
    self.it = it
    self.source = source

  def get_state(self) -> bytes:
    s = self.it.get_state()
    return s if isinstance(s, bytes) else json.dumps({"__json__": s}).encode()

  def set_state(self, b: bytes) -> None:
    try:
      obj = json.loads(b.decode())
    except (ValueError, UnicodeDecodeError):
      obj = None
    state = obj["__json__"] if isinstance(obj, dict) and "__json__" in obj else b
    if isinstance(state, dict) and "atma_interop" in state:  # interop/runs.py writes this
      raise CheckpointError(f"{self.source or 'data-iterator state'}: {state['atma_interop']}; "
                            "this checkpoint was imported, start a new run from its params.")
    try:
      self.it.set_state(state)
    except Exception as e:  # noqa: BLE001 - any failure means a state this iterator cannot use
      raise CorruptCheckpointError(
          f"{self.source or 'data-iterator state'}: not a state {type(self.it).__name__} can "
          f"resume from ({type(e).__name__}: {e}).") from None

  def start_prefetch(self) -> None:
    pass


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
  return Path(run_dir).absolute() / "checkpoints"


def make_manager(run_dir, *, keep: int, async_save: bool, create: bool = True
                 ) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                      enable_async_checkpointing=async_save,
                                      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(run_dir), options=opts, item_names=ITEMS,
                               item_handlers=_item_handlers())


def _item_handlers() -> dict:
  return {"state": ocp.StandardCheckpointHandler(),
          "data": grain.checkpoint.CheckpointHandler(),
          "config": ocp.JsonCheckpointHandler(filename=CONFIG_FILE)}


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, cfg: Config,
         *, force: bool = False) -> bool:
  """Saves `step` with the digests of `state`; raises DivergenceError if it is not finite."""
  digests, nonfinite = digest.summarize(state)
  if nonfinite:
    raise DivergenceError(
        f"the state after step {step} has non-finite values in {len(nonfinite)} array(s), e.g. "
        f"{nonfinite[:3]}; it was not saved (the newest checkpoint under {mngr.directory} is "
        "the last finite one).")
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(IteratorAdapter(data_iter)),
      config=ocp.args.JsonSave(to_dict(cfg)))
  return mngr.save(step, args=args, force=force, custom_metadata={DIGEST_KEY: digests})


# ---------------------------------------------------------------------------------------------
# Validation (before any compute)


def _step_dirs(ckpt_dir: Path) -> list[int]:
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _data_file(step_dir: Path) -> Path:
  return step_dir / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def check_step_dir(step_dir: Path, *, with_data: bool = False) -> None:
  """Raises CheckpointError unless `step_dir` is a finished save with every item and file.

  `with_data`: also this process's data-iterator file (needed to resume training)."""
  if not step_dir.exists():
    raise CheckpointError(f"checkpoint {step_dir} does not exist.")
  if ".orbax-checkpoint-tmp" in step_dir.name or not (step_dir / "_CHECKPOINT_METADATA").exists():
    raise CorruptCheckpointError(
        f"checkpoint {step_dir} is partial (the save was interrupted before it was committed); "
        "delete it and resume from an earlier step.")
  missing = [i for i in ITEMS if not (step_dir / i).is_dir()]
  if missing:
    raise CorruptCheckpointError(
        f"checkpoint {step_dir} is partial: item(s) {missing} missing (expected {list(ITEMS)}); "
        "delete it or pick another step.")
  for f in (step_dir / "state" / "_METADATA", step_dir / "config" / CONFIG_FILE):
    if not f.is_file():
      raise CorruptCheckpointError(f"checkpoint {step_dir} is incomplete: {f} is missing; "
                                   "delete this step or pick another one (--step).")
  if with_data:
    f = _data_file(step_dir)
    if not f.is_file():
      saved = sorted(p.name for p in (step_dir / "data").glob("process_*.json"))
      # files of another process count: a mismatch with this launch (no fallback), not damage
      kind = CheckpointError if saved else CorruptCheckpointError
      raise kind(f"checkpoint {step_dir}: data-iterator file {f} is missing (found {saved}; "
                 f"resuming with {jax.process_count()} process(es) needs it).")
    try:
      json.loads(f.read_bytes().decode())
    except (ValueError, UnicodeDecodeError) as e:
      raise CorruptCheckpointError(f"checkpoint {step_dir}: data-iterator file {f} is garbled "
                                   f"(not JSON: {e}).") from None


def is_step_dir(path) -> bool:
  """Whether `path` names one step directory (not a run or checkpoints dir)."""
  p = Path(path).absolute()
  return p.name.isdigit() and (p.parent.name == "checkpoints" or (p / "config").exists())


def candidates(path, step: int | None = None, *, older_ok: bool = False
               ) -> tuple[list[Path], bool]:
  """(step dirs to try, newest first; whether a failing one may fall back to the next).

  A run dir or `checkpoints` dir with no `step`: every step, falling back. A step dir, or a
  `step`: just that one, unless `older_ok` (then the intact older steps follow it)."""
  p = Path(path).absolute()
  if not p.exists():
    raise CheckpointError(f"checkpoint path {p} does not exist; pass a run directory "
                          "(with checkpoints/) or a step directory checkpoints/<step>.")
  if is_step_dir(p):
    if step is not None and step != int(p.name):
      raise CheckpointError(f"--step {step} contradicts the step directory {p}; pass the run "
                            "directory with --step, or the step directory alone.")
    ckpt, first = p.parent, int(p.name)
  else:
    ckpt = p if p.name == "checkpoints" else p / "checkpoints"
    steps = _step_dirs(ckpt)
    if not steps:
      raise CheckpointError(f"no checkpoints under {ckpt}; train first (python train.py) or "
                            "pass the path of a run directory that has checkpoints/<step>/.")
    if step is None:
      return [ckpt / str(s) for s in reversed(steps)], True
    if step not in steps:
      raise CheckpointError(f"--step {step}: there is no checkpoint {ckpt / str(step)}; "
                            f"available steps: {steps}.")
    first = step
  if not older_ok:
    return [ckpt / str(first)], False
  return [ckpt / str(s) for s in reversed(_step_dirs(ckpt)) if s <= first], True


def first_intact(dirs: list[Path], fallback: bool, attempt: Callable[[Path], Any],
                 warn: Callable[[str], None] = _warn) -> tuple[Path, Any]:
  """(step dir, attempt(step dir)) of the first dir whose attempt succeeds.

  A CorruptCheckpointError moves on to the next dir (with a one-line warning) when `fallback`;
  any other error, or the last dir failing, raises."""
  for i, d in enumerate(dirs):
    try:
      return d, attempt(d)
    except CorruptCheckpointError as e:
      if not fallback or i == len(dirs) - 1:
        raise
      warn(f"warning: skipping checkpoint step {d.name}: {e} Falling back to step "
           f"{dirs[i + 1].name}.")
  raise CheckpointError("no checkpoint to try.")


def resolve_step_dir(path, step: int | None = None, warn: Callable[[str], None] = _warn) -> Path:
  """A run dir, `<run>/checkpoints` or `<run>/checkpoints/<step>` -> the step dir to load: the
  given step, else the newest step whose files are complete (file checks only, no arrays)."""
  dirs, fallback = candidates(path, step)
  return first_intact(dirs, fallback, check_step_dir, warn)[0]


def read_config(step_dir: Path) -> Config:
  f = step_dir / "config" / CONFIG_FILE
  if not f.is_file():
    raise CorruptCheckpointError(f"checkpoint {step_dir}: config file {f} is missing "
                                 "(partial save).")
  try:
    return from_dict(json.loads(f.read_text()))
  except (ValueError, UnicodeDecodeError, ConfigError) as e:
    raise CorruptCheckpointError(f"checkpoint {step_dir}: unreadable config file {f} "
                                 f"({e}).") from None


def check_same_model(saved: Config, requested: Config, where) -> None:
  """Raises CheckpointError if the architectures differ (fields that change parameters)."""
  shape_free = {"kernel_impl", "remat", "scan_layers", "mem_chunk", "compute_dtype"}
  diffs = [f"model.{f.name}: checkpoint {getattr(saved.model, f.name)!r} vs requested "
           f"{getattr(requested.model, f.name)!r}"
           for f in dataclasses.fields(saved.model)
           if f.name not in shape_free
           and getattr(saved.model, f.name) != getattr(requested.model, f.name)]
  if diffs:
    raise CheckpointError(f"checkpoint {where} is from another architecture: " + "; ".join(diffs)
                          + ". Resume with the saved config (--config <run>/config.json) or "
                          "start a new run_dir.")


def check_same_data_position(saved: Config, requested: Config, where) -> None:
  """Raises CheckpointError if resuming would read the saved data position differently."""
  diffs = [f"{sec}.{name}: checkpoint {getattr(getattr(saved, sec), name)!r} vs requested "
           f"{getattr(getattr(requested, sec), name)!r}"
           for sec, name in DATA_POSITION_FIELDS
           if getattr(getattr(saved, sec), name) != getattr(getattr(requested, sec), name)]
  if diffs:
    raise CheckpointError(f"checkpoint {where} saved its data position (a batch index) for "
                          "another data layout: " + "; ".join(diffs) + ". Resuming would "
                          "reinterpret it; resume with the saved values (--config "
                          "<run>/config.json) or start a new run_dir.")


def check_shapes(mngr: ocp.CheckpointManager, step: int, abstract_state, where) -> None:
  """Saved array shapes must equal the target's (catches a changed model under equal configs)."""
  try:
    meta = mngr.item_metadata(step)["state"]
  except Exception as e:  # noqa: BLE001 - any unreadable metadata means a broken checkpoint
    raise CorruptCheckpointError(f"checkpoint {where}: the state's array metadata cannot be "
                                 f"read, a file under {Path(where) / 'state'} is corrupt "
                                 f"({_first_line(e)}).") from None
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


def _first_line(e: BaseException) -> str:
  """The most specific message in an exception chain, first line only."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _suspect_files(step_dir: Path, reason: str) -> str:
  """Names the state file(s) of the byte size a tensorstore read error mentions, if any."""
  m = re.search(r"value of size (\d+)", reason)
  if not m:
    return ""
  size = int(m.group(1))
  hits = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size == size]
  return f" (file {', '.join(str(p) for p in hits[:2])})" if hits else ""


@contextlib.contextmanager
def _quiet_asyncio():
  """orbax logs every cancelled sibling read of a failed restore through `asyncio` (hundreds of
  tracebacks); the failure itself is raised as one CheckpointError."""
  log = logging.getLogger("asyncio")
  level = log.level
  log.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    log.setLevel(level)


def _restore_items(mngr: ocp.CheckpointManager, step: int, args: dict, step_dir: Path) -> dict:
  try:
    with _quiet_asyncio():
      return mngr.restore(step, args=ocp.args.Composite(**args))
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - tensorstore/orbax errors on damaged files
    ours, seen = e, set()
    while ours is not None and not isinstance(ours, CheckpointError) and id(ours) not in seen:
      seen.add(id(ours))
      ours = ours.__cause__ or ours.__context__
    if isinstance(ours, CheckpointError):  # raised by our data adapter inside orbax
      raise ours from None
    reason = _first_line(e)
    raise CorruptCheckpointError(
        f"checkpoint {step_dir} cannot be read, a file is truncated or corrupt"
        f"{_suspect_files(step_dir, reason)}: {reason}.") from None


def saved_digests(step_dir: Path) -> dict[str, str] | None:
  """The digests `save` stored, or None for a checkpoint written before they existed."""
  f = step_dir / "_CHECKPOINT_METADATA"
  try:
    meta = json.loads(f.read_text())
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise CorruptCheckpointError(f"checkpoint {step_dir}: unreadable {f} ({e}).") from None
  return (meta.get("custom_metadata") or {}).get(DIGEST_KEY)


def verify(state, step_dir: Path) -> None:
  """Raises CorruptCheckpointError unless the restored `state` is finite and matches the digests
  stored at save time."""
  got, nonfinite = digest.summarize(state)
  want = saved_digests(step_dir)
  bad = digest.mismatches(want, got) if want is not None else []
  if bad:
    raise CorruptCheckpointError(
        f"checkpoint {step_dir}: {len(bad)} restored array(s) differ from what was saved (digest "
        f"mismatch, e.g. {bad[:3]}): a file under {step_dir / 'state'} is corrupt.")
  if nonfinite:
    raise CorruptCheckpointError(f"checkpoint {step_dir}: restored arrays {nonfinite[:3]} hold "
                                 "non-finite values.")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iter,
            cfg: Config) -> Any:
  """Restores `step` into the (sharded) abstract state and `data_iter`; returns the state."""
  step_dir = Path(mngr.directory) / str(step)
  check_step_dir(step_dir, with_data=data_iter is not None)
  saved = read_config(step_dir)
  check_same_model(saved, cfg, step_dir)
  if data_iter is not None:
    check_same_data_position(saved, cfg, step_dir)
  check_shapes(mngr, step, abstract_state, step_dir)
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    args["data"] = grain.checkpoint.CheckpointRestore(
        IteratorAdapter(data_iter, source=str(_data_file(step_dir))))
  state = _restore_items(mngr, step, args, step_dir)["state"]
  verify(state, step_dir)
  return state


def restore_intact(mngr: ocp.CheckpointManager, abstract_state, data_iter, cfg: Config, *,
                   step: int | None = None, warn: Callable[[str], None] = _warn
                   ) -> tuple[int, Any]:
  """(step, state) of `step`, else of the newest intact step (warning about each one skipped)."""
  dirs, fallback = candidates(mngr.directory, step)
  d, state = first_intact(dirs, fallback,
                          lambda d: restore(mngr, int(d.name), abstract_state, data_iter, cfg),
                          warn)
  return int(d.name), state


def set_aside_newer(run_dir, step: int) -> list[Path]:
  """Moves `checkpoints/<s>` for s > step to `<run_dir>/checkpoints_set_aside/<s>[.k]` (kept,
  never deleted; out of the manager's way); returns the new paths. Call on one process."""
  ckpt = checkpoint_dir(run_dir)
  moved = []
  for s in _step_dirs(ckpt):
    if s <= step:
      continue
    dest = ckpt.parent / SET_ASIDE / str(s)
    k = 1
    while dest.exists():
      dest, k = ckpt.parent / SET_ASIDE / f"{s}.{k}", k + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(ckpt / str(s), dest)
    moved.append(dest)
  return moved


class LoadedCheckpoint(NamedTuple):
  step_dir: Path
  cfg: Config
  graphdef: Any
  params: Any


def load_checkpoint(path, *, step: int | None = None, older_ok: bool = False,
                    requested: Config | None = None, model_fn=None,
                    warn: Callable[[str], None] = _warn) -> LoadedCheckpoint:
  """The parameters of a run dir's newest intact step (or `step`, or the step dir `path`; with
  `older_ok` a damaged step dir falls back to older steps), on the default device."""
  from atma_jax.config import MeshConfig
  from atma_jax.train.mesh import make_mesh
  from atma_jax.train.state import setup_state

  def attempt(step_dir: Path):
    check_step_dir(step_dir)
    cfg = read_config(step_dir)
    if requested is not None:
      check_same_model(cfg, requested, step_dir)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    setup = setup_state(cfg, mesh, model_fn)
    mngr = ocp.CheckpointManager(step_dir.parent, item_names=ITEMS,
                                 item_handlers=_item_handlers(),
                                 options=ocp.CheckpointManagerOptions(read_only=True,
                                                                      create=False))
    try:
      n = int(step_dir.name)
      check_shapes(mngr, n, setup.abstract, step_dir)
      state = _restore_items(mngr, n, {"state": ocp.args.StandardRestore(setup.abstract)},
                             step_dir)["state"]
    finally:
      mngr.close()
    verify(state, step_dir)
    return cfg, setup.graphdef, state.params

  dirs, fallback = candidates(path, step, older_ok=older_ok)
  step_dir, (cfg, graphdef, params) = first_intact(dirs, fallback, attempt, warn)
  return LoadedCheckpoint(step_dir, cfg, graphdef, params)


def load_model(path, requested: Config | None = None, model_fn=None, *, step: int | None = None):
  """(Config, graphdef, params) from a run dir or step dir; params on the default device."""
  c = load_checkpoint(path, step=step, requested=requested, model_fn=model_fn)
  return c.cfg, c.graphdef, c.params
