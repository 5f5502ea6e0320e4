"""Where one decode step's device time goes: the 378M model's on-device decode block, profiled.

  python3 bench/profile_decode.py --rows decode_b1_2k --out $OUT/profile_decode_b1_2k.json
      # one GPU, one row per call: 108 s (default) and 117 s (off) per variant process on the
      # H200 at b1/2K (bench/results/profile_decode_b1_2k_h200.json)
  JAX_PLATFORMS=cpu python3 bench/profile_decode.py --smoke --out /tmp/pd.json   # CPU, minutes

The model, cache and decode loop are `bench/generate.py`'s (imported, not copied): atma_378m,
bf16, random weights, no window, random prompt ids; `Generator.start` prefills to the context,
`Generator.decode_block` runs `--steps` decode steps in one jitted `lax.while_loop`. Rows are
generate.py's decode rows (`--rows` picks some):

  decode_b1_2k     batch 1, 2,048-token context
  decode_b1_64k    batch 1, 65,536-token context
  decode_b512_512  batch 512, 512-token contexts

Per row: prefill, one block to compile and warm up, `--reps` timed blocks (wall time per step),
then ONE block captured under `jax.profiler.trace(..., create_perfetto_trace=True)` and parsed
by `bench/profile_train_step.py`'s functions: GPU-busy time per step (union of kernel intervals),
kernel launches per step, top kernels and categories per step, and the gap between the wall time
per step and the GPU-busy time per step (launch, host sync and idle overhead).

XLA command buffers (CUDA graphs) change the launch overhead, and XLA_FLAGS is read once when
the backend starts, so each flag variant runs in its own subprocess of this script
(`--flags-variant NAME`, internal) whose JSON the parent gathers:

  default      XLA_FLAGS without any command-buffer flag (jax's own defaults)
  off          --xla_gpu_enable_command_buffer=        (no CUDA graphs: kernels name their HLO op)
  while        FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL, graph min size 1
               (the whole while loop can become one graph)
  gemv_1row    jax's defaults, single-row matmuls left as one row (layers.MIN_GEMM_ROWS = 1, the
               old form XLA turns into multiply + reduce; the default pads them to two rows)

Every variant times every row; `--profile-in` says which also capture a trace (all by default:
the HLO map and the trace add seconds, the compiles dominate). A
variant whose process fails (an unknown XLA flag aborts it) is recorded with its error and the
others go on; `--smoke` adds a variant with a made-up flag to check exactly that. Output: one
JSON (`--out`: device, versions, shapes, every repetition; rewritten after each variant), the
traces beside it (`--save-traces`), and a printed table.

`--cost` instead compiles (nothing allocated, nothing run: abstract parameters and cache) the
decode block of each row on this process's backend and records, per decode step: XLA's
`cost_analysis()` bytes accessed and FLOPs (the while body counted once: the loop's trip count
is unknown, it stops early), the bytes an ideal step moves (derived from the config: the
parameters once, the K/V cache read over its capacity, the fp32 gated-delta state read and
written, the new K/V written, the logits written and read by the sampler), and the while body's
biggest ops by naive bytes (`bench/hlo_traffic.py`: what each op reads and writes, whether it
touches the K/V cache, the memory state or the weights, copies / transposes of either). The
cache capacity is bench/generate.py's for its default `--steps 128 --reps 5` (context + 769):

  JAX_PLATFORMS=cpu python3 bench/profile_decode.py --cost --out bench/results/decode_traffic_cpu.json
  JAX_PLATFORMS=cpu python3 bench/profile_decode.py --cost --smoke      # tiny model, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(1, BENCH)

import hlo_traffic  # noqa: E402  (imports no jax)
import profile_train_step as ptrace  # noqa: E402  (imports no jax at module level)

CB_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
VARIANTS = {
    "default": [],
    "off": ["--xla_gpu_enable_command_buffer="],
    "while": [f"--xla_gpu_enable_command_buffer={CB_ALL}", "--xla_gpu_graph_min_graph_size=1"],
    # single-row matmuls left as one row (atma_jax.model.layers.MIN_GEMM_ROWS; default 2)
    "gemv_1row": ["layers.MIN_GEMM_ROWS=1"],
}
MODEL_PATCH = "layers.MIN_GEMM_ROWS="  # not an XLA flag: bench/generate.py's --variant token
SMOKE_VARIANTS = {"unknown_flag": ["--xla_atma_no_such_flag=1"]}  # must fail, and be recorded
CB_FLAG_PREFIXES = ("--xla_gpu_enable_command_buffer", "--xla_gpu_graph_min_graph_size")
TOP = 40


def bench_generate():
  """bench/generate.py as a module (the top-level generate.py shadows the plain name)."""
  if "bench_generate" not in sys.modules:
    spec = importlib.util.spec_from_file_location("bench_generate",
                                                  os.path.join(BENCH, "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_generate"] = mod
    spec.loader.exec_module(mod)
  return sys.modules["bench_generate"]


def all_rows(smoke: bool) -> list[tuple[str, int, int]]:
  """(name, batch, context) of generate.py's decode rows (`FULL = dict(decode=[...])`), read
  from its text: the parent process imports no jax, whose GPU client would take the memory its
  children need."""
  import ast
  with open(os.path.join(BENCH, "generate.py")) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and getattr(node.targets[0], "id", None) == ("SMOKE" if smoke else "FULL")):
      decode = next(k.value for k in node.value.keywords if k.arg == "decode")
      return [tuple(r) for r in ast.literal_eval(decode)]
  raise RuntimeError("bench/generate.py defines no FULL / SMOKE decode rows")


def child_xla_flags(base: str, variant: list[str]) -> str:
  """`base` without command-buffer flags, plus the variant's."""
  kept = [f for f in base.split() if not f.startswith(CB_FLAG_PREFIXES)]
  return " ".join(kept + [f for f in variant if not f.startswith(MODEL_PATCH)])


