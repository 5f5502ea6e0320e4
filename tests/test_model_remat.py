"""Named remat policies (`model.remat`, atma_jax/model/remat.py): the same loss and gradients as
no remat, different residuals, the config's names, aliases and errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from atma_jax.config import (REMAT_POLICIES, ConfigError, ModelConfig, from_dict, from_json,
                             resolve, to_dict, to_json)
from atma_jax.model import Atma, loss_sum
from atma_jax.model.block import Block
from atma_jax.model.remat import POLICIES, checkpoint_block
from atma_jax.model.testing import init_model, jit, perturb, tiny_config

T = 16
KW = dict(num_layers=2, global_every=2, global_offset=0, num_random_keys=3)  # global + conv


def test_every_policy_matches_no_remat():
  """Loss and every gradient of each policy equal those of `none` (fp32; one compile)."""
  cfg = tiny_config(**KW)
  _, params = init_model(cfg, seed=0)
  params = perturb(params, jax.random.key(1))
  ids = jax.random.randint(jax.random.key(2), (2, T), 0, cfg.vocab_size)
  graphdefs = {p: nnx.split(nnx.eval_shape(lambda p=p: Atma(
      dataclasses.replace(cfg, remat=p), rngs=nnx.Rngs(0))), nnx.Param)[0]
      for p in REMAT_POLICIES}

  @jit
  def all_value_grads(params):
    out = {}
    for policy, gd in graphdefs.items():
      def loss(p, gd=gd):
        model = nnx.merge(gd, p)
        h, aux = model(ids, rng=jax.random.key(3), sigreg_mode="weak")
        return loss_sum(model, h, ids) + aux["reg"] + aux["align"]
      out[policy] = jax.value_and_grad(loss)(params)
    return out

  results = all_value_grads(params)
  l0, g0 = results["none"]
  assert np.isfinite(l0) and any(np.abs(g).max() > 0 for g in jax.tree.leaves(g0))
  for policy in REMAT_POLICIES:
    l1, g1 = results[policy]
    np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=policy)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=policy)


def _residuals(policy: str, layer: int):
  """{description: bytes} of what block `layer` keeps for its backward (no arguments)."""
  cfg = tiny_config(**KW)
  graphdef, state = nnx.split(Block(cfg, layer, rngs=nnx.Rngs(0)))
  x = jnp.zeros((2, T, cfg.hidden_size), jnp.float32)

  def run(state, x):
    out, reg, align = nnx.merge(graphdef, state)(x)
    return jnp.sum(out) + reg + align

  kept = {}
  for aval, what in saved_residuals(checkpoint_block(run, policy), state, x):
    if "from the argument" not in what:
      kept[what] = kept.get(what, 0) + aval.size * aval.dtype.itemsize
  return kept


@pytest.mark.parametrize("layer", [0, 1], ids=["global", "conv"])
def test_policies_keep_what_they_name(layer):
  """block keeps nothing but its arguments; dots keeps only tagged matmul / kernel outputs,
  the MLP's fc among them; dots_no_mlp_fc drops those; each keeps less than none."""
  none, dots = _residuals("none", layer), _residuals("dots", layer)
  no_fc = _residuals("dots_no_mlp_fc", layer)
  assert _residuals("block", layer) == {}
  assert all(w.startswith("named") for w in dots) and any("'mlp_fc'" in w for w in dots)
  assert not any("'mlp_fc'" in w for w in no_fc)
  assert sum(no_fc.values()) < sum(dots.values()) < sum(none.values())
  if layer == 0:  # the global block: the memory's core output is kept (the XLA attention is
    assert any("'mem_core'" in w for w in dots)  # not: its backward needs its internals)


def test_kernel_policies_keep_pallas_outputs():
  """dots and kernels keep a Pallas kernel's outputs, its forward residuals included (so the
  backward does not rerun the kernel); block keeps nothing. A toy custom-VJP kernel, interpret
  mode."""
  from jax.experimental import pallas as pl

  def kernel(x_ref, o_ref, r_ref):
    o_ref[...] = jnp.sin(x_ref[...])
    r_ref[...] = jnp.cos(x_ref[...])

  def run(x):
    return pl.pallas_call(kernel, out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),) * 2,
                          interpret=True)(x)

  @jax.custom_vjp
  def op(x):
    return run(x)[0]

  def op_fwd(x):
    sin_x, cos_x = run(x)
    return sin_x, cos_x

  op.defvjp(op_fwd, lambda cos_x, g: (g * cos_x,))

  def f(w, x):
    return jnp.sum(op(jnp.tanh(x @ w)) ** 2)

  w, x = jnp.ones((8, 8)), jnp.ones((4, 8))
  for policy, kept in (("dots", 2), ("kernels", 2), ("block", 0)):
    res = [what for _, what in saved_residuals(checkpoint_block(f, policy), w, x)
           if "from the argument" not in what]
    assert len(res) == kept and all("pallas_call" in what for what in res), (policy, res)


def test_checkpoint_block_is_the_function_itself_for_none():
  fn = lambda x: x  # noqa: E731
  assert checkpoint_block(fn, "none") is fn
  with pytest.raises(ValueError, match="not one of none, block"):
    checkpoint_block(fn, "everything")


def test_remat_names_aliases_and_errors():
  assert tuple(POLICIES) == REMAT_POLICIES
  assert resolve("tiny", ["model.remat=true"]).model.remat == "block"
  assert resolve("tiny", ["model.remat=false"]).model.remat == "none"
  assert ModelConfig(remat=True).remat == "block" and ModelConfig().remat == "none"
  for policy in REMAT_POLICIES:
    cfg = resolve("tiny", [f"model.remat={policy}"])
    assert from_json(to_json(cfg)) == cfg and cfg.model.remat == policy
  data = to_dict(resolve("tiny"))
  data["model"]["remat"] = True  # a config.json written when remat was a bool
  assert from_dict(data).model.remat == "block"
  with pytest.raises(ConfigError) as err:
    resolve("tiny", ["model.remat=dotz"])
  message = str(err.value)
  assert "\n" not in message and "model.remat='dotz'" in message
  assert all(p in message for p in REMAT_POLICIES)
  data["model"]["remat"] = "dotz"
  with pytest.raises(ConfigError, match="not a remat policy"):
    from_dict(json.loads(json.dumps(data)))
