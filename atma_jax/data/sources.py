"""Document sources: deterministic streams of `(name, text)` documents.

- `embedded`: the Python standard library's own `.py` sources plus the `pydoc_data` help topics
  (real text present on every machine with Python; no download).
- `english`: opt-in Debian packages: the CPython reST docs (`python3.11-doc`) and the Linux kernel
  `Documentation/**/*.rst` (`linux-source-6.1`). Austen and the KJV are *not* training text; they
  live in `eval_docs.py` as held-out long documents.
- `hf`: a HuggingFace dataset by name (needs the `datasets` package and network).

Every document has a stable name; `split_of(name, val_fraction)` assigns it to "train", "val" or
"heldout" by a hash of the name alone, so the split never depends on file order, machine, seed or
which other documents exist. "heldout" (a fixed `HELDOUT_FRACTION` of names) is never trained on
or validated on: `eval_docs.long_documents("code", ...)` draws from it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tarfile
from typing import Iterator

from atma_jax.errors import AtmaError

Document = tuple[str, str]  # (stable name, text)

HELDOUT_FRACTION = 0.10  # names hashing into [1 - HELDOUT_FRACTION, 1) are eval-only

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_SKIP_FILES = {"pydoc_data/topics.py"}  # its content is the topics documents below

# Debian packages of the english corpus (bookworm names) and what each provides.
PY_DOC_PACKAGE = "python3.11-doc"
PY_DOC_DIR = "/usr/share/doc/python3.11/html/_sources"
KERNEL_PACKAGE = "linux-source-6.1"
KERNEL_TARBALL_GLOB = "/usr/src/linux-source-6.1.tar.*"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDB = "/usr/lib/R/site-library/janeaustenr/data/Rdata"
KJV_PACKAGE = "bible-kjv"


class SourceError(AtmaError, RuntimeError):
  """A corpus is unavailable; the message says what to install or set."""


def name_hash01(name: str) -> float:
  """A uniform number in [0, 1) from the document name (sha256; stable across machines)."""
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(name: str, val_fraction: float) -> str:
  """"val" if the name hashes below `val_fraction`, "heldout" in the top HELDOUT_FRACTION,
  "train" otherwise."""
  if not 0.0 <= val_fraction < 1.0 - HELDOUT_FRACTION:
    raise SourceError(f"data.val_fraction={val_fraction} must lie in [0, {1 - HELDOUT_FRACTION})"
                      f" ({HELDOUT_FRACTION:.0%} of documents are reserved for long-context eval).")
  u = name_hash01(name)
  if u >= 1.0 - HELDOUT_FRACTION:
    return "heldout"
  return "val" if u < val_fraction else "train"


def _read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="ignore")


# ---------------------------------------------------------------------------------------------
# embedded: the standard library


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[tuple[str, str]]:
  """`(relative name, absolute path)` of the stdlib's non-test `.py` files, sorted by name."""
  root = stdlib_dir()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test_"))
    for fn in filenames:
      if not fn.endswith(".py") or fn.startswith("test_"):
        continue
      path = os.path.join(dirpath, fn)
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      if rel not in _SKIP_FILES:
        out.append((rel, path))
  out.sort()
  return out


def embedded_documents() -> Iterator[Document]:
  """The stdlib `.py` files (name `py:<relpath>`) then the pydoc topics (name `topic:<key>`)."""
  for rel, path in stdlib_files():
    text = _read_text(path)
    if text.strip():
      yield f"py:{rel}", text
  try:
    from pydoc_data.topics import topics
  except ImportError:  # some distributions strip pydoc_data
    topics = {}
  for key in sorted(topics):
    if topics[key].strip():
      yield f"topic:{key}", topics[key]


# ---------------------------------------------------------------------------------------------
# english: Debian packages


def apt_hint(*packages: str) -> str:
  return f"apt-get update && apt-get install -y {' '.join(packages)}"


def python_doc_files() -> list[tuple[str, str]]:
  if not os.path.isdir(PY_DOC_DIR):
    raise SourceError(f"the CPython docs are missing ({PY_DOC_DIR}); install them with: "
                      f"{apt_hint(PY_DOC_PACKAGE)}")
  files = sorted(glob.glob(os.path.join(PY_DOC_DIR, "**", "*.txt"), recursive=True))
  return [(os.path.relpath(p, PY_DOC_DIR), p) for p in files]


def kernel_tarball() -> str:
  found = sorted(glob.glob(KERNEL_TARBALL_GLOB))
  if not found:
    raise SourceError(f"the Linux kernel source tarball ({KERNEL_TARBALL_GLOB}) is missing; "
                      f"install it with: {apt_hint(KERNEL_PACKAGE)}")
  return found[-1]


