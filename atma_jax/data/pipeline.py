"""grain input pipeline: token shards -> per-step batches, sharded across hosts, resumable.

Row semantics are the reference loader's (ATMA_SPEC §6.1, `data_generator`), reproduced exactly:
a global batch of `B = train.global_batch` rows of `T = train.seq_len` reads the
`B*T + 1` tokens at the shard position `pos`; row `r` is the window
`tokens[pos + r*T : pos + (r+1)*T + 1]`, `inputs = window[:-1]`, `targets = window[1:]`; the next
batch starts at `pos + B*T`. A batch is only taken while `pos + B*T + 1 < len(shard)`, so each
shard yields `(len - 2) // (B*T)` batches and its tail is dropped. Shards are read in sorted
order; after the last one the stream wraps to the first (epoch 2 repeats epoch 1 exactly).

Elements are **per optimizer step**: `{"inputs": int32[B_local, T], "targets": int32[B_local, T]}`
with `B_local = global_batch // process_count`; process `p` holds global rows
`[p*B_local, (p+1)*B_local)` and reads only those tokens (memory-mapped). The trainer splits the
rows into micro-batches itself.

The iterator is a `grain.DatasetIterator`: `it.get_state()` is a small JSON-able dict
(`{"next_index": k}`) to store with a checkpoint, and `it.set_state(state)` on a fresh iterator
resumes with the exact next batch.
"""

from __future__ import annotations

import bisect
from typing import Callable

import grain
import numpy as np

from atma_jax.config import Config, ConfigError
from atma_jax.data import corpus, shards, sources
from atma_jax.data.tokenizer import GPT2_VOCAB_SIZE, load_gpt2_tokenizer

Batch = dict[str, np.ndarray]  # {"inputs": int32[B_local, T], "targets": int32[B_local, T]}

_VOCAB_PROBE = 1 << 20  # ids checked eagerly at the start of each shard; the rest per batch


class StepWindows:
  """Random-access view: step `i` of an epoch -> this process's rows of global batch `i`."""

  def __init__(self, files: list[str], *, seq_len: int, batch_rows: int, row_start: int,
               row_count: int, vocab_size: int, what: str = "train"):
    if not (0 <= row_start and row_start + row_count <= batch_rows and row_count > 0):
      raise ValueError(f"rows [{row_start}, {row_start + row_count}) are not inside a batch of "
                       f"{batch_rows} rows.")
    self.files = list(files)
    self.arrays = [shards.read_shard(f) for f in self.files]
    for f, a in zip(self.files, self.arrays):
      shards.check_vocab(f, a[:_VOCAB_PROBE], vocab_size)
    self.seq_len, self.batch_rows = seq_len, batch_rows
    self.row_start, self.row_count, self.vocab_size = row_start, row_count, vocab_size
    self.batch_tokens = batch_rows * seq_len
    per_shard = [max(0, (int(a.shape[0]) - 2) // self.batch_tokens) for a in self.arrays]
    self.cum_steps = np.cumsum(per_shard).tolist()
    if not self.cum_steps or self.cum_steps[-1] == 0:
      total = sum(int(a.shape[0]) for a in self.arrays)
      biggest = max((int(a.shape[0]) for a in self.arrays), default=0)
      raise shards.ShardError(
          f"the {what} split ({len(self.files)} shard(s), {total:,} tokens, largest {biggest:,}) "
          f"cannot fill one batch of {batch_rows} x {seq_len} (+1) tokens; lower "
          "train.global_batch / train.seq_len or use a larger corpus.")

  def __len__(self) -> int:
    return self.cum_steps[-1]

  def locate(self, step: int) -> tuple[int, int]:
    """(shard index, token position of the global batch) of epoch step `step`."""
    shard = bisect.bisect_right(self.cum_steps, step)
    before = self.cum_steps[shard - 1] if shard else 0
    return shard, (step - before) * self.batch_tokens

  def __getitem__(self, step: int) -> Batch:
    step = int(step)
    if not 0 <= step < len(self):
      raise IndexError(f"step {step} outside the epoch of {len(self)} steps")
    shard, pos = self.locate(step)
    start = pos + self.row_start * self.seq_len
    buf = np.asarray(self.arrays[shard][start:start + self.row_count * self.seq_len + 1],
                     dtype=np.int32)
    if buf.size and int(buf.max()) >= self.vocab_size:
      shards.check_vocab(self.files[shard], buf, self.vocab_size)  # raises with the message
    return {"inputs": buf[:-1].reshape(self.row_count, self.seq_len),
            "targets": buf[1:].reshape(self.row_count, self.seq_len)}


# ---------------------------------------------------------------------------------------------
# Source dispatch


def resolve_shards(cfg: Config, *, log: Callable[[str], None] | None = print
                   ) -> tuple[list[str], list[str]]:
  """(train shard files, validation shard files) for `cfg.data`, tokenizing into the cache first
  for the text sources."""
  d = cfg.data
  if d.source in ("embedded", "english", "hf") and cfg.model.vocab_size < GPT2_VOCAB_SIZE:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the GPT-2 "
                      f"vocabulary ({GPT2_VOCAB_SIZE}) used by data.source={d.source}; use 50304.")
  if d.source == "bin":
    return shards.split_train_val(d.path, d.val_path)
  if d.source == "english" and d.path:
    return shards.split_train_val(d.path, d.val_path)
  tok = load_gpt2_tokenizer()
  if d.source == "embedded":
    out, meta = corpus.embedded_corpus(tok, d.cache_dir, val_fraction=d.val_fraction,
                                       seed=d.seed, log=log)
  elif d.source == "english":
    out, meta = corpus.english_corpus(tok, d.cache_dir, val_fraction=d.val_fraction, seed=d.seed,
                                      log=log)
  elif d.source == "hf":
    key = corpus.cache_key("hf", d.hf_name, d.hf_text_field, tok.fingerprint, d.val_fraction,
                           d.seed)
    out, meta = corpus.cached_corpus(
        "hf", key, lambda: sources.hf_documents(d.hf_name, d.hf_text_field), tok, d.cache_dir,
        val_fraction=d.val_fraction, seed=d.seed, log=log)
  else:
    raise ConfigError(f"unknown data.source={d.source!r}; choose embedded, english, bin or hf.")
  return corpus.shard_lists(out, meta)


def _local_rows(global_rows: int, process_index: int, process_count: int, what: str
                ) -> tuple[int, int]:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count="
                     f"{process_count}).")
  if global_rows % process_count:
    raise ConfigError(f"{what}={global_rows} rows do not split evenly over {process_count} "
                      f"processes; make it a multiple of {process_count}.")
  local = global_rows // process_count
  return process_index * local, local


