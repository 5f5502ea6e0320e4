"""PyTorch side of `python -m atma_jax.interop verify` (run as a script by a Python with torch).

    <torch-python> torch_side.py --reference-repo PATH --workdir DIR

Standalone: imports torch, numpy and safetensors only, never atma_jax or jax. For each case
listed in DIR/manifest.json (a directory holding model.safetensors, config.json and ids.npy
[B, T] int32) it builds the reference's training `Model` (train/model.py, from the checkout at
--reference-repo, imported via sys.path; the checkout is never modified), loads the weights with
strict key checking, and writes the fp32 logits of the ids to `logits_train.npy`. Polar variants
are also run through the repo's pure-PyTorch oracle `ReferenceModel` (model/reference.py) ->
`logits_reference.npy`. DIR/torch_result.json records versions and per-case errors.

CPU / fp32 setup, and why:
  * `attn_kernel="torch"`, `mem_kernel="torch"`, `attn_online=False`: the materialized Polar
    oracle and the pure-PyTorch chunked gated-delta scan (the Triton / FLA paths are CUDA-only).
  * train/model.py imports the Hugging Face `kernels` package at module level to fetch the CUDA
    causal-conv1d kernel. A stub module whose `get_kernel` raises is installed first, so the
    module takes its own pure-PyTorch conv fallback (and never reaches for the network).
  * The training Model stores the embedding as a bf16 parameter, which would make every
    activation bf16. The exported embedding is bf16 (as the trainers save it); it is loaded
    as is and then cast to fp32 (`model.embed.float()`, exact), so the whole forward is fp32.
  * The training Model's forward returns (CE sum, reg, align), not logits: we run its forward
    and capture the LM head output with a forward hook on `model.proj`, then apply the soft cap
    15 z / sqrt(z^2 + 225) that its forward applies before the cross-entropy (spec §2.1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import types


def _install_kernels_stub() -> None:
  """`from kernels import get_kernel` must succeed but yield no kernel (CPU fallback)."""
  stub = types.ModuleType("kernels")

  def get_kernel(name, *args, **kwargs):
    raise ImportError(f"kernels stub (atma_jax verify): no hub kernel {name!r} on CPU")

  stub.get_kernel = get_kernel
  sys.modules["kernels"] = stub


def _import_reference(repo: str):
  repo = os.path.abspath(repo)
  for rel in ("train/model.py", "model/config.py", "model/reference.py"):
    if not os.path.exists(os.path.join(repo, rel)):
      raise SystemExit(f"--reference-repo {repo} has no {rel}; pass a checkout of the original "
                       "ATMA PyTorch repository.")
  sys.path.insert(0, repo)
  _install_kernels_stub()
  # train/model.py prints its fallback notices on stdout; keep our stdout clean.
  with contextlib.redirect_stdout(sys.stderr):
    from model.config import AtmaConfig
    from model.reference import ReferenceModel
    from train.model import Model
  return AtmaConfig, Model, ReferenceModel


def _atma_config(AtmaConfig, torch, config_json: dict):
  cfg = dict(config_json)
  cfg["dtype"] = getattr(torch, cfg.get("dtype", "bfloat16"))
  cfg["attn_kernel"] = "torch"
  cfg["mem_kernel"] = "torch"
  cfg["attn_online"] = False
  cfg["num_random_keys"] = 0
  return AtmaConfig(**cfg)


def _soft_cap(z):
  return 15.0 * z * (z.square() + 225.0).rsqrt()


def run_case(case_dir: str, classes, torch, np, load_file) -> dict:
  AtmaConfig, Model, ReferenceModel = classes
  with open(os.path.join(case_dir, "config.json")) as f:
    config_json = json.load(f)
  cfg = _atma_config(AtmaConfig, torch, config_json)
  sd = load_file(os.path.join(case_dir, "model.safetensors"))
  ids = torch.from_numpy(np.load(os.path.join(case_dir, "ids.npy")).astype(np.int64))
  info = {"embed_dtype_saved": str(sd["embed.weight"].dtype)}

  torch.manual_seed(0)
  model = Model(cfg)
  model.load_state_dict(sd, strict=True)  # bf16 embedding into the bf16 parameter: exact
  model.embed.float()  # fp32 comparison: cast the (bf16-valued) table to fp32, exactly
  model.eval()
  captured = {}
  hook = model.proj.register_forward_hook(lambda m, i, o: captured.__setitem__("z", o))
  with torch.no_grad():
    targets = torch.zeros_like(ids)
    model(ids, targets)
  hook.remove()
  logits = _soft_cap(captured["z"].float())
  np.save(os.path.join(case_dir, "logits_train.npy"), logits.numpy())
  info["train_model"] = "ok"

  if cfg.attn_type == "polar":
    ref = ReferenceModel(cfg)
    ref.load_state_dict(sd, strict=True)
    ref.float()
    ref.eval()
    with torch.no_grad():
      out = ref(ids)
    np.save(os.path.join(case_dir, "logits_reference.npy"), out.float().numpy())
    info["reference_model"] = "ok"
  return info


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reference-repo", required=True)
  ap.add_argument("--workdir", required=True)
  args = ap.parse_args(argv)

  import numpy as np
  import torch
  from safetensors.torch import load_file

  torch.set_num_threads(int(os.environ.get("ATMA_TORCH_THREADS", "2")))
  classes = _import_reference(args.reference_repo)
  with open(os.path.join(args.workdir, "manifest.json")) as f:
    manifest = json.load(f)
  result = {"torch": torch.__version__, "python": sys.version.split()[0], "cases": {}}
  for case in manifest["cases"]:
    try:
      result["cases"][case["name"]] = run_case(case["dir"], classes, torch, np, load_file)
    except Exception:  # noqa: BLE001 - report per case, keep going
      result["cases"][case["name"]] = {"error": traceback.format_exc(limit=6)}
  with open(os.path.join(args.workdir, "torch_result.json"), "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
