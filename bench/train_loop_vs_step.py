"""train.py's own loop on real data beside the bare jitted step on synthetic tokens (issue #13).

One process, same config and shapes (default: atma_378m, 64 sequences of 2048 per optimizer step,
micro-batch 16, the embedded corpus), phases in this order:

  step_synthetic   the jitted `train_step` alone on one device-resident batch of random tokens
  loop             `atma_jax.train.loop.run` as `train.py` runs it (grain pipeline, device
                   prefetch of `train.prefetch` batches, metrics one step late, progress windows)
  loop_prefetch0   the same loop reading and putting each batch at its step (`train.prefetch=0`)
  step_real        the bare step on real batches already on the device (data content, no
                   pipeline)

Every phase is timed the same way: `--windows` device-synchronized windows of `--window` steps
(the loop's own windows from progress.py; for the bare step, `--window` steps dispatched back to
back and one block on the last step's outputs), after the first step (compile) and `--window - 1`
warm-up steps. Tokens/s of a phase is
its tokens over its seconds summed over windows; every window is recorded. The goal:
`loop / step_synthetic >= 0.97`. A persistent compilation cache (`--cache-dir`) makes the later
phases load the step compiled by the first (same program); evaluation is off (`--eval` keeps the
default). Peak memory is the device's running peak after each phase.

    python3 bench/train_loop_vs_step.py --out $OUT/loop_vs_step.json          # GPU, est. ~5 min
    JAX_PLATFORMS=cpu python3 bench/train_loop_vs_step.py --smoke             # CPU, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from atma_jax.config import resolve  # noqa: E402
from atma_jax.train import progress  # noqa: E402
from atma_jax.train.loop import default_data_fn, run, to_global  # noqa: E402
from atma_jax.train.mesh import batch_sharding, make_mesh  # noqa: E402
from atma_jax.train.state import init_state, setup_state  # noqa: E402
from atma_jax.train.step import make_train_step  # noqa: E402

SMOKE_SETS = ["model.num_layers=2", "model.global_offset=1", "model.hidden_size=64",
              "model.head_dim=16", "train.seq_len=64", "train.global_batch=4",
              "train.micro_batch=2"]


def phase_sets(args) -> list[str]:
  sets = [f"train.seq_len={args.seq_len}", f"train.global_batch={args.global_batch}",
          f"train.micro_batch={args.micro_batch}", "train.checkpoint_every=0",
          f"train.log_every={args.window}", "train.eval_every=1000000"]
  if not args.eval:
    sets.append("train.eval_batches=0")
  return sets + (SMOKE_SETS if args.smoke else []) + args.extra


def peak_bytes():
  try:
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001 - CPU has no memory stats
    return None


def summarize(windows: list[dict], skip: int) -> dict:
  """Tokens/s over the rate windows after the first `skip` of them, and every window."""
  rated = [w for w in windows if "tokens_per_s" in w]
  kept = rated[skip:] if len(rated) > skip else rated
  out = {"windows": windows, "windows_used": len(kept)}
  steady = progress.steady_rate(kept)
  if steady:
    out.update({"tokens_per_s": steady["tokens_per_s"], "timed_steps": steady["steps"],
                "timed_s": steady["seconds"]})
  return out


def loop_phase(cfg_sets, preset, steps, prefetch, log):
  """`loop.run` as train.py runs it; rates from its own device-synchronized windows."""
  with tempfile.TemporaryDirectory() as run_dir:
    cfg = resolve(preset, cfg_sets + [f"train.steps={steps}", f"train.prefetch={prefetch}",
                                      f"train.run_dir={run_dir}"])
    t0 = time.perf_counter()
    summary = run(cfg, progress=False, log=log)
    wall = time.perf_counter() - t0
  out = summarize(summary["throughput_windows"], 1)  # skip the warm-up window
  out.update({"prefetch": prefetch, "steps": summary["steps"], "wall_s": wall,
              "first_step_s": summary["throughput_windows"][0].get("first_step_s"),
              "losses": [l for _, l in summary["train_losses"]], "mfu_peak": summary["mfu_peak"]})
  return out


def step_phase(cfg_sets, preset, batches_fn, windows, window):
  """The bare jitted step: `windows` windows of `window` steps after `window` warm-up steps."""
  cfg = resolve(preset, cfg_sets + [f"train.steps={window * (windows + 1)}"])  # = the loop's
  mesh = make_mesh(cfg.mesh)
  setup = setup_state(cfg, mesh)
  state = init_state(cfg, setup)
  step = make_train_step(cfg, setup, mesh)
  batches = batches_fn(cfg, batch_sharding(mesh))
  t0 = time.perf_counter()
  state, m = step(state, batches[0])
  jax.block_until_ready((state, m))
  first = time.perf_counter() - t0
  i = 1
  for _ in range(window - 1):
    state, m = step(state, batches[i % len(batches)])
    i += 1
  jax.block_until_ready((state, m))
  tokens = cfg.train.global_batch * cfg.train.seq_len
  clock = progress.WindowClock()
  rows, losses = [], []
  for _ in range(windows):
    for _ in range(window):
      state, m = step(state, batches[i % len(batches)])
      i += 1
    jax.block_until_ready((state, m))
    secs = clock.lap()
    rows.append(progress.window_rates(window, window * tokens, secs, flops_per_token=0.0,
                                      num_devices=1, peak=progress.Peak(None, "datasheet")))
    losses.append(float(m["loss"]))
  out = summarize(rows, 0)
  out.update({"first_step_s": first, "distinct_batches": len(batches), "losses": losses})
  return out


def synthetic_batches(cfg, sharding, seed=0):
  B, T, V = cfg.train.global_batch, cfg.train.seq_len, cfg.model.vocab_size
  toks = np.random.default_rng(seed).integers(0, min(V, 50257), (B, T + 1)).astype(np.int32)
  return [{"inputs": jax.device_put(toks[:, :-1], sharding),
           "targets": jax.device_put(toks[:, 1:], sharding)}]


def real_batches(cfg, sharding, n=8):
  it = default_data_fn(cfg, 0, 1)
  return [to_global(next(it), sharding) for _ in range(n)]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="atma_378m")
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--global-batch", type=int, default=64)
  ap.add_argument("--micro-batch", type=int, default=16)
  ap.add_argument("--window", type=int, default=5, help="steps per timed window")
  ap.add_argument("--windows", type=int, default=4, help="timed windows per phase")
  ap.add_argument("--phases", default="step_synthetic,loop,loop_prefetch0,step_real")
  ap.add_argument("--eval", action="store_true", help="keep the default evaluation in the loop")
  ap.add_argument("--set", dest="extra", action="append", default=[])
  ap.add_argument("--cache-dir", default="/tmp/atma_jax_bench_cache",
                  help="persistent XLA compilation cache shared by the phases ('' = off)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--smoke", action="store_true", help="CPU check: tiny model, seq 64")
  args = ap.parse_args()
  if args.smoke:
    args.preset, args.seq_len, args.global_batch, args.micro_batch = "tiny", 64, 4, 2
    args.window, args.windows = 2, 2
  if args.window < 1 or args.windows < 1:
    sys.exit("--window and --windows must be >= 1")
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  sets = phase_sets(args)
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  out = {"device": kind, "platform": dev.platform, "devices": jax.device_count(),
         "jax": jax.__version__, "python": platform.python_version(), "preset": args.preset,
         "overrides": sets, "window_steps": args.window, "windows": args.windows,
         "warmup_steps": args.window - 1, "phases": {},
         "tokens_per_step": args.global_batch * args.seq_len,
         "note": "peak_bytes_in_use is device 0's running peak since the process started"}
  name = args.out or os.path.join(os.environ.get("OUT", os.path.join(
      os.path.dirname(__file__), "results")), f"train_loop_vs_step_{kind.replace(' ', '_').lower()}.json")
  os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)

  def save():
    ph = out["phases"]
    base = ph.get("step_synthetic", {}).get("tokens_per_s")
    for key, r in ph.items():
      if base and r.get("tokens_per_s"):
        r["vs_step_synthetic"] = r["tokens_per_s"] / base
    if base and ph.get("loop", {}).get("tokens_per_s"):
      out["goal_loop_within_3pct"] = ph["loop"]["vs_step_synthetic"] >= 0.97
    with open(name, "w") as f:
      json.dump(out, f, indent=2)

  # the loop's windows end at multiples of --window: steps 2..window are the warm-up window
  loop_steps = args.window * (args.windows + 1)
  for ph in [p for p in args.phases.split(",") if p]:
    t0 = time.perf_counter()
    try:
      if ph == "step_synthetic":
        r = step_phase(sets, args.preset, synthetic_batches, args.windows, args.window)
      elif ph == "step_real":
        r = step_phase(sets, args.preset, real_batches, args.windows, args.window)
      elif ph in ("loop", "loop_prefetch0"):
        prefetch = 0 if ph == "loop_prefetch0" else resolve(args.preset, sets).train.prefetch
        r = loop_phase(sets, args.preset, loop_steps, prefetch,
                       log=lambda s: print(s, flush=True))
      else:
        raise ValueError(f"unknown phase {ph!r}")
      r["ok"] = True
    except Exception as e:  # noqa: BLE001 - record the failure, go on with the next phase
      r = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}
    r["phase_wall_s"] = time.perf_counter() - t0
    r["peak_bytes_in_use_after"] = peak_bytes()
    out["phases"][ph] = r
    save()
    tps = r.get("tokens_per_s")
    print(f"{ph}: " + (f"{tps:.0f} tok/s over {r['timed_steps']} steps "
                       f"(first step {r['first_step_s']:.1f}s)" if tps else
                       r.get("error", "no rate")), flush=True)
  save()
  ph = out["phases"]
  if "vs_step_synthetic" in ph.get("loop", {}):
    print(f"loop / bare synthetic step = {ph['loop']['vs_step_synthetic']:.4f} "
          f"(goal >= 0.97)", flush=True)
  print("wrote", name)


if __name__ == "__main__":
  main()
