"""The element-wise comparison every kernel test harness reports through."""

import numpy as np


def assert_close(name: str, got, want, atol: float, rtol: float, case=None):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    raise AssertionError(f"{name}: shape {got.shape} != oracle {want.shape} ({case})")
  if not np.all(np.isfinite(got)):
    raise AssertionError(f"{name}: non-finite values ({case})")
  if not np.all(np.isfinite(want)):
    # NaN compares false with every tolerance, so a broken oracle would pass silently
    raise AssertionError(f"{name}: the oracle itself has non-finite values ({case})")
  err = np.abs(got - want)
  bad = err > atol + rtol * np.abs(want)
  if bad.any():
    idx = np.unravel_index(np.argmax(err - rtol * np.abs(want)), err.shape)
    raise AssertionError(
        f"{name}: {bad.sum()} / {bad.size} entries off; max abs err {err.max():.3e} "
        f"(at {idx}: got {got[idx]:.6e}, oracle {want[idx]:.6e}); atol={atol} rtol={rtol} "
        f"({case})")
