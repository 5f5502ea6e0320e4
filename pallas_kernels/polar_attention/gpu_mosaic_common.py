"""Warp-specialized Mosaic-GPU scaffolding shared by the Polar forward (`gpu_mosaic`) and
backward (`gpu_mosaic_backward`) kernels; package-internal.

Each kernel runs `COMPUTE_WGS` consumer warpgroups of 64 rows and one TMA producer warpgroup
that streams blocks through a ring of `stages` SMEM slots:
  launch         the kernel with its scoped SMEM / barriers, three warpgroups, a profile name
  producer_warpgroup  the producer warpgroup: fewer registers, then `ring_producer`
  ring_producer  the producer's loop: fill the slots, refill each once the consumers free it
  three_phases   a consumer's loop over the band: masked, unmasked, masked blocks
  overlapped     one S wgmma and one P V wgmma issued together, elementwise work between their
                 waits (FlashAttention-3's intra-warpgroup overlap)
  visible_tile   the causal / window mask of one block (`bands.visible` in the WGMMA layout)
  wgmmas         several wgmma products issued together, into fresh or running accumulators
  operand        a register wgmma operand, or the same values staged in SMEM
  tiled_smem     a swizzled, tiled SMEM buffer (a TMA / wgmma operand)
  smem_bytes     the SMEM bytes Mosaic allocates for a kernel's buffers and barriers (integer
                 arithmetic, no trace), checked against `SMEM_LIMIT` before any compile
  interpret_params  a config's `interpret` field -> InterpretGPUParams or None (compiled)
  config_repr    a launch config as its non-default fields, for messages
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.polar_attention import bands

COMPUTE_WGS = 2
# Dynamic SMEM one Hopper (sm_90) block can opt into: 227 KiB, Mosaic's `max_smem_bytes`.
SMEM_LIMIT = 227 * 1024
_SMEM_ALIGN = 1024  # Pallas Mosaic GPU rounds every scoped SMEM buffer up to this
_BARRIER_BYTES = 8  # one mbarrier


def interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
  """None (compiled) or the interpreter's params: `interpret` None means interpret when the
  default backend is not a GPU; True / False; or explicit InterpretGPUParams."""
  interpret = (jax.default_backend() != "gpu") if interpret is None else interpret
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


def config_repr(config) -> str:
  """`Name(field=value, ...)` with only the fields that differ from the defaults (nested configs
  alike; `interpret` left out)."""
  diff = []
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if f.name == "interpret" or value == f.default:
      continue
    text = config_repr(value) if dataclasses.is_dataclass(value) else repr(value)
    diff.append(f"{f.name}={text}")
  return f"{type(config).__name__}({', '.join(diff)})"


def tiled_smem(shape, dtype):
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)))


def smem_bytes(smem, bars, *, reduces: bool) -> int:
  """The dynamic SMEM a kernel launched by `launch` with these scoped `smem` buffers and `bars`
  barriers (None entries allowed in both) asks for, by the rule of the Pallas Mosaic-GPU lowering:
  each buffer rounded up to 1024 bytes, 8 bytes per barrier, and, when the kernel body `reduces`
  a register array along an axis (a .sum / .max), the compiler's reduction scratch
  (CompilerParams.reduction_scratch_bytes). Matches Mosaic's own count on an H200 (module
  docstring of gpu_mosaic_backward)."""
  total = sum(-(-math.prod(b.shape) * jnp.dtype(b.dtype).itemsize // _SMEM_ALIGN) * _SMEM_ALIGN
              for b in smem if b is not None)
  if reduces:
    total += plgpu.CompilerParams().reduction_scratch_bytes
  return total + _BARRIER_BYTES * sum(math.prod(b.num_barriers) for b in bars if b is not None)


def wgmmas(*ops, fresh, issued=None):
  """acc + lhs @ rhs for each (acc, lhs, rhs, shape) in `ops`, issued together and waited once.
  acc None: the product alone. `fresh`: every product into a new accumulator, added after
  (interpret mode models no run_state); else in place on the running accumulators. `issued`
  (fresh products only): called after the products are issued, before the wait (a warpgroup
  ping-pong's schedule barrier)."""
  if fresh or all(acc is None for acc, *_ in ops):
    def run(*acc_refs):
      for acc_ref, (_, lhs, rhs, _) in zip(acc_refs, ops):
        plgpu.wgmma(acc_ref, lhs, rhs)
      if issued is not None:
        issued()
      return tuple(acc_ref[...] for acc_ref in acc_refs)
    outs = pl.run_scoped(run, *[plgpu.ACC(shape, jnp.float32) for *_, shape in ops])
    return [out if acc is None else acc + out for out, (acc, *_) in zip(outs, ops)]

  if issued is not None:
    raise ValueError("wgmmas: `issued` needs fresh products")

  def run(acc_refs):
    for acc_ref, (_, lhs, rhs, _) in zip(acc_refs, ops):
      plgpu.wgmma(acc_ref, lhs, rhs)

  zeros = lambda shape: plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)
  inits = tuple(plgpu.ACC.init(zeros(shape) if acc is None else acc) for acc, *_, shape in ops)
  return list(pl.run_state(run)(inits))


