"""flash-linear-attention's `chunk_gated_delta_rule` as the anchor of the gated-delta benchmark.

Issue #6 times our Pallas gated-delta kernels against FLA (PyTorch + Triton). This file gives
`fla_fns() -> (run, status)` for `bench/gated_delta.py` (`run(inputs, backward, chunk_size=64)
-> ms`, `inputs` from its `make_inputs`; `status` a JSON-able dict: versions, what was patched,
FLA's accuracy against our sequential oracle, and the extra timings), and a standalone mode that
writes the same numbers to JSON: the accuracy cases, then every shape of `gated_delta.SHAPES` at
FLA chunk 64 (rows 'fla') and 32 ('fla_chunk32', in case chunk 64's gradients prove wrong).

GPU (one H100, torch 2.11 + Triton 3.6, no `fla` installed; the wheel travels in `.whl/`):

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
  PYTHONUNBUFFERED=1 python3 bench/fla_anchor.py --out $OUT/fla_anchor.json

CPU convention check (FLA's naive torch reference vs our JAX oracle; torch lives in a separate
Python 3.11 venv because the repo venv has no torch, jax needs 3.12):

  python bench/fla_anchor.py --cpu-check --torch-python /tmp/fla311/bin/python

How FLA runs on Hopper + Triton 3.6 (fla-core 0.6.0):
  * forward: as shipped.
  * backward: `fla.ops.common.chunk_o.chunk_bwd_dqkwg` raises RuntimeError when
    IS_NVIDIA_HOPPER and 3.4.0 <= Triton < 3.7.1 (upstream #640: a Triton codegen bug gave wrong
    dk / dg / dbeta), unless the TileLang backend takes that call (needs `tilelang` + nvcc; with
    its dependencies about 79 MB of wheels, more than a device call may carry). No environment
    variable skips the guard (FLA_DISABLE_BACKEND_DISPATCH=1 only removes the backends). So
    `patch_hopper_guard` first shows the refusal with a tiny backward, then sets the module flag
    `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True`, which lets FLA's own Triton kernel run.
    The accuracy check (run after the patch) says whether its gradients are right here.

Convention mapping (ATMA_SPEC §4.4 is FLA's recurrence; `fla_call` is the one place it lives):
  g = log_gamma (natural-log decay, <= 0; FLA rescales by 1/ln 2 inside for exp2), beta as is,
  scale = 1.0 (we do not scale q), q and k unit-normalized by the caller
  (use_qk_l2norm_in_kernel=False), layout [B, T, H, D] (FLA's only layout), initial and final
  state [B, H, K, V] fp32 (state_v_first=False is our [K, V] layout).

Dimension glossary
  B batch   T tokens   H heads   K key / query dim   V value dim

Timing: the protocol of `bench/gated_delta.py` (3 warm-up calls, median over 7 repeats of
(10 back-to-back calls) / 10, wall clock with torch.cuda.synchronize) so the numbers compare with
the Pallas rows, plus `triton.testing.do_bench` (median; it flushes L2 between calls) as a
second opinion. "fwd+bwd" is one
call that runs the forward and `torch.autograd.grad` from (o, final_state) with (do, 0), the
work of our jitted fwd_bwd.

No jax or torch import at module level: the CPU check runs the torch half in a venv without jax.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("o", "final_state", "dq", "dk", "dv", "dlog_gamma", "dbeta", "dinitial_state")
KERNEL_KW = {"use_qk_l2norm_in_kernel": False}  # Triton path only; naive fns take no such arg
DEVICE = "cuda"  # torch device of the Triton path (a CPU harness may point it at "cpu")
ACC_TOL = 0.05  # bf16 FLA vs fp32 oracle (ATMA_SPEC: tests/verify_fla.py rel err < 0.05)
# accuracy cases on the GPU: (name, K = V, dtype, FLA chunk_size); B=1, T=256, H=8 (the
# benchmark's H, so Triton's autotuning is shared with the timed shapes)
ACC_CASES = (("K128_bf16_chunk64", 128, "bfloat16", 64),   # the benchmark's configuration
             ("K128_f32_chunk64", 128, "float32", 64),     # yardstick: fp32 (tf32 dots) inputs
             ("K64_bf16_chunk64", 64, "bfloat16", 64),     # BK = 64: the tile of upstream #640
             ("K128_bf16_chunk32", 128, "bfloat16", 32))


# --------------------------------------------------------------------------- torch half


def fla_call(fn, q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, s0_BHKV, **kw):
  """Our arguments -> FLA's keywords. Returns `(o_BTHV, final_state_BHKV)`."""
  return fn(q_BTHK, k_BTHK, v_BTHV, g=log_gamma_BTH, beta=beta_BTH, scale=1.0,
            initial_state=s0_BHKV, output_final_state=True, **kw)


