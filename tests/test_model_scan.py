"""model.scan_layers (atma_jax/model/scan.py): the scanned forward equals the unrolled one.

Tiny model of 5 blocks with period 2: two scanned groups and one unrolled suffix block, with
distractor keys and SigReg on so every per-layer rng stream is drawn.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx

from atma_jax.config import resolve
from atma_jax.model import Atma, loss_sum
from atma_jax.model.scan import scanned_layers, stack_group_states
from atma_jax.model.testing import init_model, jit, perturb, tiny_config
from atma_jax.sharding import logical_to_spec
from atma_jax.train.checkpoint import check_same_model
from atma_jax.train.mesh import make_mesh
from atma_jax.train.state import init_state, setup_state
from atma_jax.train.step import make_train_step

GROUPS = dict(num_layers=5, global_every=2, global_offset=1, num_random_keys=3)


def _graphdef(cfg):
  return nnx.split(nnx.eval_shape(lambda: Atma(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]


def test_groups_cover_whole_periods_only():
  assert scanned_layers(16, 4) == 16 and scanned_layers(5, 2) == 4 and scanned_layers(3, 4) == 0
  model = nnx.merge(*init_model(tiny_config(**GROUPS)))
  graphdefs, states = stack_group_states(list(model.blocks)[:4], 2)
  assert len(graphdefs) == 2 and graphdefs[0] != graphdefs[1]  # conv block, global block
  for j in range(2):
    for g in range(2):
      np.testing.assert_array_equal(states[j]["mlp"]["fc"]["kernel"].get_value()[g],
                                    model.blocks[2 * g + j].mlp.fc.kernel.get_value())
  assert logical_to_spec(("layers", "embed", "mlp"), make_mesh(resolve("tiny").mesh)) == \
      jax.sharding.PartitionSpec(None, None, None)


def test_scan_matches_unrolled_loss_logits_grads():
  """fp32: loss, aux terms, logits and every gradient of the scanned forward (with remat: each
  block of the group in jax.checkpoint, as Atma._run_block decides) equal the unrolled loop's."""
  cfg = tiny_config(**GROUPS)
  graphdef, params = init_model(cfg, seed=0)
  params = perturb(params, jax.random.key(1))
  ids = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)

  def value_grad(gd):
    def loss(p):
      model = nnx.merge(gd, p)
      h, aux = model(ids, rng=jax.random.key(3), sigreg_mode="weak")
      return loss_sum(model, h, ids) + aux["reg"] + aux["align"], (aux, model.logits(h))
    return jit(jax.value_and_grad(loss, has_aux=True))(params)

  (l0, (aux0, logits0)), g0 = value_grad(graphdef)
  gd_scan = _graphdef(dataclasses.replace(cfg, scan_layers=True, remat=True))
  (l1, (aux1, logits1)), g1 = value_grad(gd_scan)
  assert float(aux0["reg"]) > 0 and float(aux0["align"]) > 0  # the rng streams are exercised
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for k in ("reg", "align"):
    np.testing.assert_allclose(aux1[k], aux0[k], rtol=1e-6)
  np.testing.assert_allclose(logits1, logits0, rtol=1e-6, atol=1e-6)
  flat0, flat1 = nnx.to_flat_state(g0), nnx.to_flat_state(g1)
  assert [p for p, _ in flat0] == [p for p, _ in flat1]  # same per-layer layout
  for (path, a), (_, b) in zip(flat0, flat1):
    np.testing.assert_allclose(b.get_value(), a.get_value(), rtol=1e-5, atol=1e-7,
                               err_msg=".".join(map(str, path)))


def test_train_step_on_8_devices_scan_equals_unrolled():
  """One sharded train step (data 2 x fsdp 2 x tensor 2, two micro-steps, SigReg on; 2 global
  blocks of period 1: two scanned groups, the smallest such model) with scan_layers on and off:
  same metrics and same updated parameters."""
  sets = ["model.num_layers=2", "model.global_every=1", "model.global_offset=0",
          "model.hidden_size=32", "model.head_dim=8", "model.gqa_ratio=2", "model.vocab_size=64",
          "model.mem_chunk=4", "optim.sigreg_mode=weak", "optim.sigreg_alpha=0.1",
          "train.seq_len=16",
          "train.global_batch=8", "train.micro_batch=4", "train.steps=10", "mesh.data=2",
          "mesh.fsdp=2", "mesh.tensor=2"]
  toks = np.random.default_rng(0).integers(0, 64, size=(8, 17)).astype(np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  out = []
  for scan in ("false", "true"):
    cfg = resolve("tiny", sets + [f"model.scan_layers={scan}"])
    mesh = make_mesh(cfg.mesh)
    setup = setup_state(cfg, mesh)
    state, metrics = make_train_step(cfg, setup, mesh)(init_state(cfg, setup), batch)
    out.append((jax.device_get(metrics), jax.device_get(state.params)))
  (m0, p0), (m1, p1) = out
  assert float(m0["reg"]) > 0
  for k in ("loss", "grad_norm", "reg"):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_checkpoints_ignore_scan_layers():
  """scan_layers changes no parameter: a checkpoint of either setting restores under the other."""
  on, off = resolve("tiny", ["model.scan_layers=true"]), resolve("tiny")
  check_same_model(on, off, "test")
  check_same_model(off, on, "test")
  gd_on, p_on = nnx.split(nnx.eval_shape(lambda: Atma(on.model, rngs=nnx.Rngs(0))), nnx.Param)
  gd_off, p_off = nnx.split(nnx.eval_shape(lambda: Atma(off.model, rngs=nnx.Rngs(0))), nnx.Param)
  assert jax.tree.structure(p_on) == jax.tree.structure(p_off)
  assert [x.shape for x in jax.tree.leaves(p_on)] == [x.shape for x in jax.tree.leaves(p_off)]
