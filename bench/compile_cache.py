"""First-step compile time with JAX's persistent compilation cache, cold vs warm (issue #13).

Runs one command twice, as two processes sharing one new cache folder (under the temp dir,
removed afterwards unless --keep-cache): the first ("cold") compiles and writes, the second
("warm") should load. Modes (--modes, comma-separated):

  train         `train.py --config C --set ... --set train.compile_cache=DIR` for --steps steps,
                logging every step: `first_step_s` (compile + run of step 1, from metrics.jsonl),
                what compiling it did (`first_step_compile`: programs loaded / written and their
                seconds, atma_jax/compile_cache.py) and every step's loss: the warm run must give
                the cold run's losses bit for bit (`losses_identical`)
  compile_only  `bench/train_throughput.py --compile-only --compile-cache DIR` with --cc-args:
                lower + compile of the train step alone on abstract inputs (`lower_s`,
                `compile_s`, the cache verdict of the step's compile)

Each run also records its process wall time and the cache folder's entries and bytes after it.

    JAX_PLATFORMS=cpu python3 bench/compile_cache.py --smoke --modes train,compile_only
    JAX_PLATFORMS=cpu python3 bench/compile_cache.py --modes train --config tiny --steps 3 \\
        --out bench/results/compile_cache_cpu_tiny_train.json                   # CPU, ~2 min
    JAX_PLATFORMS=cpu python3 bench/compile_cache.py --modes compile_only \\
        --out bench/results/compile_cache_cpu_378m_compile_only.json            # CPU, ~2 min
    python3 bench/compile_cache.py --modes train --config atma_378m \\
        --set train.eval_batches=0 --steps 2 --out $OUT/compile_cache_h200.json  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_SETS = ["model.num_layers=2", "model.global_offset=1", "model.hidden_size=64",
              "model.head_dim=16", "train.seq_len=32", "train.eval_batches=0"]
CC_ARGS = ("--preset atma_378m --devices 1 --micro 1 --n-micro 1 --seq-len 256 --impls auto "
           "--remat none --peak-n 0")


def cache_contents(folder: str) -> dict:
  """Entries of a JAX cache folder: count, total bytes, and names by program."""
  names = sorted(n for n in os.listdir(folder) if n.endswith("-cache")) if os.path.isdir(
      folder) else []
  return {"entries": len(names),
          "bytes": sum(os.path.getsize(os.path.join(folder, n)) for n in names),
          "programs": sorted({n.rsplit("-", 2)[0] for n in names})}


def run_process(cmd: list[str], log_path: str, env: dict) -> dict:
  """Runs `cmd` from the repository root, output to `log_path`; wall seconds and exit code."""
  print("$", shlex.join(cmd), flush=True)
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
  wall = time.perf_counter() - t0
  with open(log_path) as f:
    tail = f.read()[-3000:]
  return {"cmd": shlex.join(cmd), "exit_code": rc, "process_wall_s": wall,
          **({"output_tail": tail} if rc else {})}


def train_run(args, name: str, cache: str, work: str, env: dict) -> dict:
  run_dir = os.path.join(work, f"run_{name}")
  sets = [*args.overrides, f"train.steps={args.steps}", "train.log_every=1",
          "train.checkpoint_every=0", f"train.run_dir={run_dir}", f"train.compile_cache={cache}"]
  cmd = [sys.executable, "train.py", "--config", args.config, "--no-progress"]
  for s in sets:
    cmd += ["--set", s]
  res = run_process(cmd, os.path.join(work, f"train_{name}.log"), env)
  rows = []
  metrics = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  first = next((r for r in rows if "first_step_s" in r), {})
  res.update(first_step_s=first.get("first_step_s"),
             first_step_compile=first.get("first_step_compile"),
             losses=[[r["step"], r["loss"]] for r in rows if "loss" in r],
             step_s=[r["step_s"] for r in rows if "step_s" in r])
  shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints: not needed, possibly large
  return res


def compile_only_run(args, name: str, cache: str, work: str, env: dict) -> dict:
  out = os.path.join(work, f"compile_only_{name}.json")
  cmd = [sys.executable, os.path.join("bench", "train_throughput.py"), "--compile-only",
         *shlex.split(args.cc_args), "--compile-cache", cache, "--out", out]
  res = run_process(cmd, os.path.join(work, f"compile_only_{name}.log"), env)
  if os.path.exists(out):
    with open(out) as f:
      variants = json.load(f)["variants"]
    v = variants[0] if variants else {}
    res.update({k: v.get(k) for k in ("lower_s", "compile_s", "lower_cpu_s", "compile_cpu_s",
                                      "compile_cache", "overrides")})
    res["optimizer_update_compile_s"] = (v.get("optimizer_update") or {}).get("compile_s")
  return res


def describe_device(env: dict) -> dict:
  """Device kind, platform and jax version, asked of a child process (this one must not hold
  the accelerator while the runs need it)."""
  code = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'device': getattr(d, "
          "'device_kind', str(d)), 'platform': d.platform, 'jax': jax.__version__}))")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                     text=True)
  if p.returncode:
    raise SystemExit(f"cannot start JAX: {p.stderr.strip()[-500:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def compare(cold: dict, warm: dict, key: str) -> dict:
  a, b = cold.get(key), warm.get(key)
  return {f"{key}_cold": a, f"{key}_warm": b,
          f"{key}_cold_over_warm": (a / b) if a and b else None}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--modes", default="train", help="train, compile_only or train,compile_only")
  ap.add_argument("--config", default="tiny", help="train mode: train.py's --config")
  ap.add_argument("--set", dest="overrides", action="append", default=[],
                  help="train mode: a train.py override (repeatable)")
  ap.add_argument("--steps", type=int, default=3, help="train mode: steps per run")
  ap.add_argument("--cc-args", default=CC_ARGS,
                  help=f"compile_only mode: train_throughput.py arguments (default: {CC_ARGS})")
  ap.add_argument("--cache-dir", default=None,
                  help="the shared cache folder (default: a new one under the temp dir); it "
                  "must be empty for the first run to be cold")
  ap.add_argument("--keep-cache", action="store_true", help="do not delete the cache folder")
  ap.add_argument("--out", default=None)
  ap.add_argument("--smoke", action="store_true",
                  help="CPU check of both modes: the tiny preset made smaller, 2 steps; "
                  "train_throughput.py --smoke for compile_only")
  args = ap.parse_args(argv)
  if args.smoke:
    args.config, args.steps, args.cc_args = "tiny", 2, "--smoke"
    args.overrides = SMOKE_SETS + args.overrides
  modes = [m for m in args.modes.split(",") if m]
  if not modes or set(modes) - {"train", "compile_only"}:
    raise SystemExit(f"--modes {args.modes!r}: give train, compile_only or both")
  if args.steps < 2:
    raise SystemExit("--steps must be >= 2 (the losses after the first step are compared too)")
  work = tempfile.mkdtemp(prefix="atma_compile_cache_")
  cache_root = args.cache_dir or os.path.join(work, "cache")
  if cache_contents(cache_root)["entries"]:
    raise SystemExit(f"--cache-dir {cache_root} already holds entries; give an empty folder")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)  # the CLIs' own threshold
  dev = describe_device(env)
  out = {**dev, "python": platform.python_version(), "host_cpus": os.cpu_count(),
         "argv": sys.argv[1:], "modes": {}}
  name = args.out or os.path.join(os.environ.get("OUT", os.path.join(ROOT, "bench", "results")),
                                  f"compile_cache_{dev['platform']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
  try:
    for mode in modes:
      cache = os.path.join(cache_root, mode)  # each mode starts cold
      fn = train_run if mode == "train" else compile_only_run
      res = {"cache_dir": cache}
      for run in ("cold", "warm"):
        res[run] = fn(args, run, cache, work, env)
        res[run]["cache_after"] = cache_contents(cache)
        out["modes"][mode] = res
        with open(name, "w") as f:
          json.dump(out, f, indent=2)
      cold, warm = res["cold"], res["warm"]
      if mode == "train":
        res["summary"] = {**compare(cold, warm, "first_step_s"),
                          **compare(cold, warm, "process_wall_s"),
                          "first_step_compile_s_cold": (cold["first_step_compile"] or {}).get(
                              "seconds"),
                          "first_step_compile_s_warm": (warm["first_step_compile"] or {}).get(
                              "seconds"),
                          "verdict_cold": (cold["first_step_compile"] or {}).get("verdict"),
                          "verdict_warm": (warm["first_step_compile"] or {}).get("verdict"),
                          "losses_identical": bool(cold["losses"])
                          and cold["losses"] == warm["losses"]}
      else:
        res["summary"] = {**compare(cold, warm, "compile_s"), **compare(cold, warm, "lower_s"),
                          **compare(cold, warm, "process_wall_s"),
                          "verdict_cold": (cold.get("compile_cache") or {}).get("verdict"),
                          "verdict_warm": (warm.get("compile_cache") or {}).get("verdict")}
      print(f"{mode}: {json.dumps(res['summary'])}", flush=True)
      with open(name, "w") as f:
        json.dump(out, f, indent=2)
  finally:
    if not args.keep_cache:
      shutil.rmtree(work, ignore_errors=True)
  print("wrote", name)
  failed = [m for m, r in out["modes"].items() for run in ("cold", "warm")
            if r.get(run, {}).get("exit_code")]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
