"""`atma_jax.eval.forward.Forward` and the probe against direct model calls (tiny model, CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atma_jax.eval.forward import Forward, eval_graphdef, eval_model_config
from atma_jax.eval.testing import tiny_eval_config, tiny_params

V = 50304


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_eval_config()
  _, params = tiny_params(cfg, seed=3)
  return cfg.model, params


@pytest.fixture(scope="module")
def fwd(setup):
  cfg, params = setup
  return Forward(cfg, params, logits_chunk=24, tokens_per_call=128)  # T=64: 2 rows per call


def _direct_logits(cfg, params, ids, mem=True):
  """Oracle: the whole evaluation model on one unpadded sequence, all [T, V] logits."""
  return np.asarray(_oracle(eval_graphdef(eval_model_config(cfg)), params,
                            jnp.asarray([ids], jnp.int32), mem), np.float64)[0]


@jax.jit(static_argnums=(0, 3))
def _oracle(graphdef, params, ids, mem):
  model = nnx.merge(graphdef, params)
  h, _ = model(ids, mem=mem)
  return model.logits(h)


def _nll(logits_TV, targets):
  lse = np.log(np.exp(logits_TV - logits_TV.max(-1, keepdims=True)).sum(-1)) + logits_TV.max(-1)
  return lse - logits_TV[np.arange(len(targets)), targets]


def test_eval_config_removes_window(setup):
  cfg, _ = setup
  assert cfg.attn_window == 32
  assert eval_model_config(cfg).attn_window is None
  assert eval_model_config(dataclasses.replace(cfg, num_random_keys=4)).num_random_keys == 0


def test_token_nll_matches_full_logits(setup, fwd):
  cfg, params = setup
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, 50257, size=(3, 65)).tolist()
  got = fwd.token_nll(seqs)  # 2 calls of 2 rows (the last row repeated), 3 logits chunks
  assert got.shape == (3, 64)
  for s, g in zip(seqs, got):
    want = _nll(_direct_logits(cfg, params, s[:-1]), s[1:])
    np.testing.assert_allclose(g, want, rtol=2e-5, atol=2e-5)


def test_logits_at_padding_and_batching_exact(setup, fwd):
  cfg, params = setup
  rng = np.random.default_rng(1)
  inputs = [rng.integers(0, 50257, size=n).tolist() for n in (40, 64, 64)]
  starts = [7, 59, 30]
  got = fwd.logits_at(inputs, starts, 5, pad_to=64)
  assert got.shape == (3, 5, V)
  for ids, s, g in zip(inputs, starts, got):
    want = _direct_logits(cfg, params, ids)[s:s + 5]
    np.testing.assert_allclose(g, want, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="outside"):
    fwd.logits_at(inputs, [60, 0, 0], 5, pad_to=64)
  with pytest.raises(ValueError, match="shorter than the longest"):
    fwd.logits_at(inputs, starts, 5, pad_to=50)


def test_no_mem_changes_the_output(setup, fwd):
  cfg, params = setup
  gate = params["blocks"][0]["attn"]["mem"]["proj"]["kernel"].get_value()
  assert float(jnp.abs(gate).max()) > 0  # the memory branch writes into the residual
  seq = np.random.default_rng(2).integers(0, 50257, size=(2, 65)).tolist()
  with_mem = fwd.token_nll(seq)
  without = Forward(cfg, params, mem=False, logits_chunk=24, tokens_per_call=128).token_nll(seq)
  assert np.abs(with_mem - without).max() > 1e-3
  want = _nll(_direct_logits(cfg, params, seq[0][:-1], mem=False), seq[0][1:])
  np.testing.assert_allclose(without[0], want, rtol=2e-5, atol=2e-5)


def test_probe_block_by_block(setup, fwd, monkeypatch):
  from atma_jax.eval import probe
  from atma_jax.model import attention, ops

  cfg, params = setup
  seq = np.random.default_rng(4).integers(0, 50257, size=(2, 48))
  stats, h = probe.probe_fn(fwd)(params, jnp.asarray(seq, jnp.int32))
  # Oracle: the statistics of the inputs the model itself hands to polar_core (eager run).
  seen = []

  def spy(*args, **kw):
    st = ops.polar_stats(*args, **kw)
    seen.append({k: np.asarray(st[k]).mean(axis=(0, 1)) for k in probe.STATS})
    return ops.polar_core(*args, **kw)

  monkeypatch.setattr(attention, "polar_core", spy)
  model = nnx.merge(fwd.graphdef, params)
  h_model = model(jnp.asarray(seq, jnp.int32))[0]
  monkeypatch.undo()
  np.testing.assert_allclose(np.asarray(h), np.asarray(h_model), rtol=1e-5, atol=1e-5)
  assert list(stats) == ["0"] and len(seen) == 1
  H = cfg.num_heads
  s = {k: np.asarray(v) for k, v in stats["0"].items()}
  for k in probe.STATS:
    assert s[k].shape == (H,)
    np.testing.assert_allclose(s[k], seen[0][k], rtol=1e-5, atol=1e-6)
  assert np.all(s["n_eff"] >= 1.0) and np.all(s["n_eff"] <= 48.0)
  assert np.all((s["w_null"] > 0) & (s["w_null"] < 1)) and np.all((s["mag"] >= 0) & (s["mag"] < 1))
  rep = probe.polar_probe(fwd, seq.tolist(), [16, 48])
  assert rep["48"]["0"]["n_eff"] == pytest.approx(float(s["n_eff"].mean()), rel=1e-5)
  assert rep["16"]["0"]["n_eff"] < rep["48"]["0"]["n_eff"]
  assert len(rep["16"]["0"]["per_head"]["mag"]) == H


def test_loss_by_length_scores_each_document_after_one_eot(setup, fwd):
  """The clean-NLL path (`suite.loss_by_length`) equals one direct forward per document:
  input `[EOT] + doc[:L-1]`, targets `doc[:L]`, mean NLL over all of them (issue #12 audit: a
  shifted target or a dropped EOT would move this by far more than the tolerance)."""
  from atma_jax.eval import suite

  cfg, params = setup
  eot = 50256
  docs = np.random.default_rng(1).integers(0, 50256, size=(2, 64)).tolist()
  table, nll_ND = suite.loss_by_length(fwd, docs, [32, 64], eot, lambda ids: 4 * len(ids))
  for length in (32, 64):
    want = [_nll(_direct_logits(cfg, params, [eot] + d[:length - 1]), d[:length]) for d in docs]
    np.testing.assert_allclose(table[str(length)]["nll"], np.mean(want), rtol=1e-5)
    assert table[str(length)]["tokens"] == 2 * length
  np.testing.assert_allclose(nll_ND, want, rtol=2e-5, atol=2e-5)
  compiled = fwd._nll._cache_size()
  table, _ = suite.loss_by_length(fwd, docs, [16, 24, 40, 64], eot, len)
  assert fwd._nll._cache_size() == compiled  # every length runs the padded 64-token program
  for length in (24, 40):  # padding that starts inside a memory chunk (mem_chunk=16)
    want = [_nll(_direct_logits(cfg, params, [eot] + d[:length - 1]), d[:length]) for d in docs]
    np.testing.assert_allclose(table[str(length)]["nll"], np.mean(want), rtol=1e-5)
  with pytest.raises(ValueError, match="pad_to=8 is shorter"):
    fwd.token_nll(docs, pad_to=8)
