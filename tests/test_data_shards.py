"""Reference `.bin` shard format: byte layout, round trips, corrupt files, train/val naming."""

import os
import struct

import numpy as np
import pytest

from atma_jax.data import shards


def _reference_bytes(tokens, width):
  """The format spelled out byte by byte (ATMA_SPEC §6.1), independent of shards.py."""
  header = struct.pack("<256i", 20240520, 1, len(tokens), width, *([0] * 252))
  fmt = "<%d%s" % (len(tokens), "H" if width == 2 else "I")
  return header + struct.pack(fmt, *tokens)


@pytest.mark.parametrize("width,high", [(2, 2**16), (4, 2**32)])
def test_round_trip_and_layout(tmp_path, width, high):
  rng = np.random.default_rng(width)
  toks = rng.integers(0, high, size=1001, dtype=np.int64)
  path = str(tmp_path / "x_train_000001.bin")
  assert shards.write_shard(path, toks, bytes_per_token=width) == 1001
  with open(path, "rb") as f:
    assert f.read() == _reference_bytes(toks.tolist(), width)
  assert shards.read_header(path) == (1001, width)
  back = shards.read_shard(path)
  assert back.dtype == (np.uint16 if width == 2 else np.uint32)
  np.testing.assert_array_equal(np.asarray(back, np.int64), toks)


def test_default_width_and_legacy_header(tmp_path):
  path = str(tmp_path / "a.bin")
  shards.write_shard(path, [1, 2, 70000])
  assert shards.read_header(path) == (3, 4)  # auto-widened
  legacy = tmp_path / "legacy.bin"
  raw = bytearray(_reference_bytes([5, 6, 7], 2))
  raw[12:16] = b"\0\0\0\0"  # bytes_per_token 0 = legacy uint16
  legacy.write_bytes(bytes(raw))
  np.testing.assert_array_equal(shards.read_shard(str(legacy)), [5, 6, 7])


def test_corrupt_files_fail_clearly(tmp_path):
  good = _reference_bytes([1, 2, 3, 4], 2)
  trunc = tmp_path / "trunc.bin"
  trunc.write_bytes(good[:-2])
  with pytest.raises(shards.ShardError, match="truncated or corrupt"):
    shards.read_shard(str(trunc))
  magic = tmp_path / "magic.bin"
  magic.write_bytes(b"\1\0\0\0" + good[4:])
  with pytest.raises(shards.ShardError, match="magic"):
    shards.read_shard(str(magic))
  with pytest.raises(shards.ShardError, match="does not exist"):
    shards.read_shard(str(tmp_path / "nope.bin"))
  with pytest.raises(shards.ShardError, match="does not fit uint16"):
    shards.write_shard(str(tmp_path / "w.bin"), [70000], bytes_per_token=2)


def test_vocab_check_names_the_fix(tmp_path):
  path = str(tmp_path / "v.bin")
  shards.write_shard(path, [1, 2, 60000])
  with pytest.raises(shards.ShardError, match="model.vocab_size=50304"):
    shards.check_vocab(path, shards.read_shard(path), 50304)
  shards.check_vocab(path, shards.read_shard(path), 60001)


def test_train_val_naming(tmp_path):
  for name in ("d_val_000000.bin", "d_train_000002.bin", "d_train_000001.bin"):
    shards.write_shard(str(tmp_path / name), [1, 2, 3])
  train, val = shards.split_train_val(str(tmp_path / "*.bin"))
  assert [os.path.basename(f) for f in train] == ["d_train_000001.bin", "d_train_000002.bin"]
  assert [os.path.basename(f) for f in val] == ["d_val_000000.bin"]
  train2, val2 = shards.split_train_val(str(tmp_path / "*_train_*.bin"))  # val found beside
  assert (train2, val2) == (train, val)
  assert shards.split_train_val(str(tmp_path)) == (train, val)  # a directory works too
  with pytest.raises(shards.ShardError, match="no train shards match"):
    shards.split_train_val(str(tmp_path / "missing_*.bin"))
  with pytest.raises(shards.ShardError, match="no train path"):
    shards.split_train_val("")
