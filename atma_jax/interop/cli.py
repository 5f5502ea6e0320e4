"""`python -m atma_jax.interop {export,import,verify}` — checkpoint interop with the PyTorch reference.

  export --checkpoint RUN_OR_STEP_DIR [--step N] --out DIR [--format safetensors|pt]
      our checkpoint -> the reference layout: model.safetensors (or weights.pt = {"model": sd}),
      config.json (every AtmaConfig field), tokenizer.json.
  import --weights PATH [--config config.json] --out RUN_DIR [--preset NAME] [--set k=v ...]
      model.safetensors or the reference's own weights.pt (+ config.json) -> a run directory
      that eval.py / load_model can open. Everything is validated before anything is written;
      weights holding NaN/Inf are refused; the embedding keeps the dtype it has in the file.
  verify --reference-repo PATH [--torch-python PY]
      the same random model in both frameworks, every variant; prints max |d logits| (fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from atma_jax.errors import UsageError, cli_boundary


def _export(args) -> int:
  from atma_jax.interop.convert import state_dict_from_params
  from atma_jax.interop.files import export_targets, write_reference_checkpoint
  from atma_jax.interop.ref_config import reference_config
  from atma_jax.interop.runs import load_run

  export_targets(args.out, args.format, args.overwrite)  # before the checkpoint is read
  cfg, _graphdef, params = load_run(args.checkpoint, step=args.step)
  sd = state_dict_from_params(cfg.model, params, embed_dtype=args.embed_dtype)
  ref_cfg = reference_config(cfg.model, max_position_embeddings=cfg.train.seq_len)
  paths = write_reference_checkpoint(args.out, sd, ref_cfg, fmt=args.format,
                                     overwrite=args.overwrite)
  n = sum(int(v.size) for k, v in sd.items() if not k.endswith("angular_freq"))
  print(f"exported {len(sd)} tensors ({n:,} parameters, {cfg.model.attn_type}, "
        f"mem={cfg.model.mem_enabled}, window={cfg.model.attn_window}) to:")
  for p in paths:
    print(f"  {p}")
  if cfg.model.embed_dtype != "bfloat16" and args.embed_dtype == "bfloat16":
    print(f"note: the embedding ({cfg.model.embed_dtype}) was rounded to bf16, the dtype the "
          "reference stores it in (--embed-dtype float32 keeps it exact).")
  return 0


def _import(args) -> int:
  from atma_jax.config import load_preset, override
  from atma_jax.interop.convert import model_from_state_dict
  from atma_jax.interop.files import read_json, read_state_dict, resolve_weights
  from atma_jax.interop.ref_config import model_config_from_reference
  from atma_jax.interop.runs import check_out_dir, save_run

  weights = resolve_weights(args.weights)
  config_path = args.config or os.path.join(os.path.dirname(os.path.abspath(weights)),
                                            "config.json")
  check_out_dir(args.out)
  base = load_preset(args.preset)
  model_cfg = model_config_from_reference(read_json(config_path, "reference config"),
                                          base=base.model)
  cfg = dataclasses.replace(base, model=model_cfg)
  if args.set:
    cfg = override(cfg, args.set)
  sd = read_state_dict(weights)
  cfg = _keep_file_embed_dtype(cfg, sd, base.name, explicit=any(
      s.split("=", 1)[0].strip() == "model.embed_dtype" for s in args.set))
  graphdef, params = model_from_state_dict(cfg.model, sd, source=f"weights {weights}")
  where = save_run(args.out, cfg, graphdef, params)
  print(f"imported {weights} ({cfg.model.attn_type}, mem={cfg.model.mem_enabled}, "
        f"window={cfg.model.attn_window}, {cfg.model.num_layers} layers, D={cfg.model.hidden_size})"
        f" -> {where}")
  return 0


def _keep_file_embed_dtype(cfg, sd, preset: str, explicit: bool):
  """The embedding keeps the precision it has in the file unless --set model.embed_dtype says
  otherwise: an fp32 table is not rounded to the preset's bf16 (nor a bf16 one widened)."""
  from atma_jax.interop.layout import BF16
  emb = sd.get("embed.weight")
  file_dtype = {BF16: "bfloat16", np.dtype(np.float32): "float32"}.get(
      np.dtype(getattr(emb, "dtype", np.float32)))
  if explicit or file_dtype is None or file_dtype == cfg.model.embed_dtype:
    return cfg
  print(f"note: embed.weight is {file_dtype} in the file; kept as {file_dtype} (the preset "
        f"{preset} says {cfg.model.embed_dtype}: --set model.embed_dtype={cfg.model.embed_dtype} "
        "converts it).", file=sys.stderr)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_dtype=file_dtype))


