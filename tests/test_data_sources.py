"""Corpora: splits, the tokenized cache, held-out eval documents, prepare, the R reader, hf."""

import os
import shutil
import struct
import sys
import types

import numpy as np
import pytest

from atma_jax.config import resolve
from atma_jax.data import corpus, eval_docs, pipeline, prepare, rdata, shards, sources
from atma_jax.data.tokenizer import EOT_ID, load_gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
  return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def embedded_names():
  return [name for name, _ in sources.embedded_documents()]


def _subset(n=60):
  """A small deterministic slice of the embedded documents (tokenizing all takes seconds)."""
  docs = list(sources.embedded_documents())
  step = max(1, len(docs) // n)
  return docs[::step][:n]


# -- splits -------------------------------------------------------------------------------------


def test_embedded_documents_are_real_stdlib_text(embedded_names):
  assert len(embedded_names) > 300 and len(set(embedded_names)) == len(embedded_names)
  assert "py:json/decoder.py" in embedded_names and any(n.startswith("topic:")
                                                         for n in embedded_names)
  for name in embedded_names:
    parts = name.split("/")
    assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), name
    assert name != "py:pydoc_data/topics.py"


def test_split_is_disjoint_stable_and_sized(embedded_names):
  splits = {n: sources.split_of(n, 0.05) for n in embedded_names}
  val = {n for n, s in splits.items() if s == "val"}
  held = {n for n, s in splits.items() if s == "heldout"}
  train = {n for n, s in splits.items() if s == "train"}
  assert not (val & held or val & train or held & train)
  assert 0.02 < len(val) / len(splits) < 0.09 and 0.06 < len(held) / len(splits) < 0.15
  # Growing val_fraction only moves train documents into val; heldout never moves.
  val2 = {n for n in embedded_names if sources.split_of(n, 0.2) == "val"}
  held2 = {n for n in embedded_names if sources.split_of(n, 0.2) == "heldout"}
  assert val <= val2 and held2 == held and not val2 & held
  with pytest.raises(sources.SourceError, match="val_fraction"):
    sources.split_of("x", 0.95)


# -- the tokenized cache ------------------------------------------------------------------------


def test_corpus_cache_packs_splits_exactly(tmp_path, monkeypatch, tok):
  docs = _subset()
  monkeypatch.setattr(sources, "embedded_documents", lambda: iter(docs))
  out, meta = corpus.embedded_corpus(tok, str(tmp_path), val_fraction=0.1, seed=3, log=None)
  train_files, val_files = corpus.shard_lists(out, meta)
  val_docs = [t for n, t in docs if sources.split_of(n, 0.1) == "val"]
  train_docs = [t for n, t in docs if sources.split_of(n, 0.1) == "train"]
  assert val_docs and train_docs
  # Validation: source order, each document led by EOT, nothing else.
  expect_val = corpus.pack_documents([tok.encode(t) for t in val_docs], EOT_ID)
  np.testing.assert_array_equal(shards.read_shard(val_files[0]), expect_val)
  # Train: the same documents, whole, in a seeded shuffled order.
  train_tokens = np.asarray(shards.read_shard(train_files[0]), np.int64)
  starts = np.flatnonzero(train_tokens == EOT_ID).tolist() + [len(train_tokens)]
  got = sorted(tuple(train_tokens[a + 1:b]) for a, b in zip(starts, starts[1:]))
  assert got == sorted(tuple(tok.encode(t)) for t in train_docs)
  assert meta["train_docs"] == len(train_docs) and meta["val_docs"] == len(val_docs)
  # Cached: a second call does not tokenize again; changed content gets a new directory.
  monkeypatch.setattr(corpus, "tokenize_to_shards", lambda *a, **k: pytest.fail("re-tokenized"))
  assert corpus.embedded_corpus(tok, str(tmp_path), val_fraction=0.1, seed=3, log=None)[0] == out
  monkeypatch.undo()
  changed = [(docs[0][0], docs[0][1] + "\n# edited\n")] + docs[1:]
  monkeypatch.setattr(sources, "embedded_documents", lambda: iter(changed))
  out2, _ = corpus.embedded_corpus(tok, str(tmp_path), val_fraction=0.1, seed=3, log=None)
  assert out2 != out and os.path.isdir(out)


