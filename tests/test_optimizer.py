"""Optimizer recipe vs a direct numpy transcription of the torch reference (ATMA_SPEC §6.3-§6.5)."""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from atma_jax.config import OptimConfig
from atma_jax.train import muon as muon_lib
from atma_jax.train.optimizer import (OptimizerError, build_optimizer, classify,
                                      clip_by_global_norm, group_summary)
from atma_jax.train.schedule import lr_multiplier

BF16 = ml_dtypes.bfloat16


def _r(x):  # round to bf16 (every torch bf16 op rounds its output)
  return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def ns_torch_numpy(G):
  """`zeropower_via_newtonschulz5` of the reference, op by op, in numpy with bf16 rounding."""
  X = _r(G)
  tall = X.shape[-2] > X.shape[-1]
  if tall:
    X = np.swapaxes(X, -1, -2)
  norm = _r(np.sqrt(np.sum(X.astype(np.float64) ** 2, axis=(-2, -1), keepdims=True)))
  X = _r(X / _r(norm + 1e-7))
  a, b, c = 2, -1.5, 0.5
  for _ in range(12):
    A = _r(X @ np.swapaxes(X, -1, -2))
    B = _r(_r(b * A) + _r(c * _r(A @ A)))
    X = _r(_r(a * X) + _r(B @ X))
  if tall:
    X = np.swapaxes(X, -1, -2)
  return X


def muon_torch_numpy(grad, mom, p, lr, wd=0.01, mu=0.95):
  """`muon_update` + the weight-decay/update lines of `Muon.step` on a torch-layout tensor."""
  mom = mom + (1 - mu) * (grad - mom)
  upd = grad + mu * (mom - grad)
  upd = ns_torch_numpy(upd) * max(1, grad.shape[-2] / grad.shape[-1]) ** 0.5
  p = p * (1 - lr * wd)
  return p - lr * upd, mom


@pytest.mark.parametrize("shape", [(8, 24), (40, 12), (16, 16)])
def test_newton_schulz_matches_torch_transcription(shape):
  g = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
  ours = np.asarray(muon_lib.newton_schulz_reference(jnp.asarray(g)).astype(jnp.float32))
  ref = ns_torch_numpy(g)
  # bf16 rounding of fp32-accumulated products: identical up to a few bf16 ulps
  np.testing.assert_allclose(ours, ref, atol=3e-2, rtol=0)
  assert np.abs(ours - ref).mean() < 2e-3
  # and it really orthogonalizes: singular values pushed near 1 (the reference NS has fixed
  # point 1 but converges slowly for tiny singular values; check the bulk)
  s = np.linalg.svd(ours.astype(np.float64), compute_uv=False)
  assert np.median(s) == pytest.approx(1.0, abs=0.1)


def _toy_params(rng):
  """Our layouts: Linear kernel [in, out], conv kernel [K, C], v_null [H, d]."""
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {
      "blocks": {
          "0": {"attn": {"q": {"kernel": f(12, 40), "bias": f(40)},  # torch (40,12): tall
                         "conv": {"kernel": f(3, 10)},
                         "v_null": f(4, 16)},
                "mlp": {"fc": {"kernel": f(24, 8), "bias": f(8)}},  # torch (8,24): wide
                "norm1": {"weight": f(12)}},
      },
      "embed": {"embedding": f(32, 12).astype(jnp.bfloat16)},
      "norm": {"weight": f(12)},
      "proj": {"kernel": f(12, 32), "bias": f(32)},
  }


def test_groups_and_kinds():
  params = _toy_params(np.random.default_rng(0))
  specs = {s.path: s for s in classify(params)}
  assert specs["blocks.0.attn.q.kernel"].kind == "linear"
  assert specs["blocks.0.attn.conv.kernel"].kind == "conv"
  assert specs["blocks.0.attn.v_null"].kind == "matrix"
  assert specs["embed.embedding"].group == "embed"
  assert specs["proj.kernel"].group == "head"
  assert specs["proj.bias"].group == "scalar"
  assert specs["blocks.0.attn.q.bias"].group == "scalar"
  assert {s.group for s in specs.values()} == {"muon", "embed", "head", "scalar"}
  bad = dict(params, extra={"w": jnp.zeros((3, 3))})
  with pytest.raises(OptimizerError, match="extra.w"):
    classify(bad)


