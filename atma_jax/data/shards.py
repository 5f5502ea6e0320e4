"""Token shards in the reference `.bin` format (ATMA_SPEC §6.1), read memory-mapped.

Layout: a header of 256 little-endian int32 `[20240520 (magic), 1 (version), num_tokens,
bytes_per_token (0 = legacy = 2), 0, ...]`, then `num_tokens` little-endian token ids as uint16
(bytes_per_token 2) or uint32 (4). Files written here read back in the reference loader and
vice versa (the reference writes `<prefix>_val_000000.bin`, `<prefix>_train_000001.bin`, ...).
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np

from atma_jax.errors import AtmaError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(AtmaError, ValueError):
  """A shard file is missing, malformed, or holds ids the model cannot embed."""


def write_shard(path: str, tokens: Sequence[int] | np.ndarray, *, bytes_per_token: int | None = None
                ) -> int:
  """Writes `tokens` to `path` (atomically: tmp file + rename). Returns the token count.

  `bytes_per_token` 2 (uint16) or 4 (uint32); default: 2 when every id fits in uint16.
  """
  arr = np.asarray(tokens)
  if arr.ndim != 1:
    raise ShardError(f"write_shard expects a 1-D token array, got shape {arr.shape}.")
  if arr.size and (arr.min() < 0):
    raise ShardError(f"negative token id {int(arr.min())} cannot be stored in {path}.")
  top = int(arr.max()) if arr.size else 0
  if bytes_per_token is None:
    bytes_per_token = 2 if top < 2**16 else 4
  if bytes_per_token not in (2, 4):
    raise ShardError(f"bytes_per_token must be 2 or 4, got {bytes_per_token}.")
  if bytes_per_token == 2 and top >= 2**16:
    raise ShardError(f"token id {top} does not fit uint16; write with bytes_per_token=4.")
  if arr.size >= 2**31:
    raise ShardError(f"{arr.size} tokens exceed the int32 count in the header; split the shard.")
  header = np.zeros(HEADER_INTS, dtype="<i4")
  header[:4] = (MAGIC, VERSION, arr.size, bytes_per_token)
  body = arr.astype("<u2" if bytes_per_token == 2 else "<u4", copy=False)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(header.tobytes())
    f.write(body.tobytes())
  os.replace(tmp, path)
  return int(arr.size)


def read_header(path: str) -> tuple[int, int]:
  """Returns `(num_tokens, bytes_per_token)` after validating the header and the file size."""
  if not os.path.isfile(path):
    raise ShardError(f"token shard {path} does not exist.")
  with open(path, "rb") as f:
    raw = f.read(HEADER_BYTES)
  if len(raw) < HEADER_BYTES:
    raise ShardError(f"{path} is {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header; "
                     "not a .bin token shard.")
  header = np.frombuffer(raw, dtype="<i4")
  if header[0] != MAGIC:
    raise ShardError(f"{path}: magic {header[0]} != {MAGIC}; not a reference .bin token shard.")
  if header[1] != VERSION:
    raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION}).")
  num_tokens = int(header[2])
  width = int(header[3]) or 2
  if width not in (2, 4):
    raise ShardError(f"{path}: bytes_per_token {width} is not 2 or 4.")
  expect = HEADER_BYTES + num_tokens * width
  size = os.path.getsize(path)
  if size != expect:
    raise ShardError(f"{path}: file is {size} bytes but the header promises {num_tokens} tokens "
                     f"of {width} bytes ({expect} bytes); the shard is truncated or corrupt.")
  return num_tokens, width


def read_shard(path: str) -> np.ndarray:
  """The shard's tokens as a read-only memory map (uint16 or uint32)."""
  num_tokens, width = read_header(path)
  if num_tokens == 0:
    return np.zeros((0,), dtype="<u2" if width == 2 else "<u4")
  return np.memmap(path, dtype="<u2" if width == 2 else "<u4", mode="r", offset=HEADER_BYTES,
                   shape=(num_tokens,))


def check_vocab(path: str, tokens: np.ndarray, vocab_size: int, *, chunk: int = 1 << 24) -> None:
  """Raises ShardError if any id in `tokens` is >= vocab_size (the model's embedding rows)."""
  for start in range(0, tokens.shape[0], chunk):
    top = int(tokens[start:start + chunk].max(initial=0))
    if top >= vocab_size:
      raise ShardError(
          f"{path} holds token id {top} >= model.vocab_size={vocab_size}: the shard was made with "
          "another tokenizer, or model.vocab_size is too small. Re-tokenize with GPT-2 "
          "(python -m atma_jax.data.prepare) or raise model.vocab_size.")


def expand_glob(pattern: str, what: str) -> list[str]:
  """Sorted files matching `pattern` (a file, directory/*.bin glob); raises if none."""
  if not pattern:
    raise ShardError(f"no {what} path given; set data.path (and data.val_path) to a .bin glob, "
                     "e.g. data.path='/data/fineweb/finewebedu_train_*.bin'.")
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*.bin")
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise ShardError(f"no {what} shards match {pattern!r}; check data.path / data.val_path or "
                     "create shards with `python -m atma_jax.data.prepare`.")
  return files


def split_train_val(pattern: str, val_pattern: str = "") -> tuple[list[str], list[str]]:
  """Train and validation shard lists. Without `val_pattern`, files named `*_val_*` of
  `pattern` are validation and the rest train (the reference naming)."""
  files = expand_glob(pattern, "train")
  if val_pattern:
    val = expand_glob(val_pattern, "validation")
    train = [f for f in files if f not in set(val)]
  else:
    val = [f for f in files if "_val_" in os.path.basename(f)]
    train = [f for f in files if f not in set(val)]
    if not val:
      # The pattern named only train files: look for the sibling validation shards.
      sib = sorted(glob.glob(os.path.join(os.path.dirname(files[0]), "*_val_*.bin")))
      val = sib
  if not train:
    raise ShardError(f"{pattern!r} matches only validation shards; point data.path at the train "
                     "shards (e.g. '<dir>/*_train_*.bin').")
  if not val:
    raise ShardError(f"no validation shard found for {pattern!r}: name one `*_val_*.bin` or set "
                     "data.val_path.")
  return train, val