def torch_fwd_vjp(fn, tensors, do_BTHV, dsT_BHKV, **kw):
  """FLA-convention call and its VJP by torch autograd -> dict NAME -> fp32 numpy array."""
  import torch
  leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
  o_BTHV, sT_BHKV = fla_call(fn, *leaves, **kw)
  grads = torch.autograd.grad((o_BTHV, sT_BHKV), leaves,
                              (do_BTHV.to(o_BTHV.dtype), dsT_BHKV.to(sT_BHKV.dtype)),
                              materialize_grads=True)  # a missing grad shows as 0, not a crash
  outs = (o_BTHV, sT_BHKV) + tuple(grads)
  return {n: x.detach().float().cpu().numpy() for n, x in zip(NAMES, outs)}


def _sync():
  import torch
  if torch.device(DEVICE).type == "cuda":
    torch.cuda.synchronize()


def time_torch(call, inner=10, reps=7, warmup=3):
  """(median ms per call, first-call seconds) with the protocol of bench/gated_delta.timeit."""
  _sync()
  t0 = time.perf_counter()
  call()
  _sync()
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    call()
  _sync()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      call()
    _sync()
    ts.append((time.perf_counter() - t0) / inner)
  return statistics.median(ts) * 1e3, first


def load_naive(wheel):
  """FLA's naive torch module (torch + einops only) straight from the fla-core wheel."""
  import importlib.util
  d = tempfile.mkdtemp(prefix="fla_naive_")
  with zipfile.ZipFile(wheel) as z:
    path = z.extract("fla/ops/gated_delta_rule/naive.py", d)
  spec = importlib.util.spec_from_file_location("fla_naive", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def torch_side(in_npz, out_npz, wheel):
  """CPU check, torch half: FLA's two naive references on the saved inputs, with their VJPs."""
  import torch
  naive = load_naive(wheel)
  d = np.load(in_npz)
  tensors = [torch.from_numpy(d[n]) for n in ("q", "k", "v", "log_gamma", "beta", "s0")]
  do, dsT = torch.from_numpy(d["do"]), torch.from_numpy(d["dsT"])
  res = {}
  for name, fn, kw in (("recurrent", naive.naive_recurrent_gated_delta_rule, {}),
                       ("chunk64", naive.naive_chunk_gated_delta_rule, {"chunk_size": 64})):
    for n, x in torch_fwd_vjp(fn, tensors, do, dsT, **kw).items():
      res[f"{name}/{n}"] = x
  np.savez(out_npz, **res)


# --------------------------------------------------------------------------- jax half


def _bench_module():
  sys.path.insert(0, REPO)
  from bench import gated_delta
  return gated_delta


def oracle_fwd_vjp(inputs, do_BTHV, dsT_BHKV):
  """Our sequential oracle (fp32, highest matmul precision) and its autodiff VJP."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.gated_delta import reference
  f32 = [x.astype(jnp.float32) for x in inputs]
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(jax.jit(reference.gated_delta_sequential), *f32)
    grads = vjp((do_BTHV.astype(jnp.float32), dsT_BHKV.astype(jnp.float32)))
  return {n: np.asarray(x, np.float32) for n, x in zip(NAMES, tuple(out) + tuple(grads))}


def case_inputs(b, t, h, kv, dtype, seed=1):
  """Benchmark-style inputs plus cotangents; `do` is rounded to `dtype` (FLA's o dtype)."""
  import jax
  import jax.numpy as jnp
  gd = _bench_module()
  inputs = gd.make_inputs(b, t, h=h, kd=kv, vd=kv, dtype=dtype, seed=seed)
  do = jax.random.normal(jax.random.key(seed + 7), (b, t, h, kv), jnp.float32)
  dsT = jax.random.normal(jax.random.key(seed + 8), (b, h, kv, kv), jnp.float32)
  return inputs, do.astype(dtype).astype(jnp.float32), dsT


def to_torch(x, device):
  """One JAX array -> torch tensor on `device` (dlpack when it works, else through numpy)."""
  import torch
  if hasattr(x, "block_until_ready"):
    x.block_until_ready()  # JAX dispatch is asynchronous; torch must read a finished buffer
  try:
    t = torch.from_dlpack(x)
    if t.device.type != torch.device(device).type:
      t = t.to(device)
    return t.clone()
  except Exception:  # noqa: BLE001
    dt = getattr(torch, np.dtype(x.dtype).name)
    return torch.from_numpy(np.asarray(x, np.float32)).to(device=device, dtype=dt)


def rel_errs(got, want):
  rel_err = _bench_module().rel_err
  return {n: rel_err(got[n], want[n]) for n in NAMES}


def patch_hopper_guard(fn, patch=True):
  """Show fla-core's Hopper/Triton refusal of the backward, then lift it (see module doc)."""
  import torch
  import fla.ops.common.chunk_o as chunk_o
  guarded = bool(chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0
                 and not chunk_o.TRITON_ABOVE_3_7_1)
  info = {"is_nvidia_hopper": bool(chunk_o.IS_NVIDIA_HOPPER), "guard_applies": guarded}
  if not guarded:
    info["patch"] = "none (the guard does not apply on this machine)"
    return info
  b, t, h, d = 1, 64, 8, 128  # one chunk at the benchmark's H, K, V
  g = torch.Generator(device=DEVICE).manual_seed(0)
  x = [torch.randn(b, t, h, d, device=DEVICE, generator=g) for _ in range(3)]
  x = [torch.nn.functional.normalize(y, dim=-1) if i < 2 else y for i, y in enumerate(x)]
  x = [y.bfloat16() for y in x]
  gates = [-torch.rand(b, t, h, device=DEVICE, generator=g) * 0.1,
           torch.rand(b, t, h, device=DEVICE, generator=g)]
  s0 = torch.zeros(b, h, d, d, device=DEVICE)
  try:
    torch_fwd_vjp(fn, x + gates + [s0], torch.ones(b, t, h, d, device=DEVICE),
                  torch.zeros_like(s0), **KERNEL_KW)
    info["refusal"] = "none: the backward ran unpatched (a backend took chunk_bwd_dqkwg)"
    info["patch"] = "none"
    return info
  except Exception as e:  # noqa: BLE001  (expected: RuntimeError naming #640)
    info["refusal"] = f"{type(e).__name__}: {e}"[:1500]
  if patch:
    chunk_o.TRITON_ABOVE_3_7_1 = True
    info["patch"] = ("monkeypatch fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True: FLA's own "
                     "Triton chunk_bwd_dqkwg runs despite the Hopper + Triton<3.7.1 guard")
  else:
    info["patch"] = "none (FLA_ANCHOR_PATCH=0): FLA's backward stays refused"
  return info


def accuracy_check(fn, cases=ACC_CASES, b=1, t=256, h=8):
  """FLA's Triton kernel vs our oracle per ACC_CASES: NAME -> max|diff| / max|want|."""
  import jax.numpy as jnp
  out = {}
  for name, kv, dtype, chunk in cases:
    try:
      inputs, do, dsT = case_inputs(b, t, h, kv, jnp.dtype(dtype))
      want = oracle_fwd_vjp(inputs, do, dsT)
      tensors = [to_torch(x, DEVICE) for x in inputs]
      got = torch_fwd_vjp(fn, tensors, to_torch(do, DEVICE), to_torch(dsT, DEVICE),
                          chunk_size=chunk, **KERNEL_KW)
      errs = rel_errs(got, want)
      worst = max(errs, key=errs.get)
      errs["verdict"] = (f"ok (all < {ACC_TOL})" if errs[worst] < ACC_TOL
                         else f"WRONG: {worst} rel err {errs[worst]:.3g} >= {ACC_TOL}")
      out[f"B{b}_T{t}_H{h}_{name}"] = errs
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      out[f"B{b}_T{t}_H{h}_{name}"] = {"error": f"{type(e).__name__}: {e}"[:1500]}
    print(f"fla accuracy {name}: {out[f'B{b}_T{t}_H{h}_{name}']}", flush=True)
  return out


def fla_fns(cases=ACC_CASES):
  """(run, status) for bench/gated_delta.py; run is None when FLA cannot run here.

  `cases`: the accuracy cases to check first (a subset of ACC_CASES; () for none).
  """
  try:
    import torch
    import triton
    import triton.testing
    if not torch.cuda.is_available():
      raise RuntimeError("torch sees no CUDA device (FLA's kernels are Triton-on-GPU)")
    import fla
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
  except Exception as e:  # noqa: BLE001
    return None, {"status": f"unavailable ({type(e).__name__}: {e})"}
  status = {"status": "ok", "fla": getattr(fla, "__version__", "?"), "torch": torch.__version__,
            "triton": triton.__version__, "device": torch.cuda.get_device_name(0),
            "call": "chunk_gated_delta_rule(q, k, v, g=log_gamma, beta=beta, scale=1.0, "
                    "initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=False)"
                    ", chunk_size 64 (FLA default)", "timings": []}
  try:
    status["hopper_guard"] = patch_hopper_guard(
        chunk_gated_delta_rule, patch=os.environ.get("FLA_ANCHOR_PATCH", "1") != "0")
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    status["hopper_guard"] = {"error": f"{type(e).__name__}: {e}"[:1500]}
  if cases:
    status["accuracy"] = accuracy_check(chunk_gated_delta_rule, cases)
    status["accuracy_verdicts"] = {n: e.get("verdict", e.get("error", "?"))[:200]
                                   for n, e in status["accuracy"].items()}

  def run(inputs, backward, chunk_size=64):
    kw = dict(KERNEL_KW, chunk_size=chunk_size)
    q, k, v, lg, beta, s0 = (to_torch(x, DEVICE) for x in inputs)
    b, t = q.shape[:2]
    if backward:
      leaves = [x.requires_grad_(True) for x in (q, k, v, lg, beta, s0)]
      gen = torch.Generator(device=DEVICE).manual_seed(3)
      do = torch.randn(v.shape, device=DEVICE, generator=gen).to(q.dtype)
      dsT = torch.zeros_like(s0)

      def call():
        o, sT = fla_call(chunk_gated_delta_rule, *leaves, **kw)
        return torch.autograd.grad((o, sT), leaves, (do.to(o.dtype), dsT.to(sT.dtype)))
    else:
      def call():
        with torch.no_grad():
          return fla_call(chunk_gated_delta_rule, q, k, v, lg, beta, s0, **kw)
    ms, first = time_torch(call)
    row = {"B": b, "T": t, "mode": "fwd+bwd" if backward else "fwd", "chunk": chunk_size, "ms": ms,
           "first_call_s": first}
    try:
      row["ms_do_bench"] = triton.testing.do_bench(call, return_mode="median")
    except Exception as e:  # noqa: BLE001
      row["ms_do_bench_error"] = f"{type(e).__name__}: {e}"[:300]
    status["timings"].append(row)
    print(f"fla {row}", flush=True)
    return ms
  return run, status


# --------------------------------------------------------------------------- entry points


def cpu_check(torch_python, wheel, b=1, t=200, h=2, kv=32):
  """FLA's naive torch references (recurrent and chunk-64) vs our oracle, fp32, on CPU."""
  import jax.numpy as jnp
  inputs, do, dsT = case_inputs(b, t, h, kv, jnp.float32, seed=5)
  want = oracle_fwd_vjp(inputs, do, dsT)
  with tempfile.TemporaryDirectory() as d:
    src, dst = os.path.join(d, "in.npz"), os.path.join(d, "out.npz")
    arrs = dict(zip(("q", "k", "v", "log_gamma", "beta", "s0"), inputs), do=do, dsT=dsT)
    np.savez(src, **{n: np.asarray(x, np.float32) for n, x in arrs.items()})
    subprocess.run([torch_python, os.path.abspath(__file__), "--torch-side", src, dst,
                    "--wheel", wheel], check=True)
    got = dict(np.load(dst))
  worst = 0.0
  for ref in ("recurrent", "chunk64"):
    errs = rel_errs({n: got[f"{ref}/{n}"] for n in NAMES}, want)
    worst = max(worst, *errs.values())
    print(f"FLA naive_{ref} vs our oracle (B{b} T{t} H{h} K=V={kv}, fp32), rel err: "
          + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
  ok = worst < 1e-4
  print(f"convention check {'PASSED' if ok else 'FAILED'}: worst rel err {worst:.2e} (tol 1e-4)")
  return ok


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="bench/results/fla_anchor.json")
  ap.add_argument("--no-timing", action="store_true", help="accuracy check only")
  ap.add_argument("--chunks", default="64,32",
                  help="FLA chunk sizes to time (16, 32, 64); rows 'fla' (64) and 'fla_chunkN'")
  ap.add_argument("--cases", default=",".join(c[0] for c in ACC_CASES),
                  help="comma-separated accuracy cases ('' for none), from: "
                  + ", ".join(c[0] for c in ACC_CASES))
  ap.add_argument("--shapes", default=None,
                  help="BxT,BxT to time (fwd, plus fwd+bwd at T <= 32K); default all of "
                  "gated_delta.SHAPES")
  ap.add_argument("--cpu-check", action="store_true", help="naive FLA vs oracle on CPU")
  ap.add_argument("--torch-python", default="/tmp/fla311/bin/python",
                  help="a python with torch + einops + numpy (for --cpu-check)")
  ap.add_argument("--wheel", default=None, help="fla-core wheel (default: .whl/fla_core-*.whl)")
  ap.add_argument("--torch-side", nargs=2, metavar=("IN_NPZ", "OUT_NPZ"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.wheel is None:
    whl = sorted(f for f in os.listdir(os.path.join(REPO, ".whl")) if f.startswith("fla_core-")) \
        if os.path.isdir(os.path.join(REPO, ".whl")) else []
    if (args.cpu_check or args.torch_side) and not whl:
      sys.exit("no fla-core wheel: download it into .whl/ (see README of the device) or pass "
               "--wheel PATH")
    args.wheel = os.path.join(REPO, ".whl", whl[-1]) if whl else None
  if args.torch_side:
    torch_side(*args.torch_side, args.wheel)
    return
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch
  if args.cpu_check:
    sys.exit(0 if cpu_check(args.torch_python, args.wheel) else 1)

  by_name = {c[0]: c for c in ACC_CASES}
  unknown = [n for n in args.cases.split(",") if n and n not in by_name]
  if unknown:
    sys.exit(f"unknown --cases {unknown}; choose from {sorted(by_name)}")
  cases = tuple(by_name[n] for n in args.cases.split(",") if n)
  chunks = [int(c) for c in args.chunks.split(",") if c]
  if any(c not in (16, 32, 64) for c in chunks):
    sys.exit(f"--chunks {chunks}: FLA's gated delta rule takes chunk sizes 16, 32 or 64")
  import jax
  gd = _bench_module()
  if args.shapes:
    try:
      gd.SHAPES = [(b, t, t <= 32768) for b, t in
                   (tuple(int(x) for x in s.split("x")) for s in args.shapes.split(","))]
    except ValueError:
      sys.exit(f"--shapes {args.shapes!r}: expected BxT pairs separated by commas, e.g. 16x2048")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  results = {"jax_device": str(jax.devices()[0]), "heads": gd.H, "K": gd.K, "V": gd.V,
             "timing": "median of 7 x (10 back-to-back calls)/10, ms; ms_do_bench: "
                       "triton.testing.do_bench median", "rows": []}

  def save():
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)

  run, status = fla_fns(cases)
  results["fla"] = status
  save()
  if run is None or args.no_timing:
    print(json.dumps(status, indent=1))
    return
  for b, t, with_bwd in gd.SHAPES:
    inputs = gd.make_inputs(b, t)
    for mode, chunk in itertools.product(("fwd", "fwd+bwd") if with_bwd else ("fwd",), chunks):
      row = {"impl": "fla" if chunk == 64 else f"fla_chunk{chunk}", "B": b, "T": t, "mode": mode}
      try:
        row["ms"] = run(inputs, mode != "fwd", chunk_size=chunk)
        row.update({k: v for k, v in status["timings"][-1].items() if k.startswith("ms_")
                    or k == "first_call_s"})
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"[:1500]
      results["rows"].append(row)
      save()
    del inputs
  print(f"\n{'impl':<12}{'B':>4}{'T':>8}  {'mode':<8}{'ms':>10}{'do_bench':>10}")
  for r in results["rows"]:
    ms = f"{r['ms']:.3f}" if "ms" in r else "ERR"
    db = f"{r['ms_do_bench']:.3f}" if "ms_do_bench" in r else "-"
    print(f"{r['impl']:<12}{r['B']:>4}{r['T']:>8}  {r['mode']:<8}{ms:>10}{db:>10}")
  print("accuracy:", json.dumps(status.get("accuracy"), indent=1))
  print("hopper_guard:", json.dumps(status.get("hopper_guard"), indent=1))


if __name__ == "__main__":
  main()
