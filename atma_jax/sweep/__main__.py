import sys

from atma_jax.sweep.cli import main

sys.exit(main())
