"""Pallas GPU (Triton) gated-delta kernels vs the sequential oracle: interpret mode on CPU, plus a
compiled check on a CUDA GPU (`@pytest.mark.gpu`, skipped without one).

Forward, final state and VJP (q, k, v, log_gamma, beta, initial state) on fresh random inputs
through the shared harness `tests/gated_delta_cases.py`: odd T, T not a multiple of the chunk,
gates near 0 and near 1, K != V, and the exact sequence split (pieces composed by a scan).
"""

import functools

import jax.numpy as jnp
import pytest

from pallas_kernels.gated_delta import gpu_triton
from tests.gated_delta_cases import Case, check_backend

_CASES = (
    Case(T=37, H=2, K=16, V=32, chunk=16),                                   # odd T, K != V
    Case(T=33, H=1, K=32, V=16, chunk=16, gamma="near1", beta="near1"),      # gates ~1
)


@pytest.mark.parametrize("case", _CASES, ids=str)
def test_interpret_matches_oracle(case):
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True)
  check_backend(fwd, case, jnp.float32, atol=2e-5, rtol=2e-5, seed=3, bwd=bwd)


def test_interpret_sequence_split_is_exact():
  """4 pieces of 1 chunk each (forward), 2 pieces (backward's state passes), and the split
  (chunk, V-block) gradient kernels."""
  case = Case(T=61, B=2, H=1, K=16, V=16, chunk=16, gamma="small", beta="near0",
              init_state=False)
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True, pieces=4)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True, pieces=2,
                          tuning=gpu_triton.Tuning(split_grads=True, block_v=8))
  check_backend(fwd, case, jnp.float32, atol=2e-5, rtol=2e-5, seed=4, bwd=bwd)


def test_rejects_unsupported_shapes():
  q = jnp.zeros((1, 8, 1, 12), jnp.float32)
  assert not gpu_triton.is_supported(q, q, q, chunk_size=16)
  assert "powers of 2" in gpu_triton.unsupported_reason(q, q, q, chunk_size=16)
  with pytest.raises(ValueError, match="chunk_size"):
    gpu_triton.gated_delta_fwd(q, q, q, q[..., 0], q[..., 0], chunk_size=24, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,kv,tol", [(jnp.float32, 64, 2e-3), (jnp.bfloat16, 128, 3e-2)])
@pytest.mark.parametrize("split_grads", [False, True])
def test_compiled_matches_oracle(dtype, kv, tol, split_grads):
  case = Case(T=200, B=2, H=2, K=kv, V=kv, chunk=64)
  bwd = functools.partial(gpu_triton.gated_delta_bwd,
                          tuning=gpu_triton.Tuning(split_grads=split_grads))
  check_backend(gpu_triton.gated_delta_fwd, case, dtype, atol=tol, rtol=tol, seed=5, bwd=bwd)


def test_rejects_f32_at_k128():
  q = jnp.zeros((1, 8, 1, 128), jnp.float32)
  assert "shared memory" in gpu_triton.unsupported_reason(q, q, q, chunk_size=64)
  assert gpu_triton.is_supported(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                                 q.astype(jnp.bfloat16), chunk_size=64)
