"""JAX's persistent compilation cache for the command-line programs, and what it did.

`configure(setting, what)` runs once at a program's start, before anything is compiled:

  DIR     compiled programs are kept in DIR and loaded from there by the next run of the same
          program (same shapes, shardings, flags, jax / XLA version and devices);
  off     no persistent cache (nothing written);
  auto    (the default) the environment decides: `ATMA_COMPILE_CACHE` (a DIR or off) if set;
          else whatever JAX is already configured with (`JAX_COMPILATION_CACHE_DIR`,
          `JAX_ENABLE_COMPILATION_CACHE=false`, or a `jax.config.update` by the calling program);
          else the per-user folder `$XDG_CACHE_HOME/atma_jax/jax_cache` (`~/.cache/...`).

A DIR that was named (by the setting or `ATMA_COMPILE_CACHE`) and cannot be written is a
UsageError before any compute; a folder `auto` found (JAX's or the per-user one) that cannot be
written only turns the cache off, with a note. Where this module picks the folder it also sets
JAX's threshold: a program is written only if compiling it took >= `MIN_COMPILE_SECS` (JAX's
default, kept explicit: the train, eval and decode steps take seconds to minutes, the helper
programs of eager array code milliseconds), unless `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`
says otherwise. On CPU a tiny-preset `train.py` run wrote 4 entries, 1.4 MB, with this threshold
(bench/results/compile_cache_cpu_tiny_train.json), and the 378M train step with its helper
programs 2 entries, 2.1 MB (compile_cache_cpu_378m_compile_only.json). There is
no size threshold (an entry's size says little about what compiling it cost) and no size cap
(JAX's LRU cap `JAX_COMPILATION_CACHE_MAX_SIZE` needs the `filelock` package); the folder can be
deleted at any time. Only process 0 of a multi-process run writes (JAX's rule).

`CompileLog` counts, through `jax.monitoring`, each XLA compilation and whether it was loaded
from the persistent cache (`/jax/compilation_cache/cache_hits`), compiled and written
(`.../cache_misses`), compiled below the threshold, or compiled with no cache in use; `describe`
turns the entries of a time span (e.g. the first training step) into one line.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from atma_jax.errors import UsageError

ENV_VAR = "ATMA_COMPILE_CACHE"
MIN_COMPILE_SECS = 1.0
OFF = ("off", "none", "false", "no", "0")
_MIN_SECS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"

_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_HIT = "/jax/compilation_cache/cache_hits"
_WRITE = "/jax/compilation_cache/cache_misses"  # recorded when an entry is written
_COMPILE = "/jax/core/compile/backend_compile_duration"  # every compile-or-load, with its time


def default_dir() -> str:
  """The per-user cache folder: $XDG_CACHE_HOME/atma_jax/jax_cache or ~/.cache/atma_jax/..."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "atma_jax", "jax_cache")


@dataclasses.dataclass(frozen=True)
class Choice:
  """The cache folder a setting resolves to (None: off) and where that came from."""

  path: str | None
  source: str  # e.g. "train.compile_cache", "ATMA_COMPILE_CACHE", "jax config", "default"
  named: bool  # the user named this folder (an unwritable one is an error, not a note)


def choose(setting: str | None, what: str) -> Choice:
  """Resolves `setting` ("auto", "off" or a folder) as the module docstring says; no side
  effects. `what` names the option the setting came from (in messages)."""
  import jax

  text = (setting or "auto").strip()
  source = what
  if text.lower() == "auto" and os.environ.get(ENV_VAR, "").strip():
    text, source = os.environ[ENV_VAR].strip(), ENV_VAR
  if text.lower() in OFF:
    return Choice(None, source, True)
  if text.lower() != "auto":
    return Choice(os.path.abspath(os.path.expanduser(text)), source, True)
  if not jax.config.jax_enable_compilation_cache:
    return Choice(None, "jax config", False)
  if jax.config.jax_compilation_cache_dir:
    return Choice(jax.config.jax_compilation_cache_dir, "jax config", False)
  return Choice(default_dir(), "default", False)


def _unwritable(path: str) -> str | None:
  """Why folder `path` cannot be created / written, or None when it can (it is created)."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    return f"{e.strerror or e} ({e.filename or path})"
  if not os.access(path, os.W_OK | os.X_OK):
    return f"no write permission on {path}"
  return None


def configure(setting: str | None = "auto", what: str = "--compile-cache", *,
              log=None) -> Choice:
  """Points JAX's persistent compilation cache at the folder `setting` resolves to (or turns it
  off); call before the first compilation. Raises UsageError when a named folder cannot be
  written. `log(line)` gets a note when the default folder is unusable. Returns the choice."""
  import jax

  choice = chosen = choose(setting, what)
  if choice.path is not None:
    why = _unwritable(choice.path)
    if why is not None and choice.named:
      raise UsageError(f"{choice.source}={choice.path}: the compilation cache folder cannot be "
                       f"written ({why}); pass a folder you can write, or off to run without "
                       "the cache.")
    if why is not None:
      if log is not None:
        log(f"note: persistent compilation cache off: {choice.path} cannot be written ({why}); "
            f"set {ENV_VAR}=DIR to use another folder")
      choice = Choice(None, choice.source, False)
  if choice != chosen or choice.source != "jax config":  # else JAX stays as the caller set it
    _apply(choice.path)
  CompileLog.get()  # listening from now on
  return choice


def _apply(path: str | None) -> None:
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  changed = (path != jax.config.jax_compilation_cache_dir
             or jax.config.jax_enable_compilation_cache != (path is not None))
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if _MIN_SECS_ENV not in os.environ:
      jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  if changed:
    cc.reset_cache()  # JAX opens the folder once; a program that compiled before re-opens it


def active_dir() -> str | None:
  """The folder JAX's persistent cache uses now, or None when it is off."""
  import jax

  if not jax.config.jax_enable_compilation_cache:
    return None
  return jax.config.jax_compilation_cache_dir or None


