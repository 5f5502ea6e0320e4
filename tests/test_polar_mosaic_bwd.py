"""Mosaic-GPU (Hopper) backward of `attention_stats` vs the fp64 oracle (shared harness).

On CPU both Mosaic kernels run in Mosaic-GPU interpret mode (TMA copies, barriers, wgmma and
the three warpgroups simulated), so each case checks the `mosaic_fwd + mosaic_bwd` pairing end
to end: odd lengths (padding to 128), GQA 4:1 and 2:1, a window, several query / key blocks per
tile band (masked edge blocks and unmasked interior ones). A race-detection run checks the ring
protocol; lowering tests lower both backward kernels for an abstract H100 (SMEM fit, layouts).
The compiled runs are the `gpu` tests in test_polar_mosaic_gpu.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.polar_attention import gpu_mosaic, reference
from tests.oracle_check import assert_close
from tests.polar_cases import (Case, check_backend, export_for_h100, oracle_fwd_vjp,
                               random_cotangents, random_inputs)

BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # as the bf16 Triton tests


def mosaic_pair(**bwd):
  """(fwd, bwd) of gpu_mosaic with the Mosaic backward and BwdConfig fields `bwd`."""
  cfg = gpu_mosaic.MosaicConfig(block_k=64, backward="mosaic", bwd=gpu_mosaic.BwdConfig(**bwd))
  return (functools.partial(gpu_mosaic.attention_stats_fwd, config=cfg),
          functools.partial(gpu_mosaic.attention_stats_bwd, config=cfg))


@pytest.mark.parametrize("case,bwd", [
    (Case(Tq=200, H=4, G=1, D=64), {}),                                          # GQA 4:1
    (Case(Tq=150, H=4, G=2, D=64, window=40), dict(stages=3)),                   # GQA 2:1, window
    (Case(Tq=130, H=2, G=1, D=128, window=90), dict(dq_block_k=128, dkv_block_q=128)),
], ids=lambda x: str(x) if isinstance(x, Case) else "-".join(f"{k}{v}" for k, v in x.items()))
def test_bf16_matches_oracle(case, bwd):
  check_backend(*mosaic_pair(**bwd), case, jnp.bfloat16, **BF16_TOL)


def test_no_races_in_barrier_protocol():
  """The interpreter's race detector over both kernels' rings (2 slots, several blocks)."""
  case = Case(Tq=256, H=2, G=1, D=64, window=130)
  q, k, v, s = random_inputs(case, jnp.bfloat16)
  o, lse, p2 = reference.attention_stats_materialized(q, k, v, s, window=case.window)
  delta, cq = reference.stats_vjp_prologue(o, p2, o, lse, p2)
  cfg = gpu_mosaic.MosaicConfig(backward="mosaic", bwd=gpu_mosaic.BwdConfig(
      interpret=plgpu.InterpretGPUParams(detect_races=True)))
  jax.block_until_ready(gpu_mosaic.attention_stats_bwd(
      q, k, v, s, lse, o.astype(q.dtype), delta, cq, window=case.window, config=cfg))
  assert not gpu_callbacks.get_races().races_found


def test_api_vjp_on_hopper_runs_the_mosaic_pair(monkeypatch):
  """Through the api's custom VJP on a (pretend) Hopper GPU, the call the api routes to the Mosaic
  forward reaches the Mosaic backward in scope (no raise) and its gradients match the fp64
  oracle's (both kernels in interpret mode; GQA 2:1, a window, T padded to 128)."""
  from pallas_kernels import dispatch
  from pallas_kernels.polar_attention import api
  monkeypatch.setattr(dispatch, "platform_of", lambda x: "gpu")
  monkeypatch.setattr(dispatch, "is_hopper", lambda: True)
  ran = []
  mosaic_bwd = gpu_mosaic.gpu_mosaic_backward.attention_stats_bwd
  monkeypatch.setattr(gpu_mosaic.gpu_mosaic_backward, "attention_stats_bwd",
                      lambda *a, **kw: ran.append("mosaic_bwd") or mosaic_bwd(*a, **kw))
  case = Case(Tq=70, H=4, G=2, D=64, window=24)
  q, k, v, s = random_inputs(case, jnp.bfloat16, seed=4)
  cot = random_cotangents(case, seed=4)
  _, want = oracle_fwd_vjp(case, q, k, v, s, cot)
  assert api.select_backend(q, k, v, window=case.window) is gpu_mosaic
  _, vjp = jax.vjp(lambda *a: api.attention_stats(*a, window=case.window), q, k, v, s)
  got = vjp(tuple(jnp.asarray(c, jnp.float32) for c in cot))
  assert ran == ["mosaic_bwd"]
  for name, g, w in zip(("dq", "dk", "dv", "dscale"), got, want, strict=True):
    atol = BF16_TOL["atol"] * max(1.0, float(np.max(np.abs(w))))  # as check_backend's grads
    assert_close(name, np.asarray(g, np.float64), w, atol, BF16_TOL["rtol"], case)


