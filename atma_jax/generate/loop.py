"""The generation loop: chunked prefill of ragged prompts, then decoding on device.

Dimension glossary: B sequences, T padded prompt length, C prefill chunk, V vocabulary,
N tokens per decode block.

  1. prefill   the prompts, right-padded to a multiple of C, go through `prefill` one chunk
               [B, C] at a time (row b takes `clip(len_b - c*C, 0, C)` real tokens of chunk c,
               so no padding ever enters a state); each row keeps the logits after its last
               real token. The first new token is sampled from them.
  2. decode    `decode_block` runs up to N steps in one `lax.while_loop` inside one jit: feed
               the last token, sample the next, write it to the block; it stops early once
               every row is done (a stop token, or `max_new_tokens` emitted). A done row emits
               PAD (-1) and its fed tokens are ignored. The state (with the cache) is donated.

`Generator.stream` yields each block's new tokens per row as soon as the block is on the host
(the CLI prints them); `Generator.generate` decodes everything in one block. Returned tokens
exclude the stop token that ended a row. Compilations are shared by every Generator of one
architecture and keyed on the padded shapes (prompt chunk, cache length and decode block rounded
up to 64), not on the seed or max_new_tokens. The step functions (`Steps`) default to the model's
(`atma_jax.generate.steps`, `atma_jax.model.cache`); tests may pass any with the same
signatures.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atma_jax.config import ModelConfig
from atma_jax.errors import AtmaError
from atma_jax.generate.sampler import SamplingError, SamplingParams, next_done, sample

PAD = -1  # emitted by a done row; never fed to the model (fed as 0 and ignored)
LENGTH_MULTIPLE = 64  # prompt chunks and cache lengths are rounded up to this (fewer compiles)
DEFAULT_PREFILL_CHUNK = 4096


class GenerateError(AtmaError, ValueError):
  """Bad prompts or lengths, with a message that says how to fix them."""


class Steps(NamedTuple):
  """The model's decode-state functions (see `atma_jax.generate.steps`)."""

  init_cache: Callable[..., Any]  # (cfg, batch_size, max_len) -> cache
  prefill: Callable[..., Any]  # (graphdef, params, ids_BT, lengths_B, cache) -> (logits_BV, cache)
  decode: Callable[..., Any]  # (graphdef, params, tokens_B, cache) -> (logits_BV, cache)


@functools.cache  # the same Steps object per `mem`: it is a static key of the jitted loop
def model_steps(mem: bool = True) -> Steps:
  """The model's steps; `mem=False` drops the memory branch (as eval's --no-mem)."""
  from atma_jax.generate import steps
  from atma_jax.model.cache import init_cache
  if mem:
    return Steps(init_cache, steps.prefill, steps.decode)
  return Steps(init_cache, functools.partial(steps.prefill, mem=False),
               functools.partial(steps.decode, mem=False))


class DecodeState(NamedTuple):
  """Everything the decode loop carries (a pytree; donated between blocks)."""

  cache: Any
  last_B: jax.Array  # int32, the last emitted token of each row (fed at the next step)
  done_B: jax.Array  # bool
  count_B: jax.Array  # int32, tokens emitted so far per row
  step: jax.Array  # int32 scalar, decode steps taken (indexes the sampling key)
  key: jax.Array  # the sampling key (from SamplingParams.seed)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
  """Lists of ints in [0, vocab_size), each non-empty; raises GenerateError otherwise."""
  if not prompts:
    raise GenerateError("no prompts given; pass at least one list of token ids")
  out = []
  for i, p in enumerate(prompts):
    ids = [int(t) for t in p]
    if not ids:
      raise GenerateError(f"prompt {i} is empty; give at least one token (e.g. the EOT id)")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
      raise GenerateError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary "
                          f"[0, {vocab_size})")
    out.append(ids)
  return out


def cache_length(prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 max_len: int | None) -> int:
  """The cache capacity: `max_len`, or the longest prompt + max_new_tokens rounded up to 64.
  Raises GenerateError when the prompt and the new tokens do not fit in `max_len`."""
  need = max(len(p) for p in prompts) + sampling.max_new_tokens
  if max_len is None:
    return round_up(need, LENGTH_MULTIPLE)
  if max_len < 1:
    raise GenerateError(f"max_len={max_len} must be >= 1")
  longest = max(len(p) for p in prompts)
  if need > max_len:
    raise GenerateError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                        f"({sampling.max_new_tokens}) = {need} exceeds max_len={max_len}; "
                        "shorten the prompt, lower max_new_tokens or raise max_len")
  return max_len


