"""Which platform a kernel op's inputs live on (both ops pick their backend from it)."""

from __future__ import annotations

import jax


class KernelUnavailable(ValueError):
  """`impl="pallas"` asked for inputs or a platform that no Pallas kernel takes (the message
  says why and what to use instead)."""


def platform_of(x) -> str:
  """The platform of a concrete array's device ("cpu", "gpu", "tpu"); for tracers, which carry
  no device, the default backend (the trace-time decision inside `jit`)."""
  try:
    return next(iter(x.devices())).platform
  except Exception:  # noqa: BLE001 - tracers have no devices
    return jax.default_backend()