def test_schedule_values():
  n = 100
  vals = np.asarray([lr_multiplier(s, n, 0.7) for s in range(n)])
  assert np.all(vals[:30] == 1.0)
  np.testing.assert_allclose(vals[30:], (1 - np.arange(30, 100) / n) / 0.7, rtol=1e-6)
  assert vals[-1] == pytest.approx(0.01 / 0.7, rel=1e-5)


def test_full_step_matches_reference_transcription():
  """Two optimizer steps (clip, AdamW groups, Muon incl. conv/tall/matrix) vs numpy."""
  rng = np.random.default_rng(1)
  params = _toy_params(rng)
  cfg = OptimConfig()
  total = 4  # progress 0.25, 0.5: second step is in the cooldown (eta = 0.5 / 0.7)
  opt = build_optimizer(cfg, params, total)
  state = opt.init(params)
  leaves, treedef = jax.tree.flatten(params)
  specs = classify(params)
  ref_p = [np.asarray(x.astype(jnp.float32)) for x in leaves]
  ref_m = [np.zeros_like(x) for x in ref_p]
  ref_v = [np.zeros_like(x) for x in ref_p]
  step = jax.jit(opt.apply)
  cur = params
  for it in range(2):
    g_leaves = [rng.normal(size=x.shape).astype(np.float32) * 3 for x in leaves]
    g_leaves = [np.asarray(jnp.asarray(g).astype(x.dtype).astype(jnp.float32))
                for g, x in zip(g_leaves, leaves)]
    grads = jax.tree.unflatten(treedef, [jnp.asarray(g).astype(x.dtype)
                                         for g, x in zip(g_leaves, leaves)])
    cur, state, stats = step(cur, grads, state)
    # reference
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in g_leaves))
    np.testing.assert_allclose(float(stats["grad_norm"]), norm, rtol=1e-5)
    coef = min(1.0, 1.0 / (norm + 1e-6))
    eta = 1.0 if it / total < 0.3 else (1 - it / total) / 0.7
    t = it + 1
    for i, spec in enumerate(specs):
      g = g_leaves[i] * coef
      if spec.group == "muon":
        lr = 0.02 * eta
        if spec.kind == "linear":
          newp, ref_m[i] = muon_torch_numpy(g.T, ref_m[i].T, ref_p[i].T, lr)
          ref_p[i], ref_m[i] = newp.T, ref_m[i].T
        elif spec.kind == "conv":  # [K, C] -> torch (C, 1, K)
          to = lambda x: x.T[:, None, :]
          newp, m = muon_torch_numpy(to(g), to(ref_m[i]), to(ref_p[i]), lr)
          ref_p[i], ref_m[i] = newp[:, 0, :].T, m[:, 0, :].T
        else:
          ref_p[i], ref_m[i] = muon_torch_numpy(g, ref_m[i], ref_p[i], lr)
      else:
        lr = {"embed": 0.3, "head": 1 / 320, "scalar": 0.01}[spec.group] * eta
        if spec.group == "embed":  # the clipped gradient is cast back to the param's bf16
          g = _r(g)
        m = 0.8 * ref_m[i] + 0.2 * g
        v = 0.95 * ref_v[i] + 0.05 * g * g
        denom = np.sqrt(v) / np.sqrt(1 - 0.95 ** t) + 1e-10
        ref_p[i] = ref_p[i] - lr / (1 - 0.8 ** t) * m / denom
        # moments are stored in the parameter's dtype (bf16 for the embedding)
        ref_m[i], ref_v[i] = (_r(m), _r(v)) if spec.group == "embed" else (m, v)
    for spec, ours, ref, orig in zip(specs, jax.tree.leaves(cur), ref_p, leaves):
      ours = np.asarray(ours.astype(jnp.float32))
      if spec.group == "embed":  # bf16 parameter and moments
        assert ours.dtype == np.float32 and orig.dtype == jnp.bfloat16
        # the update (|step| = lr at t=1, ~0.3) lands on the bf16 grid: equal to the rounded
        # float64 reference (on CPU every entry is), at most one bf16 ulp off where the fp32 and
        # fp64 results straddle a rounding boundary; an lr 1% off misses by up to ~1500 ulps
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 2.0 ** -126))) - 7)
        diff = np.abs(ours - _r(ref))
        assert np.all(diff <= ulp), (spec.path, float(np.max(diff / ulp)))
        assert np.mean(diff > 0) < 0.01, (spec.path, float(np.mean(diff > 0)))
        ref_p[specs.index(spec)] = ours  # continue from the bf16-rounded value
      else:
        # Muon: bf16 NS => differences of a few bf16 ulps of the unit-scale update, times lr
        np.testing.assert_allclose(ours, ref, atol=0.02 * 0.03, rtol=0, err_msg=spec.path)
  # embedding keeps its dtype, moments too
  assert cur["embed"]["embedding"].dtype == jnp.bfloat16
  emb_slot = state.slots[[s.path for s in specs].index("embed.embedding")]
  assert all(x.dtype == jnp.bfloat16 for x in emb_slot)
  assert int(state.count) == 2


