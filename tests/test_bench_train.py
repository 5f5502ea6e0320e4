"""bench/train_throughput.py (data-parallel variants, scaling, MFU) and bench/profile_train_step.py
(Chrome-trace parser): synthetic GPU traces against a brute-force oracle, a real CPU trace, and
missing files."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import profile_train_step as prof  # noqa: E402
from atma_jax.config import ConfigError  # noqa: E402
import train_throughput as tt  # noqa: E402

TINY = tt.SMOKE_SETS


# ----------------------------------------------------------------------------- throughput bench

def test_variant_sets_fix_the_per_device_micro_batch():
  sets = tt.variant_sets(16, 2, 4, False, "auto", 2048)
  assert "train.micro_batch=32" in sets and "train.global_batch=128" in sets
  assert "mesh.data=-1" in sets and "model.remat=false" in sets
  with pytest.raises(ValueError, match="--devices asks for 99"):
    tt.first_devices(99)


def test_gathered_bytes_sums_all_gather_outputs():
  hlo = ("  %all-gather.1 = f32[2,16,64]{2,1,0} all-gather(f32[2,8,64]{2,1,0} %p), dims={1}\n"
         "  %ag = bf16[8]{0} all-gather(bf16[4]{0} %q), dimensions={0}\n"
         "  %all-reduce.2 = f32[4,4]{1,0} all-reduce(f32[4,4]{1,0} %r)\n")
  assert tt.gathered_bytes(hlo) == 2 * 16 * 64 * 4 + 8 * 2
  assert tt.gathered_bytes("") == 0


def test_remat_policies_and_the_budget_fit():
  assert tt.remat_policies("true,dots, false") == ["block", "dots", "none"]
  assert "model.remat=dots" in tt.variant_sets(16, 1, 4, "dots", "auto", 2048)
  with pytest.raises(ConfigError, match="dotz is not a remat policy; choose from none, block"):
    tt.remat_policies("none,dotz")
  gib = 2 ** 30
  # peak = 10 GiB + 1.5 GiB per sequence: 33.1 GiB holds 15 sequences, not 16
  assert tt.micro_within_budget({16: 34 * gib, 8: 22 * gib}, 33.1 * gib) == 15
  assert tt.micro_within_budget({16: 34 * gib, 8: 22 * gib}, 34 * gib) == 16
  assert tt.micro_within_budget({16: 5 * gib, 8: 5 * gib}, 33.1 * gib) is None


def test_build_shards_over_the_first_n_devices():
  sets = tt.variant_sets(1, 2, 2, False, "xla", 32) + TINY
  cfg, mesh, setup, state, step, batch = tt.build("tiny", sets, 2)
  assert mesh.devices.size == 2 and mesh.shape["data"] == 2
  assert set(mesh.devices.flat) == set(jax.devices()[:2])
  assert batch["inputs"].shape == (4, 32) and cfg.train.micro_batch == 2
  assert len(batch["inputs"].sharding.device_set) == 2
  assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(state.params))
  np.testing.assert_array_equal(np.asarray(batch["inputs"])[:, 1:],
                                np.asarray(batch["targets"])[:, :-1])


def _variant(n, tps, impl="auto", micro=16, ok=True, ref=None):
  return {"ok": ok, "devices": n, "kernel_impl": impl, "remat": False,
          "micro_batch_per_device": micro, "tokens_per_s_measured": tps,
          "tokens_per_s_ref_step": ref or tps, "step_s_median": 1.0, "opt_update_s_median": 0.1}


def test_scaling_pairs_same_variant_only():
  rng = np.random.default_rng()
  t1, t2, t2x = rng.uniform(5e4, 1e5, 3)
  vs = [_variant(1, t1), _variant(2, t2), _variant(2, t2x, impl="xla"),
        _variant(2, 1.0, micro=8, ok=False)]
  (s,) = tt.scaling(vs)
  assert s["devices"] == 2 and s["kernel_impl"] == "auto"
  assert s["efficiency"] == pytest.approx(t2 / (2 * t1))
  assert tt.scaling([_variant(2, t2)]) == []


def test_scan_vs_unrolled_pairs_same_variant_only():
  rng = np.random.default_rng()
  t_off, t_on, t_other = rng.uniform(5e4, 1e5, 3)
  mem = {"static_peak_bytes": 10}
  vs = [dict(_variant(1, t_off), scan_layers=False, compile_s=80.0, memory_analysis=mem),
        dict(_variant(1, t_on), scan_layers=True, compile_s=15.0, memory_analysis=mem),
        dict(_variant(1, t_other, impl="xla"), scan_layers=True, compile_s=9.0,
             memory_analysis=mem)]
  (p,) = tt.scan_vs_unrolled(vs)
  assert p["compile_s_unrolled"] == 80.0 and p["compile_s_scan"] == 15.0
  assert p["tokens_per_s_scan_over_unrolled"] == pytest.approx(t_on / t_off)
  assert "model.scan_layers=true" in tt.variant_sets(1, 1, 1, False, "xla", 32, scan=True)
  assert tt.scaling(vs) == []


def test_add_mfu_both_counts():
  r = {"flops_per_token": 2.67e9, "devices": 2, "tokens_per_s_measured": 1.9e5,
       "tokens_per_s_ref_step": 2.0e5}
  tt.add_mfu(r, 989e12, 718e12)
  assert r["mfu_vs_spec_table"] == pytest.approx(1.9e5 * 2.67e9 / (2 * 989e12))
  assert r["mfu_vs_measured_peak"] == pytest.approx(1.9e5 * 2.67e9 / (2 * 718e12))
  assert r["mfu_ref_step_vs_measured_peak"] == pytest.approx(2.0e5 * 2.67e9 / (2 * 718e12))
  r2 = dict(r, devices=1)
  tt.add_mfu(r2, None, None)
  assert not any(k.startswith("mfu_vs") and k not in r for k in r2)


# ----------------------------------------------------------------------------- trace parser

def _meta(pid, tid, pname=None, tname=None):
  out = []
  if pname:
    out.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": pname}})
  if tname:
    out.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
                "args": {"name": tname}})
  return out


KERNELS = {  # name -> (category, hlo op, op_name)
    "sm90_xmma_gemm_bf16bf16_bf16f32": ("matmul", "custom-call.3",
                                        "jit(train_step)/while/body/jvp()/dot_general"),
    "nvjet_hsh_128x256": ("matmul", "custom-call.9",
                          "jit(train_step)/while/body/transpose(jvp())/dot_general"),
    "loop_multiply_fusion_2": ("fusion", "loop_multiply_fusion.2", "jit(train_step)/mul"),
    "polar_attention_fwd": ("pallas:polar_attention_fwd", "custom-call.5",
                            "jit(train_step)/while/body/jvp()/pallas_call"),
    "gdn_state_bwd": ("pallas:gdn_state_bwd", "custom-call.6",
                      "jit(train_step)/while/body/transpose(jvp())/pallas_call"),
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL": ("collective", "all-reduce.1",
                                                "jit(train_step)/psum"),
    "Memcpy DtoD": ("copy", "copy.4", "jit(train_step)/copy"),
    "cudnn_something": ("cudnn", "custom-call.7", "jit(train_step)/conv"),
}
HLO_TEXT = "\n".join(f'  %{op} = f32[4]{{0}} custom-call(%p), custom_call_target="x", '
                     f'metadata={{op_name="{opn}"}}' for _, op, opn in KERNELS.values())


def _synthetic_trace(rng):
  """GPU streams + a derived `XLA Ops` line (must not count) + host events; integer times."""
  ev = (_meta(1, 0, "/host:CPU") + _meta(1, 11, tname="python")
        + _meta(7, 0, "/device:GPU:0") + _meta(7, 13, tname="Stream #13(Compute)")
        + _meta(7, 20, tname="Stream #20(NCCL)") + _meta(7, 99, tname="XLA Ops"))
  names = list(KERNELS)
  kern = []
  for _ in range(int(rng.integers(30, 60))):
    name = names[rng.integers(len(names))]
    tid = 20 if KERNELS[name][0] == "collective" else 13
    ts, dur = int(rng.integers(0, 500)), int(rng.integers(1, 40))
    kern.append({"ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name,
                 "args": {"hlo_op": KERNELS[name][1]}})
  ev += kern
  ev += [{"ph": "X", "pid": 7, "tid": 99, "ts": 0, "dur": 10_000, "name": "fusion.1"},
         {"ph": "X", "pid": 1, "tid": 11, "ts": 0, "dur": 10_000, "name": "PjitFunction"}]
  return ev, kern


def test_summarize_synthetic_gpu_trace_matches_oracle(tmp_path):
  rng = np.random.default_rng()
  ev, kern = _synthetic_trace(rng)
  d = tmp_path / "plugins" / "profile" / "run1"
  d.mkdir(parents=True)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": ev}, f)
  s = prof.summarize(prof.load_events(prof.find_trace(str(tmp_path))),
                     prof.hlo_op_names(HLO_TEXT), top=100)
  covered = set()
  for e in kern:
    covered.update(range(e["ts"], e["ts"] + e["dur"]))
  assert s["kernel_events"] == len(kern)
  assert s["per_device"]["/device:GPU:0"]["busy_ms"] == pytest.approx(len(covered) / 1e3)
  assert s["kernel_ms_summed"] == pytest.approx(sum(e["dur"] for e in kern) / 1e3)
  want_cat, want_phase = {}, {}
  for e in kern:
    cat, _, opn = KERNELS[e["name"]]
    want_cat[cat] = want_cat.get(cat, 0) + e["dur"]
    ph = prof.phase_of(opn)
    want_phase[ph] = want_phase.get(ph, 0) + e["dur"]
  assert {r["name"]: r["total_ms"] for r in s["categories"]} == pytest.approx(
      {k: v / 1e3 for k, v in want_cat.items()})
  assert {r["name"]: r["total_ms"] for r in s["phases"]} == pytest.approx(
      {k: v / 1e3 for k, v in want_phase.items()})
  assert sum(r["share"] for r in s["categories"]) == pytest.approx(1.0, abs=1e-3)
  assert s["kernels_matched_to_hlo"] == len(kern)
  assert s["top_kernels"][0]["total_ms"] == max(r["total_ms"] for r in s["top_kernels"])
  want_fam = {}
  for e in kern:
    want_fam[prof.family(e["name"])] = want_fam.get(prof.family(e["name"]), 0) + e["dur"]
  assert {r["name"]: r["total_ms"] for r in s["top_kernel_families"]} == pytest.approx(
      {k: v / 1e3 for k, v in want_fam.items()})
  assert len(json.dumps(s)) < 2_000_000


def test_phase_and_category_rules():
  assert prof.phase_of("jit(f)/while/body/transpose(jvp(g))/dot_general") == "backward"
  assert prof.phase_of("jit(f)/while/body/jvp(g)/mul") == "forward"
  assert prof.phase_of("jit(f)/muon/dot_general").startswith("other")
  assert prof.category("gemm_fusion_dot_12") == "matmul"
  assert prof.category("custom-call.4", "__gpu$xla.gpu.triton") == "pallas:custom-call.4"
  assert prof.category("polar_attention_bwd_dkv_3") == "pallas:polar_attention_bwd_dkv"
  assert prof.category("input_reduce_fusion") == "fusion"
  assert prof.category("all-reduce-start") == "collective"
  assert prof.family("wrapped_slice.15") == prof.family("wrapped_slice") == "wrapped_slice"
  assert prof.family("loop_add_fusion_3") == "loop_add_fusion"
  assert prof.hlo_op_of({"hlo_op": "fusion.2"}) == "fusion.2"
  assert prof.hlo_op_of({"kernel_annotation": "x:#hlo_op=loop_add_fusion.7,hlo_module=m#",
                         "n": 3}) == "loop_add_fusion.7"
  assert prof.hlo_op_of({"correlation_id": "12"}) == ""


def test_missing_trace_files_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prof.find_trace(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no perfetto_trace.json.gz"):
    prof.find_trace(str(tmp_path))
  bad = tmp_path / "x.json"
  bad.write_text(json.dumps({"traceEvents": 3}))
  with pytest.raises(ValueError, match="no traceEvents"):
    prof.load_events(str(bad))
  assert prof.summarize([])["kernel_events"] == 0


def test_real_cpu_trace_host_ops_and_phases(tmp_path):
  """A CPU trace has no device tracks: the leaf host XLA-op events stand in, mapped to phases."""
  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)

  f = jax.jit(jax.value_and_grad(loss))
  w, x = jnp.ones((64, 64)) * 0.01, jnp.ones((32, 64))
  compiled = f.lower(w, x).compile()
  jax.block_until_ready(compiled(w, x))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    jax.block_until_ready(compiled(w, x))
  s = prof.summarize(prof.load_events(prof.find_trace(str(tmp_path))),
                     prof.hlo_op_names(compiled.as_text()))
  assert s["kernel_source"].startswith("host") and s["kernel_events"] > 0
  assert s["kernels_matched_to_hlo"] > 0
  phases = {r["name"] for r in s["phases"]}
  assert {"forward", "backward"} & phases
  assert sum(r["share"] for r in s["categories"]) == pytest.approx(1.0, abs=1e-3)
  assert s["host_top"]
