"""Benchmark: Pallas Polar attention (`attention_stats`) vs cuDNN softmax attention vs the XLA
streaming path, forward and forward+backward, bf16, 8 query / 2 KV heads, head dim 128, causal.

  python3 bench/polar_attention.py --out bench/results/polar_attention_h100.json [--sweep]
  python3 bench/polar_attention.py --bwd-variants all --out $OUT/polar_bwd_variants.json
  python3 bench/polar_attention.py --mosaic --quick-checks --out $OUT/polar_mosaic.json
  python3 bench/polar_attention.py --mosaic-bwd 64,64,2 128,64,2 --out $OUT/polar_mosaic_bwd.json
  python3 bench/polar_attention.py --mosaic-fwd 128,2 128,2,pingpong,intra_overlap \
      --budget-s 160 --out $OUT/polar_fwd.json

Order: (1) correctness of the Pallas kernels vs the XLA streaming path (and the materialized
oracle) at small shapes, (2) an optional block-size sweep at (B, T) = (4, 8K), (3) the table.
Times are wall-clock per call (dispatch included): warm-up, `block_until_ready`, median of
`--reps` runs. Prints a table and writes JSON (device, jax version, shapes, medians).
"Pallas fwd+bwd" = forward kernel + the api's per-row prologue + dQ and dK/dV kernels (what the
custom VJP runs); cuDNN fwd+bwd = `jax.vjp` of `jax.nn.dot_product_attention(implementation=
"cudnn", is_causal=True)` (no p2 statistic, no per-row scale: a plain softmax attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--smoke" in sys.argv:
  # The Mosaic kernels run in interpret mode on CPU, a thread per warpgroup. Seen on a 2-core
  # machine with one host device: a Mosaic backward (the one-pass variant since removed) hung
  # (consumers waiting on barriers, the third warpgroup never scheduled); with 8 host devices,
  # as tests/conftest.py sets, it ran.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.polar_attention import (  # noqa: E402
    gpu_mosaic, gpu_triton, reference, xla_streaming)

H, G, D = 8, 2, 128
SHAPES = ((16, 2048), (4, 8192), (1, 32768))
FWD_ONLY_SHAPES = ((1, 65536),)
FWD_SWEEP = (  # block_q, block_k, num_warps, num_stages
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4),
    (64, 128, 4, 3))
DQ_SWEEP = (  # block_q, block_k, num_warps, num_stages of the dQ kernel
    (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3),
    (64, 128, 4, 2), (128, 128, 8, 2), (64, 32, 4, 3))
DKV_SWEEP = (  # block_q, block_k, num_warps, num_stages of the dK/dV kernel
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3),
    (32, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (32, 128, 8, 2))


def inputs(B, Tq, Tk=None, dtype=jnp.bfloat16, seed=0):
  Tk = Tk or Tq
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (B, Tq, H, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, Tk, G, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, Tk, G, D), jnp.float32).astype(dtype)
  scale = jax.random.uniform(ks[3], (B, Tq, H), jnp.float32, 1.0, 3.0) / np.sqrt(D)
  do = jax.random.normal(ks[4], (B, Tq, H, D), jnp.float32).astype(dtype)
  return q, k, v, scale, do


def fwd_bwd_fn(mod, **kw):
  """fwd -> per-row prologue -> bwd, as the custom VJP runs it (random dO, dlse = dp2 = 0.1)."""
  def f(q, k, v, scale, do):
    o, lse, p2 = mod.attention_stats_fwd(q, k, v, scale, **kw)
    dl = jnp.full_like(lse, 0.1)
    delta, cq = reference.stats_vjp_prologue(o, p2, do, dl, dl)
    return mod.attention_stats_bwd(q, k, v, scale, lse, do, delta, cq, **kw)
  return f


def cudnn_fns(implementation="cudnn"):
  attn = functools.partial(jax.nn.dot_product_attention, implementation=implementation,
                           is_causal=True)

  def fb(q, k, v, do):
    o, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)
  return jax.jit(attn), jax.jit(fb)


def timeit(f, *args, reps=10, warmup=2, max_s=20.0):
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
    if sum(ts) > max_s and len(ts) >= 3:
      break
  return 1e3 * statistics.median(ts), len(ts)


def time_call(row, fn, args, *, reps, label, mult=None):
  """The one timing path of every table: fn(*args) once (compiles; its outputs are returned; the
  first of the 2 warm-up calls), then `timeit`. Returns (row with median_ms, runs and, given
  `mult` causal matmuls, causal_tflops; outputs). On an exception (e.g. a config that does not
  compile) prints `label: FAILED ...` and returns (row with `error`, None), so the table records
  the row and goes on."""
  try:
    out = jax.block_until_ready(fn(*args))
    ms, n = timeit(fn, *args, reps=reps, warmup=1)
  except Exception as e:  # noqa: BLE001 - record and keep going
    print(f"{label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
    return dict(row, error=str(e)[:300]), None
  row = dict(row, median_ms=ms, runs=n)
  if mult is not None:
    row["causal_tflops"] = causal_tflops(row["B"], row["T"], ms, mult)
  return row, out


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1e-6, float(np.max(np.abs(b)))))


def correctness(cfg, small=False):
  """Pallas vs XLA streaming (bf16) and vs the materialized oracle (fp32 inputs)."""
  out = []
  cases = ((2, 1000, 1000, 0, None), (1, 1000, 1000, 0, 256), (1, 1, 4096, 4095, None),
           (1, 300, 1800, 1500, 512))
  if small:
    cases = ((1, 100, 100, 0, 40), (1, 1, 130, 129, None))
  for (B, Tq, Tk, off, win) in cases:
    kw = dict(window=win, q_offset=off)
    q, k, v, scale, do = inputs(B, Tq, Tk, seed=1)
    got = jax.jit(functools.partial(gpu_triton.attention_stats_fwd, config=cfg, **kw))(
        q, k, v, scale)
    got_g = jax.jit(fwd_bwd_fn(gpu_triton, config=cfg, **kw))(q, k, v, scale, do)
    want = jax.jit(functools.partial(xla_streaming.attention_stats_fwd, **kw))(q, k, v, scale)
    want_g = jax.jit(fwd_bwd_fn(xla_streaming, **kw))(q, k, v, scale, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    orc = reference.attention_stats_materialized(*f32, scale, **kw)
    names = ("o", "lse", "p2", "dq", "dk", "dv", "dscale")
    row = {"B": B, "Tq": Tq, "Tk": Tk, "q_offset": off, "window": win,
           "rel_err_vs_xla": {n: rel_err(a, b) for n, a, b in
                              zip(names, tuple(got) + tuple(got_g), tuple(want) + tuple(want_g))},
           "rel_err_vs_oracle_fwd": {n: rel_err(a, b) for n, a, b in zip(names, got, orc)}}
    out.append(row)
    print(f"check B{B} Tq{Tq} Tk{Tk} off{off} w{win}: vs xla "
          + " ".join(f"{n}={e:.1e}" for n, e in row["rel_err_vs_xla"].items())
          + " | fwd vs oracle " + " ".join(f"{n}={e:.1e}"
                                           for n, e in row["rel_err_vs_oracle_fwd"].items()))
  return out


def mosaic_correctness(mcfg, small=False):
  """--mosaic: the Mosaic-GPU forward (and it + the Triton backward) vs the Triton kernels and
  the materialized oracle (fp32 math on the same bf16 inputs), causal, Tq == Tk."""
  out = []
  cases = ((1, 128, None), (1, 200, 40)) if small else ((2, 1000, None), (1, 1000, 256),
                                                       (1, 333, 100), (1, 2048, None))
  for (B, T, win) in cases:
    kw = dict(window=win, q_offset=0)
    q, k, v, scale, do = inputs(B, T, seed=1)
    row = {"B": B, "T": T, "window": win}
    try:
      got = jax.jit(functools.partial(gpu_mosaic.attention_stats_fwd, config=mcfg, **kw))(
          q, k, v, scale)
      got_g = jax.jit(fwd_bwd_fn(gpu_mosaic, config=mcfg, **kw))(q, k, v, scale, do)
    except Exception as e:  # noqa: BLE001 - record and keep going
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"mosaic check B{B} T{T} w{win}: FAILED {row['error']}", flush=True)
      out.append(row)
      continue
    want = jax.jit(functools.partial(gpu_triton.attention_stats_fwd, **kw))(q, k, v, scale)
    want_g = jax.jit(fwd_bwd_fn(gpu_triton, **kw))(q, k, v, scale, do)
    orc = reference.attention_stats_materialized(*[x.astype(jnp.float32) for x in (q, k, v)],
                                                 scale, **kw)
    names = ("o", "lse", "p2", "dq", "dk", "dv", "dscale")
    row["rel_err_vs_triton"] = {n: rel_err(a, b) for n, a, b in
                                zip(names, tuple(got) + tuple(got_g), tuple(want) + tuple(want_g))}
    row["rel_err_vs_oracle_fwd"] = {n: rel_err(a, b) for n, a, b in zip(names, got, orc)}
    row["triton_rel_err_vs_oracle_fwd"] = {n: rel_err(a, b) for n, a, b in zip(names, want, orc)}
    out.append(row)
    print(f"mosaic check B{B} T{T} w{win}: vs triton "
          + " ".join(f"{n}={e:.1e}" for n, e in row["rel_err_vs_triton"].items())
          + " | fwd vs oracle " + " ".join(f"{n}={e:.1e}"
                                           for n, e in row["rel_err_vs_oracle_fwd"].items())
          + " | triton fwd vs oracle " + " ".join(
              f"{n}={e:.1e}" for n, e in row["triton_rel_err_vs_oracle_fwd"].items()),
          flush=True)
  return out


def sweep(reps, shape, n_cfg, result, save):
  """Times each kernel alone over its candidate launch configs; returns the best config."""
  B, T = shape
  q, k, v, scale, do = inputs(B, T)
  res = result["sweep"] = {"shape": [B, T], "fwd": [], "dq": [], "dkv": []}
  kw = dict(window=None, q_offset=0)
  o, lse, p2 = jax.jit(functools.partial(gpu_triton.attention_stats_fwd, **kw))(q, k, v, scale)
  delta, cq = reference.stats_vjp_prologue(o, p2, do, lse * 0 + 0.1, lse * 0 + 0.1)
  kinds = (
      ("fwd", FWD_SWEEP, ("block_q", "block_k", "num_warps", "num_stages"),
       lambda cfg: (jax.jit(functools.partial(gpu_triton.attention_stats_fwd, config=cfg, **kw)),
                    (q, k, v, scale))),
      ("dq", DQ_SWEEP, ("dq_block_q", "dq_block_k", "dq_num_warps", "dq_num_stages"),
       lambda cfg: (jax.jit(functools.partial(gpu_triton.attention_stats_bwd, config=cfg,
                                              parts=("dq",), **kw)),
                    (q, k, v, scale, lse, do, delta, cq))),
      ("dkv", DKV_SWEEP, ("dkv_block_q", "dkv_block_k", "dkv_num_warps", "dkv_num_stages"),
       lambda cfg: (jax.jit(functools.partial(gpu_triton.attention_stats_bwd, config=cfg,
                                              parts=("dkv",), **kw)),
                    (q, k, v, scale, lse, do, delta, cq))),
  )
  best = gpu_triton.DEFAULT_CONFIG
  for kind, cands, fields, make in kinds:
    best_ms = None
    for cand in cands[:n_cfg]:
      upd = dict(zip(fields, cand))
      fn, args = make(dataclasses.replace(gpu_triton.DEFAULT_CONFIG, **upd))
      timed, _ = time_call({}, fn, args, reps=reps, label=f"{kind} {cand}")
      ms = timed.get("median_ms")  # None: a config that does not compile (printed)
      res[kind].append(dict(upd, ms=ms))
      save()
      if ms is not None:
        print(f"{kind} {cand}: {ms:.3f} ms", flush=True)
        if best_ms is None or ms < best_ms:
          best_ms, best = ms, dataclasses.replace(best, **upd)
  res["best"] = dataclasses.asdict(best)
  return best


def causal_tflops(B, T, ms, mult):
  """Causal attention FLOPs (4 B H T^2 D / 2 per forward; fwd+bwd = 3.5x) per second."""
  return mult * 2.0 * B * H * T * T * D / (ms * 1e-3) / 1e12


def table(cfg, reps, xla_max_t, shapes, fwd_only_shapes, save, cudnn="cudnn", mosaic=None):
  rows = []
  cud_f, cud_fb = cudnn_fns(cudnn)
  for (B, T), fb in [(s, True) for s in shapes] + [(s, False) for s in fwd_only_shapes]:
    q, k, v, scale, do = inputs(B, T)
    impls = {
        "pallas": (jax.jit(functools.partial(gpu_triton.attention_stats_fwd, config=cfg,
                                             window=None, q_offset=0)),
                   jax.jit(fwd_bwd_fn(gpu_triton, config=cfg, window=None, q_offset=0))),
        cudnn: (cud_f, cud_fb),
    }
    if mosaic is not None:  # MosaicConfig: its forward alone, and with the Triton backward
      impls["mosaic_fwd"] = (jax.jit(functools.partial(
          gpu_mosaic.attention_stats_fwd, config=mosaic, window=None, q_offset=0)), None)
      impls["mosaic_fwd+triton_bwd"] = (None, jax.jit(fwd_bwd_fn(
          gpu_mosaic, config=mosaic, window=None, q_offset=0)))
    if T <= xla_max_t:
      impls["xla_streaming"] = (
          jax.jit(functools.partial(xla_streaming.attention_stats_fwd, window=None, q_offset=0)),
          jax.jit(fwd_bwd_fn(xla_streaming, window=None, q_offset=0)))
    for name, (f_fwd, f_fb) in impls.items():
      args = (q, k, v) if name == cudnn else (q, k, v, scale)
      for mode in ("fwd", "fwd+bwd") if fb else ("fwd",):
        fn = f_fwd if mode == "fwd" else f_fb
        if fn is None:
          continue
        a = args if mode == "fwd" else args + (do,)
        row, _ = time_call({"B": B, "T": T, "impl": name, "mode": mode}, fn, a, reps=reps,
                           label=f"B{B} T{T} {name} {mode}", mult=1.0 if mode == "fwd" else 3.5)
        rows.append(row)
        if "error" in row:
          continue
        ms, n, tf = row["median_ms"], row["runs"], row["causal_tflops"]
        print(f"B{B:>2} T{T:>6} {name:>14} {mode:>8}: {ms:9.3f} ms  ({tf:6.1f} TF/s, n={n})",
              flush=True)
      save(rows)
    del q, k, v, scale, do
  return rows


def decode_table(cfg, reps, save, rows, cases=((1, 65536), (8, 65536), (8, 8192))):
  """One query row per sequence over a long prefix (q_offset = Tk - 1): split-K kernel vs the
  query-tile kernel (rows padded to 16) vs XLA streaming. cuDNN's is_causal is top-left
  aligned, so it has no decode counterpart here."""
  padded = dataclasses.replace(cfg, decode_max_rows=0)
  for B, Tk in cases:
    q, k, v, scale, _ = inputs(B, 1, Tk)
    kw = dict(window=None, q_offset=Tk - 1)
    impls = {"pallas_splitk": functools.partial(gpu_triton.attention_stats_fwd, config=cfg, **kw),
             "pallas_padded": functools.partial(gpu_triton.attention_stats_fwd, config=padded,
                                                **kw),
             "xla_streaming": functools.partial(xla_streaming.attention_stats_fwd, **kw)}
    ref = None
    for name, fn in impls.items():
      row, out = time_call({"B": B, "T": Tk, "Tq": 1, "impl": name, "mode": "decode"},
                           jax.jit(fn), (q, k, v, scale), reps=reps,
                           label=f"decode B{B} Tk{Tk} {name}")
      if out is None:
        rows.append(row)
        continue
      ref = out if ref is None else ref
      err = max(rel_err(a, b) for a, b in zip(out, ref))
      ms, n = row["median_ms"], row["runs"]
      gbs = 2 * B * Tk * G * D * 2 / (ms * 1e-3) / 1e9
      rows.append(dict(row, kv_read_GBps=gbs, max_rel_err_vs_splitk=err))
      print(f"decode B{B:>2} Tk{Tk:>6} {name:>14}: {ms:9.3f} ms  ({gbs:7.1f} GB/s KV read, "
            f"rel err vs split-K {err:.1e})", flush=True)
      save(rows)


# Backward variants (issue #5): name -> BlockConfig overrides. "split" is the default (flat
# dK/dV loops over (head, query tile) pairs). ptxas register spills (Triton 3.6, B4 T8K, sm_90a,
# 255 registers): dK/dV kernel 1056 B flat, 4748 B per head. On an H100 at (4, 8K)
# (bench/results/polar_bwd_variants_h100.json) the backward took 4.61 ms flat, 4.89 per head; a
# fused backward with atomic dQ adds took 11.96 ms and was removed.
BWD_VARIANTS = {
    "split": dict(),
    "split_per_head": dict(dkv_flat_heads=False),
}


def bwd_variants(variants, reps, save, budget_s, small=False):
  """Per backward variant, in order of importance (variants past `budget_s` seconds are
  skipped and recorded):
    1. (B, T) = (4, 8K): the backward alone (given the forward's residuals; its dq/dk/dv/dscale
       compared with the split kernels' on the same inputs) and forward+backward (as the custom
       VJP runs it), next to cuDNN's fwd+bwd;
    2. a windowed chunked-prefill case (GQA, offset, odd lengths): fwd+bwd vs XLA streaming;
    3. (16, 2K): forward+backward, next to cuDNN.
  """
  t_start = time.perf_counter()
  res = {"variants": {n: BWD_VARIANTS[n] for n in variants}, "checks": [], "timings": []}
  base = gpu_triton.DEFAULT_CONFIG
  over = lambda: time.perf_counter() - t_start > budget_s
  cfgs = {n: dataclasses.replace(base, **BWD_VARIANTS[n]) for n in variants}
  names4 = ("dq", "dk", "dv", "dscale")

  def timed(B, T, name, mode, fn, args, ref=None):
    """Times fn(*args); with `ref`, also records its outputs' rel. error vs `ref`."""
    if over():
      res["timings"].append({"B": B, "T": T, "variant": name, "mode": mode, "skipped": True})
      return None
    row, out = time_call({"B": B, "T": T, "variant": name, "mode": mode}, fn, args, reps=reps,
                         label=f"B{B} T{T} {name} {mode}", mult=2.5 if mode == "bwd" else 3.5)
    if out is None:
      res["timings"].append(row)
      return None
    ms, n, tf = row["median_ms"], row["runs"], row["causal_tflops"]
    if ref is not None:
      row["rel_err_vs_split"] = {k: rel_err(a, b) for k, a, b in zip(names4, out, ref)}
    res["timings"].append(row)
    print(f"B{B:>2} T{T:>6} {name:>14} {mode:>8}: {ms:8.3f} ms ({tf:6.1f} TF/s, n={n})"
          + ("" if ref is None else " vs split " + " ".join(
              f"{k}={e:.1e}" for k, e in row["rel_err_vs_split"].items()))
          + f" [{time.perf_counter() - t_start:.0f} s]", flush=True)
    save(res)
    return out

  cud_fb = cudnn_fns("xla" if small else "cudnn")[1]
  kw = dict(window=None, q_offset=0)
  big, small_shape = ((1, 256), (2, 128)) if small else ((4, 8192), (16, 2048))
  # 1. the goal shape
  B, T = big
  q, k, v, scale, do = inputs(B, T)
  o, lse, p2 = jax.jit(functools.partial(gpu_triton.attention_stats_fwd, **kw))(q, k, v, scale)
  dl = jnp.full_like(lse, 0.1)
  delta, cq = reference.stats_vjp_prologue(o, p2, do, dl, dl)
  timed(B, T, "cudnn", "fwd+bwd", cud_fb, (q, k, v, do))
  ref = jax.jit(functools.partial(gpu_triton.attention_stats_bwd, **kw))(
      q, k, v, scale, lse, do, delta, cq)
  for name in variants:
    bwd = jax.jit(functools.partial(gpu_triton.attention_stats_bwd, config=cfgs[name], **kw))
    timed(B, T, name, "bwd", bwd, (q, k, v, scale, lse, do, delta, cq), ref=ref)
    timed(B, T, name, "fwd+bwd", jax.jit(fwd_bwd_fn(gpu_triton, config=cfgs[name], **kw)),
          (q, k, v, scale, do))
  del q, k, v, scale, do, o, lse, p2, delta, cq, ref
  # 2. windowed chunked prefill vs XLA streaming
  (B, Tq, Tk, off, win) = (1, 40, 130, 90, 48) if small else (1, 300, 1800, 1500, 512)
  ckw = dict(window=win, q_offset=off)
  q, k, v, scale, do = inputs(B, Tq, Tk, seed=2)
  want = jax.jit(fwd_bwd_fn(xla_streaming, **ckw))(q, k, v, scale, do)
  for name in variants:
    if over():
      res["checks"].append({"variant": name, "case": [B, Tq, Tk, off, win], "skipped": True})
      continue
    try:
      got = jax.jit(fwd_bwd_fn(gpu_triton, config=cfgs[name], **ckw))(q, k, v, scale, do)
    except Exception as e:  # noqa: BLE001
      print(f"check {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      res["checks"].append({"variant": name, "case": [B, Tq, Tk, off, win],
                            "error": str(e)[:300]})
      continue
    row = {"variant": name, "case": [B, Tq, Tk, off, win],
           "rel_err_vs_xla": {n: rel_err(a, b) for n, a, b in zip(names4, got, want)}}
    res["checks"].append(row)
    print(f"check {name:>14} B{B} Tq{Tq} Tk{Tk} off{off} w{win} vs xla: " + " ".join(
        f"{n}={e:.1e}" for n, e in row["rel_err_vs_xla"].items()), flush=True)
    save(res)
  # 3. many short sequences
  B, T = small_shape
  q, k, v, scale, do = inputs(B, T)
  timed(B, T, "cudnn", "fwd+bwd", cud_fb, (q, k, v, do))
  for name in variants:
    timed(B, T, name, "fwd+bwd", jax.jit(fwd_bwd_fn(gpu_triton, config=cfgs[name], **kw)),
          (q, k, v, scale, do))
  save(res)  # also records what was skipped
  return res


