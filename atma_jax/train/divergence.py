"""What the host loop does with a step whose loss or gradients are not finite.

The train step returns `metrics["finite"]` (step.py); the loop reads it with the other metrics,
one step late, so detection costs no extra device sync. Before every checkpoint the loop reads the
flag of the step it is about to save, and `checkpoint.save` refuses a state with a non-finite
value, so a non-finite state is never written and the newest checkpoint on disk is always finite
(the manager only rotates old checkpoints out when it writes a new one).

  train.on_nonfinite = "stop"   raise `DivergenceError` naming the step and the last checkpoint
  train.on_nonfinite = "skip"   that step's update was dropped on device; count it, keep going,
                                and stop after `MAX_SKIPS_IN_A_ROW` consecutive dropped steps
"""

from __future__ import annotations

from atma_jax.errors import AtmaError

MAX_SKIPS_IN_A_ROW = 10


class DivergenceError(AtmaError, RuntimeError):
  """Training produced non-finite values; nothing was saved after the last finite checkpoint."""


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.4g}"


class NonFiniteGuard:
  """Host-side policy for `metrics["finite"]`; `last_checkpoint` is a callable -> str | None."""

  def __init__(self, mode: str, last_checkpoint):
    if mode not in ("stop", "skip"):
      raise ValueError(f"train.on_nonfinite={mode!r}; choose stop or skip")
    self.mode = mode
    self.last_checkpoint = last_checkpoint
    self.skipped = 0
    self.in_a_row = 0

  def _stop(self, what: str) -> DivergenceError:
    last = self.last_checkpoint()
    where = (f"the last checkpoint, {last}, is finite: resume it with --resume (or --step) "
             "after lowering the learning rate" if last else
             "no checkpoint had been written yet")
    hint = " (train.on_nonfinite=skip drops such updates instead)" if self.mode == "stop" else ""
    return DivergenceError(f"{what}; stopped without saving, {where}{hint}.")

  def check(self, step: int, metrics: dict) -> bool:
    """True when `step` was a dropped (skipped) update; raises DivergenceError to stop."""
    if bool(metrics.get("finite", True)):
      self.in_a_row = 0
      return False
    what = (f"non-finite loss or gradient at step {step} (loss {_fmt(metrics.get('loss'))}, "
            f"grad norm {_fmt(metrics.get('grad_norm'))})")
    if self.mode == "stop":
      raise self._stop(what)
    self.skipped += 1
    self.in_a_row += 1
    if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
      raise self._stop(f"{what}: {self.in_a_row} updates in a row dropped "
                       "(train.on_nonfinite=skip)")
    return True
