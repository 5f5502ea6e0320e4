"""Pallas GPU (Triton) gated-delta kernels vs the sequential oracle: interpret mode on CPU, plus a
compiled check on a CUDA GPU (`@pytest.mark.gpu`, skipped without one).

Forward, final state and VJP (q, k, v, log_gamma, beta, initial state) on fresh random inputs
through the shared harness `tests/gated_delta_cases.py`: odd T, T not a multiple of the chunk,
gates near 0 and near 1, K != V, and the exact sequence split (pieces composed by a scan).
"""

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import gated_delta as gd
from pallas_kernels.gated_delta import chunk_math as cm
from pallas_kernels.gated_delta import gpu_triton, reference
from tests.gated_delta_cases import Case, check_backend
from tests.oracle_check import assert_close

_CASES = (
    Case(T=37, H=2, K=16, V=32, chunk=16),                                   # odd T, K != V
    Case(T=33, H=1, K=32, V=16, chunk=16, gamma="near1", beta="near1"),      # gates ~1
)


@pytest.mark.parametrize("C,K,V,bk,bv,gates", [(16, 32, 48, 16, 16, "mixed"),
                                                (32, 16, 16, 16, 8, "near1"),
                                                (16, 16, 32, 8, 32, "small")])
def test_wy_chunk_grads_match_oracle(C, K, V, bk, bv, gates):
  """The WY decomposition (`chunk_math.chunk_grads_wy`, the composition the "wy" kernels run,
  walked in K and V blocks) vs fp64 autodiff of the sequential oracle over one chunk from a random
  entry state S with random cotangents dO and dS1: dq, dk, dv, dbeta, dlog_gamma, exact to fp64."""
  rng = np.random.default_rng(C + K + V)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(rng.standard_normal((C, K))), unit(rng.standard_normal((C, K)))
  v, do = rng.standard_normal((C, V)), rng.standard_normal((C, V))
  s, ds1 = rng.standard_normal((K, V)), rng.standard_normal((K, V))
  lo = {"mixed": 0.05, "near1": 0.95, "small": 0.01}[gates]
  hi = {"mixed": 1.0, "near1": 1.0, "small": 0.2}[gates]
  lg, beta = np.log(rng.uniform(lo, hi, C)), rng.uniform(0.0, 1.0, C)
  with jax.enable_x64(True):
    x = [jnp.asarray(a, jnp.float64) for a in (q, k, v, lg, beta)]
    seq = lambda q, k, v, lg, b: reference.gated_delta_sequential(
        q[None, :, None], k[None, :, None], v[None, :, None], lg[None, :, None],
        b[None, :, None], jnp.asarray(s)[None, None])
    _, vjp = jax.vjp(seq, *x)
    want = vjp((jnp.asarray(do)[None, :, None], jnp.asarray(ds1)[None, None]))
    want = [np.asarray(w) for w in want]  # dq, dk, dv, dlog_gamma, dbeta
    gc = jnp.cumsum(x[3])[:, None]
    dq, dk, dv, dbeta, dgc_col, dgc_row = cm.chunk_grads_wy(
        x[0], x[1], x[2], x[4][:, None], gc, gc.T, jnp.asarray(do), jnp.asarray(s),
        jnp.asarray(ds1), cfg=cm.Dots(dtype=jnp.float64), block_k=bk, block_v=bv)
    dgc = np.asarray(dgc_col[:, 0] + dgc_row[0])
  got = (dq, dk, dv, np.cumsum(dgc[::-1])[::-1], dbeta[:, 0])
  for name, g, w in zip(("dq", "dk", "dv", "dlog_gamma", "dbeta"), got, want, strict=True):
    assert_close(name, g, w, 1e-10 * max(1.0, np.abs(w).max()), 1e-9, (C, K, V, gates))


@pytest.mark.parametrize("case", _CASES, ids=str)
def test_interpret_matches_oracle(case):
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True)
  check_backend(fwd, case, jnp.float32, atol=2e-5, rtol=2e-5, seed=3, bwd=bwd)


_T = gpu_triton.Tuning


