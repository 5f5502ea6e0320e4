"""The original PyTorch trainer's step and ours on the same GPU, in one call (issue #13).

Two subprocesses, one after the other, so each has the GPU to itself:

  original  a driver that imports the original repository's own code from `--ref` (a checkout of
            kreasof-ai/atma, copied into the working tree at run time, never bundled):
            `train.model.Model`, `train.optimizer.Muon`, `model.config.AtmaConfig`, and runs the
            step of its `train.py`: `torch.compile(model)`, the "proj" weights zeroed as its init,
            fused AdamW (embedding lr 0.3, head 1/320, vectors 0.01) + Muon (lr 0.02, wd 0.01),
            per micro-batch forward, `loss.item()` and backward, `clip_grad_norm_(1.0)`, both
            optimizer steps, `zero_grad`. Synthetic tokens on the GPU. FLA with
            `FLA_CUSTOM_OP=1`. No network there: a stub module `kernels` (first on PYTHONPATH)
            whose `get_kernel` raises sends the LFM2 conv to its PyTorch fallback (and FA3, unused
            by Polar attention, to None); FLA's backward refuses Triton < 3.7.1 on Hopper, so
            `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True` is set. All of it is recorded.
  ours      `bench/train_loop_vs_step.py`: the bare jitted step on synthetic tokens and
            train.py's loop on the embedded corpus, same shapes.

Model: our `atma_378m` ModelConfig written as the reference's AtmaConfig (interop.ref_config:
full causal context, memory on), with the reference trainers' `mem_chunk=128`. Step: 64
sequences of 2048 tokens, micro-batch 16. The original is timed over `--reps` repetitions of
`--steps` steps after `--warmup` steps (torch.cuda.synchronize around each repetition); ours over
`--reps` windows of `--steps` steps. Peak memory: torch.cuda.max_memory_allocated (and reserved)
for the original, XLA's peak_bytes_in_use for ours.

GPU (one call, estimated ~6-8 min; in bench/results/train_vs_original_h200.json the original
took 225 s and our side was stopped by --ours-timeout (240 s) after its bare-step phase; the
fla-core wheel travels in .whl/, the checkout in ref_atma/):

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/fla_core-*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
      python3 bench/train_vs_original.py --ref ref_atma --out $OUT/train_vs_original.json

CPU (`--smoke`): ours tiny; the original tiny on CPU (no compile, torch kernels) when a Python
with torch is given (`--torch-python`) and `--ref` exists, else skipped with the reason recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB_KERNELS = '''"""Stub of the `kernels` hub client: the GPU machine has no network (bench/train_vs_original.py)."""


def get_kernel(*args, **kwargs):
  raise RuntimeError("kernels hub unreachable (offline stub from bench/train_vs_original.py)")
'''
SMOKE_REF = {"vocab_size": 50304, "num_hidden_layers": 4, "hidden_size": 64, "head_dim": 16,
             "attn_kernel": "torch", "mem_kernel": "torch", "mem_chunk": 16, "attn_window": None}


# --------------------------------------------------------------------------- original side
# (runs in the subprocess: torch and the reference's code only, no jax, no atma_jax)


def _versions():
  import importlib.metadata as md
  out = {"python": platform.python_version()}
  for name in ("torch", "triton", "fla-core", "numpy"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


def _fla_guard(info):
  """Lifts FLA's Hopper + Triton < 3.7.1 refusal of the backward (see bench/fla_anchor.py)."""
  try:
    import fla.ops.common.chunk_o as chunk_o
  except Exception as e:  # noqa: BLE001
    info["fla_hopper_guard"] = f"fla.ops.common.chunk_o not importable: {e!r}"
    return
  guarded = bool(getattr(chunk_o, "IS_NVIDIA_HOPPER", False)
                 and getattr(chunk_o, "TRITON_ABOVE_3_4_0", False)
                 and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True))
  if guarded:
    chunk_o.TRITON_ABOVE_3_7_1 = True
    info["fla_hopper_guard"] = ("set fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True (Hopper, "
                                "Triton < 3.7.1: FLA's own chunk_bwd_dqkwg runs)")
  else:
    info["fla_hopper_guard"] = "not applied (the guard does not hold on this machine)"


