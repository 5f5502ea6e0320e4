"""Batched Newton-Schulz (`optim.muon_batch`): same update as one NS per matrix, the parameters'
shardings kept on the 8-device mesh, and the optimizer state (so checkpoints) unchanged. Split
over the mesh (`optim.muon_batch_split`): equal to the single-device NS, each device running
its share of the matrices."""

import dataclasses
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from atma_jax.config import MeshConfig, OptimConfig, resolve
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


# Muon leaves of the sharded step, one NS path against another: one bf16 ulp of an NS output
# entry (|entry| < 1: 2^-8) times sqrt(max(1, R / C)) (2 for the 64 x 16 kernels) times lr 0.02.
# The per-matrix and unsplit paths split NS's matmuls over fsdp / tensor and sum partial products
# in another order than the split (= single-device) path, so they may round one ulp apart.
SHARDED_NS_ATOL = 0.02 * 2.0 ** -8 * 2.0


@pytest.mark.parametrize("batch,split", [(True, False), (True, True)])
def test_sharded_update_keeps_shardings_and_gathers_no_more(batch, split):
  """On data 2 x fsdp 2 x tensor 2: the batched update's outputs (stack split over the devices
  or not) keep every parameter's sharding, it all-gathers no more bytes than the per-matrix
  update (split: less), and the step is equal."""
  res = {}
  for b, sp in ((False, False), (batch, split)):
    cfg = resolve("tiny", STANDIN + [f"optim.muon_batch={str(b).lower()}",
                                     f"optim.muon_batch_split={str(sp).lower()}"])
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
    res[b, sp] = (tt.gathered_bytes(compiled.as_text()), jax.device_get((new_p, new_s)))
  base, new = res[False, False], res[batch, split]
  assert new[0] < base[0] if split else new[0] <= base[0], (new[0], base[0])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                       np.asarray(y, np.float32),
                                                       atol=SHARDED_NS_ATOL, rtol=0),
               base[1], new[1])


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
                                                       atol=SHARDED_NS_ATOL, rtol=0),
               jax.device_get(ref.params), jax.device_get(new.params))


def _matrices_per_dot(hlo: str) -> set[int]:
  """The batch sizes (product of all but the last two dims) of the dots of a compiled
  (per-device) HLO module."""
  shapes = [[int(d) for d in dims.split(",") if d]
            for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* dot\(", hlo)]
  return {math.prod(d[:-2]) for d in shapes}


def _largest_bf16_elements(hlo: str) -> int:
  """Elements of the largest bf16 array of a compiled (per-device) HLO module: NS's working
  set (the leaves are fp32; NS runs in bf16)."""
  return max(math.prod(int(d) for d in dims.split(",") if d)
             for dims in re.findall(r"bf16\[([\d,]*)\]", hlo))


def _largest_gather_bytes(hlo: str) -> int:
  return max([tt.gathered_bytes(line) for line in hlo.splitlines()] + [0])


@pytest.mark.parametrize("kind,shape,spec,n", [
    ("linear", (16, 24), P("fsdp", "tensor"), 16),  # 2 matrices per device
    ("linear", (24, 8), P("tensor", "fsdp"), 5),  # padded 5 -> 8: 1 per device
    ("linear", (16, 8), P("fsdp", None), 3),
    ("conv", (3, 8), P(None, "tensor"), 12),  # padded 12 -> 16
    ("matrix", (4, 16), P(None, None), 8)])
def test_split_ns_equals_single_device_and_splits_the_work(kind, shape, spec, n):
  """On data 2 x fsdp 2 x tensor 2: the split stack's NS equals the single-device batched NS
  (bit-equal on XLA:CPU: every matrix is computed whole on one device), the outputs keep the
  leaves' sharding, each device's NS works on Np / 8 whole matrices (its largest bf16 array and
  the batch of every dot; without the split: more), and no all-gather is larger than the
  result's own per-device stack."""
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  sh = NamedSharding(mesh, spec)
  rng = np.random.default_rng(3)
  host = [rng.normal(size=shape).astype(np.float32) * s for s in np.geomspace(1e-3, 1e3, n)]
  us = [jax.device_put(u, sh) for u in host]
  one_dev = jax.devices()[0]
  ref = jax.jit(lambda *u: muon_lib.orthogonalized_updates(list(u), kind))(
      *[jax.device_put(u, one_dev) for u in host])
  walk, n_pad = muon_lib.split_stack_shardings(sh, n)
  assert n_pad % 8 == 0 and n <= n_pad < n + 8
  assert set(walk[-1].spec[0]) == {"data", "fsdp", "tensor"}
  assert all(e is None for e in walk[-1].spec[1:])
  per_device = {}
  for split in (False, True):
    f = jax.jit(lambda *u: muon_lib.orthogonalized_updates(list(u), kind, sharding=sh,
                                                           split=split))
    compiled = f.lower(*us).compile()
    hlo = compiled.as_text()
    per_device[split] = (_matrices_per_dot(hlo), _largest_bf16_elements(hlo))
    if split:
      out = compiled(*us)
      for o, r in zip(out, ref):
        assert o.sharding.is_equivalent_to(sh, o.ndim), (o.sharding, sh)
        np.testing.assert_allclose(np.asarray(o), np.asarray(r), atol=2.0 ** -8, rtol=0)
        if jax.default_backend() == "cpu":
          np.testing.assert_array_equal(np.asarray(o), np.asarray(r))
      stack_bytes = n_pad * 4 * math.prod(sh.shard_shape(shape))
      assert _largest_gather_bytes(hlo) <= stack_bytes, (_largest_gather_bytes(hlo), stack_bytes)
  share = n_pad // 8  # whole matrices per device
  assert per_device[True][1] == share * math.prod(shape), per_device
  assert per_device[False][1] > share * math.prod(shape), per_device
  if kind != "conv":  # a conv leaf's 1 x K rows compile to no dot on XLA:CPU
    assert per_device[True][0] == {share}, per_device
    assert min(per_device[False][0]) > share, per_device


def test_split_is_a_no_op_on_one_device():
  """A one-device mesh (or no NamedSharding) has nothing to split over: no walk, no padding,
  so the single-GPU program is the unsplit one (the same lowered text)."""
  one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  sh = NamedSharding(one, P("fsdp", "tensor"))
  assert muon_lib.split_stack_shardings(sh, 5) == ([], 5)
  assert muon_lib.split_stack_shardings(None, 5) == ([], 5)
  us = [jax.device_put(np.ones((16, 24), np.float32), sh) for _ in range(3)]
  lowered = {split: jax.jit(lambda *u, split=split: muon_lib.orthogonalized_updates(
      list(u), "linear", sharding=sh, split=split)).lower(*us).as_text() for split in (False, True)}
  assert lowered[True] == lowered[False]
  two = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), devices=jax.devices()[:2])
  walk, n_pad = muon_lib.split_stack_shardings(NamedSharding(two, P("fsdp", "tensor")), 5)
  assert [w.spec for w in walk] == [P(None, ("fsdp",), None), P(("fsdp",), None, None)]
  assert n_pad == 6