# ---------------------------------------------------------------------------------------------
# Public API


def train_windows(cfg: Config, *, process_index: int = 0, process_count: int = 1,
                  log: Callable[[str], None] | None = print) -> StepWindows:
  """The random-access epoch (`len()` = steps per epoch) behind `make_train_iterator`."""
  train_files, _ = resolve_shards(cfg, log=log)
  start, local = _local_rows(cfg.train.global_batch, process_index, process_count,
                             "train.global_batch")
  return StepWindows(train_files, seq_len=cfg.train.seq_len, batch_rows=cfg.train.global_batch,
                     row_start=start, row_count=local, vocab_size=cfg.model.vocab_size)


def make_train_dataset(cfg: Config, *, process_index: int = 0, process_count: int = 1,
                       read_threads: int = 2, prefetch: int = 4,
                       log: Callable[[str], None] | None = print) -> grain.IterDataset:
  """Infinite `grain.IterDataset` of per-step batches (see the module docstring)."""
  windows = train_windows(cfg, process_index=process_index, process_count=process_count, log=log)
  ds = grain.MapDataset.source(windows).repeat(None)  # epochs wrap in the same order
  if cfg.data.needle_mix > 0:  # demonstration aid: some rows become needle examples
    from atma_jax.data.needle_mix import NeedleMixer
    ds = ds.map_with_index(NeedleMixer(cfg.data.needle_mix, cfg.data.seed, windows.row_start,
                                       load_gpt2_tokenizer()))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch))


def make_train_iterator(cfg: Config, *, process_index: int = 0, process_count: int = 1,
                        state: dict | None = None, log: Callable[[str], None] | None = print
                        ) -> grain.DatasetIterator:
  """Iterator over per-step batches `{"inputs","targets"}: int32[global_batch/process_count, T]`.

  Deterministic; resumable: pass `state=it.get_state()` saved earlier (or call `set_state`)."""
  it = iter(make_train_dataset(cfg, process_index=process_index, process_count=process_count,
                               log=log))
  if state is not None:
    it.set_state(state)
  return it


def make_eval_batches(cfg: Config, num_batches: int | None = None, *, process_index: int = 0,
                      process_count: int = 1, batch_rows: int | None = None, clamp: bool = False,
                      log: Callable[[str], None] | None = print) -> list[Batch]:
  """The first `num_batches` (default `train.eval_batches`) validation batches of
  `batch_rows` (default `train.micro_batch`) global rows, from the start of the validation split,
  same row semantics as training; this process's rows only. Always the same batches.

  A request beyond what the split holds raises, unless `clamp`: then every batch the split holds
  is returned (fewer than asked; the caller says so)."""
  num_batches = cfg.train.eval_batches if num_batches is None else num_batches
  batch_rows = cfg.train.micro_batch if batch_rows is None else batch_rows
  _, val_files = resolve_shards(cfg, log=log)
  start, local = _local_rows(batch_rows, process_index, process_count,
                             "eval batch rows (train.micro_batch unless batch_rows is given)")
  windows = StepWindows(val_files, seq_len=cfg.train.seq_len, batch_rows=batch_rows,
                        row_start=start, row_count=local, vocab_size=cfg.model.vocab_size,
                        what="validation")
  if num_batches > len(windows):
    if not clamp:
      raise shards.ShardError(
          f"the validation split has only {len(windows)} batches of {batch_rows} x "
          f"{cfg.train.seq_len} tokens, {num_batches} requested; lower train.eval_batches or "
          "raise data.val_fraction.")
    num_batches = len(windows)
  return [windows[i] for i in range(num_batches)]
