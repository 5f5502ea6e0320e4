"""Benchmark: one decode token's attention over a KV cache, the forms `kv_cache` can take.

  python3 bench/decode_attention.py --out $OUT/decode_attention.json          (GPU, est. ~2 min)
  python3 bench/decode_attention.py --smoke --out /tmp/decode_attention.json  (CPU check)
  --parts gated_delta (or attention): only those rows

Rows (bf16, 8 query / 2 KV heads, head dim 128, one query row per sequence):
  xla_at        `cached.attention_stats_at` at per-row positions (what decode runs: the cache
                read as [B, S, G*D] at B > 1, per KV head at B = 1);
  xla_at_per_head / xla_at_folded  the same with `fold_gqa=False` / `True` (both forms, each
                batch size);
  pallas_offset the kernel op `attention_stats` with a traced uniform q_offset (the Triton
                split-K decode kernel on GPU; usable only when every row sits at one position);
  xla_offset    the same op on the XLA streaming backend.
plus the gated-delta decode step on the memory state [B, 8, 128, 128] fp32 (q/k/v in the
activation dtype, gates fp32), the state carried through the loop as decode carries it:
  gd_xla        `gated_delta_step(impl="xla")` (`xla_step.py`: the state read twice, written
                once; what decode runs by default);
  gd_oracle     the oracle's step in XLA (`reference.gated_delta_step`: the op's XLA backend
                before `xla_step.py`);
  gd_fused_bvN_wW the fused in-place kernel `gpu_step` (state read once, written once), V block
                N, W warps (GPU only; `gd_fused` = the op's `impl="pallas"`, automatic block);
each with its max abs difference to the oracle on random inputs and state in the same run (the
kernel in interpret mode under `--smoke`), and the state bytes moved per call (read + write);
the step does not depend on the cached length, so its rows sit on the first shape of each batch
size. Each timing is the median over `--reps` runs of one jit holding `--inner` calls in a
fori_loop (device time per call, no Python dispatch), divided by `--inner`. The numbers decide
whether decode should route uniform positions to the kernel ("measure before fusing", issue 11);
the cache bytes read per call are printed beside them (their ratio to the time is the achieved
bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.gated_delta import gated_delta_step, gpu_step, reference  # noqa: E402
from pallas_kernels.polar_attention import attention_stats, attention_stats_at  # noqa: E402

H, G, D = 8, 2, 128
SHAPES = ((1, 2048), (1, 65536), (8, 8192), (512, 1024))  # (sequences, cached positions)
SMOKE_SHAPES = ((1, 64), (4, 32))


def _inputs(B, S, dtype):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (B, 1, H, D), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, G, D), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, G, D), jnp.float32).astype(dtype)
  scale = jnp.full((B, 1, H), 1.0 / D ** 0.5, jnp.float32)
  return q, k, v, scale


def _timed(fn, args, inner, reps):
  """Median seconds per call of fn(*args) -> array, run `inner` times in one jitted loop."""

  @jax.jit
  def loop(*args):
    def body(i, acc):
      out = fn(*args, i)
      return acc + jnp.sum(out.astype(jnp.float32)) * 1e-9
    return jax.lax.fori_loop(0, inner, body, jnp.zeros((), jnp.float32))

  loop(*args).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    loop(*args).block_until_ready()
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def _timed_carry(step, s0, inner, reps):
  """Median seconds per call of `(o, s) = step(s)` with the state carried through a jitted
  loop of `inner` calls (updated in place where the form allows, as in the decode loop); every
  o is consumed (summed), so no form skips its output read."""

  @jax.jit
  def loop(s):
    def body(i, carry):
      o, s = step(carry[0])
      return s, carry[1] + jnp.sum(o)
    return jax.lax.fori_loop(0, inner, body, (s, jnp.zeros((), jnp.float32)))

  jax.block_until_ready(loop(s0))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(s0))
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def _gd_inputs(B, Kd, dtype):
  """Random step inputs: q, k unit-norm and v in `dtype` [B, H, Kd]; gates fp32; state fp32."""
  ks = jax.random.split(jax.random.key(1), 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], (B, H, Kd))).astype(dtype)
  k = unit(jax.random.normal(ks[1], (B, H, Kd))).astype(dtype)
  v = jax.random.normal(ks[2], (B, H, Kd)).astype(dtype)
  log_gamma = jnp.log(jax.random.uniform(ks[3], (B, H), minval=0.5, maxval=1.0))
  beta = jax.random.uniform(ks[4], (B, H))
  state = jax.random.normal(ks[5], (B, H, Kd, Kd), jnp.float32)
  return (q, k, v, log_gamma, beta), state


def gated_delta_forms(smoke: bool):
  """name -> step(q, k, v, log_gamma, beta, state) -> (o, state)."""
  forms = {"gd_xla": lambda *a: gated_delta_step(*a, impl="xla"),
           "gd_oracle": reference.gated_delta_step}
  if smoke:
    forms["gd_fused"] = lambda *a: gpu_step.gated_delta_step(*a, interpret=True)
  else:
    forms["gd_fused"] = lambda *a: gated_delta_step(*a, impl="pallas")
    for bv, warps in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8)):
      forms[f"gd_fused_bv{bv}_w{warps}"] = lambda *a, bv=bv, w=warps: gpu_step.gated_delta_step(
          *a, block_v=bv, num_warps=w)
  return forms


def gated_delta_row(B, smoke, dtype, inner, reps) -> dict:
  Kd = 16 if smoke else 128
  xs, state = _gd_inputs(B, Kd, dtype)
  o_ref, s_ref = reference.gated_delta_step(*xs, state)
  row = {"gd_state_bytes_per_call": 2 * B * H * Kd * Kd * 4, "gd_inputs_dtype":
         str(jnp.dtype(dtype)), "gd_auto_block_v": gpu_step.block_v_for(B, H, Kd)}
  for name, step in gated_delta_forms(smoke).items():
    try:
      o, s_new = jax.jit(step)(*xs, state)
      row[f"{name}_max_abs_diff"] = float(max(jnp.max(jnp.abs(o - o_ref)),
                                              jnp.max(jnp.abs(s_new - s_ref))))
      t = _timed_carry(lambda s, step=step: step(*xs, s), state, inner, reps)
    except Exception as e:  # noqa: BLE001 - a form that fails to compile is recorded, not fatal
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      continue
    row[f"{name}_us"] = 1e6 * t
    row[f"{name}_state_gb_per_s"] = row["gd_state_bytes_per_call"] / t / 1e9
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, XLA forms and the step "
                 "kernel in interpret mode (CPU)")
  p.add_argument("--reps", type=int, default=None, help="timed runs (default 5; smoke 2)")
  p.add_argument("--inner", type=int, default=None, help="calls per run (default 50; smoke 4)")
  p.add_argument("--parts", default="attention,gated_delta", help="which rows: attention, "
                 "gated_delta or both (comma-separated)")
  args = p.parse_args(argv)
  parts = set(args.parts.split(","))
  if not parts or parts - {"attention", "gated_delta"}:
    p.error(f"--parts {args.parts!r}: pick attention, gated_delta or attention,gated_delta")
  args.reps = args.reps or (2 if args.smoke else 5)
  args.inner = args.inner or (4 if args.smoke else 50)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  forms = (["xla_at", "xla_at_per_head", "xla_at_folded", "xla_offset"]
           + ([] if args.smoke else ["pallas_offset"]))
  if "attention" not in parts:
    forms = []
  rows = []
  result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "heads": [H, G, D], "dtype": str(jnp.dtype(dtype)), "rows": rows}
  for B, S in shapes:
    q, k, v, scale = _inputs(B, S, dtype)
    pos = S - 1  # the new token sits at the last cached position

    def xla_at(fold_gqa=None):
      def run(q, k, v, scale, i):
        q_pos = jnp.full((B, 1), pos, jnp.int32) - (i % 2)  # traced, as in decode
        k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        return attention_stats_at(q, k, v, scale, q_pos, k_pos, fold_gqa=fold_gqa)[0]
      return run

    def by_offset(impl):
      return lambda q, k, v, scale, i: attention_stats(
          q, k, v, scale, q_offset=jnp.int32(pos) - (i % 2), impl=impl)[0]

    fns = {"xla_at": xla_at(), "xla_at_per_head": xla_at(False), "xla_at_folded": xla_at(True),
           "xla_offset": by_offset("xla"), "pallas_offset": by_offset("pallas")}
    kv_bytes = 2 * B * S * G * D * jnp.dtype(dtype).itemsize
    row = {"batch": B, "cached": S, "kv_bytes": kv_bytes}
    want = fns["xla_at"](q, k, v, scale, 0) if forms else None
    for form in forms:
      got = fns[form](q, k, v, scale, 0)
      row[f"{form}_max_abs_diff"] = float(jnp.max(jnp.abs(got - want)))
      row[f"{form}_us"] = 1e6 * _timed(fns[form], (q, k, v, scale), args.inner, args.reps)
    if "gated_delta" in parts and all(r["batch"] != B for r in rows):
      row.update(gated_delta_row(B, args.smoke, dtype, args.inner, args.reps))
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
