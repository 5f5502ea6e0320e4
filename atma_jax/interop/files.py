"""Reading and writing the reference's checkpoint files (ATMA_SPEC §6.9).

A reference checkpoint directory holds
  weights.pt        torch.save({"model": state_dict}) (any `_orig_mod.` prefix stripped), or our
  model.safetensors the same tensors through safetensors' numpy API (bf16 via ml_dtypes)
  config.json       every AtmaConfig field, `dtype` as the string "bfloat16"
  tokenizer.json    {"tokenizer_name": "gpt2"}
torch is imported lazily and only for `.pt` files.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import numpy as np

from atma_jax.errors import check_writable_dir
from atma_jax.interop.convert import InteropError, strip_compile_prefix
from atma_jax.interop.layout import BF16

WEIGHT_FILES = {"safetensors": "model.safetensors", "pt": "weights.pt"}
TOKENIZER_JSON = {"tokenizer_name": "gpt2"}


def require_torch(why: str):
  try:
    import torch
  except ImportError:
    raise InteropError(
        f"{why} needs PyTorch, which is not installed in this environment. Fix: convert the "
        "file with a Python that has torch (e.g. `pip install torch`), or use the "
        "model.safetensors format instead.") from None
  return torch


# ---------------------------------------------------------------------------------------------
# Reading.


def _torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(BF16)
  return t.numpy()


def resolve_weights(path: str) -> str:
  """A weights file, or a directory holding model.safetensors or weights.pt."""
  if os.path.isdir(path):
    for name in WEIGHT_FILES.values():
      cand = os.path.join(path, name)
      if os.path.exists(cand):
        return cand
    raise InteropError(f"{path} holds neither model.safetensors nor weights.pt; pass the "
                       "weights file itself with --weights.")
  if not os.path.exists(path):
    raise InteropError(f"weights file {path} does not exist; pass a model.safetensors or "
                       "weights.pt file (or the directory holding it).")
  return path


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a model.safetensors or a reference weights.pt, as numpy, prefix stripped."""
  path = resolve_weights(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      sd = load_file(path)
    except Exception as e:  # noqa: BLE001 - report any parse failure the same way
      raise InteropError(f"cannot read {path} as safetensors ({e}).") from None
  elif path.endswith((".pt", ".pth", ".bin")):
    torch = require_torch(f"reading {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
      obj = obj["model"]  # trainers save {"model": sd} (+ "finetune" metadata sometimes)
    if not isinstance(obj, Mapping):
      raise InteropError(f"{path} holds a {type(obj).__name__}, not a state dict or "
                         '{"model": state_dict}.')
    sd = {k: _torch_to_numpy(v) for k, v in obj.items() if hasattr(v, "dtype")}
  else:
    raise InteropError(f"unknown weights format {path!r}: expected a .safetensors or .pt file.")
  return strip_compile_prefix(sd)


def read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise InteropError(f"{what} {path} does not exist.") from None
  except json.JSONDecodeError as e:
    raise InteropError(f"{what} {path} is not valid JSON ({e}).") from None


# ---------------------------------------------------------------------------------------------
# Writing (each file lands atomically, after every check has passed).


def _file_mode() -> int:
  """The mode `open()` gives a new file: 0o666 less the process umask (0o644 under 022)."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def _atomic(path: str, write) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, _file_mode())  # mkstemp makes 0600; the result is an ordinary file
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def export_targets(out_dir: str, fmt: str, overwrite: bool) -> list[str]:
  """The three files an export writes into `out_dir`, after checking it can and may write them."""
  if fmt not in WEIGHT_FILES:
    raise InteropError(f"unknown format {fmt!r}; use one of {', '.join(WEIGHT_FILES)}.")
  if fmt == "pt":
    require_torch("--format pt")
  targets = [os.path.join(out_dir, n) for n in (WEIGHT_FILES[fmt], "config.json",
                                                "tokenizer.json")]
  existing = [t for t in targets if os.path.exists(t)]
  if existing and not overwrite:
    raise InteropError(f"{out_dir} already holds {', '.join(os.path.basename(t) for t in existing)};"
                       " pick an empty --out directory or pass --overwrite.")
  check_writable_dir(out_dir, "--out")
  return targets


def _write_safetensors(sd: Mapping[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file
  _atomic(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp,
                                      metadata={"format": "pt"}))


def _write_pt(sd: Mapping[str, np.ndarray], path: str) -> None:
  torch = require_torch("writing weights.pt")

  def to_torch(a: np.ndarray):
    if a.dtype == BF16:
      return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))

  model = {k: to_torch(v) for k, v in sd.items()}
  _atomic(path, lambda tmp: torch.save({"model": model}, tmp))


def write_reference_checkpoint(out_dir: str, sd: Mapping[str, np.ndarray],
                               config_json: Mapping[str, Any], fmt: str = "safetensors",
                               overwrite: bool = False) -> list[str]:
  """Writes weights + config.json + tokenizer.json into `out_dir`; returns the paths written."""
  targets = export_targets(out_dir, fmt, overwrite)
  os.makedirs(out_dir, exist_ok=True)
  (_write_pt if fmt == "pt" else _write_safetensors)(sd, targets[0])
  for path, obj in ((targets[1], dict(config_json)), (targets[2], TOKENIZER_JSON)):
    _atomic(path, lambda tmp, obj=obj: _dump_json(obj, tmp))
  return targets


def _dump_json(obj: Any, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
