"""The fused one-token gated-delta step kernel (`gpu_step`) vs the oracle's step, and the step
op's dispatch: interpret mode on CPU, the Triton lowering for an abstract H200 (the state operand
aliases the state result), and a compiled check on a CUDA GPU (`@pytest.mark.gpu`).

Fresh random inputs per case: odd batch and head counts, K != V, f32 and bf16 q/k/v, gates
anywhere in (0, 1], a random (not zero) entry state.
"""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import gated_delta as gd
from pallas_kernels.gated_delta import gpu_step, reference, xla_step
from tests.oracle_check import assert_close


def _inputs(B, H, K, V, dtype, seed):
  """q, k unit-norm and v in `dtype`; log_gamma, beta fp32 [B, H]; state fp32 [B, H, K, V]."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = unit(rng.standard_normal((B, H, K))), unit(rng.standard_normal((B, H, K)))
  v = rng.standard_normal((B, H, V))
  lg = np.log(rng.uniform(0.05, 1.0, (B, H)))
  beta = rng.uniform(0.0, 1.0, (B, H))
  s = rng.standard_normal((B, H, K, V))
  as_ = lambda x, dt: jnp.asarray(x, jnp.float32).astype(dt)
  return (as_(q, dtype), as_(k, dtype), as_(v, dtype), as_(lg, jnp.float32),
          as_(beta, jnp.float32), as_(s, jnp.float32))


def _check(got, want, tol, case):
  for name, g, w in zip(("o", "state"), got, want, strict=True):
    assert g.dtype == w.dtype == jnp.float32, (name, g.dtype, w.dtype)
    assert_close(name, g, w, atol=tol, rtol=tol, case=case)


@pytest.mark.parametrize("B,H,K,V,dtype,block_v", [
    (1, 1, 16, 16, jnp.float32, None),
    (3, 5, 16, 32, jnp.float32, None),        # odd B and H, K != V
    (5, 3, 32, 64, jnp.bfloat16, 16),         # several V blocks
    (2, 2, 64, 16, jnp.bfloat16, None),       # K > V
])
def test_kernel_matches_oracle(B, H, K, V, dtype, block_v):
  args = _inputs(B, H, K, V, dtype, seed=B * 100 + K + V)
  got = gpu_step.gated_delta_step(*args, block_v=block_v, interpret=True)
  _check(got, reference.gated_delta_step(*args), 2e-6, (B, H, K, V, dtype, block_v))


def test_state_is_updated_in_place_when_donated():
  """Under a jit that donates the state, the new state is the old state's buffer (no copy)."""
  args = _inputs(2, 3, 16, 32, jnp.bfloat16, seed=1)
  want = reference.gated_delta_step(*args)
  state = jnp.array(args[5])  # a private copy to donate
  ptr = state.unsafe_buffer_pointer()
  step = jax.jit(lambda *a: gpu_step.gated_delta_step(*a, interpret=True), donate_argnums=5)
  got = step(*args[:5], state)
  assert state.is_deleted()
  assert got[1].unsafe_buffer_pointer() == ptr
  _check(got, want, 2e-6, "donated")


def test_lowers_to_triton_for_h200_with_the_state_aliased():
  """Traces and lowers the kernel to Triton IR for an abstract H200 (bf16, K = V = 128): catches
  ops the Triton lowering rejects without a GPU; the custom call aliases state in -> state out."""
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H200", platform="gpu", num_cores=132))
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  B, H, K, V = 4, 8, 128, 128
  x = lambda *sh, dt=jnp.float32: jax.ShapeDtypeStruct(sh, dt)
  with jax.sharding.use_abstract_mesh(mesh):
    exp = jax.export.export(jax.jit(gpu_step.gated_delta_step), platforms=["cuda"],
                            disabled_checks=checks)(
        x(B, H, K, dt=jnp.bfloat16), x(B, H, K, dt=jnp.bfloat16), x(B, H, V, dt=jnp.bfloat16),
        x(B, H), x(B, H), x(B, H, K, V))
  mod = exp.mlir_module()
  assert "gdn_step" in mod
  assert "output_operand_aliases" in mod and "operand_index = 5" in mod, "state not aliased"


def test_refusals_name_the_problem():
  ok = _inputs(1, 2, 16, 16, jnp.float32, seed=0)
  assert gpu_step.unsupported_reason(*ok) is None
  odd = _inputs(1, 2, 12, 16, jnp.float32, seed=0)
  assert "powers of 2" in gpu_step.unsupported_reason(*odd)
  half_state = ok[:5] + (ok[5].astype(jnp.bfloat16),)
  assert "fp32 state" in gpu_step.unsupported_reason(*half_state)
  assert "block_v=8" in gpu_step.unsupported_reason(*ok, block_v=8)
  with pytest.raises(ValueError, match="powers of 2"):
    gpu_step.gated_delta_step(*odd, interpret=True)


