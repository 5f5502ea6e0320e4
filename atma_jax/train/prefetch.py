"""Device prefetch: host batches -> device arrays `depth` steps ahead of the train step.

    feed = DevicePrefetcher(data_it, put, depth=2)      # put: host batch -> global device arrays
    batch = next(feed)                                   # already on device (sharded by `put`)
    feed.get_state()                                     # data state after the batches handed out

One background thread reads the host iterator and calls `put` (a `device_put` with the step's
batch sharding), keeping up to `depth` device batches ready, so reading, the host-to-device copy
and the step overlap. The batches and their order are exactly those of the host iterator: a
prefetching run computes the same losses as one without (bit for bit).

Checkpoints see the data position of the CONSUMER: `get_state()` is the host iterator's state
after the last batch `next(feed)` returned, not after the batches waiting in the queue, so a run
resumed from it continues with the first batch the step has not seen. Restore the host iterator
(`set_state`) before wrapping it. `depth=0` reads and puts synchronously in `next` (no thread).
An exception in the reader (bad shard, out-of-vocabulary id) is raised by the `next` that would
have returned that batch.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator

_POLL_S = 0.1  # how often a blocked reader checks for close()


class _End:
  """Queue item: the host iterator ended (StopIteration) or raised `error`."""

  def __init__(self, error: BaseException | None = None):
    self.error = error


class DevicePrefetcher:
  """Iterator over `put(batch)` for the batches of `it`, `depth` of them prepared ahead."""

  def __init__(self, it: Iterator, put: Callable[[Any], Any], depth: int = 2):
    if depth < 0:
      raise ValueError(f"prefetch depth={depth} must be >= 0 (0: no prefetch).")
    self.it, self.put, self.depth = it, put, depth
    self._state = it.get_state() if hasattr(it, "get_state") else None
    self._done = False
    self._closing = threading.Event()
    self._queue: queue.Queue | None = None
    self._thread = None
    if depth > 0:
      self._queue = queue.Queue(maxsize=depth)
      self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
      self._thread.start()

  def _read(self):
    """(device batch, host state after it) of the next host batch."""
    batch = next(self.it)
    state = copy.deepcopy(self.it.get_state()) if hasattr(self.it, "get_state") else None
    return self.put(batch), state

  def _offer(self, item) -> bool:
    while not self._closing.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    while not self._closing.is_set():
      try:
        item = self._read()
      except StopIteration:
        self._offer(_End())
        return
      except BaseException as e:  # noqa: BLE001 - handed to the consumer's next()
        self._offer(_End(e))
        return
      if not self._offer(item):
        return

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    if self._queue is None:
      device_batch, state = self._read()
    else:
      item = self._queue.get()
      if isinstance(item, _End):
        self._done = True
        if item.error is not None:
          raise item.error
        raise StopIteration
      device_batch, state = item
    self._state = state
    return device_batch

  def get_state(self):
    """The host iterator's state after the last batch handed out by `next`."""
    return self._state

  def set_state(self, state) -> None:
    raise RuntimeError("DevicePrefetcher.set_state: restore the host iterator before wrapping "
                       "it (batches are already queued).")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    """Stops the reader thread (a batch it is reading finishes first)."""
    self._closing.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
