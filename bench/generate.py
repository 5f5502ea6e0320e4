"""Benchmark: generation (prefill and decode) of the 378M ATMA, ours and the original's engine.

  python3 bench/generate.py --out $OUT/generate.json            # one H200: both sides
  python3 bench/generate.py --smoke                              # CPU: tiny model, seconds
  python3 bench/generate.py --skip-ref --rows decode_b512_512 \
      --variant step_xla=model.mem_step_impl=xla --variant step_fused=model.mem_step_impl=pallas
                                      # the decode rows once per model variant, ROW[NAME]
                                      # (each decodes from the base config's prefill)

Ours: `configs/atma_378m` with bf16 parameters, embedding and activations, no window, random
weights (reference init + small noise: speed does not depend on the values), random prompt
ids; the path `atma_jax.generate.Generator` runs for `generate.py` (chunked prefill, then the
on-device decode loop, greedy sampling included). Measurements (the issue's four, and memory):

  decode_b1_2k     batch 1, 2,048-token context: tok/s of decode blocks of `--steps` tokens
  decode_b1_64k    batch 1, 65,536-token context
  decode_b512_512  batch 512, 512-token contexts
  prefill_1x64k    one 65,536-token prompt: latency of the prefill (one chunk; `--chunks` adds
                   chunked variants), from ids on device to last-token logits ready
  memory           decode-state bytes per sequence (the cache pytree / batch) and device peak

Each decode row: one block compiles and warms up, then `--reps` timed blocks (each `--steps`
tokens per row, the context growing by that much); tok/s = batch * steps / block time.

The original: `scripts/stress_inference.py` of the checkout at `--ref` (default `ref_atma/`),
canonical shape `--hidden-size 1024 --layers 16` (head_dim 128), one subprocess per row (as its
docstring asks), `--mode decode --batch B --context-length C` / `--mode prefill --batch 1
--prompt-length 65536`, `--warmup 2 --iterations --reps`. Its `--window` flag is an int
(default 1024) and cannot say "no window", so the subprocess wraps its `_make_model` to build
with `attn_window=None`. Its decode row times one CUDA-graph replay of one decode step plus the
LM head at a fixed context (its tok/s = batch / p50); its prefill row one forward + LM head.
No network on the GPU machine: a stub `kernels` module (whose `get_kernel` raises) goes first on
PYTHONPATH, so its causal-conv1d hub kernel falls back to its PyTorch/Triton path; which
backends it found (FLA, its Triton kernels) is recorded per row.

The original runs first, before JAX initializes (and preallocates) the GPU.

Bounds: each decode row records the bytes it must move per step (parameters once, plus per
sequence: the K/V read up to the context, the fp32 gated-delta state read and written) against
the device copy bandwidth measured here, and the FLOPs (2 x matmul parameters per token, plus
the attention over the context) against the bf16 matmul rate measured here; the prefill row
its FLOPs (matmuls + causal attention) against that rate. JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from atma_jax.config import resolve  # noqa: E402
from atma_jax.eval.forward import eval_graphdef  # noqa: E402
from atma_jax.eval.testing import noisy  # noqa: E402
from atma_jax.generate import Generator, SamplingParams  # noqa: E402
from atma_jax.generate.loop import model_steps  # noqa: E402
from atma_jax.model import Atma, layers  # noqa: E402

FULL = dict(decode=[("decode_b1_2k", 1, 2048), ("decode_b1_64k", 1, 65536),
                    ("decode_b512_512", 512, 512)],
            prefill=[("prefill_1x64k", 65536)])
SMOKE = dict(decode=[("decode_b1_2k", 1, 128), ("decode_b1_64k", 1, 512),
                     ("decode_b512_512", 8, 64)],
             prefill=[("prefill_1x64k", 512)])
REF_SHAPE = ["--hidden-size", "1024", "--layers", "16", "--head-dim", "128"]
BF16 = ["model.param_dtype=bfloat16", "model.embed_dtype=bfloat16",
        "model.compute_dtype=bfloat16"]


# ----------------------------------------------------------------------------- ours


def model_config(smoke: bool, impl: str | None, extra=()):
  overrides = list(BF16) + ([f"model.kernel_impl={impl}"] if impl else [])
  if smoke:
    overrides = [o for o in overrides if "dtype" not in o]  # tiny preset: fp32 on CPU
  return resolve("tiny" if smoke else "atma_378m", overrides + list(extra)).model


GEMM_ROWS = "layers.MIN_GEMM_ROWS="  # a variant token that sets atma_jax.model.layers' constant


def parse_variant(text: str) -> tuple[str, list[str]]:
  """"NAME=model.a=x,model.b=y" -> (NAME, ["model.a=x", "model.b=y"]); "NAME=" = no change.
  A token `layers.MIN_GEMM_ROWS=N` sets that constant while the variant's decode compiles."""
  name, sep, rest = text.partition("=")
  if not sep or not name or "[" in name:
    raise SystemExit(f"--variant {text!r}: write NAME=model.key=value[,model.key=value] (e.g. "
                     "step_xla=model.mem_step_impl=xla, gemv=layers.MIN_GEMM_ROWS=1), or NAME= "
                     "for the base config")
  tokens = [o for o in rest.split(",") if o]
  for o in tokens:
    if o.startswith(GEMM_ROWS) and not o[len(GEMM_ROWS):].isdigit():
      raise SystemExit(f"--variant {text!r}: {GEMM_ROWS}N takes a positive integer N")
  return name, tokens