# ----------------------------------------------------------------------------- per-step tables

def per_step(rows: list[dict], steps: int) -> list[dict]:
  """Summary table rows (count, total_ms per captured block) as per-step numbers."""
  return [{"name": r["name"], **({"category": r["category"]} if "category" in r else {}),
           "count_per_step": r["count"] / steps, "us_per_step": 1e3 * r["total_ms"] / steps,
           "share": r["share"]} for r in rows]


def step_profile(summary: dict, steps: int, wall_s_per_step: float,
                 traced_wall_s_per_step: float) -> dict:
  """Per-step view of a parsed trace of one block of `steps` decode steps."""
  out = {"kernel_source": summary.get("kernel_source"), "kernel_events": summary["kernel_events"],
         "launches_per_step": summary["kernel_events"] / steps,
         "from_device_kernels": summary.get("kernel_source") == "device streams"}
  if not out["from_device_kernels"]:
    out["note"] = ("no device kernel events in the trace (CPU, or kernels not reported): "
                   "'gpu_busy' and 'launches' below count the host's leaf XLA-op events")
  if summary.get("per_device"):
    busy_ms = summary["busy_ms_per_device_mean"]
    dev = next(iter(summary["per_device"].values()))
    out.update({
        "gpu_busy_us_per_step": 1e3 * busy_ms / steps,
        "kernel_span_us_per_step": 1e3 * dev["span_ms"] / steps,
        "kernel_us_summed_per_step": 1e3 * summary["kernel_ms_summed"] / steps,
        "wall_us_per_step": 1e6 * wall_s_per_step,
        "traced_wall_us_per_step": 1e6 * traced_wall_s_per_step,
        "gap_us_per_step": 1e6 * wall_s_per_step - 1e3 * busy_ms / steps,
        "gpu_busy_fraction_of_wall": (busy_ms / 1e3 / steps) / wall_s_per_step,
        "categories": per_step(summary["categories"], steps),
        "top_kernels": per_step(summary["top_kernels"], steps),
        "top_kernel_families": [dict(r, category=ptrace.category(r["name"])) for r in per_step(
            summary.get("top_kernel_families", []), steps)],
        "top_scopes": per_step(summary.get("top_scopes", [])[:TOP], steps)})
  return out


# ----------------------------------------------------------------------------- child: one variant

