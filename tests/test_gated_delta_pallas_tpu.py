"""Pallas TPU (Mosaic) gated-delta kernels vs the sequential oracle, in TPU interpret mode on CPU.

Forward, final state and VJP (q, k, v, log_gamma, beta, initial state) on fresh random inputs
through the shared harness `tests/gated_delta_cases.py`: odd T, T not a multiple of the chunk,
gates near 0 and near 1, K != V; one case under `pltpu.InterpretParams()` (TPU semantics:
uninitialized scratch is NaN, out-of-bounds reads raise).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta import tpu
from tests.gated_delta_cases import Case, check_backend

_CASES = (
    (Case(T=37, H=2, K=16, V=32, chunk=16), True),                               # odd T, K != V
    (Case(T=40, B=2, H=1, K=32, V=16, chunk=16, gamma="near1", beta="near1"), "params"),
    (Case(T=33, H=1, chunk=32, gamma="small", beta="near0", init_state=False), True),
)


@pytest.mark.parametrize("case,interpret", _CASES, ids=lambda x: str(x))
def test_interpret_matches_oracle(case, interpret):
  interpret = pltpu.InterpretParams() if interpret == "params" else interpret
  fwd = functools.partial(tpu.gated_delta_fwd, interpret=interpret)
  bwd = functools.partial(tpu.gated_delta_bwd, interpret=interpret)
  check_backend(fwd, case, jnp.float32, atol=2e-5, rtol=2e-5, seed=6, bwd=bwd)


def test_rejects_unsupported_chunk():
  q = jnp.zeros((1, 8, 1, 16), jnp.float32)
  assert "multiple of 8" in tpu.unsupported_reason(q, q, q, chunk_size=12)
  with pytest.raises(ValueError, match="multiple of 8"):
    tpu.gated_delta_fwd(q, q, q, q[..., 0], q[..., 0], chunk_size=12, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_to_mosaic_for_tpu(dtype):
  """Traces and lowers forward and backward to Mosaic for an abstract TPU v5e (K = V = 128,
  C = 64): catches ops the Mosaic lowering rejects (the blocked inverse's iota masks included)
  without a TPU (the Mosaic compiler itself runs only there)."""
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
      device_kind="TPU v5 lite", platform="tpu", num_cores=1))
  B, T, H, K, V = 1, 200, 2, 128, 128  # 4 chunks, the last one padded
  x = lambda *sh, dt=jnp.float32: jax.ShapeDtypeStruct(sh, dt)
  args = (x(B, T, H, K, dt=dtype), x(B, T, H, K, dt=dtype), x(B, T, H, V, dt=dtype), x(B, T, H),
          x(B, T, H), x(B, H, K, V))
  fwd = functools.partial(tpu.gated_delta_fwd, chunk_size=64)
  bwd = functools.partial(tpu.gated_delta_bwd, chunk_size=64)
  with jax.sharding.use_abstract_mesh(mesh):
    mods = [jax.export.export(jax.jit(fwd), platforms=["tpu"])(*args).mlir_module(),
            jax.export.export(jax.jit(bwd), platforms=["tpu"])(*args, x(B, T, H, V),
                                                                 x(B, H, K, V)).mlir_module()]
  for name, mod in zip(("fwd", "bwd"), mods):
    assert "tpu_custom_call" in mod, f"{name}: no Mosaic kernel in the lowered module"
