"""Token sampling: `SamplingParams` and the pure, jittable `sample(logits_BV, key, params)`.

Dimension glossary: B sequences, V vocabulary (padded, 50304), K top-k candidates.

  temperature == 0      greedy: argmax of the logits (no randomness, the key is unused)
  temperature > 0       categorical draw from softmax(logits / temperature), after
  top_k > 0             keeping the k largest logits (ties with the k-th are kept), then
  top_p < 1             keeping the smallest set of largest logits whose probability (at that
                        temperature) reaches top_p (the most likely token is always kept)
  vocab_limit > 0       (in every mode) ids >= vocab_limit are never picked

`SamplingParams` is frozen and hashable: `sample` takes it as a static argument, so the branches
above are chosen at trace time (greedy decoding compiles to one argmax); the decode loop traces
its seed and max_new_tokens instead (no recompile when only those change). `next_done` is the
per-sequence stop rule of the decode loop (a stop token, or `max_new_tokens` emitted).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from atma_jax.errors import AtmaError

NEG_INF = -jnp.inf


class SamplingError(AtmaError, ValueError):
  """Bad sampling settings, with a message that says how to fix them."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How `generate` picks tokens. Defaults: greedy, 64 new tokens, no stop token."""

  temperature: float = 0.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1.0: no nucleus filter
  seed: int = 0
  stop_token_ids: tuple[int, ...] = ()
  max_new_tokens: int = 64
  vocab_limit: int = 0  # > 0: only ids below it can be drawn (e.g. 50257, the tokenizer's
  # vocabulary; the model's padded ids 50257..50303 then never come out); 0: every id

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def validate(self, vocab_size: int | None = None) -> "SamplingParams":
    """Raises SamplingError naming the bad value and its valid range; returns self."""
    if not self.temperature >= 0 or self.temperature == float("inf"):
      raise SamplingError(f"temperature={self.temperature} must be a finite number >= 0 "
                          "(0 = greedy)")
    if self.top_k < 0 or int(self.top_k) != self.top_k:
      raise SamplingError(f"top_k={self.top_k} must be an integer >= 0 (0 = off)")
    if vocab_size is not None and self.top_k > vocab_size:
      raise SamplingError(f"top_k={self.top_k} exceeds the vocabulary ({vocab_size}); use "
                          f"0 (off) or a value <= {vocab_size}")
    if not 0.0 < self.top_p <= 1.0:
      raise SamplingError(f"top_p={self.top_p} must lie in (0, 1] (1 = off)")
    if self.max_new_tokens < 1 or int(self.max_new_tokens) != self.max_new_tokens:
      raise SamplingError(f"max_new_tokens={self.max_new_tokens} must be an integer >= 1")
    if self.vocab_limit < 0 or int(self.vocab_limit) != self.vocab_limit:
      raise SamplingError(f"vocab_limit={self.vocab_limit} must be an integer >= 0 (0 = off)")
    if self.top_k and self.vocab_limit and self.top_k > self.vocab_limit:
      raise SamplingError(f"top_k={self.top_k} exceeds vocab_limit={self.vocab_limit}")
    if self.seed < 0:
      raise SamplingError(f"seed={self.seed} must be >= 0")
    bad = [t for t in self.stop_token_ids
           if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
      raise SamplingError(f"stop token ids {bad} are outside the vocabulary [0, "
                          f"{vocab_size if vocab_size is not None else 'V'})")
    return self


def top_k_mask(logits_BV: jax.Array, k: int) -> jax.Array:
  """`logits` with every entry below the row's k-th largest set to -inf (k static, >= 1)."""
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV >= kth_B1, logits_BV, NEG_INF)


def top_p_mask(logits_BV: jax.Array, p: float) -> jax.Array:
  """`logits` restricted to the nucleus: the largest logits, in descending order, up to and
  including the first whose cumulative softmax probability reaches `p` (always >= 1 token;
  entries equal to the smallest kept logit are kept too)."""
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly above each entry
  keep_BV = before_BV < p
  # the smallest kept logit is the row's threshold (the first entry is always kept)
  threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= threshold_B1, logits_BV, NEG_INF)


def filtered_logits(logits_BV: jax.Array, params: SamplingParams) -> jax.Array:
  """fp32 logits / temperature with the top-k and top-p filters applied (temperature > 0)."""
  z_BV = logits_BV.astype(jnp.float32) / params.temperature
  if params.top_k:
    z_BV = top_k_mask(z_BV, params.top_k)
  if params.top_p < 1.0:
    z_BV = top_p_mask(z_BV, params.top_p)
  return z_BV


def sample(logits_BV: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
  """int32 token ids [B] drawn from `logits_BV` (any float dtype) under `params` (static)."""
  if params.vocab_limit:
    allowed_V = jnp.arange(logits_BV.shape[-1]) < params.vocab_limit
    logits_BV = jnp.where(allowed_V, logits_BV, NEG_INF)
  if params.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  z_BV = filtered_logits(logits_BV, params)
  return jax.random.categorical(key, z_BV, axis=-1).astype(jnp.int32)


def is_stop(tokens_B: jax.Array, stop_token_ids: Sequence[int]) -> jax.Array:
  """bool [B]: the token is one of the stop ids (all False when there are none)."""
  if not stop_token_ids:
    return jnp.zeros(tokens_B.shape, bool)
  return jnp.isin(tokens_B, jnp.asarray(stop_token_ids, tokens_B.dtype))


def next_done(done_B: jax.Array, tokens_B: jax.Array, count_B: jax.Array,
              params: SamplingParams, max_new_tokens=None) -> jax.Array:
  """Per-sequence done flags after emitting `tokens_B` (count_B: tokens emitted so far,
  including these): done stays done; a stop token or `max_new_tokens` emitted ends a row.
  `max_new_tokens` (an int or a traced scalar) overrides `params.max_new_tokens`."""
  limit = params.max_new_tokens if max_new_tokens is None else max_new_tokens
  return done_B | is_stop(tokens_B, params.stop_token_ids) | (count_B >= limit)
