"""Parameter initialization: PyTorch-default draws and the two init schemes (ATMA_SPEC §2.7, §10.1).

Every module draws its parameters at construction with the PyTorch defaults (below); `Atma` then
calls `apply_init_scheme`, which zeroes parameters by name exactly as the reference trainers do.

PyTorch defaults reproduced here
  Linear (weight and bias)   U(-1/sqrt(in), +1/sqrt(in))      (kaiming_uniform with a = sqrt(5))
  depthwise Conv1d weight    U(-1/sqrt(K), +1/sqrt(K))        (fan_in = K for groups = channels)
  Embedding                  N(0, 1)
  RMSNorm weight             ones
  Polar per-head scalars     null_base 2.0, null_slope_raw 0.5, len_gain_raw -1.0,
                             mag_beta_raw -1.5, v_null 0

Init schemes (`ModelConfig.init_scheme`)
  "reference"    the recipe that produced every published checkpoint: after the defaults, zero
                 EVERY parameter whose torch name contains "proj" - `mlp.proj`, `attn.proj`,
                 `attn.mu_proj`, `attn.mem.proj`, the LM head `proj`, and also both projections
                 of the LFM2 conv mixers, `attn.in_proj` and `attn.out_proj`.
  "live_mixers"  the same, except the LFM2 `in_proj` keeps its default draw (its `out_proj`
                 stays zero), so the conv mixers receive gradient from step 1.

Finding (for the README). The reference trainers zero every parameter whose name contains
"proj". For the 12 LFM2 conv mixers that hits both `in_proj` and `out_proj`. The mixer computes
`out_proj(C * conv(B * x))` with `[B | C | x] = in_proj(h)`: with `in_proj = 0` the input of
`out_proj` is exactly zero, so `out_proj.weight` gets zero gradient; with `out_proj.weight = 0`
no gradient reaches `in_proj`. Neither ever moves (Muon and AdamW map a zero gradient to a zero
update; weight decay keeps zero at zero), and only `out_proj.bias` trains. Every reference
checkpoint is therefore 4 global (attention + memory) mixers, 16 MLPs, and 12 mixers that add a
learned constant vector - the logged conv-mixer output statistics are identical at every
context length. `tests/test_model_grad.py` checks the zero gradient exactly. "reference"
reproduces the published model; "live_mixers" keeps `in_proj` alive so the mixers can learn
(the gradient of `out_proj` is then non-zero at step 0, and `in_proj` follows from step 1).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Polar structural-prior values (softplus^-1 of the targets g ~ 0.3, slope ~ 1, beta ~ 0.2).
NULL_BASE_INIT = 2.0
NULL_SLOPE_RAW_INIT = 0.5
LEN_GAIN_RAW_INIT = -1.0
MAG_BETA_RAW_INIT = -1.5

INIT_SCHEMES = ("reference", "live_mixers")


def uniform(key: jax.Array, shape: Sequence[int], bound: float, dtype) -> jax.Array:
  """U(-bound, +bound) drawn in fp32, stored in `dtype`."""
  return jax.random.uniform(key, tuple(shape), jnp.float32, -bound, bound).astype(dtype)


def linear_bound(fan_in: int) -> float:
  """Bound of torch's default nn.Linear draw (weight and bias): 1 / sqrt(in_features)."""
  return 1.0 / math.sqrt(fan_in)


def conv_bound(kernel_size: int) -> float:
  """Bound of torch's default depthwise nn.Conv1d weight draw: 1 / sqrt(K)."""
  return 1.0 / math.sqrt(kernel_size)


def normal(key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
  """N(0, 1) drawn in fp32, stored in `dtype` (torch's nn.Embedding default)."""
  return jax.random.normal(key, tuple(shape), jnp.float32).astype(dtype)


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
  """An nnx.Param with logical axis names (`out_sharding`), resolved later by the mesh rules."""
  axes = tuple(axes)
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match a parameter of shape {value.shape}")
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _path_names(path: Sequence) -> list[str]:
  return [str(p) for p in path]


def zero_rule(scheme: str) -> Callable[[Sequence[str]], bool]:
  """Returns `rule(path_names) -> bool`: whether the init scheme zeroes that parameter."""
  if scheme not in INIT_SCHEMES:
    raise ValueError(f"unknown init scheme {scheme!r}; set model.init_scheme to one of "
                     f"{', '.join(INIT_SCHEMES)}")

  def rule(names: Sequence[str]) -> bool:
    modules = list(names[:-1])  # module path; the leaf name ("kernel", "bias", ...) is excluded
    if not any("proj" in m for m in modules):
      return False
    if scheme == "live_mixers" and modules and modules[-1] == "in_proj":
      return False
    return True

  return rule


def apply_init_scheme(model: nnx.Module, scheme: str) -> list[str]:
  """Zeroes, in place, every parameter the scheme zeroes; returns their dotted names."""
  rule = zero_rule(scheme)
  zeroed = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      names = _path_names(path)
      if rule(names):
        node.set_value(jnp.zeros_like(node.get_value()))
        zeroed.append(".".join(names))
  return zeroed
