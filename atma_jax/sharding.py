"""Logical axis names and the one table that maps them to mesh axes.

Model code names axes logically (`("batch", "seq", "embed")`) and never mentions the mesh; this
module turns logical names into `PartitionSpec`s for the active mesh. Outside a mesh (plain CPU
tests) every constraint is a no-op.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding),
`tensor` (heads / MLP hidden).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). One place.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "head_dim": None,
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",  # flattened per-head projection features (q with gate, mem gate)
    "kv": None,  # flattened K/V features (2 KV heads: too few to split)
    "head_scalars": None,  # per-head scalars and small per-head vectors
    "conv_taps": None,
    "norm": None,
    "mixer": "tensor",  # LFM2 in_proj outputs / out_proj inputs
    "layers": None,  # the stacked-blocks axis of model.scan_layers (model/scan.py)
}

_state = threading.local()


def current_mesh() -> Mesh | None:
  return getattr(_state, "mesh", None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
  """Activates `mesh` for `constrain` (and jax's own mesh context) inside the block."""
  prev = current_mesh()
  _state.mesh = mesh
  try:
    if mesh is None:
      yield
    else:
      # jax >= 0.7 renamed `jax.sharding.use_mesh` to `jax.set_mesh`
      set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
      with set_mesh(mesh):
        yield
  finally:
    _state.mesh = prev


def entry_axes(entry) -> tuple[str, ...]:
  """Mesh axes of one PartitionSpec entry (None, one axis name, or a tuple of names)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def entry_size(mesh: Mesh, entry) -> int:
  """Devices one PartitionSpec entry splits its dimension over on `mesh`."""
  size = 1
  for a in entry_axes(entry):
    size *= mesh.shape[a]
  return size


def logical_to_spec(names: Sequence[str | None], mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical axis `names`; mesh axes of size 1 or absent are dropped."""
  mesh = mesh if mesh is not None else current_mesh()
  used: set[str] = set()
  out = []
  for name in names:
    target = LOGICAL_RULES.get(name) if name is not None else None
    if name is not None and name not in LOGICAL_RULES:
      raise KeyError(f"logical axis {name!r} has no rule in atma_jax.sharding.LOGICAL_RULES")
    axes = entry_axes(target)
    keep = tuple(a for a in axes
                 if a not in used and (mesh is None or (a in mesh.shape and mesh.shape[a] > 1)))
    used.update(keep)
    out.append(keep[0] if len(keep) == 1 else (keep if keep else None))
  return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op when no mesh is active."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, mesh)))