def test_conv_kernel_is_per_channel_normalized():
  """A 1 x K row is a fixed point of NS: the conv update is the per-channel unit direction."""
  u = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)  # [K, C]
  o = np.asarray(muon_lib.orthogonalized_update(jnp.asarray(u), "conv"))
  np.testing.assert_allclose(o, u / np.linalg.norm(u, axis=0, keepdims=True), atol=2e-2)


def test_optax_coeffs_option_runs_and_differs():
  u = jnp.asarray(np.random.default_rng(4).normal(size=(12, 20)).astype(np.float32))
  a = muon_lib.orthogonalized_update(u, "linear", ns_coeffs="reference")
  b = muon_lib.orthogonalized_update(u, "linear", ns_coeffs="optax")
  assert a.shape == b.shape == u.shape
  assert float(jnp.abs(a - b).max()) > 1e-3
  with pytest.raises(ValueError, match="muon_ns_coeffs"):
    muon_lib.orthogonalized_update(u, "linear", ns_coeffs="bogus")


def test_clip_matches_torch_rule():
  g = {"a": jnp.full((3,), 2.0), "b": jnp.full((4,), 1.0)}
  clipped, norm = clip_by_global_norm(g, 1.0)
  assert float(norm) == pytest.approx(np.sqrt(12 + 4))
  total = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(clipped)))
  assert total == pytest.approx(1.0, rel=1e-5)
  small, _ = clip_by_global_norm({"a": jnp.full((2,), 0.1)}, 1.0)
  np.testing.assert_allclose(np.asarray(small["a"]), 0.1)


def test_group_summary_counts_everything():
  params = _toy_params(np.random.default_rng(0))
  summ = group_summary(classify(params))
  assert sum(v[1] for v in summ.values()) == sum(x.size for x in jax.tree.leaves(params))


def test_momentum_nesterov_and_weight_decay_exactly(monkeypatch):
  """With NS replaced by the identity, three Muon steps equal the fp32 recurrences exactly:
  Mb <- 0.95 Mb + 0.05 g; U = 0.05 g + 0.95 Mb; P <- P (1 - lr wd) - lr U."""
  monkeypatch.setattr(muon_lib, "orthogonalized_update", lambda u, kind, **kw: u)
  rng = np.random.default_rng(5)
  p = rng.normal(size=(6, 5)).astype(np.float32)
  mb = np.zeros_like(p)
  ref = p.astype(np.float64)
  for lr in (0.02, 0.02 * 0.5, 0.02 * 0.25):
    g = rng.normal(size=p.shape).astype(np.float32)
    upd, mb = muon_lib.muon_leaf_update(jnp.asarray(g), jnp.asarray(mb), jnp.asarray(p),
                                        "linear", lr, momentum=0.95, weight_decay=0.01,
                                        ns_steps=12, ns_coeffs="reference")
    mb = np.asarray(mb)
    p = np.asarray(jnp.asarray(p) + upd)
    if lr == 0.02:
      m_ref = 0.05 * g.astype(np.float64)
    else:
      m_ref = 0.95 * m_ref + 0.05 * g
    u_ref = 0.05 * g + 0.95 * m_ref
    ref = ref * (1 - lr * 0.01) - lr * u_ref
    np.testing.assert_allclose(mb, m_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)
