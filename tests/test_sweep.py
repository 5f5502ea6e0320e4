"""`python -m atma_jax.sweep --smoke` end to end on CPU: the report files, a failing cell recorded
while the others go on, finished cells skipped on a re-run, an earlier report merged in."""

import dataclasses
import json
import os

import pytest

from atma_jax.config import ConfigError
from atma_jax.sweep import cli
from atma_jax.sweep import grid as grid_lib
from atma_jax.sweep import report as report_lib

# polar+mem and polar+mem+live compile the same programs (the init differs only in values), so
# the second cell reuses the first one's compilations from the sweep's cache.
CELLS = "polar+mem,polar+mem+live,broken"
# One global layer (memory on it) instead of the smoke's two: half the compile time.
FAST = [a for kv in ("model.num_layers=1", "model.global_every=1", "model.global_offset=0",
                     "train.steps=2", "train.eval_every=2") for a in ("--set", kv)]
# model.vocab_size below the GPT-2 vocabulary passes config validation but fails in the data
# pipeline of the child process: a runtime failure of one cell.
BROKEN = grid_lib.Cell(core="polar", label="broken", extra=("model.vocab_size=1000",))


@pytest.fixture
def grid_with_broken_cell(monkeypatch):
  real = grid_lib.load_grid("sweep_small")
  patched = grid_lib.replace(real, cells=real.cells + (BROKEN,))
  monkeypatch.setattr(grid_lib, "load_grid", lambda name: patched)
  # Children see one CPU device (the 8 fake ones are for this process's sharding tests).
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  return patched


def test_smoke_sweep(tmp_path, grid_with_broken_cell, capsys):
  work, out = tmp_path / "work", tmp_path / "report"
  argv = ["--config", "sweep_small", "--smoke", "--cells", CELLS, "--work", str(work),
          "--out", str(out), *FAST]
  assert cli.main(argv) == 1  # one cell failed
  assert sorted(os.listdir(out)) == sorted(report_lib.FILES)
  report = json.loads((out / "report.json").read_text())
  cells = report["cells"]
  assert list(cells) == ["polar+mem", "polar+mem+live", "broken"]
  for name in ("polar+mem", "polar+mem+live"):
    c = cells[name]
    assert c["status"] == "done", c.get("error")
    assert c["train"]["steps"] == 2 and c["train"]["tokens_seen"] == 2 * 8 * 64
    assert c["eval"]["lengths"] == [64, 128]
    assert set(c["series"]["needle_acc"]) == {"64", "128"}
    assert all(0.0 <= v <= 1.0 for v in c["series"]["retrieval_acc"].values())
  assert cells["polar+mem+live"]["axes"]["init"] == "live_mixers"
  broken = cells["broken"]
  assert broken["status"] == "failed" and broken["error"]["stage"] == "train"
  assert "vocab_size" in broken["error"]["tail"]
  md = (out / "report.md").read_text()
  assert "| polar+mem | done |" in md and "### broken: failed (train" in md
  commands = (out / "commands.txt").read_text()
  assert "model.vocab_size=1000" in commands
  assert commands.count("\n$ python train.py --config small ") == 3  # as typed at the repo root
  assert commands.count("\n$ python eval.py --checkpoint ") == 3

  # Re-run: the finished cells are skipped (their evaluations untouched), the broken one retried.
  stamp = os.path.getmtime(work / cells["polar+mem"]["id"] / "eval" / "report.json")
  capsys.readouterr()
  assert cli.main(argv) == 1
  log = capsys.readouterr().out
  assert log.count("already finished") == 2 and "broken: training FAILED" in log
  assert os.path.getmtime(work / cells["polar+mem"]["id"] / "eval" / "report.json") == stamp

  # Other overrides on the same run folders: refused before anything runs, nothing touched.
  assert cli.main(argv + ["--set", "train.log_every=2"]) == 2
  err = capsys.readouterr().err
  assert "holds a run of another config (train.log_every=1 there, 2 now)" in err
  assert os.path.getmtime(work / cells["polar+mem"]["id"] / "eval" / "report.json") == stamp
  # ... but not for cells merged from a report: their folders are neither run nor read.
  assert cli.main(["--config", "sweep_small", "--smoke", "--cells", "polar+mem,polar+mem+live",
                   "--work", str(work), "--out", str(tmp_path / "merged_here"), *FAST,
                   "--set", "train.log_every=2", "--merge", str(out / "report.json")]) == 0
  assert "2 cell(s), 0 to run here" in capsys.readouterr().out
  assert os.path.getmtime(work / cells["polar+mem"]["id"] / "eval" / "report.json") == stamp

  # Another call's report merged in: nothing runs, both cells are reported, also the one that
  # --cells does not name.
  merged_out = tmp_path / "merged"
  assert cli.main(["--config", "sweep_small", "--smoke", "--cells", "polar+mem",
                   "--work", str(tmp_path / "fresh"), "--out", str(merged_out),
                   "--merge", str(out / "report.json")]) == 0
  merged = json.loads((merged_out / "report.json").read_text())["cells"]
  assert list(merged) == ["polar+mem", "polar+mem+live"]
  assert all(c["from_earlier_report"] and c["status"] == "done" for c in merged.values())
  assert not (tmp_path / "fresh").exists()


