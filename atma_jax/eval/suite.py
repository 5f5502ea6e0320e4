"""The evaluation suite: loss by length, loss by position, retrieval grids, induction needle.

Each function takes a `Forward` (jitted model passes) or, for the retrieval scored by greedy
generation, an `atma_jax.generate.Generator`, plain Python inputs and a `progress(n)`
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
Scorer = Callable[[list[needles.Sample]], list[dict[str, float]]]  # samples -> metrics each
METRICS = ("token_acc", "exact", "nll")
GENERATED_METRICS = ("digit_acc", "exact")
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


def _loss_cell(fwd: Forward, seqs: Sequence[Sequence[int]],
               byte_count: Callable[[Sequence[int]], int], progress: Progress, pad_to: int):
  """`({nll, ppl, bpb, tokens, bytes}, nll_NT)` of `seq[1:]` given `seq[:-1]` for equal-length
  sequences, right-padded to `pad_to` tokens (one compile for every length of a ladder); bits
  per byte over the bytes of the predicted tokens (EOT counts 0 bytes).
  A device OOM gives `({"error": "out of memory"}, None)`."""
  try:
    try:
      nll_NT = fwd.token_nll(seqs, pad_to=pad_to)
    except Exception as e:  # noqa: BLE001 - a padded OOM retries at the sequences' own length
      if not is_oom(e) or pad_to <= len(seqs[0]):
        raise
      nll_NT = fwd.token_nll(seqs)
  except Exception as e:  # noqa: BLE001 - only device OOM is recorded; the rest re-raises
    if not is_oom(e):
      raise
    progress(len(seqs))
    return {"error": "out of memory"}, None
  total_bytes = sum(byte_count(s[1:]) for s in seqs)
  total_nll = float(nll_NT.sum())
  mean = total_nll / nll_NT.size
  progress(len(seqs))
  return {"nll": mean, "ppl": math.exp(mean),
          "bpb": scoring.bits_per_byte(total_nll, total_bytes),
          "tokens": int(nll_NT.size), "bytes": int(total_bytes)}, nll_NT


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
      raise ValueError(f"a held-out document has {short[0]} tokens, fewer than length {length}; "
                       "fetch documents of at least max(lengths) tokens or drop that length")
    cell, nll_ND = _loss_cell(fwd, [[eot_id] + list(d[:length]) for d in docs], byte_count,
                              progress, pad_to=max(lengths) + 1)
    table[str(length)] = cell
    if nll_ND is not None:
      longest_nll = nll_ND
  return table, longest_nll


def junk_loss_by_length(fwd: Forward, windows: dict[int, Sequence[Sequence[int]]],
                        byte_count: Callable[[Sequence[int]], int], progress: Progress = _noop
                        ) -> dict[str, dict]:
  """§7.2 junk_ppl analogue: `windows[L]` are consecutive L+1-token windows of the validation
  stream (`atma_jax.eval.junk.junk_windows`), crossing document boundaries; each predicts its
  last L tokens. `table[str(L)] = {nll, ppl, bpb, tokens, bytes, eot}` (`eot`: EOTs inside)."""
  table = {}
  for length in sorted(windows):
    seqs = windows[length]
    bad = [len(s) for s in seqs if len(s) != length + 1]
    if bad:
      raise ValueError(f"junk windows at length {length} must hold {length + 1} tokens, one has "
                       f"{bad[0]}; build them with atma_jax.eval.junk.junk_windows")
    cell, _ = _loss_cell(fwd, seqs, byte_count, progress, pad_to=max(windows) + 1)
    table[str(length)] = cell
  return table


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
  inputs, starts = zip(*(scoring.scored_input(s.context, s.value) for s in samples))
  logits_NCV = fwd.logits_at(inputs, starts, needles.VALUE_TOKENS, pad_to)
  return [scoring.target_metrics(lg, s.value) for lg, s in zip(logits_NCV, samples)]


def _teacher_forced(fwd: Forward, length: int) -> Scorer:
  """`samples -> metrics` by `score_samples`, inputs padded as for a length-`length` cell."""
  return lambda samples: score_samples(fwd, samples, scored_length(length))


def _cell(score: Scorer, samples: list[needles.Sample], metrics: Sequence[str],
          progress: Progress) -> dict[str, float]:
  """`metrics` averaged over `score(samples)` (one dict per sample), plus `trials`; a device
  OOM is recorded as `{"error": "out of memory"}`."""
  try:
    cells = score(samples)
  except Exception as e:  # noqa: BLE001 - only device OOM is recorded; the rest re-raises
    if not is_oom(e):
      raise
    progress(len(samples))
    return {"error": "out of memory"}
  progress(len(samples))
  out = {k: scoring.mean_over(cells, k) for k in metrics}
  out["trials"] = len(cells)
  return out


def _grid(score_at: Callable[[int], Scorer], metrics: Sequence[str], tok, kind: str,
          lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
          haystack: Sequence[int] | None, progress: Progress
          ) -> dict[str, dict[str, dict[str, float]]]:
  """`table[str(L)][f"{depth:g}"]`: the paired samples of each cell scored by `score_at(L)`."""
  table: dict[str, dict[str, dict[str, float]]] = {}
  for length in lengths:
    score = score_at(length)
    row = {}
    for depth in depths:
      samples = [needles.retrieval_sample(tok, kind, length, depth,
                                          needles.sample_rng(seed, kind, i), haystack)
                 for i in range(trials)]
      row[f"{depth:g}"] = _cell(score, samples, metrics, progress)
    table[str(length)] = row
  return table


def retrieval_grid(fwd: Forward, tok, kind: str, lengths: Sequence[int], depths: Sequence[float],
                   trials: int, seed: int, haystack: Sequence[int] | None = None,
                   progress: Progress = _noop) -> dict[str, dict[str, dict[str, float]]]:
  """§7.3 `table[str(L)][f"{depth:g}"] = {token_acc, exact, nll, trials}` over paired samples.

  `haystack=None` is the synthetic filler; otherwise a real token list (same prefix for every
  sample).
  """
  return _grid(lambda length: _teacher_forced(fwd, length), METRICS, tok, kind, lengths, depths,
               trials, seed, haystack, progress)


def generate_values(gen, samples: Sequence[needles.Sample], rows: int) -> list[list[int]]:
  """Greedy continuations (VALUE_TOKENS new tokens, no stop token) of each sample's context,
  `rows` contexts per call (the last call padded with repeats: one compile per length)."""
  from atma_jax.generate import SamplingParams

  greedy = SamplingParams(temperature=0.0, max_new_tokens=needles.VALUE_TOKENS)
  out = []
  for lo in range(0, len(samples), rows):
    batch = [s.context for s in samples[lo:lo + rows]]
    out += gen.generate(batch + [batch[-1]] * (rows - len(batch)), greedy)[:len(batch)]
  return out


def retrieval_generated_grid(gen, tok, kind: str, lengths: Sequence[int],
                             depths: Sequence[float], trials: int, seed: int,
                             haystack: Sequence[int] | None = None, progress: Progress = _noop,
                             tokens_per_call: int = 65536
                             ) -> dict[str, dict[str, dict[str, float]]]:
  """The samples of `retrieval_grid` (same seeds: paired with the teacher-forced cells), scored
  by greedy decoding of the value after the cue: `table[str(L)][f"{depth:g}"] = {digit_acc,
  exact, trials}` (per-digit accuracy of the five generated tokens; all five right)."""

  def score_at(length: int) -> Scorer:
    rows = min(trials, max(1, tokens_per_call // length))
    return lambda samples: [scoring.generated_metrics(v, s.value) for v, s in
                            zip(generate_values(gen, samples, rows), samples)]

  return _grid(score_at, GENERATED_METRICS, tok, kind, lengths, depths, trials, seed, haystack,
               progress)


def induction_by_length(fwd: Forward, tok, lengths: Sequence[int], trials: int, seed: int,
                        haystacks: Sequence[Sequence[int]], progress: Progress = _noop
                        ) -> dict[str, dict[str, float]]:
  """§7.2 induction needle at distance `length - 40` (trial t reads haystack t mod #docs).

  Haystacks are documents with their leading EOT (`[EOT] + doc`, §10 pitfall 24)."""
  out = {}
  for length in lengths:
    distance = needles.induction_distance(length)
    samples = [needles.induction_sample(tok, distance, needles.sample_rng(seed, "induction", i),
                                        haystacks[i % len(haystacks)])
               for i in range(trials)]
    cell = _cell(_teacher_forced(fwd, length), samples, METRICS, progress)
    cell["distance"] = distance
    out[str(length)] = cell
  return out


def induction_baseline(fwd: Forward, tok, lengths: Sequence[int], trials: int, seed: int,
                       haystacks: Sequence[Sequence[int]], progress: Progress = _noop
                       ) -> dict[str, float]:
  """§7.2 needle-absent baseline, once per trial: trial t's cue and value (the same draws as
  `induction_by_length`) after `d_min + len(needle)` tokens of haystack t mod #docs, with
  `d_min` the induction distance of the shortest length. Its value NLL is the model's prior on
  the five digits: `{token_acc, exact, nll, trials, distance}`."""
  d_min = needles.induction_distance(min(lengths))
  samples = [needles.baseline_sample(tok, d_min, needles.sample_rng(seed, "induction", i),
                                     haystacks[i % len(haystacks)])
             for i in range(trials)]
  cell = _cell(_teacher_forced(fwd, min(lengths)), samples, METRICS, progress)
  cell["distance"] = d_min
  return cell
