"""Tokenize a corpus once into reference-format `.bin` shards.

    python -m atma_jax.data.prepare --source english --out data/english
    python -m atma_jax.data.prepare --source embedded --out data/embedded
    python -m atma_jax.data.prepare --source hf --hf-name roneneldan/TinyStories --out data/ts \\
        --max-tokens 200000000

Writes `<source>_val_000000.bin`, `<source>_train_000001.bin`, ... and `meta.json` (token counts
per split and per sub-source, timing) into `--out`. Train on them with
`--set data.source=bin --set data.path='<out>/*.bin'` (or `data.source=english data.path=<out>`).

The english corpus needs Debian packages (CPython docs + Linux kernel docs); the held-out eval
texts (Austen, KJV) are checked too. A missing package exits with status 2 and prints the exact
`apt-get install` line. `--heldout-cache DIR` also tokenizes those eval texts into
`DIR/heldout-{austen,kjv}-<tokenizer>.bin`, where `eval.py` finds them when the run's
`data.cache_dir` is DIR (so a machine without the packages evaluates on them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

from atma_jax.data import corpus, sources
from atma_jax.data.tokenizer import load_gpt2_tokenizer
from atma_jax.errors import cli_boundary

ENGLISH_PACKAGES = (sources.PY_DOC_PACKAGE, sources.KERNEL_PACKAGE)
EVAL_PACKAGES = (sources.AUSTEN_PACKAGE, sources.KJV_PACKAGE)


def missing_english_packages() -> list[str]:
  """The english-corpus Debian packages whose files are absent (eval-only ones included)."""
  present = {
      sources.PY_DOC_PACKAGE: os.path.isdir(sources.PY_DOC_DIR),
      sources.KERNEL_PACKAGE: bool(glob.glob(sources.KERNEL_TARBALL_GLOB)),
      sources.AUSTEN_PACKAGE: os.path.isfile(sources.AUSTEN_RDB + ".rdx"),
      sources.KJV_PACKAGE: shutil.which("bible") is not None,
  }
  return [pkg for pkg, ok in present.items() if not ok]


def _documents(args):
  if args.source == "embedded":
    return sources.embedded_documents()
  if args.source == "english":
    return sources.english_documents()
  return sources.hf_documents(args.hf_name, args.hf_text_field, args.hf_split)


@cli_boundary
def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m atma_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", required=True, choices=("embedded", "english", "hf"))
  p.add_argument("--out", required=True, help="output directory for the .bin shards")
  p.add_argument("--val-fraction", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0, help="shuffles training documents per shard")
  p.add_argument("--shard-tokens", type=int, default=corpus.DEFAULT_SHARD_TOKENS)
  p.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens (0: all)")
  p.add_argument("--hf-name", default="")
  p.add_argument("--hf-text-field", default="text")
  p.add_argument("--hf-split", default="train")
  p.add_argument("--pure-python", action="store_true", help="do not use tiktoken even if present")
  p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
  p.add_argument("--heldout-cache", default="",
                 help="also tokenize the held-out eval texts (Austen, KJV) into this folder")
  args = p.parse_args(argv)

  if args.source == "english":
    missing = missing_english_packages()
    needed = [m for m in missing if m in ENGLISH_PACKAGES]
    if needed:
      print(f"error: the english corpus needs Debian packages {needed}. Run:\n  "
            f"{sources.apt_hint(*missing)}", file=sys.stderr)
      return 2
    if missing:
      print(f"note: held-out eval texts need {missing} (not training data): "
            f"{sources.apt_hint(*missing)}", file=sys.stderr)
  if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
    print(f"error: {args.out} is not empty; pass --force to overwrite.", file=sys.stderr)
    return 2
  if args.force:
    for f in os.listdir(args.out) if os.path.isdir(args.out) else []:
      if f.endswith(".bin") or f == "meta.json":
        os.remove(os.path.join(args.out, f))

  tok = load_gpt2_tokenizer(use_tiktoken=not args.pure_python)
  print(f"[prepare] {args.source} -> {args.out} ({tok.backend} BPE)", flush=True)
  meta = corpus.tokenize_to_shards(_documents(args), tok, args.out, prefix=args.source,
                                   val_fraction=args.val_fraction, seed=args.seed,
                                   shard_tokens=args.shard_tokens,
                                   max_tokens=args.max_tokens or None,
                                   log=lambda m: print(m, flush=True))
  print(json.dumps({k: v for k, v in meta.items() if not k.endswith("_files")}, indent=2))
  if args.heldout_cache:
    from atma_jax.data import eval_docs
    os.makedirs(args.heldout_cache, exist_ok=True)
    for kind in ("austen", "kjv"):
      docs = eval_docs.text_documents(kind, tok, args.heldout_cache)  # SourceError: exit 2
      path = eval_docs.cache_path(kind, args.heldout_cache, tok)
      print(f"[prepare] held-out {kind}: {len(docs)} document(s), {sum(map(len, docs)):,} tokens"
            f" -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
