"""End-to-end training on the real tiny model + data pipeline: loss falls, SIGTERM checkpoint,
bit-exact resume, load_model, checkpoint validation, CLI errors."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from atma_jax.config import ConfigError, resolve
from atma_jax.train import checkpoint as ckpt
from atma_jax.train.loop import default_data_fn, run


SMALL = ["model.num_layers=2", "model.global_offset=1", "model.hidden_size=64",
         "model.head_dim=16", "train.seq_len=32",
         "train.global_batch=8", "train.micro_batch=4", "train.steps=4", "train.eval_every=2",
         "train.eval_batches=2", "train.checkpoint_every=2", "train.async_checkpoint=false",
         "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _cfg(run_dir, *extra):
  return resolve("tiny", SMALL + [f"train.run_dir={run_dir}", *extra])


class SigtermAt:
  """Data iterator wrapper that sends this process SIGTERM when batch `at` is fetched."""

  def __init__(self, it, at):
    self.it, self.at, self.n = it, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.n == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    self.n += 1
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  full = run(_cfg(root / "full"), progress=False, log=lambda *_: None)
  cfg = _cfg(root / "split", "train.prefetch=0")  # SigtermAt counts batches as the step reads
  first = run(cfg, progress=False, log=lambda *_: None,
              data_fn=lambda c, i, n: SigtermAt(default_data_fn(c, i, n), at=1))
  second = run(cfg, resume=True, progress=False, log=lambda *_: None)
  return root, full, first, second


@pytest.mark.slow
def test_loss_falls(runs):
  _, full, _, _ = runs
  vals = [v for _, v in full["val_losses"]]
  assert vals[0] == pytest.approx(np.log(50304), abs=1e-4)  # zero-init LM head (§10.26)
  assert vals[-1] < vals[0] - 0.2
  assert full["train_losses"][-1][1] < full["train_losses"][0][1]


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_bit_exact(runs):
  root, full, first, second = runs
  assert first["interrupted"] and first["steps"] == 2
  assert (root / "split" / "checkpoints" / "2" / "data").is_dir()
  assert not full["interrupted"] and second["steps"] == 4
  # losses of the uninterrupted run == first part + resumed part, bit for bit
  assert full["train_losses"] == first["train_losses"] + second["train_losses"]
  assert full["val_losses"][-1] == second["val_losses"][-1]
  lines = [json.loads(l) for l in open(root / "full" / "metrics.jsonl")]
  assert any("val_loss" in l for l in lines) and any("grad_norm" in l for l in lines)


@pytest.mark.slow
def test_load_model_and_checkpoint_errors(runs):
  root = runs[0]
  cfg, graphdef, params = ckpt.load_model(root / "full")
  assert cfg.model.hidden_size == 64
  cfg2, _, params2 = ckpt.load_model(root / "full" / "checkpoints" / "4")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ckpt.CheckpointError, match="does not exist"):
    ckpt.load_model(root / "nope")
  with pytest.raises(ckpt.CheckpointError, match="no checkpoints"):
    ckpt.load_model(root)
  # partial: a missing item, then an uncommitted save
  bad = root / "bad"
  shutil.copytree(root / "full" / "checkpoints" / "2", bad / "checkpoints" / "2")
  shutil.rmtree(bad / "checkpoints" / "2" / "data")
  with pytest.raises(ckpt.CheckpointError, match="partial"):
    ckpt.load_model(bad)
  os.remove(root / "full" / "checkpoints" / "2" / "_CHECKPOINT_METADATA")
  with pytest.raises(ckpt.CheckpointError, match="partial"):
    ckpt.load_model(root / "full" / "checkpoints" / "2")
  # architecture mismatch: resume with another width fails before any compute
  other = _cfg(root / "full", "model.hidden_size=128", "model.head_dim=32")
  with pytest.raises(ckpt.CheckpointError, match="another architecture.*hidden_size"):
    run(other, resume=True, progress=False, log=lambda *_: None)
  with pytest.raises(ckpt.CheckpointError, match="another architecture"):
    ckpt.load_model(root / "full", requested=other)
  # a run dir with checkpoints but no --resume
  with pytest.raises(ConfigError, match="--resume"):
    run(_cfg(root / "full"), progress=False, log=lambda *_: None)


def test_cli_rejects_bad_input(capsys, tmp_path):
  import train
  assert train.main(["--set", "train.bogus=1"]) == 2
  assert "unknown config key" in capsys.readouterr().err
  assert train.main(["--config", "nonexistent_preset"]) == 2
  assert "unknown config preset" in capsys.readouterr().err
  assert train.main(["--set", "train.steps=abc"]) == 2
  assert "bad value for train.steps" in capsys.readouterr().err
  # a mesh that does not match the 8 devices, and a batch that does not divide it
  assert train.main(["--set", "mesh.data=3", "--set", f"train.run_dir={tmp_path}"]) == 2
  assert "8 are available" in capsys.readouterr().err
  assert train.main(["--set", "mesh.data=8", "--set", "train.global_batch=4", "--set",
                     "train.micro_batch=4", "--set", f"train.run_dir={tmp_path}"]) == 2
  assert "does not divide the mesh" in capsys.readouterr().err
  # cadences the loop divides by
  for bad in ("train.eval_every=0", "train.log_every=0", "train.steps=0"):
    assert train.main(["--set", bad, "--set", f"train.run_dir={tmp_path}"]) == 2
    assert f"{bad} must be >= 1" in capsys.readouterr().err
  assert train.main(["--coordinator", "127.0.0.1:1"]) == 2
  assert "--num-processes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- metrics (MFU)

def test_matmul_chain_matches_numpy_and_peak_accounting():
  import jax.numpy as jnp
  from atma_jax.train import metrics
  rng = np.random.default_rng()
  n, chain = 32, 3
  a = jnp.asarray(rng.standard_normal((n, n)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n), jnp.bfloat16)
  for out_dtype in (jnp.bfloat16, jnp.float32):
    want = np.asarray(a, np.float64)
    for _ in range(chain):  # bf16 operands, exact accumulation, result rounded to bf16
      want = np.asarray(jnp.asarray(want @ np.asarray(b, np.float64), jnp.bfloat16), np.float64)
    got = np.asarray(metrics.matmul_chain(a, b, chain, out_dtype), np.float64)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())
  r = metrics.measure_matmul_peak(64, chain=2, reps=3, warmup=1, out_dtype=jnp.float32)
  assert r["flops_per_call"] == 2 * 64 ** 3 * 2 and r["output"] == "float32"
  assert r["call_s_median"] == sorted(r["call_s_all"])[1]
  assert r["flops_per_s"] == pytest.approx(r["flops_per_call"] / r["call_s_median"])
  with pytest.raises(ValueError, match="must be positive"):
    metrics.measure_matmul_peak(0)


def test_mfu_and_datasheet_peak():
  from atma_jax.train import metrics

  class Dev:
    device_kind = "NVIDIA H100 80GB HBM3"

  assert metrics.peak_flops(Dev()) == 989e12
  assert metrics.peak_flops(jax.devices("cpu")[0]) is None
  tps, fpt = 97028.26, metrics.flops_per_token(378220864, 16, 1024, 2048)
  assert fpt == 6 * 378220864 + 12 * 16 * 1024 * 2048
  assert metrics.mfu(tps, fpt, 2, 718e12) == pytest.approx(tps * fpt / (2 * 718e12))
  assert metrics.mfu(tps, fpt, 1, None) is None
