"""Progress arithmetic: device-synchronized windows on a fake clock, MFU against a labelled peak."""

import pytest

from atma_jax.config import ConfigError, resolve
from atma_jax.train import progress
from atma_jax.train.metrics import flops_per_token

FPT = flops_per_token(378220864, 16, 1024, 2048)


class FakeClock:
  def __init__(self, times):
    self.times = list(times)

  def __call__(self):
    return self.times.pop(0)


def test_window_clock_laps_and_restarts():
  clock = progress.WindowClock(FakeClock([10.0, 12.5, 13.0, 20.0, 21.5]))
  assert clock.lap() == 2.5  # 10 -> 12.5
  assert clock.lap() == 0.5  # 12.5 -> 13
  clock.restart()  # a pause (eval) from 13 to 20 does not count
  assert clock.lap() == 1.5  # 20 -> 21.5


def test_window_rates_tokens_and_mfu():
  peak = progress.Peak(989e12, "datasheet")
  r = progress.window_rates(10, 10 * 64 * 2048, 4.0, flops_per_token=FPT, num_devices=2,
                            peak=peak)
  assert r["tokens_per_s"] == 10 * 64 * 2048 / 4.0 == 327680.0
  assert r["step_s"] == 0.4 and r["window_steps"] == 10 and r["window_s"] == 4.0
  assert r["mfu"] == pytest.approx(327680.0 * FPT / (2 * 989e12))
  assert r["mfu_peak"] == "mfu(vs 989 TFLOP/s datasheet)" and r["mfu_peak_flops"] == 989e12
  none = progress.window_rates(1, 100, 1.0, flops_per_token=FPT, num_devices=1,
                               peak=progress.Peak(None, "datasheet"))
  assert "mfu" not in none and none["tokens_per_s"] == 100.0
  for steps, secs in ((0, 1.0), (1, 0.0)):
    with pytest.raises(ValueError, match="window needs"):
      progress.window_rates(steps, 1, secs, flops_per_token=FPT, num_devices=1, peak=peak)


def test_steady_rate_weights_windows_by_time_and_skips_the_first_step():
  windows = [{"step": 1, "first_step_s": 60.0},
             {"step": 10, "window_steps": 9, "window_s": 9.0, "tokens_per_s": 100.0},
             {"step": 20, "window_steps": 10, "window_s": 1.0, "tokens_per_s": 1000.0}]
  s = progress.steady_rate(windows)
  assert s == {"steps": 19, "seconds": 10.0, "tokens_per_s": (900.0 + 1000.0) / 10.0}
  assert progress.steady_rate(windows[:1]) is None


def test_peaks_are_labelled_by_source():
  import jax
  cpu = jax.devices("cpu")[0]
  assert progress.resolve_peak("datasheet", cpu) == progress.Peak(None, "datasheet")
  assert progress.resolve_peak("datasheet", cpu).label == "no mfu (device not in the datasheet table)"
  given = progress.resolve_peak("790.5", cpu)
  assert given.flops == 790.5e12 and given.label == "mfu(vs 790.5 TFLOP/s given)"
  calls = []

  def fake_measure(n, device):
    calls.append(n)
    return {"flops_per_s": 812.4e12}

  m = progress.resolve_peak("measured", cpu, measure=fake_measure)
  assert calls == [256] and m.label == "mfu(vs 812.4 TFLOP/s measured bf16 matmul)"
  for bad in ("fast", "0", "-3", "nan"):
    with pytest.raises(ConfigError, match="train.mfu_peak"):
      progress.resolve_peak(bad, cpu)
    with pytest.raises(ConfigError, match="train.mfu_peak"):  # before any compute
      resolve("tiny", [f"train.mfu_peak={bad}"])


def test_postfix_names_the_peak():
  rates = {"tokens_per_s": 182712.4, "mfu": 0.5731, "mfu_peak": "mfu(vs 989 TFLOP/s datasheet)"}
  assert progress.postfix(2.07123, rates) == {
      "loss": "2.071", "tok/s": "182712", "mfu(vs 989 TFLOP/s datasheet)": "57.3%"}
  assert progress.postfix(2.0, None) == {"loss": "2.000"}
