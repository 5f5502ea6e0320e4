"""The error boundary of every entry point (atma_jax/errors.py).

Bad input to `train.py`, `eval.py`, `generate.py`, `python -m atma_jax.interop` and
`python -m atma_jax.summary` ends as one `error: ...` line on stderr and exit status 2, without a
traceback and without leaving directories behind; a bug (any other exception) keeps its
traceback. A bad command-line value is the one shared `UsageError` in every entry point. The
subprocess cases fail before any compute, so each costs only the interpreter's start-up.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atma_jax.config import ConfigError
from atma_jax.errors import AtmaError, UsageError, cli_boundary

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
  """`python train.py ...` / `python -m atma_jax.interop ...` from `cwd` with this checkout."""
  if args[0] in ("train.py", "eval.py", "generate.py"):
    args = [str(ROOT / args[0])] + args[1:]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("ATMA_TRACEBACK", None)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=240)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, proc.stderr
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


@pytest.mark.parametrize("args, needles", [
    (["train.py", "--set", "model.head_dim=0"], ["model.head_dim=0 must be a positive integer"]),
    (["train.py", "--set", "model.gqa_ratio=0"], ["model.gqa_ratio=0"]),
    (["train.py", "--config", "missing.json"], ["config file missing.json does not exist"]),
    (["train.py", "--config", "no_such_preset"], ["unknown config preset 'no_such_preset'"]),
    (["-m", "atma_jax.summary", "tiny", "--set", "model.hidden_size=-8"],
     ["model.hidden_size=-8"]),
])
def test_config_errors(tmp_path, args, needles):
  assert_one_line_error(run_cli(args, tmp_path), *needles)
  assert list(tmp_path.iterdir()) == []  # nothing written


def test_train_bad_shards_leave_no_run_dir(tmp_path):
  run_dir = tmp_path / "run"
  proc = run_cli(["train.py", "--no-progress", "--set", "data.source=bin",
                  "--set", f"data.path={tmp_path}/missing_*.bin", "--set",
                  f"train.run_dir={run_dir}"], tmp_path)
  assert_one_line_error(proc, "no train shards match")
  assert not run_dir.exists()


def test_train_unwritable_run_dir(tmp_path):
  (tmp_path / "file").write_text("")
  proc = run_cli(["train.py", "--set", f"train.run_dir={tmp_path}/file/run"], tmp_path)
  assert_one_line_error(proc, "cannot write to train.run_dir", "is a file")


def test_eval_missing_checkpoint(tmp_path):
  proc = run_cli(["eval.py", "--checkpoint", str(tmp_path / "nothing")], tmp_path)
  assert_one_line_error(proc, "does not exist")


@pytest.mark.parametrize("args, needles", [
    (["eval.py", "--checkpoint", ".", "--lengths", "abc"],
     ["--lengths must be comma-separated integers"]),
    (["generate.py", "--checkpoint", "nothing", "--prompt", "x"],
     ["checkpoint path 'nothing' does not exist"]),
    (["generate.py", "--checkpoint", ".", "--prompt", "x", "--block", "0"],
     ["--block must be a positive integer, got 0"]),
    (["-m", "atma_jax.interop", "verify", "--reference-repo", ".", "--torch-python",
      sys.executable, "--variants", "no_such_variant"],
     ["--variants 'no_such_variant' matches no variant", "polar-mem1-win0"]),
])
def test_usage_errors(tmp_path, args, needles):
  """A bad command-line value of each entry point: the shared UsageError, one line."""
  assert_one_line_error(run_cli(args, tmp_path), *needles)
  assert list(tmp_path.iterdir()) == []


def test_entry_points_define_no_error_classes_of_their_own():
  """The command-line modules raise atma_jax.errors' classes (UsageError for a bad value) and
  print through `cli_boundary`; none defines its own exception class."""
  files = [ROOT / "train.py", ROOT / "eval.py", ROOT / "generate.py",
           *sorted((ROOT / "atma_jax").rglob("cli.py"))]
  base_name = lambda b: getattr(b, "id", getattr(b, "attr", ""))
  own = [f"{f.relative_to(ROOT)}: {node.name}" for f in files
         for node in ast.walk(ast.parse(f.read_text())) if isinstance(node, ast.ClassDef)
         and any(base_name(b).endswith(("Error", "Exception")) for b in node.bases)]
  assert not own, own
  from atma_jax.eval import cli as eval_cli
  from atma_jax.generate import cli as generate_cli
  with pytest.raises(UsageError, match="--lengths is empty"):
    eval_cli.parse_lengths("")
  with pytest.raises(UsageError, match="--max-len must be a positive integer"):
    generate_cli.check_args(generate_cli.parse_args(["--checkpoint", ".", "--prompt", "x",
                                                     "--max-len", "0"]))


def test_interop_errors(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = run_cli(["-m", "atma_jax.interop", "export", "--checkpoint", str(tmp_path / "run"),
                  "--out", str(blocker / "out")], tmp_path)
  assert_one_line_error(proc, "cannot write to --out", "is a file")
  proc = run_cli(["-m", "atma_jax.interop", "import", "--weights", str(tmp_path / "w.pt"),
                  "--out", str(tmp_path / "run")], tmp_path)
  assert_one_line_error(proc, "does not exist")
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- in process


def test_boundary_handles_project_and_file_errors(capsys):
  @cli_boundary
  def fails(exc):
    raise exc

  assert issubclass(ConfigError, AtmaError)
  assert fails(ConfigError("bad value; fix it")) == 2
  assert capsys.readouterr().err == "error: bad value; fix it\n"
  assert fails(PermissionError(13, "Permission denied", "/ro/x")) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: Permission denied: /ro/x") and err.count("\n") == 1


def test_boundary_keeps_the_traceback_of_a_bug(monkeypatch):
  @cli_boundary
  def fails(exc):
    raise exc

  with pytest.raises(ZeroDivisionError):
    fails(ZeroDivisionError("a bug"))
  monkeypatch.setenv("ATMA_TRACEBACK", "1")  # handled errors show theirs on request
  with pytest.raises(ConfigError):
    fails(ConfigError("x"))


# ----------------------------------------------------------------------------- failed starts


def _fake_run(write_train_record: bool):
  def run(cfg, **kw):
    d = cfg.train.run_dir
    os.makedirs(os.path.join(d, "checkpoints"))
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write("{}")
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
      f.write('{"step": 0, "val_loss": 10.8}\n')
      if write_train_record:
        f.write('{"step": 1, "loss": 10.7}\n')
    raise RuntimeError("failed at compile time")
  return run


@pytest.mark.parametrize("trained", [False, True])
def test_train_failing_before_its_first_step_leaves_no_run_dir(tmp_path, monkeypatch, trained):
  import train
  from atma_jax.train import loop
  monkeypatch.setattr(loop, "run", _fake_run(trained))
  run_dir = tmp_path / "run"
  with pytest.raises(RuntimeError, match="compile time"):  # a bug keeps its traceback
    train.main(["--set", f"train.run_dir={run_dir}"])
  assert run_dir.exists() == trained  # a recorded train step is kept for the post-mortem


def test_discard_unstarted_keeps_what_is_not_the_trainers(tmp_path):
  from atma_jax.train.rundir import discard_unstarted
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "notes.txt").write_text("mine")
  assert not discard_unstarted(str(tmp_path)) and (tmp_path / "notes.txt").exists()
  (tmp_path / "notes.txt").unlink()
  (tmp_path / "checkpoints" / "0").mkdir()
  assert not discard_unstarted(str(tmp_path))  # a checkpoint
  (tmp_path / "checkpoints" / "0").rmdir()
  assert discard_unstarted(str(tmp_path)) and not tmp_path.exists()


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "steps", "abc", "train.steps='abc' has the wrong type; expected int"),
    ("model", "attn_type", "wall", "expected one of ['polar', 'nope', 'rope']"),
    ("model", "mem_enabled", 1, "model.mem_enabled=1 has the wrong type; expected bool"),
    ("model", "head_dim", 0, "model.head_dim=0 must be a positive integer"),
    ("model", "global_offset", 4, "model.global_offset=4 must lie in [0, model.global_every=4)"),
    ("optim", "adam_b2", 1.0, "optim.adam_b2=1.0 must lie in [0, 1)"),
])
def test_saved_config_values_are_checked(tmp_path, section, key, value, message):
  """A config .json (e.g. an edited <run_dir>/config.json) is checked like --set values."""
  import json

  from atma_jax.config import load_preset, resolve, to_dict
  data = to_dict(resolve("tiny"))
  data[section][key] = value
  path = tmp_path / "config.json"
  path.write_text(json.dumps(data))
  with pytest.raises(ConfigError) as err:
    load_preset(str(path))
  assert message in str(err.value)


def test_a_kernel_missing_on_this_platform_is_one_line(capsys):
  """`model.kernel_impl=pallas` where no Pallas kernel exists fails at trace time; the boundary
  reports it like a config error (the run directory is removed by train.py as above)."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels.dispatch import KernelUnavailable
  from pallas_kernels.polar_attention import api

  @cli_boundary
  def main():
    q = jnp.zeros((1, 8, 4, 16))
    k = v = jnp.zeros((1, 8, 2, 16))
    jax.jit(lambda q, k, v: api.attention_stats(q, k, v, jnp.ones((1, 8, 4)), impl="pallas")
            )(q, k, v)
    return 0

  if jax.default_backend() != "cpu":
    pytest.skip("Pallas kernels exist on this platform")
  assert issubclass(KernelUnavailable, ValueError)
  assert main() == 2
  err = capsys.readouterr().err
  assert err.startswith("error: impl='pallas': no Pallas Polar attention backend for platform 'cpu'")
  assert "model.kernel_impl" in err and "generate.py --impl" in err and err.count("\n") == 1
