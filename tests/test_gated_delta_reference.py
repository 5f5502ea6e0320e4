"""Gated delta rule: chunked XLA path and api vs the sequential oracle (ATMA_SPEC §4.4-4.5, §12).

Dimension glossary: B batch, T tokens, H heads, K key/query dim, V value dim, C chunk size.
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from atma_jax import sharding
from atma_jax.model import ops
from pallas_kernels import dispatch
from pallas_kernels import gated_delta as gd
from pallas_kernels.gated_delta import api, reference, xla_chunked
from tests.gated_delta_cases import CASES, Case, check_backend, random_inputs

# Representative subset for the default run (compiles dominate on CPU); the full sweep is slow.
FAST_CASES = (CASES[0], CASES[3], CASES[5])


def _api_fwd(*args, chunk_size, impl="xla"):
  q, k, v, lg, beta, s0 = args
  return api.gated_delta_rule(q, k, v, lg, beta, initial_state=s0, output_final_state=True,
                              chunk_size=chunk_size, impl=impl)


@pytest.mark.parametrize("case", FAST_CASES, ids=str)
def test_chunked_matches_sequential_fp64(case):
  errs = check_backend(xla_chunked.gated_delta_fwd, case, jnp.float64, atol=1e-10, rtol=1e-10)
  assert max(errs.values()) < 1e-10, errs


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c not in FAST_CASES], ids=str)
def test_chunked_matches_sequential_fp64_all_cases(case):
  check_backend(xla_chunked.gated_delta_fwd, case, jnp.float64, atol=1e-10, rtol=1e-10)


def test_api_xla_fp32_matches_oracle():
  check_backend(_api_fwd, CASES[7], jnp.float32, atol=1e-4, rtol=1e-4)


def test_xla_bwd_contract_matches_oracle():
  """`gated_delta_bwd` (residuals = primal inputs) is the VJP, as a Pallas bwd must be."""
  check_backend(xla_chunked.gated_delta_fwd, CASES[6], jnp.float32, atol=1e-4, rtol=1e-4,
                bwd=xla_chunked.gated_delta_bwd)


@pytest.mark.parametrize("C", [1, 5, 16, 64])
def test_unit_lower_inverse(C):
  rng = np.random.default_rng(C)
  a = np.tril(rng.uniform(-0.5, 0.5, (3, C, C)), -1)
  with jax.enable_x64(True):
    got = np.asarray(xla_chunked.unit_lower_inverse(jnp.asarray(a)))
  want = np.linalg.inv(np.eye(C) + a)
  np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-12)


def test_decode_steps_chain_to_sequential():
  case = Case(T=20, B=2, H=3, K=16, V=32)
  q, k, v, lg, beta, s0 = random_inputs(case, jnp.float32, seed=3)
  want_o, want_s = reference.gated_delta_sequential(q, k, v, lg, beta, s0)
  step = jax.jit(api.gated_delta_step)
  s, outs = s0, []
  for t in range(case.T):
    o, s = step(q[:, t], k[:, t], v[:, t], lg[:, t], beta[:, t], s)
    outs.append(o)
  np.testing.assert_allclose(np.stack(outs, 1), want_o, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s, want_s, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_in_two_pieces_equals_one():
  case = Case(T=50, B=1, H=2, K=16, V=16)
  q, k, v, lg, beta, s0 = random_inputs(case, jnp.float32, seed=4)
  run = jax.jit(functools.partial(api.gated_delta_rule, output_final_state=True, chunk_size=16,
                                  impl="xla"))
  o_all, s_all = run(q, k, v, lg, beta, initial_state=s0)
  cut = 25  # not a chunk boundary (equal pieces: one compile)
  o1, s1 = run(q[:, :cut], k[:, :cut], v[:, :cut], lg[:, :cut], beta[:, :cut], initial_state=s0)
  o2, s2 = run(q[:, cut:], k[:, cut:], v[:, cut:], lg[:, cut:], beta[:, cut:], initial_state=s1)
  np.testing.assert_allclose(np.concatenate([o1, o2], 1), o_all, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s2, s_all, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_stay_close_to_fp32():
  """bf16 q/k/v (the model's compute dtype) vs fp32 inputs: rel err < 0.05 (spec §12)."""
  case = Case(T=96, B=1, H=2, K=32, V=32, init_state=False)
  q, k, v, lg, beta, _ = random_inputs(case, jnp.float32, seed=5)
  run = jax.jit(functools.partial(api.gated_delta_rule, chunk_size=32, impl="xla"))
  o32, _ = run(q, k, v, lg, beta)
  o16, _ = run(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), lg, beta)
  assert o16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(o16 - o32) / jnp.linalg.norm(o32))
  assert rel < 0.05, rel


