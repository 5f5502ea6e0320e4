"""Needle samples, teacher-forced scoring and loss bookkeeping of `atma_jax.eval` (no model)."""

import math
import random

import numpy as np
import pytest

from atma_jax.data.tokenizer import load_gpt2_tokenizer
from atma_jax.eval import needles, scoring, suite


@pytest.fixture(scope="module")
def tok():
  return load_gpt2_tokenizer()


def _find(seq, sub):
  return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("kind", needles.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("real", [False, True])
def test_retrieval_needle_at_depth(tok, kind, depth, real):
  length = 300
  hay = None
  if real:
    r = np.random.default_rng(7)
    hay = [int(x) for x in r.integers(0, 50000, size=400)]
  s = needles.retrieval_sample(tok, kind, length, depth, needles.sample_rng(1234, kind, 3), hay)
  ctx = s.context
  assert len(ctx) == length and ctx[0] == tok.eot_id
  # The target is exactly the planted value: five single-token digits " d".
  text = tok.decode(s.value)
  assert len(s.value) == 5 and len(text) == 10 and all(c.isdigit() for c in text[1::2])
  needle = s.cue + s.value
  hits = _find(ctx, needle)
  assert hits == [s.needle_start]
  body_len = length - 1 - len(needle) - len(s.cue)
  assert s.needle_start == 1 + math.floor(depth * body_len)
  # The context ends with the cue, so `context + value[:-1]` asks for the value.
  assert ctx[-len(s.cue):] == s.cue
  # Body tokens are the haystack prefix in order, split around the needle.
  body = ctx[1:s.needle_start] + ctx[s.needle_start + len(needle):-len(s.cue)]
  expect = hay[:body_len] if real else needles.synthetic_haystack(tok, body_len)
  assert body == expect


def test_paired_design_and_cue_text(tok):
  a = needles.retrieval_sample(tok, "passkey", 200, 0.1, needles.sample_rng(1, "passkey", 5))
  b = needles.retrieval_sample(tok, "passkey", 900, 0.9, needles.sample_rng(1, "passkey", 5))
  c = needles.retrieval_sample(tok, "passkey", 200, 0.1, needles.sample_rng(1, "passkey", 6))
  assert a.value == b.value and a.cue == b.cue
  assert (a.value, a.cue) != (c.value, c.cue)
  assert tok.decode(a.cue).startswith(" The access code for record ")
  n = needles.retrieval_sample(tok, "niah", 200, 0.5, random.Random(0))
  assert tok.decode(n.cue).split()[3] in needles.NIAH_WORDS


def test_induction_sample(tok):
  hay = list(range(1000, 1600))
  s = needles.induction_sample(tok, 500, needles.sample_rng(0, "induction", 0), hay)
  assert s.context[:1 + len(s.cue) + 5] == [tok.eot_id] + s.cue + s.value
  assert s.context[1 + len(s.cue) + 5:-len(s.cue)] == hay[:500]
  assert s.context[-len(s.cue):] == s.cue
  assert len(s.context) + 4 <= 500 + needles.MAX_SCAFFOLD


def test_sample_errors(tok):
  with pytest.raises(ValueError, match="depth"):
    needles.retrieval_sample(tok, "passkey", 300, 1.5, random.Random(0))
  with pytest.raises(ValueError, match="shorter than the needle"):
    needles.retrieval_sample(tok, "passkey", 10, 0.5, random.Random(0))
  with pytest.raises(ValueError, match="haystack has"):
    needles.retrieval_sample(tok, "niah", 300, 0.5, random.Random(0), haystack=[1] * 20)
  with pytest.raises(ValueError, match="unknown retrieval task"):
    needles.retrieval_sample(tok, "qa", 300, 0.5, random.Random(0))


def _log_softmax_nll(logits, t):
  z = logits - logits.max()
  return float(np.log(np.exp(z).sum()) - z[t])


def test_target_metrics_known_case():
  rng = np.random.default_rng(0)
  V = 37
  targets = [3, 9, 0, 36, 5]
  logits = rng.normal(size=(5, V))
  for i, t in enumerate(targets):  # rows 0, 2, 4 correct; rows 1, 3 wrong
    logits[i, t] = logits[i].max() + 1.0 if i % 2 == 0 else logits[i].min() - 1.0
  m = scoring.target_metrics(logits, targets)
  assert m["token_acc"] == pytest.approx(0.6)
  assert m["exact"] == 0.0
  assert m["nll"] == pytest.approx(np.mean([_log_softmax_nll(logits[i], t)
                                            for i, t in enumerate(targets)]), rel=1e-12)
  for i, t in enumerate(targets):
    logits[i, t] = logits[i].max() + 1.0
  assert scoring.target_metrics(logits, targets)["exact"] == 1.0
  with pytest.raises(ValueError, match="do not match"):
    scoring.target_metrics(logits[:4], targets)


class CopyOracle:
  """A fake Forward that retrieves perfectly: at a scored position whose last 4 input tokens
  (the cue's tail) occurred earlier, it predicts the token that followed them there."""

  V = 50304

  def __init__(self, shift=0):
    self.shift = shift
    self.calls = []

  def logits_at(self, inputs, starts, count, pad_to=None):
    self.calls.append((len(inputs), pad_to))
    out = np.zeros((len(inputs), count, self.V), np.float32)
    for n, (inp, s) in enumerate(zip(inputs, starts)):
      s = s + self.shift
      key = inp[s - 3:s + 1]
      j = next(j for j in range(3, s) if inp[j - 3:j + 1] == key)
      for i in range(count):
        out[n, i, inp[j + 1 + i]] = 10.0
    return out


def test_retrieval_grid_with_oracle(tok):
  grid = suite.retrieval_grid(CopyOracle(), tok, "niah", [128, 256], [0.0, 0.5, 1.0], 3, 1234)
  for row in grid.values():
    for cell in row.values():
      assert cell["token_acc"] == 1.0 and cell["exact"] == 1.0 and cell["trials"] == 3
  off = CopyOracle(shift=-1)  # reads one position too early: every prediction is shifted
  grid = suite.retrieval_grid(off, tok, "passkey", [128], [0.5], 3, 1234)
  assert grid["128"]["0.5"]["exact"] == 0.0
  assert off.calls == [(3, suite.scored_length(128))]
  hay = [int(x) for x in np.random.default_rng(1).integers(0, 50000, 400)]
  ind = suite.induction_by_length(CopyOracle(), tok, [128, 256], 2, 1234, [hay])
  assert all(c["token_acc"] == 1.0 and c["distance"] == n - needles.MAX_SCAFFOLD
             for n, c in ((int(k), v) for k, v in ind.items()))


class CopyGenerator:
  """Stand-in for a Generator: continues each context with the 5 tokens after the earlier
  occurrence of its last 4 tokens (the cue), shifted by `shift`; records the batch sizes."""

  def __init__(self, shift=0):
    self.shift, self.calls = shift, []

  def generate(self, prompts, sampling):
    self.calls.append((len(prompts), sampling.max_new_tokens, sampling.temperature))
    out = []
    for p in prompts:
      key = p[-4:]
      j = next(j for j in range(len(p) - 4) if p[j:j + 4] == key) + 4 + self.shift
      out.append(p[j:j + sampling.max_new_tokens])
    return out


def test_generated_metrics():
  assert scoring.generated_metrics([1, 2, 3], [1, 2, 3]) == {"digit_acc": 1.0, "exact": 1.0}
  assert scoring.generated_metrics([1, 9, 3, 7], [1, 2, 3]) == {"digit_acc": 2 / 3, "exact": 0.0}
  assert scoring.generated_metrics([1], [1, 2]) == {"digit_acc": 0.5, "exact": 0.0}


def test_retrieval_generated_grid_with_oracle(tok):
  gen = CopyGenerator()
  grid = suite.retrieval_generated_grid(gen, tok, "passkey", [128, 256], [0.0, 0.5], 5, 1234,
                                        tokens_per_call=3 * 256)
  for row in grid.values():
    for cell in row.values():
      assert cell == {"digit_acc": 1.0, "exact": 1.0, "trials": 5}
  # 128: 5 samples in one call of 5 rows; 256: 3 rows per call, the second call padded to 3
  assert [c[0] for c in gen.calls] == [5, 5, 3, 3, 3, 3]
  assert {c[1:] for c in gen.calls} == {(needles.VALUE_TOKENS, 0.0)}
  off = suite.retrieval_generated_grid(CopyGenerator(shift=1), tok, "niah", [128], [0.5], 2, 1)
  assert off["128"]["0.5"]["exact"] == 0.0 and off["128"]["0.5"]["digit_acc"] < 1.0


class Failing:
  """A Forward / Generator whose every call raises `err`."""

  def __init__(self, err):
    self.err = err

  def logits_at(self, *args, **kw):
    raise self.err

  def generate(self, *args, **kw):
    raise self.err


@pytest.mark.parametrize("grid_fn", [suite.retrieval_grid, suite.retrieval_generated_grid])
def test_retrieval_grids_record_oom_and_raise_the_rest(tok, grid_fn):
  """Both grids (teacher-forced, generated): a device OOM becomes an error cell and the ladder
  goes on (progress still advances); any other exception propagates."""
  ticks = []
  oom = Failing(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
  grid = grid_fn(oom, tok, "passkey", [128, 256], [0.5], 2, 1, None, ticks.append)
  assert grid == {"128": {"0.5": {"error": "out of memory"}},
                  "256": {"0.5": {"error": "out of memory"}}}
  assert ticks == [2, 2]
  with pytest.raises(ValueError, match="a bug"):
    grid_fn(Failing(ValueError("a bug")), tok, "passkey", [128], [0.5], 2, 1)


def test_loss_bookkeeping():
  assert scoring.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
  with pytest.raises(ValueError):
    scoring.bits_per_byte(1.0, 0)
  assert suite.position_edges(100, 8) == [0, 8, 16, 32, 64, 100]
  nll = np.arange(200, dtype=np.float64).reshape(2, 100)
  pos = suite.loss_by_position(nll, 8)
  assert list(pos) == ["0-8", "8-16", "16-32", "32-64", "64-100"]
  assert pos["64-100"] == pytest.approx(np.concatenate([nll[0, 64:], nll[1, 64:]]).mean())


def test_baseline_sample_has_no_needle(tok):
  hay = [tok.eot_id] + list(range(1000, 1600))  # a document with its leading EOT
  rng = lambda: needles.sample_rng(1234, "induction", 3)  # noqa: E731
  ind = needles.induction_sample(tok, 300, rng(), hay)
  s = needles.baseline_sample(tok, 300, rng(), hay)
  assert (s.cue, s.value) == (ind.cue, ind.value) and len(s.context) == len(ind.context)
  inp, start = scoring.scored_input(s.context, s.value)
  assert _find(inp, s.cue) == [start + 1 - len(s.cue)]  # the cue only once: at the query
  assert inp[start + 1:] == s.value[:-1] and len(inp) == len(s.context) + 4
  gap = 300 + len(s.cue) + 5  # distance + len(needle) haystack tokens, then the cue
  assert s.context == [tok.eot_id] + hay[:gap] + s.cue
  assert not _find(s.context, s.cue + s.value[:1])
  with pytest.raises(ValueError, match="needle-absent baseline"):
    needles.baseline_sample(tok, 600, rng(), hay)


class PriorOracle:
  """A fake Forward with no memory at all: the same logits everywhere (digit 7 favoured)."""

  def __init__(self, tok):
    self.seven = tok.encode(" 7")[0]
    self.inputs = []

  def logits_at(self, inputs, starts, count, pad_to=None):
    self.inputs += [list(x) for x in inputs]
    out = np.zeros((len(inputs), count, CopyOracle.V), np.float32)
    out[:, :, self.seven] = 3.0
    return out


def test_induction_baseline_scores_the_prior(tok):
  hay = [tok.eot_id] + [int(x) for x in np.random.default_rng(2).integers(0, 50000, 400)]
  fake = PriorOracle(tok)
  base = suite.induction_baseline(fake, tok, [256, 128], 3, 1234, [hay])
  d_min = needles.induction_distance(128)
  assert base["distance"] == d_min and base["trials"] == 3
  lse = np.log(CopyOracle.V - 1 + np.exp(3.0))
  values = [needles.cue_and_value(tok, "passkey", needles.sample_rng(1234, "induction", i))[1]
            for i in range(3)]
  hits = [sum(v == fake.seven for v in value) for value in values]
  want = np.mean([(5 * lse - 3.0 * h) / 5 for h in hits])
  assert base["nll"] == pytest.approx(want, rel=1e-6)
  assert base["token_acc"] == pytest.approx(np.mean(hits) / 5)
  for inp, value in zip(fake.inputs, values):
    assert inp[:1 + d_min] == [tok.eot_id] + hay[:d_min] and inp[-4:] == value[:4]


class ConstNll:
  """A fake Forward whose every token costs 1 nat (optionally out of memory when padded)."""

  def __init__(self, oom_when_padded=False):
    self.seqs, self.pads, self.oom_when_padded = [], [], oom_when_padded

  def token_nll(self, seqs, pad_to=None):
    self.pads.append(pad_to)
    if self.oom_when_padded and pad_to is not None and pad_to > len(seqs[0]):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    self.seqs += [list(s) for s in seqs]
    return np.ones((len(seqs), len(seqs[0]) - 1))


def test_junk_loss_bytes_of_the_targets(tok):
  text = tok.encode("def f(x):\n    return x + 1\n") * 4
  windows = {8: [text[0:9], text[8:17]], 16: [text[0:17], text[16:33]]}
  fake = ConstNll()
  table = suite.junk_loss_by_length(fake, windows, lambda ids: len(tok.decode_bytes(ids)))
  for n, seqs in windows.items():
    cell = table[str(n)]
    nbytes = sum(len(tok.decode_bytes(s[1:])) for s in seqs)
    assert cell["tokens"] == 2 * n and cell["bytes"] == nbytes
    assert cell["bpb"] == pytest.approx(2 * n / math.log(2) / nbytes)
  assert fake.pads == [17, 17]  # every length padded to the longest: one compile
  with pytest.raises(ValueError, match="junk_windows"):
    suite.junk_loss_by_length(fake, {8: [text[:8]]}, len)
  # Out of memory at the padded length: each length retries at its own length.
  fake = ConstNll(oom_when_padded=True)
  table = suite.junk_loss_by_length(fake, windows, len)
  assert fake.pads == [17, None, 17] and table["8"]["tokens"] == 16 and table["16"]["nll"] == 1


def test_junk_windows_consecutive_across_documents(tok):
  from atma_jax.data import pipeline, shards
  from atma_jax.eval.junk import JunkError, junk_windows
  from atma_jax.eval.testing import tiny_eval_config

  cfg = tiny_eval_config()
  _, val_files = pipeline.resolve_shards(cfg, log=None)
  stream = np.asarray(shards.read_shard(val_files[0]))
  L = 4096  # the split starts with an 11K-token document; 4 windows reach the next two
  w = junk_windows(cfg, L, 4)
  for r, row in enumerate(w):
    assert row == stream[r * L:(r + 1) * L + 1].tolist()  # consecutive, sharing one token
  assert any(tok.eot_id in row[1:] for row in w)  # crosses a document boundary
  assert w[0][-1] == w[1][0]
  with pytest.raises(JunkError, match="shorter --lengths"):
    junk_windows(cfg, 10**9, 2)