def profile_row(gen, cfg, name, batch, context, steps, reps, trace_dir, hlo_map: bool,
                save_to: str | None) -> dict:
  import jax
  import numpy as np
  bg = bench_generate()

  # generate.py's decode timing; the cache holds a spare block and the traced one after it
  state, _, sampling, timed = bg.timed_decode(gen, cfg, batch, context, steps, reps,
                                              spare_blocks=1 + (1 if trace_dir else 0))
  med = timed["median_block_s"]
  row = {"name": name, **timed, "wall_us_per_step": 1e6 * med / steps,
         "wall_us_per_step_each_rep": [1e6 * t / steps for t in timed["block_seconds"]]}
  if not trace_dir:
    return row
  hlo = {}
  if hlo_map:  # kernels -> HLO instruction -> JAX op_name (source scopes)
    t0 = time.perf_counter()
    try:
      hlo = ptrace.hlo_op_names(
          gen.lower_decode_block(state, sampling, steps).compile().as_text())
    except Exception as e:  # noqa: BLE001 - the map only adds scopes
      row["hlo_text_error"] = f"{type(e).__name__}: {e}"[:300]
    row["hlo_map_s"] = time.perf_counter() - t0
    row["hlo_instructions_mapped"] = len(hlo)
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    state, out = gen.decode_block(state, sampling, steps)
    out.block_until_ready()
    traced = time.perf_counter() - t0
  toks = np.asarray(out)
  row["traced_block_s"] = traced
  row["traced_block_tokens_per_row"] = int((toks >= 0).sum()) // batch  # steps if it ran them all
  trace = ptrace.find_trace(trace_dir)
  summary = ptrace.summarize(ptrace.load_events(trace), hlo, top=TOP)
  row["trace_file"] = trace
  row["trace_bytes"] = os.path.getsize(trace)
  if save_to:
    os.makedirs(os.path.dirname(save_to), exist_ok=True)
    shutil.copyfile(trace, save_to)
    row["trace_saved_as"] = save_to
  row["profile"] = step_profile(summary, steps, med / steps, traced / steps)
  row["trace_summary"] = {k: v for k, v in summary.items()
                          if k in ("device_processes", "device_tracks", "per_device",
                                   "kernel_arg_keys", "kernels_matched_to_hlo", "note",
                                   "host_top", "top_hlo_ops")}
  return row