def mosaic_bwd_spec(spec: str) -> gpu_mosaic.BwdConfig:
  """'DQ_BK,DKV_BQ,STAGES' -> the Mosaic backward's BwdConfig."""
  first, *rest = spec.split(",")
  if first in ("wg", "tile"):
    raise SystemExit(f"--mosaic-bwd {spec!r}: the one-pass backward ('wg' / 'tile') was removed "
                     "after measuring slower than the two-kernel one at every shape "
                     "(bench/results/polar_mosaic_bwd_fused_h200.json); use DQ_BK,DKV_BQ,STAGES")
  if len(rest) != 2 or not all(x.isdigit() for x in (first, *rest)):
    raise SystemExit(f"--mosaic-bwd {spec!r}: expected DQ_BK,DKV_BQ,STAGES (integers)")
  dq_bk, dkv_bq, stages = (int(x) for x in (first, *rest))
  return gpu_mosaic.BwdConfig(dq_block_k=dq_bk, dkv_block_q=dkv_bq, stages=stages)


def bwd_name(bwd: gpu_mosaic.BwdConfig) -> str:
  return f"mosaic_bwd[dq{bwd.dq_block_k},kv{bwd.dkv_block_q},s{bwd.stages}]"


def oracle_vjp(q, k, v, scale, do, window):
  """fp32 materialized oracle (on the bf16 values) and its autodiff VJP for the cotangents the
  benchmark uses (do, dlse = dp2 = 0.1): (dq, dk, dv, dscale)."""
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  f = functools.partial(reference.attention_stats_materialized, window=window, q_offset=0)
  (o, lse, p2), vjp = jax.vjp(f, *f32, scale)
  return vjp((do.astype(jnp.float32), jnp.full_like(lse, 0.1), jnp.full_like(p2, 0.1)))


