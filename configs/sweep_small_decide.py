"""Issue #12, the next experiment: Polar+memory against NoPE+memory at ~9x the tokens.

The needle-mixed grid (`sweep_small_needle`, 14.7M tokens per cell) found NoPE+mem retrieving
at 100% at 1x and 56% at 32x while every Polar cell was at chance; Polar+mem at 33.5M tokens
reached 30% at 1x and 34% at 32x (reports/sweep_small_needle*/). Does Polar+mem, trained long
enough to retrieve at 1x, keep it at 32x where NoPE+mem loses it? Same cells, same data (half
the rows needle examples), 4096 steps of 64 x 512 = 134M tokens per cell; one cell per GPU call,
alone on the GPU, the calls' reports merged:

  python -m atma_jax.sweep --config sweep_small_decide --smoke               # CPU, minutes

  # one call per cell (carry .whl and data_cache/sweep_small; at most 8 files come back):
  mkdir -p $OUT/decide && python3 -m pip install -q --no-index --no-deps --no-compile \\
    --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 560 \\
    python3 -m atma_jax.sweep --config sweep_small_decide --cells polar+mem --deadline 400 \\
    --out $OUT/decide 2>&1 | tee $OUT/decide/sweep_log.txt
  # then the same with --cells nope+mem (and polar), and here:
  python -m atma_jax.sweep --config sweep_small_decide --cells polar+mem,nope+mem \\
    --merge A/report.json --merge B/report.json --work /tmp/nowork --out reports/sweep_small_decide

Time per call, estimated from the 2026-12-03 calls (not measured at this length): ~385K tok/s
for one cell alone (the median of the one cell left running in the first call) gives ~350 s of
steps, plus ~55 s of start-up and compiles (the long Polar+mem cell's 1024-step training stage
took 143 s alone, 87 s of it steps at that rate: reports/sweep_small_needle_polar_long/
sweep_log.txt). The evaluation took 96-142 s in those calls (`eval_seconds` in
reports/sweep_small*/report.json; alone, the long cell's had not finished after 106 s when its
call ended). So `--deadline 400` (400 s + ~145 s of evaluation inside the 560 s `timeout`)
stops the training in time for its evaluation, possibly a few dozen steps before 4096 (the cell
is then evaluated at the step it reached, and the report says so); at 450 a training the
deadline stops would lose its evaluation to the `timeout`.
"""

from atma_jax.sweep.grid import Cell, Grid, Smoke
from configs import sweep_small, sweep_small_needle

STEPS = 4096


def grid() -> Grid:
  needle = sweep_small_needle.grid()
  return Grid(
      name="sweep_small_decide",
      base=needle.base,
      base_overrides=(*needle.base_overrides, f"train.steps={STEPS}",
                      f"train.eval_every={STEPS}"),
      cells=(
          Cell(core="polar", memory=True, label="polar+mem"),
          Cell(core="nope", memory=True, label="nope+mem"),
          Cell(core="polar", memory=False, label="polar"),
      ),
      eval=needle.eval,
      smoke=Smoke(overrides=(*sweep_small.TINY, sweep_small_needle.NEEDLE_MIX),
                  cells=("polar+mem", "nope+mem")),
      primary="polar+mem",
      notes=("Polar+memory against NoPE+memory (and Polar alone) with needles mixed into "
             "training (data.needle_mix=0.5) at 134M tokens per cell, ~9x sweep_small_needle: "
             "once Polar+mem retrieves at 1x, does it keep retrieval at 32x where NoPE+mem "
             "loses it (100% -> 56% at 14.7M tokens)?"),
  )
