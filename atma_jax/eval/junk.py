"""Windows of the validation token stream for the "junk" perplexity (ATMA_SPEC §7.2 junk_ppl).

The reference scores `num_eval_docs` consecutive L-token sequences from the start of the
FineWeb-Edu validation shard: text that runs across document boundaries, so long context is
mostly unrelated documents. Our analogue reads the validation split of the checkpoint's own
`cfg.data` (on the embedded corpus: the held-out share of the stdlib documents, each led by EOT)
through the data package's public `make_eval_batches`, with the row semantics of training:
window r is `tokens[r*L : (r+1)*L + 1]` of the split, inputs `[:-1]`, targets `[1:]`.
"""

from __future__ import annotations

import dataclasses

from atma_jax.config import Config
from atma_jax.errors import AtmaError


class JunkError(AtmaError, ValueError):
  """The validation split cannot supply the windows asked for (the message says what to do)."""


def junk_windows(cfg: Config, length: int, count: int) -> list[list[int]]:
  """`count` consecutive windows of `length + 1` validation tokens (row r starts at r*length)."""
  from atma_jax.data import pipeline

  if length < 1 or count < 1:
    raise JunkError(f"junk windows need length >= 1 and count >= 1, got {length}, {count}")
  at_len = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=length))
  try:
    (batch,) = pipeline.make_eval_batches(at_len, 1, batch_rows=count, log=None)
  except Exception as e:  # noqa: BLE001 - too short a split, missing shards: user-facing
    raise JunkError(f"the validation split of data.source={cfg.data.source!r} cannot give "
                    f"{count} window(s) of {length:,} tokens ({e}); use shorter --lengths, fewer "
                    "--docs, or --tasks without junk") from None
  return [list(map(int, x)) + [int(y[-1])] for x, y in zip(batch["inputs"], batch["targets"])]
