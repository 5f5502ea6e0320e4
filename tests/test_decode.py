"""Prefill / decode over the decode cache equal the full forward (issue 11).

Tiny fp32 models (kernel_impl="xla"), memory chunk 4 and window 5, so the sequences cross
memory-chunk boundaries and wrap the window's ring buffer.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from atma_jax.generate import (CacheError, cache_shardings, decode, init_cache, jit_decode,
                               jit_prefill, prefill, reset_rows)
from atma_jax.model import param_partition_specs
from atma_jax.model.testing import init_model, jit, perturb, tiny_config
from atma_jax.sharding import use_mesh

T = 12  # tokens per sequence: 3 memory chunks of 4, the window-5 ring wraps twice
MAX_LEN = 16
TOL = 1e-5


def _setup(**overrides):
  cfg = tiny_config(kernel_impl="xla", mem_chunk=4, **overrides)
  graphdef, params = init_model(cfg)
  params = perturb(params, jax.random.key(1))  # zero-init branches (memory proj) come alive
  return cfg, graphdef, params


def _full_logits(graphdef, params, ids_BT):
  """Ground truth: the whole-sequence forward's capped logits [B, T, V]."""

  @jit
  def run(params, ids):
    model = nnx.merge(graphdef, params)
    h, _ = model(ids)
    return model.logits(h)

  return np.asarray(run(params, ids_BT))


def _steps(graphdef):
  return (jit(lambda p, ids, n, c: prefill(graphdef, p, ids, n, c)),
          jit(lambda p, tok, c: decode(graphdef, p, tok, c)))


VARIANTS = list(itertools.product(("polar", "nope", "rope"), (True, False), (None, 5)))


@pytest.mark.parametrize("attn_type,mem,window", VARIANTS,
                         ids=[f"{a}-{'mem' if m else 'nomem'}-w{w}" for a, m, w in VARIANTS])
def test_ragged_prefill_then_decode_matches_full_forward(attn_type, mem, window):
  """Rows of lengths 6 and 3 prefilled together, then decoded token by token: every logit
  equals the full forward's at the same position (each row at its own positions)."""
  cfg, graphdef, params = _setup(attn_type=attn_type, mem_enabled=mem, attn_window=window)
  ids = jax.random.randint(jax.random.key(2), (2, T), 0, cfg.vocab_size)
  want = _full_logits(graphdef, params, ids)
  run_prefill, run_decode = _steps(graphdef)
  lengths = np.array([6, 3])
  prompt = jnp.where(jnp.arange(6)[None, :] < lengths[:, None], ids[:, :6], 0)
  logits, cache = run_prefill(params, prompt, jnp.asarray(lengths), init_cache(cfg, 2, MAX_LEN))
  np.testing.assert_allclose(logits, want[[0, 1], lengths - 1], atol=TOL, rtol=TOL)
  pos = lengths.copy()
  for _ in range(T - 6):
    logits, cache = run_decode(params, ids[jnp.arange(2), pos], cache)
    np.testing.assert_allclose(logits, want[[0, 1], pos], atol=TOL, rtol=TOL,
                               err_msg=f"positions {pos}")
    pos += 1
  np.testing.assert_array_equal(cache.positions, pos)


@pytest.mark.parametrize("attn_type,window", [("polar", 5), ("rope", None)])
def test_chunked_prefill_equals_one_prefill(attn_type, window):
  """Prefill in chunks: all rows fresh, then at different positions, then at the same position
  with one row idle (the three forms of `kv_cache.attend_cached`), then decode: the same logits
  and cache as one prefill of each whole prompt."""
  cfg, graphdef, params = _setup(attn_type=attn_type, attn_window=window)
  ids = jax.random.randint(jax.random.key(3), (2, T), 0, cfg.vocab_size)
  want = _full_logits(graphdef, params, ids)
  run_prefill, run_decode = _steps(graphdef)
  cache = init_cache(cfg, 2, MAX_LEN)
  chunks = ((4, 4), (3, 1), (2, 0))  # starts (0, 0), (4, 4), (7, 5); 9 and 5 tokens
  done = np.zeros(2, int)
  for n in chunks:
    n = np.array(n)
    take = np.minimum(done[:, None] + np.arange(5)[None, :], T - 1)
    chunk = jnp.where(np.arange(5)[None, :] < n[:, None], ids[np.arange(2)[:, None], take], 0)
    logits, cache = run_prefill(params, chunk, jnp.asarray(n), cache)
    done += n
    for b in np.flatnonzero(n):
      np.testing.assert_allclose(logits[b], want[b, done[b] - 1], atol=TOL, rtol=TOL)
  one_logits, one_cache = run_prefill(
      params, jnp.where(np.arange(9)[None, :] < done[:, None], ids[:, :9], 0), jnp.asarray(done),
      init_cache(cfg, 2, MAX_LEN))
  np.testing.assert_allclose(logits[0], one_logits[0], atol=TOL, rtol=TOL)
  for got, ref in zip(jax.tree.leaves(cache), jax.tree.leaves(one_cache)):
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=TOL)
  logits, cache = run_decode(params, ids[np.arange(2), done], cache)
  np.testing.assert_allclose(logits, want[[0, 1], done], atol=TOL, rtol=TOL)


