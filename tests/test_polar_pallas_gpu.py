"""Pallas-Triton GPU kernels of `attention_stats` vs the fp64 oracle (shared harness).

On CPU the kernels run in Pallas interpret mode with small blocks (16-32) so that short
sequences still span several blocks: odd lengths, T smaller than a block, windows smaller and
larger than T, GQA, decode offsets and a longer cache. A lowering test checks that the kernels
lower to Triton IR for an H100 (no GPU needed). The `gpu` tests run compiled on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.polar_attention import gpu_triton
from tests.polar_cases import CASES, SMALL_CASES, Case, check_backend, traced_offset_backend

# Small, mixed blocks: several key/query blocks at T ~ 33-100, different dq/dkv tilings.
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

SMALL_BLOCKS = gpu_triton.BlockConfig(block_q=16, block_k=16, dq_block_q=16, dq_block_k=32,
                                      dkv_block_q=32, dkv_block_k=16)


def _backend(config):
  return (functools.partial(gpu_triton.attention_stats_fwd, config=config),
          functools.partial(gpu_triton.attention_stats_bwd, config=config))


@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
def test_fp32_matches_oracle(case):
  check_backend(*_backend(SMALL_BLOCKS), case, jnp.float32, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", [
    Case(Tq=100, H=4, G=2, D=32, window=40),               # odd T, GQA, window < T
    Case(Tq=1, Tk=70, q_offset=69, H=4, G=1, D=32),        # decode, full context
], ids=str)
def test_bf16_matches_oracle(case):
  check_backend(*_backend(SMALL_BLOCKS), case, jnp.bfloat16, atol=3e-2, rtol=3e-2)


def test_split_bwd_per_head_loops_match_oracle():
  """dK/dV kernel with one three-phase loop per query head (dkv_flat_heads=False; the
  default walks (head, query tile) pairs in one loop per phase)."""
  cfg = dataclasses.replace(SMALL_BLOCKS, dkv_flat_heads=False)
  check_backend(*_backend(cfg), Case(Tq=40, Tk=73, q_offset=33, H=8, G=2, window=16),
                jnp.float32, atol=2e-5, rtol=2e-5)


# Split-K decode forced on at small sizes: several key splits, packed GQA rows, windows.
DECODE_BLOCKS = dataclasses.replace(SMALL_BLOCKS, decode_min_keys=1, decode_block_k=16,
                                    decode_target_programs=7)


@pytest.mark.parametrize("case", [
    Case(Tq=1, Tk=100, q_offset=99, H=4, G=2, window=32),  # decode, windowed
    Case(Tq=3, Tk=90, q_offset=70, H=6, G=2, window=33),   # 3 rows x 3 heads, longer cache
], ids=str)
def test_split_k_decode_matches_oracle(case):
  assert gpu_triton.uses_split_k_decode(case.Tq, case.H // case.G, case.tk, case.window,
                                        case.q_offset, DECODE_BLOCKS)
  check_backend(*_backend(DECODE_BLOCKS), case, jnp.float32, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("config", [SMALL_BLOCKS, DECODE_BLOCKS], ids=["tiles", "split_k"])
def test_traced_q_offset(config):
  """q_offset as a traced int32 scalar (a jitted decode / chunked-prefill loop)."""
  fwd, bwd = traced_offset_backend(gpu_triton, config=config)
  check_backend(fwd, bwd, Case(Tq=3, Tk=90, q_offset=60, H=4, G=2, window=20), jnp.float32,
                atol=2e-5, rtol=2e-5)


def test_window_larger_than_t_and_block_larger_than_t():
  # Default (large) blocks on short inputs: one padded block, window wider than T.
  check_backend(*_backend(gpu_triton.DEFAULT_CONFIG), Case(Tq=33, H=4, G=2, window=64),
                jnp.float32, atol=2e-5, rtol=2e-5)


def test_unsupported_reason():
  q = jnp.zeros((1, 8, 4, 16))
  k = jnp.zeros((1, 8, 2, 16))
  assert gpu_triton.unsupported_reason(q, k, k, window=None, q_offset=0) is None
  assert "head dim 12" in gpu_triton.unsupported_reason(q[..., :12], k[..., :12], k[..., :12])
  assert gpu_triton.unsupported_reason(q, k, k, window=None, q_offset=jnp.int32(3)) is None
  assert "q_offset" in gpu_triton.unsupported_reason(q, k, k, q_offset=jnp.zeros(2, jnp.int32))
  assert "dtype" in gpu_triton.unsupported_reason(q.astype(jnp.int8), k, k)


def test_lowers_to_triton_for_h100():
  """Traces and lowers fwd + both bwd kernels to Triton IR for an abstract H100 (bf16, D=128)."""
  lower = gpu_triton.BlockConfig(interpret=False)
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132))
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  B, T, H, G, D = 1, 300, 8, 2, 128
  q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, G, D), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
  kw = dict(window=100, q_offset=0, config=lower)
  with jax.sharding.use_abstract_mesh(mesh):
    fwd = jax.export.export(jax.jit(functools.partial(gpu_triton.attention_stats_fwd, **kw)),
                            platforms=["cuda"], disabled_checks=checks)(q, kv, kv, row)
    bwd = jax.export.export(jax.jit(functools.partial(gpu_triton.attention_stats_bwd, **kw)),
                            platforms=["cuda"], disabled_checks=checks)(
                                q, kv, kv, row, row, q, row, row)
    decode = jax.export.export(
        jax.jit(lambda q, k, v, s, off: gpu_triton.attention_stats_fwd(
            q, k, v, s, window=None, q_offset=off, config=lower)),
        platforms=["cuda"], disabled_checks=checks)(
            jax.ShapeDtypeStruct((B, 1, H, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, 8192, G, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, 8192, G, D), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, 1, H), jnp.float32), jnp.int32(8191))
  assert fwd.mlir_module().count("xla.gpu.triton") == 1
  assert bwd.mlir_module().count("xla.gpu.triton") == 2
  assert "polar_attention_decode" in decode.mlir_module()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[1::3], ids=str)
def test_compiled_on_gpu_fp32(case):
  check_backend(*_backend(gpu_triton.DEFAULT_CONFIG), case, jnp.float32, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(Tq=333, H=8, G=2, D=128, window=100),
    Case(Tq=1, Tk=5000, q_offset=4999, H=8, G=2, D=128),     # split-K decode (default config)
    Case(Tq=1, Tk=1000, q_offset=999, H=8, G=2, D=128),
], ids=str)
def test_compiled_on_gpu_bf16(case):
  check_backend(*_backend(gpu_triton.DEFAULT_CONFIG), case, jnp.bfloat16, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(dkv_flat_heads=False)], ids=["per_head_dkv"])
@pytest.mark.parametrize("case", [
    Case(Tq=333, H=8, G=2, D=128, window=100),
    Case(Tq=300, Tk=1800, q_offset=1500, H=8, G=2, D=128, window=512),
], ids=str)
def test_compiled_on_gpu_bwd_variants_bf16(case, variant):
  cfg = dataclasses.replace(gpu_triton.DEFAULT_CONFIG, **variant)
  check_backend(*_backend(cfg), case, jnp.bfloat16, atol=3e-2, rtol=3e-2)
