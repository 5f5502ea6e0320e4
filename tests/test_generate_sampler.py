"""The sampler: greedy == argmax, seeded determinism, top-k / top-p support, stop rules (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atma_jax.generate.sampler import (SamplingError, SamplingParams, next_done, sample,
                                       top_k_mask, top_p_mask)

V = 40


def logits(B=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, V)) * 2.0, jnp.float32)


def draws(row_V, params, n=4000, seed=0):
  """n independent draws from one row of logits."""
  tiled = jnp.broadcast_to(row_V, (n, V))
  return np.asarray(jax.jit(sample, static_argnums=2)(tiled, jax.random.PRNGKey(seed), params))


def test_greedy_is_argmax():
  z = logits(5)
  out = sample(z, jax.random.PRNGKey(0), SamplingParams(temperature=0.0))
  np.testing.assert_array_equal(out, np.argmax(np.asarray(z), -1))
  assert out.dtype == jnp.int32


def test_seeded_sampling_is_deterministic_and_seed_dependent():
  p = SamplingParams(temperature=1.0)
  a = draws(logits(1)[0], p, seed=3)
  b = draws(logits(1)[0], p, seed=3)
  c = draws(logits(1)[0], p, seed=4)
  np.testing.assert_array_equal(a, b)
  assert (a != c).mean() > 0.3


def test_temperature_one_matches_softmax():
  z = logits(1)[0]
  counts = np.bincount(draws(z, SamplingParams(temperature=1.0), n=20000), minlength=V)
  probs = np.asarray(jax.nn.softmax(z))
  np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.015)


def test_top_k_restricts_support_to_the_k_largest():
  z = logits(1)[0]
  k = 5
  got = set(draws(z, SamplingParams(temperature=2.0, top_k=k)).tolist())
  top = set(np.argsort(-np.asarray(z))[:k].tolist())
  assert got == top  # every one of the k drawn (temperature 2 flattens), nothing else
  masked = np.asarray(top_k_mask(z[None], k))[0]
  assert np.isfinite(masked).sum() == k


def test_top_p_keeps_the_nucleus_and_renormalizes():
  z = logits(1, seed=1)[0]
  p = 0.7
  probs = np.asarray(jax.nn.softmax(z))
  order = np.argsort(-probs)
  before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[before < p]
  assert 1 < len(nucleus) < V
  counts = np.bincount(draws(z, SamplingParams(temperature=1.0, top_p=p), n=20000),
                       minlength=V)
  assert set(np.flatnonzero(counts).tolist()) == set(nucleus.tolist())
  want = np.zeros(V)
  want[nucleus] = probs[nucleus] / probs[nucleus].sum()
  np.testing.assert_allclose(counts / counts.sum(), want, atol=0.015)
  # a tiny top_p still keeps the most likely token
  masked = np.asarray(top_p_mask(z[None], 1e-6))[0]
  assert np.flatnonzero(np.isfinite(masked)).tolist() == [int(order[0])]


def test_top_k_and_top_p_compose():
  z = logits(1, seed=2)[0]
  got = set(draws(z, SamplingParams(temperature=1.0, top_k=3, top_p=0.999)).tolist())
  assert got <= set(np.argsort(-np.asarray(z))[:3].tolist())


def test_vocab_limit_excludes_high_ids():
  z = jnp.zeros((2, V)).at[:, V - 1].set(10.0)
  assert sample(z, jax.random.PRNGKey(0), SamplingParams()).tolist() == [V - 1, V - 1]
  limited = SamplingParams(vocab_limit=V - 5)
  assert max(sample(z, jax.random.PRNGKey(0), limited).tolist()) < V - 5
  assert draws(z[0], SamplingParams(temperature=1.0, vocab_limit=V - 5)).max() < V - 5


def test_done_flags():
  p = SamplingParams(stop_token_ids=(7, 9), max_new_tokens=3)
  done = next_done(jnp.array([False, False, True, False]), jnp.array([7, 1, 2, 9]),
                   jnp.array([1, 1, 1, 1]), p)
  assert done.tolist() == [True, False, True, True]
  done = next_done(jnp.zeros(2, bool), jnp.array([1, 2]), jnp.array([2, 3]), p)
  assert done.tolist() == [False, True]
  no_stop = next_done(jnp.zeros(2, bool), jnp.array([7, 9]), jnp.array([1, 1]),
                      SamplingParams(max_new_tokens=3))
  assert no_stop.tolist() == [False, False]


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=V + 1), "exceeds the vocabulary"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-1), "seed"),
    (dict(stop_token_ids=(V,)), "stop token ids"),
])
def test_bad_settings(kw, message):
  with pytest.raises(SamplingError, match=message):
    SamplingParams(**kw).validate(V)
