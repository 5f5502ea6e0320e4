"""Where one train step's device time goes: a profiler trace of ONE step, parsed here.

Builds the same train step as `bench/train_throughput.py` (atma_378m at 2K, `--micro` sequences
per device per micro-step, `--n-micro` micro-steps, Muon + AdamW), compiles it once (AOT:
`lower().compile()`, whose `cost_analysis()` / `memory_analysis()` are recorded), runs warm-up
steps, then captures ONE step under `jax.profiler.trace(..., create_perfetto_trace=True)` and
parses the resulting `perfetto_trace.json.gz` (Chrome-trace JSON) itself:

  * device tracks = threads named `Stream ...` of the `/device:GPU:N` processes (else that
    process's `XLA Ops` line, else its non-derived lines); GPU-busy time = union of kernel
    intervals per device (overlapping streams counted once);
  * top kernels by total time (name, category, count, total ms, share of summed kernel time);
  * categories: matmul (cuBLAS / cutlass / nvjet / gemm fusions), pallas:<kernel> (our Triton
    kernels by name), fusion (XLA-generated), cudnn, collective (NCCL), copy (memcpy / memset /
    copy / dynamic-update-slice), other;
  * when kernels name their HLO instruction (`hlo_op` arg, or the kernel named after the fusion),
    the instruction's JAX `op_name` gives the phase (forward `jvp(`, backward `transpose(jvp(`,
    other = optimizer / accumulation) and the top source scopes.

A trace with host events only (CPU) yields the host summary and an empty device part. Output:
`<out-dir>/train_step_profile.json` (small) and a printed table; the raw trace stays in
`--trace-dir` (default /tmp).

    python3 bench/profile_train_step.py --out-dir $OUT/profile
    python3 bench/profile_train_step.py --parse TRACE_DIR_OR_FILE --out-dir /tmp/p   # parse only
    XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu \\
      python3 bench/profile_train_step.py --smoke --out-dir /tmp/p                    # CPU check
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAME_CHARS = 160  # names are cut to this length in the JSON
DERIVED_LINES = ("xla modules", "xla ops", "async xla ops", "steps", "tensorflow", "framework",
                 "source", "launch stats", "xla traceme", "python", "host threads")
CATEGORY_RULES = (  # first match wins; tested on the lower-cased kernel name + HLO kind
    ("collective", ("nccl", "all-reduce", "allreduce", "all_reduce", "reduce-scatter",
                    "reduce_scatter", "reducescatter", "all-gather", "all_gather", "allgather",
                    "collective", "all-to-all", "all_to_all", "sendrecv")),
    ("copy", ("memcpy", "memset", "copy", "dynamic-update-slice", "dynamic_update_slice")),
    ("pallas", ("polar_attention", "gdn_", "pallas", "xla.gpu.triton")),
    ("matmul", ("gemm", "cublas", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "matmul",
                "dot", "ynn_fusion")),
    ("cudnn", ("cudnn",)),
    ("fusion", ("fusion", "loop_", "input_", "reduce", "convert", "transpose", "slice",
                "concatenate", "broadcast", "select", "scatter", "gather", "iota", "pad",
                "wrapped_")),
)


# ----------------------------------------------------------------------------- trace loading

def find_trace(path: str) -> str:
  """The newest `perfetto_trace.json.gz` under `path` (or `path` itself when it is a file)."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"profile trace: {path!r} does not exist; pass the directory given to "
                            "jax.profiler.trace or the perfetto_trace.json.gz file itself.")
  found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
  if not found:
    raise FileNotFoundError(f"profile trace: no perfetto_trace.json.gz under {path!r}; capture "
                            "with jax.profiler.trace(dir, create_perfetto_trace=True).")
  return max(found, key=os.path.getmtime)


def load_events(trace_file: str) -> list[dict]:
  opener = gzip.open if trace_file.endswith(".gz") else open
  with opener(trace_file, "rt") as f:
    data = json.load(f)
  events = data.get("traceEvents", []) if isinstance(data, dict) else data
  if not isinstance(events, list):
    raise ValueError(f"profile trace {trace_file}: no traceEvents list (not Chrome-trace JSON)")
  return [e for e in events if isinstance(e, dict)]