def _static(sampling: SamplingParams) -> SamplingParams:
  """The settings that shape the compiled code; the seed and max_new_tokens are traced
  (`_begin`, `_block`), so changing them does not recompile."""
  return dataclasses.replace(sampling, seed=0, max_new_tokens=1)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(5, 6))
def _prefill_chunk(steps: Steps, graphdef, params, ids_BC, lengths_B, cache, last_BV):
  """One prefill chunk; each row with real tokens in it takes its logits as `last_BV`."""
  logits_BV, cache = steps.prefill(graphdef, params, ids_BC, lengths_B, cache)
  last_BV = jnp.where((lengths_B > 0)[:, None], logits_BV.astype(jnp.float32), last_BV)
  return last_BV, cache


@functools.partial(jax.jit, static_argnums=2, donate_argnums=1)
def _begin(last_BV, cache, sampling: SamplingParams, seed, max_new_tokens):
  """The first new token of each row, sampled from the prompt's last logits: (state, first_B)."""
  key = jax.random.PRNGKey(seed)
  first_B = sample(last_BV, jax.random.fold_in(key, 0), sampling)
  count_B = jnp.ones(first_B.shape, jnp.int32)
  done_B = next_done(jnp.zeros(first_B.shape, bool), first_B, count_B, sampling,
                     max_new_tokens)
  return DecodeState(cache, first_B, done_B, count_B, jnp.ones((), jnp.int32), key), first_B


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5), donate_argnums=3)
def _block(steps: Steps, graphdef, params, state: DecodeState, sampling: SamplingParams, n: int,
           max_new_tokens):
  """Up to `n` decode steps in one `lax.while_loop`: (state, tokens [B, n], PAD-filled)."""
  B = state.last_B.shape[0]

  def cond(carry):
    i, state, _ = carry
    return (i < n) & ~jnp.all(state.done_B)

  def body(carry):
    i, s, out_BN = carry
    fed_B = jnp.where(s.done_B, 0, s.last_B)
    logits_BV, cache = steps.decode(graphdef, params, fed_B, s.cache)
    token_B = sample(logits_BV, jax.random.fold_in(s.key, s.step), sampling)
    token_B = jnp.where(s.done_B, PAD, token_B)
    count_B = s.count_B + (~s.done_B).astype(jnp.int32)
    done_B = next_done(s.done_B, token_B, count_B, sampling, max_new_tokens)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], i, axis=1)
    s = DecodeState(cache, jnp.where(s.done_B, s.last_B, token_B), done_B, count_B,
                    s.step + 1, s.key)
    return i + 1, s, out_BN

  out_BN = jnp.full((B, n), PAD, jnp.int32)
  _, state, out_BN = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, out_BN))
  return state, out_BN


