"""A sweep grid: a matched family of runs that differ only along named axes.

The axes mirror the reference's Stage I factorial (ATMA_SPEC §8.1, `ablation/config_schema.py`)
plus our init scheme:

  core         model.attn_type            polar | nope | rope
  memory       model.mem_enabled          on / off
  window       model.attn_window          None (full causal) or a training window
  distractor   model.num_random_keys      0 or R random keys (+ optim.distractor_weight)
  regularizer  optim.sigreg_mode          baseline | weak | discrete | strong | zipfian
                                          (+ optim.sigreg_alpha when not baseline)
  init         model.init_scheme          reference | live_mixers

A `Cell` is one point of that product, written as `--set` overrides on the grid's base preset;
everything else (width, depth, data, tokens, optimizer) is the base, so cells are matched. A
`Grid` names its cells, the evaluation plan (`EvalPlan`, the `eval.py` options every cell gets)
and a smoke variant (`Smoke`: tiny model, few steps, short lengths; same code path on CPU).
Grid presets are Python files in `configs/` exposing `grid() -> Grid`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Optional

from atma_jax.config import ConfigError

CORES = ("polar", "nope", "rope")
REGULARIZERS = ("baseline", "weak", "discrete", "strong", "zipfian")
INITS = ("reference", "live_mixers")
DISTRACTOR_WEIGHT = 0.01  # the reference's weight when distractors are on (ATMA_SPEC §5.7)
SIGREG_ALPHA = 0.01  # the reference's weight when a regularizer is on


@dataclass(frozen=True)
class Cell:
  """One point of the factorial. `distractor` is the number of random keys R (0: off)."""

  core: str = "polar"
  memory: bool = True
  window: Optional[int] = None
  distractor: int = 0
  regularizer: str = "baseline"
  init: str = "reference"
  label: str = ""  # short name in tables and plots (default: the id)
  extra: tuple[str, ...] = ()  # further --set overrides of this cell (not an axis)

  def validate(self) -> "Cell":
    for value, allowed, axis in ((self.core, CORES, "core"),
                                 (self.regularizer, REGULARIZERS, "regularizer"),
                                 (self.init, INITS, "init")):
      if value not in allowed:
        raise ConfigError(f"sweep cell axis {axis}={value!r} is unknown; choose one of "
                          f"{', '.join(allowed)}.")
    if self.window is not None and self.window < 1:
      raise ConfigError(f"sweep cell window={self.window} must be None or >= 1.")
    if self.distractor < 0:
      raise ConfigError(f"sweep cell distractor={self.distractor} must be >= 0 (0 = off).")
    return self

  @property
  def id(self) -> str:
    """Filesystem-safe name: the reference's run_id plus the init scheme (and the label when
    the cell has extra overrides, so two cells on the same axes keep separate runs)."""
    base = (f"{self.core}__reg-{self.regularizer}__distr-{int(self.distractor > 0)}"
            f"__mem-{int(self.memory)}__win-{int(self.window is not None)}__init-{self.init}")
    if self.extra:
      base += "__" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in self.name)
    return base

  @property
  def name(self) -> str:
    if self.label:
      return self.label
    if self.extra:
      raise ConfigError(f"a sweep cell with extra overrides {list(self.extra)} needs a label.")
    return self.id

  def overrides(self) -> list[str]:
    """The `--set` assignments of this cell's axes (its `extra` ones come separately)."""
    window = "none" if self.window is None else str(self.window)
    out = [f"model.attn_type={self.core}", f"model.mem_enabled={str(self.memory).lower()}",
           f"model.attn_window={window}", f"model.num_random_keys={self.distractor}",
           f"optim.distractor_weight={DISTRACTOR_WEIGHT if self.distractor else 0.0}",
           f"optim.sigreg_mode={self.regularizer}",
           f"optim.sigreg_alpha={SIGREG_ALPHA if self.regularizer != 'baseline' else 0.0}",
           f"model.init_scheme={self.init}"]
    return out

  def axes(self) -> dict:
    return {"core": self.core, "memory": self.memory, "window": self.window,
            "distractor": self.distractor, "regularizer": self.regularizer, "init": self.init,
            "extra": list(self.extra)}


