"""Train ATMA: `python train.py [--config tiny|atma_378m|path.json] [--set k=v ...] [--resume]`.

With no arguments: the `tiny` preset on the embedded corpus, on CPU, in a few minutes; the run
directory (`runs/tiny`) then holds `checkpoints/<step>/`, `config.json` and `metrics.jsonl`.
Multi-process: pass --coordinator host:port --num-processes N --process-id i (or the JAX_*
environment variables); every process reads its own rows of each batch.
"""

import argparse
import sys

from atma_jax.config import ConfigError, resolve


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="tiny", help="preset name or path to a config .json")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config field, e.g. --set train.steps=100 (repeatable)")
  ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  ap.add_argument("--coordinator", help="multi-process: coordinator host:port")
  ap.add_argument("--num-processes", type=int)
  ap.add_argument("--process-id", type=int)
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = ap.parse_args(argv)
  try:
    cfg = resolve(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from atma_jax.train.loop import init_distributed, run
  try:
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    run(cfg, resume=args.resume, progress=not args.no_progress)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