class Generator:
  """Generation with one set of parameters: `generate(prompts, sampling)`, `stream(...)`.

  `model_cfg` is the architecture the steps run (evaluation code passes its window-removed
  config); `graphdef, params` are the `nnx.split(model, nnx.Param)` halves.
  """

  def __init__(self, model_cfg: ModelConfig, graphdef, params, *, steps: Steps | None = None,
               prefill_chunk: int = DEFAULT_PREFILL_CHUNK, mem: bool = True):
    if prefill_chunk < 1:
      raise GenerateError(f"prefill_chunk={prefill_chunk} must be >= 1")
    self.cfg = model_cfg
    self.graphdef = graphdef
    self.params = params
    self.steps = steps or model_steps(mem)
    self.prefill_chunk = round_up(prefill_chunk, LENGTH_MULTIPLE)
    # The jitted pieces live at module level, keyed on (steps, graphdef): Generators of one
    # architecture (e.g. one per `generate(model, ...)` call) share their compilations.
    self._prefill_chunk = functools.partial(_prefill_chunk, self.steps, graphdef)
    self._begin = _begin
    self._block = functools.partial(_block, self.steps, graphdef)

  @classmethod
  def from_model(cls, model, **kw) -> "Generator":
    """A Generator of an `Atma` module (its config and current parameters)."""
    from flax import nnx
    graphdef, params = nnx.split(model, nnx.Param)[:2]
    return cls(model.cfg, graphdef, params, **kw)

  # -- host side ------------------------------------------------------------------------------

  def prefill(self, prompts: Sequence[Sequence[int]], cache, capacity: int):
    """(last_logits_BV fp32, cache) after the ragged prompts, chunk by chunk (chunks of at
    most `capacity`, the cache's max_len)."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    chunk = min(self.prefill_chunk, round_up(int(lengths.max()), LENGTH_MULTIPLE), capacity)
    T = round_up(int(lengths.max()), chunk)
    ids_BT = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
      ids_BT[b, :len(p)] = p
    last_BV = jnp.zeros((len(prompts), self.cfg.vocab_size), jnp.float32)
    for lo in range(0, T, chunk):
      lens_B = np.clip(lengths - lo, 0, chunk).astype(np.int32)
      last_BV, cache = self._prefill_chunk(self.params, jnp.asarray(ids_BT[:, lo:lo + chunk]),
                                           jnp.asarray(lens_B), cache, last_BV)
    return last_BV, cache

  def start(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
            max_len: int | None = None) -> tuple[DecodeState, jax.Array]:
    """Checks the inputs, allocates the cache, prefills the prompts and samples each row's
    first new token: (state for `decode_block`, first tokens [B] int32)."""
    try:
      sampling.validate(self.cfg.vocab_size)
    except SamplingError as e:
      raise GenerateError(str(e)) from None
    prompts = check_prompts(prompts, self.cfg.vocab_size)
    capacity = cache_length(prompts, sampling, max_len)
    cache = self.steps.init_cache(self.cfg, len(prompts), capacity)
    last_BV, cache = self.prefill(prompts, cache, capacity)
    return self._begin(last_BV, cache, _static(sampling), sampling.seed,
                       sampling.max_new_tokens)

  def decode_block(self, state: DecodeState, sampling: SamplingParams, n: int
                   ) -> tuple[DecodeState, jax.Array]:
    """Up to `n` decode steps on device (one dispatch; `state` is donated): (state, tokens
    [B, n] int32, PAD where a row was done or the loop stopped early)."""
    return self._block(self.params, state, _static(sampling), n, sampling.max_new_tokens)

  def lower_decode_block(self, state: DecodeState, sampling: SamplingParams, n: int
                         ) -> jax.stages.Lowered:
    """The lowering of `decode_block(state, sampling, n)`: the same jitted function and
    arguments, nothing run and nothing donated. `.compile().as_text()` is the HLO that call
    runs (profilers map its kernels to source scopes with it)."""
    return _block.lower(self.steps, self.graphdef, self.params, state, _static(sampling), n,
                        sampling.max_new_tokens)

  def stream(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
             max_len: int | None = None, block: int = 16) -> Iterator[list[list[int]]]:
    """Yields, per decode block, each row's new tokens (possibly empty); the first yield is
    the token sampled from the prompt. Stops when every row is done."""
    if block < 1:
      raise GenerateError(f"block={block} must be >= 1")
    state, first_B = self.start(prompts, sampling, max_len=max_len)
    finished = [False] * len(first_B)
    yield _emit(np.asarray(first_B)[:, None], finished, sampling.stop_token_ids)
    remaining = sampling.max_new_tokens - 1
    while remaining > 0 and not all(finished):  # a block past the end stops early on device
      state, out_BN = self.decode_block(state, sampling, block)
      remaining -= block
      yield _emit(np.asarray(out_BN), finished, sampling.stop_token_ids)

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
               max_len: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (stop token excluded), decoded in one on-device block."""
    out = [[] for _ in prompts]
    # one block, its length rounded up (the loop stops once every row is done): one compile
    # per 64 of max_new_tokens
    block = round_up(max(1, sampling.max_new_tokens - 1), LENGTH_MULTIPLE)
    for new in self.stream(prompts, sampling, max_len=max_len, block=block):
      for row, toks in zip(out, new):
        row.extend(toks)
    return out


def _emit(tokens_BN: np.ndarray, finished: list[bool], stop_ids: Sequence[int]
          ) -> list[list[int]]:
  """Each row's tokens of one block up to (not including) a stop token or PAD; marks rows that
  stopped in `finished`."""
  stop = set(stop_ids)
  out = []
  for b, row in enumerate(tokens_BN.tolist()):
    toks = []
    for t in row:
      if finished[b] or t == PAD:
        break
      if t in stop:
        finished[b] = True
        break
      toks.append(t)
    out.append(toks)
  return out


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
             **kw) -> list[list[int]]:
  """New tokens for each prompt (lists of token ids) from an `Atma` module or a `Generator`."""
  gen = model if isinstance(model, Generator) else Generator.from_model(model)
  return gen.generate(prompts, sampling or SamplingParams(), **kw)
