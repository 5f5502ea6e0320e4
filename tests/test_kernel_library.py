"""The kernel library's structure: a leaf package (nothing under `pallas_kernels` imports or
names `atma_jax`; dependencies point one way: pallas_kernels <- atma_jax.model <- train / eval /
generate) with one backend dispatch (`pallas_kernels.dispatch`) both ops use."""

import ast
import pathlib
import sys
import types
import warnings

import jax.numpy as jnp
import pytest

from pallas_kernels import dispatch, gated_delta, polar_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imported_modules(path: pathlib.Path):
  """Every module name `path` imports: import statements and importlib / __import__ strings."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      fn = node.func
      name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
      if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        yield node.args[0].value


def test_kernel_library_never_imports_the_model_package():
  files = sorted((ROOT / "pallas_kernels").rglob("*.py"))
  assert len(files) > 10, files  # the walk found the library
  offenders = [f"{f.relative_to(ROOT)}: {m}" for f in files for m in _imported_modules(f)
               if m == "atma_jax" or m.startswith("atma_jax.")]
  assert not offenders, offenders


def test_kernel_library_never_names_the_model_package():
  """A leaf library does not know its caller: no file under pallas_kernels mentions `atma_jax`
  (code, strings or docstrings), so no dynamic import can be built from a name written there."""
  files = sorted(p for p in (ROOT / "pallas_kernels").rglob("*") if p.is_file()
                 and "__pycache__" not in p.parts)
  assert any(f.name == "dispatch.py" for f in files), files  # the walk found the library
  offenders = [f"{f.relative_to(ROOT)}:{i}" for f in files
               for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
               if "atma_jax" in line]
  assert not offenders, offenders


def test_dispatch_tables_name_only_library_modules():
  # the modules dispatch imports at run time (importlib, from the BACKENDS strings) are the
  # library's own
  for pkg, t in _tables():
    modules = {t.xla} | {c.module for cs in t.pallas.values() for c in cs}
    assert all(m.startswith(pkg.__name__ + ".") for m in modules), modules


def _tables():
  """(op package, dispatch table) for every kernel op of the library."""
  return ((polar_attention, polar_attention.BACKENDS), (gated_delta, gated_delta.BACKENDS),
          (gated_delta, gated_delta.STEP_BACKENDS))


def test_import_scan_sees_model_imports():
  # the scanner itself finds such an import where one exists
  assert "atma_jax" in set(_imported_modules(ROOT / "atma_jax" / "model" / "ops.py"))


# The library's public modules: the op packages (their exports), `api`, the oracles, the shared
# integer / chunk math, and every backend module a dispatch table names (a backend's contract:
# its fwd / bwd entry points, `unsupported_reason`, its config). The rest (gpu_tiles,
# gpu_forward, gpu_backward, gpu_common) is private to the library.
KERNEL_OPS = {"attention_stats", "polar_stats", "polar_core", "softmax_attention",
              "attention_stats_at", "polar_core_at", "softmax_attention_at",
              "gated_delta_rule", "gated_delta_step"}


def _public_modules():
  out = {"pallas_kernels", "pallas_kernels.dispatch"}
  for pkg, extra in ((polar_attention, ("bands",)), (gated_delta, ("chunk_math",))):
    out |= {pkg.__name__} | {f"{pkg.__name__}.{m}" for m in ("api", "reference") + extra}
  for _, t in _tables():
    out |= {t.xla} | {c.module for cs in t.pallas.values() for c in cs}
  return out


def _kernel_imports(path: pathlib.Path):
  """(module, names) for every import of a pallas_kernels module in `path`; `from P import m`
  of a submodule m counts as importing P.m."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      yield from ((a.name, ()) for a in node.names if a.name.startswith("pallas_kernels"))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pallas_kernels"):
      base = ROOT.joinpath(*node.module.split("."))
      subs = [a.name for a in node.names
              if (base / f"{a.name}.py").exists() or (base / a.name / "__init__.py").exists()]
      yield from ((f"{node.module}.{m}", ()) for m in subs)
      names = tuple(a.name for a in node.names if a.name not in subs)
      if names:
        yield node.module, names


def test_tests_import_only_public_kernel_modules():
  public = _public_modules()
  files = sorted((ROOT / "tests").rglob("*.py"))
  private = [f"{f.relative_to(ROOT)}: {m}" for f in files for m, _ in _kernel_imports(f)
             if m not in public]
  assert not private, private
  assert "pallas_kernels.polar_attention.gpu_mosaic" in public  # from the dispatch table


