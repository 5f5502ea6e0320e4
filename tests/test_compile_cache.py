"""The persistent compilation cache of the CLIs (atma_jax/compile_cache.py), on CPU: which folder
a setting picks, a bad folder fails before compute, a recompiled train step is loaded from the
cache (counted by jax.monitoring events and seen in the cache folder) with bit-identical losses
and an honest first-step line, `off` writes nothing, and a Pallas kernel in interpret mode
reloads in a fresh process with bit-identical outputs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cc

import train
from atma_jax import compile_cache as cc
from atma_jax.config import resolve
from atma_jax.errors import UsageError
from atma_jax.train.loop import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.num_layers=2", "model.global_offset=1", "model.hidden_size=64",
         "model.head_dim=16", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=8",
         "train.steps=2", "train.log_every=1", "train.eval_batches=0",
         "train.checkpoint_every=0", "train.async_checkpoint=false",
         "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"]
JAX_KEYS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
            "jax_persistent_cache_min_compile_time_secs")


def small_args(run_dir) -> list[str]:
  """train.py arguments of the SMALL config writing to `run_dir`."""
  return [a for s in SMALL + [f"train.run_dir={run_dir}"] for a in ("--set", s)] + [
      "--config", "tiny", "--no-progress"]


@pytest.fixture
def jax_cache(monkeypatch):
  """Leaves JAX's cache settings as this test found them (configure changes them globally)."""
  saved = {k: getattr(jax.config, k) for k in JAX_KEYS}
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  jax_cc.reset_cache()


def cache_files(path) -> list[str]:
  return sorted(n for n in os.listdir(path) if n.endswith("-cache")) if os.path.isdir(path) else []


def test_choose_precedence(monkeypatch, tmp_path, jax_cache):
  monkeypatch.setenv(cc.ENV_VAR, str(tmp_path / "from_env"))
  assert cc.choose("auto", "train.compile_cache") == cc.Choice(
      str(tmp_path / "from_env"), cc.ENV_VAR, True)
  assert cc.choose(str(tmp_path / "named"), "x").path == str(tmp_path / "named")  # beats env
  for off in ("off", "OFF", "none", "false"):
    assert cc.choose(off, "x") == cc.Choice(None, "x", True)
  monkeypatch.setenv(cc.ENV_VAR, "off")
  assert cc.choose("auto", "x").path is None
  monkeypatch.delenv(cc.ENV_VAR)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_own"))
  assert cc.choose("auto", "x") == cc.Choice(str(tmp_path / "jax_own"), "jax config", False)
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cc.choose("auto", "x") == cc.Choice(
      str(tmp_path / "xdg" / "atma_jax" / "jax_cache"), "default", False)
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert cc.default_dir() == str(tmp_path / "home" / ".cache" / "atma_jax" / "jax_cache")
  assert cc.choose("~/c", "x").path == str(tmp_path / "home" / "c")


def test_configure_sets_threshold_unless_the_environment_does(monkeypatch, tmp_path, jax_cache):
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
  cc.configure(str(tmp_path / "a"), "x")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == cc.MIN_COMPILE_SECS
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.configure(str(tmp_path / "b"), "x")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def test_unwritable_named_folder_fails_before_compute(tmp_path, capsys, jax_cache):
  (tmp_path / "file").write_text("in the way")
  bad = tmp_path / "file" / "cache"
  with pytest.raises(UsageError, match="compile_cache=.*cannot be written.*or off"):
    cc.configure(str(bad), "train.compile_cache")
  run_dir = tmp_path / "run"
  assert train.main(small_args(run_dir) + ["--set", f"train.compile_cache={bad}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: train.compile_cache=") and "off" in err[0]
  assert not run_dir.exists()  # nothing started


def test_unwritable_folder_found_by_auto_only_turns_the_cache_off(monkeypatch, tmp_path, jax_cache):
  monkeypatch.delenv(cc.ENV_VAR, raising=False)
  jax.config.update("jax_compilation_cache_dir", None)
  (tmp_path / "file").write_text("in the way")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
  notes = []
  assert cc.configure("auto", "x", log=notes.append).path is None
  assert cc.active_dir() is None and len(notes) == 1 and cc.ENV_VAR in notes[0]
  jax.config.update("jax_enable_compilation_cache", True)  # JAX's own folder, unwritable
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "file" / "jax"))
  assert cc.configure("auto", "x", log=notes.append).path is None
  assert cc.active_dir() is None and len(notes) == 2


def test_summarize_verdicts():
  C = cc.Compile
  assert cc.summarize([])["verdict"] == "none"
  assert cc.summarize([C("a", 1.0, "uncached")])["verdict"] == "off"
  assert cc.summarize([C("a", 0.1, "loaded"), C("b", 0.0, "uncached")])["verdict"] == "hit"
  assert cc.summarize([C("a", 0.1, "loaded"), C("b", 0.2, "compiled")])["verdict"] == "hit"
  assert cc.summarize([C("a", 2.0, "written"), C("b", 0.1, "compiled")])["verdict"] == "miss"
  s = cc.summarize([C("a", 0.1, "loaded"), C("b", 3.0, "written")])
  assert (s["verdict"], s["loaded"], s["written"], s["slowest"]) == ("partial", 1, 1, "b")
  assert cc.describe([C("jit(step)", 0.5, "loaded")], "/c") == (
      "compile 0.5 s: jit(step) loaded (persistent compilation cache hit, /c)")
  assert cc.describe([C("a", 0.1, "loaded"), C("b", 3.0, "written")], "/c") == (
      "compile 3.1 s: 2 programs (slowest b): 1 loaded, 1 compiled and written (persistent "
      "compilation cache partial, /c)")
  assert cc.describe([C("b", 3.0, "uncached")], None) == (
      "compile 3.0 s: b compiled (persistent compilation cache off)")