def run_variant(args) -> int:
  """Internal mode: every row under this process's XLA_FLAGS; JSON to --child-out."""
  import jax
  from atma_jax.model import layers
  for token in VARIANTS.get(args.flags_variant, []):
    if token.startswith(MODEL_PATCH):
      layers.MIN_GEMM_ROWS = int(token[len(MODEL_PATCH):])
  bg = bench_generate()
  res = {"variant": args.flags_variant, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "pid": os.getpid(), "rows": {}}

  def write():
    with open(args.child_out, "w") as f:
      json.dump(res, f, indent=1, default=str)

  res["versions"] = bg.versions()
  res["devices"] = [str(d) for d in jax.devices()]
  write()
  t0 = time.perf_counter()
  cfg, graphdef, params = bg.build(args.smoke, args.impl)
  jax.block_until_ready(params)
  res["build_s"] = time.perf_counter() - t0
  res["param_bytes"] = bg.tree_bytes(params)
  res["model"] = {k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "num_heads",
                                                "num_kv_heads", "head_dim", "vocab_size",
                                                "compute_dtype", "param_dtype", "kernel_impl")
                  if hasattr(cfg, k)}
  gen = bg.Generator(cfg, graphdef, params, prefill_chunk=4096)  # as generate.py's decode rows
  profiled = args.flags_variant in args.profile_in
  for name, batch, context in args.row_list:
    trace_dir = (os.path.join(args.trace_dir, args.flags_variant, name) if profiled else None)
    save = (os.path.join(args.save_traces, f"{args.flags_variant}_{name}.json.gz")
            if profiled and args.save_traces else None)
    try:
      res["rows"][name] = profile_row(gen, cfg, name, batch, context, args.steps, args.reps,
                                      trace_dir, not args.no_hlo_map, save)
    except Exception as e:  # noqa: BLE001 - record, go on with the next row
      res["rows"][name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
      traceback.print_exc()
    print(json.dumps({"variant": args.flags_variant, "row": name,
                      "wall_us_per_step": res["rows"][name].get("wall_us_per_step"),
                      "gpu_busy_us_per_step": res["rows"][name].get("profile", {}).get(
                          "gpu_busy_us_per_step")}), flush=True)
    write()
  return 0


# ----------------------------------------------------------------------------- --cost

def ideal_step_bytes(cfg, batch: int, slots: int, context: int, param_bytes: int) -> dict:
  """Bytes one decode step must move (derived from the config, not measured): the parameters
  once (the tied / untied head reads its whole table; the embedding lookup B rows, not
  counted), the K/V cache read (over its `slots`, as the XLA core reads it, and over at most
  the `context` alone), the fp32 memory state read + written, the new K/V written, the logits
  written and read once (sampler)."""
  import jax.numpy as jnp
  glob = sum(cfg.is_global(l) for l in range(cfg.num_layers))
  act = jnp.dtype(cfg.compute_dtype).itemsize
  kv_token = glob * 2 * cfg.num_kv_heads * cfg.head_dim * act  # K and V of one token
  state = (glob * cfg.num_heads * cfg.head_dim * cfg.head_dim * 4) if cfg.mem_enabled else 0
  parts = {"params": param_bytes, "kv_read_slots": batch * slots * kv_token,
           "state_read_write": 2 * batch * state, "kv_append": batch * kv_token,
           "logits_write_read": 2 * batch * cfg.vocab_size * 4}
  total = sum(parts.values())
  return {"parts": parts, "total": total,
          "total_kv_at_context": (total - parts["kv_read_slots"]
                                  + batch * min(context, slots) * kv_token)}


def cost_row(cfg, graphdef, params, batch: int, context: int, capacity: int, steps: int,
             top: int) -> dict:
  """Compiles the decode block for abstract inputs; per-step traffic (see the docstring)."""
  import jax
  import jax.numpy as jnp
  from atma_jax.generate import Generator, SamplingParams
  from atma_jax.generate.loop import DecodeState
  from atma_jax.model.cache import init_cache
  bg = bench_generate()
  gen = Generator(cfg, graphdef, params)
  sampling = SamplingParams(temperature=0.0, max_new_tokens=capacity - context)
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, capacity))
  vec = lambda dt: jax.ShapeDtypeStruct((batch,), dt)  # noqa: E731
  state = DecodeState(cache, vec(jnp.int32), vec(jnp.bool_), vec(jnp.int32),
                      jax.ShapeDtypeStruct((), jnp.int32),
                      jax.eval_shape(lambda: jax.random.PRNGKey(0)))
  t0 = time.perf_counter()
  compiled = gen.lower_decode_block(state, sampling, steps).compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  pbytes = bg.tree_bytes(params)
  S = next((l.k_BSGd.shape[1] for l in cache.layers if hasattr(l, "k_BSGd")), capacity)
  ideal = ideal_step_bytes(cfg, batch, S, context, pbytes)
  kv_elems = {batch * S * cfg.num_kv_heads * cfg.head_dim}
  state_elems = {batch * cfg.num_heads * cfg.head_dim ** 2}
  weights = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim >= 2}
  ops = hlo_traffic.body_ops(compiled.as_text(), kv_elems=kv_elems, state_elems=state_elems,
                             weight_shapes=weights)
  accessed = float(ca.get("bytes accessed", float("nan")))
  body = hlo_traffic.summarize(ops, top)
  scatter = body["in_place_scatter_full_buffer_bytes"]
  return {"batch": batch, "context": context, "cache_capacity_tokens": capacity, "kv_slots": S,
          "compile_s": compile_s, "param_bytes": pbytes,
          "cost_analysis_per_step": {"bytes_accessed": accessed, "flops": ca.get("flops")},
          # the in-place K/V scatters counted by their updates, not their whole buffers
          "bytes_accessed_scatters_in_place": accessed - scatter,
          "ideal_per_step_derived": ideal,
          "bytes_accessed_over_ideal": accessed / ideal["total"],
          "bytes_accessed_scatters_in_place_over_ideal": (accessed - scatter) / ideal["total"],
          "hlo_while_body": body}


