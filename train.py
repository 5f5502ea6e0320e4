"""Train ATMA: `python train.py [--config tiny|atma_378m|path.json] [--set k=v ...] [--resume]`.

Examples:
  python train.py                                        # tiny preset, embedded corpus, CPU
  python train.py --config tiny --set train.steps=20 --set train.run_dir=/tmp/run
  python train.py --config atma_378m --set mesh.fsdp=8 --set data.source=bin \\
      --set data.path='/data/finewebedu_train_*.bin'
  python train.py --resume --set train.run_dir=runs/tiny  # continue the latest checkpoint
  python train.py --step 500 --set train.run_dir=runs/tiny  # continue from checkpoints/500

With no arguments: the `tiny` preset on the embedded corpus, on CPU, in a few minutes; the run
directory (`runs/tiny`) then holds `checkpoints/<step>/`, `config.json` and `metrics.jsonl`.
Multi-process: pass --coordinator host:port --num-processes N --process-id i (or the JAX_*
environment variables); every process reads its own rows of each batch. If not every process
joins within --init-timeout seconds (default 300), each one exits with a one-line error.
Compiled steps are kept in JAX's persistent compilation cache (train.compile_cache: auto =
$ATMA_COMPILE_CACHE or ~/.cache/atma_jax/jax_cache; a folder; off), so a second run of the same
config loads its first step instead of compiling it; the first step's line says which happened.
"""

import argparse
import os
import sys

from atma_jax.compile_cache import configure as configure_compile_cache
from atma_jax.config import resolve
from atma_jax.errors import check_writable_dir, cli_boundary


@cli_boundary
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="tiny",
                  help="preset name (tiny, atma_378m) or path to a config .json, e.g. a run's "
                  "<run_dir>/config.json (default: tiny)")
  ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config field, e.g. --set train.steps=100 (repeatable)")
  ap.add_argument("--resume", action="store_true",
                  help="continue from the newest intact checkpoint in train.run_dir (bit-exact)")
  ap.add_argument("--step", type=int, default=None,
                  help="continue from checkpoints/<STEP> (implies --resume); newer checkpoints "
                  "are moved aside to <run_dir>/checkpoints_set_aside/")
  ap.add_argument("--coordinator", help="multi-process: coordinator host:port")
  ap.add_argument("--num-processes", type=int, help="multi-process: total number of processes")
  ap.add_argument("--process-id", type=int, help="multi-process: this process's index, 0..N-1")
  ap.add_argument("--init-timeout", type=float, default=None, metavar="SECONDS",
                  help="multi-process: give up when not all processes joined within this time "
                  "(default $ATMA_INIT_TIMEOUT_S or 300)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = ap.parse_args(argv)
  cfg = resolve(args.config, args.overrides)
  check_writable_dir(cfg.train.run_dir, "train.run_dir")
  configure_compile_cache(cfg.train.compile_cache, "train.compile_cache",
                          log=lambda line: print(line, file=sys.stderr))
  import jax

  from atma_jax.train.distributed import init_distributed
  from atma_jax.train.loop import run
  from atma_jax.train.rundir import discard_unstarted
  init_distributed(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
  fresh = not os.path.exists(cfg.train.run_dir)
  try:
    run(cfg, resume=args.resume, resume_step=args.step, progress=not args.no_progress)
  except BaseException:
    if fresh and jax.process_index() == 0:
      try:  # a start that failed leaves no empty run behind
        discard_unstarted(cfg.train.run_dir)
      except OSError:
        pass  # the original error matters more than the leftover
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