def original_side(spec: dict) -> dict:
  import torch
  from torch import nn
  info = {"versions": _versions(), "env": {k: os.environ.get(k) for k in ("FLA_CUSTOM_OP",)}}
  cuda = torch.cuda.is_available() and not spec["smoke"]
  device = torch.device("cuda" if cuda else "cpu")
  info["device"] = torch.cuda.get_device_name() if cuda else "cpu"
  if not spec["compile"]:
    import torch._dynamo
    torch._dynamo.config.disable = True  # also the reference's @torch.compile'd Muon update
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    import model.blocks as blocks
    import train.model as tm
    from model.config import AtmaConfig
    from train.optimizer import Muon
  info["import_messages"] = printed.getvalue().splitlines()
  info["ref_modules"] = {m.__name__: m.__file__ for m in (blocks, tm)}
  info["conv"] = ("PyTorch fallback (_causal_conv1d_fallback; the kernels hub is offline)"
                  if tm.causal_conv1d_fn is tm._causal_conv1d_fallback else "kernels hub")
  info["fa3"] = tm._fa3 is not None
  info["fla"] = {"available": blocks._HAS_FLA, "import_error": blocks._FLA_IMPORT_ERROR,
                 "custom_op": blocks._HAS_FLA and blocks._fla_gated_delta is not blocks._fla_raw}
  if blocks._HAS_FLA and cuda:
    _fla_guard(info)
  fields = dict(spec["ref_config"])
  fields.pop("dtype", None)  # AtmaConfig's default: torch.bfloat16
  config = AtmaConfig(**fields)
  info["ref_config"] = {k: (str(v) if k == "dtype" else v) for k, v in vars(config).items()}
  torch.manual_seed(0)
  model = tm.Model(config, reg_mode="baseline", sketch_dim=64).to(device)
  info["num_params"] = sum(p.numel() for p in model.parameters())
  if spec["compile"]:
    model = torch.compile(model)
  for name, p in model.named_parameters():  # train.py's init
    if "proj" in name:
      p.data.zero_()
  adamw = torch.optim.AdamW([dict(params=[model.embed.weight], lr=0.3),
                             dict(params=[model.proj.weight], lr=1 / 320),
                             dict(params=[p for p in model.parameters() if p.ndim < 2], lr=0.01)],
                            betas=(0.8, 0.95), eps=1e-10, weight_decay=0, fused=True)
  muon = Muon([p for p in model.blocks.parameters() if p.ndim >= 2], lr=0.02, weight_decay=0.01)
  B, M, T = spec["global_batch"], spec["micro_batch"], spec["seq_len"]
  g = torch.Generator(device=device).manual_seed(0)
  toks = torch.randint(0, 50257, (B, T + 1), device=device, generator=g)
  inputs, targets = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()

  def step():
    train_loss = 0.0
    for i in range(B // M):
      loss_step, reg_loss, align_loss = model(inputs[i * M:(i + 1) * M],
                                              targets[i * M:(i + 1) * M])
      train_loss += loss_step.item()
      loss = (1 - 0.0) * loss_step + (0.0 * reg_loss) + (0.0 * align_loss)
      loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in (adamw, muon):
      opt.step()
    model.zero_grad(set_to_none=True)
    return train_loss / (B * T)

  def sync():
    if cuda:
      torch.cuda.synchronize()

  losses, warm_s = [], []
  for _ in range(spec["warmup"]):
    t0 = time.perf_counter()
    losses.append(step())
    sync()
    warm_s.append(time.perf_counter() - t0)
  info["warmup_step_s"] = warm_s
  reps = []
  for _ in range(spec["reps"]):
    sync()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
      losses.append(step())
    sync()
    secs = time.perf_counter() - t0
    reps.append({"steps": spec["steps"], "seconds": secs,
                 "tokens_per_s": spec["steps"] * B * T / secs})
  info["repetitions"] = reps
  info["tokens_per_s"] = (sum(r["steps"] for r in reps) * B * T / sum(r["seconds"] for r in reps))
  info["losses"] = losses
  if cuda:
    info["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    info["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
  return info


# --------------------------------------------------------------------------- parent


def _tail(text: str, n: int = 4000) -> str:
  return text[-n:]


def run_child(cmd, env, timeout, cwd=REPO):
  """(returncode or 'timeout', stdout+stderr tail, seconds)."""
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out, rc = p.stdout + p.stderr, p.returncode
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    out += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    rc = "timeout"
  return rc, out, time.perf_counter() - t0


def reference_model_config(smoke: bool, mem_chunk: int) -> dict:
  """Our atma_378m model as the reference's AtmaConfig fields (the smoke: a tiny one)."""
  if REPO not in sys.path:  # the parent only: the original's child must not see our train.py
    sys.path.insert(0, REPO)
  if smoke:
    from atma_jax.interop.ref_config import REFERENCE_DEFAULTS
    return {**REFERENCE_DEFAULTS, **SMOKE_REF}
  from atma_jax.config import resolve
  from atma_jax.interop.ref_config import reference_config
  out = reference_config(resolve("atma_378m").model, max_position_embeddings=2048)
  out["mem_chunk"] = mem_chunk  # the reference trainers' value (the math does not depend on it)
  return out


def original_skip_reason(args) -> str | None:
  if not os.path.isdir(os.path.join(args.ref, "train")) or not os.path.isdir(
      os.path.join(args.ref, "model")):
    return (f"no checkout of the original at --ref {args.ref} (needs train/ and model/): copy "
            "kreasof-ai/atma there")
  probe = subprocess.run([args.torch_python, "-c", "import torch"], capture_output=True,
                         text=True)
  if probe.returncode:
    return f"{args.torch_python} cannot import torch: {_tail(probe.stderr, 300).strip()}"
  return None


def run_original(args, ref_config, tmp) -> dict:
  reason = original_skip_reason(args)
  if reason:
    print(f"original: skipped: {reason}", flush=True)
    return {"ok": False, "skipped": reason}
  stub = os.path.join(tmp, "stub")
  os.makedirs(os.path.join(stub, "kernels"), exist_ok=True)
  with open(os.path.join(stub, "kernels", "__init__.py"), "w") as f:
    f.write(STUB_KERNELS)
  spec = {"ref_config": ref_config, "global_batch": args.global_batch,
          "micro_batch": args.micro_batch, "seq_len": args.seq_len, "steps": args.steps,
          "reps": args.reps, "warmup": args.warmup, "compile": not args.smoke,
          "smoke": args.smoke}
  spec_path, res_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "original.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  env = dict(os.environ)
  ref = os.path.abspath(args.ref)
  env["PYTHONPATH"] = os.pathsep.join([stub, ref] + [p for p in env.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  env["FLA_CUSTOM_OP"] = "1"
  cmd = [args.torch_python, os.path.abspath(__file__), "--side", "original", "--spec",
         spec_path, "--result", res_path]
  rc, log, secs = run_child(cmd, env, args.original_timeout, cwd=ref)
  res = {}
  if rc == 0 and os.path.exists(res_path):
    with open(res_path) as f:
      res = json.load(f)
  res.update({"ok": rc == 0 and "tokens_per_s" in res, "returncode": rc, "wall_s": secs,
              "log_tail": _tail(log), "stub_kernels": "kernels.get_kernel raises (offline)",
              "command": " ".join(cmd), "pythonpath": env["PYTHONPATH"]})
  print(f"original: rc={rc} " + (f"{res['tokens_per_s']:.0f} tok/s" if res["ok"] else
                                 _tail(log, 800)), flush=True)
  return res


def run_ours(args, tmp) -> dict:
  res_path = os.path.join(tmp, "ours.json")
  cmd = [sys.executable, os.path.join(REPO, "bench", "train_loop_vs_step.py"), "--out", res_path,
         "--phases", args.our_phases]
  if args.smoke:
    cmd.append("--smoke")
  else:
    cmd += ["--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch),
            "--micro-batch", str(args.micro_batch), "--window", str(args.steps),
            "--windows", str(args.reps)]
  rc, log, secs = run_child(cmd, dict(os.environ), args.ours_timeout)
  res = {}
  if os.path.exists(res_path):
    with open(res_path) as f:
      res = json.load(f)
  res.update({"returncode": rc, "wall_s": secs, "log_tail": _tail(log), "command": " ".join(cmd)})
  print(f"ours: rc={rc} " + ", ".join(f"{k} {v.get('tokens_per_s', float('nan')):.0f} tok/s"
                                      for k, v in res.get("phases", {}).items()), flush=True)
  return res


def compare(original: dict, ours: dict) -> dict:
  out = {}
  base = original.get("tokens_per_s") if original.get("ok") else None
  mem = original.get("peak_memory_allocated_bytes")
  for name, ph in ours.get("phases", {}).items():
    if base and ph.get("tokens_per_s"):
      out[f"ours_{name}_vs_original_tokens_per_s"] = ph["tokens_per_s"] / base
    if mem and ph.get("peak_bytes_in_use_after"):
      out[f"ours_{name}_vs_original_peak_memory"] = ph["peak_bytes_in_use_after"] / mem
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--side", choices=("original",), help=argparse.SUPPRESS)
  ap.add_argument("--spec", help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  ap.add_argument("--ref", default=os.path.join(REPO, "ref_atma"),
                  help="checkout of kreasof-ai/atma (default: ref_atma/ in the repo root)")
  ap.add_argument("--torch-python", default=sys.executable,
                  help="Python with torch for the original's side (default: this one)")
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--global-batch", type=int, default=64)
  ap.add_argument("--micro-batch", type=int, default=16)
  ap.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
  ap.add_argument("--reps", type=int, default=2, help="timed repetitions per side")
  ap.add_argument("--warmup", type=int, default=3, help="original: untimed steps first")
  ap.add_argument("--mem-chunk", type=int, default=128,
                  help="original: AtmaConfig.mem_chunk (its trainers use 128)")
  ap.add_argument("--our-phases", default="step_synthetic,loop")
  ap.add_argument("--original-timeout", type=float, default=300.0,
                  help="seconds for the original's side (torch.compile + FLA autotuning)")
  ap.add_argument("--ours-timeout", type=float, default=240.0, help="seconds for our side")
  ap.add_argument("--skip-original", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--smoke", action="store_true",
                  help="CPU: tiny models, seq 64; the original only with torch and --ref present")
  args = ap.parse_args()
  if args.side == "original":
    with open(args.spec) as f:
      spec = json.load(f)
    res = original_side(spec)
    with open(args.result, "w") as f:
      json.dump(res, f, indent=2)
    return
  if args.smoke:
    args.seq_len, args.global_batch, args.micro_batch = 64, 4, 2
    args.steps, args.reps, args.warmup = 1, 2, 1
    args.our_phases = "step_synthetic"
  if min(args.steps, args.reps) < 1 or args.warmup < 0 or args.global_batch % args.micro_batch:
    sys.exit("--steps and --reps must be >= 1, --warmup >= 0, and --global-batch a multiple "
             "of --micro-batch")
  name = args.out or os.path.join(os.environ.get("OUT", os.path.join(REPO, "bench", "results")),
                                  "train_vs_original.json")
  os.makedirs(os.path.dirname(os.path.abspath(name)), exist_ok=True)
  out = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "smoke": args.smoke,
         "shapes": {"global_batch": args.global_batch, "micro_batch": args.micro_batch,
                    "seq_len": args.seq_len, "tokens_per_step": args.global_batch * args.seq_len},
         "timing": {"steps_per_repetition": args.steps, "repetitions": args.reps,
                    "original_warmup_steps": args.warmup},
         "original_recipe": "torch.compile(model); FLA_CUSTOM_OP=1; fused AdamW + Muon; clip 1.0; "
                            "loss.item() per micro-batch (train.py's step); synthetic tokens"}
  ref_config = reference_model_config(args.smoke, args.mem_chunk)

  def save():
    with open(name, "w") as f:
      json.dump(out, f, indent=2)

  with tempfile.TemporaryDirectory() as tmp:
    if args.skip_original:
      out["original"] = {"ok": False, "skipped": "--skip-original"}
    else:
      out["original"] = run_original(args, ref_config, tmp)
    save()
    out["ours"] = run_ours(args, tmp)
  out["comparison"] = compare(out["original"], out["ours"])
  save()
  for k, v in out["comparison"].items():
    print(f"{k}: {v:.3f}", flush=True)
  print("wrote", name)


if __name__ == "__main__":
  main()
