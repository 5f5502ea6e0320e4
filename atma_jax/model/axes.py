"""Logical-axis metadata of the model parameters, and their PartitionSpecs on a mesh.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names from
`atma_jax.sharding.LOGICAL_RULES` (e.g. `("embed", "mlp")`). These helpers turn an
`nnx.State` of params (or an abstract one from `nnx.eval_shape`) into matching pytrees.
"""

from __future__ import annotations

import jax
from flax import nnx

from atma_jax.sharding import logical_to_spec


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_axes(params: nnx.State) -> dict[str, tuple[str | None, ...]]:
  """{dotted parameter path: logical axis names} for every parameter in `params`."""
  out = {}
  for path, v in nnx.to_flat_state(params):
    axes = v.get_metadata().get("out_sharding")
    if axes is None:
      raise ValueError(f"parameter {'.'.join(map(str, path))} has no logical axis names "
                       "(build it with atma_jax.model.init.param)")
    out[".".join(map(str, path))] = tuple(axes)
  return out


def param_partition_specs(params: nnx.State, mesh=None) -> nnx.State:
  """Same tree as `params` with each leaf a PartitionSpec for `mesh` (default: the active one)."""
  return jax.tree.map(lambda v: v.replace(logical_to_spec(v.get_metadata()["out_sharding"], mesh)),
                      params, is_leaf=_is_var)
