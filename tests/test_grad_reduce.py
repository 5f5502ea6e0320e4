"""train.grad_reduce=step (one all-reduce per optimizer step, accumulate.py) gives the gradients
of the default per-micro-step reduction on the 8-device data-parallel mesh, with no all-reduce
left inside the micro-step loop; unsupported meshes and aux losses are refused up front."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from atma_jax.config import ConfigError, resolve
from atma_jax.train.accumulate import make_accumulate
from atma_jax.train.mesh import batch_sharding, make_mesh
from atma_jax.train.state import init_state, setup_state
from atma_jax.train.step import make_train_step, model_losses

T, B, M = 32, 32, 16  # N = 2 micro-steps of 16 rows: 2 rows per device
SETS = ["model.num_layers=2", "model.global_offset=1", "model.hidden_size=64",
        "model.head_dim=16", f"train.seq_len={T}", f"train.global_batch={B}",
        f"train.micro_batch={M}", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"]


def _setup(*extra):
  cfg = resolve("tiny", SETS + list(extra))
  mesh = make_mesh(cfg.mesh)
  setup = setup_state(cfg, mesh)
  return cfg, mesh, setup, init_state(cfg, setup)


def _accumulated(mesh, setup, state, mode, inputs_NMT, targets_NMT):
  cfg = resolve("tiny", SETS + [f"train.grad_reduce={mode}"])

  def micro_loss(params, inp, tgt, rng):
    ce, reg, align = model_losses(cfg, nnx.merge(setup.graphdef, params), inp, tgt, rng,
                                  train=True)
    return ce, (ce, reg, align)

  acc = make_accumulate(cfg, mesh, jax.value_and_grad(micro_loss, has_aux=True),
                        setup.shardings.params)
  fn = jax.jit(acc)
  from atma_jax.sharding import use_mesh
  with use_mesh(mesh):
    args = (state.params, inputs_NMT, targets_NMT, jax.random.key(3))
    return fn(*args), fn.lower(*args).compile().as_text()


def _while_bodies(hlo: str) -> list[str]:
  """Text of every while-loop body computation of an HLO module."""
  names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  comps = re.split(r"\n(?=\S)", hlo)
  return [c for c in comps if any(re.match(rf"(ENTRY )?%?{re.escape(n)}\b", c) for n in names)]


@pytest.mark.slow
def test_step_reduce_matches_micro_reduce_and_leaves_the_loop_free_of_all_reduce():
  _, mesh, setup, state = _setup()
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 50257, size=(B // M, M, T + 1)).astype(np.int32)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
  inp, tgt = jax.device_put(toks[..., :-1], sh), jax.device_put(toks[..., 1:], sh)
  (g_micro, ce_micro, _, _), hlo_micro = _accumulated(mesh, setup, state, "micro", inp, tgt)
  (g_step, ce_step, reg, align), hlo_step = _accumulated(mesh, setup, state, "step", inp, tgt)
  np.testing.assert_allclose(float(ce_step), float(ce_micro), rtol=1e-6)
  assert float(reg) == 0.0 and float(align) == 0.0
  leaves_m, leaves_s = jax.tree.leaves(g_micro), jax.tree.leaves(g_step)
  assert len(leaves_m) == len(leaves_s) > 10
  for a, b in zip(leaves_m, leaves_s):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5 * (np.abs(a).max() + 1e-30))
  assert any(np.abs(np.asarray(x)).max() > 0 for x in leaves_s)
  bodies_m, bodies_s = _while_bodies(hlo_micro), _while_bodies(hlo_step)
  assert bodies_m and bodies_s
  assert any("all-reduce" in b for b in bodies_m)  # today: every micro-step reduces
  assert not any("all-reduce" in b for b in bodies_s)  # step: only after the loop
  assert "all-reduce" in hlo_step
  # the whole jitted train step: same loss and gradient norm
  batch = {"inputs": jax.device_put(np.swapaxes(toks[..., :-1], 0, 1).reshape(B, T),
                                    batch_sharding(mesh)),
           "targets": jax.device_put(np.swapaxes(toks[..., 1:], 0, 1).reshape(B, T),
                                     batch_sharding(mesh))}
  metrics = {}
  for mode in ("micro", "step"):
    c, m, su, st = _setup(f"train.grad_reduce={mode}")
    _, metrics[mode] = make_train_step(c, su, m)(st, batch)
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(metrics["step"][k]), float(metrics["micro"][k]), rtol=1e-5)


def test_step_reduce_refuses_sharded_params_and_batch_aux_losses():
  for extra, match in ((["mesh.data=4", "mesh.fsdp=2"], "pure data parallelism"),
                       (["optim.sigreg_mode=weak"], "auxiliary losses")):
    cfg = resolve("tiny", SETS + ["train.grad_reduce=step"] + extra)
    mesh = make_mesh(cfg.mesh)
    setup = setup_state(cfg, mesh)
    with pytest.raises(ConfigError, match=match):
      make_train_step(cfg, setup, mesh)