# ----------------------------------------------------------------------------- HLO op names

def hlo_op_names(hlo_text: str) -> dict[str, dict]:
  """{normalized instruction name: {"op_name", "kind"}} from an optimized HLO module's text."""
  out = {}
  pat = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if not m:
      continue
    rest = m.group(2)
    op = re.search(r'op_name="([^"]*)"', rest)
    kind = re.search(r'custom_call_target="([^"]*)"', rest) or re.search(r"kind=(k\w+)", rest)
    if op or kind:
      out[norm(m.group(1))] = {"op_name": op.group(1) if op else "",
                               "kind": kind.group(1) if kind else ""}
  return out


def norm(name: str) -> str:
  return re.sub(r"[.\-]", "_", name.strip().lstrip("%").lower())


def phase_of(op_name: str) -> str:
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "other (optimizer, accumulation, outside grad)" if op_name else "unknown"


def scope_of(op_name: str) -> str:
  """The op_name (transforms / named scopes / primitive) without the outer jit prefix and the
  scan boilerplate."""
  s = op_name.split(";")[0]
  s = re.sub(r"^jit\([^)]*\)/", "", s)
  return s.replace("while/body/eval_jaxpr/", "").replace("while/body/", "")


def family(name: str) -> str:
  """A kernel name without its instance number (`wrapped_slice.15` -> `wrapped_slice`): the
  same op in every layer becomes one row."""
  return re.sub(r"(?:[._]\d+)+$", "", name)


def category(name: str, kind: str = "") -> str:
  key = f"{name} {kind}".lower()
  for cat, words in CATEGORY_RULES:
    if any(w in key for w in words):
      return f"pallas:{pallas_name(name)}" if cat == "pallas" else cat
  return "other"


def pallas_name(name: str) -> str:
  m = re.search(r"(polar_attention\w*|gdn_\w*)", name)
  return re.sub(r"_\d+$", "", m.group(1)) if m else name[:60]


# ----------------------------------------------------------------------------- summarizing

def _busy(intervals) -> float:
  """Length of the union of [start, end) intervals."""
  total, end = 0.0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def _table(groups: dict, total: float, top: int, extra=None) -> list[dict]:
  rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
  out = []
  for key, (count, dur) in rows:
    row = {"name": key[:NAME_CHARS], "count": count, "total_ms": round(dur / 1e3, 4),
           "share": round(dur / total, 4) if total else None}
    if extra:
      row.update(extra(key))
    out.append(row)
  return out


