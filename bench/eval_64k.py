"""Benchmark: evaluation forward + token NLL of the canonical ATMA at 8K ... 64K context.

  python3 bench/eval_64k.py --out bench/results/eval_64k_h100.json
  python3 bench/eval_64k.py --smoke          # CPU check: tiny model, short lengths

Model: `configs/atma_378m` (378M parameters, Polar + memory, bf16 activations, fp32 params),
RANDOM initialization (the `reference` init scheme, seed 0, then small uniform noise on every
parameter so the zero-initialized head and projections are alive): speed and memory do not
depend on the weights. Path: `atma_jax.eval.forward.Forward` exactly as `eval.py` runs it
(window removed, batch 1, one full forward, time-chunked LM head + NLL, `kernel_impl=auto`:
Pallas Polar and gated-delta kernels on a GPU). Input: random token ids.

Per length: compile time, wall-clock of forward+NLL (median of `--reps` after one warm-up,
synchronized by the host copy of the NLL), device peak memory
(`memory_stats()["peak_bytes_in_use"]` is a running peak since process start: lengths run in
increasing order, so it is that length's peak when it rose, else an upper bound) and XLA's
compiled memory plan of the call (temp + arguments + outputs). At the longest length: the
retrieval path (`logits_at`, 5 positions after length + 4 tokens) and, when the kernel api has
`polar_stats`, the probe.
Correctness: the NLL is finite and near ln(V) for a random model, and at the shortest length
the `auto` (Pallas) path matches the pure-XLA path (max |dNLL|). JSON is rewritten after every
step, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from atma_jax.config import resolve  # noqa: E402
from atma_jax.eval.forward import Forward  # noqa: E402
from atma_jax.eval.testing import noisy  # noqa: E402
from atma_jax.model import Atma  # noqa: E402

LENGTHS = (8192, 16384, 32768, 65536)


def init_params(cfg, seed=0):
  """Reference init + noise in one program: one parameter copy, so the init does not set the
  device's peak memory above what the forwards need."""
  @jax.jit
  def make():
    params = nnx.split(Atma(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1]
    return noisy(params, jax.random.PRNGKey(1), 0.1)
  return make()


def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def in_use_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_in_use")


def timed(fn, reps):
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, first, statistics.median(times), times


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=None)
  ap.add_argument("--reps", type=int, default=2)
  ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
  ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script)")
  ap.add_argument("--skip-check", action="store_true", help="no Pallas-vs-XLA NLL comparison")
  ap.add_argument("--skip-extras", action="store_true", help="no retrieval-logits / probe timing")
  args = ap.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  if args.smoke:
    cfg = resolve("tiny").model
    lengths = [256, 512]
  else:
    cfg = resolve("atma_378m").model
  params = init_params(cfg)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  base = in_use_bytes()
  fwd = Forward(cfg, params, tokens_per_call=1, logits_chunk=8192)
  rng = np.random.default_rng(0)  # random token ids: the NLL is ~ln(V) for a random model
  tokens = rng.integers(0, 50257, size=max(lengths) + 8).astype(np.int32)
  rows = []
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {n_params:,} params, "
        f"params in use {base}", flush=True)
  check, retrieval, probe_row = {}, {}, {}
  t_start = time.perf_counter()

  def result():
    return {"bench": "eval_64k", "device": jax.devices()[0].device_kind,
            "platform": jax.default_backend(), "jax": jax.__version__,
            "model": "atma_378m" if not args.smoke else "tiny",
            "init": "random (reference init, seed 0, + U(+-0.1/sqrt(fan_in)) noise)",
            "peak_note": "peak_bytes_in_use is the running device peak since process start "
                         "(includes parameter init); compiled_memory is per call",
            "params": n_params, "compute_dtype": cfg.compute_dtype, "batch": 1,
            "kernel_impl": cfg.kernel_impl, "logits_chunk": 8192, "reps": args.reps,
            "params_bytes_in_use": base, "ln_vocab": math.log(cfg.vocab_size),
            "rows": rows, "check": check, "retrieval_logits": retrieval, "probe": probe_row,
            "elapsed_s": round(time.perf_counter() - t_start, 1)}

  def save():
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(result(), f, indent=2)

  for L in sorted(lengths):
    seq = tokens[:L + 1][None]
    before = in_use_bytes()
    nll, first, med, times = timed(lambda: fwd.token_nll(seq), args.reps)
    peak = peak_bytes()
    row = {"length": L, "mean_nll": float(nll.mean()), "finite": bool(np.isfinite(nll).all()),
           "compile_plus_first_run_s": round(first, 3), "median_s": round(med, 4),
           "times_s": [round(t, 4) for t in times], "tokens_per_s": round(L / med, 1),
           "bytes_in_use_before": before, "peak_bytes_in_use": peak,
           "peak_gib": None if peak is None else round(peak / 2**30, 3),
           "compiled_memory": fwd.nll_memory(1, L)}
    plan = row["compiled_memory"]
    row["compiled_total_gib"] = round(sum(plan.get(k, 0) for k in (
        "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")) / 2**30, 3)
    rows.append(row)
    print(f"L={L:>6}  nll {row['mean_nll']:.4f}  fwd+nll {med * 1e3:8.1f} ms  "
          f"({row['tokens_per_s']:>9,.0f} tok/s)  compile+run {first:6.1f} s  "
          f"peak {row['peak_gib']} GiB  compiled plan {row['compiled_total_gib']} GiB "
          f"(temp {plan.get('temp_size_in_bytes', 0) / 2**30:.3f})", flush=True)
    save()
    if L == min(lengths) and not args.skip_check:  # Pallas (auto) vs pure XLA, same weights
      xla = Forward(dataclasses.replace(cfg, kernel_impl="xla"), params, tokens_per_call=1)
      nll_x = xla.token_nll(seq)
      check.update({"length": L, "max_abs_dnll_auto_vs_xla": float(np.abs(nll - nll_x).max()),
                    "mean_nll_xla": float(nll_x.mean())})
      print(f"check at L={L}: max |NLL(auto) - NLL(xla)| = "
            f"{check['max_abs_dnll_auto_vs_xla']:.3e}", flush=True)
      del xla
      save()
  if args.skip_extras:
    save()
    return finish(args, rows, check)
  L = max(lengths)  # the retrieval path: 5 scored positions after L + 4 tokens
  inp = [list(tokens[:L + 4])]
  _, lfirst, lmed, _ = timed(lambda: fwd.logits_at(inp, [L - 1], 5), args.reps)
  retrieval.update({"length": L, "compile_plus_first_run_s": round(lfirst, 3),
                    "median_s": round(lmed, 4), "peak_bytes_in_use": peak_bytes()})
  print(f"retrieval logits at L={L}: {lmed * 1e3:.1f} ms (compile+run {lfirst:.1f} s)", flush=True)
  save()
  try:
    from atma_jax.eval import probe
    run = probe.probe_fn(fwd)
  except RuntimeError as e:
    print(f"probe skipped: {e}", flush=True)
  else:
    ids = jax.numpy.asarray(tokens[None, :L])
    t0 = time.perf_counter()
    stats, _ = run(fwd.params, ids)
    stats = jax.tree.map(lambda a: float(np.asarray(a).mean()), stats)
    probe_row.update({"length": L, "compile_plus_run_s": round(time.perf_counter() - t0, 2),
                      "stats": stats, "peak_bytes_in_use": peak_bytes()})
    print(f"probe at L={L}: {stats}", flush=True)
  save()
  return finish(args, rows, check)


def finish(args, rows, check) -> int:
  if args.out:
    print(f"wrote {args.out}")
  ok = all(r["finite"] for r in rows) and (not check or check["max_abs_dnll_auto_vs_xla"] < 0.05)
  print("OK" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