def _verify(args) -> int:
  from atma_jax.interop import verify as V
  torch_python = args.torch_python or V.default_torch_python()
  if not torch_python:
    raise UsageError("verify needs a Python with torch: pass --torch-python PATH (or set "
                     "ATMA_TORCH_PYTHON), e.g. a venv with `pip install torch numpy safetensors`.")
  variants = V.all_variants()
  if args.variants:
    want = set(args.variants.split(","))
    variants = [v for v in variants if v.name in want]
    if not variants:
      raise UsageError(f"--variants {args.variants!r} matches no variant; choose from "
                       f"{', '.join(v.name for v in V.all_variants())}")
  result = V.verify(args.reference_repo, torch_python, variants=variants, seed=args.seed,
                    batch=args.batch, seq=args.seq, impl=args.impl,
                    precision=args.matmul_precision, head_dim=args.head_dim,
                    workdir=args.workdir)
  print(V.format_table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  ok = V.passed(result)
  print(f"\n{'PASS' if ok else 'FAIL'}: every variant within {result['tolerance']:g}"
        if ok else f"\nFAIL: some variant exceeds {result['tolerance']:g}")
  return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m atma_jax.interop",
                               description="Checkpoint interop with the PyTorch ATMA reference.")
  sub = ap.add_subparsers(dest="cmd", required=True)

  e = sub.add_parser("export", help="our checkpoint -> reference layout")
  e.add_argument("--checkpoint", required=True, help="run directory or checkpoints/<step> dir")
  e.add_argument("--step", type=int, default=None,
                 help="export checkpoints/<STEP> of the run directory (default: the newest intact)")
  e.add_argument("--out", required=True, help="output directory")
  e.add_argument("--format", choices=("safetensors", "pt"), default="safetensors")
  e.add_argument("--embed-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="embedding dtype in the file (the reference saves bf16)")
  e.add_argument("--overwrite", action="store_true", help="replace files already in --out")
  e.set_defaults(fn=_export)

  i = sub.add_parser("import", help="reference weights -> our run directory")
  i.add_argument("--weights", required=True, help="model.safetensors, weights.pt, or their dir")
  i.add_argument("--config", default=None, help="reference config.json (default: beside weights)")
  i.add_argument("--out", required=True, help="new run directory (must not hold a checkpoint)")
  i.add_argument("--preset", default="atma_378m",
                 help="preset for everything but the architecture (dtypes, train, eval)")
  i.add_argument("--set", action="append", default=[], help="override, e.g. model.kernel_impl=xla")
  i.set_defaults(fn=_import)

  v = sub.add_parser("verify", help="JAX vs PyTorch logits on random weights, every variant")
  v.add_argument("--reference-repo", required=True, help="checkout of the original repository")
  v.add_argument("--torch-python", default=None, help="Python with torch (default: "
                 "$ATMA_TORCH_PYTHON, else this Python if it has torch)")
  v.add_argument("--variants", default=None, help="comma-separated subset, e.g. polar-mem1-win0")
  v.add_argument("--seed", type=int, default=0)
  v.add_argument("--batch", type=int, default=2)
  v.add_argument("--seq", type=int, default=64)
  v.add_argument("--head-dim", type=int, default=64,
                 help="64: 4 query / 1 KV head (spec 12); 32: 8 / 2, exercises the GQA map")
  v.add_argument("--impl", default="xla", help="JAX kernel backend (model.kernel_impl)")
  v.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "default"),
                 help="JAX fp32 matmul precision (GPU 'default' = TF32, ~1e-3 off)")
  v.add_argument("--workdir", default=None, help="keep the exchanged files here")
  v.add_argument("--json", default=None, help="also write the result as JSON")
  v.set_defaults(fn=_verify)
  return ap


@cli_boundary
def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return args.fn(args)
