"""The project's user-facing errors and the boundary every entry point runs behind.

`AtmaError` is the base of every error whose message names the problem and the fix (a bad
config, shard, checkpoint, weights file or argument); `UsageError` is the one every entry point
(generate.py, eval.py, `python -m atma_jax.interop`, ...) raises for a bad command-line value.
`cli_boundary` wraps a `main(argv) -> int`:

  * an `AtmaError`, or an `OSError` (a missing, unreadable or unwritable file, a full disk, a
    refused connection: the environment, not the code), prints `error: <message>` to stderr
    and returns 2;
  * anything else is a bug and keeps its traceback.

    @cli_boundary
    def main(argv=None) -> int: ...

A kernel backend asked for where none exists (`model.kernel_impl=pallas` on a CPU) is handled
the same way. Set `ATMA_TRACEBACK=1` to see the traceback of a handled error too.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

EXIT_USAGE = 2  # argparse's exit status for a bad command line; ours for every handled error


class AtmaError(Exception):
  """A problem with the user's input or files; the message says what is wrong and how to fix it."""


class UsageError(AtmaError, ValueError):
  """A bad command-line value (or an input it names) of an entry point; the message names the
  option and the fix."""


def check_writable_dir(path: str, what: str) -> None:
  """Raises AtmaError unless directory `path` exists and is writable or can be created, so a
  command fails before its work rather than when it writes the result. `what` names the option
  (e.g. "--out")."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise AtmaError(f"cannot write to {what} {path}: {probe} is a file, not a directory; "
                    f"choose another {what}.")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise AtmaError(f"cannot write to {what} {path}: no write permission on {probe}; choose a "
                    "directory you can write.")


def describe_os_error(err: OSError) -> str:
  """One line for a file-system error: what failed, on which path, and what to check."""
  what = err.strerror or str(err)
  paths = [p for p in (err.filename, err.filename2) if p]
  where = " -> ".join(str(p) for p in paths)
  msg = f"{what}: {where}" if where else what
  if isinstance(err, PermissionError):
    msg += " (check the path's permissions, or choose a directory you can write)"
  elif isinstance(err, FileNotFoundError):
    msg += " (check the path)"
  elif isinstance(err, (NotADirectoryError, IsADirectoryError, FileExistsError)):
    msg += " (something else is in the way at that path; choose another path)"
  return msg


def report(err: BaseException) -> int:
  """Prints the one-line form of a handled error to stderr; returns the exit status."""
  text = describe_os_error(err) if isinstance(err, OSError) else str(err)
  if not isinstance(err, (AtmaError, OSError)):  # a kernel backend missing on this platform
    text += " (the backend is model.kernel_impl; eval.py / generate.py --impl override it)"
  print(f"error: {text}", file=sys.stderr)
  return EXIT_USAGE


def handled_errors() -> tuple[type, ...]:
  """The exception types the boundary reports in one line (imported once one is raised)."""
  from pallas_kernels.polar_attention import KernelUnavailable  # kernel_impl=pallas, none here
  return (AtmaError, OSError, KernelUnavailable)


def cli_boundary(main: Callable[..., int]) -> Callable[..., int]:
  """`main` with project errors and file errors turned into `error: ...` and exit status 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a handled type
      if not isinstance(err, handled_errors()) or os.environ.get("ATMA_TRACEBACK"):
        raise
      return report(err)

  return wrapped
