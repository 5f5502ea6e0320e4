"""Gradients: causality per core, finite forward+grad with every branch, dead LFM2 mixers.

Shapes are tiny and every test compiles one program: XLA compile time dominates on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atma_jax.model import Atma, loss_sum
from atma_jax.model.testing import init_model, jit, perturb, tiny_config

T = 10


def _flat(tree):
  return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(tree)}


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("attn_type", ["polar", "nope", "rope"])
def test_causal_and_finite(attn_type, window):
  """d h_t / d x_s == 0 exactly for s > t, through the core, Canon/RoPE and the memory; the
  jacobian (a forward+grad with and without memory) is finite."""
  cfg = tiny_config(num_layers=1, global_every=1, attn_type=attn_type, attn_window=window)
  graphdef, params = init_model(cfg, seed=0)
  params = perturb(params, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (1, T, cfg.hidden_size))
  u = jax.random.normal(jax.random.key(3), (2, cfg.hidden_size))

  @jit
  def jacobian(params, x):
    def outputs(x):  # [T]: memory on and memory off, both must be causal
      model = nnx.merge(graphdef, params)
      h_on, _ = model.forward_embeddings(x)
      h_off, _ = model.forward_embeddings(x, mem=False)
      return h_on[0] @ u[0] + h_off[0] @ u[1]
    return jax.jacrev(outputs)(x)[:, 0]  # [t, s, D]

  jac = np.asarray(jacobian(params, x))
  assert np.isfinite(jac).all()
  mag_ts = np.abs(jac).max(-1)
  assert not np.triu(mag_ts, 1).any(), "a future input influences an earlier output"
  assert (np.diag(mag_ts) > 0).all() and (np.diag(mag_ts, -1) > 0).all()


@pytest.mark.parametrize("attn_type, dtype", [("polar", "bfloat16"), ("rope", "float32")])
def test_aux_losses_train(attn_type, dtype):
  """Loss + distractor + SigReg with memory and window: finite gradients that reach q, the
  memory gates and (polar) the null / temperature parameters; aux values are positive.
  The polar case runs the canonical bf16 activations / bf16 embedding."""
  cfg = tiny_config(num_layers=1, global_every=1, attn_type=attn_type, attn_window=4,
                    num_random_keys=3, compute_dtype=dtype, embed_dtype=dtype)
  graphdef, params = init_model(cfg, seed=0)
  params = perturb(params, jax.random.key(1))
  ids = jax.random.randint(jax.random.key(4), (2, T), 0, cfg.vocab_size)

  @jit
  def value_and_grad(params):
    def loss(params):
      model = nnx.merge(graphdef, params)
      h, aux = model(ids, rng=jax.random.key(5), sigreg_mode="weak")
      return loss_sum(model, h, jnp.roll(ids, -1, 1)) + aux["reg"] + aux["align"], aux
    return jax.value_and_grad(loss, has_aux=True)(params)

  (total, aux), grads = value_and_grad(params)
  assert np.isfinite(float(total))
  assert float(aux["align"]) > 0 and float(aux["reg"]) > 0
  flat = _flat(grads)
  for name, g in flat.items():
    assert np.isfinite(g).all(), name
  a = "blocks.0.attn"
  for p in ("q.kernel", "k.kernel", "mem.w_gamma.kernel", "mem.w_beta.kernel", "mem.gate.kernel"):
    assert np.abs(flat[f"{a}.{p}"]).max() > 0, p
  if attn_type == "polar":
    for p in ("null_base", "null_slope_raw", "len_gain_raw", "mag_beta_raw", "v_null"):
      assert np.abs(flat[f"{a}.{p}"]).max() > 0, p


def test_reference_init_leaves_lfm2_mixers_dead():
  """Spec §10.1: with in_proj = out_proj = 0 only out_proj.bias ever gets gradient; with
  live_mixers out_proj learns first, then in_proj. Three SGD steps on every parameter (the
  zero LM head blocks all other gradients at step 0)."""
  cfg = tiny_config(num_layers=1, global_every=2, global_offset=1)  # one LFM2 conv block
  graphdef, ref = init_model(cfg, seed=0)
  _, live = init_model(tiny_config(num_layers=1, global_every=2, global_offset=1,
                                   init_scheme="live_mixers"), seed=0)
  ids = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)

  @jit  # the forward does not depend on the init scheme: one program for both
  def grads_over_steps(params):
    def loss(params):
      model = nnx.merge(graphdef, params)
      h, _ = model(ids)
      return loss_sum(model, h, jnp.roll(ids, -1, 1))
    out = []
    for _ in range(3):
      g = jax.grad(loss)(params)
      out.append(g)
      params = jax.tree.map(lambda p, d: p - 0.05 * d, params, g)
    return out

  a = "blocks.0.attn"
  steps = [_flat(g) for g in grads_over_steps(ref)]
  for s, g in enumerate(steps):
    for name in ("in_proj.kernel", "in_proj.bias", "out_proj.kernel"):
      assert not g[f"{a}.{name}"].any(), f"{name} got gradient at step {s} (reference init)"
  assert np.abs(steps[1][f"{a}.out_proj.bias"]).max() > 0
  steps = [_flat(g) for g in grads_over_steps(live)]
  assert np.abs(steps[1][f"{a}.out_proj.kernel"]).max() > 0
  assert not steps[1][f"{a}.in_proj.kernel"].any()  # out_proj was still zero
  assert np.abs(steps[2][f"{a}.in_proj.kernel"]).max() > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_vjp_keeps_the_activation_dtype(dtype):
  """The Linear backward equals autodiff of its forward (fp32 math on the same rounded values),
  and its gradient matmuls take bf16 operands for bf16 activations (no fp32/TF32 GEMM)."""
  from atma_jax.model.layers import linear, stats_dtype
  kx, kw, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (2, 5, 24)).astype(dtype)
  w, b = jax.random.normal(kw, (24, 40)) * 0.2, jax.random.normal(kb, (40,)) * 0.1
  g = jax.random.normal(kg, (2, 5, 40)).astype(dtype)

  def plain(x, w, b):  # JAX's own transpose of the same forward
    acc = stats_dtype(x.dtype)
    y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=acc)
    return (y + b.astype(acc)).astype(x.dtype)

  y, vjp = jax.vjp(linear, x, w, b)
  y_ref, vjp_ref = jax.vjp(plain, x, w, b)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for got, want in zip(vjp(g), vjp_ref(g)):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
  hlo = jax.jit(lambda x, w, b: jax.vjp(linear, x, w, b)[1](g)).lower(x, w, b).as_text()
  dots = [ln for ln in hlo.splitlines() if "dot_general" in ln]
  assert len(dots) == 2
  if dtype == jnp.bfloat16:  # both gradient matmuls read bf16 operands
    assert all(ln.count("bf16>") >= 2 for ln in dots), dots


@pytest.mark.parametrize("shape", [(1, 1, 24), (24,), (1, 24)])
def test_linear_pads_a_single_row_to_a_gemm(monkeypatch, shape):
  """With MIN_GEMM_ROWS = 2 (the default) a one-row input runs as a two-row matmul (the padding
  row sliced off): same values as the unpadded form (MIN_GEMM_ROWS = 1), and the dot in the HLO
  has two rows."""
  from atma_jax.model import layers
  kx, kw, kb = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, shape)
  w, b = jax.random.normal(kw, (24, 40)) * 0.2, jax.random.normal(kb, (40,)) * 0.1
  monkeypatch.setattr(layers, "MIN_GEMM_ROWS", 1)
  want = layers.linear(x, w, b)
  monkeypatch.setattr(layers, "MIN_GEMM_ROWS", 2)
  got = layers.linear(x, w, b)
  assert got.shape == want.shape == shape[:-1] + (40,)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  hlo = jax.jit(layers.linear).lower(x, w, b).as_text()
  assert any("tensor<2x24xf32>" in ln for ln in hlo.splitlines() if "dot_general" in ln), hlo


@pytest.mark.parametrize("min_rows", [1, 2])
def test_linear_takes_an_empty_batch(monkeypatch, min_rows):
  from atma_jax.model import layers
  monkeypatch.setattr(layers, "MIN_GEMM_ROWS", min_rows)
  y = layers.linear(jnp.zeros((0, 3, 24)), jnp.ones((24, 40)), jnp.zeros((40,)))
  assert y.shape == (0, 3, 40)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_capped_nll_matches_autodiff_of_logsumexp(dtype):
  """The fused cap + cross-entropy (no max shift, hand-written backward) equals
  logsumexp(cap(z)) - cap(z)[t] and its autodiff gradient, for logits far beyond the cap."""
  from atma_jax.model import soft_cap
  from atma_jax.model.loss import capped_nll
  kz, kt, kd = jax.random.split(jax.random.key(4), 3)
  z = (jax.random.normal(kz, (2, 5, 300)) * 40.0).astype(dtype)
  t = jax.random.randint(kt, (2, 5), 0, 300)
  dnll = jax.random.normal(kd, (2, 5))

  def plain(z):
    c = soft_cap(z.astype(jnp.float32))
    return jax.nn.logsumexp(c, axis=-1) - jnp.take_along_axis(c, t[..., None], axis=-1)[..., 0]

  nll, vjp = jax.vjp(lambda z: capped_nll(z, t), z)
  nll_ref, vjp_ref = jax.vjp(plain, z)
  np.testing.assert_allclose(nll, nll_ref, rtol=1e-6, atol=1e-5)
  (dz,), (dz_ref,) = vjp(dnll), vjp_ref(dnll)
  assert dz.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(dz, np.float32), np.asarray(dz_ref, np.float32),
                             rtol=tol, atol=tol * float(jnp.max(jnp.abs(dz_ref))))
