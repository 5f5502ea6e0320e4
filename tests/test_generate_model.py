"""Generation through the real model's caches (tiny Polar + memory model, CPU, fp32): greedy
tokens follow the full forward's argmax, ragged batches equal each prompt alone, the on-device
loop equals a Python loop of decode steps, and eval's retrieval_gen runs end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atma_jax.eval.forward import Forward, eval_graphdef, eval_model_config
from atma_jax.eval.testing import tiny_eval_config, tiny_params
from atma_jax.generate import Generator, SamplingParams, generate

# One cache length and number of new tokens for every call: the tests share their compiles.
MAX_LEN = 192
GREEDY = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_eval_config()  # mem_chunk 16: prompts below cross memory-chunk boundaries
  _, params = tiny_params(cfg, seed=3)
  model_cfg = eval_model_config(cfg.model)
  return model_cfg, params


@pytest.fixture(scope="module")
def gen(setup):
  model_cfg, params = setup
  return Generator(model_cfg, eval_graphdef(model_cfg), params, prefill_chunk=64)


def prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 50257, size=n).tolist() for n in lengths]


def test_greedy_tokens_follow_the_full_forward(setup, gen):
  """Each generated token is the argmax of the full (cache-free) forward over prompt +
  the tokens before it: decode == forward, through chunked prefill of a ragged batch."""
  model_cfg, params = setup
  fwd = Forward(model_cfg, params)
  ps = prompts([5, 70, 131], seed=1)  # 70, 131 > the 64-token prefill chunk
  out = gen.generate(ps, GREEDY, max_len=MAX_LEN)
  assert all(len(x) == 6 for x in out)
  inputs = [p + x[:-1] for p, x in zip(ps, out)]
  logits = fwd.logits_at(inputs, [len(p) - 1 for p in ps], 6)  # [N, 6, V]
  for n, toks in enumerate(out):
    for i, t in enumerate(toks):
      assert logits[n, i, t] >= logits[n, i].max() - 1e-4, (n, i)


def test_ragged_batch_equals_each_prompt_alone(gen):
  ps = prompts([3, 90, 17], seed=2)
  together = generate(gen, ps, GREEDY, max_len=MAX_LEN)  # the public function
  assert together == [gen.generate([p], GREEDY, max_len=MAX_LEN)[0] for p in ps]


def test_device_loop_equals_python_loop(setup, gen):
  from atma_jax.generate import steps
  from atma_jax.model.cache import init_cache

  model_cfg, params = setup
  graphdef = eval_graphdef(model_cfg)
  p = prompts([40], seed=4)[0]
  cache = init_cache(model_cfg, 1, MAX_LEN)
  logits, cache = jax.jit(steps.prefill, static_argnums=0)(
      graphdef, params, jnp.asarray([p]), jnp.asarray([len(p)]), cache)
  decode = jax.jit(steps.decode, static_argnums=0)
  want = []
  for _ in range(GREEDY.max_new_tokens):
    want.append(int(jnp.argmax(logits[0])))
    logits, cache = decode(graphdef, params, jnp.asarray([want[-1]]), cache)
  assert gen.generate([p], GREEDY, max_len=MAX_LEN) == [want]


def test_eval_retrieval_gen_end_to_end(tiny_run_dir, tmp_path, capsys):
  from atma_jax.eval import cli

  out = tmp_path / "eval"
  assert cli.main(["--checkpoint", str(tiny_run_dir), "--lengths", "64", "--depths", "0.5",
                   "--trials", "2", "--docs", "2", "--tasks", "retrieval", "--generate",
                   "--out", str(out), "--no-progress", "--tokens-per-call", "256"]) == 0
  report = json.loads((out / "report.json").read_text())
  for name in ("passkey_synthetic", "passkey_code", "niah_synthetic", "niah_code"):
    gen_cell = report["retrieval_generated"][name]["64"]["0.5"]
    tf_cell = report["retrieval"][name]["64"]["0.5"]
    assert gen_cell["trials"] == 2 and 0 <= gen_cell["digit_acc"] <= 1
    # all five digits right greedily <=> every teacher-forced argmax right (the same path)
    assert gen_cell["exact"] == tf_cell["exact"]
  assert (out / "retrieval_generated.png").stat().st_size > 10_000
  assert "passkey_synthetic gen digit%" in capsys.readouterr().out
