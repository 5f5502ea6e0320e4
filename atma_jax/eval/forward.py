"""Jitted forward passes for evaluation: full context, window removed, logits only where needed.

Dimension glossary: N sequences in one call (batch), T padded time, L ladder length, C scored
positions per sequence (5 value tokens), V vocabulary (padded, 50304).

Evaluation follows the reference protocol (ATMA_SPEC §7): one full forward over the whole
sequence per sample, the training window removed (§3.3), no distractor keys, no caches. Logits
are formed only where needed: time-chunked inside `token_nll` for perplexities, and only at
the C scored positions for retrieval, so a 64K context never holds `[T, V]` logits (or, with
the streaming Polar core and the chunked memory scan, any `[T, T]` matrix).

Shapes are bucketed so each ladder length compiles once per function: a batch is padded to a
fixed number of rows, and retrieval inputs are right-padded to a common length; perplexity
inputs can be right-padded to the longest ladder length (`token_nll(pad_to=...)`), so one
compile serves the whole ladder (a 378M forward at 64K compiled and ran in 37 s on the H200,
its run alone 0.16 s: bench/results/generate_h200.json, prefill_1x64k). Right padding is exact
because every mixer is causal (Polar / softmax attention, Canon and LFM2 convs, the
memory scan, whose chunks start at position 0 whatever the length) and Polar's temperature and
null sink count each row's own position, not T: positions before the padding never see it
(tests/test_eval_forward.py compares padded ladders with unpadded forwards).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atma_jax.config import ModelConfig
from atma_jax.model import Atma
from atma_jax.model.loss import token_nll

PAD_ID = 0  # right padding; never seen by the scored positions (causal model)


def eval_model_config(cfg: ModelConfig) -> ModelConfig:
  """The architecture used at evaluation: same weights, window removed, no distractors."""
  return dataclasses.replace(cfg, attn_window=None, num_random_keys=0)


def eval_graphdef(cfg: ModelConfig):
  """The NNX graphdef of `Atma(cfg)` (nothing allocated); merges with any saved params."""
  abstract = nnx.eval_shape(lambda: Atma(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)[0]


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def rows_per_call(length: int, tokens_per_call: int) -> int:
  """Sequences of `length` tokens batched into one forward (at least 1)."""
  return max(1, tokens_per_call // max(length, 1))


class Forward:
  """Scoring functions of one set of parameters (evaluation architecture, optional no-memory).

  `token_nll(seqs)`: per-token NLL of `seq[1:]` given `seq[:-1]` for equal-length sequences.
  `logits_at(inputs, starts, count, pad_to)`: soft-capped logits at `count` positions from each
  input's `start`.
  """

  def __init__(self, model_cfg: ModelConfig, params, *, mem: bool = True,
               logits_chunk: int = 8192, tokens_per_call: int = 65536):
    self.cfg = eval_model_config(model_cfg)
    self.graphdef = eval_graphdef(self.cfg)
    self.params = params
    self.mem = mem
    self.logits_chunk = logits_chunk
    self.tokens_per_call = tokens_per_call
    graphdef, use_mem, chunk = self.graphdef, mem, logits_chunk

    def nll(params, ids_NT, targets_NT):
      model = nnx.merge(graphdef, params)
      h_NTD, _ = model(ids_NT, mem=use_mem)
      return token_nll(model, h_NTD, targets_NT, chunk=chunk)

    def logits(params, ids_NT, starts_N, count):
      model = nnx.merge(graphdef, params)
      h_NTD, _ = model(ids_NT, mem=use_mem)
      take = lambda h_TD, s: jax.lax.dynamic_slice_in_dim(h_TD, s, count, axis=0)
      h_NCD = jax.vmap(take)(h_NTD, starts_N)
      return model.logits(h_NCD)

    self._nll = jax.jit(nll)
    self._logits = jax.jit(logits, static_argnums=3)

  def nll_memory(self, rows: int, length: int) -> dict[str, int]:
    """XLA's compiled memory plan of one `token_nll` call on [rows, length] (bytes)."""
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    m = self._nll.lower(self.params, ids, ids).compile().memory_analysis()
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n: int(getattr(m, n)) for n in names if m is not None and hasattr(m, n)}

  def rows(self, length: int) -> int:
    return rows_per_call(length, self.tokens_per_call)

  def token_nll(self, seqs: Sequence[Sequence[int]], pad_to: int | None = None) -> np.ndarray:
    """NLL (nats, float64) [N, T-1] of `seq[1:]` given `seq[:-1]`; all seqs of length T.

    `pad_to` (>= T): the sequences are right-padded to that many tokens first, so every length
    up to it runs the same compiled function (exact: the model is causal; the padded positions
    are dropped from the result).
    """
    tokens_NT = np.asarray(seqs, dtype=np.int32)
    if tokens_NT.ndim != 2 or tokens_NT.shape[1] < 2:
      raise ValueError(f"token_nll needs equal-length sequences of >= 2 tokens; got "
                       f"{tokens_NT.shape}")
    T = tokens_NT.shape[1]
    if pad_to is not None:
      if pad_to < T:
        raise ValueError(f"pad_to={pad_to} is shorter than the sequences ({T} tokens)")
      tokens_NT = np.pad(tokens_NT, ((0, 0), (0, pad_to - T)), constant_values=PAD_ID)
    # Dispatch every call before reading any result back: the host builds the next batch while
    # the device runs, and the device->host copies happen once, at the end.
    out = [self._nll(self.params, jnp.asarray(chunk_NT[:, :-1]), jnp.asarray(chunk_NT[:, 1:]))
           for chunk_NT in _batches(tokens_NT, self.rows(tokens_NT.shape[1] - 1))]
    return np.concatenate([np.asarray(x, np.float64) for x in out])[:len(seqs), :T - 1]

  def logits_at(self, inputs: Sequence[Sequence[int]], starts: Sequence[int], count: int,
                pad_to: int | None = None) -> np.ndarray:
    """fp32 soft-capped logits [N, count, V] at positions `[start, start + count)` of each input.

    Inputs are right-padded to `pad_to` (default: the longest input), which must cover them.
    """
    longest = max(len(x) for x in inputs)
    T = longest if pad_to is None else pad_to
    if T < longest:
      raise ValueError(f"pad_to={pad_to} is shorter than the longest input ({longest})")
    for x, s in zip(inputs, starts):
      if not 0 <= s <= len(x) - count:
        raise ValueError(f"scored positions [{s}, {s + count}) fall outside an input of "
                         f"{len(x)} tokens")
    ids_NT = np.full((len(inputs), T), PAD_ID, np.int32)
    for i, x in enumerate(inputs):
      ids_NT[i, :len(x)] = x
    starts_N = np.asarray(starts, np.int32)
    rows = min(self.rows(T), len(inputs))
    out = []  # all calls dispatched first, read back at the end (as in token_nll)
    for lo in range(0, len(inputs), rows):
      ids, st = _pad_rows(ids_NT[lo:lo + rows], rows), _pad_rows(starts_N[lo:lo + rows], rows)
      out.append(self._logits(self.params, jnp.asarray(ids), jnp.asarray(st), count))
    return np.concatenate([np.asarray(x) for x in out])[:len(inputs)]


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Repeats the last row so every call has the same batch size (one compile per shape)."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def _batches(x_NT: np.ndarray, rows: int):
  size = min(rows, len(x_NT))
  for lo in range(0, len(x_NT), size):
    yield _pad_rows(x_NT[lo:lo + size], size)
