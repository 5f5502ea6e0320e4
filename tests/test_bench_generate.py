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
