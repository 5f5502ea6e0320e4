"""Training throughput (tokens/s, MFU) of the full sharded train step (ATMA_SPEC §6.8).

Times the real jitted `train_step` (forward + backward over N micro-batches with `lax.scan`,
global-norm clip, Muon + AdamW) on synthetic random tokens, and the optimizer update alone, then
extrapolates to the reference step (256 x 2048 tokens = 16 micro-batches of 16):

    t_micro = (t_step - t_opt) / N        tok/s(ref) = 256 * 2048 / (16 * t_micro + t_opt)

Variants (micro-batch, remat, kernel impl) are tried in order; an out-of-memory or failing
variant is recorded and skipped. Writes bench/results/train_<device>.json.

    python bench/train_throughput.py [--preset atma_378m] [--micro 16,8] [--n-micro 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from atma_jax.config import resolve  # noqa: E402
from atma_jax.train.mesh import batch_sharding, make_mesh  # noqa: E402
from atma_jax.train.metrics import flops_per_token, peak_flops  # noqa: E402
from atma_jax.train.state import init_state, setup_state  # noqa: E402
from atma_jax.train.step import make_train_step  # noqa: E402


def _median_time(fn, reps):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def bench_variant(preset, micro, n_micro, remat, impl, seq_len, reps, ref_global=256,
                  ref_micro=16):
  sets = [f"train.seq_len={seq_len}", f"train.micro_batch={micro}",
          f"train.global_batch={micro * n_micro}", f"model.remat={str(remat).lower()}",
          f"model.kernel_impl={impl}", "train.steps=1000", "mesh.data=-1"]
  cfg = resolve(preset, sets)
  mesh = make_mesh(cfg.mesh)
  t0 = time.perf_counter()
  setup = setup_state(cfg, mesh)
  state = init_state(cfg, setup)
  jax.block_until_ready(state)
  t_init = time.perf_counter() - t0
  step = make_train_step(cfg, setup, mesh)
  B, T, V = cfg.train.global_batch, seq_len, cfg.model.vocab_size
  rng = np.random.default_rng(0)
  toks = rng.integers(0, min(V, 50257), size=(B, T + 1)).astype(np.int32)
  bsh = batch_sharding(mesh)
  batch = {"inputs": jax.device_put(toks[:, :-1], bsh), "targets": jax.device_put(toks[:, 1:], bsh)}
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t_compile = time.perf_counter() - t0
  losses = [float(m["loss"])]

  holder = {"state": state}

  def one():
    holder["state"], mm = step(holder["state"], batch)
    return mm

  t_step, all_steps = _median_time(one, reps)
  losses.append(float(one()["loss"]))

  # the optimizer update alone (clip + Muon + AdamW) on gradient-shaped inputs
  opt = setup.optimizer
  st = holder["state"]
  apply = jax.jit(lambda p, g, s: opt.apply(p, g, s)[:2], donate_argnums=(2,))
  grads = jax.tree.map(lambda p: (jnp.ones_like(p) * 1e-3).astype(p.dtype), st.params)
  os_ = jax.tree.map(jnp.copy, st.opt_state)
  _, os_ = apply(st.params, grads, os_)
  jax.block_until_ready(os_)

  def opt_once():
    nonlocal os_
    out, os_ = apply(st.params, grads, os_)
    return out

  t_opt, _ = _median_time(opt_once, reps)

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract.params))
  fpt = flops_per_token(n_params, cfg.model.num_layers, cfg.model.hidden_size, T)
  peak = peak_flops()
  ndev = jax.device_count()
  tok_step = B * T
  t_micro = max(t_step - t_opt, 1e-9) / n_micro
  ref_tokens = ref_global * T
  t_ref = (ref_global // micro) * t_micro + t_opt
  res = {
      "micro_batch": micro, "n_micro": n_micro, "global_batch": B, "seq_len": T,
      "remat": remat, "kernel_impl": impl, "num_params": n_params,
      "flops_per_token": fpt, "init_s": t_init, "compile_plus_first_step_s": t_compile,
      "step_s_median": t_step, "step_s_all": all_steps, "opt_update_s_median": t_opt,
      "micro_step_s": t_micro, "tokens_per_s_measured": tok_step / t_step,
      "tokens_per_s_forward_backward_only": micro * T / t_micro,
      "ref_step_tokens": ref_tokens, "ref_step_s_extrapolated": t_ref,
      "tokens_per_s_ref_step": ref_tokens / t_ref,
      "losses": losses,
  }
  if peak:
    res["peak_flops_per_device"] = peak
    res["mfu_measured"] = res["tokens_per_s_measured"] * fpt / (peak * ndev)
    res["mfu_ref_step"] = res["tokens_per_s_ref_step"] * fpt / (peak * ndev)
  try:
    stats = jax.devices()[0].memory_stats() or {}
    res["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001 - CPU has no memory stats
    pass
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="atma_378m")
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--micro", default="16,8")
  ap.add_argument("--n-micro", type=int, default=4)
  ap.add_argument("--impls", default="auto,xla")
  ap.add_argument("--remat", default="false,true")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--set", dest="extra", action="append", default=[])
  ap.add_argument("--out", default=None)
  ap.add_argument("--all", action="store_true", help="time every variant (default: stop at "
                  "the first that runs)")
  ap.add_argument("--budget-s", type=float, default=330.0,
                  help="start no new variant after this many seconds (each compiles ~1-2 min)")
  args = ap.parse_args()
  dev = jax.devices()[0]
  out = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
         "num_devices": jax.device_count(), "jax": jax.__version__,
         "python": platform.python_version(), "preset": args.preset, "variants": []}
  print(json.dumps({k: v for k, v in out.items() if k != "variants"}), flush=True)
  done = False
  t_start = time.perf_counter()
  for impl in args.impls.split(","):
    for remat in [s == "true" for s in args.remat.split(",")]:
      for micro in [int(x) for x in args.micro.split(",")]:
        if done or time.perf_counter() - t_start > args.budget_s:
          continue
        tag = f"impl={impl} remat={remat} micro={micro}"
        t0 = time.perf_counter()
        try:
          r = bench_variant(args.preset, micro, args.n_micro, remat, impl, args.seq_len,
                            args.reps)
          r["ok"] = True
          done = not args.all
          print(f"{tag}: {r['tokens_per_s_measured']:.0f} tok/s measured, "
                f"{r['tokens_per_s_ref_step']:.0f} tok/s at the reference step, MFU "
                f"{r.get('mfu_ref_step', float('nan')):.3f}; step {r['step_s_median']:.3f}s "
                f"opt {r['opt_update_s_median']:.3f}s compile {r['compile_plus_first_step_s']:.1f}s",
                flush=True)
        except Exception as e:  # noqa: BLE001 - record OOM / kernel failures and go on
          r = {"ok": False, "micro_batch": micro, "remat": remat, "kernel_impl": impl,
               "error": f"{type(e).__name__}: {str(e)[:600]}"}
          print(f"{tag}: FAILED {r['error'][:300]}", flush=True)
          traceback.print_exc(limit=3)
        r["wall_s"] = time.perf_counter() - t0
        out["variants"].append(r)
        jax.clear_caches()
  name = args.out or os.path.join(
      os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")),
      f"train_{out['device'].replace(' ', '_').lower()}.json")
  with open(name, "w") as f:
    json.dump(out, f, indent=2)
  print("wrote", name)


if __name__ == "__main__":
  main()
