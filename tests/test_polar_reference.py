"""Polar attention: streaming XLA backend and the api ops vs the materialized oracles.

- streaming `attention_stats` == materialized oracle (fwd + VJP, fp64, every harness case);
- `polar_core` (prologue + op + log-domain epilogue) == `polar_oracle` (spec §3.2), fwd and
  gradients of q, k, v and all five polar parameters, fp64;
- finite parameter gradients under windows, bf16 close to fp32, no T x T buffers, and the
  sharded op (8 fake CPU devices, through the model's ops seam) equal to the unsharded one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from atma_jax import sharding
from atma_jax.model import ops
from pallas_kernels.polar_attention import api, reference, xla_streaming
from tests.polar_cases import CASES, Case, check_backend, fast_jit, random_inputs


def _polar_params(H, D, seed, dtype):
  """v_null, len_gain_raw, null_base, null_slope_raw, mag_beta_raw around their init values."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(x, dtype) for x in (
      rng.standard_normal((H, D)), rng.normal(-1.0, 0.5, H), rng.normal(2.0, 0.5, H),
      rng.normal(0.5, 0.5, H), rng.normal(-1.5, 0.5, H)))


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.slow  # ~2 s of compiles per case on CPU, 14 cases
@pytest.mark.parametrize("case", CASES, ids=str)
def test_streaming_matches_oracle_fp64(case):
  # Blocks of 8 x 16 with odd lengths: multi-block loops, padding and band bounds all run.
  with jax.enable_x64(True):
    kw = dict(block_q=8, block_k=16)
    check_backend(functools.partial(xla_streaming.attention_stats_fwd, **kw),
                  functools.partial(xla_streaming.attention_stats_bwd, **kw),
                  case, jnp.float64, atol=1e-11, rtol=1e-9, seed=CASES.index(case))


@pytest.mark.parametrize("case", [CASES[3], CASES[7], CASES[10]], ids=str)
def test_streaming_matches_oracle_fp32_default_blocks(case):
  check_backend(xla_streaming.attention_stats_fwd, xla_streaming.attention_stats_bwd,
                case, jnp.float32, atol=2e-5, rtol=2e-5, seed=7)


POLAR_CASES = (Case(Tq=33, H=4, G=2), Case(Tq=40, H=4, G=1, window=7),
               Case(Tq=1, Tk=60, q_offset=59, H=4, G=2, window=16),
               Case(Tq=17, Tk=50, q_offset=33, H=2, G=2))


@pytest.mark.parametrize("case", POLAR_CASES, ids=str)
def test_polar_core_matches_spec_oracle_fp64(case):
  with jax.enable_x64(True):
    q, k, v, _ = random_inputs(case, jnp.float64, seed=11)
    args = (q, k, v) + _polar_params(case.H, case.D, 3, jnp.float64)
    kw = dict(window=case.window, q_offset=case.q_offset)
    rng = np.random.default_rng(5)
    cot = (jnp.asarray(rng.standard_normal(q.shape)),
           jnp.asarray(rng.standard_normal(q.shape[:3])))

    def fwd_vjp(fn, args, cot):
      out, vjp = jax.vjp(lambda *a: fn(*a, **kw), *args)
      return out, vjp(cot)

    fwd_vjp = fast_jit(fwd_vjp, static_argnums=(0,))
    got, got_grads = fwd_vjp(functools.partial(api.polar_core, impl="xla"), args, cot)
    want, want_grads = fwd_vjp(reference.polar_oracle, args, cot)
    for g, w in zip(got, want):
      assert _max_rel(g, w) < 1e-12
    names = ("q", "k", "v", "v_null", "len_gain_raw", "null_base", "null_slope_raw",
             "mag_beta_raw")
    for name, g, w in zip(names, got_grads, want_grads):
      assert np.all(np.isfinite(g)), name
      assert _max_rel(g, w) < 1e-10, (name, _max_rel(g, w))


