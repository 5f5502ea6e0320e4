"""bench/generate.py's command line: `--variant` and `--rows` (the bench itself runs on a GPU; its
`--smoke` runs the whole path on CPU)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

from profile_decode import bench_generate  # noqa: E402

bg = bench_generate()


def test_variant_names_and_overrides():
  assert bg.parse_variant("xla_step=model.mem_step_impl=xla") == (
      "xla_step", ["model.mem_step_impl=xla"])
  assert bg.parse_variant("both=model.mem_step_impl=pallas,model.decode_attn_kernel=true") == (
      "both", ["model.mem_step_impl=pallas", "model.decode_attn_kernel=true"])
  assert bg.parse_variant("base=") == ("base", [])


@pytest.mark.parametrize("argv,says", [(["--variant", "no_equals"], "--variant"),
                                       (["--variant", "=model.remat=true"], "--variant"),
                                       (["--variant", "w=model.attn_window=64"],
                                        "model.attn_window"),
                                       (["--rows", "decode_b9"], "unknown rows")])
def test_bad_variant_or_rows_is_a_one_line_error(argv, says):
  with pytest.raises(SystemExit) as e:
    bg.main(argv + ["--skip-ref", "--skip-ours"])
  assert says in str(e.value) and "\n" not in str(e.value)


def test_gemm_rows_variant_is_checked_and_split():
  assert bg.split_variant(["model.mem_step_impl=xla", "layers.MIN_GEMM_ROWS=1"]) == (
      ["model.mem_step_impl=xla"], 1)
  assert bg.split_variant([]) == ([], None)
  with pytest.raises(SystemExit, match="positive integer"):
    bg.parse_variant("gemv=layers.MIN_GEMM_ROWS=one")


def test_gemm_rows_variant_decodes_under_its_constant_with_its_own_loop(monkeypatch):
  """The variant's decode row runs with layers.MIN_GEMM_ROWS set (restored after) and with a
  Steps of its own, so the module-level decode loop (keyed on steps, graphdef) traces anew."""
  from atma_jax.model import layers
  seen = {}

  def fake_decode_row(gen, cfg, key, *args, **kw):
    seen[key] = (layers.MIN_GEMM_ROWS, gen.steps)
    return {"name": key, "tok_per_s": 1.0, "ms_per_step": 1.0, "cache_bytes_per_sequence": 1}

  monkeypatch.setattr(bg, "decode_row", fake_decode_row)
  monkeypatch.setattr(bg, "measure_copy_bandwidth", lambda smoke: 1.0)
  monkeypatch.setattr(bg, "measure_matmul_flops", lambda smoke: 1.0)
  default = layers.MIN_GEMM_ROWS
  bg.main(["--smoke", "--skip-ref", "--rows", "decode_b1_2k", "--variant", "base=",
           "--variant", "gemv=layers.MIN_GEMM_ROWS=1"])
  (base_rows, base_steps), (gemv_rows, gemv_steps) = (seen["decode_b1_2k[base]"],
                                                       seen["decode_b1_2k[gemv]"])
  assert (base_rows, gemv_rows, layers.MIN_GEMM_ROWS) == (default, 1, default)
  assert hash(base_steps) != hash(gemv_steps) and base_steps != gemv_steps


def test_variants_always_run_beside_the_base_rows(monkeypatch):
  """Only variants named: the base config's rows run too, first (a variant is read against
  them); a NAME= variant names the base rows instead of adding a second copy."""
  monkeypatch.setattr(bg, "decode_row", lambda gen, cfg, key, *a, **kw: {
      "name": key, "tok_per_s": 1.0, "ms_per_step": 1.0, "cache_bytes_per_sequence": 1})
  monkeypatch.setattr(bg, "measure_copy_bandwidth", lambda smoke: 1.0)
  monkeypatch.setattr(bg, "measure_matmul_flops", lambda smoke: 1.0)
  rows = {}
  monkeypatch.setattr(bg.json, "dumps", lambda obj, **kw: rows.update(
      obj.get("ours", {}).get("rows", {})) or "{}")
  bg.main(["--smoke", "--skip-ref", "--rows", "decode_b1_2k", "--variant",
           "fused=model.mem_step_impl=xla"])
  assert list(rows) == ["decode_b1_2k", "decode_b1_2k[fused]"]
  rows.clear()
  bg.main(["--smoke", "--skip-ref", "--rows", "decode_b1_2k", "--variant", "base=",
           "--variant", "fused=model.mem_step_impl=xla"])
  assert list(rows) == ["decode_b1_2k[base]", "decode_b1_2k[fused]"]