def test_ragged_rows_equal_each_prompt_alone():
  """A batch row gives what its prompt alone gives; a length-0 row leaves its state as is; a
  row emptied by `reset_rows` takes a new prompt as if fresh."""
  cfg, graphdef, params = _setup()
  ids = jax.random.randint(jax.random.key(4), (3, 7), 0, cfg.vocab_size)
  lengths = jnp.array([7, 2, 0])
  run_prefill, run_decode = _steps(graphdef)
  empty = init_cache(cfg, 3, MAX_LEN)
  batch_logits, batch_cache = run_prefill(params, ids, lengths, empty)
  for b in (0, 1):  # the same prompt with the other rows empty: no cross-row leakage
    alone = jnp.zeros(3, jnp.int32).at[b].set(lengths[b])
    alone_logits, alone_cache = run_prefill(params, ids, alone, empty)
    np.testing.assert_allclose(batch_logits[b], alone_logits[b], atol=TOL, rtol=TOL)
    for got, ref in zip(jax.tree.leaves(batch_cache), jax.tree.leaves(alone_cache)):
      np.testing.assert_allclose(got[b], ref[b], atol=TOL, rtol=TOL)
  for got, ref in zip(jax.tree.leaves(batch_cache), jax.tree.leaves(empty)):
    np.testing.assert_array_equal(got[2], ref[2])
  # a reset row takes a new prompt as if fresh; the other rows keep their state
  reset = reset_rows(batch_cache, jnp.array([True, False, False]))
  again_logits, again_cache = run_prefill(params, ids, jnp.array([7, 0, 0]), reset)
  np.testing.assert_allclose(again_logits[0], batch_logits[0], atol=TOL, rtol=TOL)
  for got, ref in zip(jax.tree.leaves(again_cache), jax.tree.leaves(batch_cache)):
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("attn_type,window", [("polar", None), ("rope", 5)])
def test_decode_attn_kernel_matches_full_forward(attn_type, window):
  """model.decode_attn_kernel=True: one-token decode of rows at one position (batch 1; batch 2
  prefilled alike) runs the attention op at a traced offset, ragged rows the per-position form
  (lax.cond): every logit equals the full forward's."""
  cfg, graphdef, params = _setup(attn_type=attn_type, attn_window=window,
                                 decode_attn_kernel=True)
  ids = jax.random.randint(jax.random.key(6), (2, T), 0, cfg.vocab_size)
  want = _full_logits(graphdef, params, ids)
  run_prefill, run_decode = _steps(graphdef)
  for rows, lengths in (([0], [4]), ([0, 1], [5, 5]), ([0, 1], [6, 3])):
    rows, pos = np.array(rows), np.array(lengths)
    prompt = jnp.where(jnp.arange(6)[None, :] < pos[:, None], ids[rows, :6], 0)
    _, cache = run_prefill(params, prompt, jnp.asarray(pos), init_cache(cfg, len(rows), MAX_LEN))
    for _ in range(T - 6):
      logits, cache = run_decode(params, ids[rows, pos], cache)
      np.testing.assert_allclose(logits, want[rows, pos], atol=TOL, rtol=TOL,
                                 err_msg=f"rows {rows} at positions {pos}")
      pos += 1