def test_backward_switch(monkeypatch):
  """Mosaic by default (and with backward='mosaic'); Triton for a Triton BlockConfig or with
  backward='triton' (per call, or for every call through DEFAULT_CONFIG); out-of-scope calls
  name the fix."""
  from pallas_kernels.polar_attention import gpu_triton
  calls = []
  monkeypatch.setattr(gpu_mosaic.gpu_backward, "attention_stats_bwd",
                      lambda *a, **kw: calls.append("triton"))
  monkeypatch.setattr(gpu_mosaic.gpu_mosaic_backward, "attention_stats_bwd",
                      lambda *a, **kw: calls.append("mosaic"))
  q, k, v, s = random_inputs(Case(Tq=64, H=4, G=2, D=64), jnp.bfloat16)
  args = (q, k, v, s, s, q, s, s)
  mosaic = gpu_mosaic.MosaicConfig(backward="mosaic")
  triton = gpu_mosaic.MosaicConfig(backward="triton")
  gpu_mosaic.attention_stats_bwd(*args)
  gpu_mosaic.attention_stats_bwd(*args, config=gpu_triton.BlockConfig())
  gpu_mosaic.attention_stats_bwd(*args, config=mosaic)
  gpu_mosaic.attention_stats_bwd(*args, config=triton)
  monkeypatch.setattr(gpu_mosaic, "DEFAULT_CONFIG", triton)
  gpu_mosaic.attention_stats_bwd(*args)
  assert calls == ["mosaic", "triton", "mosaic", "triton", "triton"]
  monkeypatch.setattr(gpu_mosaic, "DEFAULT_CONFIG", mosaic)
  f32 = [x.astype(jnp.float32) for x in args]
  with pytest.raises(ValueError, match="bf16 / f16.*backward='triton'"):
    gpu_mosaic.attention_stats_bwd(*f32)
  with pytest.raises(ValueError, match="backward='cudnn' must be one of"):
    gpu_mosaic.MosaicConfig(backward="cudnn")
  with pytest.raises(ValueError, match="dq_block_k=32 must be 64 or 128"):
    gpu_mosaic.BwdConfig(dq_block_k=32)


@pytest.mark.parametrize("shape,window,bwd", [
    ((1, 300, 8, 2, 128), 100, gpu_mosaic.BwdConfig(interpret=False)),  # default launch
    ((2, 200, 4, 4, 64), None, gpu_mosaic.BwdConfig(interpret=False, dq_block_k=128,
                                                    dkv_block_q=128, stages=3)),
    ((1, 300, 8, 2, 128), None, gpu_mosaic.BwdConfig(interpret=False, ds_via_smem=True)),
], ids=["D128_default", "D64_b128_s3", "D128_ds_smem"])
def test_lowers_for_h100(shape, window, bwd):
  """Traces and lowers both backward kernels for an abstract H100 (checks SMEM fit, layouts)."""
  cfg = gpu_mosaic.MosaicConfig(backward="mosaic", bwd=bwd)
  f = functools.partial(gpu_mosaic.attention_stats_bwd, window=window, config=cfg)
  exported = export_for_h100(f, shape, "q", "kv", "kv", "row", "row", "q", "row", "row")
  text = exported.mlir_module()
  assert len(re.findall("mosaic_gpu", text)) >= 2


D128_OVER = [(gpu_mosaic.BwdConfig(dq_block_k=128, stages=3), "dq", 267384),
             (gpu_mosaic.BwdConfig(dkv_block_q=128, ds_via_smem=True), "dkv", 233568)]


