"""Benchmark of the chunked gated delta rule: Pallas (Triton) vs the XLA chunked path vs FLA.

  PYTHONUNBUFFERED=1 python3 bench/gated_delta.py --out bench/results/gated_delta_h100.json

First a correctness check at a small shape (the Pallas kernels, compiled, vs the sequential
oracle, forward + VJP; the sequence split vs the unsplit pass), then wall-clock medians (ms) of
forward and forward+backward at bf16, 8 heads, K = V = 128, chunk 64:
(B, T) = (16, 2K), (4, 8K), (1, 32K) and forward at (1, 64K). "fwd+bwd" is one jitted call that
runs the forward and then the backward from the primal inputs (what a custom_vjp does in
training). Each timing: 3 warm-up calls, then the median over 7 repeats of (10 back-to-back
calls) / 10. FLA's `chunk_gated_delta_rule` (through `bench/fla_anchor.py`) is timed only if `fla`
imports ("unavailable" else).
Prints a table and writes JSON (device, versions, shapes, medians) after every measurement, so a
run cut short still leaves its numbers.

"fwd+bwd" runs `gated_delta_fwd_residuals` then `gated_delta_bwd(prepass=...)`, as api's
custom_vjp does (the prepass is not rerun in the backward).

The correctness check runs the defaults (per-chunk states and dv' stored "auto" = bf16 for
bf16 inputs, blocked inverse) and variants (f32 storage, T0 recomputed, the inverse's
dot algorithms tf32 / bf16x3 and the plain doubling) at three small shapes and reports
max |err| / max |oracle| per output with a pass flag. `--shapes 16x2048,4x8192` limits the main
table, `--skip-main` drops it, `--no-pieces` drops the forced-split rows at 64K. `--sweep`:
fwd+bwd of the defaults, then the backward alone ("bwd", prepass saved) per backward variant and
the forward alone ("fwd") per prepass / inverse variant (`--variants` picks a subset) at
`--sweep-shapes` (default (16, 2K) and (4, 8K)). `--inverse-accuracy`: only the CPU emulation of
the inverse's dot algorithms (T0 error vs a f64 solve).
`--breakdown`: each kernel alone at (16, 2K) (`--breakdown-shapes` for others), the new ones
(`gdn_dqkw`, `gdn_wy_bwd`, the state passes writing v'/dv') included; where the sequence is split
also each affine pass, the piece scan (rolled / unrolled) and the passes with the split reused.
The sequence-split levers of the backward (`SPLIT_VARIANTS`, each against the defaults
(`Tuning.bwd_split="reuse"`, `bwd_block_v=32`): `split_off` = one piece, `split_recompute` = the
backward before both levers, `split_recompute_bwdbv32` / `split_reuse_bwdbv0` = one lever off,
...) are --sweep variants timed "fwd+bwd" and "bwd" (each row records its piece count).
`--fla-subprocess`: FLA (`bench/fla_anchor.py`, one accuracy case, then the main-table and
--sweep shapes) in a child process before this one takes the GPU; its rows join ours as impl
"fla" and the JSON gets `ratios_vs_fla` (ours / FLA and FLA / ours per shape and mode); where
FLA cannot run (no torch / CUDA / fla) `fla_subprocess` says why. `--fla-site` puts the folder
the fla-core wheel was installed into on the child's path. `--quick-check`: the correctness
check for the defaults and the split levers only.
Split on vs off and FLA side by side at the three fwd+bwd shapes (one GPU call, ~4 min; `.whl/`
carried; add split_recompute_bwdbv32,split_reuse_bwdbv0 to --variants for each lever alone,
~1 min more):
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/fla_core-*.whl .whl/einops-*.whl; PYTHONUNBUFFERED=1 python3 bench/gated_delta.py \
    --skip-xla --skip-main --quick-check --sweep --sweep-shapes 16x2048,4x8192,1x32768 \
    --variants wy,split_off,split_recompute --fla-subprocess --fla-site /tmp/site \
    --out $OUT/gd_split.json
The split's parts alone (~2 min):
  python3 bench/gated_delta.py --skip-xla --skip-main --quick-check --breakdown \
    --breakdown-shapes 4x8192,1x32768 --out $OUT/gd_split_parts.json
CPU smoke of both (interpret mode, FLA refused with the reason recorded):
  python bench/gated_delta.py --smoke --skip-xla --skip-main --quick-check --sweep \
    --sweep-shapes 2x64,1x256 --variants wy,split_off,split_recompute,split_reuse_bwdbv0 \
    --breakdown --breakdown-shapes 1x256 --fla-subprocess --out /tmp/gd_smoke.json
The backward check + timing in one call:
  python3 bench/gated_delta.py --skip-xla --skip-main --sweep --breakdown --out $OUT/gd_bwd.json
Correctness of the defaults and variants, the goal shapes and the variants at (16, 2K) (~4 min):
  python3 bench/gated_delta.py --skip-xla --shapes 16x2048,4x8192,1x32768,1x65536 --no-pieces \
    --sweep --sweep-shapes 16x2048 --variants wy,wy_f32store,wy_bwdstate8,wy_bv128,wy_dqkw8,\
wy_bk32,wy_wy8,inv_plain,inv_tf32,inv_bf16x3,prepass_warps8 --breakdown --out $OUT/gd.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.gated_delta import gpu_common, gpu_triton, reference, xla_chunked  # noqa: E402

H, K, V, CHUNK = 8, 128, 128, 64
SHAPES = [(16, 2048, True), (1, 65536, False), (4, 8192, True), (1, 32768, True)]
SWEEP_SHAPES = [(16, 2048), (4, 8192)]
BREAKDOWN_SHAPES = None  # None: the first main-table shape
INTERPRET = False  # --smoke: tiny shapes in interpret mode on CPU (checks this script only)
QUICK_CHECK = False  # --quick-check: correctness of the defaults and the split levers only


def make_inputs(b, t, h=None, kd=None, vd=None, dtype=jnp.bfloat16, seed=0, shared=0.0):
  """Unit q, k; `shared` > 0 adds a direction common to all keys of a (batch, head) (pairwise
  key cosine ~ shared^2 / (shared^2 + (1 - shared)^2): the inverse's hard case)."""
  h, kd, vd = h or H, kd or K, vd or V
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (b, t, h, kd), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, h, kd), jnp.float32)
  if shared:
    base = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 99), (b, 1, h, kd))
    k = (shared * base / jnp.linalg.norm(base, axis=-1, keepdims=True)
         + (1 - shared) * k / jnp.linalg.norm(k, axis=-1, keepdims=True))
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, vd), jnp.float32)
  log_gamma = jax.nn.log_sigmoid(3.9 + jax.random.normal(ks[3], (b, t, h)))
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
  s0 = 0.1 * jax.random.normal(ks[5], (b, h, kd, vd), jnp.float32)
  return (q.astype(dtype), k.astype(dtype), v.astype(dtype), log_gamma, beta, s0)