def split_variant(tokens: list[str]) -> tuple[list[str], int | None]:
  """(the model overrides, the MIN_GEMM_ROWS the variant sets or None)."""
  rows = [int(o[len(GEMM_ROWS):]) for o in tokens if o.startswith(GEMM_ROWS)]
  return [o for o in tokens if not o.startswith(GEMM_ROWS)], (rows[-1] if rows else None)


# the model fields a --variant may change: how one-token decode runs, nothing in the prefill's
# results or the cache layout, so a variant decodes from the base config's prefill
DECODE_FIELDS = ("mem_step_impl", "decode_attn_kernel", "kernel_impl")


def check_variant(name: str, base, cfg) -> None:
  changed = [f.name for f in dataclasses.fields(base)
             if getattr(base, f.name) != getattr(cfg, f.name)]
  bad = [f for f in changed if f not in DECODE_FIELDS]
  if bad:
    raise SystemExit(f"--variant {name}: changes model.{', model.'.join(bad)}; a variant may "
                     f"change only model.{', model.'.join(DECODE_FIELDS)} (it decodes from the "
                     "base config's prefill)")


def build(smoke: bool, impl: str | None):
  cfg = model_config(smoke, impl)

  @jax.jit
  def make():
    params = nnx.split(Atma(cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]
    return noisy(params, jax.random.PRNGKey(1), 0.1)

  params = make()
  return cfg, eval_graphdef(cfg), params


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def matmul_params(params) -> int:
  """Parameters of every 2-D weight but the embedding table (a gather, not a matmul)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return int(sum(x.size for path, x in flat
                 if x.ndim == 2 and "embed" not in jax.tree_util.keystr(path)))


def device_peak() -> int | None:
  return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def median_call_s(f, x, reps: int) -> float:
  """Median wall seconds of f(x) to ready over `reps` calls, after one warm-up (compile) call."""
  f(x).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure_copy_bandwidth(smoke: bool) -> float:
  """Bytes read + written per second of a large on-device copy (the HBM ceiling we can see)."""
  n = (1 << 20) if smoke else (1 << 30)  # 4 GiB of fp32 on the GPU
  x = jnp.ones((n,), jnp.float32)
  return 2 * 4 * n / median_call_s(jax.jit(lambda a: a * 1.0001), x, reps=5)


def measure_matmul_flops(smoke: bool) -> float:
  """bf16 matmul FLOP/s (8192^3 on the GPU) after warm-up: the compute ceiling we can see."""
  n = 512 if smoke else 8192
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  return 2 * n ** 3 / median_call_s(jax.jit(lambda a: a @ a), a, reps=10)


def state_bytes_per_seq(cfg, context: int) -> dict[str, int]:
  """Bytes one decode step moves per sequence at `context` (analytic, from the config): K/V of
  every global layer read up to the context, the fp32 gated-delta state read and written."""
  glob = sum(cfg.is_global(l) for l in range(cfg.num_layers))
  act = jnp.dtype(cfg.compute_dtype).itemsize
  kv = glob * 2 * cfg.num_kv_heads * cfg.head_dim * context * act
  mem = glob * cfg.num_heads * cfg.head_dim * cfg.head_dim * 4 * 2 if cfg.mem_enabled else 0
  return {"kv_read": kv, "memory_state_read_write": mem}


def prompts_of(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, min(vocab, 50257), size=(batch, length)).tolist()


def timed_decode(gen: Generator, cfg, batch, context, steps, reps, spare_blocks=0,
                 prefill_gen: Generator | None = None):
  """Prefills `batch` random prompts of `context` tokens, decodes one block of `steps` tokens
  (compile and warm-up), then `reps` timed blocks; greedy, no stop token, the cache sized for
  `spare_blocks` more blocks after those. `prefill_gen` (default `gen`) runs the prefill (a
  variant that changes only how decode runs shares the base's compiled prefill).
  Returns (state, the last block's tokens [batch, steps], sampling, row fields)."""
  sampling = SamplingParams(temperature=0.0,
                            max_new_tokens=steps * (reps + 1 + spare_blocks) + 1)
  max_len = context + sampling.max_new_tokens
  t0 = time.perf_counter()
  state, first = (prefill_gen or gen).start(prompts_of(batch, context, cfg.vocab_size),
                                            sampling, max_len=max_len)
  first.block_until_ready()
  prefill_s = time.perf_counter() - t0
  cache_bytes = tree_bytes(state.cache)
  t0 = time.perf_counter()
  state, out = gen.decode_block(state, sampling, steps)
  out.block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, out = gen.decode_block(state, sampling, steps)
    out.block_until_ready()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return state, out, sampling, {
      "batch": batch, "context": context, "steps_per_block": steps,
      "cache_capacity_tokens": max_len, "prefill_incl_compile_s": prefill_s,
      "cache_bytes": cache_bytes, "first_block_incl_compile_s": compile_s,
      "block_seconds": times, "median_block_s": med, "tok_per_s": batch * steps / med,
      "device_peak_bytes": device_peak()}


def decode_row(gen: Generator, cfg, name, batch, context, steps, reps, ceilings, pbytes, mm,
               prefill_gen: Generator | None = None):
  """One decode row (`timed_decode`) with its memory and compute bounds."""
  # the rows are done only at the last step of the last block
  _, out, _, timed = timed_decode(gen, cfg, batch, context, steps, reps,
                                  prefill_gen=prefill_gen)
  times, med = timed["block_seconds"], timed["median_block_s"]
  toks = np.asarray(out)
  at_context = jax.eval_shape(lambda: gen.steps.init_cache(gen.cfg, 1, context))
  per_seq = state_bytes_per_seq(cfg, context + steps * reps // 2)
  step_bytes = pbytes + batch * sum(per_seq.values())
  mem_s = step_bytes / ceilings["copy_bytes_per_s"]
  glob = sum(cfg.is_global(l) for l in range(cfg.num_layers))
  flops = batch * (2 * mm + glob * 4 * (context + steps * reps // 2) * cfg.num_heads
                   * cfg.head_dim)  # matmuls + QK^T and PV over the context
  flop_s = flops / ceilings["matmul_flops_per_s"]
  return {
      "name": name, **timed,
      "tok_per_s_each_rep": [batch * steps / t for t in times],
      "ms_per_step": 1e3 * med / steps,
      "cache_bytes_per_sequence": timed["cache_bytes"] // batch,
      "state_bytes_per_sequence_at_context": tree_bytes(at_context),
      "all_tokens_in_vocab": bool(((toks >= 0) & (toks < cfg.vocab_size)).all()),
      "bound": {
          "bytes_per_step": step_bytes, "param_bytes": pbytes, "per_sequence_bytes": per_seq,
          "memory_floor_ms_per_step": 1e3 * mem_s, "flops_per_step": flops,
          "compute_floor_ms_per_step": 1e3 * flop_s,
          "tok_per_s_ceiling": batch / max(mem_s, flop_s),
          "binding": "memory bandwidth" if mem_s >= flop_s else "compute",
          "fraction_of_ceiling": (1e3 * max(mem_s, flop_s)) / (1e3 * med / steps)},
  }


def prefill_row(gen_for, cfg, name, length, chunk, reps, ceilings, mm):
  gen = gen_for(chunk)
  prompt = prompts_of(1, length, cfg.vocab_size)

  def once():
    cache = gen.steps.init_cache(gen.cfg, 1, length + 64)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    last, cache = gen.prefill(prompt, cache, length + 64)
    last.block_until_ready()
    return time.perf_counter() - t0, last

  first, last = once()
  times = [once()[0] for _ in range(reps)]
  glob = sum(cfg.is_global(l) for l in range(cfg.num_layers))
  flops = 2 * mm * length + glob * 2 * length * length * cfg.num_heads * cfg.head_dim
  med = statistics.median(times)
  return {"name": name, "length": length, "chunk": chunk, "seconds": times, "median_ms": 1e3 * med,
          "first_incl_compile_s": first, "tok_per_s": length / med,
          "logits_finite": bool(jnp.isfinite(last).all()), "device_peak_bytes": device_peak(),
          "bound": {"flops": flops, "flops_formula": "2 * matmul_params * T + n_global * 2 * T^2 * "
                    "H * head_dim (causal QK^T and PV)",
                    "compute_floor_ms": 1e3 * flops / ceilings["matmul_flops_per_s"],
                    "fraction_of_ceiling": flops / ceilings["matmul_flops_per_s"] / med}}


# ----------------------------------------------------------------------------- the original

REF_WRAPPER = """
import json, sys
sys.argv = ["stress_inference"] + json.loads(sys.argv[1])
import scripts.stress_inference as s
import inference.models.atma as m
import torch
print("REF_ENV " + json.dumps({
    "torch": torch.__version__, "fla": getattr(m, "_HAS_FLA", None),
    "fla_gated_delta_imported": getattr(m, "chunk_gated_delta_rule", None) is not None,
    "polar_triton": getattr(m, "HAS_TRITON", None),
    "gated_delta_step_kernel": getattr(m, "_HAS_STEP_KERNEL", None),
    "conv_step_kernel": getattr(m, "_HAS_CONV_STEP_KERNEL", None),
    "inference_ops_triton": getattr(m, "_HAS_INFERENCE_OPS", None),
    "causal_conv1d_hub_kernel": getattr(m, "causal_conv1d_fn", None) is not None}), flush=True)
make = s._make_model
def no_window(args):
    args.window = None
    return make(args)
s._make_model = no_window
s.main()
"""


def ref_rows(smoke_shapes: dict) -> list[tuple[str, list[str]]]:
  rows = [(name, ["--mode", "decode", "--batch", str(b), "--context-length", str(c)])
          for name, b, c in smoke_shapes["decode"]]
  rows += [(name, ["--mode", "prefill", "--batch", "1", "--prompt-length", str(n)])
           for name, n in smoke_shapes["prefill"]]
  return rows


def run_reference(ref_dir: str, python: str, shapes: dict, reps: int, timeout: int,
                  out: dict, write) -> dict:
  """Each row of the original's stress script in its own process; parsed JSON per row."""
  stub = tempfile.mkdtemp(prefix="kernels_stub_")
  os.makedirs(os.path.join(stub, "kernels"))
  with open(os.path.join(stub, "kernels", "__init__.py"), "w") as f:
    f.write("def get_kernel(*args, **kwargs):\n"
            "    raise RuntimeError('kernels hub stub: no network on this machine')\n")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([stub, os.path.abspath(ref_dir)]
                                      + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                         if p])
  env.pop("XLA_FLAGS", None)
  out.update({"repo": os.path.abspath(ref_dir), "python": python, "kernels_hub": "stubbed "
         "(get_kernel raises): causal-conv1d falls back to the original's own path",
         "window": "None (its _make_model wrapped; --window cannot express None)",
         "pythonpath": env["PYTHONPATH"], "rows": {}})
  for name, flags in ref_rows(shapes):
    argv = ["--warmup", "2", "--iterations", str(reps)] + REF_SHAPE + flags
    t0 = time.perf_counter()
    try:
      proc = subprocess.run([python, "-c", REF_WRAPPER, json.dumps(argv)], cwd=ref_dir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      out["rows"][name] = {"argv": argv, "error": f"timed out after {timeout}s"}
      continue
    row = {"argv": argv, "returncode": proc.returncode,
           "wall_s": round(time.perf_counter() - t0, 1)}
    for line in proc.stdout.splitlines():
      if line.startswith("REF_ENV "):
        row["backends"] = json.loads(line[len("REF_ENV "):])
      elif line.startswith("{"):
        row["result"] = json.loads(line)
    if "result" not in row:
      row["stderr_tail"] = proc.stderr[-3000:]
    out["rows"][name] = row
    write()
  return out


def reference_skip_reason(ref_dir: str, python: str) -> str | None:
  if not os.path.isfile(os.path.join(ref_dir, "scripts", "stress_inference.py")):
    return f"no checkout of the original at {ref_dir!r} (scripts/stress_inference.py missing)"
  probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
  if probe.returncode != 0:
    return f"{python} cannot import torch (pass --ref-python or set ATMA_TORCH_PYTHON)"
  if probe.stdout.strip() != "True":
    return "torch sees no CUDA device (the original's stress script requires CUDA)"
  return None


# ----------------------------------------------------------------------------- main


def versions() -> dict:
  import flax
  out = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
         "backend": jax.default_backend(),
         "device": getattr(jax.devices()[0], "device_kind", str(jax.devices()[0]))}
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=None, help="JSON path (default: print only)")
  ap.add_argument("--smoke", action="store_true", help="tiny model, short contexts, CPU")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--steps", type=int, default=None, help="decode tokens per timed block "
                  "(default 128; smoke 8)")
  ap.add_argument("--chunks", default=None, help="prefill chunk sizes (default: the whole "
                  "prompt in one chunk), comma-separated, e.g. 65536,8192")
  ap.add_argument("--impl", default=None, help="model.kernel_impl (default: the config's)")
  ap.add_argument("--variant", action="append", default=[], help="decode rows again under "
                  "NAME=model.key=value[,...] (repeatable; rows named ROW[NAME]), e.g. "
                  "step_xla=model.mem_step_impl=xla, attn_kernel=model.decode_attn_kernel=true; "
                  "NAME= names the base config. The base config's decode rows always run (first, "
                  "unnamed unless NAME= names them), then once per variant, each from the base "
                  "config's prefill (so a variant may change only "
                  f"{', '.join(DECODE_FIELDS)})")
  ap.add_argument("--rows", default=None, help="only these rows (comma-separated names, e.g. "
                  "decode_b512_512,decode_b1_2k; default all)")
  ap.add_argument("--ref", default="ref_atma", help="checkout of the original repository")
  ap.add_argument("--ref-python", default=None, help="Python with torch for the original "
                  "(default: $ATMA_TORCH_PYTHON, else this Python)")
  ap.add_argument("--ref-timeout", type=int, default=150, help="seconds per original's row")
  ap.add_argument("--skip-ours", action="store_true")
  ap.add_argument("--skip-ref", action="store_true")
  args = ap.parse_args(argv)
  shapes = SMOKE if args.smoke else FULL
  variants = [parse_variant(v) for v in args.variant]
  if not any(not tokens for _, tokens in variants):
    # the base rows always run, first: a variant row is read as a ratio against them (a call
    # that timed only the variants could not say what they changed)
    variants.insert(0, (None, []))
  for name, tokens in variants:  # before any compute: a bad variant is a one-line error
    if name is not None:
      check_variant(name, model_config(args.smoke, args.impl),
                    model_config(args.smoke, args.impl, split_variant(tokens)[0]))
  if args.rows:
    keep = set(args.rows.split(","))
    unknown = keep - {r[0] for rs in shapes.values() for r in rs}
    if unknown:
      raise SystemExit(f"--rows: unknown rows {sorted(unknown)}; pick from "
                       f"{[r[0] for rs in shapes.values() for r in rs]}")
    shapes = {k: [r for r in rs if r[0] in keep] for k, rs in shapes.items()}
  steps = args.steps or (8 if args.smoke else 128)
  reps = 2 if args.smoke and args.reps == 5 else args.reps
  report = {"benchmark": "generate", "smoke": args.smoke,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reps": reps, "steps_per_block": steps}

  def write():
    text = json.dumps(report, indent=2)
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        f.write(text)

  if not args.skip_ref:
    python = args.ref_python or os.environ.get("ATMA_TORCH_PYTHON") or sys.executable
    reason = reference_skip_reason(args.ref, python)
    if reason:
      report["original"] = {"skipped": reason}
      print(f"original skipped: {reason}", flush=True)
    else:  # first: JAX has not touched (preallocated) the GPU yet
      report["original"] = {}
      run_reference(args.ref, python, shapes, reps, args.ref_timeout, report["original"], write)
      for name, row in report["original"]["rows"].items():
        res = row.get("result", {})
        print(json.dumps({"original": name, "status": res.get("status", row.get("error")),
                          "tok_per_s": res.get("throughput_tok_s"),
                          "p50_ms": res.get("p50_ms")}), flush=True)
  if not args.skip_ours:
    report["versions"] = versions()
    cfg, graphdef, params = build(args.smoke, args.impl)
    ceilings = {"copy_bytes_per_s": measure_copy_bandwidth(args.smoke),
                "matmul_flops_per_s": measure_matmul_flops(args.smoke)}
    pbytes, mm = tree_bytes(params), matmul_params(params)
    ours = {"config": dataclasses.asdict(cfg), "param_count": int(sum(
        x.size for x in jax.tree.leaves(params))), "param_bytes": pbytes,
        "matmul_params": mm, "ceilings_measured_here": ceilings, "rows": {}}
    report["ours"] = ours
    gens = {}

    def gen_for(chunk, variant=None):
      if (chunk, variant) not in gens:
        v_cfg, v_graphdef = cfg, graphdef
        if variant is not None:
          v_cfg = model_config(args.smoke, args.impl, split_variant(dict(variants)[variant])[0])
          # only how it runs differs: the same parameter tree, the built params serve it
          v_graphdef = eval_graphdef(v_cfg)
        steps = None
        if variant is not None and split_variant(dict(variants)[variant])[1] is not None:
          # the decode loop's jit is keyed on (steps, graphdef), not on layers' constant: a
          # decode function of its own makes this variant trace (and compile) its own loop
          base = model_steps()
          steps = base._replace(decode=functools.partial(base.decode))
        gens[chunk, variant] = Generator(v_cfg, v_graphdef, params, prefill_chunk=chunk,
                                         steps=steps)
      return gens[chunk, variant]

    if args.variant:
      ours["variants"] = {name: overrides for name, overrides in variants if name is not None}
    for variant, tokens in variants:
      gemm_rows = split_variant(tokens)[1]
      for name, batch, context in shapes["decode"]:
        key = name if variant is None else f"{name}[{variant}]"
        default_rows = layers.MIN_GEMM_ROWS
        if gemm_rows is not None:  # read when the decode block traces, inside decode_row
          layers.MIN_GEMM_ROWS = gemm_rows
        try:
          ours["rows"][key] = decode_row(gen_for(4096, variant), cfg, key, batch, context, steps,
                                         reps, ceilings, pbytes, mm, prefill_gen=gen_for(4096))
        finally:
          layers.MIN_GEMM_ROWS = default_rows
        if gemm_rows is not None:
          ours["rows"][key]["min_gemm_rows"] = gemm_rows
        print(json.dumps({k: v for k, v in ours["rows"][key].items() if k in (
            "name", "tok_per_s", "ms_per_step", "cache_bytes_per_sequence")}), flush=True)
        write()
    for name, length in shapes["prefill"]:
      chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [length]
      for chunk in chunks:
        key = name if chunk == length else f"{name}_chunk{chunk}"
        ours["rows"][key] = prefill_row(gen_for, cfg, key, length, chunk, reps, ceilings, mm)
        print(json.dumps({k: v for k, v in ours["rows"][key].items()
                          if k in ("name", "median_ms", "chunk")}), flush=True)
        write()

  report["summary"] = summarize(report)
  write()
  print(json.dumps(report["summary"], indent=2))
  return 0


def summarize(report: dict) -> dict:
  """One line per measurement: ours vs the original (medians)."""
  out = {}
  ours = report.get("ours", {}).get("rows", {})
  ref = report.get("original", {}).get("rows", {})
  for name in list(ours) + [n for n in ref if n not in ours]:
    o, r = ours.get(name, {}), ref.get(name.split("[")[0], {}).get("result", {})
    if name.startswith("decode"):
      out[name] = {"ours_tok_per_s": o.get("tok_per_s"),
                   "original_tok_per_s": r.get("throughput_tok_s"),
                   "ours_state_bytes_per_sequence": o.get("state_bytes_per_sequence_at_context"),
                   "original_peak_allocated_gib": r.get("peak_allocated_gib")}
    else:
      out[name] = {"ours_ms": o.get("median_ms"), "original_p50_ms": r.get("p50_ms")}
  return out


if __name__ == "__main__":
  sys.exit(main())