def test_polar_temperature_null_init_values():
  # Spec §3.2: init t = 1 + 0.31326 ln n, nu = 2 + 0.97408 sqrt(ln(n + 1)); window caps n.
  H = 2
  raw = dict(len_gain_raw_H=jnp.full(H, -1.0), null_base_H=jnp.full(H, 2.0),
             null_slope_raw_H=jnp.full(H, 0.5))
  t, nu = reference.polar_temperature_null(*raw.values(), 5, q_offset=2, window=4)
  n = np.minimum(np.arange(3, 8), 4)[:, None]
  np.testing.assert_allclose(t, np.broadcast_to(1 + 0.313262 * np.log(n), (5, H)), rtol=1e-5)
  np.testing.assert_allclose(nu, np.broadcast_to(2 + 0.974077 * np.sqrt(np.log(n + 1)), (5, H)),
                             rtol=1e-5)


def test_no_nan_gradients_with_masked_keys():
  window = 3
  case = Case(Tq=20, H=4, G=1, window=window)
  q, k, v, _ = random_inputs(case, jnp.float32, seed=2)
  params = _polar_params(4, 16, 9, jnp.float32)

  def loss(fn, *a):
    c, mag = fn(*a, window=window)
    return jnp.sum(c * c[::-1]) + jnp.sum(mag)

  for fn in (functools.partial(api.polar_core, impl="xla"), reference.polar_oracle):
    grads = fast_jit(jax.grad(functools.partial(loss, fn), argnums=range(8)))(q, k, v, *params)
    for g in grads:
      assert np.all(np.isfinite(np.asarray(g)))


def test_bf16_runs_and_stays_close_to_fp32():
  case = Case(Tq=48, H=4, G=2, D=32, window=16)
  q, k, v, _ = random_inputs(case, jnp.float32, seed=4)
  params = _polar_params(4, 32, 1, jnp.float32)

  def run(dt):
    f = lambda q, k, v, *p: api.polar_core(q.astype(dt), k.astype(dt), v.astype(dt), *p,
                                           window=case.window, impl="xla")
    (c, mag), vjp = jax.vjp(f, q, k, v, *params)
    grads = vjp((jnp.ones_like(c), jnp.ones_like(mag)))
    return (c, mag) + grads

  run = fast_jit(run, static_argnums=(0,))
  for lo, hi in zip(run(jnp.bfloat16), run(jnp.float32)):
    assert np.all(np.isfinite(np.asarray(lo, np.float32)))
    assert _max_rel(np.asarray(lo, np.float32), hi) < 3e-2


def test_streaming_never_materializes_t_by_t():
  T, H, D = 4096, 1, 16
  q = jax.ShapeDtypeStruct((1, T, H, D), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, T, 1, D), jnp.float32)
  scale = jax.ShapeDtypeStruct((1, T, H), jnp.float32)

  def loss(q, k, v, s):
    o, lse, p2 = api.attention_stats(q, k, v, s, impl="xla")
    return jnp.sum(o) + jnp.sum(lse) + jnp.sum(p2)

  tt_bytes = T * T * 4
  for fn in (lambda *a: api.attention_stats(*a, impl="xla"), jax.grad(loss, argnums=(0, 1, 2, 3))):
    mem = jax.jit(fn).lower(q, kv, kv, scale).compile().memory_analysis()
    assert mem.temp_size_in_bytes < tt_bytes / 8, mem.temp_size_in_bytes


def test_sharded_equals_unsharded():
  devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
  mesh = Mesh(devices, sharding.MESH_AXES)
  for case in (Case(Tq=24, B=4, H=4, G=2, window=8),  # heads split over "tensor"
               Case(Tq=1, Tk=24, q_offset=23, B=1, H=4, G=1)):  # B=1, G=1: replicated
    q, k, v, _ = random_inputs(case, jnp.float32, seed=8)
    params = _polar_params(case.H, case.D, 2, jnp.float32)

    def loss(q, k, v, *p):
      c, mag = ops.polar_core(q, k, v, *p, window=case.window, q_offset=case.q_offset,
                              impl="xla")
      return jnp.sum(c * jnp.cos(c)) + jnp.sum(mag * mag), (c, mag)

    f = jax.value_and_grad(loss, argnums=range(8), has_aux=True)
    (_, want_out), want_grads = fast_jit(f)(q, k, v, *params)
    with sharding.use_mesh(mesh):
      assert "shard_map" in str(jax.make_jaxpr(f)(q, k, v, *params))
      (_, got_out), got_grads = fast_jit(f)(q, k, v, *params)
    for g, w in zip(tuple(got_out) + tuple(got_grads), tuple(want_out) + tuple(want_grads)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5)


