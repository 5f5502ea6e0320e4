"""`python -m atma_jax.summary`: per-module table, exact `total_params: N` last line, no allocation."""

import subprocess
import sys

import pytest

from atma_jax import summary


def test_summary_378m_table(capsys):
  assert summary.main(["atma_378m"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-1] == "total_params: 378220864"
  rows = {line.split()[0]: line for line in lines[2:-1]}
  assert "51,511,296" in rows["embed"] and "bfloat16" in rows["embed"]
  assert "2,099,200" in rows["blocks.2.attn.q"]
  assert "4,201,472" not in rows["blocks.0.attn.in_proj"]  # per-module rows, not per-mixer
  assert "3,148,800" in rows["blocks.0.attn.in_proj"]
  body = sum(int(line.split()[1].replace(",", "")) for line in lines[2:-1])
  assert body == 378_220_864


@pytest.mark.parametrize("sets, total", [
    (["model.mem_enabled=false"], 369_758_464),
    (["model.attn_type=nope"], 378_179_776),
    (["model.attn_type=rope"], 378_155_200),
])
def test_summary_overrides(capsys, sets, total):
  argv = ["atma_378m"] + [a for s in sets for a in ("--set", s)]
  assert summary.main(argv) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1] == f"total_params: {total}"


def test_summary_leaves_shows_axes(capsys):
  assert summary.main(["tiny", "--leaves"]) == 0
  out = capsys.readouterr().out
  assert "axes=('embed', 'heads')" in out and out.strip().splitlines()[-1].startswith("total_params: ")


def test_summary_bad_override_is_clear(capsys):
  assert summary.main(["atma_378m", "--set", "model.hidden_size=1000"]) == 2
  assert "head_dim" in capsys.readouterr().err


def test_summary_cli_entry_point():
  out = subprocess.run([sys.executable, "-m", "atma_jax.summary", "atma_378m", "--set",
                        "model.mem_enabled=false"], capture_output=True, text=True, check=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  assert out.stdout.strip().splitlines()[-1] == "total_params: 369758464"
