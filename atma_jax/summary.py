"""Per-module parameter table of an ATMA config, without allocating the parameters.

  python -m atma_jax.summary CONFIG [--set model.attn_type=nope ...] [--leaves]

CONFIG is a preset name (`tiny`, `atma_378m`) or a saved config .json. The model is built under
`nnx.eval_shape`, so the 378M model costs no memory. One row per module (its parameters' shapes,
dtypes, logical axes and count); the last line is exactly `total_params: N`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import OrderedDict

from flax import nnx

from atma_jax.config import ModelConfig, resolve
from atma_jax.errors import cli_boundary


def abstract_params(cfg: ModelConfig) -> nnx.State:
  """Abstract (ShapeDtypeStruct) parameter state of `Atma(cfg)`; nothing is allocated."""
  from atma_jax.model import Atma  # deferred: keeps `--help` fast
  model = nnx.eval_shape(lambda: Atma(cfg, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def count_params(cfg: ModelConfig) -> int:
  return sum(int(v.get_value().size) for _, v in nnx.to_flat_state(abstract_params(cfg)))


def module_rows(params: nnx.State) -> "OrderedDict[str, list[tuple[str, tuple, str, tuple]]]":
  """{module path: [(leaf name, shape, dtype, logical axes), ...]} in parameter order."""
  rows: OrderedDict = OrderedDict()
  for path, v in nnx.to_flat_state(params):
    names = [str(p) for p in path]
    module, leaf = ".".join(names[:-1]) or "<root>", names[-1]
    axes = tuple(v.get_metadata().get("out_sharding") or ())
    value = v.get_value()
    rows.setdefault(module, []).append((leaf, tuple(value.shape), str(value.dtype), axes))
  return rows


def format_table(params: nnx.State, leaves: bool = False) -> str:
  lines = []
  rows = module_rows(params)
  width = max(len(m) for m in rows) + 2
  lines.append(f"{'module':<{width}} {'params':>13}  leaves")
  total = 0
  for module, items in rows.items():
    n = sum(math.prod(shape) for _, shape, _, _ in items)
    total += n
    desc = "  ".join(f"{leaf}{list(shape)}:{dtype}" for leaf, shape, dtype, _ in items)
    lines.append(f"{module:<{width}} {n:>13,}  {desc}")
    if leaves:
      for leaf, shape, dtype, axes in items:
        lines.append(f"{'':<{width}} {math.prod(shape):>13,}    .{leaf} {list(shape)} {dtype} "
                     f"axes={axes}")
  lines.append(f"total_params: {total}")
  return "\n".join(lines)


@cli_boundary
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m atma_jax.summary",
                               description=__doc__.split("\n")[0])
  ap.add_argument("config", help="preset name (tiny, atma_378m) or a config .json")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override, e.g. --set model.mem_enabled=false (repeatable)")
  ap.add_argument("--leaves", action="store_true", help="also list every leaf with its axes")
  args = ap.parse_args(argv)
  cfg = resolve(args.config, args.set)
  print(f"config: {cfg.name}  attn_type={cfg.model.attn_type}  mem_enabled={cfg.model.mem_enabled}"
        f"  layers={cfg.model.num_layers}  hidden={cfg.model.hidden_size}")
  print(format_table(abstract_params(cfg.model), leaves=args.leaves))
  return 0


if __name__ == "__main__":
  sys.exit(main())
