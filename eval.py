"""Evaluate a checkpoint at long contexts: `python eval.py --checkpoint runs/tiny [--lengths ...]`.

See `atma_jax/eval/cli.py` (or `python eval.py --help`) for the tasks, options and outputs.
"""

import sys

from atma_jax.eval.cli import main

if __name__ == "__main__":
  sys.exit(main())
