"""The reference's state-dict layout (ATMA_SPEC §9) and its one-to-one map onto our parameters.

Every tensor of a PyTorch `weights.pt` is described by one `Entry`: its torch key, its torch
shape, and a `kind` that fixes how it maps to a leaf of our `nnx.Param` state:

| kind      | torch tensor                      | our leaf (path = torch module path + leaf)  |
|-----------|-----------------------------------|---------------------------------------------|
| embed     | `embed.weight` (V, D)             | `embed/embedding` [V, D] (unchanged)         |
| linear_w  | `<m>.weight` (out, in)            | `<m>/kernel` [in, out] (transposed)          |
| linear_b  | `<m>.bias` (out,)                 | `<m>/bias` [out] (unchanged)                 |
| conv      | `<m>.weight` (C, 1, K) depthwise  | `<m>/kernel` [K, C] (`kernel[k, c] = W[c, 0, k]`) |
| norm      | `<m>.weight` (D,)                 | `<m>/weight` [D] (unchanged)                 |
| raw       | polar vectors `attn.v_null` ...   | same path, unchanged                         |
| buffer    | `attn.rotary.angular_freq` (d/2,) | none: RoPE frequencies are a constant here   |

Numeric path components are block indices (`blocks.2.attn.q.weight` <-> `blocks/2/attn/q/kernel`).
Dtypes as the reference saves them: the embedding bf16, everything else fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_dtypes
import numpy as np

from atma_jax.config import ModelConfig

Kind = str  # "embed" | "linear_w" | "linear_b" | "conv" | "norm" | "raw" | "buffer"

_LEAF = {"embed": "embedding", "linear_w": "kernel", "linear_b": "bias", "conv": "kernel",
         "norm": "weight"}

ROPE_BUFFER = "attn.rotary.angular_freq"
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of the reference state dict."""

  key: str  # torch state-dict key
  shape: tuple[int, ...]  # torch shape
  kind: Kind

  @property
  def path(self) -> tuple[str | int, ...] | None:
    """Path of the matching leaf in our parameter state (None for buffers)."""
    if self.kind == "buffer":
      return None
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in self.key.split(".")]
    if self.kind in _LEAF:
      parts[-1] = _LEAF[self.kind]
    return tuple(parts)

  @property
  def jax_shape(self) -> tuple[int, ...]:
    if self.kind == "linear_w":
      out_f, in_f = self.shape
      return (in_f, out_f)
    if self.kind == "conv":
      c, _, k = self.shape
      return (k, c)
    return self.shape

  @property
  def dtype(self) -> np.dtype:
    """The dtype the reference trainers save this tensor in."""
    return BF16 if self.kind == "embed" else F32


def _linear(prefix: str, in_f: int, out_f: int) -> Iterator[Entry]:
  yield Entry(f"{prefix}.weight", (out_f, in_f), "linear_w")
  yield Entry(f"{prefix}.bias", (out_f,), "linear_b")


def _global_mixer(p: str, cfg: ModelConfig) -> Iterator[Entry]:
  D, H, G, d, K = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.attn_kernel_size)
  yield from _linear(f"{p}.q", D, 2 * H * d)
  yield from _linear(f"{p}.k", D, G * d)
  yield from _linear(f"{p}.v", D, G * d)
  if cfg.attn_type == "rope":
    yield Entry(f"{p}.rotary.angular_freq", (d // 2,), "buffer")
  else:
    yield Entry(f"{p}.canon_q.weight", (H * d, 1, K), "conv")
    yield Entry(f"{p}.canon_k.weight", (G * d, 1, K), "conv")
    yield Entry(f"{p}.canon_v.weight", (G * d, 1, K), "conv")
  yield from _linear(f"{p}.proj", H * d, D)
  if cfg.attn_type == "polar":
    yield from _linear(f"{p}.mu_proj", H, D)
    yield Entry(f"{p}.v_null", (H, d), "raw")
    for name in ("null_base", "null_slope_raw", "len_gain_raw", "mag_beta_raw"):
      yield Entry(f"{p}.{name}", (H,), "raw")
  if cfg.mem_enabled:
    yield from _linear(f"{p}.mem.w_gamma", D, H)
    yield from _linear(f"{p}.mem.w_beta", D, H)
    yield from _linear(f"{p}.mem.gate", D, H * d)
    yield from _linear(f"{p}.mem.proj", H * d, D)


def reference_layout(cfg: ModelConfig) -> list[Entry]:
  """Every tensor of the reference state dict for `cfg`, in module order (spec §9)."""
  D, V, F = cfg.hidden_size, cfg.vocab_size, cfg.mlp_ratio * cfg.hidden_size
  out = [Entry("embed.weight", (V, D), "embed")]
  for i in range(cfg.num_layers):
    b = f"blocks.{i}"
    if cfg.is_global(i):
      out += _global_mixer(f"{b}.attn", cfg)
    else:
      out += _linear(f"{b}.attn.in_proj", D, 3 * D)
      out.append(Entry(f"{b}.attn.conv.weight", (D, 1, cfg.conv_kernel_size), "conv"))
      out += _linear(f"{b}.attn.out_proj", D, D)
    out += _linear(f"{b}.mlp.fc", D, 2 * F)
    out += _linear(f"{b}.mlp.proj", F, D)
    out.append(Entry(f"{b}.norm1.weight", (D,), "norm"))
    out.append(Entry(f"{b}.norm2.weight", (D,), "norm"))
  out += _linear("proj", D, V)
  out.append(Entry("norm.weight", (D,), "norm"))
  return out


def num_reference_params(cfg: ModelConfig) -> int:
  """Parameter count as the reference logs it (buffers excluded)."""
  return sum(int(np.prod(e.shape)) for e in reference_layout(cfg) if e.kind != "buffer")


def rope_buffer(cfg: ModelConfig) -> np.ndarray:
  """The `attn.rotary.angular_freq` buffer value, from the model's own RoPE frequencies."""
  from atma_jax.model.rope import rope_frequencies  # the one copy of this formula
  return np.asarray(rope_frequencies(cfg.head_dim), dtype=np.float32)


def to_torch_layout(entry: Entry, leaf: np.ndarray) -> np.ndarray:
  """Our leaf -> the torch tensor (orientation and saved dtype)."""
  a = np.asarray(leaf)
  if entry.kind == "linear_w":
    a = a.T
  elif entry.kind == "conv":
    a = a.T[:, None, :]
  return np.ascontiguousarray(a.astype(entry.dtype))


def from_torch_layout(entry: Entry, tensor: np.ndarray, dtype) -> np.ndarray:
  """The torch tensor -> our leaf (orientation), cast to `dtype`."""
  a = np.asarray(tensor)
  if entry.kind == "linear_w":
    a = a.T
  elif entry.kind == "conv":
    a = a[:, 0, :].T
  return np.ascontiguousarray(a.astype(dtype))
