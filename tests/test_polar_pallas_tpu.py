"""Mosaic-TPU kernels of `attention_stats` vs the fp64 oracle (shared harness).

Runs in TPU interpret mode on CPU (`pltpu.InterpretParams`: TPU semantics, NaN-filled
uninitialized scratch, out-of-bounds reads raise) with small blocks (16/32 rows: multiples of 8,
D equal to the full head dim, so the (8, 128) tiling rule holds) so that short sequences span
several blocks and exercise the band skipping, index-map clamping and masked edge blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.polar_attention import tpu
from tests.polar_cases import SMALL_CASES, Case, check_backend, traced_offset_backend

SMALL_BLOCKS = tpu.BlockConfig(block_q=16, block_k=16, dq_block_q=16, dq_block_k=32,
                               dkv_block_q=32, dkv_block_k=16)


def _backend(config):
  return (functools.partial(tpu.attention_stats_fwd, config=config),
          functools.partial(tpu.attention_stats_bwd, config=config))


@pytest.mark.parametrize("case", SMALL_CASES[1:], ids=str)
def test_fp32_matches_oracle(case):
  check_backend(*_backend(SMALL_BLOCKS), case, jnp.float32, atol=2e-5, rtol=2e-5)


def test_traced_q_offset_and_key_blocks_past_the_last_row():
  """q_offset as a traced scalar (scalar-prefetched into the index maps); Tk > q_offset + Tq,
  so the last key blocks have no query row and their band is empty."""
  fwd, bwd = traced_offset_backend(tpu, config=SMALL_BLOCKS)
  check_backend(fwd, bwd, Case(Tq=17, Tk=80, q_offset=40, H=4, G=2, window=20), jnp.float32,
                atol=2e-5, rtol=2e-5)


def test_bf16_gqa_window_odd_length():
  check_backend(*_backend(SMALL_BLOCKS), Case(Tq=45, H=4, G=2, D=32, window=20),
                jnp.bfloat16, atol=3e-2, rtol=3e-2)


def test_default_blocks_short_input_window_larger_than_t():
  # 512-row default blocks shrink to one 8-aligned block; window wider than T.
  check_backend(*_backend(tpu.DEFAULT_CONFIG), Case(Tq=7, H=4, G=1, window=64), jnp.float32,
                atol=2e-5, rtol=2e-5)


def test_unsupported_reason():
  q = jnp.zeros((1, 8, 4, 16))
  k = jnp.zeros((1, 8, 2, 16))
  assert tpu.unsupported_reason(q, k, k, window=8, q_offset=0) is None
  assert "head dim 12" in tpu.unsupported_reason(q[..., :12], k[..., :12], k[..., :12])
  assert tpu.unsupported_reason(q, k, k, window=None, q_offset=jnp.int32(3)) is None


def test_lowers_to_mosaic_for_tpu_v5e():
  """Traces and lowers fwd + dQ + dK/dV to Mosaic for an abstract TPU v5e (bf16, D=128, 512
  blocks, static and traced offsets): checks block shapes and op support (not libtpu's passes)."""
  lower = tpu.BlockConfig(interpret=False)
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
      device_kind="TPU v5 lite", platform="tpu", num_cores=1))
  B, T, H, G, D = 1, 1500, 8, 2, 128
  q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, G, D), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
  with jax.sharding.use_abstract_mesh(mesh):
    fwd = jax.export.export(jax.jit(functools.partial(tpu.attention_stats_fwd, window=700,
                                                      q_offset=0, config=lower)),
                            platforms=["tpu"])(q, kv, kv, row)
    bwd = jax.export.export(
        jax.jit(lambda q, k, v, s, off: tpu.attention_stats_bwd(
            q, k, v, s, s, q, s, s, window=None, q_offset=off, config=lower)),
        platforms=["tpu"])(q, kv, kv, row, jnp.int32(0))
  assert fwd.mlir_module().count("tpu_custom_call") == 1
  assert bwd.mlir_module().count("tpu_custom_call") == 2