def test_model_imports_kernel_ops_only_through_its_ops_seam():
  """atma_jax imports only the op packages; only model/ops.py takes the kernel ops themselves
  (other modules may take the packages' jnp helpers, e.g. stats_dtype)."""
  packages = {polar_attention.__name__, gated_delta.__name__}
  seam = ROOT / "atma_jax" / "model" / "ops.py"
  bad = []
  for f in sorted((ROOT / "atma_jax").rglob("*.py")):
    for module, names in _kernel_imports(f):
      if module not in packages or (f != seam and KERNEL_OPS & set(names)) or (
          f != seam and not names):
        bad.append(f"{f.relative_to(ROOT)}: {module} {names}")
  assert not bad, bad
  assert {m for m, _ in _kernel_imports(seam)} == packages


# ----------------------------------------------------------------------------- dispatch

def _fake_backend(name, reason=None):
  """A backend module `name` whose `unsupported_reason` returns `reason` for every call."""
  mod = types.ModuleType(name)
  mod.run = lambda *a: name
  mod.unsupported_reason = lambda *a, **kw: reason
  return mod


@pytest.fixture
def fake_table(monkeypatch):
  mods = {n: _fake_backend(f"fake_dispatch_{n}", r) for n, r in (
      ("xla", None), ("fast", None), ("fast_refuses", "tile too small"), ("general", None),
      ("general_refuses", "dtype int8 not taken"))}
  for m in mods.values():
    monkeypatch.setitem(sys.modules, m.__name__, m)
  monkeypatch.setattr(dispatch, "platform_of", lambda x: "gpu")
  dispatch.load.cache_clear()  # fresh fake modules under the same names in every test

  def table(*cands):
    return dispatch.Backends(op="fake", xla="fake_dispatch_xla", exports=("run",),
                             pallas={"gpu": tuple(dispatch.Candidate(f"fake_dispatch_{n}", needs)
                                                  for n, needs in cands)},
                             arg_names=("q",))
  yield mods, table
  dispatch.load.cache_clear()


def test_dispatch_takes_the_first_candidate_the_hardware_has_and_that_takes_the_call(
    fake_table, monkeypatch):
  mods, table = fake_table
  x = jnp.zeros((2, 3))
  t = table(("fast", "hopper"), ("general", None))
  for hopper, want in ((True, "fast"), (False, "general")):
    monkeypatch.setattr(dispatch, "is_hopper", lambda h=hopper: h)
    for impl in ("auto", "pallas"):
      assert dispatch.select(t, impl, (x,)) is mods[want]
  assert dispatch.select(t, "xla", (x,)) is mods["xla"]
  monkeypatch.setattr(dispatch, "is_hopper", lambda: True)
  assert dispatch.select(table(("fast_refuses", "hopper"), ("general", None)), "pallas",
                         (x,)) is mods["general"]


def test_dispatch_pallas_error_names_every_refusal_and_auto_falls_back(fake_table, monkeypatch):
  mods, table = fake_table
  monkeypatch.setattr(dispatch, "is_hopper", lambda: False)
  t = table(("fast", "hopper"), ("general_refuses", None))
  x = jnp.zeros((2, 3), jnp.int8)
  assert dispatch.select(t, "auto", (x,), {"window": 4}) is mods["xla"]
  with pytest.raises(ValueError) as err:
    dispatch.select(t, "pallas", (x,), {"window": 4})
  msg = str(err.value)
  for part in ("q (2, 3) int8", "window=4", "fake_dispatch_fast needs a Hopper GPU",
               "fake_dispatch_general_refuses dtype int8 not taken", "impl='auto'"):
    assert part in msg, (part, msg)
  with pytest.raises(ValueError, match="impl must be one of"):
    dispatch.select(t, "triton", (x,))


def test_dispatch_caches_modules_and_skips_an_unimportable_one(fake_table):
  mods, table = fake_table
  t = table(("not_a_module_anywhere", None), ("general", None))
  x = jnp.zeros(2)
  with pytest.warns(UserWarning, match="unavailable"):
    assert dispatch.select(t, "pallas", (x,)) is mods["general"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # cached: no second import attempt, no second warning
    assert dispatch.select(t, "auto", (x,)) is mods["general"]
  with pytest.raises(ValueError, match="cannot be imported"):
    dispatch.select(table(("not_a_module_anywhere", None)), "pallas", (x,))
