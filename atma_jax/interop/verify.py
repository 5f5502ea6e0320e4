"""`verify`: the same random model in JAX and in the PyTorch reference, logits compared.

For each supported variant (polar / nope / rope x memory on/off x window on/off) on a small
config (spec §12: vocab 256, 4 layers, D 256, d 64 -> 4 query / 1 KV heads, T 64 > window 16,
memory chunk 32 so the scan crosses chunks), the JAX side
  1. builds Atma(cfg) and overwrites EVERY parameter with a random draw (all `proj` weights
     nonzero, polar scalars and v_null perturbed, norms not ones, memory gates random), so every
     branch reaches the logits; the embedding is drawn in bf16 (the reference's storage dtype);
  2. exports it with `state_dict_from_params` to model.safetensors + config.json, with ids;
  3. runs its own forward in fp32 (compute and params fp32) -> logits;
then `torch_side.py` runs in a separate Python with torch (`--torch-python`), loads the same
files into the reference's training `Model` (and the `ReferenceModel` oracle for polar), and
writes its logits back. Reported: max |logits_jax - logits_torch| per variant (fp32).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Iterable

import numpy as np

from atma_jax.config import ModelConfig
from atma_jax.interop import layout as L
from atma_jax.interop.convert import InteropError, state_dict_from_params
from atma_jax.interop.files import write_reference_checkpoint
from atma_jax.interop.ref_config import reference_config

TOLERANCE = 1e-4
WINDOW = 16


@dataclasses.dataclass(frozen=True)
class Variant:
  attn_type: str
  mem: bool
  window: bool

  @property
  def name(self) -> str:
    return f"{self.attn_type}-mem{int(self.mem)}-win{int(self.window)}"


def all_variants() -> list[Variant]:
  return [Variant(a, m, w) for a in ("polar", "nope", "rope") for m in (True, False)
          for w in (False, True)]


def small_config(v: Variant, *, vocab: int = 256, layers: int = 4, hidden: int = 256,
                 head_dim: int = 64, impl: str = "xla") -> ModelConfig:
  return ModelConfig(
      vocab_size=vocab, num_layers=layers, hidden_size=hidden, head_dim=head_dim,
      attn_type=v.attn_type, mem_enabled=v.mem, attn_window=WINDOW if v.window else None,
      mem_chunk=32, param_dtype="float32", embed_dtype="bfloat16", compute_dtype="float32",
      kernel_impl=impl, init_scheme="reference")


def randomize(cfg: ModelConfig, params, seed: int):
  """Every parameter redrawn (by layout kind) so that no branch is a no-op."""
  import jax.numpy as jnp
  from flax import nnx
  rng = np.random.default_rng(seed)
  by_path = {e.path: e for e in L.reference_layout(cfg) if e.kind != "buffer"}
  new = []
  for path, var in nnx.to_flat_state(params):
    e = by_path[tuple(path)]
    leaf = var.get_value()
    shape, name = tuple(leaf.shape), e.key.rsplit(".", 1)[-1]
    if e.kind in ("linear_w", "linear_b"):  # torch's default bound 1/sqrt(in), proj included
      fan_in = by_path[tuple(path[:-1]) + ("kernel",)].shape[1]
      val = rng.uniform(-1.0, 1.0, shape) / np.sqrt(fan_in)
    elif e.kind == "conv":
      val = rng.uniform(-0.5, 0.5, shape)
    elif e.kind == "norm":
      val = 1.0 + 0.2 * rng.standard_normal(shape)
    elif e.kind == "embed":
      val = rng.standard_normal(shape)
    elif name == "v_null":
      val = rng.standard_normal(shape)
    else:  # polar per-head scalars: around their init values
      base = {"null_base": 2.0, "null_slope_raw": 0.5, "len_gain_raw": -1.0,
              "mag_beta_raw": -1.5}[name]
      val = base + 0.5 * rng.standard_normal(shape)
    new.append((path, var.replace(jnp.asarray(val, dtype=leaf.dtype))))
  return nnx.from_flat_state(new)


def jax_case(v: Variant, case_dir: str, *, seed: int, batch: int, seq: int, impl: str,
             precision: str = "highest", head_dim: int = 64) -> np.ndarray:
  """Builds, randomizes, exports one variant; returns the JAX logits [B, T, V] (fp32)."""
  import jax
  from flax import nnx

  from atma_jax.interop.convert import abstract_model
  cfg = small_config(v, impl=impl, head_dim=head_dim)
  graphdef, abstract = abstract_model(cfg)
  params = randomize(cfg, abstract, seed)  # every leaf drawn here (numpy), by layout kind
  sd = state_dict_from_params(cfg, params)
  write_reference_checkpoint(case_dir, sd, reference_config(cfg, max_position_embeddings=seq))
  ids = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
  np.save(os.path.join(case_dir, "ids.npy"), ids)

  @jax.jit
  def forward(params, ids):
    model = nnx.merge(graphdef, params)
    h, _ = model(ids)
    return model.logits(h)

  # fp32 vs fp32: without this, XLA on GPU runs fp32 matmuls in TF32 (~1e-3 logit error).
  with jax.default_matmul_precision(precision):
    return np.asarray(forward(params, ids), dtype=np.float32)


def run_torch_side(torch_python: str, reference_repo: str, workdir: str,
                   timeout: int = 1800) -> dict:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_side.py")
  cmd = [torch_python, script, "--reference-repo", reference_repo, "--workdir", workdir]
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  if proc.returncode != 0:
    raise InteropError(f"the torch side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n"
                       f"Fix: --torch-python must name a Python with torch, numpy and "
                       "safetensors installed, and --reference-repo a checkout of the original "
                       "repository.")
  with open(os.path.join(workdir, "torch_result.json")) as f:
    return json.load(f)


def verify(reference_repo: str, torch_python: str, *, variants: Iterable[Variant] | None = None,
           seed: int = 0, batch: int = 2, seq: int = 64, impl: str = "xla",
           precision: str = "highest", head_dim: int = 64, workdir: str | None = None) -> dict:
  """Runs every variant on both sides; returns {"rows": [...], "torch": version, ...}."""
  variants = list(variants or all_variants())
  tmp = None
  if workdir is None:
    tmp = tempfile.TemporaryDirectory(prefix="atma_verify_")
    workdir = tmp.name
  try:
    cases, jax_logits = [], {}
    for i, v in enumerate(variants):
      d = os.path.join(workdir, v.name)
      os.makedirs(d, exist_ok=True)
      jax_logits[v.name] = jax_case(v, d, seed=seed + 17 * i, batch=batch, seq=seq, impl=impl,
                                    precision=precision, head_dim=head_dim)
      cases.append({"name": v.name, "dir": d})
    with open(os.path.join(workdir, "manifest.json"), "w") as f:
      json.dump({"cases": cases}, f)
    res = run_torch_side(torch_python, reference_repo, workdir)
    rows = []
    for v in variants:
      info = res["cases"].get(v.name, {"error": "no result"})
      row = {"variant": v.name, "error": info.get("error")}
      d = os.path.join(workdir, v.name)
      if not row["error"]:
        lt = np.load(os.path.join(d, "logits_train.npy"))
        row["max_abs_train"] = float(np.max(np.abs(lt - jax_logits[v.name])))
        row["logit_scale"] = float(np.max(np.abs(lt)))
        ref_path = os.path.join(d, "logits_reference.npy")
        if os.path.exists(ref_path):
          lr = np.load(ref_path)
          row["max_abs_reference"] = float(np.max(np.abs(lr - jax_logits[v.name])))
          row["train_vs_reference"] = float(np.max(np.abs(lr - lt)))
      rows.append(row)
    return {"rows": rows, "torch": res.get("torch"), "python": res.get("python"),
            "shape": [batch, seq], "tolerance": TOLERANCE, "impl": impl, "precision": precision,
            "head_dim": head_dim,
            "jax_backend": _jax_backend()}
  finally:
    if tmp is not None:
      tmp.cleanup()


def format_table(result: dict) -> str:
  d = result.get("head_dim", 64)
  head = (f"verify: random fp32 model, vocab 256, 4 layers, D 256, d {d} ({256 // d} query / "
          f"{256 // d // 4} KV heads), B x T = "
          f"{result['shape'][0]} x {result['shape'][1]}, window {WINDOW}, torch "
          f"{result['torch']} (CPU), JAX on {result.get('jax_backend')} impl={result['impl']} "
          f"matmul precision={result.get('precision')}")
  lines = [head, "",
           f"{'variant':<18} {'max|dlogits| vs train.Model':>28} {'vs ReferenceModel':>18} "
           f"{'max|logit|':>10}  verdict"]
  for r in result["rows"]:
    if r.get("error"):
      lines.append(f"{r['variant']:<18} ERROR: {r['error'].strip().splitlines()[-1]}")
      continue
    ref = f"{r['max_abs_reference']:.3e}" if "max_abs_reference" in r else "-"
    worst = max(r["max_abs_train"], r.get("max_abs_reference", 0.0))
    ok = "ok" if worst <= result["tolerance"] else "FAIL"
    lines.append(f"{r['variant']:<18} {r['max_abs_train']:>28.3e} {ref:>18} "
                 f"{r['logit_scale']:>10.3f}  {ok}")
  return "\n".join(lines)


def _jax_backend() -> str:
  import jax
  return jax.default_backend()


def passed(result: dict) -> bool:
  return all(not r.get("error") and r["max_abs_train"] <= result["tolerance"] and
             r.get("max_abs_reference", 0.0) <= result["tolerance"] for r in result["rows"])


def default_torch_python() -> str | None:
  return os.environ.get("ATMA_TORCH_PYTHON") or (sys.executable if _has_torch() else None)


def _has_torch() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


__all__ = ["verify", "format_table", "passed", "all_variants", "Variant", "small_config",
           "randomize"]