def overlapped(s_op, pv_op, between, results_like, *, fresh, issued=None):
  """FlashAttention-3's intra-warpgroup overlap of one key-block step: issues the wgmma
  `s_op` = (lhs, rhs, shape) into a new accumulator, then `pv_op` = (acc, lhs, rhs), i.e.
  acc + lhs @ rhs; waits for the first only and runs `between(product)` (elementwise work that
  overlaps the second wgmma on the tensor cores), then waits for the second. Returns
  (acc + lhs @ rhs, between's results). `results_like`: arrays of the shapes, dtypes and layouts
  `between` returns (state slots of the compiled path). `fresh` as in `wgmmas` (interpret mode
  models no run_state): the second product into a new accumulator, added after. `issued` as in
  `wgmmas`: called once both are issued, before any wait."""
  (s_lhs, s_rhs, s_shape), (acc, lhs, rhs) = s_op, pv_op
  if fresh:
    def run(s_ref, o_ref):
      plgpu.wgmma(s_ref, s_lhs, s_rhs)
      plgpu.wgmma(o_ref, lhs, rhs)
      if issued is not None:
        issued()
      results = between(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
      return o_ref[...], results

    out, results = pl.run_scoped(run, plgpu.ACC(s_shape, jnp.float32),
                                 plgpu.ACC(acc.shape, jnp.float32))
    return acc + out, results

  def run(refs):
    o_ref, s_ref, *result_refs = refs
    plgpu.wgmma(s_ref, s_lhs, s_rhs)
    plgpu.wgmma(o_ref, lhs, rhs)
    if issued is not None:
      issued()
    results = between(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
    for ref, x in zip(result_refs, results, strict=True):
      ref[...] = x

  zeros = plgpu.layout_cast(jnp.zeros(s_shape, jnp.float32), plgpu.Layout.WGMMA)
  acc, _, *results = pl.run_state(run)((plgpu.ACC.init(acc), plgpu.ACC.init(zeros),
                                        *results_like))
  return acc, tuple(results)


def operand(x16, smem, via_smem):
  """A register operand for wgmma, or the same values staged in `smem`."""
  if not via_smem:
    return x16
  smem[...] = x16
  plgpu.commit_smem()
  return smem


def kv_block_issue(k_ref, v_ref, k_smem, v_smem, k_bars, v_bars, b, g, kv_lo, bk):
  """A `ring_producer` issue for the K / V blocks of KV head g, batch row b: step i TMA-copies
  key block kv_lo + i (bk rows) of both into ring slot `slot` (forward and dQ kernels)."""
  def issue(i, slot):
    keys = (b, pl.ds((kv_lo + i) * bk, bk), g)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bars.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bars.at[slot])

  return issue


def ring_producer(n_steps, stages, issue, *used):
  """Producer loop: fills `stages` slots, then refills slot i % S once the consumers have
  arrived on every barrier of `used` at that slot; drains the last phases before the barriers
  leave scope."""
  def wait_used(slot):
    for barrier in used:
      plgpu.barrier_wait(barrier.at[slot])

  for i in range(stages):
    pl.when(i < n_steps)(functools.partial(issue, i, i))

  @pl.loop(stages, jnp.maximum(n_steps, stages))
  def _(i):
    slot = lax.rem(i, stages)
    wait_used(slot)
    issue(i, slot)

  @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
  def _(i):
    wait_used(lax.rem(i, stages))


def producer_warpgroup(wg, n_steps, stages, make_issue, *used):
  """The last warpgroup (`wg == COMPUTE_WGS`) gives registers back to the consumers and runs
  `ring_producer(n_steps, stages, make_issue(), *used)` (`make_issue` is called inside the
  branch, so what it computes runs on the producer only)."""
  @pl.when(wg == COMPUTE_WGS)
  def _():
    plgpu.set_max_registers(40, action="decrease")
    ring_producer(n_steps, stages, make_issue(), *used)


def three_phases(step, lo_full, hi_full, n, carry, start=0):
  """step(i, carry, masked) over [start, n): i < lo_full masked, [lo_full, hi_full) not,
  i >= hi_full masked."""
  if start:
    lo_full, hi_full = jnp.maximum(lo_full, start), jnp.maximum(hi_full, start)
  carry = lax.fori_loop(start, lo_full, functools.partial(step, masked=True), carry)
  carry = lax.fori_loop(lo_full, hi_full, functools.partial(step, masked=False), carry)
  return lax.fori_loop(hi_full, n, functools.partial(step, masked=True), carry)


def visible_tile(q0, k0, shape, *, window, query_axis=0):
  """`bands.visible` over a `shape` tile in the WGMMA layout: query positions q0 + index along
  `query_axis`, keys k0 + index along the other axis (Tq == Tk padded alike: no key bound)."""
  pos = lambda start, axis: start + plgpu.broadcasted_iota(jnp.int32, shape, axis,
                                                           layout=plgpu.Layout.WGMMA)
  return bands.visible(pos(q0, query_axis), pos(k0, 1 - query_axis), tk=None, window=window)


def launch(body, name, smem, bars, args, out_type, grid, grid_names, params):
  """Runs body(*in_refs, *out_refs, (smem_refs, barrier_refs)) on `grid` with COMPUTE_WGS + 1
  warpgroups (axis "wg"); `name` is what profiles show; `params` from `interpret_params`."""
  def kernel(*refs):
    pl.run_scoped(lambda smem_refs, bar_refs: body(*refs, (smem_refs, bar_refs)),
                  smem, bars, collective_axes="wg")

  kernel.__name__ = name
  kwargs = {} if params is None else {"interpret": params}
  return plgpu.kernel(kernel, out_type=out_type, grid=grid, grid_names=grid_names,
                      num_threads=COMPUTE_WGS + 1, thread_name="wg",
                      compiler_params=plgpu.CompilerParams(approx_math=True), **kwargs)(*args)