def english_fingerprint() -> str:
  """Identifies the english inputs cheaply: names, sizes and mtimes of the source files."""
  h = hashlib.sha256()
  for rel, path in python_doc_files():
    st = os.stat(path)
    h.update(f"{rel}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
  tb = kernel_tarball()
  st = os.stat(tb)
  h.update(f"{os.path.basename(tb)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
  return h.hexdigest()


def english_documents() -> Iterator[Document]:
  """CPython reST docs (`pydoc:<rel>`), then kernel Documentation reST (`kernel:<rel>`), each in
  sorted order. Raises SourceError (with the apt-get line) if a package is missing."""
  doc_files = python_doc_files()
  tb = kernel_tarball()
  for rel, path in doc_files:
    text = _read_text(path)
    if text.strip():
      yield f"pydoc:{rel}", text
  members = []
  with tarfile.open(tb) as tar:  # one sequential pass (xz); collect then sort
    for m in tar:
      parts = m.name.split("/")
      if (m.isfile() and len(parts) > 2 and parts[1] == "Documentation"
          and m.name.endswith(".rst")):
        data = tar.extractfile(m).read().decode("utf-8", errors="ignore")
        members.append(("/".join(parts[1:]), data))
  members.sort()
  for rel, text in members:
    if text.strip():
      yield f"kernel:{rel}", text


# ---------------------------------------------------------------------------------------------
# Held-out long texts (never training data): Austen and the King James Bible.


def austen_novels() -> list[Document]:
  """The six Austen novels from the R package's lazy-load database (no R needed)."""
  from atma_jax.data.rdata import read_lazyload_db

  if not os.path.isfile(AUSTEN_RDB + ".rdx"):
    raise SourceError(f"Jane Austen's novels ({AUSTEN_RDB}.rdb) are missing; install them with: "
                      f"{apt_hint(AUSTEN_PACKAGE)}")
  objs = read_lazyload_db(AUSTEN_RDB)
  novels = []
  for name in sorted(objs):
    lines = objs[name]
    if isinstance(lines, list) and lines and all(isinstance(x, (str, type(None))) for x in lines):
      novels.append((f"austen:{name}", "\n".join(x or "" for x in lines)))
  if not novels:
    raise SourceError(f"no novels found in {AUSTEN_RDB}.rdb; reinstall: {apt_hint(AUSTEN_PACKAGE)}")
  return novels


def kjv_text() -> str:
  """The whole King James Bible, one verse per line, verse references stripped."""
  exe = shutil.which("bible")
  if exe is None:
    raise SourceError(f"the King James Bible is missing (no `bible` program); install it with: "
                      f"{apt_hint(KJV_PACKAGE)}")
  out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                       capture_output=True, check=False, timeout=120)
  if out.returncode != 0 or not out.stdout:
    raise SourceError(f"`bible -f Gen1:1-Rev22:21` failed ({out.stderr[:200]!r}); reinstall: "
                      f"{apt_hint(KJV_PACKAGE)}")
  lines = []
  for line in out.stdout.decode("utf-8", errors="ignore").splitlines():
    ref, _, verse = line.partition(" ")
    lines.append(verse if ref[:1].isalnum() and ":" in ref else line)
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# hf: HuggingFace datasets


def hf_documents(name: str, text_field: str = "text", split: str = "train") -> Iterator[Document]:
  """Streams `(f"hf:{name}:{i}", row[text_field])`. Needs `datasets` and network access."""
  if not name:
    raise SourceError("data.source=hf needs data.hf_name "
                      "(e.g. data.hf_name=roneneldan/TinyStories).")
  try:
    import datasets
  except ImportError:
    raise SourceError("data.source=hf needs the `datasets` package (pip install datasets) and "
                      "network access; offline, use data.source=embedded, english or bin."
                      ) from None
  try:
    ds = datasets.load_dataset(name, split=split, streaming=True)
  except Exception as e:  # network / hub errors come in many types
    raise SourceError(f"could not open HuggingFace dataset {name!r} ({type(e).__name__}: {e}); "
                      "this needs network access. Offline, tokenize local text with "
                      "`python -m atma_jax.data.prepare` and use data.source=bin.") from e
  for i, row in enumerate(ds):
    if text_field not in row:
      raise SourceError(f"dataset {name!r} rows have no field {text_field!r} (fields: "
                        f"{sorted(row)}); set data.hf_text_field.")
    yield f"hf:{name}:{i}", row[text_field]