def run_cost(args) -> int:
  import dataclasses
  import jax
  from flax import nnx
  from atma_jax.model import Atma
  bg = bench_generate()
  variants = [(None, [])] + [bg.parse_variant(v) for v in args.variant]
  for name, tokens in variants[1:]:
    if bg.split_variant(tokens)[1] is not None:
      raise SystemExit(f"--variant {name}: {bg.GEMM_ROWS}N is bench/generate.py's token; a --cost "
                       "variant changes model fields only")
  # a bad variant fails before any compile; nothing is prefilled here, so a variant may change
  # any model field (e.g. model.attn_window=1024: the ring-buffer cache)
  cfgs = {name: bg.model_config(args.smoke, args.impl, overrides) for name, overrides in variants}
  try:
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
  except OSError:
    commit = None
  report = {"benchmark": "decode_traffic", "smoke": args.smoke, "backend": jax.default_backend(),
            "versions": bg.versions(), "git_commit": commit,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": dataclasses.asdict(bg.model_config(args.smoke, args.impl)),
            "decode_block_steps": args.steps,
            "capacity_rule": "context + steps * (reps + 1) + 1 (bench/generate.py's decode rows)",
            "note": ("bytes_accessed: XLA cost analysis of the compiled decode block, its while "
                     "body (one decode step) counted once; on CPU a proxy for the GPU (the CPU "
                     "backend upcasts / slices weights per step where the GPU fuses them). "
                     "ideal_per_step_derived: computed from the config, not measured. "
                     "bytes_accessed_scatters_in_place: the same with each in-place scatter "
                     "counted by its updates (the analysis counts its whole buffer twice). "
                     "hlo_while_body bytes: naive operand + result bytes per op."),
            "variants": {n: o for n, o in variants}, "rows": {}}

  def write():
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)

  for vname, _ in variants:
    cfg = cfgs[vname]
    graphdef = bg.eval_graphdef(cfg)
    params = jax.eval_shape(lambda c=cfg: nnx.split(Atma(c, rngs=nnx.Rngs(0)), nnx.Param)[1])
    for name, batch, context in args.row_list:
      key = name if vname is None else f"{name}[{vname}]"
      capacity = context + args.steps * (args.reps + 1) + 1
      row = cost_row(cfg, graphdef, params, batch, context, capacity, args.steps, TOP)
      report["rows"][key] = row
      by = row["hlo_while_body"]["by_touches"]
      mb = lambda x: f"{x / 1e6:10.1f} MB"  # noqa: E731
      print(f"{key:<24s} bytes accessed/step {mb(row['cost_analysis_per_step']['bytes_accessed'])}"
            f" (scatters in place: {mb(row['bytes_accessed_scatters_in_place'])})"
            f"  ideal {mb(row['ideal_per_step_derived']['total'])}"
            f"  ({row['bytes_accessed_scatters_in_place_over_ideal']:.2f}x)  naive by class: "
            + ", ".join(f"{k} {v['bytes'] / 1e6:.0f} MB" for k, v in sorted(by.items())),
            flush=True)
      write()
  if args.out:
    print("wrote", args.out)
  return 0


# ----------------------------------------------------------------------------- parent

