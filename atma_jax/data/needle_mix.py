"""Needle examples mixed into the training stream: `data.needle_mix = p` (0 = off).

A demonstration aid, visible wherever it is on (the config field's comment, the run's
config.json, a sweep cell's overrides in report.json and commands.txt): with probability `p` a
training row is replaced by a §7.3 retrieval example (`atma_jax.eval.needles.retrieval_sample`,
task passkey or niah, depth uniform in [0, 1]) whose haystack is the row's own text, so the
model sees `cue + value` planted early and the cue repeated at the end, within the training
length. The evaluation then asks for the same skill at
up to 32x that length, with its own seeds (the samples never coincide by construction: a
training draw is seeded `train:<data.seed>:<step>:<row>`, an evaluation draw `<seed>:<task>:<i>`).

The window of a row is `seq_len + 1` tokens (inputs `[:-1]`, targets `[1:]`); a mixed row is
`context + value` with `context` of `seq_len + 1 - 5` tokens. The draw depends only on
`(data.seed, global step, global row)`, so the stream stays deterministic and resumable, and
every process builds the same rows for the same global indices.
"""

from __future__ import annotations

import random

import numpy as np

from atma_jax.eval import needles

Batch = dict[str, np.ndarray]


def mixed_window(window: np.ndarray, tok, rng: random.Random) -> np.ndarray:
  """One retrieval example of `len(window)` tokens whose haystack is `window`'s own text."""
  length = len(window) - needles.VALUE_TOKENS
  kind = needles.TASKS[rng.randrange(len(needles.TASKS))]
  sample = needles.retrieval_sample(tok, kind, length, rng.random(), rng,
                                    haystack=[int(t) for t in window])
  return np.asarray(sample.context + sample.value, dtype=window.dtype)


class NeedleMixer:
  """`(global step, batch) -> batch` with a share `p` of rows made retrieval examples."""

  def __init__(self, p: float, seed: int, row_start: int, tok):
    self.p, self.seed, self.row_start, self.tok = p, seed, row_start, tok

  def __call__(self, step: int, batch: Batch) -> Batch:
    inputs, targets = batch["inputs"].copy(), batch["targets"].copy()
    for r in range(inputs.shape[0]):
      rng = random.Random(f"train:{self.seed}:{step}:{self.row_start + r}")
      if rng.random() >= self.p:
        continue
      window = np.concatenate([inputs[r], targets[r, -1:]])
      mixed = mixed_window(window, self.tok, rng)
      inputs[r], targets[r] = mixed[:-1], mixed[1:]
    return {"inputs": inputs, "targets": targets}
