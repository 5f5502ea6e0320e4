"""data.needle_mix: a share of training rows become retrieval examples built from their own text,
deterministically per (seed, step, global row), so host sharding and resume still hold."""

import numpy as np
import pytest

from atma_jax.config import ConfigError, resolve
from atma_jax.data import pipeline, shards
from atma_jax.data.tokenizer import load_gpt2_tokenizer

T, B = 96, 8


@pytest.fixture()
def cfg(tmp_path):
  rng = np.random.default_rng(0)
  words = load_gpt2_tokenizer().encode(" the river runs to the sea and back again" * 400)
  shards.write_shard(str(tmp_path / "t_train_000001.bin"), np.asarray(words * 3))
  shards.write_shard(str(tmp_path / "t_val_000000.bin"), rng.integers(0, 50257, size=2000))
  return resolve("tiny", ["data.source=bin", f"data.path={tmp_path}/*.bin",
                          f"train.seq_len={T}", f"train.global_batch={B}", "train.micro_batch=4",
                          "data.needle_mix=0.5"])


def _batches(cfg, n, **kw):
  it = pipeline.make_train_iterator(cfg, log=None, **kw)
  return it, [next(it) for _ in range(n)]


def test_mixed_rows_are_needle_examples(cfg):
  tok = load_gpt2_tokenizer()
  _, batches = _batches(cfg, 4)
  mixed = 0
  for b in batches:
    assert (b["inputs"][:, 1:] == b["targets"][:, :-1]).all()  # still shifted windows
    for r in range(B):
      text = tok.decode(list(b["inputs"][r]) + [int(b["targets"][r, -1])])
      if " number is" in text or "access code" in text:
        mixed += 1
        cue = text.rsplit(" is", 1)[0].rsplit(" The ", 1)[1]
        value = text.rsplit(" is", 1)[1]
        assert text.count(cue) == 2 and text.count(cue + " is" + value) == 2
        assert len(tok.encode(value)) == 5
  assert 0.25 * 4 * B < mixed < 0.75 * 4 * B  # about half of 32 rows


def test_mixing_is_deterministic_sharded_and_resumable(cfg):
  it, full = _batches(cfg, 3)
  _, again = _batches(cfg, 3)
  assert all((a["inputs"] == b["inputs"]).all() for a, b in zip(full, again))
  halves = [_batches(cfg, 3, process_index=p, process_count=2)[1] for p in range(2)]
  for s in range(3):
    joined = np.concatenate([halves[0][s]["inputs"], halves[1][s]["inputs"]])
    assert (joined == full[s]["inputs"]).all()
  it1, first = _batches(cfg, 1)
  resumed = pipeline.make_train_iterator(cfg, log=None, state=it1.get_state())
  assert (next(resumed)["inputs"] == full[1]["inputs"]).all()


def test_needle_mix_bad_values(cfg):
  with pytest.raises(ConfigError, match="must lie in"):
    resolve("tiny", ["data.needle_mix=1.5"])
  with pytest.raises(ConfigError, match="seq_len >= 64"):
    resolve("tiny", ["data.needle_mix=0.1", "train.seq_len=32"])
