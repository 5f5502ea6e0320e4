"""Pallas TPU (Mosaic) gated-delta kernels vs the sequential oracle, in TPU interpret mode on CPU.

Forward, final state and VJP (q, k, v, log_gamma, beta, initial state) on fresh random inputs
through the shared harness `tests/gated_delta_cases.py`: odd T, T not a multiple of the chunk,
gates near 0 and near 1, K != V; one case under `pltpu.InterpretParams()` (TPU semantics:
uninitialized scratch is NaN, out-of-bounds reads raise).
"""

import functools

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
  assert not tpu.is_supported(q, q, q, chunk_size=12)
  with pytest.raises(ValueError, match="multiple of 8"):
    tpu.gated_delta_fwd(q, q, q, q[..., 0], q[..., 0], chunk_size=12, interpret=True)