@pytest.mark.parametrize("gamma", [0.98, 1.0])
def test_state_norm_stays_bounded(gamma):
  """Unit keys + beta in [0, 1] make each step a contraction plus a bounded write: the state
  norm plateaus instead of growing with T (spec §12: flat in N for gamma 0.98 and 1)."""
  case = Case(T=2048, B=1, H=2, K=32, V=32, init_state=False)
  q, k, v, _, _, s = random_inputs(case, jnp.float32, seed=6)
  lg = jnp.full(q.shape[:3], np.log(gamma), jnp.float32)
  beta = jnp.full(q.shape[:3], 0.5, jnp.float32)
  run = jax.jit(functools.partial(api.gated_delta_rule, output_final_state=True, chunk_size=64,
                                  impl="xla"))
  norms = {}
  for end in range(256, case.T + 1, 256):  # prefill in pieces, carrying the state
    sl = slice(end - 256, end)
    _, s = run(q[:, sl], k[:, sl], v[:, sl], lg[:, sl], beta[:, sl], initial_state=s)
    norms[end] = float(jnp.max(jnp.linalg.norm(s, axis=(-2, -1))))
  assert all(np.isfinite(list(norms.values()))), norms
  assert norms[2048] < 1.25 * norms[256], norms
  assert max(norms.values()) < 4 * np.sqrt(case.K * case.V), norms  # |v| ~ sqrt(V) per write


def _mesh8():
  devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
  return Mesh(devices, sharding.MESH_AXES)


def _loss_and_grads(impl):
  def loss(q, k, v, lg, beta, s0):
    o, s = ops.gated_delta_rule(q, k, v, lg, beta, initial_state=s0, output_final_state=True,
                                chunk_size=16, impl=impl)
    return jnp.sum(o * o) + jnp.sum(jnp.sin(s)), (o, s)
  return jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))


def test_sharded_replicates_indivisible_batch_and_heads():
  """B=3, H=3 on a 2x2x2 mesh: neither divides, so both are replicated (like the Polar op) and
  the result equals the unsharded one, gradients included."""
  case = Case(T=21, B=3, H=3)
  args = random_inputs(case)
  want = _loss_and_grads("xla")(*args)
  with sharding.use_mesh(_mesh8()):
    got = _loss_and_grads("xla")(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_sharded_step_equals_unsharded_and_checks_global_shapes():
  """ops.gated_delta_step under the 8-device mesh (B=4, H=2 split) == the unsharded step; a bad
  shape is the op's own error, raised before the shard_map."""
  q, k, v, lg, beta, s0 = random_inputs(Case(T=1, B=4, H=2, K=16, V=16), jnp.float32, seed=9)
  args = (q[:, 0], k[:, 0], v[:, 0], lg[:, 0], beta[:, 0], s0)
  want = ops.gated_delta_step(*args, impl="xla")
  with sharding.use_mesh(_mesh8()):
    got = jax.jit(functools.partial(ops.gated_delta_step, impl="xla"))(*args)
    with pytest.raises(ValueError, match="gated_delta_step expects"):
      ops.gated_delta_step(*args[:3], args[3][:, 0], *args[4:], impl="xla")  # log_gamma [B]
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


@pytest.fixture
def fake_pallas(monkeypatch):
  """Routes impl='pallas' on CPU to a module with the backend contract (xla_chunked, or a copy
  without a bwd) so the api's custom_vjp wiring is tested without a GPU."""
  def install(with_bwd: bool):
    mod = types.ModuleType(f"fake_gated_delta_pallas_bwd_{with_bwd}")
    mod.gated_delta_fwd = xla_chunked.gated_delta_fwd
    mod.unsupported_reason = lambda *a, chunk_size: (
        "chunk_size 7 is not a tile size" if chunk_size == 7 else None)
    if with_bwd:
      mod.gated_delta_bwd = xla_chunked.gated_delta_bwd
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(gd.BACKENDS.pallas, jax.default_backend(),
                        (dispatch.Candidate(mod.__name__),))
    dispatch.load.cache_clear()  # dispatch caches modules by name
  yield install
  dispatch.load.cache_clear()


def test_sharded_under_8_device_mesh_equals_unsharded(fake_pallas):
  """XLA path and the Pallas custom_vjp path (fake backend) under shard_map == unsharded XLA."""
  fake_pallas(True)
  case = Case(T=37, B=4, H=2, K=16, V=16)
  inputs = random_inputs(case, jnp.float32, seed=7)
  (_, (o0, s0)), g0 = _loss_and_grads("xla")(*inputs)
  for impl in ("xla", "pallas"):
    with sharding.use_mesh(_mesh8()):
      (_, (o1, s1)), g1 = _loss_and_grads(impl)(*inputs)
    np.testing.assert_allclose(o1, o0, atol=1e-6, rtol=1e-6, err_msg=impl)
    np.testing.assert_allclose(s1, s0, atol=1e-6, rtol=1e-6, err_msg=impl)
    for a, b in zip(g1, g0):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=impl)


