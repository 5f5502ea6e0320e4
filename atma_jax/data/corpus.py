"""Tokenize document streams once into `.bin` shards, and cache them by content.

Packing is the reference's (ATMA_SPEC §6.1): every document becomes `[EOT] + encode(text)`, and
the documents of a split are concatenated with no padding. Training documents are shuffled by
`seed` within each shard (whole documents move, never tokens); validation documents keep the
source's order. Documents whose name falls in the "heldout" split are skipped entirely.

Output directory (the reference naming, so `data.source=bin` reads it too):
  `<prefix>_val_000000.bin ...`, `<prefix>_train_000001.bin ...`, `meta.json` (counts, timing;
  written last, so its presence marks a complete directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Callable, Iterable

import numpy as np

from atma_jax.data import shards, sources
from atma_jax.data.tokenizer import Tokenizer

CACHE_FORMAT = 1  # bump when the packing or naming changes: every cache key changes with it
DEFAULT_SHARD_TOKENS = 100_000_000


def pack_documents(token_lists: Iterable[Iterable[int]], eot_id: int) -> np.ndarray:
  """`[EOT] + doc` for each document, concatenated (the reference's packing), as int64."""
  parts = []
  for ids in token_lists:
    parts.append(np.asarray([eot_id], dtype=np.int64))
    parts.append(np.asarray(ids, dtype=np.int64).reshape(-1))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


class _ShardWriter:
  """Accumulates documents of one split and writes fixed-size shards."""

  def __init__(self, out_dir: str, prefix: str, split: str, first_index: int, shard_tokens: int,
               shuffle_seed: int | None):
    self.out_dir, self.prefix, self.split = out_dir, prefix, split
    self.index, self.shard_tokens, self.seed = first_index, shard_tokens, shuffle_seed
    self.docs: list[np.ndarray] = []
    self.pending = 0
    self.files: list[str] = []
    self.tokens = 0
    self.num_docs = 0

  def add(self, doc_tokens: np.ndarray) -> None:
    self.docs.append(doc_tokens)
    self.pending += doc_tokens.shape[0]
    self.num_docs += 1
    if self.pending >= self.shard_tokens:
      self.flush()

  def flush(self) -> None:
    if not self.docs:
      return
    docs = self.docs
    if self.seed is not None:
      order = np.random.default_rng([self.seed, self.index]).permutation(len(docs))
      docs = [docs[i] for i in order]
    path = os.path.join(self.out_dir, f"{self.prefix}_{self.split}_{self.index:06d}.bin")
    self.tokens += shards.write_shard(path, np.concatenate(docs), bytes_per_token=2)
    self.files.append(path)
    self.index += 1
    self.docs, self.pending = [], 0


def tokenize_to_shards(docs: Iterable[sources.Document], tokenizer: Tokenizer, out_dir: str, *,
                       prefix: str, val_fraction: float, seed: int,
                       shard_tokens: int = DEFAULT_SHARD_TOKENS, max_tokens: int | None = None,
                       log: Callable[[str], None] | None = None) -> dict:
  """Tokenizes `docs` into train/val shards under `out_dir`; returns (and writes) the metadata."""
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  val = _ShardWriter(out_dir, prefix, "val", 0, shard_tokens, None)
  train = _ShardWriter(out_dir, prefix, "train", 1, shard_tokens, seed)
  heldout = 0
  text_bytes = 0
  by_source: dict[str, dict[str, int]] = {}  # name prefix ("py", "kernel", ...) -> counts
  for n, (name, text) in enumerate(docs):
    split = sources.split_of(name, val_fraction)
    if split == "heldout":
      heldout += 1
      continue
    ids = tokenizer.encode(text)
    text_bytes += len(text.encode("utf-8"))
    arr = pack_documents([ids], tokenizer.eot_id).astype(np.uint16)
    (val if split == "val" else train).add(arr)
    counts = by_source.setdefault(name.split(":", 1)[0], {"train": 0, "val": 0, "docs": 0})
    counts[split] += int(arr.shape[0])
    counts["docs"] += 1
    if log and n % 2000 == 0 and n:
      log(f"  {n} documents, {train.tokens + train.pending + val.tokens + val.pending:,} tokens, "
          f"{time.time() - t0:.0f}s")
    if max_tokens and train.tokens + train.pending + val.tokens + val.pending >= max_tokens:
      break
  val.flush()
  train.flush()
  if not train.files or not val.files:
    raise sources.SourceError(
        f"corpus {prefix!r} produced {train.num_docs} train and {val.num_docs} validation "
        f"documents; both must be non-empty (check data.val_fraction={val_fraction}).")
  meta = {
      "format": CACHE_FORMAT, "prefix": prefix, "tokenizer": tokenizer.fingerprint,
      "tokenizer_backend": tokenizer.backend, "seed": seed, "val_fraction": val_fraction,
      "heldout_fraction": sources.HELDOUT_FRACTION,
      "train_tokens": train.tokens, "val_tokens": val.tokens, "train_docs": train.num_docs,
      "val_docs": val.num_docs, "heldout_docs": heldout, "text_bytes": text_bytes,
      "seconds": round(time.time() - t0, 2), "tokens_by_source": by_source,
      "train_files": [os.path.basename(f) for f in train.files],
      "val_files": [os.path.basename(f) for f in val.files],
  }
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def load_meta(out_dir: str) -> dict | None:
  path = os.path.join(out_dir, "meta.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def shard_lists(out_dir: str, meta: dict) -> tuple[list[str], list[str]]:
  return ([os.path.join(out_dir, f) for f in meta["train_files"]],
          [os.path.join(out_dir, f) for f in meta["val_files"]])


def cache_key(*parts) -> str:
  blob = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def cached_corpus(kind: str, key: str, make_docs: Callable[[], Iterable[sources.Document]],
                  tokenizer: Tokenizer, cache_dir: str, *, val_fraction: float, seed: int,
                  log: Callable[[str], None] | None = print) -> tuple[str, dict]:
  """`cache_dir/<kind>-<key>/`, tokenized on first use (built in a temporary directory and
  renamed into place, so concurrent builders and interrupted builds are safe)."""
  final = os.path.join(cache_dir, f"{kind}-{key}")
  meta = load_meta(final)
  if meta is not None:
    return final, meta
  tmp = os.path.join(cache_dir, f".tmp-{kind}-{key}-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  if log:
    log(f"[data] tokenizing the {kind} corpus into {final} (once; {tokenizer.backend} BPE)")
  meta = tokenize_to_shards(make_docs(), tokenizer, tmp, prefix=kind, val_fraction=val_fraction,
                            seed=seed, log=log)
  try:
    os.rename(tmp, final)
  except OSError:  # another process finished first; theirs is identical
    shutil.rmtree(tmp, ignore_errors=True)
    meta = load_meta(final)
    if meta is None:
      raise
  if log:
    log(f"[data] {kind}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['train_docs']} + {meta['val_docs']} docs) in {meta['seconds']}s")
  return final, meta


def embedded_corpus(tokenizer: Tokenizer, cache_dir: str, *, val_fraction: float, seed: int,
                    log: Callable[[str], None] | None = print) -> tuple[str, dict]:
  """The stdlib corpus, keyed by the sha256 of every document's name and text."""
  docs = list(sources.embedded_documents())
  h = hashlib.sha256()
  for name, text in docs:
    h.update(name.encode() + b"\0" + text.encode("utf-8", errors="ignore") + b"\0")
  key = cache_key("embedded", h.hexdigest(), tokenizer.fingerprint, val_fraction, seed,
                  sources.HELDOUT_FRACTION)
  return cached_corpus("embedded", key, lambda: docs, tokenizer, cache_dir,
                       val_fraction=val_fraction, seed=seed, log=log)


def english_corpus(tokenizer: Tokenizer, cache_dir: str, *, val_fraction: float, seed: int,
                   log: Callable[[str], None] | None = print) -> tuple[str, dict]:
  """The Debian english corpus, keyed by the names/sizes/mtimes of its source files."""
  key = cache_key("english", sources.english_fingerprint(), tokenizer.fingerprint, val_fraction,
                  seed, sources.HELDOUT_FRACTION)
  return cached_corpus("english", key, sources.english_documents, tokenizer, cache_dir,
                       val_fraction=val_fraction, seed=seed, log=log)
