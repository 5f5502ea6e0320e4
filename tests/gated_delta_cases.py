"""Shared test harness for every backend of the gated delta rule (`pallas_kernels/gated_delta`).

A backend passes if, on fresh random inputs, its output o, its final state and its VJP with
respect to q, k, v, log_gamma, beta and the initial state match the fp64 sequential oracle
(`reference.gated_delta_sequential` and its autodiff) for random cotangents on o and the final
state.

  from tests.gated_delta_cases import CASES, SMALL_CASES, check_backend
  @pytest.mark.parametrize("case", SMALL_CASES, ids=str)
  def test_mine(case):
    check_backend(mod.gated_delta_fwd, case, jnp.float32, atol=1e-4, rtol=1e-4,
                  bwd=mod.gated_delta_bwd)

Backend contract (see `pallas_kernels/gated_delta/xla_chunked.py`):
  fwd(q, k, v, log_gamma, beta, initial_state, *, chunk_size) -> (o_BTHV, final_state_BHKV)
  bwd(q, k, v, log_gamma, beta, initial_state, do_BTHV, dfinal_state_BHKV, *, chunk_size)
      -> (dq, dk, dv, dlog_gamma, dbeta, dinitial_state)
`initial_state` is always an array here (zeros for cases without one). Without `bwd` the harness
differentiates `fwd` with `jax.vjp` (autodiff backends, or a `custom_vjp` wrapper). x64 is
switched on only inside the oracle call (and around the backend when `dtype` is fp64).

Dimension glossary: B batch, T tokens, H heads, K key/query dim, V value dim, C chunk size.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta import reference
from tests.oracle_check import assert_close

# gamma modes: log-uniform over [0.01, 1) ("mixed"), near 1 ("near1"), small ("small"),
# exactly 1 ("one", log_gamma = 0). beta modes: uniform [0, 1] ("random"), ~0, ~1.
_GAMMA_RANGES = {"mixed": (0.01, 1.0), "near1": (0.95, 1.0), "small": (0.01, 0.2)}
_BETA_RANGES = {"random": (0.0, 1.0), "near0": (0.0, 1e-3), "near1": (0.999, 1.0)}


@dataclasses.dataclass(frozen=True)
class Case:
  """One shape and gate regime of the op."""
  T: int
  H: int = 2
  K: int = 16
  V: int = 16
  B: int = 1
  chunk: int = 16
  gamma: str = "mixed"
  beta: str = "random"
  init_state: bool = True
  key_share: float = 0.0  # > 0: k = normalize(s * shared + (1 - s) * noise), unit directions

  def __str__(self) -> str:
    s0 = "s0" if self.init_state else "nos0"
    keys = f"_kshare{self.key_share}" if self.key_share else ""
    return (f"B{self.B}_T{self.T}_H{self.H}_K{self.K}V{self.V}_C{self.chunk}"
            f"_g{self.gamma}_b{self.beta}_{s0}{keys}")


# Every case a backend should pass: odd T (1, 7, 65, 130), T not a multiple of the chunk,
# chunks 16/32/64, heads 1-3, one K != V pair each way, gates near 0 and near 1.
CASES = (
    Case(T=1, H=2, chunk=16),                                            # single token
    Case(T=7, H=1, chunk=16, init_state=False),                          # T < chunk
    Case(T=65, H=3, K=32, V=32, chunk=64),                               # T = chunk + 1
    Case(T=130, H=2, chunk=32, gamma="near1", beta="near1"),             # gates ~1
    Case(T=130, H=2, chunk=64, gamma="small", beta="random", init_state=False),
    Case(T=65, H=2, K=32, V=16, chunk=16),                               # K != V
    Case(T=33, H=2, K=16, V=32, chunk=16, gamma="near1", beta="near0"),  # V > K, beta ~0
    Case(T=64, B=2, H=2, chunk=64, gamma="one"),                         # T = chunk, gamma = 1
    Case(T=100, B=2, H=3, K=32, V=32, chunk=32, beta="near1"),           # several chunks
)

# A handful of cheap cases for slow (interpret-mode) backends.
SMALL_CASES = (
    Case(T=7, H=1, chunk=16, init_state=False),
    Case(T=33, H=2, K=16, V=32, chunk=16, gamma="near1", beta="near1"),
    Case(T=65, H=2, K=32, V=16, chunk=32, gamma="small"),
    Case(T=64, B=2, H=1, chunk=64),
)


def random_inputs(case: Case, dtype=jnp.float32, seed: int = 0):
  """Fresh (q, k, v, log_gamma, beta, initial_state); q, k unit L2 norm per (t, h) (k correlated
  within each (b, h) when `case.key_share` > 0).

  q/k/v are in `dtype`; the gates and the state are fp32 (fp64 when dtype is fp64), as the model
  passes them. `initial_state` is an array of zeros for cases without one. Build fp64 inputs
  inside `jax.enable_x64(True)`.
  """
  rng = np.random.default_rng(seed)
  B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
  q = rng.standard_normal((B, T, H, K))
  k = rng.standard_normal((B, T, H, K))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((B, T, H, V))
  if case.gamma == "one":
    log_gamma = np.zeros((B, T, H))
  else:
    lo, hi = _GAMMA_RANGES[case.gamma]
    log_gamma = rng.uniform(np.log(lo), np.log(hi), (B, T, H))
  lo, hi = _BETA_RANGES[case.beta]
  beta = rng.uniform(lo, hi, (B, T, H))
  s0 = (0.5 * rng.standard_normal((B, H, K, V)) if case.init_state else np.zeros((B, H, K, V)))
  if case.key_share:  # one direction per (b, h) shared by all its keys: correlated chunks
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    shared = unit(rng.standard_normal((B, 1, H, K)))
    k = unit(case.key_share * shared + (1 - case.key_share) * unit(k))
  sdt = reference.state_dtype(dtype)
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(log_gamma, sdt), jnp.asarray(beta, sdt), jnp.asarray(s0, sdt))


def random_cotangents(case: Case, seed: int = 0):
  """numpy fp64 cotangents (do_BTHV, dfinal_state_BHKV)."""
  rng = np.random.default_rng(seed + 1_000_003)
  return (rng.standard_normal((case.B, case.T, case.H, case.V)),
          rng.standard_normal((case.B, case.H, case.K, case.V)))


def _fwd_and_vjp(f):
  """jit of inputs, cotangents -> (f's outputs, VJP): one compile instead of eager dispatch."""
  def run(inputs, cotangents):
    outs, vjp = jax.vjp(f, *inputs)
    return outs, vjp(cotangents)
  return jax.jit(run)


_oracle = _fwd_and_vjp(reference.gated_delta_sequential)


def oracle_fwd_vjp(inputs, cotangents):
  """fp64 oracle outputs and VJP as numpy: ((o, final_state), (dq, dk, dv, dlg, dbeta, ds0))."""
  args = [np.asarray(x, np.float64) for x in inputs]
  with jax.enable_x64(True):
    outs, grads = _oracle(tuple(jnp.asarray(a) for a in args),
                          tuple(jnp.asarray(c, jnp.float64) for c in cotangents))
    return tuple(np.asarray(x) for x in outs), tuple(np.asarray(x) for x in grads)


def backend_fwd_vjp(fwd, case: Case, inputs, cotangents, bwd=None):
  """A backend's outputs and VJP (its `bwd`, or autodiff of `fwd`), as numpy fp64 (jitted)."""
  call = lambda *a: fwd(*a, chunk_size=case.chunk)
  sdt = reference.state_dtype(inputs[0].dtype)
  cot = tuple(jnp.asarray(c, sdt) for c in cotangents)
  if bwd is None:
    outs, grads = _fwd_and_vjp(call)(tuple(inputs), cot)
  else:
    outs = jax.jit(call)(*inputs)
    grads = jax.jit(lambda *a: bwd(*a, chunk_size=case.chunk))(*inputs, *cot)
  return (tuple(np.asarray(x, np.float64) for x in outs),
          tuple(np.asarray(x, np.float64) for x in grads))


def check_backend(fwd, case: Case, dtype=jnp.float32, atol=1e-5, rtol=1e-5, seed=0, bwd=None):
  """Output, final state and VJP (dq, dk, dv, dlog_gamma, dbeta, dinitial_state) vs the oracle.

  The oracle sees the same (dtype-rounded) inputs in fp64. Gradient tolerances scale with the
  largest oracle gradient entry (gradients sum over many tokens). Returns the max abs errors.
  """
  x64 = jnp.dtype(dtype) == jnp.float64
  with jax.enable_x64(True) if x64 else contextlib.nullcontext():
    inputs = random_inputs(case, dtype, seed)
    cot = random_cotangents(case, seed)
    got_out, got_grad = backend_fwd_vjp(fwd, case, inputs, cot, bwd)
  want_out, want_grad = oracle_fwd_vjp(inputs, cot)
  names = ("o", "final_state", "dq", "dk", "dv", "dlog_gamma", "dbeta", "dinitial_state")
  errs = {}
  for name, got, want in zip(names, got_out + got_grad, want_out + want_grad):
    scale = max(1.0, float(np.max(np.abs(want)))) if name.startswith("d") else 1.0
    assert_close(name, got, want, atol * scale, rtol, case)
    errs[name] = float(np.max(np.abs(np.asarray(got) - want)))
  return errs
