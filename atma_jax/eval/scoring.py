"""Teacher-forced scoring of short targets and byte-level loss accounting.

Glossary: `N` targets per sample (5 value digits), `V` vocabulary (padded to 50304; the padding
ids stay in the softmax, as in the reference).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def target_metrics(logits_NV: np.ndarray, targets_N: Sequence[int]) -> dict[str, float]:
  """Per-token greedy accuracy, exact-match of all N tokens, and mean NLL (nats/token).

  `logits_NV[n]` are the (soft-capped) logits at the position that predicts `targets_N[n]`.
  """
  logits = np.asarray(logits_NV, dtype=np.float64)
  targets = np.asarray(targets_N, dtype=np.int64)
  if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
    raise ValueError(f"logits {logits.shape} do not match {targets.shape[0]} targets")
  correct = logits.argmax(-1) == targets
  m = logits.max(-1, keepdims=True)
  lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
  nll = lse - logits[np.arange(len(targets)), targets]
  return {"token_acc": float(correct.mean()), "exact": float(correct.all()),
          "nll": float(nll.mean())}


def generated_metrics(generated: Sequence[int], targets_N: Sequence[int]) -> dict[str, float]:
  """Per-digit accuracy and exact match of a greedily generated value against the N targets
  (a generation shorter than N counts its missing tokens as wrong)."""
  targets = list(targets_N)
  got = list(generated)[:len(targets)]
  hits = [g == t for g, t in zip(got, targets)]
  return {"digit_acc": sum(hits) / len(targets), "exact": float(len(got) == len(targets)
                                                                 and all(hits))}


def scored_input(context: Sequence[int], value: Sequence[int]) -> tuple[list[int], int]:
  """Model input `context + value[:-1]` and the first position whose logits predict `value[0]`."""
  ids = list(context) + list(value[:-1])
  return ids, len(context) - 1


def bits_per_byte(total_nll_nats: float, total_bytes: int) -> float:
  if total_bytes <= 0:
    raise ValueError("bits per byte needs a positive byte count")
  return total_nll_nats / math.log(2.0) / total_bytes


def mean_over(cells: list[dict[str, float]], key: str) -> float:
  vals = [c[key] for c in cells if c is not None and key in c]
  return float(np.mean(vals)) if vals else float("nan")