@dataclasses.dataclass(frozen=True)
class Compile:
  """One XLA compilation: the program's name, its wall seconds (a load from the cache
  included) and its outcome: "loaded" (from the persistent cache), "written" (compiled, then
  written to it), "compiled" (looked up, missed, not written: below the threshold) or
  "uncached" (no persistent cache in use)."""

  name: str
  seconds: float
  outcome: str


class CompileLog:
  """Every XLA compilation of this process since the first `get()` (one jax.monitoring listener
  per process). The per-thread flags tie the cache events to the compilation they happen in."""

  _instance: "CompileLog | None" = None
  _lock = threading.Lock()

  def __init__(self):
    self.entries: list[Compile] = []
    self._flags = threading.local()

  @classmethod
  def get(cls) -> "CompileLog":
    with cls._lock:
      if cls._instance is None:
        from jax import monitoring
        cls._instance = log = cls()
        monitoring.register_event_listener(log._on_event)
        monitoring.register_event_duration_secs_listener(log._on_duration)
      return cls._instance

  def mark(self) -> int:
    """A position to pass to `since`."""
    return len(self.entries)

  def since(self, mark: int) -> list[Compile]:
    return list(self.entries[mark:])

  def _on_event(self, event: str, **kwargs: Any) -> None:
    if event in (_REQUEST, _HIT, _WRITE):
      setattr(self._flags, event.rsplit("/", 1)[1], True)

  def _on_duration(self, event: str, seconds: float, **kwargs: Any) -> None:
    if event != _COMPILE:
      return
    f = self._flags
    if getattr(f, "cache_hits", False):
      outcome = "loaded"
    elif getattr(f, "cache_misses", False):
      outcome = "written"
    elif getattr(f, "compile_requests_use_cache", False):
      outcome = "compiled"
    else:
      outcome = "uncached"
    for name in ("cache_hits", "cache_misses", "compile_requests_use_cache"):
      if hasattr(f, name):
        delattr(f, name)
    self.entries.append(Compile(str(kwargs.get("fun_name", "?")), float(seconds), outcome))


def summarize(entries: list[Compile]) -> dict[str, Any]:
  """Counts and seconds of `entries` by outcome, and the verdict: "hit" (programs were loaded
  from the cache and none had to be compiled and written: what was compiled is below the time
  threshold, never kept), "miss" (nothing loaded), "partial" (some loaded, some written), "off"
  (no cache in use) or "none" (nothing compiled)."""
  count = {o: sum(e.outcome == o for e in entries)
           for o in ("loaded", "written", "compiled", "uncached")}
  if not entries:
    verdict = "none"
  elif count["loaded"] + count["written"] + count["compiled"] == 0:
    verdict = "off"
  elif count["loaded"] == 0:
    verdict = "miss"
  elif count["written"] == 0:
    verdict = "hit"
  else:
    verdict = "partial"
  return {"verdict": verdict, "programs": len(entries), **count,
          "seconds": sum(e.seconds for e in entries),
          "slowest": max(entries, key=lambda e: e.seconds).name if entries else None}


def describe(entries: list[Compile], cache_dir: str | None) -> str:
  """One line: what compiling the programs of a span cost and what the persistent cache did,
  e.g. "compile 1.1 s: jit(train_step) loaded (persistent compilation cache hit, DIR)"."""
  s = summarize(entries)
  if s["verdict"] == "none":
    return "no compilation (already compiled in this process)"
  programs = (s["slowest"] if s["programs"] == 1
              else f"{s['programs']} programs (slowest {s['slowest']})")
  if s["verdict"] == "off":
    return f"compile {s['seconds']:.1f} s: {programs} compiled (persistent compilation cache off)"
  parts = [f"{s[o]} {label}" for o, label in (
      ("loaded", "loaded"), ("written", "compiled and written"),
      ("compiled", "compiled, not written (under the time threshold)"),
      ("uncached", "compiled outside the cache")) if s[o]]
  what = (f"{programs} {parts[0].split(' ', 1)[1]}" if s["programs"] == 1
          else f"{programs}: {', '.join(parts)}")
  return (f"compile {s['seconds']:.1f} s: {what} (persistent compilation cache {s['verdict']}, "
          f"{cache_dir})")