def test_interpret_sequence_split_is_exact():
  """4 pieces of 1 chunk each (forward), 2 pieces (backward's state passes), V blocks of 8."""
  case = Case(T=61, B=2, H=1, K=16, V=16, chunk=16, gamma="small", beta="near0",
              init_state=False)
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True, pieces=4)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True, pieces=2,
                          tuning=_T(block_v=8))
  check_backend(fwd, case, jnp.float32, atol=2e-5, rtol=2e-5, seed=4, bwd=bwd)


# The backward's split levers (`Tuning.bwd_split`, `Tuning.bwd_block_v`) with the split forced on
# at small shapes: odd T, correlated keys, 4 pieces of 1 chunk each, through the plain backward
# (the transition A taken from its own forward rerun) and through api's custom_vjp below (each
# piece's start state and A saved by the forward). f32 inputs: exact up to f32 rounding. Gates
# near 1 so that a piece's transition is far from 0 (a wrong composition shows).
_SPLIT_CASES = (
    (Case(T=61, B=2, H=1, K=16, V=16, chunk=16, gamma="near1", key_share=0.5),
     _T(bwd_split="reuse"), 4, 2e-5, jnp.float32),
    (Case(T=57, B=1, H=2, K=16, V=32, chunk=16, gamma="near1", key_share=0.5),
     _T(bwd_split="reuse", block_v=16, bwd_block_v=8, piece_scan_unroll=True), 4, 2e-5,
     jnp.float32),
    (Case(T=61, B=1, H=2, K=32, V=16, chunk=16, gamma="near1", key_share=0.5),
     _T(bwd_split="recompute", bwd_block_v=8), 2, 2e-5, jnp.float32),
    (Case(T=63, B=1, H=2, K=16, V=16, chunk=16, gamma="near1", key_share=0.5),
     _T(bwd_split="reuse"), 4, 3e-2, jnp.bfloat16),
)


@pytest.mark.parametrize("case,tuning,pieces,tol,dtype", _SPLIT_CASES,
                         ids=["reuse_p4_kshare", "reuse_bwdbv8_unroll_p4_near1", "bwdbv8_p2",
                              "reuse_p4_bf16"])
def test_interpret_bwd_split_levers_match_oracle(case, tuning, pieces, tol, dtype):
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True, pieces=pieces)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True, pieces=pieces,
                          tuning=tuning)
  check_backend(fwd, case, dtype, atol=tol, rtol=tol, seed=21, bwd=bwd)


def test_num_pieces_at_the_benchmark_shapes():
  """The automatic piece count (one for every sequential pass of a call) at H = 8, K = V = 128,
  C = 64 with the default tuning: the program counts the KERNELS notes quote."""
  got = {(b, t): gpu_triton.num_pieces(b, 8, t // 64, 128, 128, None, _T())
         for b, t in ((16, 2048), (4, 8192), (1, 32768), (1, 65536))}
  assert got == {(16, 2048): 1, (4, 8192): 4, (1, 32768): 16, (1, 65536): 16}


# The gradients (`gdn_dqkw` per K block + `gdn_wy_bwd` per chunk) with several K and V blocks,
# T0 from the prepass or recomputed, dv' stored in bf16 (looser tolerance), pieces split.
_WY_CASES = (
    (Case(T=37, H=2, K=32, V=32, chunk=16), _T(block_k=16, block_v=16), None, 2e-5,
     jnp.float32),
    (Case(T=61, B=2, H=1, K=32, V=16, chunk=16, gamma="near1", beta="near1"),
     _T(wy_t0="recompute", block_k=16, block_v=8), 2, 2e-5, jnp.float32),
    (Case(T=50, H=1, K=16, V=32, chunk=16, gamma="small", beta="near0", init_state=False),
     _T(block_k=8, block_v=16), 2, 2e-5, jnp.float32),
    (Case(T=40, H=1, K=16, V=16, chunk=16), _T(dv_dtype="bfloat16"), None, 2e-2,
     jnp.float32),
    (Case(T=45, H=2, K=32, V=16, chunk=16), _T(block_k=16), None, 3e-2,
     jnp.bfloat16),  # bf16 q/k/v: v', dv' and the per-chunk states ("auto") in bf16
    pytest.param(Case(T=600, H=1, K=16, V=16, chunk=16), _T(), 2, 3e-2, jnp.bfloat16,
                 marks=pytest.mark.slow),  # long, pieces
    pytest.param(Case(T=600, H=1, K=16, V=16, chunk=16, gamma="near1", beta="near1"), _T(),
                 None, 3e-2, jnp.bfloat16, marks=pytest.mark.slow),  # long, slow decay
    (Case(T=90, H=1, K=16, V=16, chunk=16), _T(), 2, 3e-2, jnp.bfloat16),
)


@pytest.mark.parametrize("case,tuning,pieces,tol,dtype", _WY_CASES,
                         ids=["kblocks", "t0recompute_pieces", "small_gates_pieces", "bf16dv",
                              "bf16_inputs", "bf16_auto_T600_pieces", "bf16_auto_T600_near1", "bf16_auto_pieces"])
def test_interpret_wy_grads_match_oracle(case, tuning, pieces, tol, dtype):
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True, pieces=pieces,
                          tuning=tuning)
  check_backend(fwd, case, dtype, atol=tol, rtol=tol, seed=7, bwd=bwd)