@pytest.mark.slow
def test_recompiled_step_loads_from_the_cache_with_identical_losses(tmp_path, jax_cache):
  """Two runs of one config, each compiling its train step anew (a new jit): the first writes
  it to the cache, the second loads it, with the same losses bit for bit."""
  folder = tmp_path / "cache"
  cc.configure(str(folder), "train.compile_cache")
  out = {}
  for name in ("cold", "warm"):
    lines = []
    out[name] = run(resolve("tiny", SMALL + [f"train.run_dir={tmp_path / name}"]),
                    progress=False, log=lines.append)
    out[name]["lines"] = lines
  cold, warm = out["cold"], out["warm"]
  assert cold["first_step_compile"]["verdict"] == "miss"
  assert cold["first_step_compile"]["written"] >= 1
  assert any(n.startswith("jit_train_step-") for n in cache_files(folder))
  assert warm["first_step_compile"]["verdict"] == "hit"
  assert warm["first_step_compile"]["loaded"] >= 1 and warm["first_step_compile"]["written"] == 0
  assert any("persistent compilation cache miss" in line for line in cold["lines"])
  assert any("persistent compilation cache hit" in line for line in warm["lines"])
  assert len(cold["train_losses"]) == 2
  assert cold["train_losses"] == warm["train_losses"]  # bit for bit
  rows = [json.loads(r) for r in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["first_step_compile"]["verdict"] == "hit" and "first_step_s" in rows[0]


def test_off_writes_nothing(monkeypatch, tmp_path, jax_cache):
  """`off` after a cache was in use: a program compiled then is not written anywhere (neither
  to the previous folder nor the per-user default) and is reported as compiled outside it."""
  folder = tmp_path / "cache"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  cc.configure(str(folder), "train.compile_cache")
  jax.jit(lambda x: jnp.cos(x) * 3)(jnp.ones(5)).block_until_ready()
  before = cache_files(folder)
  assert before  # the threshold is 0 in the suite: this tiny program was written
  cc.configure("off", "train.compile_cache")
  log = cc.CompileLog.get()
  mark = log.mark()
  jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()
  assert [e.outcome for e in log.since(mark)] == ["uncached"]
  assert cc.summarize(log.since(mark))["verdict"] == "off"
  assert "cache off" in cc.describe(log.since(mark), cc.active_dir())
  assert cache_files(folder) == before and not (tmp_path / "xdg").exists()


KERNEL_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from atma_jax import compile_cache as cc
cc.configure(sys.argv[1], "test")
from pallas_kernels.polar_attention import gpu_triton
config = gpu_triton.BlockConfig(block_q=16, block_k=16, interpret=True)
key = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(key[0], (1, 40, 2, 16), jnp.float32)
k = jax.random.normal(key[1], (1, 40, 1, 16), jnp.float32)
v = jax.random.normal(key[2], (1, 40, 1, 16), jnp.float32)
scale = jnp.full((1, 40, 2), 0.25, jnp.float32)
log = cc.CompileLog.get()
mark = log.mark()
f = jax.jit(lambda q, k, v, s: gpu_triton.attention_stats_fwd(q, k, v, s, window=24,
                                                             config=config))
o, lse, p2 = f(q, k, v, scale)
entry = [e for e in log.since(mark) if "lambda" in e.name]
print(json.dumps({"outcome": [e.outcome for e in entry],
                  "bytes": [np.asarray(x).tobytes().hex() for x in (o, lse, p2)]}))
"""


@pytest.mark.slow
def test_pallas_interpret_kernel_reloads_in_a_fresh_process(tmp_path):
  """A jitted Pallas kernel (interpret mode on CPU) written by one process is loaded by the
  next and gives the same bits."""
  folder = str(tmp_path / "cache")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  res = []
  for _ in range(2):
    p = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, folder], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res.append(json.loads(p.stdout.strip().splitlines()[-1]))
  assert res[0]["outcome"] == ["written"] and res[1]["outcome"] == ["loaded"]
  assert res[0]["bytes"] == res[1]["bytes"]


def test_eval_and_generate_reject_an_unwritable_cache_before_loading(tmp_path, tiny_run_dir,
                                                                      no_load, capsys, jax_cache):
  from atma_jax.eval import cli as eval_cli
  from atma_jax.generate import cli as generate_cli

  (tmp_path / "file").write_text("in the way")
  bad = str(tmp_path / "file" / "cache")
  assert eval_cli.main(["--checkpoint", str(tiny_run_dir), "--out", str(tmp_path / "ev"),
                        "--compile-cache", bad, "--no-progress"]) == 2
  assert generate_cli.main(["--checkpoint", str(tiny_run_dir), "--prompt", "hi",
                            "--compile-cache", bad]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and all(e.startswith("error: --compile-cache=") for e in err)
