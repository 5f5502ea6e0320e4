"""The generation loop on a stand-in model (atma_jax.generate.testing): on-device decode ==
a Python loop of decode steps, ragged batches == each prompt alone, chunked prefill, stop
tokens and done flags, streaming, input errors (CPU, fast)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atma_jax.config import ModelConfig
from atma_jax.generate import GenerateError, Generator, SamplingParams
from atma_jax.generate import testing as fake

V = 64
CFG = dataclasses.replace(ModelConfig(), vocab_size=V)


@pytest.fixture(scope="module")
def gen():
  return Generator(CFG, None, fake.fake_params(V), steps=fake.fake_steps(), prefill_chunk=64)


def prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, V, size=n).tolist() for n in lengths]


def python_loop(prompt, n):
  """Greedy reference: the prompt alone, then one decode call per token from Python."""
  params = fake.fake_params(V)
  cache = fake.init_cache(None, 1, len(prompt) + n)
  logits, cache = fake.prefill(None, params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]),
                               cache)
  out = []
  for _ in range(n):
    tok = int(jnp.argmax(logits[0]))
    out.append(tok)
    logits, cache = fake.decode(None, params, jnp.asarray([tok]), cache)
  return out


def test_device_loop_equals_python_loop(gen):
  p = prompts([9])[0]
  assert gen.generate([p], SamplingParams(max_new_tokens=12)) == [python_loop(p, 12)]


def test_ragged_batch_equals_each_prompt_alone(gen):
  ps = prompts([3, 150, 64, 1], seed=1)  # 150 > the 64-token prefill chunk: three chunks
  sampling = SamplingParams(max_new_tokens=10)
  together = gen.generate(ps, sampling)
  alone = [gen.generate([p], sampling)[0] for p in ps]
  assert together == alone
  assert together == [python_loop(p, 10) for p in ps]
  assert len({tuple(x) for x in together}) > 1  # the rows really differ


def test_stop_tokens_end_rows_and_are_excluded(gen):
  ps = prompts([5, 7, 11], seed=2)
  free = gen.generate(ps, SamplingParams(max_new_tokens=16))
  stop = free[0][3]  # the 4th token of row 0 becomes a stop token
  stopped = gen.generate(ps, SamplingParams(max_new_tokens=16, stop_token_ids=(stop,)))
  for full, cut in zip(free, stopped):
    want = full[:full.index(stop)] if stop in full else full
    assert cut == want
  assert len(stopped[0]) == 3


def test_max_new_tokens_one(gen):
  ps = prompts([4, 6], seed=3)
  assert gen.generate(ps, SamplingParams(max_new_tokens=1)) == [python_loop(p, 1) for p in ps]


def test_stream_blocks_equal_one_block(gen):
  ps = prompts([5, 20], seed=4)
  sampling = SamplingParams(max_new_tokens=11, temperature=1.0, seed=7)
  blocks = list(gen.stream(ps, sampling, block=3))
  assert len(blocks) == 1 + 4  # the prefill token, then ceil(10 / 3) blocks
  joined = [sum((b[i] for b in blocks), []) for i in range(len(ps))]
  assert joined == gen.generate(ps, sampling)
  assert all(len(x) == 11 for x in joined)


def test_sampled_generation_is_seeded(gen):
  ps = prompts([5, 9], seed=5)
  a = gen.generate(ps, SamplingParams(max_new_tokens=20, temperature=1.0, seed=1))
  b = gen.generate(ps, SamplingParams(max_new_tokens=20, temperature=1.0, seed=1))
  c = gen.generate(ps, SamplingParams(max_new_tokens=20, temperature=1.0, seed=2))
  assert a == b and a != c


def test_decode_runs_in_one_dispatch(gen, monkeypatch):
  """The whole decode of `generate` is one call of the jitted block (a while_loop)."""
  calls = []
  real = gen._block
  monkeypatch.setattr(gen, "_block", lambda *a: calls.append(1) or real(*a))
  gen.generate(prompts([6]), SamplingParams(max_new_tokens=9))
  assert len(calls) == 1


def test_lower_decode_block_is_the_block_decode_block_runs(gen):
  """The public lowering (bench/profile_decode.py maps kernels with it) is `decode_block`'s:
  its HLO holds the on-device while loop, and run on a fresh state it gives the same tokens."""
  sampling = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
  ps = prompts([4, 7], seed=3)
  state, _ = gen.start(ps, sampling)
  compiled = gen.lower_decode_block(state, sampling, 8).compile()
  assert "while" in compiled.as_text()
  _, want_BN = gen.decode_block(state, sampling, 8)
  state, _ = gen.start(ps, sampling)
  _, got_BN = compiled(gen.params, state, sampling.max_new_tokens)
  np.testing.assert_array_equal(np.asarray(got_BN), np.asarray(want_BN))


def test_no_recompile_for_a_new_seed_length_or_generator(gen):
  """Seed and max_new_tokens are traced, and Generators of one architecture share the jits."""
  from atma_jax.generate import loop
  ps = prompts([5, 9], seed=6)
  gen.generate(ps, SamplingParams(max_new_tokens=9, temperature=1.0, seed=1))
  sizes = [f._cache_size() for f in (loop._prefill_chunk, loop._begin, loop._block)]
  other = Generator(CFG, None, fake.fake_params(V), steps=fake.fake_steps(), prefill_chunk=64)
  other.generate(ps, SamplingParams(max_new_tokens=30, temperature=1.0, seed=2))
  assert [f._cache_size() for f in (loop._prefill_chunk, loop._begin, loop._block)] == sizes


@pytest.mark.parametrize("ps, kw, message", [
    ([], {}, "no prompts"),
    ([[]], {}, "prompt 0 is empty"),
    ([[1, V]], {}, "outside the vocabulary"),
    ([[1] * 10], dict(max_len=12), "exceeds max_len=12"),
    ([[1]], dict(sampling=SamplingParams(top_p=0.0)), "top_p"),
])
def test_bad_inputs(gen, ps, kw, message):
  sampling = kw.pop("sampling", SamplingParams(max_new_tokens=4))
  with pytest.raises(GenerateError, match=message):
    gen.generate(ps, sampling, **kw)