@pytest.mark.parametrize("bwd,kernel,mosaic_bytes", D128_OVER, ids=["dq128_s3", "kv128_ds_smem"])
def test_smem_count_refuses_what_mosaic_refused(bwd, kernel, mosaic_bytes):
  """The integer SMEM count reproduces the bytes Mosaic counted on an H200 for the two 128-block
  configs at D=128 (bench/results/gpu_tests_new_kernels_h200.txt), and the compiled backward
  refuses them before any trace with one line: the bytes, the limit and a config that fits."""
  mb = gpu_mosaic.gpu_mosaic_backward
  assert mb.smem_bytes(bwd, 128, jnp.bfloat16, 1000)[kernel] == mosaic_bytes
  fit = mb.fitting_config(bwd, 128, jnp.bfloat16, 1000)
  assert fit != bwd and max(mb.smem_bytes(fit, 128, jnp.bfloat16, 1000).values()) <= 232448
  q, k, v, s = random_inputs(Case(Tq=1000, H=4, G=2, D=128), jnp.bfloat16)
  cfg = gpu_mosaic.MosaicConfig(backward="mosaic", bwd=dataclasses.replace(bwd, interpret=False))
  want = (rf"needs {mosaic_bytes} bytes of shared memory in its {kernel} kernel at D=128 "
          rf"bfloat16, over the 232448 a Hopper block can use; "
          rf"use {re.escape(mb.config_repr(fit))}")
  with pytest.raises(ValueError, match=want) as err:
    gpu_mosaic.attention_stats_bwd(q, k, v, s, s, q, s, s, config=cfg)
  assert "\n" not in str(err.value)


def test_smem_default_configs_fit_and_dispatch_names_the_refusal(monkeypatch):
  """The default forward and backward fit Hopper's SMEM at D 64 / 128 (short and long T); a
  DEFAULT_CONFIG whose backward does not fit is a dispatch refusal naming the bytes, so `auto`
  on a (pretend) Hopper GPU takes the Triton kernels instead of failing in Mosaic's compile."""
  from pallas_kernels import dispatch
  from pallas_kernels.polar_attention import api, gpu_triton
  mb = gpu_mosaic.gpu_mosaic_backward
  for D in (64, 128):
    for T in (64, 333, 8192):
      assert gpu_mosaic.smem_bytes(gpu_mosaic.DEFAULT_CONFIG, D, jnp.bfloat16, T) <= 232448
      assert max(mb.smem_bytes(mb.DEFAULT_BWD_CONFIG, D, jnp.bfloat16, T).values()) <= 232448
  monkeypatch.setattr(dispatch, "platform_of", lambda x: "gpu")
  monkeypatch.setattr(dispatch, "is_hopper", lambda: True)
  q, k, v, _ = random_inputs(Case(Tq=300, H=4, G=2, D=128), jnp.bfloat16)
  compiled = gpu_mosaic.MosaicConfig(interpret=False)
  assert gpu_mosaic.unsupported_reason(q, k, v, config=compiled) is None
  monkeypatch.setattr(gpu_mosaic, "DEFAULT_CONFIG",
                      dataclasses.replace(compiled, bwd=D128_OVER[0][0]))
  assert "needs 267384 bytes" in gpu_mosaic.unsupported_reason(q, k, v)
  assert api.select_backend(q, k, v, impl="auto") is gpu_triton


def test_smem_count_matches_mosaic_lowering(monkeypatch):
  """The count equals what Mosaic's own lowering counts (it reports the bytes when they exceed
  its bound; the bound is lowered to 1000 here so every kernel reports), for the forward and
  both backward kernels of a non-default config (no SMEM-fit refusal on our side)."""
  from jax.experimental.mosaic.gpu import core as mosaic_core
  mb = gpu_mosaic.gpu_mosaic_backward
  monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 1000)
  shape, D, T = (1, 300, 8, 2, 128), 128, 300
  cfg = gpu_mosaic.MosaicConfig(interpret=False, block_k=64, stages=3, p_via_smem=True,
                                bwd=gpu_mosaic.BwdConfig(dq_block_k=128, dkv_block_q=128))
  want = {"fwd": gpu_mosaic.smem_bytes(cfg, D, jnp.bfloat16, T),
          **mb.smem_bytes(cfg.bwd, D, jnp.bfloat16, T)}
  calls = {"fwd": (functools.partial(gpu_mosaic.attention_stats_fwd, config=cfg),
                   ("q", "kv", "kv", "row"))}
  for part in ("dq", "dkv"):
    calls[part] = (functools.partial(gpu_mosaic.attention_stats_bwd, config=cfg, parts=(part,)),
                   ("q", "kv", "kv", "row", "row", "q", "row", "row"))
  for name, (fn, spec) in calls.items():
    with pytest.raises(Exception, match=rf"smem_bytes={want[name]} > max_smem_bytes=1000"):
      export_for_h100(fn, shape, *spec)
