"""A tiny stand-in for the model's decode steps, for testing the loop and the sampler.

`fake_steps()` has the signatures of `atma_jax.model.cache.init_cache` and
`atma_jax.generate.steps.{prefill, decode}` over a small recurrent model that depends on every
token and its absolute position:

  h <- tanh(0.8 h + E[token] + 0.05 position)     (only for real tokens: t < length)
  logits = 4 h W

so a padding token or a wrong position changes every later logit (the ragged-batch and
continuation tests can fail). Parameters: `fake_params(vocab, seed)`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from atma_jax.generate.loop import Steps


class FakeCache(NamedTuple):
  positions: jax.Array  # int32 [B], tokens consumed
  h_BW: jax.Array  # fp32 [B, W]


WIDTH = 16


def fake_params(vocab: int = 64, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"embed": jnp.asarray(rng.normal(size=(vocab, WIDTH)), jnp.float32),
          "out": jnp.asarray(rng.normal(size=(WIDTH, vocab)) / np.sqrt(WIDTH), jnp.float32)}


def _update(params, h_BW, pos_B, tok_B, live_B):
  new_BW = jnp.tanh(0.8 * h_BW + params["embed"][tok_B] + 0.05 * pos_B[:, None])
  return jnp.where(live_B[:, None], new_BW, h_BW), pos_B + live_B.astype(jnp.int32)


def _logits(params, h_BW):
  return 4.0 * h_BW @ params["out"]


def init_cache(cfg, batch_size: int, max_len: int) -> FakeCache:
  del cfg, max_len
  return FakeCache(jnp.zeros((batch_size,), jnp.int32),
                   jnp.zeros((batch_size, WIDTH), jnp.float32))


def prefill(graphdef, params, ids_BT, lengths_B, cache):
  del graphdef

  def step(carry, t_and_ids):
    h_BW, pos_B = carry
    t, tok_B = t_and_ids
    return _update(params, h_BW, pos_B, tok_B, t < lengths_B), None

  T = ids_BT.shape[1]
  (h_BW, pos_B), _ = jax.lax.scan(step, (cache.h_BW, cache.positions),
                                  (jnp.arange(T), ids_BT.T))
  return _logits(params, h_BW), FakeCache(pos_B, h_BW)


def decode(graphdef, params, tokens_B, cache):
  del graphdef
  h_BW, pos_B = _update(params, cache.h_BW, cache.positions, tokens_B,
                        jnp.ones(tokens_B.shape, bool))
  return _logits(params, h_BW), FakeCache(pos_B, h_BW)


def fake_steps() -> Steps:
  return Steps(init_cache, prefill, decode)
