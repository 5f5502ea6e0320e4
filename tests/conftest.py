"""Test setup: 8 fake CPU devices so sharded code paths run on a laptop or CI machine."""

import getpass
import os
import tempfile

# LLVM -O0 for the CPU backend: tests are compile-bound, and this about halves compile time.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLIs keep compiled programs in a per-user folder by default (atma_jax/compile_cache.py);
# the suite must not write into the user's home. Every CLI a test starts, in this process or as
# a subprocess (which inherits this environment), uses the suite's own folder under /tmp instead,
# writing every program (threshold 0): the folder and threshold test_train.py and the other
# training tests give JAX, for speed. Results never depend on it (test_compile_cache.py checks
# that reloaded programs give bit-identical losses); a fresh CI machine starts it empty.
# One folder per user (another user's folder under /tmp would be unwritable: a UsageError).
TEST_COMPILE_CACHE = os.path.join(tempfile.gettempdir(),
                                  f"atma_jax_test_compile_cache_{getpass.getuser()}")
os.environ.setdefault("ATMA_COMPILE_CACHE", TEST_COMPILE_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

# In-process training runs (test_train*, test_faults_train) share their compilations through it.
jax.config.update("jax_compilation_cache_dir", os.environ["ATMA_COMPILE_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  if config.option.markexpr.strip() == "gpu":  # asked for the GPU tests only: skipping all is a
    raise pytest.UsageError(  # mistake, not a result (one GPU call was lost to it)
        "-m gpu selects the GPU tests, but JAX sees no GPU (this conftest defaults "
        "JAX_PLATFORMS=cpu): run JAX_PLATFORMS=cuda XLA_FLAGS= python3 -m pytest -m gpu ...")
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
  """A run directory holding one tiny step-0 checkpoint (eval.testing.save_tiny_checkpoint),
  shared by the CLI tests: they may add report folders to it but never change checkpoints/."""
  from atma_jax.eval.testing import save_tiny_checkpoint

  d = tmp_path_factory.mktemp("tiny_run")
  save_tiny_checkpoint(d)
  return d


@pytest.fixture
def no_load(monkeypatch):
  """Any attempt to read a checkpoint's arrays fails the test: input errors must come first."""
  from atma_jax.train import checkpoint

  def boom(*a, **k):
    raise AssertionError("load_model reached despite a bad argument")

  monkeypatch.setattr(checkpoint, "load_model", boom)
  monkeypatch.setattr(checkpoint, "load_checkpoint", boom)
