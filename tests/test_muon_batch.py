"""Batched Newton-Schulz (`optim.muon_batch`): same update as one NS per matrix, the parameters'
shardings kept on the 8-device mesh, and the optimizer state (so checkpoints) unchanged."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atma_jax.config import OptimConfig, resolve
from atma_jax.train import checkpoint as ckpt
from atma_jax.train import muon as muon_lib
from atma_jax.train.mesh import make_mesh
from atma_jax.train.optimizer import build_optimizer, classify, muon_batches
from atma_jax.train.state import init_state, setup_state
from atma_jax.train.step import make_train_step
from test_train_standin import ToyData, standin_losses, standin_model_fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import train_throughput as tt  # noqa: E402

STANDIN = ["model.vocab_size=64", "model.hidden_size=16", "model.head_dim=4",
           "model.gqa_ratio=1", "model.num_layers=3", "train.seq_len=16",
           "train.global_batch=16", "train.micro_batch=8", "train.steps=20",
           "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _toy_params(rng, layers=3):
  """Our layouts, several blocks of equal shapes: tall / wide linear, conv, v_null."""
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  blocks = {str(i): {"attn": {"q": {"kernel": f(12, 40)}, "conv": {"kernel": f(3, 10)},
                              "v_null": f(4, 16)},
                     "mlp": {"fc": {"kernel": f(24, 8)}, "bias": f(8)}}
            for i in range(layers)}
  return {"blocks": blocks, "embed": {"embedding": f(32, 12)}, "proj": {"kernel": f(12, 32)}}


def test_groups_are_by_kind_shape_dtype():
  params = _toy_params(np.random.default_rng(0))
  specs = classify(params)
  groups = muon_batches(specs, [p.dtype for p in jax.tree.leaves(params)])
  assert sorted(len(g) for g in groups) == [3, 3, 3, 3]
  for g in groups:
    assert len({(specs[i].kind, specs[i].shape) for i in g}) == 1
  assert sum(len(g) for g in groups) == sum(s.group == "muon" for s in specs)


@pytest.mark.parametrize("kind,shape", [("linear", (12, 40)), ("linear", (24, 8)),
                                        ("conv", (3, 10)), ("matrix", (4, 16))])
@pytest.mark.parametrize("ns_coeffs", ["reference", "optax"])
def test_batched_ns_equals_per_matrix(kind, shape, ns_coeffs):
  """Each matrix normalised by its own norm: scales 1e-3 .. 1e3 in one batch change nothing."""
  rng = np.random.default_rng(7)
  us = [jnp.asarray(rng.normal(size=shape).astype(np.float32) * s) for s in (1e-3, 1.0, 1e3)]
  batched = muon_lib.orthogonalized_updates(us, kind, ns_coeffs=ns_coeffs)
  for u, b in zip(us, batched):
    one = muon_lib.orthogonalized_update(u, kind, ns_coeffs=ns_coeffs)
    assert b.shape == u.shape and b.dtype == jnp.float32
    # bf16 NS: at most a bf16 ulp of the unit-scale update where a batched matmul may round
    # differently; on XLA:CPU it is bit-equal
    np.testing.assert_allclose(np.asarray(b), np.asarray(one), atol=2.0 ** -8, rtol=0)
    if jax.default_backend() == "cpu":
      np.testing.assert_array_equal(np.asarray(b), np.asarray(one))
  with pytest.raises(ValueError, match="one shape and dtype"):
    muon_lib.orthogonalized_updates([us[0], us[0][:, :-1]], kind)


def test_optimizer_steps_equal_with_and_without_batching():
  rng = np.random.default_rng(1)
  params = _toy_params(rng)
  opts = {b: build_optimizer(OptimConfig(muon_batch=b), params, 4) for b in (False, True)}
  state = {b: o.init(params) for b, o in opts.items()}
  jax.tree.map(np.testing.assert_array_equal, state[False], state[True])  # same state tree
  cur = {b: params for b in opts}
  for _ in range(2):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    for b, o in opts.items():
      cur[b], state[b], _ = jax.jit(o.apply)(cur[b], grads, state[b])
  # momentum (fp32 elementwise) bitwise; parameters within a bf16 ulp of the NS times lr
  jax.tree.map(np.testing.assert_array_equal, state[False], state[True])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.02 * 2.0 ** -8, rtol=0),
               cur[False], cur[True])
  if jax.default_backend() == "cpu":  # bit-equal on XLA:CPU
    jax.tree.map(np.testing.assert_array_equal, cur[False], cur[True])


def _setup(cfg):
  mf = standin_model_fn(cfg)
  mesh = make_mesh(cfg.mesh)
  setup = setup_state(cfg, mesh, mf)
  return mesh, mf, setup


def test_sharded_update_keeps_shardings_and_gathers_no_more():
  """On data 2 x fsdp 2 x tensor 2: the batched update's outputs keep every parameter's
  sharding, it all-gathers no more bytes than the per-matrix update, and the step is equal."""
  res = {}
  for b in (False, True):
    cfg = resolve("tiny", STANDIN + [f"optim.muon_batch={str(b).lower()}"])
    mesh, mf, setup = _setup(cfg)
    state = init_state(cfg, setup, mf)
    opt = setup.optimizer
    grads = jax.tree.map(lambda p: (p * 0.5 + 0.01).astype(p.dtype), state.params)
    apply = jax.jit(opt.apply, out_shardings=None)
    compiled = apply.lower(state.params, grads, state.opt_state).compile()
    out_p_sh = jax.tree.leaves(compiled.output_shardings[0],
                               is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    want = jax.tree.leaves(setup.shardings.params,
                           is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for got, exp, p in zip(out_p_sh, want, jax.tree.leaves(state.params)):
      assert got.is_equivalent_to(exp, p.ndim), (got, exp)
    new_p, new_s, _ = compiled(state.params, grads, state.opt_state)
    res[b] = (tt.gathered_bytes(compiled.as_text()), jax.device_get((new_p, new_s)))
  assert res[True][0] <= res[False][0], (res[True][0], res[False][0])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                       np.asarray(y, np.float32),
                                                       atol=0.02 * 2.0 ** -8, rtol=0),
               res[False][1], res[True][1])


def test_checkpoint_from_unbatched_resumes_batched(tmp_path):
  """A checkpoint saved with muon_batch off restores into a muon_batch-on setup (same state
  tree) and the next step equals the unbatched one's."""
  off = resolve("tiny", STANDIN + ["optim.muon_batch=false"])
  on = dataclasses.replace(off, optim=dataclasses.replace(off.optim, muon_batch=True))
  mesh, mf, setup_off = _setup(off)
  step_off = make_train_step(off, setup_off, mesh, losses_fn=standin_losses)
  data = ToyData(off)
  state, _ = step_off(init_state(off, setup_off, mf), next(data))
  mngr = ckpt.make_manager(tmp_path, keep=1, async_save=False)
  ckpt.save(mngr, 1, state, data, off, force=True)
  mngr.wait_until_finished()
  saved = jax.device_get(state)  # the step donates its input state
  batch = next(data)
  ref, m_ref = step_off(state, batch)

  _, _, setup_on = _setup(on)
  assert (jax.tree.structure(setup_on.abstract) == jax.tree.structure(setup_off.abstract))
  restored = ckpt.restore(mngr, 1, setup_on.abstract, None, on)
  mngr.close()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  step_on = make_train_step(on, setup_on, mesh, losses_fn=standin_losses)
  new, m_new = step_on(restored, batch)
  assert float(m_new["loss"]) == float(m_ref["loss"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                       np.asarray(y, np.float32),
                                                       atol=0.02 * 2.0 ** -8, rtol=0),
               jax.device_get(ref.params), jax.device_get(new.params))