def test_decode_attn_kernel_routes_uniform_rows_to_the_kernel_op():
  """`attend_cached(uniform_kernel=True)` on one token: batch 1 traces only the kernel op (at a
  traced offset, over the written full cache); a batch traces both behind a lax.cond; off, only
  the per-position op."""
  from atma_jax.model.cache import TokenSpan
  from atma_jax.model.kv_cache import attend_cached

  def traced(B, uniform_kernel):
    calls = []
    core = lambda q, k, v, off: calls.append(("core", k.shape[1], off.shape)) or q
    core_at = lambda q, k, v, qp, kp: calls.append(("core_at",)) or q
    x = jnp.zeros((B, 1, 2, 4))
    cache = jnp.zeros((B, MAX_LEN, 2, 4))
    span = TokenSpan(starts_B=jnp.full((B,), 3, jnp.int32), lengths_B=None)
    jax.make_jaxpr(lambda: attend_cached(x, x, x, cache, cache, span, None, core=core,
                                         core_at=core_at, uniform_kernel=uniform_kernel))()
    return calls

  assert traced(1, True) == [("core", MAX_LEN, ())]
  assert sorted(traced(2, True)) == [("core", MAX_LEN, ()), ("core_at",)]
  assert traced(1, False) == traced(2, False) == [("core_at",)]


def test_sharded_decode_matches_unsharded():
  cfg, graphdef, params = _setup(attn_window=5)
  ids = jax.random.randint(jax.random.key(5), (4, 8), 0, cfg.vocab_size)
  lengths = jnp.array([8, 5, 6, 1])

  def run(params, cache, mesh=None):
    logits, cache = jit_prefill(graphdef, mesh=mesh)(params, ids, lengths, cache)
    step = jit_decode(graphdef, mesh=mesh)
    out = [logits]
    for t in range(3):
      logits, cache = step(params, ids[:, t], cache)
      out.append(logits)
    return np.stack(out), cache

  want, want_cache = run(params, init_cache(cfg, 4, MAX_LEN))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  with use_mesh(mesh):
    specs = param_partition_specs(params)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.to_pure_dict(specs))
    placed = nnx.State(params)
    nnx.replace_by_pure_dict(placed, jax.device_put(nnx.to_pure_dict(params), shardings))
  cache = init_cache(cfg, 4, MAX_LEN)
  cache = jax.device_put(cache, cache_shardings(cache, mesh))
  got, got_cache = run(placed, cache, mesh)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  k = got_cache.layers[0].k_BSGd
  assert k.sharding.spec[0] == ("data", "fsdp")
  mem = got_cache.layers[0].mem_BHKV
  assert mem.sharding.spec[:2] == (("data", "fsdp"), "tensor")


def test_bad_inputs_raise_before_compute():
  cfg, graphdef, params = _setup()
  ids = jnp.zeros((2, 9), jnp.int32)
  with pytest.raises(CacheError, match="max_len=8"):
    prefill(graphdef, params, ids, jnp.array([9, 9]), init_cache(cfg, 2, 8))
  cache = init_cache(cfg, 2, 16).replace(positions=jnp.array([10, 0], jnp.int32))
  with pytest.raises(CacheError, match="row 0 would reach position 19"):
    prefill(graphdef, params, ids, jnp.array([9, 3]), cache)
  with pytest.raises(CacheError, match="lengths must be in"):
    prefill(graphdef, params, ids, jnp.array([10, 3]), init_cache(cfg, 2, 16))
  other = tiny_config(kernel_impl="xla", attn_type="rope")
  with pytest.raises(CacheError, match="does not fit this model"):
    decode(graphdef, params, jnp.zeros((2,), jnp.int32), init_cache(other, 2, 16))
  with pytest.raises(CacheError, match="the cache holds 3 sequences"):
    decode(graphdef, params, jnp.zeros((2,), jnp.int32), init_cache(cfg, 3, 16))
  wide = tiny_config(kernel_impl="xla", hidden_size=64)
  with pytest.raises(CacheError, match="does not fit this model"):
    decode(graphdef, params, jnp.zeros((2,), jnp.int32), init_cache(wide, 2, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,window,tol,attn_kernel", [
    ("float32", None, 2e-3, False), ("float32", 24, 2e-3, False), ("bfloat16", None, 0.1, False),
    ("float32", None, 2e-3, True), ("float32", 24, 2e-3, True)])
