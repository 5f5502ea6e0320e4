"""Gradient accumulation over the N micro-batches of one optimizer step (`train.grad_reduce`).

    acc(params, inputs_NMT, targets_NMT, rng_step) -> (grads fp32 like params, ce, reg, align)

`grad_fn(params, inputs_MT, targets_MT, rng) -> ((loss, (ce, reg, align)), grads)` is the
micro-step gradient of step.py; micro-step k draws `fold_in(rng_step, k)`.

"micro" (default): `lax.scan` over the micro-batches with the fp32 accumulator sharded like the
parameters. The micro-batch is spread over the data axis and the parameters are not, so GSPMD
all-reduces every micro-step's gradients before adding them.

"step": the same scan inside `shard_map` over the mesh: each device accumulates the gradients of
its own rows of every micro-batch (fp32, a full-size local accumulator, the memory of a
replicated one) and one `psum` per optimizer step sums them. Pure data parallelism only (mesh
fsdp = tensor = 1, parameters replicated) and no batch-statistic auxiliary terms (sigreg_mode
"baseline", no distractor keys): those are computed per device there, not over the whole
micro-batch. Same gradients up to float summation order.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atma_jax.config import Config, ConfigError
from atma_jax.sharding import use_mesh


def _scan(grad_fn, params, inputs_NMT, targets_NMT, rng_step, zeros):
  def body(carry, xs):
    acc, ce_acc, reg_acc, align_acc = carry
    k, inp, tgt = xs
    (_, (ce, reg, align)), g = grad_fn(params, inp, tgt, jax.random.fold_in(rng_step, k))
    acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
    return (acc, ce_acc + ce, reg_acc + reg, align_acc + align), None

  scalar = jnp.zeros([], jnp.float32)
  n = inputs_NMT.shape[0]
  out, _ = jax.lax.scan(body, (zeros, scalar, scalar, scalar),
                        (jnp.arange(n), inputs_NMT, targets_NMT))
  return out


def check_step_reduce(cfg: Config, mesh: Mesh) -> None:
  """Raises ConfigError when `train.grad_reduce="step"` cannot apply to `cfg` on `mesh`."""
  other = {a: n for a, n in mesh.shape.items() if a != "data" and n > 1}
  if other:
    raise ConfigError(f"train.grad_reduce=step needs pure data parallelism, but the mesh has "
                      f"{other}; set mesh.fsdp=1 and mesh.tensor=1 or train.grad_reduce=micro.")
  if cfg.optim.sigreg_mode != "baseline" or cfg.model.num_random_keys:
    raise ConfigError("train.grad_reduce=step computes the auxiliary losses per device; with "
                      f"optim.sigreg_mode={cfg.optim.sigreg_mode!r} / model.num_random_keys="
                      f"{cfg.model.num_random_keys} use train.grad_reduce=micro.")


def make_accumulate(cfg: Config, mesh: Mesh, grad_fn: Callable, param_shardings) -> Callable:
  """`acc(params, inputs_NMT, targets_NMT, rng_step)` for `cfg.train.grad_reduce`."""
  mode = cfg.train.grad_reduce

  def zeros_like(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  if mode == "micro":
    def acc_micro(params, inputs_NMT, targets_NMT, rng_step):
      zeros = jax.lax.with_sharding_constraint(zeros_like(params), param_shardings)
      return _scan(grad_fn, params, inputs_NMT, targets_NMT, rng_step, zeros)
    return acc_micro

  if mode != "step":
    raise ConfigError(f"train.grad_reduce={mode!r}: choose micro or step.")
  check_step_reduce(cfg, mesh)
  axes = tuple(mesh.axis_names)
  rows = P(None, "data") if mesh.shape.get("data", 1) > 1 else P()

  def local(params, inputs_NmT, targets_NmT, rng_step):
    with use_mesh(None):  # this device's rows only: no sharding constraints, kernels run direct
      out = _scan(grad_fn, params, inputs_NmT, targets_NmT, rng_step, zeros_like(params))
    return jax.lax.psum(out, axes)  # the one reduction of the optimizer step

  def acc_step(params, inputs_NMT, targets_NMT, rng_step):
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, rows, P()), out_specs=P(),
                       check_vma=False)
    return fn(params, inputs_NMT, targets_NMT, rng_step)

  return acc_step
