"""bench/gated_delta.py's FLA side by side: `fla_subprocess` (FLA's anchor in a child process,
here a stand-in script) merges the child's rows or records why there are none, and
`ratios_vs_fla` pairs our rows with FLA's per shape and mode (no GPU, no jax compute)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gated_delta as gd  # noqa: E402

_CHILD = """
import argparse, json, sys
ap = argparse.ArgumentParser()
ap.add_argument("--out"); ap.add_argument("--cases"); ap.add_argument("--chunks")
ap.add_argument("--shapes")
a = ap.parse_args()
MODE = {mode!r}
if MODE == "crash":
  sys.exit("boom: no CUDA here")
rows = [] if MODE == "unavailable" else [
    {{"impl": "fla", "B": int(s.split("x")[0]), "T": int(s.split("x")[1]), "mode": "fwd+bwd",
      "ms": 2.0}} for s in a.shapes.split(",")]
status = {{"status": "unavailable (no torch)"}} if MODE == "unavailable" else {{"status": "ok"}}
json.dump({{"fla": status, "rows": rows}}, open(a.out, "w"))
"""


def _run(tmp_path, mode, shapes=((16, 2048), (4, 8192))):
  script = tmp_path / f"anchor_{mode}.py"
  script.write_text(_CHILD.format(mode=mode))
  results = {"rows": []}
  gd.fla_subprocess(results, lambda: None, list(shapes), anchor=str(script), timeout=60)
  return results


def test_child_rows_join_ours_and_ratios_pair_them(tmp_path):
  results = _run(tmp_path, "ok")
  fla = [r for r in results["rows"] if r["impl"] == "fla"]
  assert [(r["B"], r["T"], r["source"]) for r in fla] == [(16, 2048, "fla_subprocess"),
                                                         (4, 8192, "fla_subprocess")]
  assert "error" not in results["fla_subprocess"]
  results["rows"] += [{"impl": "sweep:wy", "B": 16, "T": 2048, "mode": "fwd+bwd", "ms": 2.5},
                      {"impl": "sweep:wy", "B": 16, "T": 2048, "mode": "bwd", "ms": 1.0},
                      {"impl": "sweep:split_off", "B": 4, "T": 8192, "mode": "fwd+bwd",
                       "error": "x"}]
  ratios = gd.ratios_vs_fla(results["rows"])
  assert len(ratios) == 1  # no FLA "bwd" row, no ms in an error row
  assert ratios[0]["impl"] == "sweep:wy" and ratios[0]["ours_over_fla"] == pytest.approx(1.25)
  assert ratios[0]["fla_speedup"] == pytest.approx(0.8)


@pytest.mark.parametrize("mode,why", [("unavailable", "unavailable (no torch)"),
                                      ("crash", "child wrote no JSON")])
def test_no_fla_is_recorded_not_raised(tmp_path, mode, why):
  results = _run(tmp_path, mode)
  rec = results["fla_subprocess"]
  assert why in rec["error"] and not results["rows"]
  if mode == "crash":
    assert rec["returncode"] == 1 and "boom: no CUDA here" in rec["output_tail"]
  json.dumps(results)  # JSON-able as written to --out
