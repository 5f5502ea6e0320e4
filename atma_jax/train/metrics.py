"""Throughput accounting (ATMA_SPEC §6.8) and metric sinks (JSON lines, optional TensorBoard).

    flops/token = 6 * N_params + 12 * L * D * seq_len
    MFU = tokens/s * flops/token / (peak FLOP/s per device * devices)

Two peaks: `peak_flops` is the spec's datasheet table (the progress bar's default; progress.py
labels the peak it uses), `measure_matmul_peak` times the device's own bf16 matmul (the count of
issue #3: the PyTorch trainer's 24.7% MFU is against a measured 718 TFLOP/s on an H100).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def matmul_chain(a_NN, b_NN, chain: int, out_dtype):
  """`chain` dependent products a <- (a @ b) in `out_dtype` (bf16 operands, fp32 accumulation)."""

  def body(_, x_NN):
    y_NN = jnp.dot(x_NN, b_NN, preferred_element_type=out_dtype)
    return y_NN.astype(a_NN.dtype)

  return jax.lax.fori_loop(0, chain, body, a_NN)


def measure_matmul_peak(n: int = 8192, *, out_dtype=jnp.bfloat16, chain: int = 8, reps: int = 7,
                        warmup: int = 2, device=None, seed: int = 0) -> dict[str, Any]:
  """Measured matmul FLOP/s of one device: bf16 [n, n] @ [n, n] on random normal data.

  One jitted call runs `chain` dependent products (so dispatch is amortized); b is scaled by
  1/sqrt(n) so the chained values stay O(1). `out_dtype` bf16 is torch's `a @ b` (fp32
  accumulation inside the GEMM, bf16 result); fp32 is `preferred_element_type=float32` (then cast
  back to bf16 for the next product). Returns the median over `reps` timed calls after `warmup`.
  """
  if n <= 0 or chain <= 0 or reps <= 0:
    raise ValueError(f"measure_matmul_peak: n={n}, chain={chain}, reps={reps} must be positive")
  device = device or jax.devices()[0]
  rng = np.random.default_rng(seed)
  a_NN = jax.device_put(rng.standard_normal((n, n), np.float32).astype(jnp.bfloat16), device)
  b_NN = jax.device_put((rng.standard_normal((n, n), np.float32) / np.sqrt(n))
                        .astype(jnp.bfloat16), device)
  fn = jax.jit(lambda a, b: matmul_chain(a, b, chain, out_dtype))
  for _ in range(warmup):
    jax.block_until_ready(fn(a_NN, b_NN))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(a_NN, b_NN))
    times.append(time.perf_counter() - t0)
  flops = 2.0 * n ** 3 * chain
  med = statistics.median(times)
  return {"n": n, "chain": chain, "operands": "bfloat16", "accumulate": "float32",
          "output": jnp.dtype(out_dtype).name, "flops_per_call": flops, "reps": reps,
          "call_s_all": times, "call_s_median": med, "flops_per_s": flops / med,
          "device": getattr(device, "device_kind", str(device))}


def mfu(tokens_per_s: float, fpt: float, num_devices: int, peak: float | None) -> float | None:
  if peak is None:
    return None
  return tokens_per_s * fpt / (peak * num_devices)


def keep_rows_through(path: str, step: int) -> int:
  """Rewrites the JSON-lines file `path` without rows whose "step" exceeds `step` (and without a
  torn last line); returns the number of rows dropped."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:  # a line cut by a kill
        dropped += 1
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


class MetricWriter:
  """`<run_dir>/metrics.jsonl` (+ TensorBoard when a writer library is installed); process 0.

  `keep_through`: first drop the rows of later steps (a resumed run rewrites them)."""

  def __init__(self, run_dir: str, enabled: bool = True, keep_through: int | None = None):
    self.enabled = enabled
    self.tb = None
    if not enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    if keep_through is not None:
      keep_rows_through(path, keep_through)
    self.f = open(path, "a")
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
