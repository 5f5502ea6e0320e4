"""Training throughput (tokens/s, MFU) of the full sharded train step, 1 -> N devices (issue #3).

Times the real jitted `train_step` (forward + backward over `--n-micro` micro-batches with
`lax.scan`, global-norm clip, Muon + AdamW) on synthetic random tokens, and the optimizer update
alone, then extrapolates to the reference step (256 x 2048 tokens):

    t_micro = (t_step - t_opt) / n_micro      tok/s(ref) = 256 * T / (256 / M * t_micro + t_opt)

Data parallel: `--devices 1,2` runs every variant on the first 1 and the first 2 devices (mesh
data = N) with a FIXED per-device micro-batch (`--micro` sequences per device per micro-step), so
the global batch grows with N; scaling efficiency = tok/s(N) / (N * tok/s(1)).

MFU by two counts (flops/token of ATMA_SPEC §6.8): `mfu_vs_spec_table` divides by the spec's
datasheet peak (H100/H200: 989 TFLOP/s), `mfu_vs_measured_peak` by this device's own bf16 matmul
peak measured here (8192^3, bf16 operands, fp32 accumulation, bf16 output as torch's `a @ b`;
the issue's count: the PyTorch trainer's 24.7% is 66.3K tok/s against a measured 718 TFLOP/s).

Variants (micro-batch, remat policy, kernel impl) are tried in order; a failing one (OOM, kernel) is
recorded and the next is tried; by default the first variant that runs on every N ends the run
(`--all` times all). No new run starts after `--budget-s`. The JSON is rewritten after every run.

Every variant is compiled ahead of time (`lower` then `compile`, timed apart: `lower_s`,
`compile_s`; `compile_cache.verdict` says whether the step was loaded from JAX's persistent
compilation cache, on by default as in train.py: `--compile-cache off` for cold compile times)
and its executable's `memory_analysis` recorded (arguments + temporaries + outputs -
aliased = the step's static peak). `--scan false,true` times each variant with
`model.scan_layers` off and on (the blocks unrolled vs the repeating group under `lax.scan`);
Compile-only runs also compile the optimizer update alone (`optimizer_update`: CPU seconds,
static memory, collective counts and all-gathered bytes); timed runs record its first call
(`opt_update_first_call_s`: compile + one run). `--fresh-process` runs each scan setting in its own process, so compile caches and the device's
running peak (`peak_bytes_in_use`) of one do not leak into the other, and `scan_vs_unrolled`
pairs them (compile time, tok/s, memory):

    python3 bench/train_throughput.py --devices 1,2 --out $OUT/train_dp.json

Remat policies (`model.remat`, atma_jax/model/remat.py): `--remat block,dots,none --all` times
each; its `memory_analysis` is the step's own static peak, while the device's running
`peak_bytes_in_use` is the process's maximum so far (list the policies from least to most memory
so that each reading is its own). `--fit-micro M` also compiles each variant at micro-batch M
(no run) and fits the static peak linearly in the micro-batch: `fit.micro_within_budget` is the
largest micro-batch whose fitted peak is <= `--budget-gib` (default: the original trainer's 33.1):

    python3 bench/train_throughput.py --micro 16 --impls auto --remat dots_no_mlp_fc,dots,none \\
      --all --n-micro 4 --reps 3 --peak-n 0 --out $OUT/train_remat.json
    python3 bench/train_throughput.py --devices 1 --micro 16 --impls auto --remat false \\
      --n-micro 4 --reps 3 --peak-n 0 --scan false,true --fresh-process \\
      --out $OUT/train_scan_layers.json                               # scan on vs off
    for mb in false true; do python3 bench/train_throughput.py --devices 1 --micro 16 \
      --impls auto --remat false --n-micro 2 --reps 2 --peak-n 0 --set optim.muon_batch=$mb \
      --out $OUT/train_muon_batch_$mb.json; done          # batched Newton-Schulz off vs on
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
      python3 bench/train_throughput.py --smoke --devices 1,2      # CPU check (tiny preset)
    JAX_PLATFORMS=cpu python3 bench/train_throughput.py --smoke --scan false,true --fresh-process
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from atma_jax import compile_cache  # noqa: E402
from atma_jax.config import REMAT_ALIASES, REMAT_POLICIES, ConfigError, resolve  # noqa: E402
from atma_jax.sharding import use_mesh  # noqa: E402
from atma_jax.summary import count_params  # noqa: E402
from atma_jax.train.mesh import batch_sharding, make_mesh  # noqa: E402
from atma_jax.train.metrics import (flops_per_token, measure_matmul_peak, mfu,  # noqa: E402
                                    peak_flops)
from atma_jax.train.state import init_state, setup_state  # noqa: E402
from atma_jax.train.step import make_train_step  # noqa: E402

REFERENCE = {"tokens_per_s": 66.3e3, "matmul_peak_flops": 718e12, "mfu": 0.247,
             "what": "PyTorch trainer, atma_378m at 2K on one H100 (issue #3)"}
# tiny preset, 5 blocks of period 2: two scanned groups and one unrolled block with scan on
SMOKE_SETS = ["model.num_layers=5", "model.global_every=2", "model.global_offset=1",
              "model.hidden_size=64", "model.head_dim=16"]


def remat_policies(text: str) -> list[str]:
  """`--remat` "a,b" -> policy names (true / false -> block / none); ConfigError for a bad one."""
  names = [REMAT_ALIASES.get(s.strip().lower(), s.strip().lower()) for s in text.split(",")
           if s.strip()]
  bad = [n for n in names if n not in REMAT_POLICIES]
  if bad or not names:
    raise ConfigError(f"--remat {text!r}: {', '.join(bad) or 'nothing given'} is not a remat "
                      f"policy; choose from {', '.join(REMAT_POLICIES)} (true = block, "
                      "false = none).")
  return names


def micro_within_budget(points: dict, budget_bytes: float) -> int | None:
  """Largest micro-batch whose peak, linear through the two {micro: bytes} points, fits."""
  (m1, p1), (m2, p2) = sorted(points.items())
  slope = (p2 - p1) / (m2 - m1)
  if slope <= 0:
    return None
  return int((budget_bytes - (p1 - slope * m1)) // slope)


def variant_sets(micro_per_device, n_devices, n_micro, remat, impl, seq_len, scan=False):
  """Config overrides of one variant: micro-batch `micro_per_device * n_devices` (global)."""
  micro = micro_per_device * n_devices
  return [f"train.seq_len={seq_len}", f"train.micro_batch={micro}",
          f"train.global_batch={micro * n_micro}", f"model.remat={str(remat).lower()}",
          f"model.kernel_impl={impl}", f"model.scan_layers={str(scan).lower()}",
          "train.steps=1000", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"]


def first_devices(n):
  devs = jax.devices()
  if not 0 < n <= len(devs):
    raise ValueError(f"--devices asks for {n} devices but {len(devs)} are visible; pass counts "
                     f"between 1 and {len(devs)} (on CPU: XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n}).")
  return devs[:n]


def build(preset, sets, n_devices, seed=0):
  """(cfg, mesh, setup, state, step, batch) of the train step on the first `n_devices`."""
  cfg = resolve(preset, sets)
  mesh = make_mesh(cfg.mesh, devices=first_devices(n_devices))
  setup = setup_state(cfg, mesh)
  state = init_state(cfg, setup)
  step = make_train_step(cfg, setup, mesh)
  B, T, V = cfg.train.global_batch, cfg.train.seq_len, cfg.model.vocab_size
  toks = np.random.default_rng(seed).integers(0, min(V, 50257), size=(B, T + 1)).astype(np.int32)
  bsh = batch_sharding(mesh)
  batch = {"inputs": jax.device_put(toks[:, :-1], bsh),
           "targets": jax.device_put(toks[:, 1:], bsh)}
  return cfg, mesh, setup, state, step, batch


def _median_time(fn, reps):
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def memory_summary(compiled) -> dict:
  """The executable's static memory (`memory_analysis`, bytes); {} where the backend has none."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - optional on some backends
    return {}
  if ma is None:
    return {}
  out = {k: getattr(ma, k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                     "alias_size_in_bytes", "temp_size_in_bytes")
         if isinstance(getattr(ma, k, None), int)}
  if len(out) == 4:
    out["static_peak_bytes"] = (out["argument_size_in_bytes"] + out["temp_size_in_bytes"]
                                + out["output_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def compile_step(step, mesh, state, batch, times: dict):
  """The train step compiled ahead of time; `times` gets lower_s / compile_s (wall) and
  lower_cpu_s / compile_cpu_s (this process's CPU time, all threads: steadier on a shared host)."""
  t0, c0 = time.perf_counter(), time.process_time()
  with use_mesh(mesh):
    lowered = step.jitted.lower(state, batch)
  t1, c1 = time.perf_counter(), time.process_time()
  log = compile_cache.CompileLog.get()
  mark = log.mark()
  compiled = lowered.compile()
  times.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1, lower_cpu_s=c1 - c0,
               compile_cpu_s=time.process_time() - c1,
               compile_cache=compile_cache.summarize(log.since(mark)))
  return compiled


def compile_only_variant(preset, micro_per_device, n_devices, n_micro, remat, impl, seq_len,
                         extra=(), scan=False, optimizer_only=False):
  """Lower + compile of the train step on abstract inputs (nothing allocated, nothing run), then
  of the optimizer update alone; `optimizer_only` skips the train step."""
  from atma_jax.train.state import setup_state
  from atma_jax.train.step import make_train_step
  sets = (variant_sets(micro_per_device, n_devices, n_micro, remat, impl, seq_len, scan)
          + list(extra))
  cfg = resolve(preset, sets)
  mesh = make_mesh(cfg.mesh, devices=first_devices(n_devices))
  setup = setup_state(cfg, mesh)
  step = make_train_step(cfg, setup, mesh)
  B, T = cfg.train.global_batch, cfg.train.seq_len
  bsh = batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=bsh)
           for k in ("inputs", "targets")}
  times = {k: None for k in ("lower_s", "compile_s", "lower_cpu_s", "compile_cpu_s",
                             "compile_cache")}
  compiled = None if optimizer_only else compile_step(step, mesh, setup.abstract, batch, times)
  res = {"devices": n_devices, "micro_batch_per_device": micro_per_device,
         "micro_batch": cfg.train.micro_batch, "n_micro": n_micro, "global_batch": B,
         "seq_len": T, "remat": remat, "kernel_impl": impl, "scan_layers": scan,
         "muon_batch": cfg.optim.muon_batch,
         "muon_batch_split": cfg.optim.muon_batch_split, "overrides": sets, **times,
         "lower_plus_compile_s": None if optimizer_only else times["lower_s"] + times["compile_s"],
         "memory_analysis": {} if optimizer_only else memory_summary(compiled)}
  del compiled
  res["optimizer_update"] = compile_optimizer_update(setup, mesh)
  return res