def test_embedded_source_through_the_pipeline(tmp_path, monkeypatch):
  docs = _subset(40)
  monkeypatch.setattr(sources, "embedded_documents", lambda: iter(docs))
  cfg = resolve("tiny", [f"data.cache_dir={tmp_path}", "train.seq_len=32", "train.global_batch=4",
                         "train.micro_batch=2"])
  it = pipeline.make_train_iterator(cfg, log=None)
  first = next(it)
  assert first["inputs"][0, 0] == EOT_ID  # the first training document starts the stream
  assert first["inputs"].max() < 50257 and first["inputs"].shape == (4, 32)
  assert len(pipeline.make_eval_batches(cfg, 2, log=None)) == 2


# -- held-out long documents --------------------------------------------------------------------


def test_code_eval_docs_are_heldout_files(tok):
  docs = eval_docs.long_documents("code", 3000, tok, limit=2)
  assert len(docs) == 2 and all(len(d) == 3000 for d in docs)
  heldout = {n for n, _ in eval_docs.heldout_code_files()}
  for d in docs:
    text = tok.decode(d)
    names = [line[len("# ---- "):-len(" ----")] for line in text.splitlines()
             if line.startswith("# ---- ") and line.endswith(" ----")]
    assert names and all(f"py:{n}" in heldout for n in names)
    assert all(sources.split_of(f"py:{n}", 0.2) == "heldout" for n in names)
  assert eval_docs.byte_count(docs[0], tok) == len(tok.decode_bytes(docs[0]))
  assert eval_docs.byte_count([EOT_ID] + docs[0], tok) == eval_docs.byte_count(docs[0], tok)
  with pytest.raises(ValueError, match="unknown long-document kind"):
    eval_docs.long_documents("poems", 10, tok)


@pytest.mark.skipif(not os.path.isfile(sources.AUSTEN_RDB + ".rdx"), reason="r-cran-janeaustenr")
def test_austen_documents(tok):
  docs = eval_docs.long_documents("austen", 4096, tok, limit=6)
  assert len(docs) == 6 and all(len(d) == 4096 for d in docs)
  assert tok.decode(docs[0]).startswith("EMMA")


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv not installed")
def test_kjv_documents(tok):
  docs = eval_docs.long_documents("kjv", 4096, tok, limit=3)
  assert len(docs) == 3 and all(len(d) == 4096 for d in docs)
  assert tok.decode(docs[0]).startswith("In the beginning God created the heaven and the earth.")


def test_missing_debian_packages_name_the_install(monkeypatch, tok):
  monkeypatch.setattr(sources, "AUSTEN_RDB", "/nonexistent/Rdata")
  with pytest.raises(sources.SourceError, match="apt-get install -y r-cran-janeaustenr"):
    eval_docs.long_documents("austen", 100, tok)
  monkeypatch.setattr(sources.shutil, "which", lambda name: None)
  with pytest.raises(sources.SourceError, match="apt-get install -y bible-kjv"):
    eval_docs.long_documents("kjv", 100, tok)
  monkeypatch.setattr(sources, "PY_DOC_DIR", "/nonexistent")
  with pytest.raises(sources.SourceError, match="apt-get install -y python3.11-doc"):
    next(sources.english_documents())


@pytest.mark.skipif(not os.path.isdir(sources.PY_DOC_DIR), reason="python3.11-doc not installed")
def test_heldout_cache_serves_a_machine_without_the_packages(tmp_path, monkeypatch, tok):
  novels = [("austen:a", "It is a truth universally acknowledged. " * 40),
            ("austen:b", "Emma Woodhouse, handsome, clever, and rich. " * 60)]
  monkeypatch.setattr(sources, "austen_novels", lambda: novels)
  built = eval_docs.long_documents("austen", 100, tok, limit=4, cache_dir=str(tmp_path))
  assert os.path.isfile(eval_docs.cache_path("austen", str(tmp_path), tok))

  def missing():
    raise sources.SourceError("no package here")

  monkeypatch.setattr(sources, "austen_novels", missing)
  assert eval_docs.long_documents("austen", 100, tok, limit=4, cache_dir=str(tmp_path)) == built
  assert built == [tok.encode(text)[:100] for _, text in novels]
  with pytest.raises(sources.SourceError, match="no package here"):  # no cache: the source
    eval_docs.long_documents("austen", 100, tok, cache_dir=str(tmp_path / "other"))


