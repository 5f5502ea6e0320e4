"""Device mesh (data, fsdp, tensor) and the shardings of parameters and batches.

`make_mesh(MeshConfig)` builds the mesh (one axis may be -1 = all remaining devices);
`check_batch_divides(mesh, TrainConfig)` rejects global / micro batches that don't split over
the batch axes; `param_shardings(mesh, params)` turns each parameter's logical-axis metadata
into a `NamedSharding` through `atma_jax.sharding.logical_to_spec`, replicating (and reporting)
any dimension that its mesh axes do not divide.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atma_jax.config import ConfigError, MeshConfig, TrainConfig
from atma_jax.sharding import MESH_AXES, entry_axes, entry_size, logical_to_spec
from atma_jax.train.optimizer import dotted_path

BATCH_AXES = ("batch", "seq")  # logical names of a token batch [B, T]


def mesh_shape(mcfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  sizes = [mcfg.data, mcfg.fsdp, mcfg.tensor]
  for name, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{name}={s}: each mesh axis must be a positive size or -1 "
                        "(= all remaining devices).")
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide "
          f"the {num_devices} available devices; choose sizes whose product divides {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh data x fsdp x tensor = {' x '.join(map(str, sizes))} = {math.prod(sizes)} devices, "
        f"but {num_devices} are available; make the product equal the device count "
        "(or set one axis to -1).")
  return tuple(sizes)


def make_mesh(mcfg: MeshConfig, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mcfg, len(devices))
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # non-TPU / odd topologies: plain row-major order
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divides(mesh: Mesh, tcfg: TrainConfig) -> None:
  """Global and micro batch must split evenly over data x fsdp (shapes that divide the mesh)."""
  n = batch_parallelism(mesh)
  for name in ("global_batch", "micro_batch"):
    val = getattr(tcfg, name)
    if val % n:
      raise ConfigError(
          f"train.{name}={val} does not divide the mesh's batch axes data x fsdp = "
          f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {n}; use a multiple of {n} "
          "(or change mesh.data / mesh.fsdp).")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(BATCH_AXES, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_names(var: nnx.Variable) -> tuple | None:
  meta = var.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if meta.get(key) is not None:
      return tuple(meta[key])
  return None


def _fit_spec(spec: P, shape, mesh: Mesh, path: str, notes: list[str]) -> P:
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, (size, entry) in enumerate(zip(shape, entries)):
    n = entry_size(mesh, entry)
    if n > 1 and size % n:
      notes.append(f"{path}: dim {dim} (size {size}) not divisible by mesh axes {entry_axes(entry)} "
                   f"(size {n}); replicated")
      entry = None
    out.append(entry)
  return P(*out)


def param_shardings(mesh: Mesh, params, notes: list[str] | None = None):
  """Same tree as `params` (an nnx.State of Params, possibly abstract) with NamedSharding leaves.

  A parameter without logical-axis metadata is replicated and reported in `notes`.
  """
  notes = [] if notes is None else notes

  def one(path, var):
    name = dotted_path(path)
    names = logical_names(var) if isinstance(var, nnx.Variable) else None
    shape = var.get_value().shape if isinstance(var, nnx.Variable) else var.shape
    if names is None:
      notes.append(f"{name}: no logical axis metadata; replicated")
      spec = P()
    else:
      if len(names) != len(shape):
        raise ValueError(f"parameter {name}: logical axes {names} do not match its shape {shape}")
      spec = _fit_spec(logical_to_spec(names, mesh), shape, mesh, name, notes)
    sh = NamedSharding(mesh, spec)
    return var.replace(sh) if isinstance(var, nnx.Variable) else sh

  return jax.tree_util.tree_map_with_path(one, params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_fraction(sharding: NamedSharding) -> int:
  """Number of devices one copy of the array is split over (1 = replicated)."""
  return math.prod(entry_size(sharding.mesh, e) for e in sharding.spec)