def timeit(f, *args, inner=10, reps=7, warmup=3):
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / inner)
  return statistics.median(ts) * 1e3, first


def timed_row(results, save, row, measure):
  """Runs `measure() -> ms or (ms, first_call_s)`, records the row (or its error), saves."""
  try:
    got = measure()
    row["ms"], row["first_call_s"] = got if isinstance(got, tuple) else (got, None)
  except Exception as e:  # noqa: BLE001
    row["error"] = f"{type(e).__name__}: {e}"[:1500]
    traceback.print_exc()
  print(row, flush=True)
  results["rows"].append(row)
  save()


def pallas_fns(tuning=gpu_triton.DEFAULT_TUNING, pieces=None):
  fwd = jax.jit(lambda *a: gpu_triton.gated_delta_fwd(*a, chunk_size=CHUNK, pieces=pieces,
                                                      tuning=tuning, interpret=INTERPRET))

  @jax.jit
  def fwd_bwd(q, k, v, lg, beta, s0, do, dsT):  # what api's custom_vjp runs (prepass saved)
    o, sT, prepass = gpu_triton.gated_delta_fwd_residuals(
        q, k, v, lg, beta, s0, chunk_size=CHUNK, pieces=pieces, tuning=tuning,
        interpret=INTERPRET)
    grads = gpu_triton.gated_delta_bwd(q, k, v, lg, beta, s0, do, dsT, chunk_size=CHUNK,
                                       pieces=pieces, tuning=tuning, interpret=INTERPRET,
                                       prepass=prepass)
    return o, sT, grads
  return fwd, fwd_bwd


def pallas_bwd(tuning, inputs):
  """The backward alone (prepass saved by a forward run once here): (f, args) for `timeit`."""
  pre = jax.jit(functools.partial(gpu_triton.gated_delta_fwd_residuals, chunk_size=CHUNK,
                                  tuning=tuning, interpret=INTERPRET))(*inputs)[2]
  f = jax.jit(lambda *a, prepass: gpu_triton.gated_delta_bwd(
      *a, chunk_size=CHUNK, tuning=tuning, interpret=INTERPRET, prepass=prepass))
  return lambda *a: f(*a, prepass=pre)


def xla_fns():
  fwd = jax.jit(lambda *a: xla_chunked.gated_delta_fwd(*a, chunk_size=CHUNK))

  @jax.jit
  def fwd_bwd(q, k, v, lg, beta, s0, do, dsT):
    o, sT = xla_chunked.gated_delta_fwd(q, k, v, lg, beta, s0, chunk_size=CHUNK)
    grads = xla_chunked.gated_delta_bwd(q, k, v, lg, beta, s0, do, dsT, chunk_size=CHUNK)
    return o, sT, grads
  return fwd, fwd_bwd


def fla_fns():
  """FLA's `chunk_gated_delta_rule` through torch: `bench/fla_anchor.fla_fns` (no accuracy
  cases here; `run` is None when `fla` cannot run on this machine)."""
  from bench import fla_anchor
  return fla_anchor.fla_fns(cases=())


