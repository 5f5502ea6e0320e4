"""Device prefetch: same batches in the same order, consumer-side data state; a prefetching run
gives the losses of a run without it bit for bit and resumes exactly; an eval request larger than
the validation split is clamped with a notice."""

import threading

import jax
import numpy as np
import pytest

from atma_jax.config import resolve
from atma_jax.data import shards
from atma_jax.train.loop import run
from atma_jax.train.prefetch import DevicePrefetcher



class Counting:
  """Host iterator 0, 1, 2, ... with grain-like get_state/set_state; raises at `fail_at`."""

  def __init__(self, n, fail_at=None):
    self.i, self.n, self.fail_at = 0, n, fail_at
    self.reader_threads = set()

  def __iter__(self):
    return self

  def __next__(self):
    self.reader_threads.add(threading.current_thread().name)
    if self.i == self.fail_at:
      raise ValueError(f"bad batch {self.i}")
    if self.i >= self.n:
      raise StopIteration
    self.i += 1
    return self.i - 1

  def get_state(self):
    return {"next_index": self.i}

  def set_state(self, s):
    self.i = s["next_index"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_order_and_consumer_state(depth):
  it = Counting(6)
  with DevicePrefetcher(it, lambda x: 10 * x, depth=depth) as feed:
    assert feed.get_state() == {"next_index": 0}
    got = [next(feed), next(feed)]
    assert got == [0, 10]
    assert feed.get_state() == {"next_index": 2}  # not the reader's position
    got += list(feed)
  assert got == [10 * i for i in range(6)]
  assert feed.get_state() == {"next_index": 6}
  assert ("device-prefetch" in it.reader_threads) == (depth > 0)


def test_prefetcher_raises_reader_errors_in_order_and_closes():
  feed = DevicePrefetcher(Counting(10, fail_at=2), lambda x: x, depth=4)
  assert [next(feed), next(feed)] == [0, 1]
  with pytest.raises(ValueError, match="bad batch 2"):
    next(feed)
  with pytest.raises(StopIteration):
    next(feed)
  feed.close()
  blocked = DevicePrefetcher(Counting(100), lambda x: x, depth=2)  # reader waits on a full queue
  blocked.close()
  assert blocked._thread is None
  with pytest.raises(ValueError, match="depth"):
    DevicePrefetcher(Counting(1), lambda x: x, depth=-1)


# ------------------------------------------------------------------ the loop, tiny model

T, B, M = 32, 8, 4
SMALL = ["model.num_layers=2", "model.global_offset=1", "model.hidden_size=64",
         "model.head_dim=16", f"train.seq_len={T}", f"train.global_batch={B}",
         f"train.micro_batch={M}", "train.steps=5", "train.log_every=2", "train.eval_every=4",
         "train.eval_batches=50", "train.checkpoint_every=0", "train.async_checkpoint=false",
         "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
VAL_BATCHES = 3  # what the validation shard below holds at M x T


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("bin")
  rng = np.random.default_rng(0)
  shards.write_shard(str(d / "c_train_000001.bin"), rng.integers(0, 50257, size=4 * B * T + 2))
  shards.write_shard(str(d / "c_val_000000.bin"),
                     rng.integers(0, 50257, size=VAL_BATCHES * M * T + 2))
  return d


def _run(corpus, run_dir, *extra, **kw):
  cfg = resolve("tiny", SMALL + ["data.source=bin", f"data.path={corpus}/*.bin",
                                 f"train.run_dir={run_dir}", *extra])
  lines = []
  return run(cfg, progress=False, log=lines.append, **kw), lines


@pytest.mark.slow
def test_prefetching_loop_is_bit_exact_and_resumes(corpus, tmp_path):
  plain, notes = _run(corpus, tmp_path / "plain", "train.prefetch=0")
  ahead, _ = _run(corpus, tmp_path / "ahead", "train.prefetch=3")
  assert len(plain["train_losses"]) == 5  # 5 steps over a 4-step epoch: the data wraps
  assert ahead["train_losses"] == plain["train_losses"]  # bit for bit
  assert ahead["val_losses"] == plain["val_losses"]
  # the eval request (50 batches) is clamped to the 3 the split holds, with one notice
  assert [n for n in notes if n.startswith("[eval]")] == [
      f"[eval] the validation split holds {VAL_BATCHES} batches of {M} x {T} tokens; evaluating "
      f"on those {VAL_BATCHES} (train.eval_batches=50)"]
  # interrupted after step 2 with 2 batches queued: the checkpoint holds the consumer's position
  first, _ = _run(corpus, tmp_path / "split", "train.prefetch=2", stop_after=2)
  second, _ = _run(corpus, tmp_path / "split", "train.prefetch=2", resume=True)
  assert first["interrupted"] and first["steps"] == 2
  assert first["train_losses"] + second["train_losses"] == plain["train_losses"]
  # throughput windows: the first step alone, then windows of log_every steps
  w = ahead["throughput_windows"]
  assert "first_step_s" in w[0] and w[0]["step"] == 1
  assert [x["step"] for x in w[1:]] == [2, 4, 5]  # 4: eval ends a window; 5: the last step
  assert sum(x["window_steps"] for x in w[1:]) == 4
  assert all(x["tokens_per_s"] > 0 for x in w[1:])