@pytest.mark.parametrize("tuning,pieces,kernels", [
    (_T(), None, ("gdn_prepass", "gdn_state", "gdn_state_bwd", "gdn_dqkw", "gdn_wy_bwd")),
    (_T(wy_t0="recompute", dv_dtype="bfloat16", dqkw_warps=8, bwd_split="recompute",
        bwd_block_v=0), 2,
     ("gdn_state_affine", "gdn_state_bwd_affine", "gdn_dqkw", "gdn_wy_bwd")),
    (_T(bwd_split="reuse", bwd_block_v=32), 2,
     ("gdn_state_affine", "gdn_state_bwd_affine", "gdn_state_bwd", "gdn_dqkw")),
], ids=["wy", "wy_recompute_bf16dv_pieces", "reuse_bwdbv32_pieces"])
def test_bwd_lowers_to_triton_for_h100(tuning, pieces, kernels):
  """Traces and lowers the backward to Triton IR for an abstract H100 (bf16, K = V = 128, C = 64):
  catches ops the Triton lowering rejects without a GPU (Triton's own compile runs only there)."""
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132))
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  B, T, H, K, V = 1, 500, 2, 128, 128  # 8 chunks, the last one padded
  x = lambda *sh, dt=jnp.float32: jax.ShapeDtypeStruct(sh, dt)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, chunk_size=64, pieces=pieces,
                          tuning=tuning)
  with jax.sharding.use_abstract_mesh(mesh):
    exp = jax.export.export(jax.jit(bwd), platforms=["cuda"], disabled_checks=checks)(
        x(B, T, H, K, dt=jnp.bfloat16), x(B, T, H, K, dt=jnp.bfloat16),
        x(B, T, H, V, dt=jnp.bfloat16), x(B, T, H), x(B, T, H), x(B, H, K, V), x(B, T, H, V),
        x(B, H, K, V))
  mod = exp.mlir_module()
  missing = [name for name in kernels if name not in mod]
  assert not missing, f"kernels not in the lowered module: {missing}"


