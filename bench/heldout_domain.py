"""How far a held-out corpus lies from the training split: n-gram cross-entropies and coverage.

Issue #12's first report (reports/sweep_small_86m/report.json) scored the held-out Austen novels at
7.0-8.0 nats/token while the validation split sat at 3.5-3.8. This measures, with no model, how much of that gap the data alone
explain: a unigram and an interpolated bigram fitted on the train split of a prepared corpus,
scored on its validation split and on the held-out documents (the first `--docs` of
`--length` tokens each, as eval.py reads them), plus bytes per token, the share of held-out
tokens that never occur in the train split, and the share of characters on markup / code
lines (a line-level heuristic) of both.

  python bench/heldout_domain.py --data data_cache/sweep_small/english \\
      --cache data_cache/sweep_small --out bench/results/heldout_domain_cpu.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atma_jax.data import eval_docs, shards  # noqa: E402
from atma_jax.data.tokenizer import EOT_ID, GPT2_VOCAB_SIZE, load_gpt2_tokenizer  # noqa: E402

V = GPT2_VOCAB_SIZE
MARKUP = re.compile(r"(::|:[a-z]+:`|`|^\s*[-=*~^#+]{3,}\s*$|^\s*\.\.|^\s*[*-] |"
                    r"[{}();<>\[\]_/\\|@#$%&]|^\s{4,}|^\t)")


def read(pattern: str) -> np.ndarray:
  files = sorted(glob.glob(pattern))
  if not files:
    raise SystemExit(f"no shards match {pattern}; prepare the corpus first (configs/small.py)")
  return np.concatenate([np.asarray(shards.read_shard(f), np.int64) for f in files])


class Ngram:
  """Unigram (add-0.1) and a bigram interpolated with it (weight `lam`), fitted on `ids`."""

  def __init__(self, ids: np.ndarray, lam: float = 0.7):
    self.uni = (np.bincount(ids, minlength=V) + 0.1) / (len(ids) + 0.1 * V)
    self.keys, self.counts = np.unique(ids[:-1] * V + ids[1:], return_counts=True)
    self.context = np.bincount(ids[:-1], minlength=V)
    self.seen = np.bincount(ids, minlength=V) > 0
    self.lam = lam

  def unigram_ce(self, ids: np.ndarray) -> float:
    return float(-np.log(self.uni[ids[1:]]).mean())

  def bigram_ce(self, ids: np.ndarray) -> float:
    k = ids[:-1] * V + ids[1:]
    i = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
    c = np.where(self.keys[i] == k, self.counts[i], 0)
    n = self.context[ids[:-1]]
    lam = np.where(n > 0, self.lam, 0.0)
    p = lam * c / np.maximum(n, 1) + (1 - lam) * self.uni[ids[1:]]
    return float(-np.log(p).mean())


def markup_share(text: str) -> float:
  """Share of non-blank characters on lines that look like markup or code, not prose."""
  markup = total = 0
  for line in text.split("\n"):
    if not line.strip():
      continue
    words = re.findall(r"[A-Za-z]+", line)
    prose = (not MARKUP.search(line) and len(words) >= 6
             and sum(map(len, words)) > 0.6 * len(line.strip()))
    total += len(line) + 1
    markup += 0 if prose else len(line) + 1
  return markup / max(total, 1)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="prepared corpus folder (*_train_*.bin, *_val_*)")
  p.add_argument("--cache", required=True, help="data.cache_dir holding the held-out cache")
  p.add_argument("--corpus", default="austen", choices=eval_docs.KINDS)
  p.add_argument("--length", type=int, default=16384)
  p.add_argument("--docs", type=int, default=4)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  tok = load_gpt2_tokenizer()
  train, val = read(f"{a.data}/*_train_*.bin"), read(f"{a.data}/*_val_*.bin")
  docs = eval_docs.long_documents(a.corpus, a.length, tok, limit=a.docs, cache_dir=a.cache)
  held = np.concatenate([[EOT_ID] + d for d in docs]).astype(np.int64)
  model = Ngram(train)
  res = {"data": a.data, "corpus": a.corpus, "docs": len(docs), "length": a.length,
         "train_tokens": int(len(train)), "splits": {}}
  for name, ids in (("val", val), (a.corpus, held)):
    text = tok.decode([int(t) for t in ids if t != EOT_ID])
    res["splits"][name] = {
        "tokens": int(len(ids)), "bytes_per_token": len(text.encode()) / len(ids),
        "unigram_ce_nats": model.unigram_ce(ids), "bigram_ce_nats": model.bigram_ce(ids),
        "unseen_in_train": float(np.mean(~model.seen[ids])),
        "markup_char_share": markup_share(text)}
  res["train_markup_char_share"] = markup_share(tok.decode([int(t) for t in train
                                                            if t != EOT_ID]))
  print(json.dumps(res, indent=1))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
