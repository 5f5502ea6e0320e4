"""`python -m atma_jax.sweep --config GRID`: train and evaluate every cell, write one report.

  python -m atma_jax.sweep --config sweep_small --smoke                  # tiny cells on CPU
  python -m atma_jax.sweep --config sweep_small --parallel 5 --set train.steps=800 \\
      --out reports/sweep_small
  python -m atma_jax.sweep --config sweep_small --cells rope+mem,polar+mem+live \\
      --merge reports/sweep_small/report.json --out $OUT/sweep_small

GRID is a module in configs/ with `grid() -> atma_jax.sweep.grid.Grid`. Each cell trains with
`train.py` and is evaluated with `eval.py` as its own process (`--parallel N` at a time; on one
GPU each gets 0.9/N of its memory); its run lives in `--work/<cell id>`. A failed cell is
recorded with the end of its log and the rest go on; re-running skips cells whose evaluation
exists and resumes interrupted trainings. `--set` applies to every cell (e.g. the token budget
`--set train.steps=N`). `--deadline S` stops trainings still running S seconds after the start
(each saves a checkpoint and is evaluated where it stopped). `--merge` (repeatable) adds the
finished cells of earlier report.json files (from other calls) to this report without rerunning
them, whether or not `--cells` names them. A cell to run (or report) here whose run folder
holds a run of another config (its overrides resolved) is refused before anything runs (pass another `--work`).
`--train-only` skips the evaluations (a throughput probe: the report's tok/s column).

Writes report.json, report.md, retrieval.png, loss.png, training.png and commands.txt to --out
(default reports/<grid>, or runs/sweep/<grid>_smoke/report with --smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
from pathlib import Path

from atma_jax.config import ConfigError
from atma_jax.errors import check_writable_dir, cli_boundary


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m atma_jax.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="grid module in configs/ (e.g. sweep_small)")
  p.add_argument("--smoke", action="store_true",
                 help="the grid's tiny CPU variant: same code path, minutes")
  p.add_argument("--cells", default=None, help="comma-separated cell names (default: all)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every cell (repeatable), e.g. train.steps=800")
  p.add_argument("--parallel", type=int, default=1, help="cells run at once (default 1)")
  p.add_argument("--out", default=None, help="report folder")
  p.add_argument("--work", default=None,
                 help="run folders of the cells (default runs/sweep/<grid>[_smoke])")
  p.add_argument("--merge", action="append", default=[], metavar="REPORT_JSON",
                 help="an earlier report.json whose finished cells join this report "
                      "(repeatable)")
  p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                 help="stop trainings still running this long after the start")
  p.add_argument("--train-only", action="store_true",
                 help="train, do not evaluate (e.g. a throughput probe with --deadline)")
  p.add_argument("--report-only", action="store_true",
                 help="run nothing; rebuild the report from the work folder")
  return p.parse_args(argv)


def git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[2], timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=10)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


@cli_boundary
def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  return run(args, ["python", "-m", "atma_jax.sweep", *(sys.argv[1:] if argv is None else argv)])


def run(args, command: list[str]) -> int:
  from atma_jax.sweep import grid as grid_lib
  from atma_jax.sweep import report as report_lib
  from atma_jax.sweep import runner

  if args.parallel < 1:
    raise ConfigError(f"--parallel {args.parallel} must be >= 1.")
  if args.deadline is not None and args.deadline <= 0:
    raise ConfigError(f"--deadline {args.deadline} must be a positive number of seconds.")
  for path in args.merge:
    if not os.path.isfile(path):
      raise ConfigError(f"--merge {path}: no such report.json (pass the report.json of an "
                        "earlier sweep call).")
  grid = grid_lib.load_grid(args.config)
  names = [n.strip() for n in args.cells.split(",") if n.strip()] if args.cells else None
  cells = grid.select(names, args.smoke)
  suffix = "_smoke" if args.smoke else ""
  work = Path(args.work or f"runs/sweep/{grid.name}{suffix}")
  out = Path(args.out or (work / "report" if args.smoke else f"reports/{grid.name}"))
  check_writable_dir(str(out), "--out")  # before the cells train, not when the report is written
  if not args.report_only:
    check_writable_dir(str(work), "--work")
  jobs = runner.make_jobs(grid, cells, smoke=args.smoke, extra=args.overrides, work=work)
  merged = report_lib.load_merge(args.merge)
  run_now = [j for j in jobs if j.name not in merged]
  runner.check_reuse(run_now)  # a merged cell's folder is neither run nor read
  print(f"[sweep] {grid.name}{' (smoke)' if args.smoke else ''}: {len(jobs)} cell(s), "
        f"{len(run_now)} to run here, {args.parallel} at a time; work {work}, report {out}",
        flush=True)

  def say(msg):
    print(f"[sweep {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)

  plan = grid.plan(args.smoke)
  seq_len = jobs[0].seq_len
  header = {
      "grid": grid.name, "smoke": args.smoke, "base": grid.base, "notes": grid.notes,
      "commit": git_commit(), "command": command, "overrides_all_cells": list(args.overrides),
      "parallel": args.parallel, "deadline_s": args.deadline, "train_seq_len": seq_len,
      "lengths": plan.lengths(seq_len),
      "plan": dataclasses.asdict(plan),
      "primary": grid.primary_cell,
  }

  def write_report(records):
    cells_out = report_lib.collect(jobs, records, merged)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = {**header, "created": created, "cells": cells_out,
              "checks": report_lib.checks(cells_out, grid.primary_cell)}
    return cells_out, report_lib.write(report, out)

  if args.report_only:
    records = {j.name: runner.read_record(j) for j in run_now}
  else:
    def interrupted(signum, frame):
      raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
      records = runner.run_jobs(run_now, parallel=args.parallel, deadline_s=args.deadline,
                                work=work, say=say, train_only=args.train_only,
                                on_cell_done=write_report)
    except KeyboardInterrupt:
      say("stopped: the running cells were sent SIGTERM (a trainer in its loop saves a "
          "checkpoint); re-run the same command to resume")
      return 130
    finally:
      signal.signal(signal.SIGTERM, previous)
  cells_out, paths = write_report(records)
  bad = [n for n, c in cells_out.items()
         if c.get("status") != ("trained" if args.train_only else "done")]
  say(f"wrote {len(paths)} files to {out}: {', '.join(p.name for p in paths)}")
  if bad:
    say(f"{len(bad)} cell(s) without an evaluation: {', '.join(bad)} (see report.md)")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