def mosaic_bwd_checks(mosaic, bwds, small=False, tol=1e-2):
  """--mosaic-bwd, before any timing: dq / dk / dv / dscale of the Mosaic forward + each Mosaic
  backward config, and of the Mosaic forward + the Triton backward, vs the oracle's VJP (errors
  relative to each output's max); `ok` when every error is <= tol or <= twice the Triton
  backward's on the same case (bf16 rounding of ds grows with T)."""
  out = []
  cases = ((1, 200, 40),) if small else ((2, 1000, None), (1, 1000, 256), (1, 333, 100))
  names = ("dq", "dk", "dv", "dscale")
  for (B, T, win) in cases:
    kw = dict(window=win, q_offset=0)
    q, k, v, scale, do = inputs(B, T, seed=3)
    want = jax.jit(functools.partial(oracle_vjp, window=win))(q, k, v, scale, do)
    triton_errs = {}
    for name, cfg in [("triton_bwd", mosaic)] + [
        (bwd_name(b), dataclasses.replace(mosaic, backward="mosaic", bwd=b)) for b in bwds]:
      row = {"B": B, "T": T, "window": win, "impl": "mosaic_fwd+" + name}
      try:
        got = jax.jit(fwd_bwd_fn(gpu_mosaic, config=cfg, **kw))(q, k, v, scale, do)
        errs = row["rel_err_vs_oracle"] = {n: rel_err(a, b) for n, a, b in zip(names, got, want)}
        if name == "triton_bwd":
          triton_errs = errs
        row["ok"] = all(e <= max(tol, 2 * triton_errs.get(n, 0.0)) for n, e in errs.items())
      except Exception as e:  # noqa: BLE001 - record and keep going
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["ok"] = False
      out.append(row)
      print(f"bwd check B{B} T{T} w{win} {row['impl']}: " + (
          row.get("error") or " ".join(f"{n}={e:.1e}" for n, e in row["rel_err_vs_oracle"].items())
          + ("" if row["ok"] else f"  FAILED (tol {tol})")), flush=True)
  return out


