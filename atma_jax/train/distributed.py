"""Multi-process start (`jax.distributed.initialize`) with a bounded wait.

JAX waits for all `num_processes` to register with the coordinator and, past its own timeout,
aborts the process from C++ with a stack dump. Here a watchdog thread fires first (after
`timeout_s`, default `DEFAULT_TIMEOUT_S`, or $ATMA_INIT_TIMEOUT_S): it prints one line naming the
coordinator, this process, how many processes were expected and what is known about who joined,
and exits with status 2.

What is known: on the coordinator's host, the processes holding a connection to its port
(Linux /proc/net/tcp); elsewhere, whether the coordinator's port accepts connections at all.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import jax

from atma_jax.config import ConfigError
from atma_jax.errors import EXIT_USAGE

DEFAULT_TIMEOUT_S = 300.0


def _host_port(coordinator: str) -> tuple[str, int]:
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ConfigError(f"--coordinator {coordinator!r}: expected host:port, e.g. 10.0.0.1:1234.")
  return host.strip("[]"), int(port)


def connected_peers(port: int) -> int | None:
  """Established TCP connections to local `port` (distinct remote ends), None if unknown."""
  peers, seen = set(), False
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
      with open(table) as f:
        rows = f.read().splitlines()[1:]
    except OSError:
      continue
    seen = True
    for row in rows:
      cols = row.split()
      if len(cols) > 3 and cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
        peers.add(cols[2])
  return len(peers) if seen else None


def reachable(host: str, port: int, timeout_s: float = 2.0) -> bool:
  try:
    with socket.create_connection((host, port), timeout=timeout_s):
      return True
  except OSError:
    return False


def timeout_message(coordinator: str, num_processes: int, process_id: int,
                    timeout_s: float) -> str:
  host, port = _host_port(coordinator)
  if process_id == 0:
    n = connected_peers(port)
    joined = (f"{n} of the {num_processes} expected processes are connected to it"
              if n is not None else f"not all {num_processes} expected processes joined")
    what = f"process 0 hosts the coordinator at {coordinator}; {joined}"
  elif reachable(host, port):
    what = (f"process {process_id} reached the coordinator at {coordinator}, but not all "
            f"{num_processes} processes joined")
  else:
    what = (f"process {process_id} cannot reach the coordinator at {coordinator} "
            "(no connection to that host and port)")
  return (f"multi-process start timed out after {timeout_s:g} s: {what}. Start all "
          f"{num_processes} processes with the same --coordinator and --num-processes and "
          "distinct --process-id 0..N-1, with the coordinator's port open (--init-timeout "
          "changes the limit).")


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, timeout_s: float | None = None) -> None:
  """`jax.distributed.initialize` when launched multi-process (flags or JAX_* env vars); exits
  the process with one line on stderr when the processes do not all join within `timeout_s`."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if timeout_s is None:
    env = os.environ.get("ATMA_INIT_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
      timeout_s = float(env)
    except ValueError:
      raise ConfigError(f"ATMA_INIT_TIMEOUT_S={env!r}: expected a number of seconds.") from None
  if coordinator is None and num_processes is None:
    return  # single process
  if coordinator is None or num_processes is None or process_id is None:
    raise ConfigError("multi-process launch needs all of --coordinator, --num-processes and "
                      "--process-id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                      "JAX_PROCESS_ID).")
  _host_port(coordinator)
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id {process_id} with --num-processes {num_processes}: need "
                      "num_processes >= 1 and 0 <= process_id < num_processes.")
  if timeout_s <= 0:
    raise ConfigError(f"--init-timeout {timeout_s:g}: must be a positive number of seconds.")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

  joined = threading.Event()

  def watchdog():
    if joined.wait(timeout_s):
      return
    print(f"error: {timeout_message(coordinator, num_processes, process_id, timeout_s)}",
          file=sys.stderr, flush=True)
    os._exit(EXIT_USAGE)  # the main thread is blocked inside JAX's C++ connect

  threading.Thread(target=watchdog, name="atma-init-watchdog", daemon=True).start()
  # JAX's own limit (which aborts the process) only as a backstop behind the watchdog
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=int(timeout_s) + 60)
  joined.set()
