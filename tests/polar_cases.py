"""Shared test harness for every backend of the Polar core op `attention_stats`.

A backend passes if, on fresh random inputs, its forward (o, lse, p2) and its backward (given
the api prologue's delta' and cq) match the fp64 materialized oracle and the oracle's autodiff
VJP for random cotangents on all three outputs.

  from tests.polar_cases import CASES, SMALL_CASES, check_backend
  @pytest.mark.parametrize("case", SMALL_CASES, ids=str)
  def test_mine(case):
    check_backend(functools.partial(mod.attention_stats_fwd, block_k=16),
                  functools.partial(mod.attention_stats_bwd, block_k=16),
                  case, jnp.float32, atol=2e-5, rtol=2e-5)

`fwd(q, k, v, scale, *, window, q_offset)` and `bwd(q, k, v, scale, lse, do, delta_prime, cq,
*, window, q_offset)` are the backend contract of `pallas_kernels/polar_attention/api.py`
(bind block sizes with functools.partial). x64 is switched on only inside the oracle call
(for fp64 backend runs, wrap the test in `with jax.enable_x64(True):`). `SMALL_CASES` is a
cheap subset for interpret-mode kernels; `fast_jit` compiles tests with cheap CPU options.

Dimension glossary: B batch, Tq query rows, Tk key rows, H query heads, G KV heads, D head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.polar_attention import reference
from tests.oracle_check import assert_close


# Tests run tiny shapes once each: on CPU, trade LLVM optimization for ~2x faster compiles.
_CPU_TEST_COMPILE = {"xla_backend_optimization_level": 0,
                     "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, static_argnums=()):
  """jax.jit for tests: compiled with cheap CPU options (no caching: call each shape once)."""
  jitted = jax.jit(fn, static_argnums=static_argnums)

  def call(*args):
    if jax.default_backend() != "cpu":
      return jitted(*args)
    return jitted.lower(*args).compile(_CPU_TEST_COMPILE)(
        *[a for i, a in enumerate(args) if i not in static_argnums])

  return call


@dataclasses.dataclass(frozen=True)
class Case:
  """One shape of the op. `Tk` defaults to q_offset + Tq (the KV prefix up to the last row)."""
  Tq: int
  H: int = 4
  G: int = 1
  D: int = 16
  B: int = 1
  window: int | None = None
  q_offset: int = 0
  Tk: int | None = None

  @property
  def tk(self) -> int:
    return self.Tk if self.Tk is not None else self.q_offset + self.Tq

  def __str__(self) -> str:
    w = "full" if self.window is None else f"w{self.window}"
    return (f"B{self.B}_Tq{self.Tq}_Tk{self.tk}_off{self.q_offset}_H{self.H}G{self.G}"
            f"_D{self.D}_{w}")


# Every case a backend should pass. Blocks in tests are 16-64, so T=7 / 33 are smaller than /
# not a multiple of a block.
CASES = (
    Case(Tq=1, H=2, G=2),                                  # single token, 1:1
    Case(Tq=7, H=4, G=1),                                  # T < block, GQA 4:1
    Case(Tq=33, H=4, G=2),                                 # odd T, GQA 2:1
    Case(Tq=100, H=4, G=1, B=2),                           # odd T, several blocks
    Case(Tq=33, H=4, G=1, window=1),                       # window 1: only self
    Case(Tq=33, H=4, G=2, window=4),
    Case(Tq=100, H=4, G=1, window=7),
    Case(Tq=100, H=2, G=2, window=32),
    Case(Tq=33, H=4, G=1, window=64),                      # window larger than T
    Case(Tq=1, Tk=100, q_offset=99, H=4, G=1),             # decode
    Case(Tq=1, Tk=100, q_offset=99, H=4, G=2, window=32),  # decode, windowed
    Case(Tq=1, Tk=50, q_offset=20, H=4, G=1, window=7),    # decode into a longer (padded) cache
    Case(Tq=17, Tk=80, q_offset=63, H=4, G=1),             # chunked prefill, Tq < Tk
    Case(Tq=40, Tk=73, q_offset=33, H=4, G=2, window=16),  # chunked prefill, windowed
)

# A handful of cheap cases for slow (interpret-mode) backends: covers GQA, windows, odd T,
# decode and chunked prefill.
SMALL_CASES = (
    Case(Tq=7, H=4, G=1),
    Case(Tq=33, H=4, G=2, window=4),
    Case(Tq=1, Tk=40, q_offset=39, H=4, G=1, window=16),
    Case(Tq=17, Tk=48, q_offset=31, H=2, G=2),
)


def export_for_h100(fn, shape, *args_spec: str):
  """jax.export of `fn` for CUDA under an abstract H100 (no GPU needed: traces and lowers
  Mosaic-GPU kernels, checking SMEM fit and layouts). shape = (B, T, H, G, D); args_spec names
  each argument's kind: "q" [B,T,H,D] / "kv" [B,T,G,D] bf16, "row" [B,T,H] f32."""
  B, T, H, G, D = shape
  kinds = {"q": jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16),
           "kv": jax.ShapeDtypeStruct((B, T, G, D), jnp.bfloat16),
           "row": jax.ShapeDtypeStruct((B, T, H), jnp.float32)}
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*(kinds[a] for a in args_spec))