def test_merge_reads_several_reports_later_wins(tmp_path):
  paths = []
  for i, cells in enumerate([{"a": "done", "b": "done"}, {"b": "done", "c": "failed"}]):
    path = tmp_path / f"r{i}.json"
    path.write_text(json.dumps({"cells": {n: {"status": st, "call": i}
                                          for n, st in cells.items()}}))
    paths.append(str(path))
  merged = report_lib.load_merge(paths)
  assert {n: c["call"] for n, c in merged.items()} == {"a": 0, "b": 1}  # failed c left out


@pytest.mark.parametrize("argv, message", [
    (["--config", "tiny"], "no grid() function"),
    (["--config", "nonexistent_grid"], "unknown sweep grid"),
    (["--config", "sweep_small", "--cells", "polar+mem,bogus"], "--cells ['bogus']"),
    (["--config", "sweep_small", "--set", "model.bogus=1"], "unknown config key"),
    (["--config", "sweep_small", "--parallel", "0"], "--parallel 0 must be >= 1"),
    (["--config", "sweep_small", "--merge", "/nonexistent/report.json"], "no such report.json"),
])
def test_bad_arguments_fail_before_running(tmp_path, capsys, argv, message):
  assert cli.main(argv + ["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flag", ["--out", "--work"])
def test_unwritable_folder_fails_before_running(tmp_path, capsys, flag):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  folders = {"--work": str(tmp_path / "w"), "--out": str(tmp_path / "o"), flag: str(blocker / "x")}
  argv = ["--config", "sweep_small", "--smoke"] + [a for kv in folders.items() for a in kv]
  assert cli.main(argv) == 2
  assert f"cannot write to {flag}" in capsys.readouterr().err
  assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_cell_overrides_and_ids():
  cell = grid_lib.Cell(core="nope", memory=False, window=256, distractor=512,
                       regularizer="zipfian", init="live_mixers")
  sets = dict(s.split("=", 1) for s in cell.overrides())
  assert sets["model.attn_type"] == "nope" and sets["model.mem_enabled"] == "false"
  assert sets["model.attn_window"] == "256" and sets["model.num_random_keys"] == "512"
  assert float(sets["optim.distractor_weight"]) > 0 and float(sets["optim.sigreg_alpha"]) > 0
  assert cell.id == "nope__reg-zipfian__distr-1__mem-0__win-1__init-live_mixers"
  with pytest.raises(ConfigError, match="core='wall'"):
    grid_lib.Cell(core="wall").validate()
  with pytest.raises(ConfigError, match="needs a label"):
    _ = grid_lib.Cell(extra=("data.needle_mix=0.25",)).name


def test_checks_compare_the_primary_with_matched_cells_only():
  """A cell with extra overrides (needle examples in its data) is reported, but the primary
  cell's "above every other cell" check is about the matched cells."""
  def cell(needle_16k, extra=()):
    return {"status": "done", "axes": {"extra": list(extra)},
            "series": {"needle_acc": {"512": 0.5, "16384": needle_16k},
                       "clean_nll": {"512": 3.0, "16384": 2.9}}}

  cells = {"polar+mem": cell(0.4), "rope+mem": cell(0.1),
           "polar+mem+needle": cell(0.9, extra=("data.needle_mix=0.5",))}
  ch = report_lib.checks(cells, "polar+mem")
  assert ch["needle_acc_longest_others"] == {"rope+mem": 0.1}
  assert ch["needle_above_every_other_cell"] and ch["clean_nll_non_increasing"]
  cells["rope+mem"] = cell(0.6)
  assert not report_lib.checks(cells, "polar+mem")["needle_above_every_other_cell"]


def test_needle_grid_is_the_natural_grid_with_needles_in_every_cell():
  """sweep_small_needle: the five matched cells of sweep_small, each with the same needle mix
  (a base override, so the report's checks compare them), nothing else changed."""
  from atma_jax.config import resolve

  natural, needle = grid_lib.load_grid("sweep_small"), grid_lib.load_grid("sweep_small_needle")
  matched = [c for c in natural.cells if not c.extra]
  assert [c.name for c in needle.cells] == [c.name for c in matched]
  assert all(not c.extra for c in needle.cells)
  for smoke in (False, True):
    for a, b in zip(matched, needle.cells):
      cfg_a = resolve(natural.base, natural.cell_overrides(a, smoke))
      cfg_b = resolve(needle.base, needle.cell_overrides(b, smoke))
      assert cfg_a.data.needle_mix == 0 and cfg_b.data.needle_mix == 0.5
      assert cfg_a == dataclasses.replace(cfg_b, data=dataclasses.replace(
          cfg_b.data, needle_mix=cfg_a.data.needle_mix))


def test_decide_grid_is_the_needle_grid_trained_longer():
  """sweep_small_decide: cells of sweep_small_needle, only the token budget differs."""
  from atma_jax.config import resolve

  needle, decide = grid_lib.load_grid("sweep_small_needle"), grid_lib.load_grid(
      "sweep_small_decide")
  by_name = {c.name: c for c in needle.cells}
  for cell in decide.cells:
    cfg_n = resolve(needle.base, needle.cell_overrides(by_name[cell.name], False))
    cfg_d = resolve(decide.base, decide.cell_overrides(cell, False))
    assert cfg_d.train.steps == 4096 and cfg_d.train.steps > cfg_n.train.steps
    same_budget = dataclasses.replace(cfg_d.train, steps=cfg_n.train.steps,
                                      eval_every=cfg_n.train.eval_every)
    assert dataclasses.replace(cfg_d, train=same_budget) == cfg_n


def test_check_reuse_compares_the_configs_not_the_spelling(tmp_path, monkeypatch):
  """A run folder's recorded overrides against this call's: other settings refused; the same
  settings with the folder spelled relative instead of absolute accepted; no record: nothing to
  compare."""
  from atma_jax.sweep import runner

  grid = grid_lib.load_grid("sweep_small")
  monkeypatch.chdir(tmp_path)
  job, = runner.make_jobs(grid, grid.select(["polar+mem"], True), smoke=True, extra=[],
                          work=tmp_path / "work")
  runner.check_reuse([job])
  relative = [f"train.run_dir={os.path.relpath(job.run_dir)}" if o.startswith("train.run_dir=")
              else o for o in job.overrides]
  assert relative != list(job.overrides)
  runner._write_record(job, {"overrides": relative})
  runner.check_reuse([job])
  moved = [relative[-1], *relative[:-1]]  # run_dir first: another order, the same config
  assert moved != relative and relative[-1].startswith("train.run_dir=")
  runner._write_record(job, {"overrides": moved})
  runner.check_reuse([job])
  runner._write_record(job, {"overrides": relative + ["train.log_every=2"]})
  with pytest.raises(ConfigError, match=r"another config \(train.log_every=2 there, 1 now\)"):
    runner.check_reuse([job])


def test_a_training_killed_midway_leaves_its_overrides_for_check_reuse(tmp_path, monkeypatch):
  """run_cell records the overrides before the training starts: a sweep killed during a cell's
  first training (no record written after it) still has its resumed run refused under other
  overrides."""
  from atma_jax.sweep import runner

  grid = grid_lib.load_grid("sweep_small")
  job, = runner.make_jobs(grid, grid.select(["polar+mem"], True), smoke=True, extra=[],
                          work=tmp_path / "work")

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(runner, "_run_stage", killed)
  with pytest.raises(KeyboardInterrupt):
    runner.run_cell(job, {}, runner.Deadline(None), lambda msg: None)
  assert runner.read_record(job)["overrides"] == list(job.overrides)
  other, = runner.make_jobs(grid, grid.select(["polar+mem"], True), smoke=True,
                            extra=["train.log_every=2"], work=tmp_path / "work")
  with pytest.raises(ConfigError, match="holds a run of another config"):
    runner.check_reuse([other])