def mosaic_bwd_table(mosaic, bwds, reps, shapes, save, cudnn="cudnn", budget_s=200.0):
  """--mosaic-bwd rows, in two passes over the shapes so that a budget cut drops details first:
    goal:   cuDNN fwd+bwd; the Mosaic forward + the Triton backward; + each Mosaic backward
            config (fwd+bwd, with `throughput_vs_cudnn` = cuDNN ms / ours);
    detail: the Mosaic forward alone; each backward alone (given the Mosaic forward's residuals;
            the Mosaic ones compared with the Triton one on these inputs); at the second shape
            (4, 8K; the only one with --smoke) each backward kernel alone (mode "bwd_part",
            `impl:dq` / `impl:dkv`; TF/s counted as 3 and 4 causal matmuls).
  Rows past `budget_s` seconds are recorded as skipped."""
  t_start = time.perf_counter()
  rows = []
  _, cud_fb = cudnn_fns(cudnn)
  kw = dict(window=None, q_offset=0)
  names = ("dq", "dk", "dv", "dscale")
  cfgs = [(bwd_name(b), dataclasses.replace(mosaic, backward="mosaic", bwd=b)) for b in bwds]
  fb = lambda cfg: jax.jit(fwd_bwd_fn(gpu_mosaic, config=cfg, **kw))
  bwd = lambda cfg, parts=("dq", "dkv"): jax.jit(functools.partial(
      gpu_mosaic.attention_stats_bwd, config=cfg, parts=parts, **kw))
  for stage in ("goal", "detail"):
    for (B, T) in shapes:
      q, k, v, scale, do = inputs(B, T)
      if stage == "goal":
        impls = [(cudnn, "fwd+bwd", cud_fb, (q, k, v, do)),
                 ("mosaic_fwd+triton_bwd", "fwd+bwd", fb(mosaic), (q, k, v, scale, do))]
        impls += [("mosaic_fwd+" + name, "fwd+bwd", fb(cfg), (q, k, v, scale, do))
                  for name, cfg in cfgs]
      else:
        o, lse, p2 = jax.jit(functools.partial(gpu_mosaic.attention_stats_fwd, config=mosaic,
                                               **kw))(q, k, v, scale)
        dl = jnp.full_like(lse, 0.1)
        delta, cq = reference.stats_vjp_prologue(o, p2, do, dl, dl)
        res = (q, k, v, scale, lse, do, delta, cq)
        impls = [("mosaic_fwd", "fwd", jax.jit(functools.partial(
                     gpu_mosaic.attention_stats_fwd, config=mosaic, **kw)), (q, k, v, scale)),
                 ("triton_bwd", "bwd", bwd(mosaic), res)]
        impls += [(name, "bwd", bwd(cfg), res) for name, cfg in cfgs]
        if (B, T) == shapes[min(1, len(shapes) - 1)]:
          impls += [(f"{name}:{part}", "bwd_part", bwd(cfg, (part,)), res)
                    for part in ("dq", "dkv") for name, cfg in [("triton_bwd", mosaic)] + cfgs]
      ref = None
      for name, mode, fn, args in impls:
        row = {"B": B, "T": T, "impl": name, "mode": mode}
        if time.perf_counter() - t_start > budget_s:
          rows.append(dict(row, skipped=True))
          continue
        mult = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5,
                "bwd_part": 1.5 if name.endswith(":dq") else 2.0}[mode]
        row, out = time_call(row, fn, args, reps=reps, label=f"B{B} T{T} {name} {mode}",
                             mult=mult)
        if out is None:
          rows.append(row)
          continue
        ms, n, tf = row["median_ms"], row["runs"], row["causal_tflops"]
        if name == "triton_bwd":
          ref = out
        elif mode == "bwd" and ref is not None:
          row["rel_err_vs_triton_bwd"] = {n_: rel_err(a, b) for n_, a, b in zip(names, out, ref)}
        cud = [r for r in rows if (r["B"], r["T"], r["impl"]) == (B, T, cudnn) and "median_ms" in r]
        if mode == "fwd+bwd" and cud:
          row["throughput_vs_cudnn"] = cud[0]["median_ms"] / ms
        rows.append(row)
        print(f"B{B:>2} T{T:>6} {name:>34} {mode:>8}: {ms:8.3f} ms ({tf:6.1f} TF/s, n={n})"
              + (f" {row['throughput_vs_cudnn']:.2f}x cuDNN" if "throughput_vs_cudnn" in row
                 else "")
              + ("" if "rel_err_vs_triton_bwd" not in row else " vs triton " + " ".join(
                  f"{k_}={e:.1e}" for k_, e in row["rel_err_vs_triton_bwd"].items()))
              + f" [{time.perf_counter() - t_start:.0f} s]", flush=True)
        save(rows)
      del q, k, v, scale, do, impls, ref
  save(rows)
  return rows


