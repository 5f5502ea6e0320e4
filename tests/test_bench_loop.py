"""bench/train_loop_vs_step.py and bench/train_vs_original.py: their arithmetic and the original's
skip reasons (the GPU runs themselves are not CI)."""

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import train_loop_vs_step as lvs  # noqa: E402
import train_vs_original as tvo  # noqa: E402


def _w(step, steps, secs, tps):
  return {"step": step, "window_steps": steps, "window_s": secs, "tokens_per_s": tps}


def test_summarize_skips_the_warmup_window():
  windows = [{"step": 1, "first_step_s": 70.0}, _w(5, 4, 8.0, 10.0), _w(10, 5, 2.0, 200.0),
             _w(15, 5, 3.0, 100.0)]
  s = lvs.summarize(windows, 1)
  assert s["windows_used"] == 2 and s["timed_steps"] == 10 and s["timed_s"] == 5.0
  assert s["tokens_per_s"] == pytest.approx((400.0 + 300.0) / 5.0)
  assert s["windows"] == windows
  assert lvs.summarize(windows[:2], 1)["tokens_per_s"] == 10.0  # nothing left: keep what is


def test_compare_ratios_and_skip_reasons(tmp_path):
  original = {"ok": True, "tokens_per_s": 100.0, "peak_memory_allocated_bytes": 50}
  ours = {"phases": {"loop": {"tokens_per_s": 150.0, "peak_bytes_in_use_after": 60},
                     "step_real": {"ok": False}}}
  assert tvo.compare(original, ours) == {"ours_loop_vs_original_tokens_per_s": 1.5,
                                         "ours_loop_vs_original_peak_memory": 1.2}
  assert tvo.compare({"ok": False, "skipped": "x"}, ours) == {}
  args = argparse.Namespace(ref=str(tmp_path / "nope"), torch_python=sys.executable)
  assert "no checkout of the original" in tvo.original_skip_reason(args)
  for d in ("train", "model"):
    (tmp_path / d).mkdir()
  args.ref = str(tmp_path)
  reason = tvo.original_skip_reason(args)
  try:
    import torch  # noqa: F401
    assert reason is None
  except ImportError:
    assert "cannot import torch" in reason


def test_reference_config_is_our_model():
  cfg = tvo.reference_model_config(False, 128)
  assert cfg["hidden_size"] == 1024 and cfg["num_hidden_layers"] == 16
  assert cfg["attn_window"] is None and cfg["mem_enabled"] and cfg["mem_chunk"] == 128
