"""Text in, text out: prompt encoding and streamed detokenization around a `Generator`.

A prompt is encoded as `[EOT] + encode(text)`: every training document (and every evaluation
context) starts right after an EOT, so the model reads the prompt as the start of a document.
Generated ids are turned into text incrementally (`TextStream`): a UTF-8 character split across
tokens is printed once it is complete.
"""

from __future__ import annotations

import codecs
import dataclasses
from typing import Iterator

from atma_jax.generate.loop import Generator
from atma_jax.generate.sampler import SamplingParams


def encode_prompt(tok, text: str) -> list[int]:
  """`[EOT] + tok.encode(text)` (GPT-2 ids)."""
  return [tok.eot_id] + tok.encode(text)


def text_sampling(tok, sampling: SamplingParams, *, stop_at_eot: bool = True
                  ) -> SamplingParams:
  """`sampling` restricted to the tokenizer's ids (no padding id can be drawn), with EOT added
  to the stop tokens unless `stop_at_eot` is False."""
  stops = tuple(sampling.stop_token_ids)
  if stop_at_eot and tok.eot_id not in stops:
    stops = stops + (tok.eot_id,)
  return dataclasses.replace(sampling, stop_token_ids=stops, vocab_limit=tok.vocab_size)


class TextStream:
  """Incremental detokenizer: `push(ids) -> str` returns the newly completed text."""

  def __init__(self, tok):
    self.tok = tok
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def push(self, ids) -> str:
    return self._utf8.decode(self.tok.decode_bytes(ids))

  def flush(self) -> str:
    return self._utf8.decode(b"", final=True)


def stream_text(gen: Generator, tok, prompt: str, sampling: SamplingParams, *,
                max_len: int | None = None, block: int = 16, stop_at_eot: bool = True
                ) -> Iterator[str]:
  """Yields the continuation of `prompt` piece by piece (one piece per decode block)."""
  text = TextStream(tok)
  for new in gen.stream([encode_prompt(tok, prompt)], text_sampling(tok, sampling,
                                                                    stop_at_eot=stop_at_eot),
                        max_len=max_len, block=block):
    piece = text.push(new[0])
    if piece:
      yield piece
  tail = text.flush()
  if tail:
    yield tail


def generate_text(gen: Generator, tok, prompts: list[str], sampling: SamplingParams, *,
                  max_len: int | None = None, stop_at_eot: bool = True) -> list[str]:
  """The continuation of each prompt (one ragged batch)."""
  ids = gen.generate([encode_prompt(tok, p) for p in prompts],
                     text_sampling(tok, sampling, stop_at_eot=stop_at_eot), max_len=max_len)
  return [tok.decode(x) for x in ids]
