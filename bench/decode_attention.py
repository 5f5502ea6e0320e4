"""Benchmark: one decode token's attention over a KV cache, the forms `kv_cache` can take.

  python3 bench/decode_attention.py --out $OUT/decode_attention.json          (GPU, ~2 min)
  python3 bench/decode_attention.py --smoke --out /tmp/decode_attention.json  (CPU check)

Rows (bf16, 8 query / 2 KV heads, head dim 128, one query row per sequence):
  xla_at        `cached.attention_stats_at` at per-row positions (what decode runs today);
  pallas_offset the kernel op `attention_stats` with a traced uniform q_offset (the Triton
                split-K decode kernel on GPU; usable only when every row sits at one position);
  xla_offset    the same op on the XLA streaming backend.
plus `gated_delta_step` on the memory state [B, 8, 128, 128] fp32, beside a two-pass form of
the same step (state read twice, written once) that would replace it if faster. Each timing is the median
over `--reps` runs of one jit holding `--inner` calls in a fori_loop (device time per call, no
Python dispatch), divided by `--inner`. The numbers decide whether decode should route uniform
positions to the kernel ("measure before fusing", issue 11); the cache bytes read per call are
printed beside them (their ratio to the time is the achieved bandwidth).
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

from pallas_kernels.gated_delta import gated_delta_step  # noqa: E402
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


def _step_two_pass(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, s_BHKV):
  """The decode step with the state read twice and written once (a candidate, timed beside the
  op): [pred, r] = S^T [k, q] in one contraction, then o = gamma r + u (k.q) and
  S' = gamma S + k u^T, since S'^T q = gamma S^T q + u (k . q)."""
  hi = jax.lax.Precision.HIGHEST
  gamma_BH1 = jnp.exp(log_gamma_BH)[..., None]
  kq_BH2K = jnp.stack([k_BHK, q_BHK], axis=2)
  both_BH2V = jnp.einsum("bhkv,bhjk->bhjv", s_BHKV, kq_BH2K, precision=hi)
  u_BHV = beta_BH[..., None] * (v_BHV - gamma_BH1 * both_BH2V[:, :, 0])
  o_BHV = gamma_BH1 * both_BH2V[:, :, 1] + u_BHV * jnp.sum(k_BHK * q_BHK, -1, keepdims=True)
  return o_BHV, gamma_BH1[..., None] * s_BHKV + k_BHK[..., None] * u_BHV[..., None, :]


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


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, XLA only (CPU)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--inner", type=int, default=50)
  args = p.parse_args(argv)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  dtype = jnp.float32 if args.smoke else jnp.bfloat16
  forms = ["xla_at", "xla_offset"] + ([] if args.smoke else ["pallas_offset"])
  rows = []
  for B, S in shapes:
    q, k, v, scale = _inputs(B, S, dtype)
    pos = S - 1  # the new token sits at the last cached position

    def xla_at(q, k, v, scale, i):
      q_pos = jnp.full((B, 1), pos, jnp.int32) - (i % 2)  # traced, as in decode
      k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
      return attention_stats_at(q, k, v, scale, q_pos, k_pos)[0]

    def by_offset(impl):
      return lambda q, k, v, scale, i: attention_stats(
          q, k, v, scale, q_offset=jnp.int32(pos) - (i % 2), impl=impl)[0]

    fns = {"xla_at": xla_at, "xla_offset": by_offset("xla"), "pallas_offset": by_offset("pallas")}
    kv_bytes = 2 * B * S * G * D * jnp.dtype(dtype).itemsize
    row = {"batch": B, "cached": S, "kv_bytes": kv_bytes}
    want = fns["xla_at"](q, k, v, scale, 0)
    for form in forms:
      got = fns[form](q, k, v, scale, 0)
      row[f"{form}_max_abs_diff"] = float(jnp.max(jnp.abs(got - want)))
      row[f"{form}_us"] = 1e6 * _timed(fns[form], (q, k, v, scale), args.inner, args.reps)
    Kd = 16 if args.smoke else 128
    st = jnp.zeros((B, H, Kd, Kd), jnp.float32)
    qk = jax.random.normal(jax.random.key(1), (B, H, Kd), jnp.float32)
    gates = jnp.full((B, H), -0.02, jnp.float32), jnp.full((B, H), 0.5, jnp.float32)
    row["gated_delta_step_us"] = 1e6 * _timed(
        lambda st, qk, i: gated_delta_step(qk, qk, qk, *gates, st)[1], (st, qk), args.inner,
        args.reps)
    row["gated_delta_step_two_pass_us"] = 1e6 * _timed(
        lambda st, qk, i: _step_two_pass(qk, qk, qk, *gates, st)[1], (st, qk), args.inner,
        args.reps)
    o_ref, s_ref = gated_delta_step(qk, qk, qk, *gates, st + 0.01)
    o_two, s_two = _step_two_pass(qk, qk, qk, *gates, st + 0.01)
    row["two_pass_max_abs_diff"] = float(max(jnp.max(jnp.abs(o_ref - o_two)),
                                             jnp.max(jnp.abs(s_ref - s_two))))
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "heads": [H, G, D], "dtype": str(jnp.dtype(dtype)), "rows": rows}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
