"""`python generate.py --checkpoint DIR --prompt TEXT`: stream a continuation of TEXT.

The prompt is read as the start of a document (`[EOT] + tokens`); generation stops at the end
of a document (EOT) unless --no-stop, or after --max-new-tokens. Decoding runs on device in
blocks of --block tokens, each printed as soon as it arrives. Sampling: by default from the
model's distribution (temperature 1); --temperature 0 is greedy; --top-k / --top-p filter the
distribution; --seed makes a sampled run repeatable.
Like eval.py, the model runs without its training window (ATMA_SPEC §7) unless --keep-window.
Compiled programs are kept in JAX's persistent compilation cache (--compile-cache, default
$ATMA_COMPILE_CACHE or ~/.cache/atma_jax/jax_cache; atma_jax/compile_cache.py): a second run with
the same shapes loads them; the last line says how many were loaded or compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from atma_jax import compile_cache
from atma_jax.errors import UsageError, cli_boundary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="run directory (its latest checkpoint), a checkpoints/<step> directory, "
                 "or a run directory written by `python -m atma_jax.interop import`")
  p.add_argument("--prompt", required=True, help="the text to continue")
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
  p.add_argument("--temperature", type=float, default=1.0,
                 help="1 = the model's own distribution (default), 0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
  p.add_argument("--top-p", type=float, default=1.0,
                 help="keep the smallest set of tokens holding this probability (default 1 = off)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--step", type=int, default=None,
                 help="load checkpoints/<step> of the run (default: the latest)")
  p.add_argument("--max-len", type=int, default=None,
                 help="cache length in tokens (default: prompt + max-new-tokens)")
  p.add_argument("--block", type=int, default=16, help="tokens decoded on device per print")
  p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
  p.add_argument("--keep-window", action="store_true",
                 help="generate with the checkpoint's training window (default: removed)")
  p.add_argument("--impl", choices=("auto", "pallas", "xla"), default=None,
                 help="kernel backend (default: the checkpoint's model.kernel_impl)")
  p.add_argument("--compile-cache", default="auto", metavar="DIR|off|auto",
                 help="JAX's persistent compilation cache (default auto: $ATMA_COMPILE_CACHE or "
                 "~/.cache/atma_jax/jax_cache)")
  return p.parse_args(argv)


def check_args(args: argparse.Namespace):
  """Every cheap check, before any array is read: returns (SamplingParams, step_dir, Config)."""
  from atma_jax.generate.load import checkpoint_config
  from atma_jax.generate.sampler import SamplingParams

  sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, max_new_tokens=args.max_new_tokens).validate()
  for name in ("block", "max_len"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
  if not os.path.exists(args.checkpoint):
    raise UsageError(f"checkpoint path {args.checkpoint!r} does not exist; pass the run "
                     "directory written by train.py (e.g. runs/tiny), one of its "
                     "checkpoints/<step> folders, or a directory made by "
                     "`python -m atma_jax.interop import`")
  step_dir, cfg = checkpoint_config(args.checkpoint, args.step)  # CheckpointError: one line
  sampling.validate(cfg.model.vocab_size)
  return sampling, step_dir, cfg


@cli_boundary
def main(argv: list[str] | None = None) -> int:
  return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
  sampling, step_dir, cfg = check_args(args)
  compile_cache.configure(args.compile_cache, "--compile-cache",
                          log=lambda line: print(line, file=sys.stderr))

  from atma_jax.data.tokenizer import load_gpt2_tokenizer
  from atma_jax.generate.loop import cache_length
  from atma_jax.generate.text import encode_prompt, stream_text

  tok = load_gpt2_tokenizer()
  prompt_ids = encode_prompt(tok, args.prompt)
  cache_length([prompt_ids], sampling, args.max_len)  # too long for --max-len: error, no load

  from atma_jax.generate.load import load_generator

  t0 = time.perf_counter()
  gen = load_generator(step_dir, cfg, keep_window=args.keep_window, impl=args.impl)
  print(f"[{cfg.name} step {step_dir.name} from {step_dir}; loaded in "
        f"{time.perf_counter() - t0:.1f}s]", file=sys.stderr)
  sys.stdout.write(args.prompt)
  sys.stdout.flush()
  t0 = time.perf_counter()
  compiles = compile_cache.CompileLog.get()
  mark = compiles.mark()
  for piece in stream_text(gen, tok, args.prompt, sampling, max_len=args.max_len,
                           block=args.block, stop_at_eot=not args.no_stop):
    sys.stdout.write(piece)
    sys.stdout.flush()
  sys.stdout.write("\n")
  print(f"[{time.perf_counter() - t0:.1f}s including compilation: "
        f"{compile_cache.describe(compiles.since(mark), compile_cache.active_dir())}]",
        file=sys.stderr)
  return 0
