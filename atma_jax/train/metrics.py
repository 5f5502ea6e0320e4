"""Throughput accounting (ATMA_SPEC §6.8) and metric sinks (JSON lines, optional TensorBoard).

    flops/token = 6 * N_params + 12 * L * D * seq_len
    MFU = tokens/s * flops/token / (peak FLOP/s per device * devices)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

# Dense bf16 peak FLOP/s per device (no sparsity), matched by substring of `device_kind`.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("V100", 125e12), ("T4", 65e12), ("B200", 2250e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
  return 6.0 * num_params + 12.0 * num_layers * hidden * seq_len


def peak_flops(device=None) -> float | None:
  """Peak FLOP/s of one device, or None when unknown (e.g. CPU: no MFU is shown)."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for key, val in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return val
  return None


def mfu(tokens_per_s: float, fpt: float, num_devices: int, peak: float | None) -> float | None:
  if peak is None:
    return None
  return tokens_per_s * fpt / (peak * num_devices)


class MetricWriter:
  """`<run_dir>/metrics.jsonl` (+ TensorBoard when a writer library is installed); process 0."""

  def __init__(self, run_dir: str, enabled: bool = True):
    self.enabled = enabled
    self.tb = None
    if not enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    self.f = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    try:  # optional
      from tensorboardX import SummaryWriter  # type: ignore
      self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
    except Exception:  # noqa: BLE001 - TensorBoard is optional
      self.tb = None

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self.f.write(json.dumps(record) + "\n")
    self.f.flush()
    if self.tb is not None and "step" in record:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self.tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    if self.enabled:
      self.f.close()
      if self.tb is not None:
        self.tb.close()