def test_rejects_bad_tuning():
  q = jnp.zeros((1, 16, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="Tuning.wy_t0"):
    gpu_triton.gated_delta_bwd(q, q, q, q[..., 0], q[..., 0], None, q, None, chunk_size=16,
                               tuning=_T(wy_t0="fast"), interpret=True)
  with pytest.raises(ValueError, match="Tuning.bwd_split"):
    gpu_triton.gated_delta_bwd(q, q, q, q[..., 0], q[..., 0], None, q, None, chunk_size=16,
                               tuning=_T(bwd_split="fast"), interpret=True)
  with pytest.raises(ValueError, match="Tuning.bwd_block_v"):
    gpu_triton.gated_delta_bwd(q, q, q, q[..., 0], q[..., 0], None, q, None, chunk_size=16,
                               tuning=_T(bwd_block_v=12), interpret=True)
  with pytest.raises(ValueError, match="Tuning.inverse_block"):
    gpu_triton.gated_delta_fwd(q, q, q, q[..., 0], q[..., 0], chunk_size=16,
                               tuning=_T(inverse_block=12), interpret=True)


def test_rejects_unsupported_shapes():
  q = jnp.zeros((1, 8, 1, 12), jnp.float32)
  assert "powers of 2" in gpu_triton.unsupported_reason(q, q, q, chunk_size=16)
  with pytest.raises(ValueError, match="chunk_size"):
    gpu_triton.gated_delta_fwd(q, q, q, q[..., 0], q[..., 0], chunk_size=24, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,kv,tol", [(jnp.float32, 64, 2e-3), (jnp.bfloat16, 128, 3e-2)])
def test_compiled_matches_oracle(dtype, kv, tol):
  case = Case(T=200, B=2, H=2, K=kv, V=kv, chunk=64)
  check_backend(gpu_triton.gated_delta_fwd, case, dtype, atol=tol, rtol=tol, seed=5,
                bwd=gpu_triton.gated_delta_bwd)


@pytest.mark.gpu
@pytest.mark.parametrize("tuning", [_T(bwd_split="reuse"), _T(bwd_split="reuse", bwd_block_v=32),
                                    _T(bwd_block_v=32)], ids=["reuse", "reuse_bwdbv32", "bwdbv32"])
def test_compiled_split_levers_match_oracle(tuning):
  """The backward's split levers compiled (bf16, K = V = 128, chunk 64, 4 pieces of 1 chunk,
  gates near 1, correlated keys)."""
  case = Case(T=250, B=1, H=2, K=128, V=128, chunk=64, gamma="near1", key_share=0.5)
  fwd = functools.partial(gpu_triton.gated_delta_fwd, pieces=4, tuning=tuning)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, pieces=4, tuning=tuning)
  check_backend(fwd, case, jnp.bfloat16, atol=3e-2, rtol=3e-2, seed=22, bwd=bwd)


def test_rejects_f32_at_k128():
  q = jnp.zeros((1, 8, 1, 128), jnp.float32)
  assert "shared memory" in gpu_triton.unsupported_reason(q, q, q, chunk_size=64)
  bf16 = q.astype(jnp.bfloat16)
  assert gpu_triton.unsupported_reason(bf16, bf16, bf16, chunk_size=64) is None


def _interpret_backend(monkeypatch, tuning, pieces=None):
  """Makes gpu_triton in interpret mode (fwd / fwd_residuals / bwd) this platform's Pallas
  gated-delta backend, so impl="pallas" runs it through the api's custom_vjp (the one that saves
  the forward's prepass as residuals)."""
  name = f"_gdn_interpret_backend_{abs(hash((tuning, pieces)))}"
  mod = types.ModuleType(name)
  kw = dict(interpret=True, tuning=tuning, pieces=pieces)
  mod.gated_delta_fwd = functools.partial(gpu_triton.gated_delta_fwd, **kw)
  mod.gated_delta_fwd_residuals = functools.partial(gpu_triton.gated_delta_fwd_residuals, **kw)
  mod.gated_delta_bwd = functools.partial(gpu_triton.gated_delta_bwd, **kw)
  mod.unsupported_reason = gpu_triton.unsupported_reason
  monkeypatch.setitem(sys.modules, name, mod)
  monkeypatch.setitem(gd.BACKENDS.pallas, jax.default_backend(), (dispatch.Candidate(name),))
  dispatch.load.cache_clear()


@pytest.mark.parametrize("tuning,pieces", [(_T(), None),
                                           (_T(wy_t0="recompute", bwd_split="recompute"), 2),
                                           (_T(bwd_split="reuse", bwd_block_v=8), 4)],
                         ids=["wy_t0", "wy_recompute_pieces", "reuse_split_pieces"])
def test_api_vjp_reuses_forward_prepass(monkeypatch, tuning, pieces):
  """jax.vjp through api's custom_vjp with the forward's (w, u, T0[, split]) as residuals vs the
  oracle (correlated keys); and the saved-prepass backward equals the recomputing one exactly."""
  case = Case(T=61, B=2, H=1, K=16, V=16, chunk=16, gamma="near1", key_share=0.5)
  _interpret_backend(monkeypatch, tuning, pieces)
  fwd = lambda q, k, v, lg, b, s0, chunk_size: gd.gated_delta_rule(
      q, k, v, lg, b, initial_state=s0, output_final_state=True, chunk_size=chunk_size,
      impl="pallas")
  check_backend(fwd, case, jnp.float32, atol=2e-5, rtol=2e-5, seed=11)
  dispatch.load.cache_clear()
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((1, 61, 1, 16)), jnp.float32) for _ in range(2))
  v, do = (jnp.asarray(rng.standard_normal((1, 61, 1, 16)), jnp.float32) for _ in range(2))
  lg = jnp.asarray(np.log(rng.uniform(0.5, 1.0, (1, 61, 1))), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.0, 1.0, (1, 61, 1)), jnp.float32)
  kw = dict(chunk_size=16, interpret=True, tuning=tuning, pieces=pieces)
  _, _, prepass = gpu_triton.gated_delta_fwd_residuals(q, k, v, lg, beta, None, **kw)
  if not gpu_triton._needs_t0(tuning):
    assert prepass[2] is None
  assert (prepass[3] is not None) == (tuning.bwd_split == "reuse" and (pieces or 1) > 1)
  saved = gpu_triton.gated_delta_bwd(q, k, v, lg, beta, None, do, None, prepass=prepass, **kw)
  fresh = gpu_triton.gated_delta_bwd(q, k, v, lg, beta, None, do, None, **kw)
  for g_saved, g_fresh in zip(saved, fresh, strict=True):
    np.testing.assert_array_equal(np.asarray(g_saved), np.asarray(g_fresh))