def gathered_bytes(hlo_text: str) -> int:
  """Total bytes of the all-gather outputs in a compiled HLO module's text."""
  size = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1}
  total = 0
  for dt, dims in re.findall(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(", hlo_text):
    total += size.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
  return total


def compile_optimizer_update(setup, mesh) -> dict:
  """Lower + compile of the optimizer update alone (clip + Muon + AdamW) on abstract params,
  gradients and state in their shardings, after the train step (its own program): wall and CPU
  seconds, static memory and the all-gather / all-reduce counts of the compiled HLO."""
  opt, st = setup.optimizer, setup.abstract
  apply = jax.jit(lambda p, g, s: opt.apply(p, g, s)[:2], donate_argnums=(2,))
  t0, c0 = time.perf_counter(), time.process_time()
  with use_mesh(mesh):
    lowered = apply.lower(st.params, st.params, st.opt_state)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  res = {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1, "lower_cpu_s": c1 - c0,
         "compile_cpu_s": time.process_time() - c1, "memory_analysis": memory_summary(compiled)}
  try:
    hlo = compiled.as_text()
    res["hlo_ops"] = {op: hlo.count(f" {op}(") for op in ("all-gather", "all-reduce",
                                                           "reduce-scatter", "all-to-all")}
    res["all_gather_output_bytes"] = gathered_bytes(hlo)
  except Exception:  # noqa: BLE001 - optional text dump
    pass
  return res


def bench_variant(preset, micro_per_device, n_devices, n_micro, remat, impl, seq_len, reps,
                  extra=(), ref_global=256, scan=False):
  sets = (variant_sets(micro_per_device, n_devices, n_micro, remat, impl, seq_len, scan)
          + list(extra))
  t0 = time.perf_counter()
  cfg, mesh, setup, state, step, batch = build(preset, sets, n_devices)
  jax.block_until_ready(state)
  t_init = time.perf_counter() - t0
  B, M, T = cfg.train.global_batch, cfg.train.micro_batch, cfg.train.seq_len
  times = {}
  step = compile_step(step, mesh, state, batch, times)
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t_first = time.perf_counter() - t0
  t_compile = times["lower_s"] + times["compile_s"] + t_first
  losses = [float(m["loss"])]
  holder = {"state": state}

  def one():
    holder["state"], mm = step(holder["state"], batch)
    return mm

  t_step, all_steps = _median_time(one, reps)
  losses.append(float(one()["loss"]))

  # the optimizer update alone (clip + Muon + AdamW) on gradient-shaped inputs
  opt, st = setup.optimizer, holder["state"]
  apply = jax.jit(lambda p, g, s: opt.apply(p, g, s)[:2], donate_argnums=(2,))
  grads = jax.tree.map(lambda p: (jnp.ones_like(p) * 1e-3).astype(p.dtype), st.params)
  opt_state = {"s": jax.tree.map(jnp.copy, st.opt_state)}

  def opt_once():
    out, opt_state["s"] = apply(st.params, grads, opt_state["s"])
    return out

  t0 = time.perf_counter()
  jax.block_until_ready(opt_once())
  t_opt_first = time.perf_counter() - t0  # its compile (a program of its own) + one run
  t_opt, _ = _median_time(opt_once, reps)

  n_par = count_params(cfg.model)
  fpt = flops_per_token(n_par, cfg.model.num_layers, cfg.model.hidden_size, T)
  t_micro = max(t_step - t_opt, 1e-9) / n_micro
  ref_tokens = ref_global * T
  t_ref = (ref_global / M) * t_micro + t_opt
  res = {
      "devices": n_devices, "micro_batch_per_device": micro_per_device, "micro_batch": M,
      "n_micro": n_micro, "global_batch": B, "seq_len": T, "remat": remat, "kernel_impl": impl,
      "scan_layers": scan, "muon_batch": cfg.optim.muon_batch, "overrides": sets, "num_params": n_par, "flops_per_token": fpt,
      "init_s": t_init, **times, "first_step_s": t_first,
      "compile_plus_first_step_s": t_compile, "memory_analysis": memory_summary(step),
      "step_s_median": t_step, "step_s_all": all_steps,
      "opt_update_s_median": t_opt, "opt_update_first_call_s": t_opt_first,
      "micro_step_s": t_micro,
      "tokens_per_s_measured": B * T / t_step,
      "tokens_per_s_forward_backward_only": M * T / t_micro,
      "ref_step_tokens": ref_tokens, "ref_step_s_extrapolated": t_ref,
      "tokens_per_s_ref_step": ref_tokens / t_ref, "losses": losses,
  }
  try:
    res["peak_bytes_in_use"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001 - CPU has no memory stats
    pass
  return res


def fit_micro(res, preset, micro_per_device, n_micro, extra, budget_gib):
  """Compiles (no run) the variant `res` at `micro_per_device` too; adds to `res` the two static
  peaks and the largest micro-batch whose linear fit stays within `budget_gib`."""
  other = compile_only_variant(preset, micro_per_device, res["devices"], n_micro, res["remat"],
                               res["kernel_impl"], res["seq_len"], extra,
                               scan=res.get("scan_layers", False))
  points = {res["micro_batch_per_device"]: res["memory_analysis"].get("static_peak_bytes"),
            micro_per_device: other["memory_analysis"].get("static_peak_bytes")}
  fits = None if None in points.values() else micro_within_budget(points, budget_gib * 2 ** 30)
  res["fit"] = {"static_peak_bytes_by_micro": points, "budget_gib": budget_gib,
                "micro_within_budget": fits, "compile_s": other["compile_s"]}


def add_mfu(res, spec_peak, measured_peak):
  """MFU of the measured and the reference-step throughput by both peak counts."""
  fpt, n = res["flops_per_token"], res["devices"]
  for key, peak in (("spec_table", spec_peak), ("measured_peak", measured_peak)):
    if peak:
      res[f"peak_flops_{key}"] = peak
      res[f"mfu_vs_{key}"] = mfu(res["tokens_per_s_measured"], fpt, n, peak)
      res[f"mfu_ref_step_vs_{key}"] = mfu(res["tokens_per_s_ref_step"], fpt, n, peak)


def _key(r):
  return r["kernel_impl"], r["remat"], r["micro_batch_per_device"], r.get("scan_layers", False)


def scaling(variants):
  """Per variant (impl, remat, micro per device, scan): tok/s(N) / (N * tok/s(1)), N > 1."""
  ok = [r for r in variants if r.get("ok") and "tokens_per_s_measured" in r]
  out = []
  for base in (r for r in ok if r["devices"] == 1):
    key = _key(base)
    for r in ok:
      if r["devices"] > 1 and _key(r) == key:
        n = r["devices"]
        out.append({
            "kernel_impl": key[0], "remat": key[1], "micro_batch_per_device": key[2],
            "scan_layers": key[3], "devices": n, "tokens_per_s_1": base["tokens_per_s_measured"],
            "tokens_per_s_n": r["tokens_per_s_measured"],
            "efficiency": r["tokens_per_s_measured"] / (n * base["tokens_per_s_measured"]),
            "efficiency_ref_step": r["tokens_per_s_ref_step"] / (
                n * base["tokens_per_s_ref_step"]),
            "step_s_1": base["step_s_median"], "step_s_n": r["step_s_median"],
            "opt_update_s_1": base["opt_update_s_median"],
            "opt_update_s_n": r["opt_update_s_median"]})
  return out


def scan_vs_unrolled(variants):
  """Pairs of the same variant with model.scan_layers on and off: compile, tok/s, memory."""
  ok = [r for r in variants if r.get("ok")]
  out = []
  for off in (r for r in ok if not r.get("scan_layers")):
    for on in (r for r in ok if r.get("scan_layers") and r["devices"] == off["devices"]
               and _key(r)[:3] == _key(off)[:3]):
      pair = {"devices": off["devices"], "kernel_impl": off["kernel_impl"],
              "remat": off["remat"], "micro_batch_per_device": off["micro_batch_per_device"]}
      for name in ("compile_s", "lower_s", "compile_cpu_s", "lower_cpu_s",
                   "compile_plus_first_step_s", "step_s_median",
                   "tokens_per_s_measured", "peak_bytes_in_use"):
        pair[f"{name}_unrolled"], pair[f"{name}_scan"] = off.get(name), on.get(name)
      pair["static_peak_bytes_unrolled"] = off["memory_analysis"].get("static_peak_bytes")
      pair["static_peak_bytes_scan"] = on["memory_analysis"].get("static_peak_bytes")
      if "tokens_per_s_measured" in on and "tokens_per_s_measured" in off:  # not compile-only
        pair["tokens_per_s_scan_over_unrolled"] = (on["tokens_per_s_measured"]
                                                   / off["tokens_per_s_measured"])
      out.append(pair)
  return out


def run_fresh_processes(args, scans, name):
  """Each `--scan` value in a child process of this script; their variants into one JSON."""
  child, skip = [], False
  for a in sys.argv[1:]:
    if skip:
      skip = False
    elif a in ("--scan", "--out"):
      skip = True
    elif a != "--fresh-process" and not a.startswith(("--scan=", "--out=")):
      child.append(a)
  merged = None
  with tempfile.TemporaryDirectory() as tmp:
    for scan in scans:
      part = os.path.join(tmp, f"scan_{scan}.json")
      cmd = [sys.executable, os.path.abspath(__file__), *child, "--scan", scan, "--out", part]
      print("$", " ".join(cmd), flush=True)
      rc = subprocess.run(cmd).returncode
      if not os.path.exists(part):
        raise SystemExit(f"the child for --scan {scan} wrote no JSON (exit {rc})")
      with open(part) as f:
        res = json.load(f)
      if merged is None:
        merged = res
      else:
        merged["variants"] += res["variants"]
      merged.setdefault("child_exit_codes", {})[scan] = rc
  merged["scaling"] = scaling(merged["variants"])
  merged["scan_vs_unrolled"] = scan_vs_unrolled(merged["variants"])
  merged["note"] += "; each --scan value ran in its own process (--fresh-process)"
  with open(name, "w") as f:
    json.dump(merged, f, indent=2)
  for p in merged["scan_vs_unrolled"]:
    print_pair(p)
  print("wrote", name)


def print_pair(p):
  def num(x, scale=1.0):
    return float("nan") if x is None else x / scale

  print(f"scan_layers off -> on (devices={p['devices']} impl={p['kernel_impl']} remat="
        f"{p['remat']} micro/device={p['micro_batch_per_device']}): lower "
        f"{num(p['lower_s_unrolled']):.1f} -> {num(p['lower_s_scan']):.1f} s, compile "
        f"{num(p['compile_s_unrolled']):.1f} -> {num(p['compile_s_scan']):.1f} s (CPU time "
        f"{num(p['compile_cpu_s_unrolled']):.1f} -> {num(p['compile_cpu_s_scan']):.1f} s), tok/s "
        f"{num(p['tokens_per_s_measured_unrolled']):.0f} -> "
        f"{num(p['tokens_per_s_measured_scan']):.0f}, static peak "
        f"{num(p['static_peak_bytes_unrolled'], 2**20):.0f} -> "
        f"{num(p['static_peak_bytes_scan'], 2**20):.0f} MiB", flush=True)


def memory_line(r) -> str:
  """Static peak, the device's running peak and the budget fit of a variant, in GiB."""
  gib = lambda b: "n/a" if b is None else f"{b / 2 ** 30:.2f} GiB"  # noqa: E731
  text = (f"static peak {gib(r['memory_analysis'].get('static_peak_bytes'))}, device peak so "
          f"far {gib(r.get('peak_bytes_in_use'))}")
  if "fit" in r:
    text += f"; within {r['fit']['budget_gib']} GiB up to micro {r['fit']['micro_within_budget']}"
  return text


def measure_peaks(n, out):
  """bf16-output (the MFU peak) and fp32-output matmul peaks of device 0, into `out`."""
  for name, dt in (("bf16_out", jnp.bfloat16), ("f32_out", jnp.float32)):
    try:
      r = measure_matmul_peak(n, out_dtype=dt)
      out["matmul_peak"][name] = r
      print(f"matmul peak {n}^3 bf16 x bf16 -> {r['output']} (fp32 accumulate): "
            f"{r['flops_per_s'] / 1e12:.1f} TFLOP/s (median of {r['reps']} calls of "
            f"{r['chain']} products, {r['call_s_median'] * 1e3:.2f} ms)", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed peak leaves MFU by the table only
      out["matmul_peak"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(f"matmul peak ({name}) FAILED: {e}", flush=True)
  return out["matmul_peak"].get("bf16_out", {}).get("flops_per_s")


def _ints(s):
  return [int(x) for x in s.split(",") if x]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="atma_378m")
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--micro", default="16,8", help="micro-batch PER DEVICE, tried in order")
  ap.add_argument("--n-micro", type=int, default=4, help="micro-steps per timed train step")
  ap.add_argument("--devices", default="1", help="device counts to run, e.g. 1,2 (first N)")
  ap.add_argument("--impls", default="auto,xla")
  ap.add_argument("--remat", default="none,block",
                  help=f"remat policies, tried in order: {', '.join(REMAT_POLICIES)} "
                       "(true = block, false = none)")
  ap.add_argument("--scan", default="false", help="model.scan_layers values, e.g. false,true")
  ap.add_argument("--compile-only", action="store_true",
                  help="only lower + compile each variant on abstract inputs (compile-time proxy "
                  "on CPU: no parameters allocated, no step run)")
  ap.add_argument("--optimizer-only", action="store_true",
                  help="with --compile-only: compile only the optimizer update, not the step")
  ap.add_argument("--fresh-process", action="store_true",
                  help="run each --scan value in its own process (clean compile and peak memory)")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--peak-n", type=int, default=8192, help="matmul size of the peak (0: skip)")
  ap.add_argument("--set", dest="extra", action="append", default=[])
  ap.add_argument("--fit-micro", type=int, default=0,
                  help="also compile each variant at this micro-batch per device (no run) and "
                       "fit its static peak linearly in the micro-batch (0: off)")
  ap.add_argument("--budget-gib", type=float, default=33.1,
                  help="memory budget of fit.micro_within_budget (the original trainer's peak)")
  ap.add_argument("--out", default=None)
  ap.add_argument("--compile-cache", "--cache-dir", dest="compile_cache", default="auto",
                  metavar="DIR|off|auto",
                  help="JAX's persistent compilation cache (default auto: $ATMA_COMPILE_CACHE or "
                  "~/.cache/atma_jax/jax_cache); each variant records whether its step was "
                  "loaded from it (compile_cache.verdict); off for cold compile times")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU check: tiny preset, 2 layers of 64, seq 64, micro 2, peak 256")
  ap.add_argument("--all", action="store_true",
                  help="time every variant (default: stop at the first that runs on every N)")
  ap.add_argument("--budget-s", type=float, default=330.0,
                  help="start no new run after this many seconds (each compiles ~100 s on GPU)")
  args = ap.parse_args()
  compile_cache.configure(args.compile_cache, "--compile-cache",
                          log=lambda line: print(line, flush=True))
  if args.smoke:
    args.preset, args.seq_len, args.micro, args.n_micro = "tiny", 64, "2", 2
    args.impls, args.peak_n, args.reps = "auto", 256, 2
    args.extra = SMOKE_SETS + args.extra
  policies = remat_policies(args.remat)  # a clear error before any compute
  scans = args.scan.split(",")
  if any(s not in ("false", "true") for s in scans):
    raise SystemExit(f"--scan {args.scan}: give false, true or false,true")
  n_devs = _ints(args.devices)
  for n in n_devs:
    first_devices(n)  # a clear error before any compute
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  out = {"device": kind, "platform": dev.platform, "visible_devices": jax.device_count(),
         "devices_run": n_devs, "jax": jax.__version__, "python": platform.python_version(),
         "preset": args.preset, "extra_overrides": args.extra, "reference": REFERENCE,
         "spec_peak_flops": peak_flops(dev), "matmul_peak": {}, "variants": [], "scaling": [],
         "compile_cache_dir": compile_cache.active_dir(),
         "note": "peak_bytes_in_use is device 0's running peak since the process started"}
  name = args.out or os.path.join(
      os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")),
      f"train_{kind.replace(' ', '_').lower()}_dp{'-'.join(map(str, n_devs))}.json")
  os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
  if args.fresh_process and len(scans) > 1:
    return run_fresh_processes(args, scans, name)

  def save():
    out["scaling"] = scaling(out["variants"])
    out["scan_vs_unrolled"] = scan_vs_unrolled(out["variants"])
    with open(name, "w") as f:
      json.dump(out, f, indent=2)

  print(json.dumps({k: out[k] for k in ("device", "platform", "visible_devices", "devices_run",
                                        "jax", "preset", "spec_peak_flops")}), flush=True)
  t_start = time.perf_counter()
  measured = measure_peaks(args.peak_n, out) if args.peak_n > 0 else None
  out["measured_peak_flops"] = measured
  save()
  done = False
  for impl in args.impls.split(","):
    for remat in policies:
      for micro in _ints(args.micro):
        if done:
          continue
        all_ok = True
        for scan, n in [(s == "true", n) for s in scans for n in n_devs]:
          if time.perf_counter() - t_start > args.budget_s:
            print(f"budget {args.budget_s:.0f}s spent: skipping impl={impl} remat={remat} "
                  f"micro/device={micro} scan={scan} on {n} device(s)", flush=True)
            all_ok = False
            continue
          tag = f"devices={n} impl={impl} remat={remat} micro/device={micro} scan={scan}"
          t0 = time.perf_counter()
          try:
            if args.compile_only:
              r = compile_only_variant(args.preset, micro, n, args.n_micro, remat, impl,
                                       args.seq_len, args.extra, scan=scan,
                                       optimizer_only=args.optimizer_only)
              r["ok"] = True
              o = r["optimizer_update"]
              step_text = "" if args.optimizer_only else (
                  f": lower {r['lower_s']:.1f}s + compile {r['compile_s']:.1f}s wall "
                  f"({r['lower_cpu_s']:.1f}s + {r['compile_cpu_s']:.1f}s CPU; persistent "
                  f"cache {r['compile_cache']['verdict']})")
              print(f"{tag} muon_batch={r['muon_batch']}{step_text}; optimizer update alone: lower "
                    f"{o['lower_cpu_s']:.1f}s + compile {o['compile_cpu_s']:.1f}s CPU, "
                    f"collectives {o.get('hlo_ops')}", flush=True)
              r["wall_s"] = time.perf_counter() - t0
              out["variants"].append(r)
              save()
              continue
            r = bench_variant(args.preset, micro, n, args.n_micro, remat, impl, args.seq_len,
                              args.reps, args.extra, scan=scan)
            r["ok"] = True
            add_mfu(r, out["spec_peak_flops"], measured)
            if args.fit_micro:
              fit_micro(r, args.preset, args.fit_micro, args.n_micro, args.extra,
                        args.budget_gib)
            print(f"{tag}: {r['tokens_per_s_measured']:.0f} tok/s measured "
                  f"({r['tokens_per_s_ref_step']:.0f} at the 256x{args.seq_len} step); MFU "
                  f"{r.get('mfu_vs_measured_peak', float('nan')):.3f} vs measured peak, "
                  f"{r.get('mfu_vs_spec_table', float('nan')):.3f} vs spec table; step "
                  f"{r['step_s_median']:.3f}s opt {r['opt_update_s_median']:.3f}s (first call "
                  f"{r['opt_update_first_call_s']:.1f}s) muon_batch={r['muon_batch']} compile "
                  f"{r['compile_s']:.1f}s (persistent cache {r['compile_cache']['verdict']}; "
                  f"lower {r['lower_s']:.1f}s, first step {r['first_step_s']:.2f}s); "
                  f"{memory_line(r)}", flush=True)
          except Exception as e:  # noqa: BLE001 - record OOM / kernel failures and go on
            all_ok = False
            r = {"ok": False, "devices": n, "micro_batch_per_device": micro, "remat": remat,
                 "kernel_impl": impl, "scan_layers": scan, "error": f"{type(e).__name__}: {str(e)[:600]}"}
            print(f"{tag}: FAILED {r['error'][:300]}", flush=True)
            traceback.print_exc(limit=3)
          r["wall_s"] = time.perf_counter() - t0
          out["variants"].append(r)
          jax.clear_caches()
          gc.collect()
          save()
        done = all_ok and not args.all
  save()
  for s in out["scaling"]:
    print(f"scaling impl={s['kernel_impl']} remat={s['remat']} micro/device="
          f"{s['micro_batch_per_device']}: {s['tokens_per_s_1']:.0f} tok/s on 1 -> "
          f"{s['tokens_per_s_n']:.0f} on {s['devices']}: efficiency {s['efficiency']:.3f} "
          f"(at the reference step {s['efficiency_ref_step']:.3f})", flush=True)
  for p in out["scan_vs_unrolled"]:
    print_pair(p)
  print("wrote", name)


if __name__ == "__main__":
  main()