def test_split_optimizer_equals_unsharded_optimizer():
  """The optimizer on the 8-device mesh with the split stacks (the default) gives the same Muon
  parameters and momenta as the optimizer with no shardings on one device: bit-equal on
  XLA:CPU (the gradients' norm is below clip_norm, so clipping multiplies by exactly 1 on
  both). The AdamW leaves are elementwise fp32 and agree to fp32 rounding (the sharded program
  may fuse their arithmetic differently; the split does not touch them)."""
  cfg = resolve("tiny", STANDIN)
  assert cfg.optim.muon_batch and cfg.optim.muon_batch_split  # the defaults
  mesh, mf, setup = _setup(cfg)
  state = init_state(cfg, setup, mf)
  rng = np.random.default_rng(5)
  grads = jax.tree.map(lambda p: jax.device_put(
      jnp.asarray(rng.normal(size=p.shape) * 1e-3, p.dtype), p.sharding), state.params)
  new_p, new_s, stats = jax.jit(setup.optimizer.apply)(state.params, grads, state.opt_state)
  assert float(stats["grad_norm"]) < cfg.optim.clip_norm
  one_dev = jax.devices()[0]
  host = jax.tree.map(lambda x: jax.device_put(jax.device_get(x), one_dev),
                      (state.params, grads, state.opt_state))
  plain = build_optimizer(cfg.optim, host[0], setup.optimizer.total_steps)
  assert plain.shardings is None
  ref_p, ref_s, _ = jax.jit(plain.apply)(*host)
  got_p, want_p = jax.device_get(jax.tree.leaves(new_p)), jax.device_get(jax.tree.leaves(ref_p))
  n_muon = 0
  for spec, a, b, sa, sb in zip(plain.specs, got_p, want_p, new_s.slots, ref_s.slots):
    pairs = [(a, b)] + list(zip(jax.device_get(sa), jax.device_get(sb)))
    for x, y in pairs:
      x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
      if spec.group == "muon":
        np.testing.assert_allclose(x, y, atol=0.02 * 2.0 ** -8, rtol=0, err_msg=spec.path)
        if jax.default_backend() == "cpu":
          np.testing.assert_array_equal(x, y, err_msg=spec.path)
      else:
        # two fp32 ulps of an AdamW step, whose size is up to embed_lr = 0.3
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=0.3 * 2.0 ** -22, err_msg=spec.path)
    n_muon += spec.group == "muon"
  assert n_muon >= 6