@dataclass(frozen=True)
class EvalPlan:
  """The `eval.py` options of every cell. Lengths: the training length times `multipliers`."""

  multipliers: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
  tasks: tuple[str, ...] = ("loss", "junk", "retrieval", "induction")
  corpus: str = "austen"  # held-out long documents (atma_jax.data.eval_docs.KINDS)
  trials: int = 16
  docs: int = 4
  depths: tuple[float, ...] = (0.1, 0.5, 0.9)

  def lengths(self, seq_len: int) -> list[int]:
    return [seq_len * m for m in self.multipliers]

  def args(self, seq_len: int) -> list[str]:
    """The eval.py arguments (after --checkpoint/--out)."""
    return ["--lengths", ",".join(str(n) for n in self.lengths(seq_len)),
            "--tasks", ",".join(self.tasks), "--corpus", self.corpus,
            "--trials", str(self.trials), "--docs", str(self.docs),
            "--depths", ",".join(f"{d:g}" for d in self.depths)]


@dataclass(frozen=True)
class Smoke:
  """What `--smoke` changes: extra overrides on every cell, its own eval plan, fewer cells."""

  overrides: tuple[str, ...] = ()
  eval: EvalPlan = field(default_factory=lambda: EvalPlan(
      multipliers=(1, 2), tasks=("loss", "retrieval", "induction"), corpus="code", trials=2,
      docs=1, depths=(0.5,)))
  cells: tuple[str, ...] = ()  # cell names to run (empty: all)


@dataclass(frozen=True)
class Grid:
  name: str
  base: str  # preset name (configs/<base>.py) every cell starts from
  cells: tuple[Cell, ...]
  base_overrides: tuple[str, ...] = ()  # applied to every cell before its own
  eval: EvalPlan = field(default_factory=EvalPlan)
  smoke: Smoke = field(default_factory=Smoke)
  primary: str = ""  # the cell the report's checks are about (default: the first)
  notes: str = ""  # one paragraph for the report: what the grid asks

  def validate(self) -> "Grid":
    if not self.cells:
      raise ConfigError(f"grid {self.name!r} has no cells.")
    names = [c.validate().name for c in self.cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ConfigError(f"grid {self.name!r} has duplicate cell names {dupes}; give each a label.")
    for n in (self.primary, *self.smoke.cells):
      if n and n not in names:
        raise ConfigError(f"grid {self.name!r} names cell {n!r}, which is not one of {names}.")
    return self

  @property
  def primary_cell(self) -> str:
    return self.primary or self.cells[0].name

  def select(self, names: list[str] | None, smoke: bool) -> list[Cell]:
    """The cells to run: `names` (from --cells) if given, else the smoke subset or all."""
    wanted = names or (list(self.smoke.cells) if smoke else [])
    if not wanted:
      return list(self.cells)
    by_name = {c.name: c for c in self.cells}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
      raise ConfigError(f"--cells {unknown}: grid {self.name!r} has cells {list(by_name)}.")
    return [by_name[n] for n in wanted]

  def plan(self, smoke: bool) -> EvalPlan:
    return self.smoke.eval if smoke else self.eval

  def cell_overrides(self, cell: Cell, smoke: bool, extra: list[str] | None = None) -> list[str]:
    """Every --set of one cell, later ones winning: the grid's base overrides, the cell's axes,
    the smoke overrides, the cell's own extra overrides, then the command line's."""
    return [*self.base_overrides, *cell.overrides(), *(self.smoke.overrides if smoke else ()),
            *cell.extra, *(extra or [])]


def load_grid(name: str) -> Grid:
  """`configs/<name>.py`'s `grid()` (or a dotted module path / a path ending in .py)."""
  mod_name = name[:-3].replace("/", ".") if name.endswith(".py") else (
      name if "." in name else f"configs.{name}")
  try:
    mod = importlib.import_module(mod_name)
  except ModuleNotFoundError:
    raise ConfigError(f"unknown sweep grid {name!r}: no module {mod_name} (grids live in "
                      "configs/, e.g. --config sweep_small).") from None
  if not hasattr(mod, "grid"):
    raise ConfigError(f"{mod_name} has no grid() function; it is a model preset, not a sweep "
                      "grid (try --config sweep_small).")
  grid = mod.grid()
  if not isinstance(grid, Grid):
    raise ConfigError(f"{mod_name}.grid() returned {type(grid).__name__}, not a sweep Grid.")
  return grid.validate()


def replace(grid: Grid, **changes) -> Grid:
  return dataclasses.replace(grid, **changes).validate()
