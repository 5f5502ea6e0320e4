"""bench/profile_decode.py's host-side pieces: the rows it reads from bench/generate.py, the
XLA_FLAGS of each variant process, and the per-step view of a parsed trace (no jax compute; the
script's `--smoke` runs the whole path on CPU)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import profile_decode as pd  # noqa: E402


def test_rows_are_generate_py_decode_rows():
  gen = pd.bench_generate()
  assert pd.all_rows(False) == [tuple(r) for r in gen.FULL["decode"]]
  assert pd.all_rows(True) == [tuple(r) for r in gen.SMOKE["decode"]]


def test_variant_flags_replace_only_command_buffer_flags():
  base = ("--xla_gpu_enable_command_buffer=FUSION --xla_dump_to=/tmp/d "
          "--xla_gpu_graph_min_graph_size=5")
  assert pd.child_xla_flags(base, []) == "--xla_dump_to=/tmp/d"
  assert pd.child_xla_flags(base, pd.VARIANTS["off"]) == (
      "--xla_dump_to=/tmp/d --xla_gpu_enable_command_buffer=")
  assert "WHILE" in pd.child_xla_flags("", pd.VARIANTS["while"])
  # the model patch is applied in the child, never passed to XLA (an unknown flag aborts it)
  assert pd.child_xla_flags(base, pd.VARIANTS["gemv_1row"]) == "--xla_dump_to=/tmp/d"


def test_step_profile_divides_by_steps():
  summary = {"kernel_source": "device streams", "kernel_events": 64,
             "per_device": {"/device:GPU:0": {"busy_ms": 2.0, "span_ms": 3.0, "kernels": 64}},
             "busy_ms_per_device_mean": 2.0, "kernel_ms_summed": 2.5,
             "categories": [{"name": "matmul", "count": 32, "total_ms": 1.5, "share": 0.6}],
             "top_kernels": [{"name": "dot.3", "category": "matmul", "count": 16,
                              "total_ms": 0.8, "share": 0.32}],
             "top_kernel_families": [{"name": "dot", "count": 32, "total_ms": 1.5,
                                      "share": 0.6}]}
  p = pd.step_profile(summary, steps=16, wall_s_per_step=250e-6, traced_wall_s_per_step=300e-6)
  assert p["launches_per_step"] == 4 and p["from_device_kernels"]
  assert p["gpu_busy_us_per_step"] == pytest.approx(125.0)
  assert p["gap_us_per_step"] == pytest.approx(125.0)
  assert p["gpu_busy_fraction_of_wall"] == pytest.approx(0.5)
  assert p["categories"][0]["us_per_step"] == pytest.approx(93.75)
  assert p["top_kernels"][0]["count_per_step"] == 1
  assert p["top_kernel_families"][0]["category"] == "matmul"


def test_bad_rows_and_variants_are_one_line_errors(capsys):
  for argv in (["--rows", "decode_b9"], ["--variants", "sometimes"], ["--steps", "0"]):
    with pytest.raises(SystemExit):
      pd.parse_args(argv)
    assert "error:" in capsys.readouterr().err