def test_bwd_rejects_mismatched_prepass():
  q = jnp.zeros((1, 32, 1, 16), jnp.float32)
  _, _, (w, u, t0, split) = gpu_triton.gated_delta_fwd_residuals(
      q, q, q, q[..., 0], q[..., 0], chunk_size=16, interpret=True)
  with pytest.raises(ValueError, match="reads T0"):
    gpu_triton.gated_delta_bwd(q, q, q, q[..., 0], q[..., 0], None, q, None, chunk_size=16,
                               interpret=True, prepass=(w, u, None, split))
  with pytest.raises(ValueError, match="prepass w has shape"):
    gpu_triton.gated_delta_bwd(q, q, q, q[..., 0], q[..., 0], None, q, None, chunk_size=16,
                               interpret=True, prepass=(w[:, :16], u, t0, split))
  reuse = dict(chunk_size=16, interpret=True, tuning=_T(bwd_split="reuse"))
  _, _, (w, u, t0, split) = gpu_triton.gated_delta_fwd_residuals(
      q, q, q, q[..., 0], q[..., 0], pieces=2, **reuse)
  with pytest.raises(ValueError, match="saved split has shapes"):  # 2 pieces saved, 1 asked
    gpu_triton.gated_delta_bwd(q, q, q, q[..., 0], q[..., 0], None, q, None, pieces=1,
                               prepass=(w, u, t0, split), **reuse)


def test_interpret_blocked_inverse_matches_oracle():
  """The kernels with the blocked inverse (chunk 32, blocks of 8): forward + VJP vs the oracle."""
  case = Case(T=70, H=2, K=16, V=16, chunk=32)
  tuning = _T(inverse_block=8)
  fwd = functools.partial(gpu_triton.gated_delta_fwd, interpret=True, tuning=tuning)
  bwd = functools.partial(gpu_triton.gated_delta_bwd, interpret=True, tuning=tuning)
  check_backend(fwd, case, jnp.float32, atol=2e-5, rtol=2e-5, seed=12, bwd=bwd)
