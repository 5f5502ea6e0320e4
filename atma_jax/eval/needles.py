"""Needle-in-a-haystack samples (ATMA_SPEC §7.2, §7.3), built as GPT-2 token ids.

A `Sample` holds `context` and the five `value` ids: the model reads `context + value[:-1]` and
is scored, under teacher forcing, on the five value tokens (each `" d"` digit is one GPT-2
token). `needle_start` is the index of the planted needle (`cue + value`) inside `context`.

- `retrieval_sample` (§7.3, tasks `passkey` and `niah`): a context of exactly `length` tokens,
  `[EOT] + body[:p] + needle + body[p:] + cue` with `needle = cue + value`,
  `body` = the first `length - (1 + len(needle) + len(cue))` haystack tokens and
  `p = floor(depth * len(body))`. The per-sample RNG is seeded by `(seed, kind, index)`, so a
  sample keeps its cue and value at every length and depth (a paired design).
- `induction_sample` (§7.2): the needle first, the cue re-presented after `distance` haystack
  tokens: `[EOT] + needle + haystack[:distance] + cue`. The haystack is a document with its own
  leading EOT, so the gap starts with it (§10 pitfall 24).
- `baseline_sample` (§7.2 needle-absent baseline): the same trial's cue and value with no needle,
  `[EOT] + haystack[:distance + len(needle)] + cue`; its value NLL is the model's prior.

Haystacks: `synthetic_haystack` (the §7.3 filler sentences, repeated) or any real token list
(held-out text from `atma_jax.data.eval_docs`, the same prefix for every sample).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Protocol, Sequence

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
NIAH_WORDS = ("ocean", "garden", "mountain", "river", "forest", "desert")
TASKS = ("passkey", "niah")
VALUE_TOKENS = 5
MAX_SCAFFOLD = 40  # generous bound on 1 + len(needle) + len(cue) (about 2 * 11 + 5 + 1)


class Tokenizer(Protocol):
  eot_id: int

  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class Sample:
  context: list[int]
  value: list[int]  # VALUE_TOKENS ids, the teacher-forced targets
  needle_start: int  # context[needle_start : needle_start + len(cue) + 5] == cue + value
  cue: list[int]


def sample_rng(seed: int, kind: str, index: int) -> random.Random:
  return random.Random(f"{seed}:{kind}:{index}")


def cue_and_value(tok: Tokenizer, kind: str, rng: random.Random) -> tuple[list[int], list[int]]:
  """The cue ids and the five value ids (`" d1 d2 d3 d4 d5"`) of one sample."""
  if kind == "passkey":
    cue = f" The access code for record {rng.randint(10**6, 10**7 - 1)} is"
  elif kind == "niah":
    cue = f" The special magic {rng.choice(NIAH_WORDS)} number is"
  else:
    raise ValueError(f"unknown retrieval task {kind!r}; choose one of {TASKS}")
  digits = [rng.randint(0, 9) for _ in range(VALUE_TOKENS)]
  value = tok.encode("".join(f" {d}" for d in digits))
  if len(value) != VALUE_TOKENS:
    raise ValueError(f"value {digits} encoded to {len(value)} tokens, expected {VALUE_TOKENS}; "
                     "the tokenizer is not GPT-2's")
  return tok.encode(cue), value


def synthetic_haystack(tok: Tokenizer, num_tokens: int) -> list[int]:
  unit = tok.encode(FILLER)
  return (unit * (num_tokens // len(unit) + 1))[:num_tokens]


def retrieval_sample(tok: Tokenizer, kind: str, length: int, depth: float, rng: random.Random,
                     haystack: Sequence[int] | None = None) -> Sample:
  """An exactly-`length` context with the needle at relative `depth` of the body."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"needle depth {depth} must lie in [0, 1]")
  cue, value = cue_and_value(tok, kind, rng)
  needle = cue + value
  budget = length - (1 + len(needle) + len(cue))
  if budget < 0:
    raise ValueError(f"context length {length} is shorter than the needle scaffold "
                     f"({length - budget} tokens); use a longer length")
  if haystack is None:
    body = synthetic_haystack(tok, budget)
  else:
    if len(haystack) < budget:
      raise ValueError(f"haystack has {len(haystack)} tokens, {budget} needed for length "
                       f"{length}; use a longer haystack document or a shorter length")
    body = list(haystack[:budget])
  p = int(depth * len(body))
  context = [tok.eot_id] + body[:p] + needle + body[p:] + cue
  assert len(context) == length, (len(context), length)
  return Sample(context, value, 1 + p, cue)


def induction_sample(tok: Tokenizer, distance: int, rng: random.Random,
                     haystack: Sequence[int]) -> Sample:
  """Needle first, then `distance` haystack tokens, then the cue (§7.2)."""
  if distance < 0:
    raise ValueError(f"induction distance {distance} must be >= 0")
  cue, value = cue_and_value(tok, "passkey", rng)
  if len(haystack) < distance:
    raise ValueError(f"haystack has {len(haystack)} tokens, {distance} needed for the induction "
                     "distance; use a longer document or a shorter length")
  context = [tok.eot_id] + cue + value + list(haystack[:distance]) + cue
  return Sample(context, value, 1, cue)


def baseline_sample(tok: Tokenizer, distance: int, rng: random.Random,
                    haystack: Sequence[int]) -> Sample:
  """The needle-absent control of `induction_sample` (same rng draw: same cue and value): the
  cue appears only at the query, after `distance + len(needle)` haystack tokens, so the context
  is as long as the induction context at `distance`. `needle_start` is -1 (no needle)."""
  if distance < 0:
    raise ValueError(f"baseline distance {distance} must be >= 0")
  cue, value = cue_and_value(tok, "passkey", rng)
  gap = distance + len(cue) + len(value)
  if len(haystack) < gap:
    raise ValueError(f"haystack has {len(haystack)} tokens, {gap} needed for the needle-absent "
                     "baseline; use a longer document or a shorter length")
  context = [tok.eot_id] + list(haystack[:gap]) + cue
  return Sample(context, value, -1, cue)


def induction_distance(length: int) -> int:
  """The §7.2 gap used at ladder length `length`: the scored input then fits in `length`."""
  return max(0, length - MAX_SCAFFOLD)
