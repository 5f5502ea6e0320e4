"""`generate.py` on a tiny checkpoint made here (subprocess) and its input errors (CPU)."""

import os
import subprocess
import sys

import pytest

from atma_jax.generate import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_dir(tiny_run_dir):
  return tiny_run_dir


def run_generate(*argv):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *argv], env=env,
                        capture_output=True, text=True, timeout=300)


def test_streams_text_and_exits_0(run_dir):
  proc = run_generate("--checkpoint", str(run_dir), "--prompt", "def fib(n):",
                      "--max-new-tokens", "12", "--block", "4", "--no-stop", "--seed", "1")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("def fib(n):")
  assert len(proc.stdout.strip()) > len("def fib(n):")  # 12 tokens of (random-model) text


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "temperature=-1.0 must be"),
    (["--top-p", "0"], "top_p=0.0 must lie in (0, 1]"),
    (["--top-k", "-3"], "top_k=-3 must be"),
    (["--top-k", "60000"], "exceeds the vocabulary"),
    (["--max-new-tokens", "0"], "max_new_tokens=0 must be"),
    (["--max-len", "8"], "exceeds max_len=8"),
    (["--step", "5"], "--step 5: there is no checkpoint"),
    (["--block", "0"], "--block must be a positive integer"),
])
def test_bad_inputs_fail_before_loading(run_dir, capsys, no_load, argv, message):
  assert cli.main(["--checkpoint", str(run_dir), "--prompt", "hello world"] + argv) == 2
  err = capsys.readouterr().err
  assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_missing_checkpoint_one_line_nonzero(tmp_path):
  proc = run_generate("--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
  assert proc.returncode == 2 and proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "does not exist" in lines[0]
