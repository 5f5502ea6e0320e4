"""Throughput shown while training: tokens/s and MFU of device-synchronized windows.

The loop never waits on the device per step. Every `train.log_every` steps it reads the metrics of
the window's last step, which returns only once that step has finished on the device, and reads
the clock. A window is the time between two such reads; the steps that finished in it are the
window's steps:

    tokens/s = tokens of the window's steps / window seconds
    MFU      = tokens/s * flops/token / (peak FLOP/s per device * devices)   (metrics.py)

The first step (compile + run) is a window of its own, reported as `first_step_s`, never as a
rate. Evaluation and checkpoint saves end the current window and a new one starts after them, so
rates are training alone. MFU is labelled with the peak it divides by: `mfu(vs 989 TFLOP/s
datasheet)`, `mfu(vs 790 TFLOP/s measured bf16 matmul)` or `mfu(vs 700 TFLOP/s given)` after
`train.mfu_peak` (`datasheet`, `measured` or a number of TFLOP/s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from atma_jax.config import parse_mfu_peak


@dataclass(frozen=True)
class Peak:
  """Peak FLOP/s of one device that MFU divides by, and where it comes from."""

  flops: float | None  # None: unknown (no MFU shown)
  source: str  # "datasheet", "measured bf16 matmul", "given"

  @property
  def label(self) -> str:
    if self.flops is None:
      return f"no mfu (device not in the {self.source} table)"
    return f"mfu(vs {self.flops / 1e12:.4g} TFLOP/s {self.source})"


def resolve_peak(spec: str, device=None, *, measure: Callable | None = None) -> Peak:
  """The peak named by `train.mfu_peak`: "datasheet" (the spec table of metrics.PEAK_FLOPS),
  "measured" (this device's bf16 matmul, timed now) or a positive number of TFLOP/s."""
  from atma_jax.train import metrics
  kind = parse_mfu_peak(spec)
  if kind == "datasheet":
    return Peak(metrics.peak_flops(device), "datasheet")
  if kind == "measured":
    import jax
    device = device or jax.devices()[0]
    n = 256 if device.platform == "cpu" else 8192
    r = (measure or metrics.measure_matmul_peak)(n, device=device)
    return Peak(float(r["flops_per_s"]), "measured bf16 matmul")
  return Peak(kind, "given")


def window_rates(steps: int, tokens: int, seconds: float, *, flops_per_token: float,
                 num_devices: int, peak: Peak) -> dict[str, Any]:
  """Rates of one window of `steps` finished steps holding `tokens` tokens over `seconds`."""
  if steps < 1 or seconds <= 0:
    raise ValueError(f"a window needs >= 1 step and a positive duration (got {steps} steps, "
                     f"{seconds} s)")
  from atma_jax.train.metrics import mfu
  tps = tokens / seconds
  out = {"window_steps": steps, "window_s": seconds, "step_s": seconds / steps,
         "tokens_per_s": tps}
  if peak.flops is not None:
    out["mfu"] = mfu(tps, flops_per_token, num_devices, peak.flops)
    out["mfu_peak_flops"] = peak.flops
    out["mfu_peak"] = peak.label
  return out


def steady_rate(windows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """Tokens/s over all rate windows together (sum of tokens / sum of seconds), or None."""
  rated = [w for w in windows if "tokens_per_s" in w]
  if not rated:
    return None
  secs = sum(w["window_s"] for w in rated)
  toks = sum(w["tokens_per_s"] * w["window_s"] for w in rated)
  return {"steps": sum(w["window_steps"] for w in rated), "seconds": secs,
          "tokens_per_s": toks / secs}


class WindowClock:
  """Start time of the current window; `lap()` ends it and starts the next (`clock` injectable)."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self.start = clock()

  def restart(self) -> None:
    """Starts a new window now (after a pause that must not count: eval, checkpoint)."""
    self.start = self.clock()

  def lap(self) -> float:
    """Seconds since the window started; the next window starts now."""
    now = self.clock()
    dt, self.start = now - self.start, now
    return dt


def postfix(loss: float, rates: dict[str, Any] | None) -> dict[str, str]:
  """Progress-bar fields: loss, tok/s and MFU under its labelled peak."""
  out = {"loss": f"{loss:.3f}"}
  if rates and "tokens_per_s" in rates:
    out["tok/s"] = f"{rates['tokens_per_s']:.0f}"
    if "mfu" in rates:
      out[rates["mfu_peak"]] = f"{100 * rates['mfu']:.1f}%"
  return out
