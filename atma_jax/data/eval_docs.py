"""Held-out long documents for long-context evaluation (ATMA_SPEC §7.2, §7.4 analogues).

The reference evaluates on long web/book documents downloaded from the Hub; offline we use
long texts that no training split contains:

- "code": standard-library `.py` files whose names hash into the "heldout" split
  (`sources.split_of`, independent of `data.val_fraction`), in name order, concatenated
  whole (each led by a `# ---- <path> ----` line) until a document reaches `min_tokens`.
  The embedded training corpus skips these files.
- "austen": Jane Austen's six novels, one document each (Debian `r-cran-janeaustenr`).
- "kjv": the King James Bible (Debian `bible-kjv`), cut into consecutive `min_tokens` pieces.

Every returned document is exactly `min_tokens` GPT-2 ids (the document's first `min_tokens`),
with no EOT prepended: the caller adds `[50256]` where a protocol wants it (§10 pitfall 24).
Sources too short for `min_tokens` yield fewer documents; none at all raises ValueError.

With a `cache_dir`, the tokenized Austen / KJV texts are kept in
`<cache_dir>/heldout-<kind>-<tokenizer fingerprint>.bin` (a `.bin` shard, each document led by
EOT) and read from there when present, so a machine without the Debian packages (e.g. a GPU
machine that receives the cache as files) evaluates on the same documents.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from atma_jax.data import shards, sources
from atma_jax.data.tokenizer import EOT_ID, Tokenizer, load_gpt2_tokenizer

KINDS = ("code", "austen", "kjv")


def heldout_code_files() -> list[tuple[str, str]]:
  """`(name, text)` of the held-out stdlib files, by name."""
  out = []
  for name, text in sources.embedded_documents():
    if name.startswith("py:") and sources.split_of(name, 0.0) == "heldout":
      out.append((name, text))
  return out


def _code_documents(min_tokens: int, tok: Tokenizer, limit: int) -> list[list[int]]:
  docs: list[list[int]] = []
  parts: list[str] = []
  budget = 0
  for name, text in heldout_code_files():
    parts.append(f"# ---- {name[3:]} ----\n{text}\n")
    budget += len(tok.encode(parts[-1]))
    if budget < min_tokens:
      continue
    ids = tok.encode("".join(parts))
    if len(ids) < min_tokens:  # pre-token merges across file joins; take one more file
      continue
    docs.append(ids[:min_tokens])
    parts, budget = [], 0
    if len(docs) >= limit:
      break
  return docs


def cache_path(kind: str, cache_dir: str, tok: Tokenizer) -> str:
  return os.path.join(cache_dir, f"heldout-{kind}-{tok.fingerprint}.bin")


def text_documents(kind: str, tok: Tokenizer, cache_dir: str | None = None) -> list[list[int]]:
  """The whole tokenized Austen novels (one list each) or KJV (one list), from the cache when
  `cache_dir` holds it, else from the Debian package (then written to the cache)."""
  path = cache_path(kind, cache_dir, tok) if cache_dir else None
  if path and os.path.isfile(path):
    flat = np.asarray(shards.read_shard(path), dtype=np.int64)
    starts = np.flatnonzero(flat == EOT_ID).tolist() + [len(flat)]
    return [flat[a + 1:b].tolist() for a, b in zip(starts, starts[1:])]
  if kind == "austen":
    docs = [tok.encode(text) for _, text in sources.austen_novels()]
  else:
    docs = [tok.encode(sources.kjv_text())]
  if path:
    shards.write_shard(path, [t for d in docs for t in (EOT_ID, *d)], bytes_per_token=2)
  return docs


def long_documents(kind: str, min_tokens: int, tokenizer: Tokenizer | None = None,
                   limit: int = 4, cache_dir: str | None = None) -> list[list[int]]:
  """Up to `limit` held-out documents of `kind` ("code", "austen", "kjv"), each exactly
  `min_tokens` ids. Raises SourceError naming the Debian package if austen/kjv is missing and
  not cached under `cache_dir`."""
  if kind not in KINDS:
    raise ValueError(f"unknown long-document kind {kind!r}; choose one of {KINDS}.")
  if min_tokens < 1 or limit < 1:
    raise ValueError(f"min_tokens={min_tokens} and limit={limit} must be positive.")
  tok = tokenizer or load_gpt2_tokenizer()
  if kind == "code":
    docs = _code_documents(min_tokens, tok, limit)
  elif kind == "austen":
    docs = [ids[:min_tokens] for ids in text_documents(kind, tok, cache_dir)
            if len(ids) >= min_tokens][:limit]
  else:
    (ids,) = text_documents(kind, tok, cache_dir)
    docs = [ids[i:i + min_tokens] for i in range(0, len(ids) - min_tokens + 1, min_tokens)]
    docs = docs[:limit]
  if not docs:
    raise ValueError(f"no held-out {kind!r} document has {min_tokens:,} tokens; lower the "
                     "length (or use another kind).")
  return docs


def byte_count(ids: Iterable[int], tokenizer: Tokenizer | None = None) -> int:
  """UTF-8 bytes of the text the ids decode to (EOT counts 0): the bits-per-byte denominator,
  `BPB = sum NLL / ln 2 / byte_count(target_ids)` (§7.4)."""
  tok = tokenizer or load_gpt2_tokenizer()
  return len(tok.decode_bytes(i for i in ids if int(i) != EOT_ID))
