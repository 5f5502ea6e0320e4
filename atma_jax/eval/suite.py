"""The evaluation suite: loss by length, loss by position, retrieval grids, induction needle.

Each function takes a `Forward` (jitted model passes), plain Python inputs and a `progress(n)`
callable (advances a progress bar by n forward sequences), and returns JSON-ready dicts keyed
by `str(length)` (and `f"{depth:g}"`). A cell whose forward runs out of device memory is
recorded as `{"error": "out of memory"}` and the ladder goes on (never silently shortened).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from atma_jax.eval import needles, scoring
from atma_jax.eval.forward import Forward, round_up

Progress = Callable[[int], None]
METRICS = ("token_acc", "exact", "nll")
PAD_MULTIPLE = 64  # retrieval inputs (length + 4) are padded to a multiple of this


def _noop(n: int) -> None:
  del n


def is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def scored_length(length: int) -> int:
  """The padded input length of a retrieval / induction cell at ladder length `length`."""
  return round_up(length + needles.VALUE_TOKENS - 1, PAD_MULTIPLE)


# ----------------------------------------------------------------------------- loss


def loss_by_length(fwd: Forward, docs: Sequence[Sequence[int]], lengths: Sequence[int],
                   eot_id: int, byte_count: Callable[[Sequence[int]], int],
                   progress: Progress = _noop):
  """Mean NLL and bits per byte on nested prefixes of held-out documents (§7.2 clean_ppl).

  For each document and length L the input is `[EOT] + doc[:L-1]`, the targets `doc[:L]`.
  Returns `(table, nll_ND)`: `table[str(L)] = {nll, ppl, bpb, tokens, bytes}` and the per-token NLL
  [docs, L_max] of the longest length that fit (for `loss_by_position`), or None.
  """
  table: dict[str, dict] = {}
  longest_nll = None
  for length in sorted(lengths):
    short = [len(d) for d in docs if len(d) < length]
    if short:
      raise ValueError(f"a held-out document has {short[0]} tokens, fewer than length {length}")
    seqs = [[eot_id] + list(d[:length]) for d in docs]
    try:
      nll_ND = fwd.token_nll(seqs)
    except Exception as e:  # noqa: BLE001 - only device OOM is recorded; the rest re-raises
      if not is_oom(e):
        raise
      table[str(length)] = {"error": "out of memory"}
      progress(len(docs))
      continue
    total_bytes = sum(byte_count(d[:length]) for d in docs)
    total_nll = float(nll_ND.sum())
    mean = total_nll / nll_ND.size
    table[str(length)] = {"nll": mean, "ppl": math.exp(mean),
                          "bpb": scoring.bits_per_byte(total_nll, total_bytes),
                          "tokens": int(nll_ND.size), "bytes": int(total_bytes)}
    longest_nll = nll_ND
    progress(len(docs))
  return table, longest_nll


def position_edges(length: int, first: int) -> list[int]:
  """Bucket edges 0, first, 2 first, 4 first, ..., length."""
  if first < 1:
    raise ValueError(f"first position bucket {first} must be >= 1")
  edges = [0, min(first, length)]
  while edges[-1] < length:
    edges.append(min(2 * edges[-1], length))
  return edges


def loss_by_position(nll_ND: np.ndarray, first: int) -> dict[str, float]:
  """Mean NLL per position bucket [0, b), [b, 2b), [2b, 4b), ... of one long context."""
  edges = position_edges(nll_ND.shape[1], first)
  return {f"{lo}-{hi}": float(nll_ND[:, lo:hi].mean()) for lo, hi in zip(edges, edges[1:])}


# ----------------------------------------------------------------------------- retrieval


def score_samples(fwd: Forward, samples: Sequence[needles.Sample], pad_to: int
                  ) -> list[dict[str, float]]:
  """Teacher-forced metrics of each sample: input `context + value[:-1]`, 5 scored positions."""
  inputs = [s.context + s.value[:-1] for s in samples]
  starts = [len(s.context) - 1 for s in samples]
  logits_NCV = fwd.logits_at(inputs, starts, needles.VALUE_TOKENS, pad_to)
  return [scoring.target_metrics(lg, s.value) for lg, s in zip(logits_NCV, samples)]


def _cell(fwd: Forward, samples, pad_to: int, progress: Progress) -> dict[str, float]:
  try:
    cells = score_samples(fwd, samples, pad_to)
  except Exception as e:  # noqa: BLE001
    if not is_oom(e):
      raise
    progress(len(samples))
    return {"error": "out of memory"}
  progress(len(samples))
  out = {k: scoring.mean_over(cells, k) for k in METRICS}
  out["trials"] = len(cells)
  return out


def retrieval_grid(fwd: Forward, tok, kind: str, lengths: Sequence[int], depths: Sequence[float],
                   trials: int, seed: int, haystack: Sequence[int] | None = None,
                   progress: Progress = _noop) -> dict[str, dict[str, dict[str, float]]]:
  """§7.3 `table[str(L)][f"{depth:g}"] = {token_acc, exact, nll, trials}` over paired samples.

  `haystack=None` is the synthetic filler; otherwise a real token list (same prefix for every
  sample).
  """
  table: dict[str, dict[str, dict[str, float]]] = {}
  for length in lengths:
    row = {}
    for depth in depths:
      samples = [needles.retrieval_sample(tok, kind, length, depth,
                                          needles.sample_rng(seed, kind, i), haystack)
                 for i in range(trials)]
      row[f"{depth:g}"] = _cell(fwd, samples, scored_length(length), progress)
    table[str(length)] = row
  return table


def induction_by_length(fwd: Forward, tok, lengths: Sequence[int], trials: int, seed: int,
                        haystacks: Sequence[Sequence[int]], progress: Progress = _noop
                        ) -> dict[str, dict[str, float]]:
  """§7.2 induction needle at distance `length - 40` (trial t reads haystack t mod #docs)."""
  out = {}
  for length in lengths:
    distance = needles.induction_distance(length)
    samples = [needles.induction_sample(tok, distance, needles.sample_rng(seed, "induction", i),
                                        haystacks[i % len(haystacks)])
               for i in range(trials)]
    cell = _cell(fwd, samples, scored_length(length), progress)
    cell["distance"] = distance
    out[str(length)] = cell
  return out


def summarize_retrieval(table: dict[str, dict[str, dict[str, float]]], metric: str
                        ) -> dict[str, float]:
  """Mean over depths of `metric` per length (NaN where a cell failed)."""
  return {n: scoring.mean_over(list(row.values()), metric) for n, row in table.items()}
