"""Benchmark: one batch-1 decode step's projections, as `layers.linear` runs them with a single
row left as is (MIN_GEMM_ROWS=1: XLA's GPU simplifier turns each into multiply + reduce) and
padded to two rows (MIN_GEMM_ROWS=2, the default since the H200 run in
bench/results/gemv_rows_h200.json: the dot stays a GEMM, 4.96x faster there).

  python3 bench/gemv_rows.py --out $OUT/gemv_rows.json         (GPU, 2.5 s of work; the call ~1 min)
  python3 bench/gemv_rows.py --smoke --out /tmp/gemv_rows.json  (CPU check)

The weights are every Linear kernel of the model (atma_378m in bf16; `tiny` with --smoke),
random, each applied once to a [1, 1, in] bf16 row: one "pass" is what a decode step's
projections read. A jit holds `--inner` passes in a fori_loop (the row is carried, so nothing
is hoisted); time per pass = median over `--reps` runs / inner. Both forms run in this one
process (the jit is traced again after the constant changes), and their outputs are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from atma_jax.config import resolve  # noqa: E402
from atma_jax.model import Atma, layers  # noqa: E402


def linear_shapes(preset: str) -> list[tuple[int, int]]:
  """(in, out) of every Linear kernel in the model, in parameter order."""
  cfg = resolve(preset, []).model
  model = nnx.eval_shape(lambda: Atma(cfg, rngs=nnx.Rngs(0)))
  shapes = []
  for _, node in nnx.iter_graph(model):
    if isinstance(node, layers.Linear):
      shapes.append((node.in_features, node.out_features))
  return shapes


def make_pass(weights, biases, inner: int):
  def one_pass(x_11D):
    acc = jnp.zeros((), jnp.float32)
    for w, b in zip(weights, biases):
      y = layers.linear(x_11D[..., :w.shape[0]], w, b)
      acc = acc + y[0, 0, 0].astype(jnp.float32)
    return acc

  @jax.jit
  def run(x_11D):
    def body(_, carry):
      x, total = carry
      s = one_pass(x)
      return x + (s * 1e-9).astype(x.dtype), total + s
    return jax.lax.fori_loop(0, inner, body, (x_11D, jnp.zeros((), jnp.float32)))[1]

  return run, jax.jit(lambda x: jnp.concatenate([layers.linear(x[..., :w.shape[0]], w, b)[0, 0]
                                           for w, b in zip(weights, biases)]))


def time_form(min_rows: int, weights, biases, x, inner: int, reps: int) -> dict:
  layers.MIN_GEMM_ROWS = min_rows
  jax.clear_caches()
  run, probe = make_pass(weights, biases, inner)
  t0 = time.perf_counter()
  jax.block_until_ready(run(x))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run(x))
    times.append(time.perf_counter() - t0)
  per_pass = statistics.median(times) / inner
  return {"min_gemm_rows": min_rows, "first_call_incl_compile_s": compile_s,
          "run_seconds": times, "us_per_pass": per_pass * 1e6, "probe": probe(x)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=None)
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--inner", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None)
  args = ap.parse_args(argv)
  preset = "tiny" if args.smoke else "atma_378m"
  inner = args.inner or (2 if args.smoke else 200)
  reps = args.reps or (2 if args.smoke else 7)
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  shapes = linear_shapes(preset)
  key = jax.random.PRNGKey(0)
  weights, biases = [], []
  for i, (d_in, d_out) in enumerate(shapes):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    w = jax.random.normal(k1, (d_in, d_out), jnp.float32) / d_in ** 0.5
    weights.append(w.astype(dtype))
    biases.append((jax.random.normal(k2, (d_out,), jnp.float32) * 0.01).astype(dtype))
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 1, max(s[0] for s in shapes)), jnp.float32)
  x = x.astype(dtype)
  weight_bytes = sum(w.size * w.dtype.itemsize for w in weights)
  forms, default_rows = {}, layers.MIN_GEMM_ROWS
  for name, rows in (("reduce_1row", 1), ("gemm_padded_2rows", 2)):
    forms[name] = time_form(rows, weights, biases, x, inner, reps)
    forms[name]["weight_GB_per_s"] = weight_bytes / forms[name]["us_per_pass"] / 1e3
  layers.MIN_GEMM_ROWS = default_rows
  diff = float(jnp.max(jnp.abs(forms["reduce_1row"].pop("probe").astype(jnp.float32)
                               - forms["gemm_padded_2rows"].pop("probe").astype(jnp.float32))))
  report = {"benchmark": "gemv_rows", "smoke": args.smoke, "preset": preset,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "versions": {"jax": jax.__version__, "python": platform.python_version()},
            "dtype": str(jnp.dtype(dtype)), "linear_count": len(shapes),
            "shapes_in_out": shapes, "weight_bytes": weight_bytes, "inner": inner, "reps": reps,
            "forms": forms, "max_abs_diff_outputs": diff,
            "speedup_padded_vs_reduce": forms["reduce_1row"]["us_per_pass"]
            / forms["gemm_padded_2rows"]["us_per_pass"]}
  for name, f in forms.items():
    print(f"{name:18s} {f['us_per_pass']:9.1f} us/pass  {f['weight_GB_per_s']:8.1f} GB/s")
  print(f"speedup {report['speedup_padded_vs_reduce']:.2f}x, max |diff| {diff:.2e}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