# ------------------------------------------------------------- inverse precision (CPU emulation)
# Interpret mode computes exact f32, so the GPU's reduced-precision dot algorithms of the doubling
# inverse (`gpu_triton.INVERSE_PRECISIONS`) are emulated here: a plain numpy replica of the
# doubling (`chunk_math.inverse_unit_lower`: x = I + N, p = N; 5 times p <- p p, x <- x + x p at
# C = 64) whose products round their operands the way each algorithm does and accumulate in f32;
# "<algo>_blocked16" is the blocked doubling (`Tuning.inverse_block=16`, the default).


def _round_mantissa(x, bits):
  """f32 -> f32 keeping `bits` explicit mantissa bits (round to nearest, ties away: cvt.rna)."""
  u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
  drop = 23 - bits
  u = ((u + (1 << (drop - 1))) >> drop) << drop
  return u.astype(np.uint32).view(np.float32)


def _emulated_dot(a, b, algo):
  """a @ b (f32) as the Triton lowering runs `algo` ("ieee", "tf32", "3xtf32", "bf16x3",
  "bf16x6"): split operands, f32-accumulated partial products, smallest first."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if algo == "ieee":
    return a @ b
  bits = 10 if "tf32" in algo else 7
  r = lambda x: _round_mantissa(x, bits)
  a0, b0 = r(a), r(b)
  if algo == "tf32":
    return a0 @ b0
  a1, b1 = r(a - a0), r(b - b0)
  terms = [(a1, b0), (a0, b1)]
  if algo == "bf16x6":
    a2, b2 = r(a - a0 - a1), r(b - b0 - b1)
    terms = [(a2, b0), (a0, b2), (a1, b1)] + terms
  acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
  for x, y in terms + [(a0, b0)]:
    acc = acc + x @ y
  return acc


def _doubling(a, dot):
  c = a.shape[0]
  return _doubling_from(np.eye(c, dtype=a.dtype) - a, -a, (c - 1).bit_length() - 1, dot)


def _blocked(a, dot, block=16):
  """The blocked doubling of `chunk_math.inverse_unit_lower` (Dots.inverse_block): doubling on
  the diagonal blocks (masked), then on M = Xd No across blocks; same number of products."""
  c = a.shape[0]
  blk = np.arange(c) // block
  same = blk[:, None] == blk[None, :]
  n = -a
  n_d = np.where(same, n, 0).astype(a.dtype)
  x_d = _doubling_from(np.eye(c, dtype=a.dtype) + n_d, n_d, (block - 1).bit_length() - 1, dot)
  m = dot(x_d, np.where(same, 0, n).astype(a.dtype))
  y = _doubling_from(np.eye(c, dtype=a.dtype) + m, m, (c // block - 1).bit_length() - 1, dot)
  return dot(y, x_d)


def _doubling_from(x, p, steps, dot):
  for _ in range(steps):
    p = dot(p, p)
    x = x + dot(x, p)
  return x


def inverse_accuracy(chunks=64, c=64, kd=128, seed=0):
  """Max |T0 - T0_f64| / max |T0_f64| (worst and median over `chunks` chunks) per emulated
  algorithm, for unit-norm keys (independent, and correlated: a shared direction plus noise)
  with beta ~ U(0, 1); A = strict_tril(beta K K^T) from bf16-rounded keys, as on the GPU."""
  rng = np.random.default_rng(seed)
  out = {}
  for kind, shared in (("independent", 0.0), ("shared_0.3", 0.3), ("shared_0.5", 0.5),
                       ("shared_0.7", 0.7)):
    errs = {a: [] for a in gpu_triton.INVERSE_PRECISIONS}
    errs["f64_doubling"] = []
    errs.update({f"{x}_blocked16": [] for x in ("ieee", "3xtf32", "tf32", "bf16x3")})
    growth = []
    for _ in range(chunks):
      base = rng.standard_normal(kd)
      k = shared * base / np.linalg.norm(base) + (1 - shared) * rng.standard_normal((c, kd)) / kd**0.5
      k = k / np.linalg.norm(k, axis=-1, keepdims=True)
      k = np.asarray(jnp.asarray(k, jnp.bfloat16).astype(jnp.float32))
      beta = rng.uniform(0.0, 1.0, (c, 1))
      a = np.tril(beta * (k @ k.T), -1).astype(np.float32)
      want = np.linalg.inv(np.eye(c) + a.astype(np.float64))  # exact-ish (f64 solve)
      growth.append(float(np.abs(want).max()))
      for algo in errs:
        if algo == "f64_doubling":
          got = _doubling(a.astype(np.float64), np.matmul)
        elif algo.endswith("_blocked16"):
          got = _blocked(a, functools.partial(_emulated_dot, algo=algo.split("_")[0]))
        else:
          got = _doubling(a, functools.partial(_emulated_dot, algo=algo))
        errs[algo].append(float(np.abs(got - want).max() / np.abs(want).max()))
    out[kind] = {"max_abs_T0": max(growth), "max_abs_A": float(np.abs(a).max()),
                 **{algo: {"worst": max(e), "median": float(np.median(e))}
                    for algo, e in errs.items()}}
    print(f"inverse accuracy ({kind} keys, C={c}, K={kd}): {out[kind]}", flush=True)
  return out


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(1e-30, np.max(np.abs(want))))


def correctness(results):
  """Compiled Pallas (each backward variant) vs the f32 sequential oracle and its autodiff."""
  names = ("o", "final_state", "dq", "dk", "dv", "dlog_gamma", "dbeta", "dinitial_state")
  out = {}
  T = gpu_triton.Tuning
  kv_small = min(64, K)
  configs = ((2, 380, jnp.float32, None, kv_small, 2e-3, 0.0),
             (2, 380, jnp.bfloat16, 3, K, 3e-2, 0.0),
             (1, 203, jnp.bfloat16, None, K, 3e-2, 0.0),
             (1, 203, jnp.bfloat16, None, K, 3e-2, 0.5))  # correlated keys
  if INTERPRET:
    configs = ((1, 90, jnp.float32, None, kv_small, 2e-3, 0.0),
               (1, 61, jnp.bfloat16, 2, K, 3e-2, 0.0), (1, 40, jnp.bfloat16, None, K, 3e-2, 0.0),
               (1, 40, jnp.bfloat16, None, K, 3e-2, 0.5))
  for b, t, dtype, pieces, kv, tol, shared in configs:
    inputs = make_inputs(b, t, kd=kv, vd=kv, dtype=dtype, seed=1, shared=shared)
    do = jax.random.normal(jax.random.key(7), (b, t, H, kv), jnp.float32)
    dsT = jax.random.normal(jax.random.key(8), (b, H, kv, kv), jnp.float32)
    f32_inputs = [x.astype(jnp.float32) for x in inputs]
    with jax.default_matmul_precision("highest"):
      want_out, vjp = jax.vjp(jax.jit(reference.gated_delta_sequential), *f32_inputs)
      want = tuple(want_out) + tuple(vjp((do, dsT)))
    variants = {"wy": T()}  # the defaults: states / dv' stored "auto" (bf16 for bf16 inputs)
    if shared:  # the plain doubling vs the blocked default on correlated keys (informative:
      variants = {"wy": T(), "fwd_inv_plain": T(inverse_block=0)}  # not in correctness_ok)
    if pieces is not None:
      variants["wy_f32store"] = T(states_dtype="float32", dv_dtype="float32")
      variants.update({n: SPLIT_VARIANTS[n] for n in (
          "split_recompute", "split_recompute_bwdbv32", "split_reuse_bwdbv0")})
    elif dtype != jnp.float32 and not shared:  # T0 recomputed in the backward; the inverse variants (forward)
      variants["wy_t0recompute"] = T(wy_t0="recompute")
      variants.update({f"fwd_{n}": t for n, t in INVERSE_VARIANTS.items()})
    if QUICK_CHECK:  # --quick-check: the defaults and the split levers only
      variants = {n: x for n, x in variants.items() if n == "wy" or n.startswith("split_")}
    for vname, tuning in variants.items():
      key = (f"B{b}_T{t}_H{H}_K{kv}V{kv}_{jnp.dtype(dtype).name}_pieces{pieces}"
             f"{f'_shared{shared}' if shared else ''}_{vname}")
      try:
        fwd, fwd_bwd = pallas_fns(tuning, pieces=pieces)
        if vname.startswith("fwd_"):  # forward only: o and the final state (one cheap compile)
          got = tuple(fwd(*inputs))
        else:
          o, sT, grads = fwd_bwd(*inputs, do, dsT)
          got = (o, sT) + tuple(grads)
        errs = {n: rel_err(g, w) for n, g, w in zip(names, got, want)}
        errs["ok"] = bool(max(errs.values()) < tol)
        out[key] = errs
      except Exception as e:  # noqa: BLE001
        out[key] = {"error": f"{type(e).__name__}: {e}"[:2000], "ok": False}
        traceback.print_exc()
      print(f"correctness {key}: {out[key]}", flush=True)
  results["correctness"] = out
  results["correctness_ok"] = all(v["ok"] for n, v in out.items()
                                  if not (n.endswith("inv_plain") and "shared" in n))
  print(f"correctness all ok: {results['correctness_ok']}", flush=True)


_T = gpu_triton.Tuning
# prepass / inverse variants ("fwd" rows in --sweep; correctness at one bf16 shape)
INVERSE_VARIANTS = {"inv_tf32": _T(inverse_precision="tf32"),
                    "inv_bf16x3": _T(inverse_precision="bf16x3"),
                    "inv_plain": _T(inverse_block=0)}
FWD_VARIANTS = {"fwd_default": _T(), **INVERSE_VARIANTS,
                "prepass_warps2": _T(prepass_warps=2), "prepass_warps8": _T(prepass_warps=8),
                "state_warps8": _T(state_warps=8)}


# the backward's sequence-split levers ("fwd+bwd" and "bwd" rows in --sweep; correctness at the
# forced-pieces shape): the split off (one piece: B*H*V/BV programs, chain NC chunks), more pieces
# than the default (min_programs 512), and against the defaults (the saved split,
# `Tuning.bwd_split="reuse"`, and the reverse pass's V block 32, `Tuning.bwd_block_v`; both since
# gated_delta_split_fla_h200.json, where this table's "wy" was split_recompute): the backward
# before both (split_recompute: the forward rerun per piece, the reverse pass at block_v), each
# lever off alone, and the piece scan unrolled (`Tuning.piece_scan_unroll`).
SPLIT_VARIANTS = {"split_off": _T(min_programs=0), "split_min512": _T(min_programs=512),
                  "split_recompute": _T(bwd_split="recompute", bwd_block_v=0),
                  "split_recompute_bwdbv32": _T(bwd_split="recompute"),
                  "split_reuse_bwdbv0": _T(bwd_block_v=0),
                  "split_unroll": _T(piece_scan_unroll=True)}


def sweep_variants():
  """Backward variants, most informative first (a run cut short keeps the earlier rows)."""
  T = gpu_triton.Tuning
  return {"wy": T(),
          "wy_f32store": T(states_dtype="float32", dv_dtype="float32"),
          "wy_bwdstate8": T(bwd_state_warps=8), "wy_bv128": T(block_v=128),
          "wy_dqkw8": T(dqkw_warps=8), "wy_bk32": T(block_k=32), "wy_bk128": T(block_k=128),
          "wy_warps8": T(dqkw_warps=8, wy_warps=8), "wy_wy8": T(wy_warps=8),
          "wy_t0recompute": T(wy_t0="recompute"), "wy_stages3": T(state_stages=3)}


def sweep(results, save, names=None):
  """fwd+bwd of the defaults, then the backward alone per variant (`names`: a subset of
  `sweep_variants`), at SWEEP_SHAPES."""
  variants = {**sweep_variants(), **SPLIT_VARIANTS, **FWD_VARIANTS}
  names = list(variants) if names is None else names
  unknown = [n for n in names if n not in variants]
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; pick from {list(variants)}")
  for b, t in SWEEP_SHAPES:
    inputs = make_inputs(b, t)
    do = jax.random.normal(jax.random.key(3), (b, t, H, V), jnp.float32)
    dsT = jax.random.normal(jax.random.key(4), (b, H, K, V), jnp.float32)
    jobs = ([(n, "fwd+bwd") for n in ("wy", *SPLIT_VARIANTS) if n in names]
            + [(n, "fwd" if n in FWD_VARIANTS else "bwd") for n in names])
    for name, mode in jobs:
      tuning = variants[name]
      row = {"impl": f"sweep:{name}", "B": b, "T": t, "mode": mode,
             "pieces": gpu_common.num_pieces(b, H, -(-t // CHUNK), K, V, None, tuning)}

      def measure(tuning=tuning, mode=mode):
        if mode == "fwd+bwd":
          return timeit(pallas_fns(tuning)[1], *inputs, do, dsT)
        if mode == "fwd":
          return timeit(pallas_fns(tuning)[0], *inputs)
        return timeit(pallas_bwd(tuning, inputs), *inputs, do, dsT)
      timed_row(results, save, row, measure)


def breakdown(results, save, shapes):
  """Per-kernel times at each of `shapes` (default: the first main shape): forward pieces, the
  backward's state passes (plain and writing v'/dv'), the prepass per inverse variant and
  `gdn_dqkw` / `gdn_wy_bwd`; where the sequence is split (P > 1 pieces) also the split's parts:
  each affine pass alone, the piece scan, and the passes with the split saved / A reused /
  the reverse pass at its V block before `Tuning.bwd_block_v` (block_v: `state_bwd_dv_bwdbv0`)."""
  for b, t in shapes:
    for name, (f, a) in _breakdown_parts(b, t).items():
      row = {"impl": f"part:{name}", "B": b, "T": t, "mode": "part"}
      timed_row(results, save, row, functools.partial(timeit, f, *a))


def _breakdown_parts(b, t):
  from pallas_kernels.gated_delta import gpu_backward as gb
  from pallas_kernels.gated_delta import gpu_forward as gf
  from pallas_kernels.gated_delta import gpu_triton as g
  q, k, v, lg, beta, s0 = make_inputs(b, t)
  tun, kw = g.DEFAULT_TUNING, dict(c=CHUNK, interpret=INTERPRET)
  qp, kp, vp, gc, bp, s0p = g._prepare(q, k, v, lg, beta, s0, CHUNK)
  pre = jax.jit(lambda k_, v_, b_, g_: gf.prepass(k_, v_, b_, g_, tuning=tun, **kw))
  pre_t0 = jax.jit(lambda k_, v_, b_, g_: gf.prepass(k_, v_, b_, g_, tuning=tun, with_t0=True,
                                                     **kw))
  w, u, t0 = pre_t0(kp, vp, bp, gc)
  do = jax.random.normal(jax.random.key(3), qp.shape[:3] + (V,), jnp.float32)
  dsT = jax.random.normal(jax.random.key(4), (b, H, K, V), jnp.float32)
  fwd_states = jax.jit(lambda *a: gf.forward_states(*a, pieces=None, save_states=True,
                                                    tuning=tun, with_v=True, **kw))
  bwd_states = jax.jit(lambda *a: gb.backward_states(*a, pieces=None, tuning=tun, with_dv=True,
                                                     **kw))
  _, _, states, vnew = fwd_states(qp, kp, w, u, gc, s0p)
  dstates, _, dvnew = bwd_states(qp, kp, w, do, gc, dsT)
  dqkw = jax.jit(lambda *a: gb.dqkw(*a, dq_dtype=q.dtype, tuning=tun, **kw))
  _, dkd, dw, _ = dqkw(qp, kp, gc, do, vnew, dvnew, states, dstates)
  dts = (q.dtype, k.dtype, v.dtype)
  pre_t0_with = lambda t: jax.jit(lambda k_, v_, b_, g_: gf.prepass(k_, v_, b_, g_, tuning=t,
                                                                    with_t0=True, **kw))
  parts = {
      "prepass": (pre, (kp, vp, bp, gc)),
      "prepass_t0": (pre_t0, (kp, vp, bp, gc)),
      "prepass_t0_plain_inverse": (pre_t0_with(tun._replace(inverse_block=0)), (kp, vp, bp, gc)),
      "prepass_t0_tf32": (pre_t0_with(tun._replace(inverse_precision="tf32")), (kp, vp, bp, gc)),
      "prepass_t0_warps8": (pre_t0_with(tun._replace(prepass_warps=8)), (kp, vp, bp, gc)),
      "state_fwd_output": (jax.jit(lambda *a: gf.forward_states(*a, pieces=None, save_states=False,
                                                                tuning=tun, **kw)),
                           (qp, kp, w, u, gc, s0p)),
      "state_fwd_states": (jax.jit(lambda *a: gf.forward_states(*a, pieces=None, save_states=True,
                                                                tuning=tun, **kw)),
                           (qp, kp, w, u, gc, s0p)),
      "state_fwd_states_v": (fwd_states, (qp, kp, w, u, gc, s0p)),
      "state_bwd": (jax.jit(lambda *a: gb.backward_states(*a, pieces=None, tuning=tun, **kw)),
                    (qp, kp, w, do, gc, dsT)),
      "state_bwd_dv": (bwd_states, (qp, kp, w, do, gc, dsT)),
      "state_bwd_dv_bwdbv0": (jax.jit(lambda *a: gb.backward_states(
          *a, pieces=None, tuning=tun._replace(bwd_block_v=0), with_dv=True, **kw)),
          (qp, kp, w, do, gc, dsT)),
      "dqkw": (dqkw, (qp, kp, gc, do, vnew, dvnew, states, dstates)),
      "wy_bwd": (jax.jit(lambda *a: gb.wy_bwd(*a, out_dtypes=dts, tuning=tun, **kw)),
                 (kp, vp, bp, gc, dvnew, dw, dkd, t0)),
      "wy_bwd_recompute_t0": (jax.jit(lambda *a: gb.wy_bwd(*a, None, out_dtypes=dts,
                                                           tuning=tun, **kw)),
                              (kp, vp, bp, gc, dvnew, dw, dkd)),
  }
  npieces = gpu_common.num_pieces(b, H, qp.shape[1] // CHUNK, K, V, None, tun)
  if npieces > 1:  # the split's parts
    zeros = jnp.zeros((b, H, npieces, K, V), jnp.float32)
    fwd_aff = jax.jit(lambda *a: gf.state_pass(*a, zeros, mode="affine", tuning=tun, **kw)[0])
    aug = fwd_aff(qp, kp, w, u, gc)
    split = (jax.jit(gpu_common.piece_starts)(aug, s0p), aug[..., V:])
    bwd_aff = lambda with_m: jax.jit(lambda *a: gb._state_bwd_pass(
        *a, zeros, mode="affine", tuning=tun, with_m=with_m, **kw)[0])
    parts.update({
        "split_fwd_affine": (fwd_aff, (qp, kp, w, u, gc)),
        "split_piece_scan": (jax.jit(gpu_common.piece_starts), (aug, s0p)),
        "split_piece_scan_unrolled": (jax.jit(functools.partial(gpu_common.piece_starts,
                                                                unroll=True)), (aug, s0p)),
        "split_bwd_affine_full": (bwd_aff(True), (qp, kp, w, do, gc)),
        "split_bwd_affine_v": (bwd_aff(False), (qp, kp, w, do, gc)),
        "split_fwd_states_v_saved": (jax.jit(lambda *a, sp: gf.forward_states(
            *a, pieces=None, save_states=True, tuning=tun, with_v=True, split=sp, **kw)),
            (qp, kp, w, u, gc, s0p)),
        "split_bwd_dv_reuse": (jax.jit(lambda *a, tr: gb.backward_states(
            *a, pieces=None, tuning=tun, with_dv=True, transition=tr, **kw)),
            (qp, kp, w, do, gc, dsT)),
    })
    f, a = parts["split_fwd_states_v_saved"]
    parts["split_fwd_states_v_saved"] = (functools.partial(f, sp=split), a)
    f, a = parts["split_bwd_dv_reuse"]
    parts["split_bwd_dv_reuse"] = (functools.partial(f, tr=split[1]), a)
  return parts


def fla_subprocess(results, save, shapes, site=None, timeout=300, anchor=None):
  """FLA through `bench/fla_anchor.py` in a child process (its own torch + Triton, the whole GPU:
  run before this process touches it), one accuracy case (bf16, K = V = 128, chunk 64) then fwd
  (and fwd+bwd for T <= 32K) at `shapes`; its rows join ours as impl "fla". `site`: a folder
  (e.g. where pip put the fla-core wheel) prepended to the child's PYTHONPATH. Never raises:
  why FLA did not run (no torch / CUDA / fla, a crash, a timeout) goes to results["fla_subprocess"].
  `anchor`: the script to run (default `bench/fla_anchor.py`; tests pass a stand-in)."""
  import subprocess
  import tempfile
  out = os.path.join(tempfile.mkdtemp(prefix="fla_sub_"), "fla.json")
  anchor = anchor or os.path.join(os.path.dirname(os.path.abspath(__file__)), "fla_anchor.py")
  cmd = [sys.executable, anchor, "--out", out, "--cases", "K128_bf16_chunk64", "--chunks", "64",
         "--shapes", ",".join(f"{b}x{t}" for b, t in shapes)]
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
  if site:
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
  rec = {"cmd": " ".join(cmd), "site": site}
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    rec["returncode"] = proc.returncode
    rec["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
  except subprocess.TimeoutExpired as e:
    rec["error"] = f"timed out after {timeout} s"
    rec["output_tail"] = str((e.stdout or b"")[-3000:])
  rec["wall_s"] = round(time.perf_counter() - t0, 1)
  if os.path.exists(out):
    with open(out) as f:
      child = json.load(f)
    rec["status"] = child.get("fla")
    for r in child.get("rows", []):
      results["rows"].append({**r, "source": "fla_subprocess"})
  if not any(r.get("source") == "fla_subprocess" and "ms" in r for r in results["rows"]):
    status = (rec.get("status") or {}).get("status") if isinstance(rec.get("status"), dict) else None
    rec.setdefault("error", f"no FLA timings: {status or 'child wrote no JSON'}")
  print(f"fla subprocess: {({k: v for k, v in rec.items() if k != 'output_tail'})}", flush=True)
  results["fla_subprocess"] = rec
  save()


def ratios_vs_fla(rows):
  """ours / FLA per (B, T, mode) for every timed row of ours (main table and --sweep fwd+bwd /
  fwd rows) that has an FLA row at the same shape and mode; `fla_speedup` = FLA ms / ours ms
  (the goal: >= 1.2)."""
  fla = {(r["B"], r["T"], r["mode"]): r["ms"] for r in rows if r.get("impl") == "fla" and "ms" in r}
  out = []
  for r in rows:
    key = (r["B"], r["T"], r["mode"])
    if r.get("impl") != "fla" and "ms" in r and key in fla:
      out.append({"impl": r["impl"], "B": r["B"], "T": r["T"], "mode": r["mode"], "ms": r["ms"],
                  "fla_ms": fla[key], "ours_over_fla": r["ms"] / fla[key],
                  "fla_speedup": fla[key] / r["ms"]})
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="bench/results/gated_delta.json")
  ap.add_argument("--skip-xla", action="store_true")
  ap.add_argument("--sweep", action="store_true", help="also time a few Pallas launch configs")
  ap.add_argument("--breakdown", action="store_true", help="also time the Pallas kernels alone")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
  ap.add_argument("--skip-main", action="store_true",
                  help="no main table (correctness, then --sweep / --breakdown only)")
  ap.add_argument("--variants", default=None,
                  help="--sweep: comma-separated subset of the backward variants")
  ap.add_argument("--inverse-accuracy", action="store_true",
                  help="only the CPU emulation of the inverse's dot algorithms (T0 error)")
  ap.add_argument("--sweep-shapes", default=None,
                  help="--sweep shapes as BxT,BxT (default 16x2048,4x8192)")
  ap.add_argument("--breakdown-shapes", default=None,
                  help="--breakdown shapes as BxT,BxT (default: the first main-table shape)")
  ap.add_argument("--no-pieces", action="store_true",
                  help="skip the forced sequence-split forward rows at the longest shape")
  ap.add_argument("--shapes", default=None,
                  help="main-table shapes as BxT,BxT (e.g. 16x2048,4x8192); default all")
  ap.add_argument("--quick-check", action="store_true",
                  help="correctness of the defaults and the split levers only (fewer compiles)")
  ap.add_argument("--fla-subprocess", action="store_true",
                  help="time FLA via bench/fla_anchor.py in a child process first (same call), "
                  "at the main-table and --sweep shapes; rows 'fla' + ours/FLA ratios in the JSON")
  ap.add_argument("--fla-timeout", type=float, default=300,
                  help="--fla-subprocess: seconds before the child is stopped (recorded)")
  ap.add_argument("--fla-site", default=None,
                  help="--fla-subprocess: a folder prepended to the child's PYTHONPATH (where "
                  "pip --target put the fla-core wheel)")
  args = ap.parse_args()
  global H, K, V, CHUNK, SHAPES, SWEEP_SHAPES, BREAKDOWN_SHAPES, INTERPRET, QUICK_CHECK
  QUICK_CHECK = args.quick_check
  if args.smoke:
    H, K, V, CHUNK, INTERPRET = 2, 16, 16, 16, True
    SHAPES = [(2, 64, True), (1, 65536 // 256, False)]
    SWEEP_SHAPES = [(2, 64)]
  def pairs(flag, text):
    try:
      return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]
    except ValueError:
      ap.error(f"{flag} {text!r}: expected BxT pairs separated by commas, e.g. 16x2048")
  if args.shapes:
    SHAPES = [(b, t, t <= 32768) for b, t in pairs("--shapes", args.shapes)]
  if args.sweep_shapes:
    SWEEP_SHAPES = pairs("--sweep-shapes", args.sweep_shapes)
  if args.breakdown_shapes:
    BREAKDOWN_SHAPES = pairs("--breakdown-shapes", args.breakdown_shapes)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  pre_rows = {"rows": []}
  if args.fla_subprocess and not args.inverse_accuracy:  # before this process takes the GPU
    fla_shapes = ([] if args.skip_main else [x[:2] for x in SHAPES]) + (
        SWEEP_SHAPES if args.sweep else [])
    fla_subprocess(pre_rows, lambda: None, list(dict.fromkeys(fla_shapes)), args.fla_site,
                   timeout=args.fla_timeout)
  dev = jax.devices()[0]
  results = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
             "jax": jax.__version__, "heads": H, "K": K, "V": V, "chunk": CHUNK,
             "dtype": "bfloat16", "timing": "median of 7 x (10 back-to-back calls)/10, ms",
             "rows": pre_rows["rows"]}
  if "fla_subprocess" in pre_rows:
    results["fla_subprocess"] = pre_rows["fla_subprocess"]

  def save():
    if any(r.get("impl") == "fla" for r in results["rows"]):
      results["ratios_vs_fla"] = ratios_vs_fla(results["rows"])
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)

  if args.inverse_accuracy:
    results["inverse_accuracy"] = inverse_accuracy()
    save()
    return

  correctness(results)
  save()
  if args.fla_subprocess:
    fla_run, results["fla"] = None, {"status": "timed in a child process: see fla_subprocess"}
  else:
    fla_run, fla_status = fla_fns()
    results["fla"] = fla_status
  impls = {"pallas": pallas_fns()}
  if not args.skip_xla:
    impls["xla_chunked"] = xla_fns()
  if args.sweep:
    sweep(results, save, args.variants.split(",") if args.variants else None)
  if args.breakdown:
    breakdown(results, save, BREAKDOWN_SHAPES or [SHAPES[0][:2]])
  for b, t, with_bwd in ([] if args.skip_main else SHAPES):
    inputs = make_inputs(b, t)
    do = jax.random.normal(jax.random.key(3), (b, t, H, V), jnp.float32)
    dsT = jnp.zeros((b, H, K, V), jnp.float32)
    modes = ["fwd", "fwd+bwd"] if with_bwd else ["fwd"]
    for mode in modes:
      for name, (fwd, fwd_bwd) in impls.items():
        if name == "xla_chunked" and t > 32768 and not INTERPRET:
          continue
        if name.startswith("pallas_") and (b, t) != SHAPES[0][:2]:
          continue
        row = {"impl": name, "B": b, "T": t, "mode": mode}
        f, a = (fwd, inputs) if mode == "fwd" else (fwd_bwd, inputs + (do, dsT))
        timed_row(results, save, row, functools.partial(timeit, f, *a))
      if fla_run is not None:
        row = {"impl": "fla", "B": b, "T": t, "mode": mode}
        timed_row(results, save, row, functools.partial(fla_run, inputs, mode != "fwd"))
    if (t == max(x[1] for x in SHAPES) and (t >= 32768 or INTERPRET)
        and not args.no_pieces):  # long-forward split
      for pieces in (8, 32, 64) if not INTERPRET else (1, 4):
        fwd, _ = pallas_fns(pieces=pieces)
        row = {"impl": f"pallas_pieces{pieces}", "B": b, "T": t, "mode": "fwd"}
        timed_row(results, save, row, functools.partial(timeit, fwd, *inputs))
  # table
  print(f"\n{'impl':<26}{'B':>4}{'T':>8}  {'mode':<8}{'ms':>10}")
  for r in results["rows"]:
    ms = f"{r['ms']:.3f}" if "ms" in r else "ERR"
    print(f"{r['impl']:<26}{r['B']:>4}{r['T']:>8}  {r['mode']:<8}{ms:>10}")
  print(f"correctness all ok: {results.get('correctness_ok')}")
  print(f"fla: {results['fla']}")
  for r in results.get("ratios_vs_fla", []):
    print(f"vs FLA {r['impl']:<26}{r['B']:>4}{r['T']:>8}  {r['mode']:<8} ours {r['ms']:.3f} ms, "
          f"FLA {r['fla_ms']:.3f} ms, FLA/ours {r['fla_speedup']:.2f}x")
  save()


if __name__ == "__main__":
  main()
