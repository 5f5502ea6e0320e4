"""grain pipeline: reference row semantics, determinism, host sharding, resume, bad configs."""

import dataclasses
import json

import numpy as np
import pytest

from atma_jax.config import ConfigError, resolve
from atma_jax.data import corpus, pipeline, shards

T, B = 8, 4  # seq_len, global batch rows
TRAIN_LENS = (150, 97, 20, 233)  # the 20-token shard cannot hold one batch and is skipped


def _reference_generator(arrays, batch_tokens, seq_len):
  """ATMA_SPEC §6.1 `data_generator`, transcribed (numpy), wrapping after the last shard."""
  while True:
    for tokens in arrays:
      pos = 0
      while pos + batch_tokens + 1 < len(tokens):
        buf = np.asarray(tokens[pos:pos + batch_tokens + 1], np.int64)
        yield buf[:-1].reshape(-1, seq_len), buf[1:].reshape(-1, seq_len)
        pos += batch_tokens


@pytest.fixture()
def shard_dir(tmp_path):
  rng = np.random.default_rng(0)
  arrays = []
  for i, n in enumerate(TRAIN_LENS):
    arrays.append(rng.integers(0, 50257, size=n))
    shards.write_shard(str(tmp_path / f"t_train_{i + 1:06d}.bin"), arrays[-1])
  val = rng.integers(0, 50257, size=300)
  shards.write_shard(str(tmp_path / "t_val_000000.bin"), val)
  return tmp_path, arrays, val


def _cfg(path, *extra):
  return resolve("tiny", ["data.source=bin", f"data.path={path}/*.bin", f"train.seq_len={T}",
                          f"train.global_batch={B}", "train.micro_batch=2", *extra])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("inputs", "targets"))


def test_rows_match_reference_loader_and_wrap(shard_dir):
  path, arrays, _ = shard_dir
  cfg = _cfg(path)
  windows = pipeline.train_windows(cfg, log=None)
  per_epoch = sum((n - 2) // (B * T) for n in TRAIN_LENS)
  assert len(windows) == per_epoch == 4 + 2 + 0 + 7
  it = pipeline.make_train_iterator(cfg, log=None)
  ref = _reference_generator(arrays, B * T, T)
  for _ in range(2 * per_epoch + 3):  # two full epochs and a bit: epochs wrap identically
    got, (x, y) = next(it), next(ref)
    assert got["inputs"].dtype == np.int32 and got["inputs"].shape == (B, T)
    np.testing.assert_array_equal(got["inputs"], x)
    np.testing.assert_array_equal(got["targets"], y)
    np.testing.assert_array_equal(got["inputs"][:, 1:], got["targets"][:, :-1])  # shift by one


def test_two_iterators_agree(shard_dir):
  cfg = _cfg(shard_dir[0])
  a = _take(pipeline.make_train_iterator(cfg, log=None), 20)
  b = _take(pipeline.make_train_iterator(cfg, log=None), 20)
  assert _same(a, b)


def test_host_sharding_partitions_the_batch(shard_dir):
  cfg = _cfg(shard_dir[0])
  full = _take(pipeline.make_train_iterator(cfg, log=None), 15)
  parts = [_take(pipeline.make_train_iterator(cfg, process_index=p, process_count=2, log=None), 15)
           for p in range(2)]
  for step in range(15):
    p0, p1 = parts[0][step], parts[1][step]
    assert p0["inputs"].shape == (B // 2, T)
    for k in ("inputs", "targets"):
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), full[step][k])
  with pytest.raises(ConfigError, match="multiple of 3"):
    pipeline.make_train_iterator(cfg, process_index=0, process_count=3, log=None)


def test_resume_mid_epoch_reproduces_batches(shard_dir):
  cfg = _cfg(shard_dir[0])
  it = pipeline.make_train_iterator(cfg, log=None)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  rest = _take(it, 16)  # crosses the epoch boundary (13 steps)
  resumed = pipeline.make_train_iterator(cfg, state=state, log=None)
  assert _same(_take(resumed, 16), rest)
  fresh = pipeline.make_train_iterator(cfg, log=None)
  fresh.set_state(state)
  assert _same(_take(fresh, 3), rest[:3])


def test_eval_batches_fixed_from_val_start(shard_dir):
  path, _, val = shard_dir
  cfg = _cfg(path)
  ev = pipeline.make_eval_batches(cfg, 3, log=None)  # rows = train.micro_batch = 2
  ref = _reference_generator([val], 2 * T, T)
  for got in ev:
    x, y = next(ref)
    np.testing.assert_array_equal(got["inputs"], x)
    np.testing.assert_array_equal(got["targets"], y)
  assert _same(ev, pipeline.make_eval_batches(cfg, 3, log=None))
  halves = [pipeline.make_eval_batches(cfg, 3, process_index=p, process_count=2, log=None)
            for p in range(2)]
  for i in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][i]["inputs"], halves[1][i]["inputs"]]), ev[i]["inputs"])
  with pytest.raises(shards.ShardError, match="lower train.eval_batches"):
    pipeline.make_eval_batches(cfg, 1000, log=None)
  held = (len(val) - 2) // (2 * T)  # 18 batches of 2 x 8 (+1) tokens
  clamped = pipeline.make_eval_batches(cfg, 1000, clamp=True, log=None)
  assert len(clamped) == held and _same(clamped, pipeline.make_eval_batches(cfg, held, log=None))


def test_bad_configs_fail_clearly(shard_dir, tmp_path_factory):
  path, _, _ = shard_dir
  cfg = _cfg(path)
  bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="nope"))
  with pytest.raises(ConfigError, match="unknown data.source"):
    pipeline.make_train_iterator(bad, log=None)
  with pytest.raises(ConfigError, match="data.source"):
    resolve("tiny", ["data.source=nope"])
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(shards.ShardError, match="no train shards match"):
    pipeline.make_train_iterator(_cfg(empty), log=None)
  with pytest.raises(shards.ShardError, match="cannot fill one batch"):
    pipeline.make_train_iterator(_cfg(path, "train.seq_len=512"), log=None)
  small_vocab = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=1000))
  with pytest.raises(shards.ShardError, match="model.vocab_size=1000"):
    pipeline.make_train_iterator(small_vocab, log=None)
  with pytest.raises(ConfigError, match="smaller than the GPT-2"):
    pipeline.resolve_shards(dataclasses.replace(
        small_vocab, data=dataclasses.replace(cfg.data, source="embedded")), log=None)


def test_out_of_vocab_id_deep_in_a_shard_fails_at_its_batch(tmp_path, monkeypatch):
  toks = np.arange(5000) % 50000
  toks[4000] = 50400  # >= model.vocab_size 50304: another tokenizer's shard
  shards.write_shard(str(tmp_path / "x_train_000001.bin"), toks)
  shards.write_shard(str(tmp_path / "x_val_000000.bin"), np.arange(100))
  with pytest.raises(shards.ShardError, match="holds token id 50400"):
    pipeline.train_windows(_cfg(tmp_path), log=None)  # the eager probe sees it
  monkeypatch.setattr(pipeline, "_VOCAB_PROBE", 16)  # as if the id sat beyond the probe
  windows = pipeline.train_windows(_cfg(tmp_path), log=None)
  windows[0]  # clean
  with pytest.raises(shards.ShardError, match="holds token id 50400"):
    windows[4000 // (B * T)]


def test_packing_puts_eot_before_every_document():
  packed = corpus.pack_documents([[1, 2], [3], []], eot_id=50256)
  np.testing.assert_array_equal(packed, [50256, 1, 2, 50256, 3, 50256])
