"""The model under an 8-device (data, fsdp, tensor) mesh equals the unsharded model."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from atma_jax.model import param_partition_specs
from atma_jax.model.testing import init_model, jit, perturb, tiny_config
from atma_jax.sharding import logical_to_spec, use_mesh


def test_sharded_forward_matches_single_device():
  cfg = tiny_config(num_layers=2, attn_window=5)
  graphdef, params = init_model(cfg, seed=0)
  params = perturb(params, jax.random.key(1))
  ids = jax.random.randint(jax.random.key(2), (4, 8), 0, cfg.vocab_size)

  def forward(params, ids):
    model = nnx.merge(graphdef, params)
    h, _ = model(ids)
    return model.logits(h)

  want = jit(forward)(params, ids)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  with use_mesh(mesh):
    specs = param_partition_specs(params)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.to_pure_dict(specs))
    placed = jax.device_put(nnx.to_pure_dict(params), shardings)
    sharded_params = nnx.State(params)
    nnx.replace_by_pure_dict(sharded_params, placed)
    ids_s = jax.device_put(ids, NamedSharding(mesh, logical_to_spec(("batch", "seq"))))
    got = jit(forward)(sharded_params, ids_s)
  kernel = sharded_params["blocks"][0]["attn"]["q"]["kernel"].get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