@pytest.mark.parametrize("with_bwd", [True, False])
def test_pallas_custom_vjp_wiring(fake_pallas, with_bwd):
  fake_pallas(with_bwd)
  check_backend(functools.partial(_api_fwd, impl="pallas"), CASES[5], jnp.float32,
                atol=1e-4, rtol=1e-4)


def test_pallas_unsupported_errors_and_auto_falls_back(fake_pallas):
  fake_pallas(True)
  q, k, v, lg, beta, _ = random_inputs(Case(T=9, H=1))
  with pytest.raises(ValueError, match="chunk_size 7 is not a tile size"):
    api.gated_delta_rule(q, k, v, lg, beta, chunk_size=7, impl="pallas")
  o_auto, _ = api.gated_delta_rule(q, k, v, lg, beta, chunk_size=7, impl="auto")
  o_xla, _ = api.gated_delta_rule(q, k, v, lg, beta, chunk_size=7, impl="xla")
  np.testing.assert_array_equal(o_auto, o_xla)


def test_bad_inputs_raise_clear_errors():
  q, k, v, lg, beta, s0 = random_inputs(Case(T=5, H=2, K=16, V=8))
  with pytest.raises(ValueError, match="no Pallas gated delta backend for platform 'cpu'"):
    api.gated_delta_rule(q, k, v, lg, beta, impl="pallas")
  with pytest.raises(ValueError, match="impl must be one of"):
    api.gated_delta_rule(q, k, v, lg, beta, impl="triton")
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    api.gated_delta_rule(q, k, v, lg, beta, chunk_size=0)
  with pytest.raises(ValueError, match=r"initial_state must be \[B, H, K, V\]"):
    api.gated_delta_rule(q, k, v, lg, beta, initial_state=jnp.swapaxes(s0, -1, -2))
  with pytest.raises(ValueError, match=r"log_gamma must be \[B, T, H\]"):
    api.gated_delta_rule(q, k, v, lg[..., None], beta)
  with pytest.raises(ValueError, match="GQA-expanded"):
    api.gated_delta_rule(q, k[:, :, :1], v, lg, beta)
  with pytest.raises(ValueError, match="gated_delta_step expects"):
    api.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], lg[:, 0], beta[:, 0], s0[0])


def test_api_state_dtype_follows_the_oracle_rule():
  """An fp64 initial state with fp32 q/k/v/gates runs in fp64 (as the oracle does), not fp32."""
  case = Case(T=6, B=1, H=2, K=8, V=8)
  with jax.enable_x64(True):
    q, k, v, lg, beta, s0 = random_inputs(case, jnp.float32, seed=5)
    s0 = jnp.asarray(np.random.default_rng(6).standard_normal(s0.shape), jnp.float64)
    o, s = _api_fwd(q, k, v, lg, beta, s0, chunk_size=4)
    want_o, want_s = reference.gated_delta_sequential(q, k, v, lg, beta, s0)
  assert o.dtype == want_o.dtype == jnp.float64 and s.dtype == jnp.float64
  np.testing.assert_allclose(o, want_o, atol=1e-10, rtol=1e-10)
  np.testing.assert_allclose(s, want_s, atol=1e-10, rtol=1e-10)
