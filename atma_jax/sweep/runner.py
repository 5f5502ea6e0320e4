"""Train and evaluate the cells of a grid, each as its own `train.py` / `eval.py` process.

Every cell runs the project's own entry points, so a sweep is exactly the runs a user would
type: `train.py --config <base> --set <overrides> --set train.run_dir=<work>/<cell> --resume`,
then `eval.py --checkpoint <work>/<cell> --out <work>/<cell>/eval <plan>`. Cells run one after
another or `parallel` at a time (threads that wait on child processes); with several at once on
one accelerator each child gets `XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / parallel`.

A cell is finished when `<work>/<cell>/eval/report.json` exists; finished cells are skipped, and
an interrupted training resumes from its checkpoint. A failed stage is recorded in
`<work>/<cell>/sweep_cell.json` (exit status and the log's last lines) and the other cells go on.
`deadline_s` (seconds from the start) sends SIGTERM to trainings still running then: the trainer
saves a checkpoint and exits, and the cell is evaluated at the step it reached; a cell not yet
started at the deadline is not trained.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from atma_jax.sweep.grid import Cell, EvalPlan, Grid

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO_ROOT / "train.py"
EVAL_SCRIPT = REPO_ROOT / "eval.py"
CELL_FILE = "sweep_cell.json"
TAIL_LINES = 25
TERM_GRACE_S = 90  # after SIGTERM, how long a trainer may take to checkpoint before SIGKILL

_live: set[subprocess.Popen] = set()  # children running now (stop_all ends them)
_live_lock = threading.Lock()
_stopping = threading.Event()  # set by stop_all: no new stage starts


def stop_all() -> None:
  """Asks every running child to stop (SIGTERM: a trainer checkpoints) and starts no new one;
  for the sweep's own SIGINT / SIGTERM."""
  _stopping.set()
  with _live_lock:
    for proc in _live:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


@dataclasses.dataclass(frozen=True)
class CellJob:
  """Everything needed to run one cell."""

  cell: Cell
  overrides: tuple[str, ...]  # every --set of the training run (run_dir included)
  run_dir: Path
  seq_len: int
  plan: EvalPlan
  base: str

  @property
  def name(self) -> str:
    return self.cell.name

  @property
  def eval_dir(self) -> Path:
    return self.run_dir / "eval"

  @property
  def eval_report(self) -> Path:
    return self.eval_dir / "report.json"

  def train_cmd(self) -> list[str]:
    sets = [a for o in self.overrides for a in ("--set", o)]
    return [sys.executable, str(TRAIN_SCRIPT), "--config", self.base, *sets, "--resume",
            "--no-progress"]

  def eval_cmd(self) -> list[str]:
    return [sys.executable, str(EVAL_SCRIPT), "--checkpoint", str(self.run_dir),
            "--out", str(self.eval_dir), *self.plan.args(self.seq_len), "--no-progress"]


def make_jobs(grid: Grid, cells: list[Cell], *, smoke: bool, extra: list[str], work: Path
              ) -> list[CellJob]:
  """Resolves every cell's config now, so a bad override fails before anything runs."""
  from atma_jax.config import resolve

  jobs = []
  for cell in cells:
    run_dir = work / cell.id
    sets = grid.cell_overrides(cell, smoke, extra) + [f"train.run_dir={run_dir}"]
    cfg = resolve(grid.base, sets)  # raises ConfigError naming the bad --set
    jobs.append(CellJob(cell=cell, overrides=tuple(sets), run_dir=run_dir,
                        seq_len=cfg.train.seq_len, plan=grid.plan(smoke), base=grid.base))
  return jobs


def is_finished(job: CellJob) -> bool:
  return job.eval_report.is_file()


def _resolved(base: str, overrides) -> dict[str, object]:
  """The flat config (`section.key: value`) a run's overrides give, less its `train.run_dir`
  (the folder itself, however --work was spelled or wherever it was moved)."""
  from atma_jax.config import resolve, to_dict

  flat = {f"{sec}.{k}": v for sec, d in to_dict(resolve(base, list(overrides))).items()
          if isinstance(d, dict) for k, v in d.items()}
  flat.pop("train.run_dir", None)
  return flat


def check_reuse(jobs: list[CellJob]) -> None:
  """Refuses (before anything runs) a cell whose run folder holds a run of another config:
  skipping or resuming it would report that run under this command's settings. The configs the
  two override lists resolve to are compared, so spelling and order do not matter. `run_cell`
  records the overrides before the training starts, so a run killed mid-training is covered
  too."""
  from atma_jax.config import ConfigError

  for job in jobs:
    before = read_record(job).get("overrides")
    if before is None:
      continue
    then, now = _resolved(job.base, before), _resolved(job.base, job.overrides)
    diff = [f"{k}={then.get(k)} there, {now.get(k)} now" for k in sorted(set(then) | set(now))
            if then.get(k) != now.get(k)]
    if diff:
      raise ConfigError(
          f"cell {job.name}: its run folder {job.run_dir} holds a run of another config "
          f"({'; '.join(diff)}); pass another --work, or remove that folder to start the cell "
          "again.")


def read_record(job: CellJob) -> dict:
  path = job.run_dir / CELL_FILE
  if path.is_file():
    with open(path) as f:
      return json.load(f)
  return {}


def _write_record(job: CellJob, record: dict) -> None:
  job.run_dir.mkdir(parents=True, exist_ok=True)
  tmp = job.run_dir / f".{CELL_FILE}.tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, job.run_dir / CELL_FILE)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
  if not path.is_file():
    return ""
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def child_env(parallel: int, work: Path) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
  if parallel > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / parallel:.3f}"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / ".jax_cache"))
  return env


