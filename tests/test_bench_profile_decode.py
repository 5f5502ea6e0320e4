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
  for argv in (["--rows", "decode_b9"], ["--variants", "sometimes"], ["--steps", "0"],
               ["--variant", "w=model.attn_window=8"]):  # --variant without --cost
    with pytest.raises(SystemExit):
      pd.parse_args(argv)
    assert "error:" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="bench/generate.py's token"):  # before any compile
    pd.main(["--cost", "--smoke", "--variant", "g=layers.MIN_GEMM_ROWS=1"])


def test_cost_mode_reports_per_step_bytes_and_the_cache_scatter(tmp_path):
  """`--cost --smoke` on one row: XLA's bytes accessed per step, the derived ideal (its parts
  from the config), and the while body's K/V scatters found as in-place ops on the cache."""
  out = tmp_path / "cost.json"
  assert pd.main(["--cost", "--smoke", "--rows", "decode_b512_512", "--out", str(out)]) == 0
  import json
  row = json.loads(out.read_text())["rows"]["decode_b512_512"]
  cfg = pd.bench_generate().model_config(True, None)
  glob = sum(cfg.is_global(l) for l in range(cfg.num_layers))
  B, S = row["batch"], row["kv_slots"]
  parts = row["ideal_per_step_derived"]["parts"]
  assert parts["state_read_write"] == 2 * B * glob * cfg.num_heads * cfg.head_dim ** 2 * 4
  assert parts["kv_read_slots"] == B * S * glob * 2 * cfg.num_kv_heads * cfg.head_dim * 4
  assert row["cost_analysis_per_step"]["bytes_accessed"] > parts["params"]
  body = row["hlo_while_body"]
  kv = 4 * B * S * cfg.num_kv_heads * cfg.head_dim  # one layer's K (fp32 tiny model)
  scatters = [r for r in body["top"] if r["root"] == "scatter" and r["in_place"]]
  assert len(scatters) == 2 * glob and all(r["out_bytes"] == kv for r in scatters)
  assert all(r["touches"] == "kv_cache" for r in scatters)
  assert body["in_place_scatter_full_buffer_bytes"] == 2 * kv * 2 * glob
  assert row["bytes_accessed_scatters_in_place"] == pytest.approx(
      row["cost_analysis_per_step"]["bytes_accessed"] - 2 * kv * 2 * glob)


def test_hlo_traffic_inlines_calls_of_the_while_body():
  """A GPU command buffer outlines body ops into a `call`: they are listed as the body's, with
  their operands' bytes (a transpose of a [2, 8, 4, 16] bf16 cache: 2 KiB read, 2 KiB written)."""
  import hlo_traffic
  hlo = """HloModule m

%cb (p0: bf16[2,8,4,16]) -> bf16[2,4,8,16] {
  %p0 = bf16[2,8,4,16]{3,2,1,0} parameter(0)
  ROOT %t = bf16[2,4,8,16]{3,2,1,0} transpose(%p0), dimensions={0,2,1,3}
}

%body (s: (s32[], bf16[2,8,4,16])) -> (s32[], bf16[2,8,4,16]) {
  %s = (s32[], bf16[2,8,4,16]{3,2,1,0}) parameter(0)
  %c = bf16[2,8,4,16]{3,2,1,0} get-tuple-element(%s), index=1
  %i = s32[] get-tuple-element(%s), index=0
  %x = bf16[2,4,8,16]{3,2,1,0} call(%c), to_apply=%cb
  ROOT %r = (s32[], bf16[2,8,4,16]{3,2,1,0}) tuple(%i, %c)
}

%cond (s: (s32[], bf16[2,8,4,16])) -> pred[] {
  %s = (s32[], bf16[2,8,4,16]{3,2,1,0}) parameter(0)
  ROOT %t = pred[] constant(true)
}

ENTRY %main (a: (s32[], bf16[2,8,4,16])) -> (s32[], bf16[2,8,4,16]) {
  %a = (s32[], bf16[2,8,4,16]{3,2,1,0}) parameter(0)
  ROOT %w = (s32[], bf16[2,8,4,16]{3,2,1,0}) while(%a), condition=%cond, body=%body
}
"""
  ops = hlo_traffic.body_ops(hlo, kv_elems={2 * 8 * 4 * 16})
  assert [(r["name"], r["opcode"], r["bytes"], r["touches"]) for r in ops] == [
      ("t", "transpose", 4096, "kv_cache")]
  assert hlo_traffic.summarize(ops)["whole_state_copies"] == ops
