"""bench/polar_attention.py's --mosaic-bwd specs: DQ_BK,DKV_BQ,STAGES -> BwdConfig; the removed
one-pass specs ('wg' / 'tile') and malformed ones are refused in one line (no GPU, no compute)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import polar_attention as pa  # noqa: E402


def test_two_kernel_spec_parses():
  bwd = pa.mosaic_bwd_spec("128,64,3")
  assert (bwd.dq_block_k, bwd.dkv_block_q, bwd.stages) == (128, 64, 3)
  assert pa.bwd_name(bwd) == "mosaic_bwd[dq128,kv64,s3]"


@pytest.mark.parametrize("spec,match", [
    ("tile,64,2", r"one-pass backward .* removed .*polar_mosaic_bwd_fused_h200\.json"),
    ("wg,64,2", r"one-pass backward .* removed .*polar_mosaic_bwd_fused_h200\.json"),
    ("64,64", r"expected DQ_BK,DKV_BQ,STAGES"),
    ("x,64,2", r"expected DQ_BK,DKV_BQ,STAGES"),
])
def test_bad_specs_are_refused_in_one_line(spec, match):
  with pytest.raises(SystemExit, match=match) as err:
    pa.mosaic_bwd_spec(spec)
  assert "\n" not in str(err.value)