# --mosaic-fwd: flags after BK,STAGES name boolean MosaicConfig fields
MOSAIC_FWD_FLAGS = ("pingpong", "intra_overlap", "p_via_smem")


def mosaic_fwd_spec(spec: str) -> gpu_mosaic.MosaicConfig:
  """'BK,STAGES[,FLAG...]' (FLAG one of MOSAIC_FWD_FLAGS, switched on) -> the Mosaic forward's
  MosaicConfig."""
  bk, stages, *flags = spec.split(",")
  bad = [f for f in flags if f not in MOSAIC_FWD_FLAGS]
  if not (bk.isdigit() and stages.isdigit()) or bad:
    raise SystemExit(f"--mosaic-fwd {spec!r}: expected BK,STAGES[,FLAG...] with FLAG one of "
                     f"{MOSAIC_FWD_FLAGS}")
  return gpu_mosaic.MosaicConfig(block_k=int(bk), stages=int(stages),
                                 **{f: True for f in flags})


def fwd_name(cfg: gpu_mosaic.MosaicConfig) -> str:
  flags = "".join(f",{f}" for f in MOSAIC_FWD_FLAGS if getattr(cfg, f))
  return f"mosaic_fwd[{cfg.block_k},{cfg.stages}{flags}]"


def oracle_row_slices(T, n=256):
  """Query-row slices [r0, r0 + n) checked against the oracle at a timed shape: the first, a
  middle and the last rows (the last attend to every key)."""
  n = min(n, T)
  return sorted({0, (T // 2) // n * n, T - n})


_oracle = jax.jit(reference.attention_stats_materialized, static_argnames=("window", "q_offset"))


def oracle_slices(q, k, v, scale, window, rows_n=256):
  """{(b, r0, r1): fp32 materialized oracle (o, lse, p2) of query rows [r0, r1) of batch row b}
  on the same bf16 inputs, for the first and last batch row and the `oracle_row_slices` (each
  slice with all its visible keys, as q_offset = r0)."""
  T, f32 = q.shape[1], lambda x: x.astype(jnp.float32)
  wants = {}
  for b in sorted({0, q.shape[0] - 1}):
    for r0 in oracle_row_slices(T, rows_n):
      r1 = r0 + min(rows_n, T)
      wants[b, r0, r1] = _oracle(f32(q[b:b + 1, r0:r1]), f32(k[b:b + 1, :r1]),
                                 f32(v[b:b + 1, :r1]), scale[b:b + 1, r0:r1], window=window,
                                 q_offset=r0)
  return wants


def fwd_vs_oracle(out, wants):
  """(o, lse, p2) of a forward vs `oracle_slices`: the max error per output over the slices,
  relative to each slice's max."""
  errs = {n: 0.0 for n in ("o", "lse", "p2")}
  for (b, r0, r1), want in wants.items():
    for n, got, w in zip(errs, out, want):
      errs[n] = max(errs[n], rel_err(got[b:b + 1, r0:r1], w))
  return errs


def mosaic_fwd_table(cfgs, reps, shapes, save, cudnn="cudnn", budget_s=150.0, small=False,
                     tol=2e-2):
  """--mosaic-fwd: the Mosaic forward with each launch config in `cfgs` next to cuDNN's forward.
    checks: at small shapes (odd lengths, a window, a batch of 2, GQA 4:1), each config's
            (o, lse, p2) vs the fp32 materialized oracle (all rows);
    table:  per timed shape, cuDNN's forward, then each config's, its outputs checked against the
            oracle on query-row slices (`fwd_vs_oracle`) and its `time_vs_cudnn` (ours / cuDNN).
  A config's row is `ok` when every error is <= tol or <= twice the first config's on the same
  shape. Rows past `budget_s` seconds are recorded as skipped. Returns (checks, rows)."""
  t_start = time.perf_counter()
  over = lambda: time.perf_counter() - t_start > budget_s
  checks, rows = [], []
  names = [fwd_name(c) for c in cfgs]

  def judge(row, errs, base):
    row["rel_err_vs_oracle"] = errs
    row["ok"] = all(e <= max(tol, 2 * base.get(n, 0.0)) for n, e in errs.items())
    return " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + (
        "" if row["ok"] else f"  FAILED (tol {tol})")

  cases = ((1, 200, 40),) if small else ((2, 1000, None), (1, 333, 100))
  for (B, T, win) in cases:
    q, k, v, scale, _ = inputs(B, T, seed=4)
    want = jax.jit(functools.partial(reference.attention_stats_materialized, window=win))(
        *[x.astype(jnp.float32) for x in (q, k, v)], scale)
    base = {}
    for name, cfg in zip(names, cfgs):
      row = {"B": B, "T": T, "window": win, "impl": name}
      try:
        got = jax.jit(functools.partial(gpu_mosaic.attention_stats_fwd, config=cfg,
                                        window=win))(q, k, v, scale)
        errs = {n: rel_err(a, b) for n, a, b in zip(("o", "lse", "p2"), got, want)}
        text = judge(row, errs, base)
        base = base or errs
      except Exception as e:  # noqa: BLE001 - record and keep going
        row["error"], row["ok"] = f"{type(e).__name__}: {str(e)[:300]}", False
        text = "FAILED " + row["error"]
      checks.append(row)
      print(f"fwd check B{B} T{T} w{win} {name}: {text}", flush=True)
  save(checks, rows)

  cud_f, _ = cudnn_fns(cudnn)
  for (B, T) in shapes:
    q, k, v, scale, _ = inputs(B, T)
    impls = [(cudnn, cud_f, (q, k, v))] + [
        (name, jax.jit(functools.partial(gpu_mosaic.attention_stats_fwd, config=cfg,
                                         window=None)), (q, k, v, scale))
        for name, cfg in zip(names, cfgs)]
    cud_ms, base, wants = None, {}, oracle_slices(q, k, v, scale, None)
    for name, fn, args in impls:
      row = {"B": B, "T": T, "impl": name, "mode": "fwd"}
      if over():
        rows.append(dict(row, skipped=True))
        continue
      row, out = time_call(row, fn, args, reps=reps, label=f"B{B} T{T} {name} fwd", mult=1.0)
      if out is None:
        rows.append(row)
        continue
      text = ""
      if name == cudnn:
        cud_ms = row["median_ms"]
      else:
        errs = fwd_vs_oracle(out, wants)
        text = " vs oracle " + judge(row, errs, base)
        base = base or errs
        if cud_ms is not None:
          row["time_vs_cudnn"] = row["median_ms"] / cud_ms
          text = f" {row['time_vs_cudnn']:.2f}x {cudnn}'s time" + text
      rows.append(row)
      print(f"B{B:>2} T{T:>6} {name:>34} fwd: {row['median_ms']:8.3f} ms "
            f"({row['causal_tflops']:6.1f} TF/s, n={row['runs']}){text} "
            f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
      del out
      save(checks, rows)
    del q, k, v, scale, impls, wants
  save(checks, rows)
  return checks, rows


def main():
  t_start = time.perf_counter()
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="bench/results/polar_attention.json")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--sweep", action="store_true")
  ap.add_argument("--xla-max-t", type=int, default=32768)
  ap.add_argument("--skip-checks", action="store_true")
  ap.add_argument("--quick-checks", action="store_true", help="only the two small checks")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-runnable (no cuDNN)")
  ap.add_argument("--bwd-variants", default=None,
                  help="comma-separated backward variants to check and time (or 'all': "
                  + ",".join(BWD_VARIANTS) + "), then exit; see --budget-s")
  ap.add_argument("--budget-s", type=float, default=330.0,
                  help="--bwd-variants / --mosaic-bwd: skip (and record) what is left after this "
                  "many seconds (--mosaic-bwd: counted from the start, checks included)")
  ap.add_argument("--mosaic", nargs="?", const="128,2", default=None, metavar="BK,STAGES",
                  help="also check and time the Mosaic-GPU forward (gpu_mosaic; key block, "
                  "ring slots; default 128,2): rows mosaic_fwd and mosaic_fwd+triton_bwd")
  ap.add_argument("--mosaic-bwd", nargs="+", default=None, metavar="DQ_BK,DKV_BQ,STAGES",
                  help="check (vs the oracle's VJP) and time the Mosaic-GPU backward with these "
                  "configs next to the Triton backward and cuDNN (Mosaic forward as in --mosaic), "
                  "at the fwd+bwd shapes only (no Triton-forward, XLA, 64K or decode rows), "
                  "then exit; rows past --budget-s are skipped")
  ap.add_argument("--mosaic-fwd", nargs="+", default=None, metavar="BK,STAGES[,FLAG...]",
                  help="time the Mosaic-GPU forward with these configs (FLAG: "
                  + ", ".join(MOSAIC_FWD_FLAGS) + ", each a MosaicConfig field switched on) next "
                  "to cuDNN's forward at the fwd+bwd and 64K shapes, outputs checked against the "
                  "oracle (small shapes whole, the timed ones on row slices), then exit; rows "
                  "past --budget-s (counted from the start) are skipped")
  args = ap.parse_args()
  mosaic = None
  if args.mosaic or args.mosaic_bwd:
    bk, stages = (int(x) for x in (args.mosaic or "128,2").split(","))
    # the Triton backward here: the "mosaic_fwd+triton_bwd" rows; --mosaic-bwd rows set "mosaic"
    mosaic = gpu_mosaic.MosaicConfig(block_k=bk, stages=stages, backward="triton")
  shapes, fwd_only, sweep_shape, n_cfg, cudnn = SHAPES, FWD_ONLY_SHAPES, (4, 8192), None, "cudnn"
  if args.smoke:
    shapes, fwd_only, sweep_shape, n_cfg, cudnn = ((1, 128),), ((1, 256),), (1, 128), 2, "xla"
  dev = jax.devices()[0]
  result = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "heads": {"H": H, "G": G, "D": D}, "dtype": "bfloat16", "causal": True,
            "timing": f"wall-clock per call, median of {args.reps} after 2 warm-up calls"}
  print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def save(rows=None):
    if rows is not None:
      result["rows"] = rows
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)

  cfg = gpu_triton.DEFAULT_CONFIG
  if args.mosaic_fwd:
    fwds = [mosaic_fwd_spec(x) for x in args.mosaic_fwd]
    result["mosaic_fwd_configs"] = [
        {k: v for k, v in dataclasses.asdict(c).items() if k not in ("bwd", "interpret")}
        for c in fwds]

    def save_fwd(checks, rows):
      result["mosaic_fwd_checks"] = checks
      save(rows)

    mosaic_fwd_table(fwds, args.reps, shapes + fwd_only, save_fwd, cudnn,
                     args.budget_s - (time.perf_counter() - t_start), small=args.smoke)
    print("wrote", args.out)
    return
  if args.mosaic_bwd:
    bwds = [mosaic_bwd_spec(x) for x in args.mosaic_bwd]
    result["mosaic_config"] = {"block_k": mosaic.block_k, "stages": mosaic.stages}
    result["mosaic_bwd_configs"] = [dataclasses.asdict(b) for b in bwds]
    if not args.skip_checks:
      result["mosaic_bwd_checks"] = mosaic_bwd_checks(mosaic, bwds, small=args.smoke)
      save()
    mosaic_bwd_table(mosaic, bwds, args.reps, shapes, save, cudnn,
                     args.budget_s - (time.perf_counter() - t_start))
    print("wrote", args.out)
    return
  if args.bwd_variants:
    names = list(BWD_VARIANTS) if args.bwd_variants == "all" else args.bwd_variants.split(",")
    unknown = [n for n in names if n not in BWD_VARIANTS]
    if unknown:
      raise SystemExit(f"--bwd-variants: unknown {unknown}; choose from {list(BWD_VARIANTS)}")

    def save_variants(res):
      result["bwd_variants"] = res
      save()

    result["base_config"] = dataclasses.asdict(cfg)
    bwd_variants(names, args.reps, save_variants, args.budget_s, small=args.smoke)
    print("wrote", args.out)
    return
  if not args.skip_checks:
    result["correctness"] = correctness(cfg, small=args.smoke or args.quick_checks)
    save()
  if mosaic is not None:
    result["mosaic_config"] = {"block_k": mosaic.block_k, "stages": mosaic.stages}
    if not args.skip_checks:
      result["mosaic_correctness"] = mosaic_correctness(mosaic, small=args.smoke)
      save()
  if args.sweep:
    cfg = sweep(args.reps, sweep_shape, n_cfg, result, save)
    print("best config", cfg, flush=True)
  result["config"] = dataclasses.asdict(cfg)
  save()
  rows = table(cfg, args.reps, args.xla_max_t, shapes, fwd_only, save, cudnn, mosaic)
  if not args.smoke:
    decode_table(cfg, args.reps, save, rows)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