def test_english_documents_start_with_python_docs():
  gen = sources.english_documents()
  first = [next(gen) for _ in range(3)]
  assert all(n.startswith("pydoc:") and len(t) > 0 for n, t in first)


# -- prepare ------------------------------------------------------------------------------------


def test_prepare_writes_reference_shards(tmp_path, monkeypatch, capsys):
  docs = _subset(30)
  monkeypatch.setattr(sources, "embedded_documents", lambda: iter(docs))
  out = str(tmp_path / "emb")
  assert prepare.main(["--source", "embedded", "--out", out, "--shard-tokens", "20000"]) == 0
  train, val = shards.split_train_val(os.path.join(out, "*.bin"))
  meta = corpus.load_meta(out)
  assert len(train) == len(meta["train_files"]) >= 2  # several train shards of >= 20k tokens
  assert sum(shards.read_header(f)[0] for f in train) == meta["train_tokens"]
  assert sum(shards.read_header(f)[0] for f in val) == meta["val_tokens"]
  assert prepare.main(["--source", "embedded", "--out", out]) == 2  # refuses to overwrite
  assert "--force" in capsys.readouterr().err


def test_prepare_english_says_what_to_install(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sources, "PY_DOC_DIR", "/nonexistent")
  assert prepare.main(["--source", "english", "--out", str(tmp_path / "e")]) == 2
  assert "apt-get install -y python3.11-doc" in capsys.readouterr().err


# -- hf -----------------------------------------------------------------------------------------


def test_hf_source_errors_are_clear(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(sources.SourceError, match="pip install datasets"):
    next(sources.hf_documents("some/dataset"))
  fake = types.ModuleType("datasets")

  def offline(*a, **k):
    raise ConnectionError("no network")

  fake.load_dataset = offline
  monkeypatch.setitem(sys.modules, "datasets", fake)
  with pytest.raises(sources.SourceError, match="network"):
    next(sources.hf_documents("some/dataset"))
  fake.load_dataset = lambda *a, **k: iter([{"text": "hello"}, {"body": "x"}])
  gen = sources.hf_documents("some/dataset")
  assert next(gen) == ("hf:some/dataset:0", "hello")
  with pytest.raises(sources.SourceError, match="hf_text_field"):
    next(gen)


# -- the R lazy-load reader ---------------------------------------------------------------------


def _r_serialize_named_strings(named: dict) -> bytes:
  """R XDR serialization (version 3) of `list(name = c("line", NA, ...), ...)`, built from the
  format description, to test the reader without R."""
  i = lambda v: struct.pack(">i", v)  # noqa: E731

  def charsxp(s):
    if s is None:
      return i(9) + i(-1)
    b = s.encode("utf-8")
    return i(9 | (1 << 15)) + i(len(b)) + b

  def strsxp(items):
    return i(16) + i(len(items)) + b"".join(charsxp(s) for s in items)

  out = b"X\n" + i(3) + i(0x040201) + i(0x030500) + i(5) + b"UTF-8"
  out += i(19 | (1 << 9)) + i(len(named)) + b"".join(strsxp(v) for v in named.values())
  out += i(2 | (1 << 10)) + i(1) + charsxp("names") + strsxp(list(named)) + i(254)  # tag: SYMSXP
  return out


def test_r_reader_on_handmade_serialization():
  data = {"novel": ["It is a truth", None, "universally acknowledged"], "b": ["é"]}
  assert rdata.unserialize(_r_serialize_named_strings(data)) == data


@pytest.mark.skipif(not os.path.isfile(sources.AUSTEN_RDB + ".rdx"), reason="r-cran-janeaustenr")
def test_r_reader_on_janeaustenr():
  novels = dict(sources.austen_novels())
  assert sorted(novels) == ["austen:emma", "austen:mansfieldpark", "austen:northangerabbey",
                            "austen:persuasion", "austen:prideprejudice",
                            "austen:sensesensibility"]
  assert "It is a truth universally acknowledged" in novels["austen:prideprejudice"]
