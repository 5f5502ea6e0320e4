"""Text helpers of generation: prompt encoding, sampling restricted to the tokenizer, streamed
detokenization of characters split across tokens (no model)."""

from atma_jax.data.tokenizer import load_gpt2_tokenizer
from atma_jax.generate import SamplingParams
from atma_jax.generate.text import TextStream, encode_prompt, text_sampling


def test_prompt_starts_a_document():
  tok = load_gpt2_tokenizer()
  assert encode_prompt(tok, "def fib(n):") == [tok.eot_id] + tok.encode("def fib(n):")
  assert encode_prompt(tok, "") == [tok.eot_id]


def test_text_sampling_stops_at_eot_and_limits_the_vocabulary():
  tok = load_gpt2_tokenizer()
  s = text_sampling(tok, SamplingParams(stop_token_ids=(13,)))
  assert s.stop_token_ids == (13, tok.eot_id) and s.vocab_limit == 50257
  assert text_sampling(tok, SamplingParams(), stop_at_eot=False).stop_token_ids == ()


def test_stream_joins_split_characters():
  tok = load_gpt2_tokenizer()
  text = "naïve 😀 café — 日本語 ok"
  ids = tok.encode(text)
  assert any(not tok.decode_bytes([i]).decode("utf-8", "ignore") for i in ids)  # a split char
  stream = TextStream(tok)
  pieces = [stream.push([i]) for i in ids] + [stream.flush()]
  assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
