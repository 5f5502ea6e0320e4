"""Where the train step's memory goes, per remat policy (`model.remat`): compile only, no run.

For every policy: the compiled train step's `memory_analysis()` (XLA's buffer assignment:
arguments, outputs, aliased = donated state, temporaries; peak ~ arguments + outputs - aliased +
temporaries), and the residuals one conv block and one global block keep for their backward
(what `jax.ad_checkpoint.print_saved_residuals` lists), grouped by tag or source line, largest
first; they include batch-independent ones (e.g. kernel column slices) and values XLA fuses away.

On a CPU this is a PROXY for the GPU: the same program, but the XLA:CPU buffer assignment and
fusion decisions, and the XLA fallback kernels (`kernel_impl=auto` picks them on a CPU) instead
of the Pallas ones; the residual ranking (a property of the jaxpr) is the same on both.

    python3 bench/remat_memory.py --micro 1 --out $OUT/remat_memory_cpu.json   # 378M, T=2048
    python3 bench/remat_memory.py --smoke                          # tiny (CPU: ~1 min a policy)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
# the list print_saved_residuals prints; public only as that printer in this jax
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402

from atma_jax.config import REMAT_POLICIES, resolve  # noqa: E402
from atma_jax.model.block import Block  # noqa: E402
from atma_jax.model.remat import checkpoint_block  # noqa: E402
from atma_jax.model.testing import FAST_COMPILE  # noqa: E402
from atma_jax.train.mesh import batch_sharding, make_mesh  # noqa: E402
from atma_jax.train.state import setup_state  # noqa: E402
from atma_jax.train.step import make_train_step  # noqa: E402
from atma_jax.sharding import use_mesh  # noqa: E402
from train_throughput import memory_summary, remat_policies  # noqa: E402  (this directory)

SMOKE_SETS = ["model.num_layers=4", "model.hidden_size=64", "model.head_dim=16"]
GIB = 2.0 ** 30


def compiled_step_memory(cfg) -> dict:
  """memory_analysis() of the train step compiled (not run) on one device + its compile time."""
  mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
  setup = setup_state(cfg, mesh)
  B, T = cfg.train.global_batch, cfg.train.seq_len
  tok = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sharding(mesh))
  t0 = time.perf_counter()
  # on a CPU, LLVM at -O0: compile time halves; buffer assignment (HLO level) is unchanged
  options = FAST_COMPILE if jax.devices()[0].platform == "cpu" else None
  with use_mesh(mesh):
    lowered = make_train_step(cfg, setup, mesh).jitted.lower(setup.abstract,
                                                             {"inputs": tok, "targets": tok})
  compiled = lowered.compile(options)
  return {**memory_summary(compiled), "compile_s": time.perf_counter() - t0}


def block_residuals(cfg, layer: int, micro: int, policy: str, top: int) -> dict:
  """Residuals block `layer` keeps under `policy` for [micro, T] tokens, grouped by source."""
  mcfg = cfg.model
  block = Block(mcfg, layer, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(block)
  dt = jnp.dtype(mcfg.compute_dtype)
  x = jnp.zeros((micro, cfg.train.seq_len, mcfg.hidden_size), dt)

  def run(state, x, rng):
    out, reg, align = nnx.merge(graphdef, state)(x, rng=rng)
    return jnp.sum(out.astype(jnp.float32)) + reg + align

  fn = checkpoint_block(run, policy)
  groups = collections.defaultdict(lambda: [0, 0, ""])
  total = 0
  for aval, what in saved_residuals(fn, state, x, jax.random.key(0)):
    if "from the argument" in what:  # parameters and the block input: not activations
      continue
    nbytes = int(np.prod(aval.shape)) * aval.dtype.itemsize
    total += nbytes
    # a tagged value by its tag (its source line is remat.tag's), others by their source line
    key = what.split(" from ")[0] if what.startswith("named") else what.split(" from ")[-1]
    g = groups[key]
    g[0] += nbytes
    g[1] += 1
    g[2] = f"{aval.dtype}{list(aval.shape)} {what.split(' from ')[0]}"
  ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
  return {"layer": layer, "is_global": mcfg.is_global(layer), "activation_bytes": total,
          "top": [{"bytes": b, "count": n, "example": ex, "source": src}
                  for src, (b, n, ex) in ranked]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="atma_378m")
  ap.add_argument("--policies", default=",".join(REMAT_POLICIES))
  ap.add_argument("--micro", type=int, default=1, help="micro-batch (sequences)")
  ap.add_argument("--n-micro", type=int, default=1, help="micro-steps per train step")
  ap.add_argument("--seq-len", type=int, default=2048)
  ap.add_argument("--top", type=int, default=8, help="residual sources listed per block")
  ap.add_argument("--no-step", action="store_true", help="residuals only (no step compile)")
  ap.add_argument("--set", dest="extra", action="append", default=[])
  ap.add_argument("--out", default=None)
  ap.add_argument("--smoke", action="store_true", help="tiny preset, seq 64: a CPU check")
  args = ap.parse_args(argv)
  policies = remat_policies(args.policies)  # errors before any compute
  if args.smoke:
    args.preset, args.seq_len = "tiny", 64
    args.extra = SMOKE_SETS + args.extra
  base = [f"train.seq_len={args.seq_len}", f"train.micro_batch={args.micro}",
          f"train.global_batch={args.micro * args.n_micro}", "mesh.data=1", "mesh.fsdp=1",
          "mesh.tensor=1"] + args.extra
  resolve(args.preset, base)  # config errors before any compute
  dev = jax.devices()[0]
  out = {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
         "jax": jax.__version__, "python": platform.python_version(), "preset": args.preset,
         "micro_batch": args.micro, "n_micro": args.n_micro, "seq_len": args.seq_len,
         "overrides": base, "policies": {},
         "note": ("memory_analysis of the compiled step (bytes); static_peak_bytes = "
                  "argument + output - alias + temp. " + ("CPU PROXY: XLA:CPU buffer assignment and the XLA "
                  "fallback kernels, not the GPU's." if dev.platform == "cpu" else ""))}
  name = args.out or os.path.join(os.environ.get("OUT", "."), f"remat_memory_{dev.platform}.json")
  os.makedirs(os.path.dirname(os.path.abspath(name)) or ".", exist_ok=True)
  for policy in policies:
    cfg = resolve(args.preset, base + [f"model.remat={policy}"])
    glob = next(l for l in range(cfg.model.num_layers) if cfg.model.is_global(l))
    conv = next((l for l in range(cfg.model.num_layers) if not cfg.model.is_global(l)), None)
    res = {"blocks": [block_residuals(cfg, l, args.micro, policy, args.top)
                      for l in (conv, glob) if l is not None]}
    if not args.no_step:
      res["step"] = compiled_step_memory(cfg)
    out["policies"][policy] = res
    with open(name, "w") as f:
      json.dump(out, f, indent=2)
    s = res.get("step", {})
    blocks = "  ".join(f"{'global' if b['is_global'] else 'conv'} block keeps "
                       f"{b['activation_bytes'] / 2**20:.1f} MiB" for b in res["blocks"])
    step = (f"step: temp {s['temp_size_in_bytes'] / GIB:.2f} GiB, arguments "
            f"{s['argument_size_in_bytes'] / GIB:.2f}, outputs {s['output_size_in_bytes'] / GIB:.2f}"
            f", aliased {s['alias_size_in_bytes'] / GIB:.2f}, static peak "
            f"{s['static_peak_bytes'] / GIB:.2f} GiB (compile {s['compile_s']:.0f}s)" if s else "")
    print(f"{policy:12s} {blocks}  {step}", flush=True)
  print("wrote", name)
  return out


if __name__ == "__main__":
  main()