class Deadline:
  """The training deadline, `seconds` from now (None: no deadline)."""

  def __init__(self, seconds: float | None):
    self.at = None if seconds is None else time.monotonic() + seconds

  def passed(self) -> bool:
    return self.at is not None and time.monotonic() >= self.at


def _run_stage(cmd: list[str], log_path: Path, env: dict, deadline: Deadline | None
               ) -> tuple[int, float, bool]:
  """Runs `cmd` with stdout+stderr to `log_path`. Returns (exit status, seconds, stopped):
  `stopped` says the deadline sent it SIGTERM."""
  t0 = time.monotonic()
  stopped = False
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    with _live_lock:
      if _stopping.is_set():
        return -signal.SIGTERM, 0.0, True
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              stdin=subprocess.DEVNULL)
      _live.add(proc)
    try:
      while True:
        try:
          rc = proc.wait(timeout=1.0)
          break
        except subprocess.TimeoutExpired:
          pass
        if deadline is not None and deadline.passed() and not stopped:
          proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits cleanly
          stopped = True
          try:
            rc = proc.wait(timeout=TERM_GRACE_S)
          except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
          break
    except BaseException:
      proc.kill()  # the sweep itself is interrupted: leave no orphan
      proc.wait()
      raise
    finally:
      with _live_lock:
        _live.discard(proc)
  return rc, time.monotonic() - t0, stopped


def run_cell(job: CellJob, env: dict, deadline: Deadline, say: Callable[[str], None],
             train_only: bool = False) -> dict:
  """Trains (or resumes) and evaluates one cell (`train_only`: no evaluation, e.g. a
  throughput probe); returns and saves its record."""
  record = read_record(job)
  record.update({"cell": job.name, "id": job.cell.id, "axes": job.cell.axes(),
                 "overrides": list(job.overrides), "train_cmd": job.train_cmd(),
                 "eval_cmd": job.eval_cmd(), "run_dir": str(job.run_dir)})
  record.pop("error", None)
  job.run_dir.mkdir(parents=True, exist_ok=True)
  if deadline.passed():
    record.update(status="skipped", error={"stage": "train", "message":
                                           "not started: the training deadline had passed"})
    _write_record(job, record)
    say(f"{job.name}: skipped (deadline passed before it started)")
    return record
  say(f"{job.name}: training")
  record["status"] = "pending"
  _write_record(job, record)  # the overrides, for check_reuse, even if the sweep is killed now
  train_log = job.run_dir / "train.log"
  rc, secs, stopped = _run_stage(job.train_cmd(), train_log, env, deadline)
  record["train_seconds"] = round(record.get("train_seconds", 0.0) + secs, 1)
  record["stopped_by_deadline"] = stopped
  if rc != 0:
    record.update(status="failed", error={"stage": "train", "exit_status": rc,
                                          "tail": tail(train_log)})
    _write_record(job, record)
    say(f"{job.name}: training FAILED (exit {rc}); see {train_log}")
    return record
  say(f"{job.name}: trained in {secs:.0f}s{' (stopped at the deadline)' if stopped else ''}"
      f"{'' if train_only else '; evaluating'}")
  if train_only:
    record["status"] = "trained"
    _write_record(job, record)
    return record
  if _stopping.is_set():
    record.update(status="failed", error={"stage": "eval", "message": "the sweep was stopped"})
    _write_record(job, record)
    return record
  eval_log = job.run_dir / "eval.log"
  rc, secs, _ = _run_stage(job.eval_cmd(), eval_log, env, None)
  record["eval_seconds"] = round(secs, 1)
  if rc != 0 or not job.eval_report.is_file():
    record.update(status="failed", error={"stage": "eval", "exit_status": rc,
                                          "tail": tail(eval_log)})
    say(f"{job.name}: evaluation FAILED (exit {rc}); see {eval_log}")
  else:
    record["status"] = "done"
    say(f"{job.name}: evaluated in {secs:.0f}s")
  _write_record(job, record)
  return record


def run_jobs(jobs: list[CellJob], *, parallel: int, deadline_s: float | None, work: Path,
             say: Callable[[str], None] = print, train_only: bool = False,
             on_cell_done: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
  """Runs the unfinished jobs, `parallel` at a time; returns {cell name: record}.
  `on_cell_done(records so far)` runs after each cell (the CLI rewrites the report, so a run
  killed from outside still leaves the cells finished by then)."""
  env = child_env(parallel, work)
  deadline = Deadline(deadline_s)
  lock = threading.Lock()

  def locked_say(msg):
    with lock:
      say(msg)

  records: dict[str, dict] = {}
  todo = []
  for job in jobs:
    if is_finished(job):
      rec = read_record(job)
      rec.setdefault("status", "done")
      records[job.name] = rec
      say(f"{job.name}: already finished ({job.eval_report}); skipped")
    else:
      todo.append(job)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
    futures = {pool.submit(run_cell, job, env, deadline, locked_say, train_only): job
               for job in todo}
    try:
      for fut in concurrent.futures.as_completed(futures):
        job = futures[fut]
        try:
          records[job.name] = fut.result()
        except Exception as e:  # noqa: BLE001 - a runner bug in one cell must not stop the rest
          records[job.name] = {"cell": job.name, "status": "failed",
                               "error": {"stage": "runner", "tail": f"{type(e).__name__}: {e}"}}
        if on_cell_done is not None:
          on_cell_done(dict(records))
    except BaseException:  # Ctrl-C / SIGTERM of the sweep: stop the children before waiting
      stop_all()
      raise
  return {job.name: records[job.name] for job in jobs}
