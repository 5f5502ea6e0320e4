"""A run directory that a failed start would leave behind, and its removal.

`train.py` creates `train.run_dir` only after the data has been opened, but a run can still
fail between creating it and its first step (a kernel that does not exist on this platform,
out of memory at compile time, Ctrl-C). `discard_unstarted(run_dir)` removes such a directory
when it holds nothing of value: no checkpoint, no recorded train step, and only files the
trainer itself writes. Anything else (a checkpoint, a step's metrics, a file the user put
there) keeps the whole directory.
"""

from __future__ import annotations

import json
import os
import shutil

TRAINER_FILES = ("checkpoints", "config.json", "metrics.jsonl", "tb")


def has_trained(run_dir: str) -> bool:
  """True if `run_dir` holds a checkpoint (or a save in progress) or a train step's metrics."""
  ckpt = os.path.join(run_dir, "checkpoints")
  if os.path.isdir(ckpt) and os.listdir(ckpt):
    return True
  metrics = os.path.join(run_dir, "metrics.jsonl")
  if os.path.isfile(metrics):
    with open(metrics) as f:
      for line in f:
        try:
          if "loss" in json.loads(line):  # train records carry "loss"; evals "val_loss"
            return True
        except ValueError:
          return True  # not ours to judge: keep it
  return False


def discard_unstarted(run_dir: str) -> bool:
  """Removes `run_dir` if it only holds what an unstarted run writes; returns whether it did."""
  if not os.path.isdir(run_dir) or has_trained(run_dir):
    return False
  if any(name not in TRAINER_FILES for name in os.listdir(run_dir)):
    return False
  for name in TRAINER_FILES:
    path = os.path.join(run_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  os.rmdir(run_dir)
  return True
