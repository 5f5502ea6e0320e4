"""Checkpoint interop with the PyTorch reference (atma_jax.interop): layout, round trips, errors.

No torch needed: the layout is checked against ATMA_SPEC §2.8/§9 (numbers copied from the spec),
orientations against numpy restatements of torch's ops, and the end-to-end JAX-vs-torch logits
check (`test_verify_against_reference`) runs only when ATMA_REFERENCE_REPO and ATMA_TORCH_PYTHON
point at a reference checkout and a Python with torch.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from atma_jax.config import ConfigError, ModelConfig
from atma_jax.interop import cli, convert, files, layout, ref_config
from atma_jax.interop.convert import InteropError
from atma_jax.interop.verify import randomize

BF16 = np.dtype(ml_dtypes.bfloat16)
VARIANTS = [(a, m) for a in ("polar", "nope", "rope") for m in (True, False)]

# ATMA_SPEC §2.8: reference parameter counts of the canonical config, per variant.
SPEC_COUNTS = {
    ("polar", True): 378_220_864, ("polar", False): 369_758_464,
    ("nope", True): 378_179_776, ("nope", False): 369_717_376,
    ("rope", True): 378_155_200, ("rope", False): 369_692_800,
}
# Tensors per state dict of the canonical config (torch `Model.state_dict()`, incl. the RoPE
# buffer): 4 top-level + 16 x 8 block tensors + 12 x 5 conv-mixer tensors + 4 x global tensors.
SPEC_KEYS = {
    ("polar", True): 264, ("polar", False): 232, ("nope", True): 236, ("nope", False): 204,
    ("rope", True): 228, ("rope", False): 196,
}


def small_cfg(attn_type="polar", mem=True, **kw) -> ModelConfig:
  base = dict(vocab_size=96, num_layers=4, hidden_size=64, head_dim=16, attn_type=attn_type,
              mem_enabled=mem, mem_chunk=16, compute_dtype="float32", kernel_impl="xla")
  base.update(kw)
  return ModelConfig(**base)


def random_params(cfg: ModelConfig, seed: int = 0):
  _, abstract = convert.abstract_model(cfg)  # structure only; every leaf is drawn by randomize
  return randomize(cfg, abstract, seed)


def leaves(params) -> dict:
  return {p: np.asarray(v) for p, v in convert.flat_params(params).items()}


# ---------------------------------------------------------------------------------------------
# Layout: spec §9 names/shapes, model contract at the canonical size (eval_shape, no allocation).


@pytest.mark.parametrize("attn_type,mem", VARIANTS)
def test_layout_counts_match_spec(attn_type, mem):
  cfg = ModelConfig(attn_type=attn_type, mem_enabled=mem)
  lay = layout.reference_layout(cfg)
  assert len(lay) == SPEC_KEYS[(attn_type, mem)]
  assert len({e.key for e in lay}) == len(lay)
  assert layout.num_reference_params(cfg) == SPEC_COUNTS[(attn_type, mem)]


def test_layout_shapes_and_dtypes_match_spec_section9():
  shapes = {e.key: (e.shape, e.dtype) for e in layout.reference_layout(ModelConfig())}
  f32 = np.dtype(np.float32)
  expect = {
      "embed.weight": ((50304, 1024), BF16), "proj.weight": ((50304, 1024), f32),
      "proj.bias": ((50304,), f32), "norm.weight": ((1024,), f32),
      "blocks.0.norm1.weight": ((1024,), f32), "blocks.15.norm2.weight": ((1024,), f32),
      "blocks.3.mlp.fc.weight": ((8192, 1024), f32), "blocks.3.mlp.fc.bias": ((8192,), f32),
      "blocks.3.mlp.proj.weight": ((1024, 4096), f32),
      "blocks.0.attn.in_proj.weight": ((3072, 1024), f32),
      "blocks.0.attn.conv.weight": ((1024, 1, 3), f32),
      "blocks.13.attn.out_proj.weight": ((1024, 1024), f32),
      "blocks.2.attn.q.weight": ((2048, 1024), f32), "blocks.2.attn.k.weight": ((256, 1024), f32),
      "blocks.6.attn.v.bias": ((256,), f32), "blocks.10.attn.canon_q.weight": ((1024, 1, 4), f32),
      "blocks.14.attn.canon_k.weight": ((256, 1, 4), f32),
      "blocks.2.attn.proj.weight": ((1024, 1024), f32),
      "blocks.2.attn.mu_proj.weight": ((1024, 8), f32), "blocks.2.attn.v_null": ((8, 128), f32),
      "blocks.2.attn.null_base": ((8,), f32), "blocks.2.attn.null_slope_raw": ((8,), f32),
      "blocks.2.attn.len_gain_raw": ((8,), f32), "blocks.2.attn.mag_beta_raw": ((8,), f32),
      "blocks.2.attn.mem.w_gamma.weight": ((8, 1024), f32),
      "blocks.2.attn.mem.w_beta.bias": ((8,), f32),
      "blocks.2.attn.mem.gate.weight": ((1024, 1024), f32),
      "blocks.2.attn.mem.proj.weight": ((1024, 1024), f32),
  }
  for k, v in expect.items():
    assert shapes[k] == v, k
  glob = sorted({int(k.split(".")[1]) for k in shapes if k.endswith("attn.q.weight")})
  assert glob == [2, 6, 10, 14]
  rope = {e.key: e for e in layout.reference_layout(ModelConfig(attn_type="rope"))}
  assert rope["blocks.2.attn.rotary.angular_freq"].shape == (64,)
  assert not any("canon" in k or "mu_proj" in k for k in rope)


@pytest.mark.parametrize("attn_type,mem", VARIANTS)
def test_canonical_model_params_follow_layout(attn_type, mem):
  cfg = ModelConfig(attn_type=attn_type, mem_enabled=mem)
  _, abstract = convert.abstract_model(cfg)  # eval_shape: nothing allocated
  flat = convert.flat_params(abstract)
  convert._check_model_matches_layout(cfg, flat)  # raises on any name/shape difference
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == SPEC_COUNTS[(attn_type, mem)]
  assert flat[("embed", "embedding")].dtype == BF16


# ---------------------------------------------------------------------------------------------
# Orientation against numpy restatements of the torch ops.


def test_linear_and_conv_orientation_match_torch_semantics():
  from atma_jax.model.layers import causal_depthwise_conv
  cfg = small_cfg()
  params = random_params(cfg, seed=3)
  sd = convert.state_dict_from_params(cfg, params)
  model = nnx.merge(convert.abstract_model(cfg)[0], params)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
  # torch Linear: y = x W^T + b with W (out, in)
  W, b = sd["blocks.2.attn.q.weight"], sd["blocks.2.attn.q.bias"]
  np.testing.assert_allclose(np.asarray(model.blocks[2].attn.q(x)), x @ W.T + b, rtol=1e-5,
                             atol=1e-5)
  # torch depthwise Conv1d, left pad K-1: y_t[c] = sum_m W[c, 0, m] x_{t-(K-1)+m}[c]
  Wc = sd["blocks.0.attn.conv.weight"]
  C, _, K = Wc.shape
  xc = rng.standard_normal((2, 7, C)).astype(np.float32)
  xp = np.pad(xc, ((0, 0), (K - 1, 0), (0, 0)))
  want = sum(xp[:, m:m + 7, :] * Wc[:, 0, m] for m in range(K))
  got = causal_depthwise_conv(xc, np.asarray(model.blocks[0].attn.conv.kernel[...]))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Round trips: export -> file -> import is bitwise, every variant.


@pytest.mark.parametrize("attn_type,mem", VARIANTS)
def test_round_trip_bitwise(tmp_path, attn_type, mem):
  cfg = small_cfg(attn_type, mem, attn_window=8)
  params = random_params(cfg, seed=11)
  sd = convert.state_dict_from_params(cfg, params)
  assert set(sd) == {e.key for e in layout.reference_layout(cfg)}
  for e in layout.reference_layout(cfg):
    assert sd[e.key].shape == e.shape and sd[e.key].dtype == e.dtype, e.key
  buffer = "blocks.2.attn.rotary.angular_freq"
  assert (buffer in sd) == (attn_type == "rope")
  files.write_reference_checkpoint(str(tmp_path), sd, ref_config.reference_config(cfg))
  back_sd = files.read_state_dict(str(tmp_path / "model.safetensors"))
  cfg2 = ref_config.model_config_from_reference(str(tmp_path / "config.json"), base=cfg)
  assert cfg2 == cfg
  back = convert.params_from_state_dict(cfg2, back_sd)
  a, b = leaves(params), leaves(back)
  assert a.keys() == b.keys()
  for p in a:
    assert a[p].dtype == b[p].dtype and np.array_equal(a[p], b[p]), p
  if mem:  # gate constants live in the config: the learned bias maps 1:1 (no +3.9 folded in)
    bias = np.asarray(convert.flat_params(params)[("blocks", 2, "attn", "mem", "w_gamma", "bias")])
    np.testing.assert_array_equal(sd["blocks.2.attn.mem.w_gamma.bias"], bias)


def test_compile_prefix_is_stripped():
  cfg = small_cfg("nope", False)
  sd = convert.state_dict_from_params(cfg, random_params(cfg))
  prefixed = {f"_orig_mod.{k}": v for k, v in sd.items()}
  back = convert.params_from_state_dict(cfg, prefixed)
  assert all(np.array_equal(leaves(back)[p], v) for p, v in leaves(
      convert.params_from_state_dict(cfg, sd)).items())


# ---------------------------------------------------------------------------------------------
# config.json


def test_reference_config_json_fields():
  cfg = ModelConfig(attn_type="rope", attn_window=None, mem_enabled=False, num_layers=8)
  out = ref_config.reference_config(cfg, max_position_embeddings=2048)
  assert list(out) == list(ref_config.REFERENCE_DEFAULTS)  # every AtmaConfig field, in order
  assert out["dtype"] == "bfloat16" and out["num_hidden_layers"] == 8
  assert out["attn_window"] is None and out["mem_enabled"] is False
  assert out["max_position_embeddings"] == 2048 and out["mem_gamma_bias"] == 3.9
  json.dumps(out)


def test_config_from_reference_defaults_and_errors():
  # Missing fields take AtmaConfig's defaults - including its window of 1024.
  cfg = ref_config.model_config_from_reference({"attn_type": "nope", "num_hidden_layers": 4})
  assert cfg.attn_window == 1024 and cfg.mem_enabled and cfg.num_layers == 4
  assert cfg.mem_chunk == 128
  with pytest.raises(ConfigError, match="unknown fields.*bogus"):
    ref_config.model_config_from_reference({"bogus": 1})
  with pytest.raises(ConfigError, match="wall"):
    ref_config.model_config_from_reference({"attn_type": "wall"})
  with pytest.raises(ConfigError, match="hidden_size"):
    ref_config.model_config_from_reference({"hidden_size": "1024"})
  with pytest.raises(ConfigError, match="gqa_ratio"):
    ref_config.reference_config(ModelConfig(gqa_ratio=2))


# ---------------------------------------------------------------------------------------------
# Errors: clear, complete, and nothing written.


@pytest.fixture(scope="module")
def polar_sd():
  cfg = small_cfg()
  return cfg, convert.state_dict_from_params(cfg, random_params(cfg, seed=5))


def _raises(cfg, sd, *patterns):
  with pytest.raises(InteropError) as ei:
    convert.params_from_state_dict(cfg, sd)
  for pat in patterns:
    assert pat in str(ei.value), str(ei.value)
  return str(ei.value)


def test_error_missing_key(polar_sd):
  cfg, sd = polar_sd
  sd = dict(sd)
  del sd["blocks.2.attn.v_null"]
  _raises(cfg, sd, "1 missing key(s)", "blocks.2.attn.v_null", "Fix:")


def test_error_unexpected_key(polar_sd):
  cfg, sd = polar_sd
  _raises(cfg, {**sd, "blocks.2.attn.w_wall.weight": np.zeros((64, 64), np.float32)},
          "1 unexpected key(s)", "w_wall")


def test_error_shape_mismatch(polar_sd):
  cfg, sd = polar_sd
  sd = {**sd, "blocks.1.attn.conv.weight": np.zeros((64, 1, 4), np.float32)}
  _raises(cfg, sd, "shape mismatch at blocks.1.attn.conv.weight", "(64, 1, 4)", "(64, 1, 3)")


def test_error_vocab_mismatch(polar_sd):
  cfg, sd = polar_sd
  msg = _raises(dataclasses.replace(cfg, vocab_size=128), sd, "vocab mismatch",
                "vocab_size=128", "96 rows")
  assert "vocab_size=96" in msg  # the hint describes the weights


def test_error_wrong_architecture(polar_sd):
  cfg, sd = polar_sd
  msg = _raises(dataclasses.replace(cfg, attn_type="rope", mem_enabled=False), sd,
                "unexpected key(s)", "missing key(s)")
  assert "attn_type=polar" in msg and "mem_enabled=true" in msg  # what the weights look like


def test_error_bad_rope_buffer():
  cfg = small_cfg("rope", False)
  sd = convert.state_dict_from_params(cfg, random_params(cfg))
  sd["blocks.2.attn.rotary.angular_freq"] = sd["blocks.2.attn.rotary.angular_freq"] * 2
  _raises(cfg, sd, "angular_freq holds different RoPE frequencies")


def _write_ref(tmp_path, cfg, sd, **cfg_overrides):
  d = tmp_path / "ref"
  ref = {**ref_config.reference_config(cfg), **cfg_overrides}
  files.write_reference_checkpoint(str(d), sd, ref)
  return d


def test_cli_import_errors_write_nothing(tmp_path, polar_sd, capsys):
  cfg, sd = polar_sd
  bad = dict(sd)
  del bad["norm.weight"]
  d = _write_ref(tmp_path, cfg, bad)
  out = tmp_path / "run"
  rc = cli.main(["import", "--weights", str(d), "--out", str(out), "--preset", "tiny"])
  assert rc == 2 and "missing key(s)" in capsys.readouterr().err
  assert not out.exists()
  d2 = tmp_path / "ref2"
  files.write_reference_checkpoint(str(d2), sd, {**ref_config.reference_config(cfg),
                                                 "num_hidden_layers": 8})
  rc = cli.main(["import", "--weights", str(d2 / "model.safetensors"), "--out", str(out),
                 "--preset", "tiny"])
  err = capsys.readouterr().err
  assert rc == 2 and "missing key(s)" in err and "num_hidden_layers=4" in err
  assert not out.exists()


def test_pt_without_torch_is_a_clear_error(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed here")
  except ImportError:
    pass
  pt = tmp_path / "weights.pt"
  pt.write_bytes(b"not really a pickle")
  with pytest.raises(InteropError, match="needs PyTorch, which is not installed"):
    files.read_state_dict(str(pt))
  with pytest.raises(InteropError, match="needs PyTorch"):
    files.write_reference_checkpoint(str(tmp_path / "o"), {}, {}, fmt="pt")
  assert not (tmp_path / "o").exists()


def test_export_refuses_to_overwrite(tmp_path, polar_sd):
  cfg, sd = polar_sd
  d = _write_ref(tmp_path, cfg, sd)
  before = (d / "model.safetensors").read_bytes()
  with pytest.raises(InteropError, match="already holds"):
    files.write_reference_checkpoint(str(d), {}, {})
  assert (d / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused(polar_sd, bad):
  cfg, sd = polar_sd
  sd = dict(sd)
  w = sd["blocks.2.attn.q.weight"].copy()
  w[3, 5] = bad
  sd["blocks.2.attn.q.weight"] = w
  emb = sd["embed.weight"].copy()  # bf16 tensors are checked too
  emb[0, 0] = -bad
  sd["embed.weight"] = emb
  what = "NaN" if np.isnan(bad) else "Inf"
  msg = _raises(cfg, sd, "non-finite", f"blocks.2.attn.q.weight holds 1 {what} value(s)",
                f"embed.weight holds 1 {what} value(s)")
  assert "blocks.2.attn.k.weight" not in msg


def test_written_files_are_ordinary_mode(tmp_path, polar_sd):
  cfg, sd = polar_sd
  d = _write_ref(tmp_path, cfg, sd)
  mask = os.umask(0)
  os.umask(mask)
  for name in ("model.safetensors", "config.json", "tokenizer.json"):
    assert (d / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
  assert not [p for p in d.iterdir() if p.name.startswith(".tmp_")]


def test_export_to_an_unwritable_place_fails_before_reading(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  # the checkpoint does not exist either: the --out check comes first, nothing is loaded
  rc = cli.main(["export", "--checkpoint", str(tmp_path / "no_run"), "--out",
                 str(blocker / "out")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: cannot write to --out") and "is a file" in err
  assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# End to end through the CLI and the trainer's checkpoints: import -> load_model -> export.


def test_cli_import_keeps_an_fp32_embedding(tmp_path, capsys):
  """The default preset stores the embedding in bf16; an fp32 file is not rounded silently."""
  from atma_jax.train.checkpoint import load_model
  cfg = small_cfg("nope", False, embed_dtype="float32")
  sd = convert.state_dict_from_params(cfg, random_params(cfg, seed=2), embed_dtype="float32")
  assert sd["embed.weight"].dtype == np.float32
  assert not np.array_equal(sd["embed.weight"].astype(BF16).astype(np.float32),
                            sd["embed.weight"])  # rounding would change it
  d = _write_ref(tmp_path, cfg, sd)
  run = tmp_path / "run"
  assert cli.main(["import", "--weights", str(d), "--out", str(run), "--set",
                   "model.kernel_impl=xla"]) == 0  # default preset: atma_378m (bf16 embed)
  assert "embed.weight is float32 in the file; kept as float32" in capsys.readouterr().err
  loaded_cfg, _, params = load_model(str(run))
  emb = np.asarray(convert.flat_params(params)[("embed", "embedding")])
  assert loaded_cfg.model.embed_dtype == "float32" and emb.dtype == np.float32
  np.testing.assert_array_equal(emb, sd["embed.weight"])
  # asked for explicitly, the preset's bf16 is used (and said nothing about)
  run2 = tmp_path / "run2"
  assert cli.main(["import", "--weights", str(d), "--out", str(run2), "--set",
                   "model.kernel_impl=xla", "--set", "model.embed_dtype=bfloat16"]) == 0
  assert "note:" not in capsys.readouterr().err
  _, _, params2 = load_model(str(run2))
  assert np.asarray(convert.flat_params(params2)[("embed", "embedding")]).dtype == BF16



def test_cli_import_then_export_round_trip(tmp_path, capsys):
  from atma_jax.train.checkpoint import load_model
  cfg = small_cfg("polar", True, attn_window=8, embed_dtype="bfloat16")
  sd = convert.state_dict_from_params(cfg, random_params(cfg, seed=7))
  d = _write_ref(tmp_path, cfg, sd)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  assert cli.main(["import", "--weights", str(d), "--out", str(blocker / "run")]) == 2
  assert "cannot write to --out" in capsys.readouterr().err  # before the weights are read
  run = tmp_path / "run"
  assert cli.main(["import", "--weights", str(d), "--out", str(run), "--preset", "tiny",
                   "--set", "model.kernel_impl=xla"]) == 0
  loaded_cfg, _, params = load_model(str(run))
  assert loaded_cfg.model.attn_window == 8 and loaded_cfg.model.attn_type == "polar"
  back = convert.state_dict_from_params(loaded_cfg.model, params)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  out = tmp_path / "exported"
  assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
  again = files.read_state_dict(str(out / "model.safetensors"))
  assert again.keys() == sd.keys() and all(np.array_equal(again[k], sd[k]) for k in sd)
  assert json.loads((out / "tokenizer.json").read_text()) == {"tokenizer_name": "gpt2"}
  exported_cfg = json.loads((out / "config.json").read_text())
  assert exported_cfg["attn_window"] == 8 and exported_cfg["dtype"] == "bfloat16"
  # importing into a run that already has checkpoints is refused
  assert cli.main(["import", "--weights", str(d), "--out", str(run), "--preset", "tiny"]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# JAX vs the PyTorch reference (needs a checkout + a Python with torch; skipped otherwise).


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("ATMA_REFERENCE_REPO") and
                         os.environ.get("ATMA_TORCH_PYTHON")),
                    reason="set ATMA_REFERENCE_REPO and ATMA_TORCH_PYTHON to run verify")
def test_verify_against_reference():
  from atma_jax.interop import verify as V
  variants = [V.Variant("polar", True, True), V.Variant("rope", True, False),
              V.Variant("nope", False, True)]
  result = V.verify(os.environ["ATMA_REFERENCE_REPO"], os.environ["ATMA_TORCH_PYTHON"],
                    variants=variants, seq=48, head_dim=32)  # 8 query / 2 KV heads
  print(V.format_table(result))
  assert V.passed(result), V.format_table(result)


_PT_CHECK = r'''
import json, os, sys
import numpy as np, torch
sys.path.insert(0, os.getcwd())
from atma_jax.interop import files, convert, ref_config, layout
from atma_jax.interop.torch_side import _import_reference
AtmaConfig, Model, _ = _import_reference(os.environ["ATMA_REFERENCE_REPO"])
out = sys.argv[1]
torch.manual_seed(0)
raw = dict(vocab_size=96, num_hidden_layers=4, hidden_size=64, head_dim=16, attn_type="polar",
           attn_window=None, mem_chunk=16, attn_kernel="torch", mem_kernel="torch")
model = Model(AtmaConfig(**raw))
sd = {k: v for k, v in model.state_dict().items()}
# as the reference trainers save: {"model": sd}; here WITH a torch.compile prefix to strip
torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}}, os.path.join(out, "weights.pt"))
cfg_json = {k: (str(v).split(".")[-1] if isinstance(v, torch.dtype) else v)
            for k, v in vars(AtmaConfig(**raw)).items()}
json.dump(cfg_json, open(os.path.join(out, "config.json"), "w"))
# read the reference's own weights.pt + config.json
cfg = ref_config.model_config_from_reference(os.path.join(out, "config.json"))
got = files.read_state_dict(os.path.join(out, "weights.pt"))
convert.validate_state_dict(cfg, got)
assert got["embed.weight"].dtype == layout.BF16
for k, v in sd.items():
  ref = v.float().numpy()
  assert np.array_equal(np.asarray(got[k], np.float32), ref), k
# write weights.pt (--format pt) and load it strictly into the reference Model
files.write_reference_checkpoint(os.path.join(out, "pt"), got, cfg_json, fmt="pt")
back = torch.load(os.path.join(out, "pt", "weights.pt"), map_location="cpu", weights_only=True)
fresh = Model(AtmaConfig(**raw))
fresh.load_state_dict(back["model"], strict=True)
assert back["model"]["embed.weight"].dtype == torch.bfloat16
assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
print("PT-OK", len(sd))
'''


@pytest.mark.skipif(not (os.environ.get("ATMA_REFERENCE_REPO") and
                         os.environ.get("ATMA_TORCH_PYTHON")),
                    reason="set ATMA_REFERENCE_REPO and ATMA_TORCH_PYTHON (with ml_dtypes)")
def test_pt_files_with_torch(tmp_path):
  """The reference's own weights.pt is read (prefix stripped, bf16 kept) and --format pt loads."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([os.environ["ATMA_TORCH_PYTHON"], "-c", _PT_CHECK, str(tmp_path)],
                        cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "PT-OK" in proc.stdout, proc.stderr[-3000:]
