"""`python -m atma_jax.interop {export,import,verify}`."""

import sys

from atma_jax.interop.cli import main

if __name__ == "__main__":
  sys.exit(main())
