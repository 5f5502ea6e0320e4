"""`pallas_kernels` is a leaf library: nothing under it imports `atma_jax` (dependencies point
one way: pallas_kernels <- atma_jax.model <- train / eval / generate)."""

import ast
import pathlib

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


def test_import_scan_sees_model_imports():
  # the scanner itself finds such an import where one exists
  assert "atma_jax" in set(_imported_modules(ROOT / "atma_jax" / "model" / "ops.py"))
