"""`eval.py` end to end on a tiny saved checkpoint, and its input errors (CPU)."""

import json
import math

import pytest

from atma_jax.eval import cli


@pytest.fixture
def run_dir(tiny_run_dir):
  return tiny_run_dir


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "abc"], "--lengths must be comma-separated integers"),
    (["--lengths", "16,128"], "must be >= 64"),
    (["--lengths", ""], "--lengths is empty"),
    (["--depths", "0.5,2"], "each in [0, 1]"),
    (["--tasks", "loss,bogus"], "unknown --tasks"),
    (["--trials", "0"], "--trials must be a positive integer"),
    (["--corpus", "wiki"], "--corpus 'wiki' is unknown"),
])
def test_bad_arguments_fail_before_loading(tmp_path, capsys, no_load, argv, message):
  assert cli.main(["--checkpoint", str(tmp_path)] + argv) == 2
  assert message in capsys.readouterr().err


def test_bad_paths_fail_before_loading(tmp_path, capsys, no_load):
  assert cli.main(["--checkpoint", str(tmp_path / "missing")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["--checkpoint", str(tmp_path)]) == 2  # exists, but holds no checkpoint
  assert "no checkpoints under" in capsys.readouterr().err
  partial = tmp_path / "checkpoints" / "7"
  partial.mkdir(parents=True)
  assert cli.main(["--checkpoint", str(partial)]) == 2
  assert "partial" in capsys.readouterr().err


def test_too_long_for_the_documents(run_dir, capsys, no_load):
  assert cli.main(["--checkpoint", str(run_dir), "--lengths", str(10**8)]) == 2
  assert "held-out 'code' documents" in capsys.readouterr().err


def test_unwritable_out_fails_before_loading(run_dir, tmp_path, capsys, no_load):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  assert cli.main(["--checkpoint", str(run_dir), "--out", str(blocker / "eval")]) == 2
  assert "cannot write to --out" in capsys.readouterr().err


def test_end_to_end(run_dir, tmp_path, capsys):
  out = tmp_path / "eval"
  argv = ["--checkpoint", str(run_dir), "--lengths", "64,128", "--depths", "0.5", "--trials",
          "2", "--docs", "2", "--out", str(out), "--no-progress", "--tokens-per-call", "256",
          "--probe"]
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  report = json.loads((out / "report.json").read_text())
  assert report["lengths"] == [64, 128] and report["train_window"] == 32 and report["memory"]
  for n in ("64", "128"):
    cell = report["loss_by_length"][n]
    assert cell["tokens"] == 2 * int(n) and cell["bytes"] > cell["tokens"]
    assert 0 < cell["nll"] < 20 and math.isfinite(cell["bpb"])
    for name in ("passkey_synthetic", "passkey_code", "niah_synthetic", "niah_code"):
      c = report["retrieval"][name][n]["0.5"]
      assert c["trials"] == 2 and 0 <= c["token_acc"] <= 1 and c["exact"] in (0.0, 0.5, 1.0)
    assert report["induction"][n]["distance"] == int(n) - 40
    junk = report["junk_loss_by_length"][n]
    assert junk["tokens"] == 2 * int(n) and 0 < junk["nll"] < 20 and junk["bytes"] > 0
  base = report["induction_baseline"]
  assert base["trials"] == 2 and base["distance"] == 64 - 40 and 0 < base["nll"] < 20
  assert list(report["loss_by_position"]) == ["0-8", "8-16", "16-32", "32-64", "64-128"]
  probe = report["probe"]
  assert probe["64"]["0"]["n_eff"] < probe["128"]["0"]["n_eff"]  # more keys to spread over
  assert len(probe["128"]["0"]["per_head"]["w_null"]) == 4
  for png in ("loss.png", "retrieval.png", "retrieval_by_length.png", "probe.png"):
    assert (out / png).stat().st_size > 10_000
  assert "nll junk val stream" in text and "no-needle baseline" in text
  assert "nll code (nats)" in text and "passkey_synthetic tok%" in text and "n_eff layer 0" in text
  # The default output folder sits in the run directory, named for --no-mem.
  assert cli.main(["--checkpoint", str(run_dir), "--lengths", "64", "--tasks", "loss",
                   "--docs", "2", "--no-mem", "--no-progress", "--tokens-per-call", "256"]) == 0
  nomem = json.loads((run_dir / "eval_nomem" / "report.json").read_text())
  assert not nomem["memory"]
  assert abs(nomem["loss_by_length"]["64"]["nll"] - report["loss_by_length"]["64"]["nll"]) > 1e-4


def test_junk_length_the_split_cannot_fill_is_skipped(run_dir, tmp_path, monkeypatch, capsys):
  """One junk cell that cannot be filled is a note in the report; every other cell still runs."""
  from atma_jax.eval import junk

  real = junk.junk_windows

  def short_split(cfg, length, count):
    if length > 64:
      raise junk.JunkError(f"the validation split cannot give {count} window(s) of {length:,} "
                           "tokens")
    return real(cfg, length, count)

  monkeypatch.setattr(junk, "junk_windows", short_split)
  assert cli.main(["--checkpoint", str(run_dir), "--lengths", "64,128", "--tasks", "loss,junk",
                   "--docs", "2", "--out", str(tmp_path), "--no-progress",
                   "--tokens-per-call", "256"]) == 0
  captured = capsys.readouterr()
  assert "junk task skipped at length(s) [128]" in captured.err
  report = json.loads((tmp_path / "report.json").read_text())
  assert "nll" in report["junk_loss_by_length"]["64"]
  assert "cannot give 2 window(s) of 128" in report["junk_loss_by_length"]["128"]["skipped"]
  assert report["notes"] == [f"junk at 128: skipped "
                             f"({report['junk_loss_by_length']['128']['skipped']})"]
  assert all("nll" in report["loss_by_length"][n] for n in ("64", "128"))
  assert "note: junk at 128: skipped" in captured.out
  # junk alone with nothing it can fill is an error, not an empty report
  assert cli.main(["--checkpoint", str(run_dir), "--lengths", "128", "--tasks", "junk",
                   "--docs", "2", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
  assert "cannot give 2 window(s) of 128" in capsys.readouterr().err


def test_needle_haystacks_start_with_eot(run_dir, tmp_path, monkeypatch, capsys):
  """§10 pitfall 24: the induction gap (and its baseline) starts with the document's EOT."""
  from atma_jax.eval import suite

  seen = []
  for name in ("induction_by_length", "induction_baseline"):
    orig = getattr(suite, name)

    def spy(fwd, tok, lengths, trials, seed, haystacks, progress, _orig=orig):
      seen.append([h[0] for h in haystacks])
      return _orig(fwd, tok, lengths, trials, seed, haystacks, progress)

    monkeypatch.setattr(suite, name, spy)
  assert cli.main(["--checkpoint", str(run_dir), "--lengths", "64", "--tasks", "induction",
                   "--trials", "1", "--docs", "2", "--out", str(tmp_path), "--no-progress"]) == 0
  assert seen == [[50256, 50256]] * 2
  assert "no-needle baseline" in capsys.readouterr().out
