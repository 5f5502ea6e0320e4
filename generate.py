"""Generate text: `python generate.py --checkpoint runs/tiny --prompt "def fib(n):"`.

Streams the continuation of the prompt; see `atma_jax/generate/cli.py` (or `--help`) for the
sampling options (--temperature, --top-k, --top-p, --seed, --max-new-tokens, --step).
"""

import sys

from atma_jax.generate.cli import main

if __name__ == "__main__":
  sys.exit(main())