@pytest.mark.parametrize("B,H,K,V,dtype", [(1, 1, 16, 16, jnp.float32),
                                           (3, 5, 16, 32, jnp.float32),
                                           (2, 2, 64, 16, jnp.bfloat16)])
def test_xla_step_matches_oracle(B, H, K, V, dtype):
  """The reordered XLA step (state read twice, written once) equals the oracle's step to fp32
  rounding."""
  args = _inputs(B, H, K, V, dtype, seed=7 * B + K + V)
  _check(xla_step.gated_delta_step(*args), reference.gated_delta_step(*args), 2e-6,
         (B, H, K, V, dtype))


def test_op_off_gpu_is_the_xla_step_and_pallas_is_a_clear_error():
  args = _inputs(3, 1, 12, 20, jnp.float32, seed=2)  # odd K, V: the op takes any
  want = xla_step.gated_delta_step(*args)
  for impl in ("auto", "xla"):
    _check(gd.gated_delta_step(*args, impl=impl), want, 0.0, impl)
  _check(want, reference.gated_delta_step(*args), 2e-6, "oracle")
  with pytest.raises(dispatch.KernelUnavailable, match="gated delta step"):
    gd.gated_delta_step(*args, impl="pallas")
  with pytest.raises(ValueError, match="state"):
    gd.gated_delta_step(*args[:5], args[5][:, :, :-1])


@pytest.fixture
def interpret_backend(monkeypatch):
  """gpu_step in interpret mode as this platform's Pallas step backend (impl="pallas" runs it)."""
  mod = types.ModuleType("_gdn_step_interpret_backend")
  mod.gated_delta_step = lambda *a: gpu_step.gated_delta_step(*a, interpret=True)
  mod.unsupported_reason = gpu_step.unsupported_reason
  monkeypatch.setitem(sys.modules, mod.__name__, mod)
  monkeypatch.setitem(gd.STEP_BACKENDS.pallas, jax.default_backend(),
                      (dispatch.Candidate(mod.__name__),))
  dispatch.load.cache_clear()
  yield mod
  dispatch.load.cache_clear()


def test_op_runs_the_kernel_and_falls_back_to_the_oracle_under_autodiff(interpret_backend):
  """impl="pallas" runs the kernel; differentiated (reverse or forward mode), the op is the
  oracle's step: its gradients equal the oracle's exactly."""
  args = _inputs(2, 3, 16, 32, jnp.bfloat16, seed=3)
  _check(jax.jit(lambda *a: gd.gated_delta_step(*a, impl="pallas"))(*args),
         reference.gated_delta_step(*args), 2e-6, "pallas")

  def loss(step, lg, beta, s):
    o, s_new = step(*args[:3], lg, beta, s)
    return jnp.sum(o * o) + jnp.sum(s_new * s_new[..., ::-1])

  ops = {"pallas": lambda *a: gd.gated_delta_step(*a, impl="pallas"),
         "oracle": reference.gated_delta_step}
  grads = {n: jax.grad(lambda *x, f=f: loss(f, *x), argnums=(0, 1, 2))(*args[3:])
           for n, f in ops.items()}
  for g, w in zip(grads["pallas"], grads["oracle"], strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  tangent = jnp.ones_like(args[3])
  jvps = {n: jax.jvp(lambda lg, f=f: f(*args[:3], lg, *args[4:]), (args[3],), (tangent,))[1]
          for n, f in ops.items()}
  for g, w in zip(jvps["pallas"], jvps["oracle"], strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,block_v", [(jnp.float32, None), (jnp.bfloat16, None),
                                           (jnp.bfloat16, 64)])
def test_compiled_matches_oracle(dtype, block_v):
  """The compiled kernel (the op's GPU backend) vs the oracle at the model's shape, the state
  donated and updated in place."""
  args = _inputs(6, 8, 128, 128, dtype, seed=7)
  want = reference.gated_delta_step(*args)
  assert gd.STEP_BACKENDS.pallas["gpu"][0].module == gpu_step.__name__
  state = jnp.array(args[5])
  ptr = state.unsafe_buffer_pointer()
  step = jax.jit(lambda *a: gpu_step.gated_delta_step(*a, block_v=block_v), donate_argnums=5)
  got = step(*args[:5], state)
  assert got[1].unsafe_buffer_pointer() == ptr
  _check(got, want, 1e-5, (dtype, block_v))
  _check(jax.jit(lambda *a: gd.gated_delta_step(*a, impl="pallas"))(*args), want, 1e-5, "op")