def device_tracks(events: list[dict]):
  """({pid: process name} of device processes, {pid: set of kernel tids}, all thread names)."""
  pname, tname = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      pname[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      tname[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  devs = {p: n for p, n in pname.items() if re.search(r"/device:(gpu|tpu)", n, re.I)}
  tracks = {}
  for p in devs:
    threads = {t: n for (pp, t), n in tname.items() if pp == p}
    streams = {t for t, n in threads.items() if n.lower().startswith("stream")}
    ops = {t for t, n in threads.items() if n.lower() == "xla ops"}
    rest = {t for t, n in threads.items() if not n.lower().startswith(DERIVED_LINES)}
    tracks[p] = streams or ops or rest
  return devs, tracks, tname


def hlo_op_of(args: dict) -> str:
  """The kernel's HLO instruction: the `hlo_op` arg, else `hlo_op=NAME` inside any string arg
  (a GPU kernel annotation such as `...:#hlo_op=fusion.3,hlo_module=jit_train_step#`)."""
  if args.get("hlo_op"):
    return str(args["hlo_op"])
  for v in args.values():
    m = re.search(r"hlo_op=([^,#\s]+)", v) if isinstance(v, str) else None
    if m:
      return m.group(1)
  return ""


def summarize(events: list[dict], hlo_ops: dict | None = None, top: int = 40) -> dict:
  """Compact summary of a Chrome-trace event list (see the module docstring)."""
  hlo_ops = hlo_ops or {}
  devs, tracks, tname = device_tracks(events)
  kern = [e for e in events if e.get("ph") == "X" and e.get("pid") in tracks
          and e.get("tid") in tracks[e.get("pid")] and isinstance(e.get("dur"), (int, float))]
  out: dict = {"events_total": len(events), "device_processes": sorted(devs.values()),
               "device_tracks": sorted({tname.get((e["pid"], e["tid"]), str(e["tid"]))
                                        for e in kern}),
               "kernel_events": len(kern),
               "device_threads": sorted({n for (p, _), n in tname.items() if p in devs})[:40]}
  out["kernel_source"] = "device streams"
  if not kern:  # CPU: the XLA ops run as host events carrying an `hlo_op` arg
    out["note"] = ("no device kernel events (a CPU trace has host events only): the tables "
                   "below are the host's leaf XLA-op events")
    out["host_top"] = host_top(events, min(top, 15))
    kern = host_ops(events)
    out["kernel_source"] = "host XLA-op events (leaves)"
    out["kernel_events"] = len(kern)
    devs = {e["pid"]: str(e["pid"]) for e in kern}
    devs.update({e.get("pid"): str(e.get("args", {}).get("name")) for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"
                 and e.get("pid") in devs})
  arg_keys = collections.Counter(k for e in kern for k in (e.get("args") or {}))
  out["kernel_arg_keys"] = dict(arg_keys.most_common(20))
  if not kern:
    return out
  per_dev = {}
  for p, n in devs.items():
    iv = [(e["ts"], e["ts"] + e["dur"]) for e in kern if e["pid"] == p]
    if iv:
      per_dev[n] = {"busy_ms": round(_busy(iv) / 1e3, 4),
                    "span_ms": round((max(b for _, b in iv) - min(a for a, _ in iv)) / 1e3, 4),
                    "kernels": len(iv)}
  out["per_device"] = per_dev
  n_dev = max(len(per_dev), 1)
  out["busy_ms_per_device_mean"] = round(sum(d["busy_ms"] for d in per_dev.values()) / n_dev, 4)
  total = float(sum(e["dur"] for e in kern))
  out["kernel_ms_summed"] = round(total / 1e3, 4)
  by_name, by_family, by_cat, by_op, by_phase, by_scope = (
      collections.defaultdict(lambda: [0, 0.0]) for _ in range(6))
  cat_of, matched = {}, 0
  for e in kern:
    name = str(e.get("name", ""))
    args = e.get("args") or {}
    hop = hlo_op_of(args)
    op = norm(hop) or norm(name)
    info = hlo_ops.get(op)
    cat = category(name, info["kind"] if info else "")
    cat_of.setdefault(name, cat)
    for table, key in ((by_name, name), (by_family, family(name)), (by_cat, cat)):
      table[key][0] += 1
      table[key][1] += e["dur"]
    if hop:
      by_op[hop][0] += 1
      by_op[hop][1] += e["dur"]
    op_name = info["op_name"] if info else str(args.get("tf_op", args.get("long_name", "")))
    if info:
      matched += 1
    for table, key in ((by_phase, phase_of(op_name)), (by_scope, scope_of(op_name) or "?")):
      table[key][0] += 1
      table[key][1] += e["dur"]
  out["categories"] = _table(by_cat, total, 100)
  out["top_kernels"] = _table(by_name, total, top, lambda k: {"category": cat_of[k]})
  out["top_kernel_families"] = _table(by_family, total, top)
  if by_op:
    out["top_hlo_ops"] = _table(by_op, total, top)
  out["kernels_matched_to_hlo"] = matched
  out["phases"] = _table(by_phase, total, 10)
  out["top_scopes"] = _table(by_scope, total, top)
  return out


def host_ops(events: list[dict]) -> list[dict]:
  """Host events naming an HLO op that contain no other such event on their thread (a `while`
  thunk encloses its body's ops: keeping only leaves counts each moment once)."""
  ops = sorted((e for e in events if e.get("ph") == "X" and isinstance(e.get("dur"), (int, float))
                and (e.get("args") or {}).get("hlo_op")),
               key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"]))
  leaves = []
  for i, e in enumerate(ops):
    nxt = ops[i + 1] if i + 1 < len(ops) else None
    parent = (nxt is not None and (nxt.get("pid"), nxt.get("tid")) == (e.get("pid"), e.get("tid"))
              and nxt["ts"] < e["ts"] + e["dur"])
    if not parent:
      leaves.append(e)
  return leaves


def host_top(events: list[dict], top: int) -> list[dict]:
  """Host events by total duration (nested events overlap: not additive)."""
  by = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    if e.get("ph") == "X" and isinstance(e.get("dur"), (int, float)):
      by[str(e.get("name", ""))][0] += 1
      by[str(e.get("name", ""))][1] += e["dur"]
  return _table(by, 0.0, top)


def print_summary(s: dict) -> None:
  print(f"trace: {s.get('trace_file')}  events {s['events_total']}  kernel events "
        f"{s['kernel_events']}  tracks {s['device_tracks'][:6]}")
  if not s["kernel_events"]:
    print(s.get("note", ""))
    for r in s.get("host_top", [])[:15]:
      print(f"  host {r['total_ms']:10.3f} ms  x{r['count']:<5d} {r['name'][:90]}")
    return
  for n, d in s["per_device"].items():
    print(f"{n}: busy {d['busy_ms']:.2f} ms of a {d['span_ms']:.2f} ms span, "
          f"{d['kernels']} kernels")
  print(f"summed kernel time {s['kernel_ms_summed']:.2f} ms; by category:")
  for r in s["categories"]:
    print(f"  {r['share'] * 100:6.2f}%  {r['total_ms']:10.3f} ms  x{r['count']:<6d} {r['name']}")
  print("by phase (from the kernels' HLO op_name):")
  for r in s["phases"]:
    print(f"  {r['share'] * 100:6.2f}%  {r['total_ms']:10.3f} ms  x{r['count']:<6d} {r['name']}")
  print("top kernels:")
  for r in s["top_kernels"]:
    print(f"  {r['share'] * 100:6.2f}%  {r['total_ms']:10.3f} ms  x{r['count']:<6d} "
          f"{r['category']:<28s} {r['name'][:80]}")
  print("top source scopes:")
  for r in s["top_scopes"][:25]:
    print(f"  {r['share'] * 100:6.2f}%  {r['total_ms']:10.3f} ms  x{r['count']:<6d} "
          f"{r['name'][:100]}")


# ----------------------------------------------------------------------------- running

def cost_summary(compiled) -> dict:
  """Whole-program numbers of `compiled.cost_analysis()` / `memory_analysis()` (no per-operand
  entries: those are keyed by operand index, not by op)."""
  out = {}
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out["cost_analysis"] = {k: v for k, v in (ca or {}).items()
                            if not re.search(r"\d", k) and isinstance(v, (int, float))}
  except Exception as e:  # noqa: BLE001 - optional
    out["cost_analysis_error"] = f"{type(e).__name__}: {e}"[:300]
  try:
    ma = compiled.memory_analysis()
    out["memory_analysis"] = {k: getattr(ma, k) for k in dir(ma)
                              if k.endswith("_in_bytes") and isinstance(getattr(ma, k), int)}
  except Exception as e:  # noqa: BLE001 - optional
    out["memory_analysis_error"] = f"{type(e).__name__}: {e}"[:300]
  return out


def profile_step(args) -> dict:
  import jax
  from atma_jax.sharding import use_mesh
  from train_throughput import SMOKE_SETS, build, variant_sets
  from atma_jax.summary import count_params
  from atma_jax.train.metrics import flops_per_token

  sets = variant_sets(args.micro, args.devices, args.n_micro, args.remat, args.impl,
                      args.seq_len) + (SMOKE_SETS if args.smoke else []) + args.extra
  res: dict = {"preset": args.preset, "overrides": sets, "devices": args.devices,
               "device": getattr(jax.devices()[0], "device_kind", "?"), "jax": jax.__version__}
  cfg, mesh, setup, state, step, batch = build(args.preset, sets, args.devices)
  res["flops_per_token"] = flops_per_token(count_params(cfg.model), cfg.model.num_layers,
                                           cfg.model.hidden_size, cfg.train.seq_len)
  res["tokens_per_step"] = cfg.train.global_batch * cfg.train.seq_len
  t0 = time.perf_counter()
  with use_mesh(mesh):
    compiled = step.jitted.lower(state, batch).compile()
  res["compile_s"] = time.perf_counter() - t0
  res.update(cost_summary(compiled))
  hlo = {}
  try:
    hlo = hlo_op_names(compiled.as_text())
  except Exception as e:  # noqa: BLE001 - the op map only adds phases and scopes
    res["hlo_text_error"] = f"{type(e).__name__}: {e}"[:300]
  res["hlo_instructions_mapped"] = len(hlo)

  def run(st):
    with use_mesh(mesh):
      st, m = compiled(st, batch)
    jax.block_until_ready((st, m))
    return st, m

  walls = []
  for _ in range(args.warmup):
    t0 = time.perf_counter()
    state, m = run(state)
    walls.append(time.perf_counter() - t0)
  res["warmup_step_s"] = walls
  with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    with jax.profiler.StepTraceAnnotation("train_step", step_num=args.warmup):
      state, m = run(state)
    res["traced_step_wall_s"] = time.perf_counter() - t0
  res["loss"] = float(m["loss"])
  return res, hlo


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="atma_378m")
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--micro", type=int, default=16, help="micro-batch per device")
  ap.add_argument("--n-micro", type=int, default=4)
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--impl", default="auto")
  ap.add_argument("--remat", default="false")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--top", type=int, default=40)
  ap.add_argument("--set", dest="extra", action="append", default=[])
  ap.add_argument("--trace-dir", default="/tmp/atma_train_step_trace")
  ap.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp/atma_profile"))
  ap.add_argument("--compile-cache", "--cache-dir", dest="compile_cache", default="auto",
                  metavar="DIR|off|auto", help="JAX's persistent compilation cache (default "
                  "auto: $ATMA_COMPILE_CACHE or ~/.cache/atma_jax/jax_cache)")
  ap.add_argument("--parse", default=None, help="only parse this trace dir / file")
  ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, seq 64, micro 2")
  ap.add_argument("--command-buffers", action="store_true",
                  help="keep XLA's CUDA-graph command buffers (off by default here: inside one, "
                  "kernels name the command buffer, not their HLO op, so no phases / scopes)")
  args = ap.parse_args()
  if not args.command_buffers:  # before jax is imported (profile_step imports it)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_enable_command_buffer=").strip()
  args.remat = args.remat.lower()  # a policy name (or true / false), checked by the config
  if args.smoke:
    args.preset, args.seq_len, args.micro, args.n_micro, args.warmup = "tiny", 64, 2, 2, 1
  os.makedirs(args.out_dir, exist_ok=True)
  out_file = os.path.join(args.out_dir, "train_step_profile.json")
  res, hlo = {}, {}
  if args.parse is None:
    args.trace_dir = os.path.join(args.trace_dir, time.strftime("%Y%m%d_%H%M%S"))
    from atma_jax import compile_cache
    compile_cache.configure(args.compile_cache, "--compile-cache",
                            log=lambda line: print(line, flush=True))
    try:
      res, hlo = profile_step(args)
    except Exception as e:  # noqa: BLE001 - still write what is known
      res["error"] = f"{type(e).__name__}: {str(e)[:800]}"
      traceback.print_exc()
    print(json.dumps({k: v for k, v in res.items() if k != "overrides"}, default=str), flush=True)
  try:
    trace = find_trace(args.parse or args.trace_dir)
    s = summarize(load_events(trace), hlo, args.top)
    s["trace_file"] = trace
    s["trace_bytes"] = os.path.getsize(trace)
    res["profile"] = s
    print_summary(s)
  except (OSError, ValueError) as e:
    res["profile_error"] = f"{type(e).__name__}: {e}"
    print("profile:", res["profile_error"], flush=True)
  with open(out_file, "w") as f:
    json.dump(res, f, indent=1, default=str)
  print("wrote", out_file, f"({os.path.getsize(out_file)} bytes)")
  if "error" in res or "profile_error" in res:
    sys.exit(1)


if __name__ == "__main__":
  main()