def test_softmax_attention_matches_oracle():
  case = Case(Tq=30, H=4, G=2, window=9)
  q, k, v, _ = random_inputs(case, jnp.float32, seed=6)
  got = fast_jit(functools.partial(api.softmax_attention, scale=0.12, window=9))(q, k, v)
  want, _, _ = fast_jit(functools.partial(reference.attention_stats_materialized, window=9))(
      q, k, v, jnp.full((1, 30, 4), 0.12))
  assert got.dtype == q.dtype
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_dispatch_and_input_errors():
  q, k, v, s = random_inputs(Case(Tq=8, H=4, G=2), jnp.float32)
  assert api.select_backend(q, k, v, impl="xla") is xla_streaming
  if jax.default_backend() == "cpu":
    assert api.select_backend(q, k, v, impl="auto") is xla_streaming
    with pytest.raises(ValueError, match="no Pallas Polar attention backend for platform 'cpu'"):
      api.attention_stats(q, k, v, s, impl="pallas")
  with pytest.raises(ValueError, match="impl must be one of"):
    api.attention_stats(q, k, v, s, impl="cuda")
  with pytest.raises(ValueError, match="Tk >= q_offset"):
    api.attention_stats(q, k, v, s, q_offset=3)
  with pytest.raises(ValueError, match="multiple of KV heads"):
    api.attention_stats(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), s)
  with pytest.raises(ValueError, match="window must be"):
    api.attention_stats(q, k, v, s, window=0)
  with pytest.raises(ValueError, match="null_base must be"):
    api.polar_core(q, k, v, *_polar_params(4, 16, 0, jnp.float32)[:2], jnp.zeros(3),
                   *_polar_params(4, 16, 0, jnp.float32)[3:])


def _core_value_and_grad(polar_core, window):
  """f(q_offset, q, k, v, *params) -> ((loss, (c, mag)), grads in q, k, v and the params)."""
  def loss(off, q, k, v, *p):
    c, mag = polar_core(q, k, v, *p, window=window, q_offset=off, impl="xla")
    return jnp.sum(c * jnp.sin(c)) + jnp.sum(mag), (c, mag)
  return jax.value_and_grad(loss, argnums=range(1, 9), has_aux=True)


def _assert_outputs_and_grads_close(got, want, tol):
  (_, got_out), got_g = got
  (_, want_out), want_g = want
  for g, w in zip(tuple(got_out) + got_g, tuple(want_out) + want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)


def test_traced_q_offset_matches_static():
  # Decode / chunked prefill inside a jitted loop passes the offset as a traced int32.
  case = Case(Tq=5, Tk=40, q_offset=35, H=4, G=2, window=16)
  q, k, v, _ = random_inputs(case, jnp.float32, seed=12)
  params = _polar_params(4, 16, 4, jnp.float32)
  f = _core_value_and_grad(api.polar_core, case.window)
  got = fast_jit(f)(jnp.int32(case.q_offset), q, k, v, *params)
  want = fast_jit(functools.partial(f, case.q_offset))(q, k, v, *params)
  _assert_outputs_and_grads_close(got, want, tol=1e-6)


def test_sharded_traced_offset_equals_unsharded():
  # The decode path through the model's ops seam: a traced offset enters the shard_map
  # replicated; heads split over "tensor", the batch over data x fsdp.
  case = Case(Tq=3, Tk=30, q_offset=27, B=4, H=4, G=2, window=9)
  q, k, v, _ = random_inputs(case, jnp.float32, seed=13)
  params = _polar_params(4, 16, 5, jnp.float32)
  f = _core_value_and_grad(ops.polar_core, case.window)
  want = fast_jit(f)(jnp.int32(case.q_offset), q, k, v, *params)
  with sharding.use_mesh(Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)):
    assert "shard_map" in str(jax.make_jaxpr(f)(jnp.int32(case.q_offset), q, k, v, *params))
    got = fast_jit(f)(jnp.int32(case.q_offset), q, k, v, *params)
  _assert_outputs_and_grads_close(got, want, tol=2e-5)
