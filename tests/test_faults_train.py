"""Fault injection for training (issue #15), on CPU with the stand-in model: kill -9 during a
save then resume, flipped and truncated state files, missing and garbled checkpoint files,
non-finite steps, a changed data layout on resume, --step, and a multi-process start whose
processes never all join. This file is also the worker script (`python <file> worker ...`).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETS = ["model.vocab_size=64", "model.hidden_size=64", "model.head_dim=16", "model.gqa_ratio=1",
        "model.num_layers=2", "train.seq_len=16", "train.global_batch=16", "train.micro_batch=8",
        "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3",
        "train.async_checkpoint=false", "train.log_every=1", "mesh.data=2", "mesh.fsdp=2",
        "mesh.tensor=2"]
KILL_AT_SAVE = 4  # the worker kills itself while saving this step


def _cfg(run_dir, *extra):
  from atma_jax.config import resolve
  return resolve("tiny", SETS + [f"train.run_dir={run_dir}", *extra])


def _train(cfg, *, data_fn=None, losses_fn=None, logs=None, **kw):
  from atma_jax.train.loop import run
  from test_train_standin import ToyData, standin_losses, standin_model_fn
  return run(cfg, model_fn=standin_model_fn(cfg), losses_fn=losses_fn or standin_losses,
             data_fn=data_fn or (lambda c, i, n: ToyData(c, i, n)), eval_data_fn=None,
             progress=False, log=(logs.append if logs is not None else lambda *_: None), **kw)


def _worker(run_dir):
  """Trains, and SIGKILLs itself inside the save of step KILL_AT_SAVE (data item being written)."""
  from atma_jax.train import checkpoint as ckpt
  get_state = ckpt.IteratorAdapter.get_state

  def dying_get_state(self):
    # the loop hands the checkpoint the device prefetcher, whose state is the host iterator's
    # after the last batch the step consumed
    if self.it.get_state()["pos"] == KILL_AT_SAVE:
      os.kill(os.getpid(), signal.SIGKILL)
    return get_state(self)

  ckpt.IteratorAdapter.get_state = dying_get_state
  _train(_cfg(run_dir))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
  sys.path.insert(0, HERE)
  import conftest  # noqa: F401 - the same 8 fake devices and XLA flags as the test process
  _worker(sys.argv[2])
  sys.exit(0)

from atma_jax.train import checkpoint as ckpt  # noqa: E402
from atma_jax.train import digest  # noqa: E402
from atma_jax.train.divergence import DivergenceError  # noqa: E402



@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """An uninterrupted run: checkpoints 2, 4, 6; the reference for every continuation."""
  root = tmp_path_factory.mktemp("faults")
  summary = _train(_cfg(root / "full"))
  return root / "full", summary


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _largest_state_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _metric_steps(run_dir):
  rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
  return [r["step"] for r in rows if "loss" in r]


def _params(run_dir, step):
  from test_train_standin import standin_model_fn
  cfg = _cfg(run_dir)
  c = ckpt.load_checkpoint(run_dir, step=step, model_fn=standin_model_fn(cfg))
  return [np.asarray(x) for x in jax.tree.leaves(c.params)]


# ----------------------------------------------------------------------------- preemption


def test_kill9_during_save_then_resume_continues_exactly(full, tmp_path):
  full_dir, ref = full
  run_dir = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
  p = subprocess.run([sys.executable, __file__, "worker", str(run_dir)], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
  committed = [d.name for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit()]
  assert committed == ["2"], os.listdir(run_dir / "checkpoints")  # step 4 never committed
  assert 4 in _metric_steps(run_dir)  # the killed run had logged past its last checkpoint
  logs = []
  resumed = _train(_cfg(run_dir), resume=True, logs=logs)
  assert any("resumed from" in l and l.endswith("/2") for l in logs), logs
  assert resumed["steps"] == 6 and not resumed["interrupted"]
  assert resumed["train_losses"] == ref["train_losses"][2:]  # bit-exact continuation
  assert _metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # no step repeated
  for a, b in zip(_params(run_dir, 6), _params(full_dir, 6)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- corrupt files


def test_flipped_bytes_are_caught_and_fall_back(full, tmp_path, monkeypatch):
  full_dir, ref = full
  run_dir = _copy(full_dir, tmp_path / "flipped")
  f = _largest_state_file(run_dir / "checkpoints" / "6")
  b = bytearray(f.read_bytes())
  mid = len(b) // 2
  b[mid:mid + 8] = bytes(x ^ 0x5A for x in b[mid:mid + 8])
  f.write_bytes(bytes(b))
  with pytest.raises(ckpt.CorruptCheckpointError) as e:
    _params(run_dir, 6)
  # raw (incompressible) float bytes decode without complaint: only the digests see the change
  # (16 of 16 random positions tried by hand, not recorded); bytes in a compressed block fail to
  # decode
  silent = "digest mismatch" in str(e.value)
  assert silent or "cannot be read" in str(e.value)
  if silent:
    seen = []
    with monkeypatch.context() as m:  # without the digest check the damage loads silently
      m.setattr(ckpt, "verify", lambda state, step_dir: seen.append(digest.summarize(state)[0]))
      _params(run_dir, 6)
    assert digest.mismatches(ckpt.saved_digests(run_dir / "checkpoints" / "6"), seen[0])
  # resuming falls back to step 4 (one warning naming step 6), sets 6 aside, continues exactly
  logs = []
  resumed = _train(_cfg(run_dir), resume=True, logs=logs)
  warn = [l for l in logs if l.startswith("warning:")]
  assert len(warn) == 1 and "step 6" in warn[0] and "Falling back to step 4" in warn[0], logs
  assert "\n" not in warn[0]
  assert (run_dir / ckpt.SET_ASIDE / "6" / "state").is_dir()  # kept, not deleted
  assert resumed["train_losses"] == ref["train_losses"][4:]


def test_truncated_state_file_one_line_naming_the_file(full, tmp_path, capfd):
  full_dir, _ = full
  run_dir = _copy(full_dir, tmp_path / "truncated")
  f = _largest_state_file(run_dir / "checkpoints" / "6")
  os.truncate(f, f.stat().st_size // 3)
  capfd.readouterr()
  with pytest.raises(ckpt.CorruptCheckpointError) as e:
    _params(run_dir, 6)
  assert str(f) in str(e.value) and "\n" not in str(e.value)
  assert "Traceback" not in capfd.readouterr().err  # orbax's asyncio tracebacks silenced
  warnings = []
  from test_train_standin import standin_model_fn
  c = ckpt.load_checkpoint(run_dir, model_fn=standin_model_fn(_cfg(run_dir)),
                           warn=warnings.append)
  assert c.step_dir.name == "4" and len(warnings) == 1 and str(f) in warnings[0]


def test_missing_and_garbled_files_are_named(full, tmp_path):
  full_dir, _ = full
  run_dir = _copy(full_dir, tmp_path / "damaged")
  step6, step4 = run_dir / "checkpoints" / "6", run_dir / "checkpoints" / "4"
  # the config item is read by name, whatever else the directory holds
  (step6 / "config" / "aaa_unrelated.txt").write_text("not json")
  assert ckpt.read_config(step6).model.hidden_size == 64
  os.remove(step6 / "state" / "_METADATA")
  missing = re.escape(f"{step6}/state/_METADATA is missing")
  with pytest.raises(ckpt.CorruptCheckpointError, match=missing):
    ckpt.resolve_step_dir(run_dir, step=6)
  warnings = []
  assert ckpt.resolve_step_dir(run_dir, warn=warnings.append) == step4
  assert "step 6" in warnings[0] and "_METADATA" in warnings[0]
  data_file = step4 / "data" / "process_0-of-1.json"
  data_file.write_text("{garbled")
  with pytest.raises(ckpt.CorruptCheckpointError, match=re.escape(f"{data_file} is garbled")):
    _train(_cfg(run_dir), resume_step=4)
  data_file = run_dir / "checkpoints" / "2" / "data" / "process_0-of-1.json"
  data_file.write_text(json.dumps({"__json__": {"bogus": 1}}))  # JSON, not an iterator state
  with pytest.raises(ckpt.CorruptCheckpointError,
                     match=re.escape(f"{data_file}: not a state ToyData can resume from")):
    _train(_cfg(run_dir), resume_step=2)
  with pytest.raises(ckpt.CheckpointError, match=r"--step 5: there is no checkpoint"):
    _train(_cfg(run_dir), resume_step=5)


def test_resume_with_another_data_layout_is_refused(full):
  full_dir, _ = full
  for change in ("train.seq_len=32", "train.global_batch=32", "data.seed=1",
                 "data.val_fraction=0.1"):
    with pytest.raises(ckpt.CheckpointError, match=f"{change.split('=')[0]}.*reinterpret"):
      _train(_cfg(full_dir, change), resume=True)


def test_resume_from_an_earlier_step(full, tmp_path):
  full_dir, ref = full
  run_dir = _copy(full_dir, tmp_path / "rewind")
  logs = []
  resumed = _train(_cfg(run_dir), resume_step=2, logs=logs)
  assert resumed["train_losses"] == ref["train_losses"][2:]
  assert sorted(os.listdir(run_dir / ckpt.SET_ASIDE)) == ["4", "6"]
  assert any("aside" in l for l in logs)
  assert _metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]


def test_eval_and_export_take_step(full, tmp_path, capsys):
  full_dir, _ = full
  from atma_jax.eval import cli as eval_cli
  from atma_jax.interop import cli as interop_cli
  assert eval_cli.main(["--checkpoint", str(full_dir), "--step", "5", "--no-progress"]) == 2
  assert "--step 5: there is no checkpoint" in capsys.readouterr().err
  assert interop_cli.main(["export", "--checkpoint", str(full_dir), "--step", "5", "--out",
                           str(tmp_path / "export")]) == 2
  err = capsys.readouterr().err
  assert "--step 5: there is no checkpoint" in err and "available steps: [2, 4, 6]" in err


# ----------------------------------------------------------------------------- divergence


class PoisonAt:
  """ToyData whose batch for step `step` carries a marker token (-1) that poisons the loss."""

  def __init__(self, cfg, step):
    from test_train_standin import ToyData
    self.it, self.step = ToyData(cfg), step

  def __iter__(self):
    return self

  def __next__(self):
    b = next(self.it)
    if self.it.pos == self.step:
      b = dict(b, inputs=b["inputs"].copy())
      b["inputs"][0, 0] = -1
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def poison_losses(cfg, model, inputs, targets, rng, *, train):
  """The stand-in losses, times NaN when the batch holds the marker (NaN loss and gradients)."""
  from test_train_standin import standin_losses
  bad = jnp.any(inputs < 0)
  ce, reg, align = standin_losses(cfg, model, jnp.maximum(inputs, 0), targets, rng, train=train)
  return ce * jnp.where(bad, jnp.nan, 1.0), reg, align


# log_every=4: steps 3 and 4 are read together, by the checkpoint of step 4 (not a log window)
@pytest.mark.parametrize("log_every,logged", [(1, [1, 2, 3]), (4, [1, 2])])
def test_nonfinite_step_stops_and_keeps_the_last_finite_checkpoint(tmp_path, log_every, logged):
  run_dir = tmp_path / "diverged"
  cfg = _cfg(run_dir, "train.keep_checkpoints=1", f"train.log_every={log_every}")
  # step 4 is a checkpoint step: its metrics are read before the save, so it is never written
  with pytest.raises(DivergenceError, match=r"at step 4 \(loss nan.*checkpoints/2, is finite"):
    _train(cfg, data_fn=lambda c, i, n: PoisonAt(c, 4), losses_fn=poison_losses)
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2"]
  assert _metric_steps(run_dir) == logged
  assert all(np.isfinite(a).all() for a in _params(run_dir, 2))


# log_every=4: the skipped step 3 is read inside the window ending at step 4 (its own row)
@pytest.mark.parametrize("log_every", [1, 4])
def test_nonfinite_step_skipped_when_configured(tmp_path, log_every):
  run_dir = tmp_path / "skipped"
  cfg = _cfg(run_dir, "train.on_nonfinite=skip", f"train.log_every={log_every}")
  logs = []
  summary = _train(cfg, data_fn=lambda c, i, n: PoisonAt(c, 3), losses_fn=poison_losses,
                   logs=logs)
  assert summary["steps"] == 6 and summary["skipped_nonfinite"] == 1
  assert logs[-1].startswith("done: step 6/6")
  assert logs[-1].endswith("; 1 non-finite update(s) skipped")
  rows = {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl"))}
  assert rows[3].get("skipped_nonfinite") and not rows[4].get("skipped_nonfinite")
  assert np.isfinite(rows[6]["loss"])
  assert all(np.isfinite(a).all() for a in _params(run_dir, 6))


def test_skip_mode_gives_up_after_too_many_in_a_row():
  from atma_jax.train.divergence import MAX_SKIPS_IN_A_ROW, NonFiniteGuard
  guard = NonFiniteGuard("skip", lambda: "run/checkpoints/4")
  bad = {"finite": 0.0, "loss": float("nan"), "grad_norm": float("inf")}
  assert guard.check(5, bad) and not guard.check(6, {"finite": 1.0})  # a finite step resets
  for step in range(7, 6 + MAX_SKIPS_IN_A_ROW):
    assert guard.check(step, bad)
  with pytest.raises(DivergenceError, match=f"{MAX_SKIPS_IN_A_ROW} updates in a row.*/4"):
    guard.check(6 + MAX_SKIPS_IN_A_ROW, bad)
  assert guard.skipped == MAX_SKIPS_IN_A_ROW + 1


def test_train_cli_reports_divergence_as_error(monkeypatch, capsys):
  import train
  from atma_jax.train import loop

  def diverge(cfg, **kw):
    raise DivergenceError("non-finite loss or gradient at step 7")

  monkeypatch.setattr(loop, "run", diverge)
  assert train.main(["--no-progress"]) == 2
  assert capsys.readouterr().err.strip() == "error: non-finite loss or gradient at step 7"


# ----------------------------------------------------------------------------- digests


def test_digest_is_sharding_invariant_and_sees_one_bit():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("a", "b"))
  x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
  tree = {"w": jnp.asarray(x, jnp.bfloat16), "f": jnp.asarray(x), "n": jnp.arange(5)}
  sharded = {"w": jax.device_put(tree["w"], NamedSharding(mesh, P("a", "b"))),
             "f": jax.device_put(tree["f"], NamedSharding(mesh, P("b", "a"))), "n": tree["n"]}
  assert digest.summarize(tree) == digest.summarize(sharded)
  y = x.copy()
  y.view(np.uint32)[5, 7] ^= 1 << 3
  assert digest.summarize({"f": jnp.asarray(y)})[0] != digest.summarize({"f": tree["f"]})[0]
  y[0, 0], y[1, 0] = x[1, 0], x[0, 0]  # two values swapped
  assert digest.summarize({"f": jnp.asarray(y)})[0] != digest.summarize({"f": tree["f"]})[0]
  y[1, 1] = np.nan
  assert digest.summarize({"f": jnp.asarray(y)})[1] == ["f"]


# ----------------------------------------------------------------------------- multi-process


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_multiprocess_arguments_checked_before_connecting():
  from atma_jax.config import ConfigError
  from atma_jax.train.distributed import init_distributed
  with pytest.raises(ConfigError, match="expected host:port"):
    init_distributed("nohost", 2, 0)
  with pytest.raises(ConfigError, match="0 <= process_id < num_processes"):
    init_distributed("127.0.0.1:1", 2, 2)
  with pytest.raises(ConfigError, match="--init-timeout 0: must be a positive"):
    init_distributed("127.0.0.1:1", 2, 1, timeout_s=0)


def test_multiprocess_start_that_never_fills_times_out_with_a_message():
  port_none, port_host = _free_port(), _free_port()
  timeout = 4
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmds = {  # nothing listens on port_none; process 0 on port_host waits for 2 more processes
      "lost": ["--coordinator", f"127.0.0.1:{port_none}", "--num-processes", "2",
               "--process-id", "1"],
      "host": ["--coordinator", f"127.0.0.1:{port_host}", "--num-processes", "3",
               "--process-id", "0"]}
  t0 = time.time()
  procs = {k: subprocess.Popen([sys.executable, "train.py", "--init-timeout", str(timeout),
                                "--no-progress", *v], env=env, cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for k, v in cmds.items()}
  try:
    out = {k: p.communicate(timeout=120) for k, p in procs.items()}
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
  wall = time.time() - t0
  for k, p in procs.items():
    err = out[k][1].strip().splitlines()
    assert p.returncode == 2, out[k]
    assert err[-1].startswith(f"error: multi-process start timed out after {timeout} s"), err
  assert f"cannot reach the coordinator at 127.0.0.1:{port_none}" in out["lost"][1]
  assert "1 of the 3 expected processes are connected" in out["host"][1]
  assert wall < timeout + 60  # interpreter and JAX import included; no multi-minute hang
