"""Model numerics against independent transcriptions of ATMA_SPEC §2-§5 (fp32, tiny shapes).

The oracles below are written from the spec with plain jnp and the kernel packages' reference
oracles (`polar_oracle`, `attention_stats_materialized`, `gated_delta_sequential`); they share no
code with `atma_jax.model` except the parameter values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atma_jax.model import loss_sum, soft_cap, token_nll
from atma_jax.model.rope import apply_rope, rope_frequencies
from atma_jax.model.testing import init_model, jit, perturb, tiny_config
from pallas_kernels.gated_delta.reference import gated_delta_sequential
from pallas_kernels.polar_attention.reference import (attention_stats_materialized,
                                                      polar_oracle)

EPS32 = 2.0 ** -23


# ---------------------------------------------------------------------------------------------
# Oracle (spec transcription)


def _lin(p, name, x):
  return x @ p[f"{name}.kernel"] + p[f"{name}.bias"]


def _rms(x, eps=EPS32):
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _causal_conv(x_BTC, w_KC):
  """sum_m w[m] x[t - (K-1) + m], written as explicit shifts."""
  K, T = w_KC.shape[0], x_BTC.shape[1]
  out = jnp.zeros_like(x_BTC)
  for m in range(K):
    lag = K - 1 - m
    shifted = jnp.concatenate([jnp.zeros_like(x_BTC[:, :lag]), x_BTC[:, :T - lag]], axis=1)
    out = out + w_KC[m] * shifted
  return out


def _rope_oracle(x_BTHd):
  """Rotation of spec §5.2 pair by pair (omega_k = 1024^(-k/(d/4-1)), then zeros)."""
  T, d = x_BTHd.shape[1], x_BTHd.shape[-1]
  half, quarter = d // 2, d // 4
  omega = [1024.0 ** (-k / (quarter - 1)) for k in range(quarter)] + [0.0] * quarter
  pos = jnp.arange(T, dtype=jnp.float32)[None, :, None]
  cols_a, cols_b = [], []
  for m in range(half):
    th = pos * omega[m]
    a, b = x_BTHd[..., m], x_BTHd[..., m + half]
    cols_a.append(a * jnp.cos(th) + b * jnp.sin(th))
    cols_b.append(-a * jnp.sin(th) + b * jnp.cos(th))
  return jnp.stack(cols_a + cols_b, axis=-1)


def mixer_oracle(cfg, p, a, x_BTD, mem=True):
  """Global mixer of spec §2.6 / §3 / §4 / §5 on normed input x."""
  B, T, D = x_BTD.shape
  H, G, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  r = H // G
  y = _lin(p, f"{a}.q", x_BTD)
  q = jnp.stack([y[..., h * 2 * d: h * 2 * d + d] for h in range(H)], axis=2)
  gate = jnp.stack([y[..., h * 2 * d + d: (h + 1) * 2 * d] for h in range(H)], axis=2)
  k = _lin(p, f"{a}.k", x_BTD).reshape(B, T, G, d)
  v = _lin(p, f"{a}.v", x_BTD).reshape(B, T, G, d)
  q, k = _rms(q), _rms(k)
  if cfg.attn_type == "rope":
    qa, ka, va = _rope_oracle(q), _rope_oracle(k), v
    qm, km, vm = q, k, v
  else:
    canon = lambda t, n: (t.reshape(B, T, -1) + _causal_conv(
        t.reshape(B, T, -1), p[f"{a}.canon_{n}.kernel"])).reshape(t.shape)
    qa, ka, va = canon(q, "q"), canon(k, "k"), canon(v, "v")
    qm, km, vm = qa, ka, va
  W = cfg.attn_window
  g = jax.nn.sigmoid(gate).reshape(B, T, H * d)
  if cfg.attn_type == "polar":
    c, mag = polar_oracle(qa, ka, va, p[f"{a}.v_null"], p[f"{a}.len_gain_raw"],
                          p[f"{a}.null_base"], p[f"{a}.null_slope_raw"], p[f"{a}.mag_beta_raw"],
                          window=W)
    out = _lin(p, f"{a}.proj", c.reshape(B, T, H * d) * g) + _lin(p, f"{a}.mu_proj", mag)
  else:
    scale = cfg.rope_scale if cfg.attn_type == "rope" else 1 / math.sqrt(d)
    o, _, _ = attention_stats_materialized(qa, ka, va, jnp.full((B, T, H), scale), window=W)
    out = _lin(p, f"{a}.proj", o.reshape(B, T, H * d) * g)
  if cfg.mem_enabled and mem:
    unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    lg = jax.nn.log_sigmoid(_lin(p, f"{a}.mem.w_gamma", x_BTD) + cfg.mem_gamma_bias)
    beta = jax.nn.sigmoid(_lin(p, f"{a}.mem.w_beta", x_BTD) + cfg.mem_beta_bias)
    rd, _ = gated_delta_sequential(unit(qm), unit(jnp.repeat(km, r, axis=2)),
                                   jnp.repeat(vm, r, axis=2), lg, beta)
    gm = jax.nn.sigmoid(_lin(p, f"{a}.mem.gate", x_BTD))
    out = out + _lin(p, f"{a}.mem.proj", _rms(rd).reshape(B, T, H * d) * gm)
  return out


def model_oracle(cfg, p, ids_BT, mem=True):
  """Logits of spec §2.1 (embedding -> pre-norm blocks -> norm -> biased head -> rational cap)."""
  norm = lambda name, x: _rms(x, 1e-6) * p[f"{name}.weight"]
  x = p["embed.embedding"][ids_BT]
  for l in range(cfg.num_layers):
    b = f"blocks.{l}"
    h = norm(f"{b}.norm1", x)
    if cfg.is_global(l):
      x = x + mixer_oracle(cfg, p, f"{b}.attn", h, mem)
    else:
      D = cfg.hidden_size
      y = _lin(p, f"{b}.attn.in_proj", h)
      bg, c, u = y[..., :D], y[..., D:2 * D], y[..., 2 * D:]
      x = x + _lin(p, f"{b}.attn.out_proj", c * _causal_conv(bg * u, p[f"{b}.attn.conv.kernel"]))
    h2 = norm(f"{b}.norm2", x)
    f = _lin(p, f"{b}.mlp.fc", h2)
    half = f.shape[-1] // 2
    x = x + _lin(p, f"{b}.mlp.proj", f[..., half:] * jnp.maximum(f[..., :half], 0) ** 2)
  z = _lin(p, "proj", norm("norm", x))
  return 15 * z / jnp.sqrt(z * z + 225)


def _flat(params):
  return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(params)}


# ---------------------------------------------------------------------------------------------
# Tests


def test_model_matches_spec_oracle():
  """Full 4-layer model (conv, conv, global, conv), polar + memory + window, every parameter
  perturbed, in fp64 end to end: agreement to ~1e-12 leaves no room for a layout slip."""
  with jax.enable_x64(True):
    cfg = tiny_config(num_layers=4, global_every=4, global_offset=2, attn_window=5,
                      param_dtype="float64", compute_dtype="float64", embed_dtype="float64")
    graphdef, params = init_model(cfg, seed=1)
    params = perturb(params, jax.random.key(2))
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)

    @jit
    def both(params):
      model = nnx.merge(graphdef, params)
      h, aux = model(ids)
      return model.logits(h), model_oracle(cfg, _flat(params), ids), aux

    got, want, aux = both(params)
    assert got.dtype == jnp.float64 and want.dtype == jnp.float64
    assert float(jnp.abs(want).max()) > 0.5  # not a trivially small output
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert float(aux["reg"]) == 0.0 and float(aux["align"]) == 0.0


@pytest.mark.parametrize("attn_type, window", [("nope", None), ("rope", 4)])
def test_global_mixer_matches_spec_oracle(attn_type, window):
  """One global block per softmax core (polar is covered by the full-model test above)."""
  cfg = tiny_config(num_layers=1, global_every=1, attn_type=attn_type, attn_window=window)
  graphdef, params = init_model(cfg, seed=4)
  params = perturb(params, jax.random.key(5))
  x = jax.random.normal(jax.random.key(6), (2, 11, cfg.hidden_size))

  @jit
  def both(params):
    mixer = nnx.merge(graphdef, params).blocks[0].attn
    out, _ = mixer(x)
    return out, mixer_oracle(cfg, _flat(params), "blocks.0.attn", x)

  got, want = both(params)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_step0_loss_is_ln_vocab():
  """Reference init zeroes the LM head, so every token costs exactly ln V (spec §10.26)."""
  cfg = tiny_config(vocab_size=50304, compute_dtype="bfloat16", embed_dtype="bfloat16")
  graphdef, params = init_model(cfg, seed=0)
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 50304)
  tgt = jnp.roll(ids, -1, axis=1)

  @jit
  def step0(params):
    model = nnx.merge(graphdef, params)
    h, _ = model(ids)
    return token_nll(model, h, tgt, chunk=3), loss_sum(model, h, tgt)

  nll, total = step0(params)
  assert nll.dtype == jnp.float32
  np.testing.assert_allclose(nll, math.log(50304), rtol=1e-6)
  np.testing.assert_allclose(total, 16 * math.log(50304), rtol=1e-6)


def test_memory_branch_is_exact_noop_at_init():
  """Zero-init mem.proj: h is bit-identical with the branch on and off (both init schemes zero
  mem.proj; they differ only in the LFM2 in_proj, see test_model_params)."""
  cfg = tiny_config(init_scheme="live_mixers")
  graphdef, params = init_model(cfg, seed=7)
  ids = jax.random.randint(jax.random.key(8), (2, 9), 0, cfg.vocab_size)

  @jit
  def on_off(params):
    model = nnx.merge(graphdef, params)
    return model(ids)[0], model(ids, mem=False)[0]

  h_on, h_off = on_off(params)
  np.testing.assert_array_equal(h_on, h_off)
  # the branch is live once its projection is not zero
  h_on, h_off = on_off(perturb(params, jax.random.key(9)))
  assert float(jnp.abs(h_on - h_off).max()) > 1e-3


def test_rope_hand_example():
  """d = 8: frequencies [1, 1/1024, 0, 0]; pairs (x[m], x[m+4]); position 3."""
  np.testing.assert_allclose(rope_frequencies(8), [1.0, 1 / 1024, 0.0, 0.0], rtol=1e-7)
  f128 = np.asarray(rope_frequencies(128))
  np.testing.assert_allclose(f128[:32], 1024.0 ** (-np.arange(32) / 31), rtol=1e-6)
  assert f128[31] == np.float32(1 / 1024) and not f128[32:].any()
  x = jnp.tile(jnp.arange(1.0, 9.0)[None, None, None], (1, 4, 1, 1))  # [1, T=4, 1, 8]
  y = np.asarray(apply_rope(x))[0, 3, 0]
  c0, s0, c1, s1 = math.cos(3), math.sin(3), math.cos(3 / 1024), math.sin(3 / 1024)
  want = [1 * c0 + 5 * s0, 2 * c1 + 6 * s1, 3, 4, -1 * s0 + 5 * c0, -2 * s1 + 6 * c1, 7, 8]
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(apply_rope(x))[0, 0, 0], np.arange(1.0, 9.0))


def test_q_projection_is_interleaved_per_head():
  """Column h*2d + j (j < d) is query dim j of head h; column h*2d + d + j is its gate."""
  cfg = tiny_config(num_layers=1, global_every=1)
  graphdef, params = init_model(cfg, seed=0)
  mixer = nnx.merge(graphdef, params).blocks[0].attn
  H, d, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
  kern = np.zeros((D, 2 * H * d), np.float32)
  kern[0, 1 * 2 * d + 3] = 1.0  # head 1, query dim 3
  kern[0, 2 * 2 * d + d + 5] = 1.0  # head 2, gate dim 5
  mixer.q.kernel.set_value(jnp.asarray(kern))
  mixer.q.bias.set_value(jnp.zeros((2 * H * d,)))
  x = jnp.zeros((1, 1, D)).at[0, 0, 0].set(2.0)
  q, gate, _, _ = mixer.project_qkv(x)
  q, gate = np.asarray(q)[0, 0], np.asarray(gate)[0, 0]
  assert np.count_nonzero(q) == 1 and q[1, 3] > 0  # RMS-normed one-hot: sqrt(d)
  np.testing.assert_allclose(q[1, 3], math.sqrt(d), rtol=1e-5)
  assert np.count_nonzero(gate) == 1 and gate[2, 5] == 2.0  # gate is not normed


def test_token_nll_chunked_equals_unchunked():
  cfg = tiny_config()
  graphdef, params = init_model(cfg, seed=0)
  params = perturb(params, jax.random.key(1))
  h = jax.random.normal(jax.random.key(2), (2, 13, cfg.hidden_size))
  tgt = jax.random.randint(jax.random.key(3), (2, 13), 0, cfg.vocab_size)

  def total(h, chunk):
    model = nnx.merge(graphdef, params)
    return loss_sum(model, h, tgt, chunk)

  full = jit(lambda h: token_nll(nnx.merge(graphdef, params), h, tgt))(h)
  chunked = jit(lambda h: token_nll(nnx.merge(graphdef, params), h, tgt, chunk=4))(h)
  np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-6)
  logits = nnx.merge(graphdef, params).logits(h)
  want = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0]
  np.testing.assert_allclose(full, want, rtol=1e-6, atol=1e-6)
  g_full = jit(jax.grad(lambda h: total(h, None)))(h)
  g_chunk = jit(jax.grad(lambda h: total(h, 5)))(h)
  np.testing.assert_allclose(g_chunk, g_full, rtol=1e-5, atol=1e-6)


def test_soft_cap_is_rational_not_tanh():
  z = jnp.array([-100.0, -15.0, 0.0, 1.0, 15.0, 1e4])
  np.testing.assert_allclose(soft_cap(z), 15 * z / np.sqrt(z ** 2 + 225), rtol=1e-6)
  assert abs(float(soft_cap(jnp.float32(15.0))) - 15 / math.sqrt(2)) < 1e-5