def random_inputs(case: Case, dtype=jnp.float32, seed: int = 0):
  """Fresh q, k (unit RMS, like post-QK-norm), v and a positive per-row scale in [0.1, 0.5].

  q/k/v are in `dtype`; scale is fp32 (fp64 when dtype is fp64), as the model passes it.
  """
  rng = np.random.default_rng(seed)
  B, Tq, Tk, H, G, D = case.B, case.Tq, case.tk, case.H, case.G, case.D
  q = rng.standard_normal((B, Tq, H, D))
  k = rng.standard_normal((B, Tk, G, D))
  v = rng.standard_normal((B, Tk, G, D))
  scale = rng.uniform(0.1, 0.5, (B, Tq, H))
  sdt = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(scale, sdt))


def random_cotangents(case: Case, seed: int = 0):
  """numpy fp64 cotangents (do_BTHD, dlse_BTH, dp2_BTH) for the three outputs."""
  rng = np.random.default_rng(seed + 1_000_003)
  B, Tq, H, D = case.B, case.Tq, case.H, case.D
  return (rng.standard_normal((B, Tq, H, D)), rng.standard_normal((B, Tq, H)),
          rng.standard_normal((B, Tq, H)))


def oracle_fwd_vjp(case: Case, q, k, v, scale, cotangents):
  """fp64 oracle outputs and VJP as numpy: ((o, lse, p2), (dq, dk, dv, dscale))."""
  args = [np.asarray(x, np.float64) for x in (q, k, v, scale)]
  with jax.enable_x64(True):
    f = lambda *a: reference.attention_stats_materialized(
        *a, window=case.window, q_offset=case.q_offset)
    def fwd_vjp(args, cots):
      outs, vjp = jax.vjp(f, *args)
      return outs, vjp(cots)
    outs, grads = fast_jit(fwd_vjp)([jnp.asarray(a, jnp.float64) for a in args],
                                   tuple(jnp.asarray(c, jnp.float64) for c in cotangents))
    return tuple(np.asarray(x) for x in outs), tuple(np.asarray(x) for x in grads)


def backend_fwd_vjp(fwd, bwd, case: Case, q, k, v, scale, cotangents):
  """A backend's outputs and its closed-form VJP (prologue from reference), as numpy."""
  kw = dict(window=case.window, q_offset=case.q_offset)

  def run(q, k, v, scale, do, dlse, dp2):  # one compile for fwd + prologue + bwd
    o, lse, p2 = fwd(q, k, v, scale, **kw)
    delta, cq = reference.stats_vjp_prologue(o, p2, do, dlse, dp2)
    return (o, lse, p2), bwd(q, k, v, scale, lse, do.astype(q.dtype), delta, cq, **kw)

  cots = (jnp.asarray(c, reference.stats_dtype(q.dtype)) for c in cotangents)
  outs, grads = fast_jit(run)(q, k, v, scale, *cots)
  return (tuple(np.asarray(x, np.float64) for x in outs),
          tuple(np.asarray(x, np.float64) for x in grads))


def traced_offset_backend(module, **kw):
  """(fwd, bwd) of a backend module with q_offset passed as a traced int32 scalar (a jitted
  decode / chunked-prefill loop); `kw` goes to the module's functions (e.g. `config=`)."""
  def fwd(q, k, v, s, *, window, q_offset):
    f = lambda q, k, v, s, off: module.attention_stats_fwd(q, k, v, s, window=window,
                                                           q_offset=off, **kw)
    return jax.jit(f)(q, k, v, s, jnp.int32(q_offset))

  def bwd(*args, window, q_offset):
    f = lambda *a: module.attention_stats_bwd(*a[:-1], window=window, q_offset=a[-1], **kw)
    return jax.jit(f)(*args, jnp.int32(q_offset))

  return fwd, bwd


def check_backend(fwd, bwd, case: Case, dtype=jnp.float32, atol=1e-5, rtol=1e-5, seed=0):
  """Forward (o, lse, p2) and VJP (dq, dk, dv, dscale) of a backend vs the fp64 oracle.

  Returns the max abs errors per output for reporting.
  """
  q, k, v, scale = random_inputs(case, dtype, seed)
  cot = random_cotangents(case, seed)
  want_out, want_grad = oracle_fwd_vjp(case, q, k, v, scale, cot)
  got_out, got_grad = backend_fwd_vjp(fwd, bwd, case, q, k, v, scale, cot)
  names = ("o", "lse", "p2", "dq", "dk", "dv", "dscale")
  errs = {}
  for name, got, want in zip(names, got_out + got_grad, want_out + want_grad):
    # Gradients scale with the number of rows/keys summed: compare relative to their size.
    g_atol = atol * max(1.0, float(np.max(np.abs(want)))) if name.startswith("d") else atol
    assert_close(name, got, want, g_atol, rtol, case)
    errs[name] = float(np.max(np.abs(np.asarray(got) - want)))
  return errs