def test_gpu_kernels_prefill_and_decode_match_full_forward(dtype, window, tol, attn_kernel):
  """kernel_impl="auto" on a GPU: the fresh and same-start prefill forms run the Pallas kernels
  (head_dim 16, memory chunk 16), ragged starts the XLA path, decode the fused gated-delta step
  kernel and (model.decode_attn_kernel) the attention kernel op once the rows line up; all
  match the full forward (fp32: TF32-level dots; bf16: activation rounding)."""
  cfg = tiny_config(kernel_impl="auto", hidden_size=64, head_dim=16, mem_chunk=16,
                    attn_window=window, compute_dtype=dtype, decode_attn_kernel=attn_kernel,
                    mem_step_impl=None)  # the step follows kernel_impl (default "xla": opt-in)
  graphdef, params = init_model(cfg)
  params = perturb(params, jax.random.key(1))
  n = 56
  ids = jax.random.randint(jax.random.key(2), (2, n), 0, cfg.vocab_size)
  want = _full_logits(graphdef, params, ids)
  run_prefill, run_decode = _steps(graphdef)
  cache = init_cache(cfg, 2, 64)
  done = np.zeros(2, int)
  for lengths in ((20, 20), (17, 9), (3, 11)):  # fresh, same start, ragged starts; then the
    # rows line up (40, 40) for decode
    lengths = np.array(lengths)
    take = np.minimum(done[:, None] + np.arange(20)[None, :], n - 1)
    logits, cache = run_prefill(params, ids[np.arange(2)[:, None], take], jnp.asarray(lengths),
                                cache)
    done += lengths
    np.testing.assert_allclose(logits, want[[0, 1], done - 1], atol=tol, rtol=0)
  for _ in range(6):
    logits, cache = run_decode(params, ids[np.arange(2), done], cache)
    np.testing.assert_allclose(logits, want[[0, 1], done], atol=tol, rtol=0)
    done += 1


@pytest.mark.parametrize("B", [1, 3])
def test_one_row_attention_folded_over_kv_heads_equals_per_head(B):
  """`attention_stats_at` for one query row: the cache read as [B, S, G*D] (query block-diagonal
  over the KV heads) gives the per-head form's statistics; only one query row can fold."""
  from pallas_kernels.polar_attention import attention_stats_at
  S, H, G, D = 9, 4, 2, 8
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (B, 1, H, D))
  k, v = (jax.random.normal(kk, (B, S, G, D)) for kk in ks[1:])
  scale = jnp.full((B, 1, H), 0.3)
  q_pos = jnp.arange(B, dtype=jnp.int32)[:, None] + 5  # rows at positions 5, 6, 7
  k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  run = lambda fold: attention_stats_at(q, k, v, scale, q_pos, k_pos, window=4, fold_gqa=fold)
  for got, want in zip(run(True), run(False), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="one query row"):
    attention_stats_at(jnp.concatenate([q, q], 1), k, v, jnp.concatenate([scale, scale], 1),
                       jnp.concatenate([q_pos, q_pos + 1], 1), k_pos, fold_gqa=True)


def test_sharded_decode_folds_gqa_without_gathering_the_cache(monkeypatch):
  """On a tensor-sharded mesh the one-row GQA-folded attention (the default at B > 1) runs per
  shard: the decode step has exactly the collectives of the per-head form (under GSPMD alone
  the folded products gathered the head-sharded K/V cache on every device, every step)."""
  import re

  import pallas_kernels.polar_attention as pa
  from atma_jax.generate.steps import decode

  cfg, graphdef, params = _setup(attn_window=5)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  cache = init_cache(cfg, 8, MAX_LEN)  # 2 rows per data x fsdp shard: the folded form
  cache = jax.device_put(cache, cache_shardings(cache, mesh))
  tokens = jnp.zeros((8,), jnp.int32)
  original = pa.attention_stats_at
  calls = []

  def collectives(fold_gqa):
    def stats_at(*args, **kwargs):  # the op as the model's ops seam calls it, per shard
      calls.append(args[0].shape)
      return original(*args, fold_gqa=fold_gqa, **kwargs)

    monkeypatch.setattr(pa, "attention_stats_at", stats_at)
    with use_mesh(mesh):
      text = jax.jit(lambda p, t, c: decode(graphdef, p, t, c)).lower(
          params, tokens, cache).compile().as_text()
    return sorted(re.findall(r"= (\S+) (all-gather|all-to-all|all-reduce|collective-permute)"
                             r"(?:-start)?\(", text))

  folded = collectives(None)
  assert calls and calls[0] == (2, 1, 2, 8)  # this shard's 2 rows and 2 of the 4 query heads
  assert folded == collectives(False)
