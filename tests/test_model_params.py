"""Model structure: parameter counts, torch-mirroring names, logical axes, init values, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from atma_jax.config import ConfigError, resolve
from atma_jax.model import Atma, logical_axes, param_partition_specs
from atma_jax.model.testing import init_model, tiny_config
from atma_jax.sharding import LOGICAL_RULES
from atma_jax.summary import abstract_params, count_params


@pytest.mark.parametrize("sets, expected", [
    ([], 378_220_864),
    (["model.mem_enabled=false"], 369_758_464),
    (["model.attn_type=nope"], 378_179_776),
    (["model.attn_type=rope"], 378_155_200),
    (["model.attn_type=nope", "model.mem_enabled=false"], 369_717_376),
    (["model.attn_type=rope", "model.mem_enabled=false"], 369_692_800),
])
def test_param_count_canonical(sets, expected):
  """ATMA_SPEC §2.8 totals, from abstract shapes only (nothing allocated)."""
  assert count_params(resolve("atma_378m", sets).model) == expected


def _torch_names(cfg):
  """Expected parameter names (torch spelling mapped to ours) for `cfg`, built from the spec §9."""
  names = {"embed.embedding", "norm.weight", "proj.kernel", "proj.bias"}
  lin = lambda p: {f"{p}.kernel", f"{p}.bias"}
  for l in range(cfg.num_layers):
    b = f"blocks.{l}"
    names |= {f"{b}.norm1.weight", f"{b}.norm2.weight"} | lin(f"{b}.mlp.fc") | lin(f"{b}.mlp.proj")
    if not cfg.is_global(l):
      names |= lin(f"{b}.attn.in_proj") | lin(f"{b}.attn.out_proj") | {f"{b}.attn.conv.kernel"}
      continue
    for p in ("q", "k", "v", "proj"):
      names |= lin(f"{b}.attn.{p}")
    if cfg.attn_type != "rope":
      names |= {f"{b}.attn.canon_{c}.kernel" for c in "qkv"}
    if cfg.attn_type == "polar":
      names |= lin(f"{b}.attn.mu_proj")
      names |= {f"{b}.attn.{p}" for p in ("v_null", "null_base", "null_slope_raw",
                                            "len_gain_raw", "mag_beta_raw")}
    if cfg.mem_enabled:
      for p in ("w_gamma", "w_beta", "gate", "proj"):
        names |= lin(f"{b}.attn.mem.{p}")
  return names


@pytest.mark.parametrize("attn_type", ["polar", "nope", "rope"])
@pytest.mark.parametrize("mem", [True, False])
def test_param_names_mirror_torch(attn_type, mem):
  cfg = tiny_config(num_layers=4, global_every=4, global_offset=2, attn_type=attn_type,
                    mem_enabled=mem)
  got = set(logical_axes(abstract_params(cfg)))
  assert got == _torch_names(cfg)


def test_param_shapes_and_dtypes_378m():
  """Shapes of spec §9 in our layout (Linear kernels [in, out], conv kernels [K, C])."""
  params = abstract_params(resolve("atma_378m").model)
  shapes = {".".join(map(str, p)): (tuple(v.get_value().shape), str(v.get_value().dtype))
            for p, v in nnx.to_flat_state(params)}
  f32 = "float32"
  assert shapes["embed.embedding"] == ((50304, 1024), "bfloat16")
  assert shapes["proj.kernel"] == ((1024, 50304), f32)
  assert shapes["blocks.0.attn.in_proj.kernel"] == ((1024, 3072), f32)
  assert shapes["blocks.0.attn.conv.kernel"] == ((3, 1024), f32)
  assert shapes["blocks.2.attn.q.kernel"] == ((1024, 2048), f32)
  assert shapes["blocks.2.attn.k.kernel"] == ((1024, 256), f32)
  assert shapes["blocks.2.attn.canon_q.kernel"] == ((4, 1024), f32)
  assert shapes["blocks.2.attn.canon_v.kernel"] == ((4, 256), f32)
  assert shapes["blocks.2.attn.mu_proj.kernel"] == ((8, 1024), f32)
  assert shapes["blocks.2.attn.v_null"] == ((8, 128), f32)
  assert shapes["blocks.2.attn.null_base"] == ((8,), f32)
  assert shapes["blocks.2.attn.mem.w_gamma.kernel"] == ((1024, 8), f32)
  assert shapes["blocks.2.attn.mem.proj.kernel"] == ((1024, 1024), f32)
  assert shapes["blocks.2.mlp.fc.kernel"] == ((1024, 8192), f32)
  assert shapes["blocks.2.mlp.proj.kernel"] == ((4096, 1024), f32)
  assert [l for l in range(16) if f"blocks.{l}.attn.q.kernel" in shapes] == [2, 6, 10, 14]


def test_logical_axes_valid_and_resolve_on_mesh():
  cfg = tiny_config(num_layers=4, global_every=4, global_offset=2)
  params = abstract_params(cfg)
  axes = logical_axes(params)
  shapes = {".".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(params)}
  for name, names in axes.items():
    assert len(names) == len(shapes[name]), name
    assert all(a in LOGICAL_RULES for a in names if a is not None), (name, names)
  assert axes["blocks.2.attn.q.kernel"] == ("embed", "heads")
  assert axes["embed.embedding"] == ("vocab", "embed")
  assert axes["proj.kernel"] == ("embed", "vocab")
  assert axes["blocks.0.attn.conv.kernel"] == ("conv_taps", "mixer")
  assert axes["blocks.2.attn.null_base"] == ("head_scalars",)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  specs = param_partition_specs(params, mesh)
  flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}
  assert flat["blocks.2.attn.q.kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert flat["blocks.2.norm1.weight"] == jax.sharding.PartitionSpec(None)


def test_init_values_reference_and_live():
  cfg = tiny_config(num_layers=4, global_every=4, global_offset=2)
  _, params = init_model(cfg, seed=3)
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
  for name, x in flat.items():
    if "proj" in name:  # torch rule: every name containing "proj" is zero
      assert not x.any(), name
  a = "blocks.2.attn"
  np.testing.assert_array_equal(flat[f"{a}.null_base"], 2.0)
  np.testing.assert_array_equal(flat[f"{a}.null_slope_raw"], 0.5)
  np.testing.assert_array_equal(flat[f"{a}.len_gain_raw"], -1.0)
  np.testing.assert_array_equal(flat[f"{a}.mag_beta_raw"], -1.5)
  np.testing.assert_array_equal(flat[f"{a}.v_null"], 0.0)
  np.testing.assert_array_equal(flat["norm.weight"], 1.0)
  # torch-default bounds: Linear U(+-1/sqrt(in)) for weight and bias, conv U(+-1/sqrt(K)).
  q = flat[f"{a}.q.kernel"]
  b = 1 / np.sqrt(q.shape[0])
  assert np.abs(q).max() <= b and np.abs(q).max() > 0.95 * b
  assert np.abs(flat[f"{a}.q.bias"]).max() <= b
  assert abs(q.std() - b / np.sqrt(3)) < 0.05 * b  # uniform variance
  c = flat["blocks.0.attn.conv.kernel"]
  assert np.abs(c).max() <= 1 / np.sqrt(3) and np.abs(c).max() > 0.8 / np.sqrt(3)
  e = flat["embed.embedding"]
  assert abs(e.std() - 1.0) < 0.05 and abs(e.mean()) < 0.05
  # live_mixers: identical except the LFM2 in_proj keeps its default draw
  _, live = init_model(tiny_config(num_layers=4, global_every=4, global_offset=2,
                                   init_scheme="live_mixers"), seed=3)
  flat_live = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(live)}
  for name, x in flat_live.items():
    if ".in_proj." in name:
      assert np.abs(x).max() > 0 and np.abs(x).max() <= 1 / np.sqrt(32), name
    else:
      np.testing.assert_array_equal(x, flat[name], err_msg=name)


def test_bad_configs_fail_clearly():
  with pytest.raises(ConfigError, match="head_dim"):
    Atma(tiny_config(hidden_size=30, head_dim=8), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="gqa_ratio"):
    Atma(tiny_config(gqa_ratio=3), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="divisible by 4"):
    Atma(tiny_config(attn_type="rope", hidden_size=24, head_dim=6, gqa_ratio=2),
         rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="init_scheme"):
    Atma(tiny_config(init_scheme="xavier"), rngs=nnx.Rngs(0))


def test_bad_calls_fail_clearly():
  cfg = tiny_config()
  model = nnx.eval_shape(lambda: Atma(cfg, rngs=nnx.Rngs(0)))
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="sigreg_mode"):
    jax.eval_shape(lambda: model(ids, sigreg_mode="strongest"))
  with pytest.raises(ValueError, match="integer array"):
    jax.eval_shape(lambda: model(jnp.zeros((1, 4), jnp.float32)))
  with pytest.raises(ValueError, match="q_offset"):
    jax.eval_shape(lambda: model(ids, q_offset=3))
