"""Mosaic-GPU (Hopper) forward of `attention_stats` vs the fp64 oracle (shared harness).

On CPU the kernel runs in Mosaic-GPU interpret mode (TMA copies, barriers, wgmma and the three
warpgroups simulated); the backward is the Triton one (in Pallas interpret mode), so each case
checks the `mosaic_fwd + triton_bwd` pairing end to end. Shapes span several query tiles and
key blocks (T=200 pads to 256: masked diagonal / window blocks and an unmasked middle), GQA,
windows, ring depths 2 and 3. A race-detection run checks the producer / consumer barriers; a
lowering test lowers the kernel for an abstract H100 (no GPU needed). The `gpu` tests run it
compiled, with the Triton backward and with the Mosaic backward (`backward="mosaic"`, whose
interpret-mode tests are in test_polar_mosaic_bwd.py).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.polar_attention import gpu_mosaic
from tests.polar_cases import Case, check_backend, export_for_h100, random_inputs

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # as the bf16 Triton tests


def _backend(config):  # one config bound to both: its `backward` picks the bwd kernels
  return (functools.partial(gpu_mosaic.attention_stats_fwd, config=config),
          functools.partial(gpu_mosaic.attention_stats_bwd, config=config))


def _with_triton_bwd(config):  # the Mosaic backward is the default; these tests pair Triton's
  return _backend(dataclasses.replace(config, backward="triton"))


@pytest.mark.parametrize("case,config", [
    (Case(Tq=128, H=4, G=2, D=64), gpu_mosaic.MosaicConfig(block_k=64, stages=3)),  # > blocks
    (Case(Tq=200, H=4, G=1, D=64), gpu_mosaic.MosaicConfig(block_k=64)),
    (Case(Tq=200, H=4, G=2, D=64, window=40), gpu_mosaic.MosaicConfig(block_k=64, stages=3)),
    (Case(Tq=150, H=2, G=1, D=128, window=100), gpu_mosaic.MosaicConfig(block_k=128)),
    (Case(Tq=200, H=4, G=2, D=64, window=40),  # the two consumers take turns (ping-pong)
     gpu_mosaic.MosaicConfig(block_k=64, pingpong=True)),
    (Case(Tq=200, H=4, G=2, D=64),  # S of block i+1 with P V of block i; tile 1's first
     gpu_mosaic.MosaicConfig(block_k=64, stages=3, intra_overlap=True)),  # block unmasked
    (Case(Tq=200, H=4, G=1, D=64, window=100),  # both overlaps (FA3's schedule)
     gpu_mosaic.MosaicConfig(block_k=64, pingpong=True, intra_overlap=True)),
], ids=lambda x: str(x) if isinstance(x, Case) else (
    f"bk{x.block_k}s{x.stages}" + ("_pingpong" if x.pingpong else "")
    + ("_overlap" if x.intra_overlap else "")))
def test_bf16_matches_oracle(case, config):
  check_backend(*_with_triton_bwd(config), case, jnp.bfloat16, **BF16_TOL)


@pytest.mark.parametrize("overlap", [{}, dict(pingpong=True), dict(intra_overlap=True),
                                     dict(pingpong=True, intra_overlap=True)],
                         ids=["plain", "pingpong", "intra_overlap", "both"])
def test_no_races_in_barrier_protocol(overlap):
  """The interpreter's race detector over the K/V ring (2 slots, 4 key blocks per tile), with
  and without the consumers' ping-pong schedule barrier or intra-warpgroup overlap (P staged
  in SMEM in interpret mode: the next P must not overwrite one a P V wgmma still reads)."""
  case = Case(Tq=256, H=1, G=1, D=64, window=130)
  q, k, v, s = random_inputs(case, jnp.bfloat16)
  cfg = gpu_mosaic.MosaicConfig(block_k=64, **overlap,
                                interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(gpu_mosaic.attention_stats_fwd(q, k, v, s, window=case.window,
                                                       config=cfg))
  assert not gpu_callbacks.get_races().races_found


@pytest.mark.parametrize("change,match", [
    (dict(q_offset=3), "q_offset"),
    (dict(tk=96), "Tq == Tk"),
    (dict(D=32), "head dim"),
    (dict(dtype=jnp.float32), "bf16"),
    (dict(window=0), "window"),
])
def test_out_of_scope_inputs_raise(change, match):
  B, T, H, G = 1, 64, 4, 2
  D, dtype = change.get("D", 64), change.get("dtype", jnp.bfloat16)
  tk = change.get("tk", T) + change.get("q_offset", 0)
  q = jnp.zeros((B, T, H, D), dtype)
  k = jnp.zeros((B, tk, G, D), dtype)
  s = jnp.ones((B, T, H), jnp.float32)
  kw = dict(window=change.get("window"), q_offset=change.get("q_offset", 0))
  assert re.search(match, gpu_mosaic.unsupported_reason(q, k, k, **kw))
  with pytest.raises(ValueError, match=match):
    gpu_mosaic.attention_stats_fwd(q, k, k, s, **kw)
  q_ok, k_ok = jnp.zeros((B, T, H, 64), jnp.bfloat16), jnp.zeros((B, T, G, 64), jnp.bfloat16)
  assert gpu_mosaic.unsupported_reason(q_ok, k_ok, k_ok, window=None, q_offset=0) is None


def test_overlap_options_refuse_what_they_cannot_run():
  with pytest.raises(ValueError, match="stages=1 must be >= 2"):
    gpu_mosaic.MosaicConfig(intra_overlap=True, stages=1)
  # the SMEM fallback keeps the 2 slots intra_overlap needs: 2 slots of 256 keys do not fit at
  # D 128, and it takes smaller key blocks rather than one slot
  big = gpu_mosaic.MosaicConfig(block_k=256, intra_overlap=True)
  fit = gpu_mosaic.fitting_config(big, 128, jnp.bfloat16, 8192)
  assert fit is not None and fit.intra_overlap and fit.stages == 2 and fit.block_k < 256


@pytest.mark.parametrize("shape,window,config", [
    ((1, 300, 8, 2, 128), 100, gpu_mosaic.MosaicConfig(interpret=False)),  # default launch
    ((2, 200, 4, 4, 64), None, gpu_mosaic.MosaicConfig(interpret=False, block_k=64, stages=3,
                                                       p_via_smem=True, o_splits=1)),
    ((1, 300, 8, 2, 128), 100, gpu_mosaic.MosaicConfig(interpret=False, p_via_smem=True,
                                                       o_splits=4)),  # the psmem GPU test
    ((1, 300, 8, 2, 128), 100, gpu_mosaic.MosaicConfig(interpret=False, pingpong=True)),
    ((2, 200, 4, 4, 64), None, gpu_mosaic.MosaicConfig(interpret=False, block_k=64, stages=3,
                                                       p_via_smem=True, pingpong=True)),
    ((1, 300, 8, 2, 128), 100, gpu_mosaic.MosaicConfig(interpret=False, intra_overlap=True)),
    ((2, 200, 4, 4, 64), None, gpu_mosaic.MosaicConfig(interpret=False, block_k=64, stages=3,
                                                       p_via_smem=True, intra_overlap=True)),
    ((1, 300, 8, 2, 128), 100, gpu_mosaic.MosaicConfig(interpret=False, pingpong=True,
                                                       intra_overlap=True)),
], ids=["D128_default", "D64_bk64_s3_psmem", "D128_psmem_o4", "D128_pingpong",
        "D64_bk64_s3_psmem_pingpong", "D128_overlap", "D64_bk64_s3_psmem_overlap",
        "D128_pingpong_overlap"])
def test_lowers_for_h100(shape, window, config):
  """Traces and lowers the kernel through Mosaic GPU for an abstract H100 (checks SMEM fit)."""
  fwd = functools.partial(gpu_mosaic.attention_stats_fwd, window=window, config=config)
  exported = export_for_h100(fwd, shape, "q", "kv", "kv", "row")
  assert exported.mlir_module().count("mosaic_gpu") >= 1


# The compiled-GPU cases of the forward and the backward: a window, a batch of 2, D=64 GQA 4:1.
COMPILED_CASES = [
    Case(Tq=333, H=8, G=2, D=128, window=100),
    Case(Tq=1000, H=8, G=2, D=128, B=2),
    Case(Tq=200, H=4, G=1, D=64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", [gpu_mosaic.DEFAULT_CONFIG,
                                    gpu_mosaic.MosaicConfig(block_k=64, stages=3),
                                    gpu_mosaic.MosaicConfig(p_via_smem=True, o_splits=4),
                                    gpu_mosaic.MosaicConfig(pingpong=True),
                                    gpu_mosaic.MosaicConfig(block_k=64, stages=3, pingpong=True),
                                    gpu_mosaic.MosaicConfig(intra_overlap=True),
                                    gpu_mosaic.MosaicConfig(block_k=64, stages=3,
                                                            intra_overlap=True),
                                    gpu_mosaic.MosaicConfig(p_via_smem=True, o_splits=4,
                                                            intra_overlap=True),
                                    gpu_mosaic.MosaicConfig(pingpong=True, intra_overlap=True)],
                         ids=["default", "bk64s3", "psmem", "pingpong", "bk64s3_pingpong",
                              "overlap", "bk64s3_overlap", "psmem_overlap", "pingpong_overlap"])
@pytest.mark.parametrize("case", COMPILED_CASES, ids=str)
def test_compiled_on_gpu_bf16(case, config):
  check_backend(*_with_triton_bwd(config), case, jnp.bfloat16, **BF16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("bwd", [gpu_mosaic.BwdConfig(),
                                 gpu_mosaic.BwdConfig(dq_block_k=128, stages=3),
                                 gpu_mosaic.BwdConfig(dkv_block_q=128, ds_via_smem=True)],
                         ids=["default", "dq128_s3", "kv128_ds_smem"])
@pytest.mark.parametrize("case", COMPILED_CASES, ids=str)
def test_compiled_mosaic_backward_on_gpu_bf16(case, bwd):
  """The Mosaic forward paired with the Mosaic backward (gpu_mosaic_backward), compiled."""
  cfg = gpu_mosaic.MosaicConfig(backward="mosaic", bwd=bwd)
  if case.D == 128 and bwd != gpu_mosaic.BwdConfig():
    # H200 run (bench/results/gpu_tests_new_kernels_h200.txt): Mosaic refused these at D=128,
    # smem_bytes 267384 (dq128_s3) / 233568 (kv128_ds_smem) > 232448 available; the config's
    # SMEM count now refuses them before Mosaic compiles.
    with pytest.raises(ValueError, match="bytes of shared memory in its .* over the 232448"):
      check_backend(*_backend(cfg), case, jnp.bfloat16, **BF16_TOL)
    return
  check_backend(*_backend(cfg), case, jnp.bfloat16, **BF16_TOL)


def test_hopper_dispatch(monkeypatch):
  """On a Hopper GPU `auto` / `pallas` take the Mosaic forward for training / prefill calls and
  the Triton kernels for what it does not take (decode offsets, f32); other GPUs stay Triton."""
  from pallas_kernels import dispatch
  from pallas_kernels.polar_attention import api, gpu_triton
  monkeypatch.setattr(dispatch, "platform_of", lambda x: "gpu")
  q, k, v, _ = random_inputs(Case(Tq=64, H=4, G=2, D=64), jnp.bfloat16)
  for hopper, want in ((True, gpu_mosaic), (False, gpu_triton)):
    monkeypatch.setattr(dispatch, "is_hopper", lambda h=hopper: h)
    for impl in ("auto", "pallas"):
      assert api.select_backend(q, k, v, window=16, impl=impl) is want
    assert api.select_backend(q, k, v, q_offset=3, impl="auto") is gpu_triton
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert api.select_backend(*f32, impl="auto") is gpu_triton


@pytest.mark.gpu
def test_dispatch_on_this_gpu():
  """Real hardware, no monkeypatch: Mosaic forward on a Hopper GPU, Triton elsewhere; an
  impl='pallas' call no candidate takes names every candidate's reason."""
  from pallas_kernels import dispatch
  from pallas_kernels.polar_attention import api, gpu_triton
  q, k, v, s = random_inputs(Case(Tq=64, H=4, G=2, D=64), jnp.bfloat16)
  want = gpu_mosaic if dispatch.is_hopper() else gpu_triton
  assert api.select_backend(q, k, v, impl="auto") is want
  assert api.select_backend(q, k, v, q_offset=0, window=16, impl="pallas") is want
  q12, k12 = q[..., :12], k[..., :12]
  with pytest.raises(ValueError, match="gpu_triton head dim 12"):
    api.attention_stats(q12, k12, k12, s, impl="pallas")
