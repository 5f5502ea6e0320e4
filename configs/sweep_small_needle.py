"""Issue #12, second grid: the five `sweep_small` cells with needles mixed into training.

Every cell trains with `data.needle_mix=0.5` (half the training rows are a §7.3 passkey / NIAH
example inside the 512-token training length, atma_jax/data/needle_mix.py), so the cells stay
matched with one another (same data, tokens, optimizer; only core / memory / init differ) and
the question becomes the mechanistic half of Stage I: once retrieval is learnt at 1x, which
cells keep it at 32x? It is a labelled departure from the reference, whose Stage I models learnt
retrieval from ~1B tokens of web text; at this budget (14.7M tokens per cell) no natural-text
cell of `sweep_small` retrieves at 1x (reports/sweep_small; the first 86M attempt: reports/sweep_small_86m).

  python -m atma_jax.sweep --config sweep_small_needle --smoke            # CPU, minutes

GPU: the same one-call plan as sweep_small (carry `.whl` and `data_cache/sweep_small`), five
cells at once (`--parallel 5`: each process gets 0.18 of the GPU's memory); the exact command is
in reports/sweep_small_needle/commands.txt.
"""

from atma_jax.sweep.grid import Grid, Smoke
from configs import sweep_small

NEEDLE_MIX = "data.needle_mix=0.5"


def grid() -> Grid:
  base = sweep_small.grid()
  return Grid(
      name="sweep_small_needle",
      base=base.base,
      base_overrides=(*sweep_small.NARROW, NEEDLE_MIX),
      cells=tuple(c for c in base.cells if not c.extra),  # sweep_small's five matched cells
      eval=base.eval,
      smoke=Smoke(overrides=(*sweep_small.TINY, NEEDLE_MIX), cells=("polar+mem", "rope+mem")),
      primary="polar+mem",
      notes=("Every cell trains with half its rows replaced by passkey / NIAH needles inside "
             "the 512-token training length (data.needle_mix=0.5), so the cells are matched "
             "with one another but not with the reference's Stage I, which learnt retrieval "
             "from web text alone. Asked: once retrieval is learnt at 1x, does Polar+memory "
             "keep it at 32x, and do Polar without memory, NoPE+memory and RoPE+memory lose "
             "it (the Stage I ordering)?"),
  )