def run_parent(args, variants: dict) -> dict:
  report = {"benchmark": "profile_decode", "smoke": args.smoke,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps_per_block": args.steps, "reps": args.reps,
            "rows": [dict(zip(("name", "batch", "context"), r)) for r in args.row_list],
            "profile_in": args.profile_in, "base_xla_flags": os.environ.get("XLA_FLAGS", ""),
            "variants": {}}

  def write():
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)

  for vname, flags in variants.items():
    env = dict(os.environ)
    env["XLA_FLAGS"] = child_xla_flags(env.get("XLA_FLAGS", ""), flags)
    fd, child_out = tempfile.mkstemp(prefix=f"profile_decode_{vname}_", suffix=".json")
    os.close(fd)
    os.remove(child_out)
    cmd = [sys.executable, os.path.abspath(__file__), "--flags-variant", vname,
           "--child-out", child_out, "--steps", str(args.steps), "--reps", str(args.reps),
           "--rows", ",".join(r[0] for r in args.row_list),
           "--profile-in", ",".join(args.profile_in), "--trace-dir", args.trace_dir]
    cmd += (["--smoke"] if args.smoke else []) + (["--impl", args.impl] if args.impl else [])
    cmd += (["--no-hlo-map"] if args.no_hlo_map else [])
    cmd += (["--save-traces", args.save_traces] if args.save_traces else [])
    entry = {"flags": flags, "xla_flags": env["XLA_FLAGS"], "command": cmd}
    print(f"variant {vname}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=args.variant_timeout)
      entry["returncode"] = proc.returncode
      stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
      entry["error"] = f"timed out after {args.variant_timeout}s"
      stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    entry["wall_s"] = round(time.perf_counter() - t0, 2)
    sys.stdout.write(stdout)
    if os.path.exists(child_out):
      with open(child_out) as f:
        entry["result"] = json.load(f)
      os.remove(child_out)
    if entry.get("returncode") not in (0, None) or "result" not in entry:
      entry.setdefault("error", f"exit code {entry.get('returncode')}")
      entry["stderr_tail"] = stderr[-3000:]
      print(f"variant {vname} failed: {entry['error']}: {stderr.strip()[-300:]}", flush=True)
    report["variants"][vname] = entry
    write()
  report["summary"] = summarize_variants(report)
  write()
  return report


def summarize_variants(report: dict) -> dict:
  """{row: {variant: wall / busy / launches / gap per step}}."""
  out = {}
  for r in report["rows"]:
    out[r["name"]] = {}
    for vname, v in report["variants"].items():
      row = v.get("result", {}).get("rows", {}).get(r["name"])
      if row is None or "error" in row:
        out[r["name"]][vname] = {"error": (row or {}).get("error", v.get("error", "no result"))}
        continue
      p = row.get("profile", {})
      out[r["name"]][vname] = {
          "wall_us_per_step": row["wall_us_per_step"], "tok_per_s": row["tok_per_s"],
          "gpu_busy_us_per_step": p.get("gpu_busy_us_per_step"),
          "launches_per_step": p.get("launches_per_step"),
          "gap_us_per_step": p.get("gap_us_per_step"),
          "from_device_kernels": p.get("from_device_kernels")}
  return out


def fmt(x, spec=".1f") -> str:
  return "-" if x is None else format(x, spec)


def print_table(report: dict) -> None:
  print("\nper decode step (median of the timed blocks; busy / launches from the traced block)")
  print(f"{'row':<17s} {'variant':<13s} {'wall us':>9s} {'busy us':>9s} {'gap us':>9s} "
        f"{'launches':>9s} {'tok/s':>11s}")
  for name, by_var in report["summary"].items():
    for vname, s in by_var.items():
      if "error" in s:
        print(f"{name:<17s} {vname:<13s} error: {s['error'][:70]}")
        continue
      print(f"{name:<17s} {vname:<13s} {fmt(s['wall_us_per_step']):>9s} "
            f"{fmt(s['gpu_busy_us_per_step']):>9s} {fmt(s['gap_us_per_step']):>9s} "
            f"{fmt(s['launches_per_step']):>9s} {fmt(s['tok_per_s'], ',.0f'):>11s}"
            + ("" if s["from_device_kernels"] in (True, None) else "  (host events)"))
  for vname, v in report["variants"].items():
    for name, row in v.get("result", {}).get("rows", {}).items():
      p = row.get("profile")
      if not p or "categories" not in p:
        continue
      print(f"\n{name} [{vname}]: busy {p['gpu_busy_us_per_step']:.1f} us/step of "
            f"{p['wall_us_per_step']:.1f} wall, {p['launches_per_step']:.1f} launches/step")
      for c in p["categories"]:
        print(f"  {100 * c['share']:6.2f}%  {c['us_per_step']:9.2f} us  "
              f"x{c['count_per_step']:<7.1f} {c['name']}")
      for title, key in (("top kernel families (instance numbers dropped)", "top_kernel_families"),
                         ("top kernels", "top_kernels")):
        print(f"  {title}:")
        for k in p[key][:10]:
          print(f"  {100 * k['share']:6.2f}%  {k['us_per_step']:9.2f} us  "
                f"x{k['count_per_step']:<7.1f} {k['category']:<20s} {k['name'][:70]}")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=None, help="JSON path (default: print only)")
  ap.add_argument("--smoke", action="store_true", help="tiny model, short contexts, CPU")
  ap.add_argument("--rows", default=None, help="comma-separated row names (default: all; "
                  "smoke: the first)")
  ap.add_argument("--variants", default=None, help=f"comma-separated of {sorted(VARIANTS)} "
                  "(default: all; --smoke adds unknown_flag)")
  ap.add_argument("--profile-in", default="default,off,while", help="variants that also "
                  "capture a trace (the others only time)")
  ap.add_argument("--steps", type=int, default=None, help="decode steps per block (default 16; "
                  "smoke 4)")
  ap.add_argument("--reps", type=int, default=None, help="timed blocks (default 5; smoke 2)")
  ap.add_argument("--impl", default=None, help="model.kernel_impl (default: the config's)")
  ap.add_argument("--variant-timeout", type=int, default=300, help="seconds per variant process")
  ap.add_argument("--trace-dir", default=None, help="raw traces (default: a new /tmp dir)")
  ap.add_argument("--save-traces", default=None, help="copy each trace here (default: "
                  "<out dir>/profile_decode_traces when --out is given; 'none' to skip)")
  ap.add_argument("--no-hlo-map", action="store_true", help="skip the HLO op_name map (one "
                  "lower+compile per profiled row) that gives source scopes")
  ap.add_argument("--cost", action="store_true", help="compile only: per-step bytes accessed "
                  "(XLA cost analysis) against the ideal, and the HLO's biggest ops")
  ap.add_argument("--variant", action="append", default=[], help="--cost: the rows again under "
                  "NAME=model.key=value[,...] (any model field, e.g. w1024=model.attn_window=1024)")
  ap.add_argument("--flags-variant", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.steps is not None and args.steps < 1 or args.reps is not None and args.reps < 1:
    ap.error("--steps and --reps must be >= 1")
  if args.variant and not args.cost:
    ap.error("--variant (model fields) is for --cost; --variants picks the XLA flag variants")
  if args.cost:  # bench/generate.py's defaults: the cache capacity of its decode rows
    args.steps = args.steps or (8 if args.smoke else 128)
    args.reps = args.reps or (2 if args.smoke else 5)
  args.steps = args.steps or (4 if args.smoke else 16)
  args.reps = args.reps or (2 if args.smoke else 5)
  rows = all_rows(args.smoke)
  if args.rows:
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in {n for n, _, _ in rows}]
    if unknown:
      ap.error(f"--rows: unknown {unknown}; pick from {[n for n, _, _ in rows]}")
    rows = [r for r in rows if r[0] in wanted]
  elif args.smoke and not args.cost:  # every row is the same code path; one keeps it short
    rows = rows[:1]
  args.row_list = rows
  known = dict(VARIANTS, **(SMOKE_VARIANTS if args.smoke else {}))
  names = ([v.strip() for v in args.variants.split(",") if v.strip()] if args.variants
           else list(known))
  bad = [v for v in names if v not in known]
  if bad:
    ap.error(f"--variants: unknown {bad}; pick from {sorted(known)}")
  args.variant_flags = {v: known[v] for v in names}
  args.profile_in = [v.strip() for v in args.profile_in.split(",") if v.strip()]
  bad = [v for v in args.profile_in if v not in known or v in SMOKE_VARIANTS]
  if bad:
    ap.error(f"--profile-in: unknown {bad}; pick from {sorted(known)}")
  if args.flags_variant and not args.child_out:
    ap.error("--flags-variant is internal: it needs --child-out")
  if args.trace_dir is None and not args.flags_variant:
    args.trace_dir = tempfile.mkdtemp(prefix="atma_decode_trace_")
  if args.save_traces is None and args.out and not args.flags_variant:
    args.save_traces = os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                    "profile_decode_traces")
  if args.save_traces == "none":
    args.save_traces = None
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.cost:
    return run_cost(args)
  if args.flags_variant:
    return run_variant(args)
  report = run_parent(args, args.variant_flags)
  print_table(report)
  if args.out:
    print("wrote", args.out)
  expected_fail = set(SMOKE_VARIANTS) if args.smoke else set()
  ok = [v for v, e in report["variants"].items() if "error" not in e]
  failed_unexpectedly = [v for v, e in report["variants"].items()
                         if "error" in e and v not in expected_fail]
  if args.smoke and any("error" not in report["variants"].get(v, {"error": 1})
                        for v in expected_fail):
    print("smoke: the unknown-flag variant did not fail: flag errors would go unnoticed")
    return 1
  return 0 if ok and not failed_unexpectedly else 1


if __name__ == "__main__":
  sys.exit(main())
