"""The chunk inverse T0 = (I + strict_tril(diag(beta) K K^T))^-1 on correlated keys, every path.

The plain doubling of `chunk_math.inverse_unit_lower` loses T0 even in exact f32 when the keys of
a chunk share a direction (its high powers reach 1e3+ and cancel); the blocked doubling (16-wide
diagonal blocks first) is stable. The XLA chunked path, the TPU kernels (interpret mode) and the
GPU kernels all use the blocked one: outputs and gradients vs the fp64 sequential oracle at
chunk 64 with keys k = normalize(0.7 shared + 0.3 noise) (pairwise cosine ~0.8) and slow decay
(gamma near 1: the far-off-diagonal entries of T0 survive in T = T0 * D). Plain doubling there:
max abs error of o 0.38, of dk 8.9 (xla_chunked); blocked: 7e-7 and 2e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta import chunk_math as cm
from pallas_kernels.gated_delta import gpu_triton, tpu, xla_chunked
from tests.gated_delta_cases import Case, check_backend
from tests.oracle_check import assert_close

_CORRELATED = Case(T=130, H=1, K=32, V=16, chunk=64, gamma="near1", key_share=0.7)


@pytest.mark.parametrize("C,block,shared", [(64, 16, 0.0), (64, 16, 0.7), (64, 8, 0.5),
                                            (32, 16, 0.9)])
def test_blocked_inverse_matches_solve(C, block, shared):
  """`inverse_unit_lower` blocked (Dots.inverse_block) vs a f64 solve, on keys sharing a direction
  (pairwise cosine up to ~0.95: the plain doubling's powers blow up there): exact in f64 and
  ~1e-5 in f32 (the plain doubling in f32 is checked to be worse at shared >= 0.5)."""
  rng = np.random.default_rng(C + block)
  base = rng.standard_normal(64)
  k = shared * base / np.linalg.norm(base) + (1 - shared) * rng.standard_normal((C, 64)) / 8
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = rng.uniform(0.0, 1.0, (C, 1))
  a = np.tril(beta * (k @ k.T), -1)
  want = np.linalg.inv(np.eye(C) + a)
  blocked = cm.Dots(inverse_block=block)
  with jax.enable_x64(True):
    got64 = np.asarray(cm.inverse_unit_lower(jnp.asarray(a, jnp.float64), blocked))
  assert_close("T0 f64 blocked", got64, want, 1e-10, 1e-10, (C, block, shared))
  got32 = np.asarray(cm.inverse_unit_lower(jnp.asarray(a, jnp.float32), blocked))
  err32 = np.abs(got32 - want).max()
  assert err32 < 1e-4, (C, block, shared, err32)
  if shared >= 0.5:
    plain = np.asarray(cm.inverse_unit_lower(jnp.asarray(a, jnp.float32), cm.Dots(inverse_block=0)))
    assert np.abs(plain - want).max() > 10 * err32, "the blocked doubling should be the stable one"


@pytest.mark.parametrize("C,want", [(64, 16), (32, 16), (16, 0), (48, 16), (24, 8), (8, 0),
                                    (5, 0), (1, 0)])
def test_stable_inverse_block(C, want):
  assert cm.stable_inverse_block(C) == want


def test_xla_chunked_correlated_keys_match_oracle():
  """The model's default (off-Pallas) path, f32, autodiff gradients."""
  check_backend(xla_chunked.gated_delta_fwd, _CORRELATED, jnp.float32, atol=1e-4, rtol=1e-4,
                seed=21)


def test_tpu_interpret_correlated_keys_match_oracle():
  """The TPU kernels (forward + their own backward) in TPU interpret mode."""
  fwd = functools.partial(tpu.gated_delta_fwd, interpret=True)
  bwd = functools.partial(tpu.gated_delta_bwd, interpret=True)
  check_backend(fwd, _CORRELATED, jnp.float32, atol=1e-4, rtol=1e-4, seed=21, bwd=bwd)


def test_gpu_interpret_correlated_keys_match_oracle():
  """The Triton kernels with their defaults (`Tuning.inverse_block` = 16), in interpret mode."""
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True)
  check_backend(fwd, _CORRELATED, jnp.float32, atol=1e-4, rtol=1e-4, seed=21, bwd=bwd)
