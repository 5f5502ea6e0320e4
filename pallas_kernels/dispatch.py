"""Backend choice for every kernel op: one rule, one table per op, decided at trace time.

  impl = "xla"    the op's XLA backend (takes every valid input);
         "pallas" the first Pallas candidate of this platform that this hardware has and that
                  takes the call; otherwise a ValueError naming each candidate's reason;
         "auto"   that Pallas candidate when there is one, else the XLA backend.

An op describes itself with a `Backends` table: its XLA backend module and, per platform
("gpu", "tpu"; the platform of the inputs' device, or of the default backend for tracers), its
Pallas candidates in order of preference. A `Candidate` names a backend module and the hardware
it needs (None, or a key of `HARDWARE`, e.g. "hopper"). Every backend module exports
`unsupported_reason(*args, **static) -> str | None` (None: it takes the call) and the op's entry
points (`Backends.exports`). Modules are imported once, on first use (`load`, cached: no import
inside a traced VJP); a module that cannot be imported is a refusal with the ImportError as its
reason (and one warning), so "auto" falls back to XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings

import jax

IMPLS = ("auto", "pallas", "xla")


@functools.cache
def is_hopper() -> bool:
  """The default device is an NVIDIA Hopper GPU (compute capability 9.x)."""
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


# hardware a candidate may need -> (predicate, what the refusal says)
HARDWARE = {"hopper": (lambda: is_hopper(), "needs a Hopper GPU (compute capability 9.x)")}


def platform_of(x) -> str:
  """The platform of a concrete array's device ("cpu", "gpu", "tpu"); for tracers, which carry
  no device, the default backend (the trace-time decision inside `jit`)."""
  try:
    return next(iter(x.devices())).platform
  except Exception:  # noqa: BLE001 - tracers have no devices
    return jax.default_backend()


class KernelUnavailable(ValueError):
  """`impl="pallas"` asked for inputs or a platform that no Pallas kernel takes (the message
  says why and what to use instead)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
  module: str               # import path of a backend module
  needs: str | None = None  # a key of HARDWARE, or None


@dataclasses.dataclass(frozen=True)
class Backends:
  op: str                                       # the op's name in messages
  xla: str                                      # import path of the XLA backend
  pallas: dict[str, tuple[Candidate, ...]]      # platform -> candidates, preferred first
  exports: tuple[str, ...]                      # entry points every backend module must have
  arg_names: tuple[str, ...] = ()               # names of the positional args, for messages


@functools.cache
def load(module: str, exports: tuple[str, ...]):
  """(module, None), or (None, why it cannot serve): not importable, or missing `exports`."""
  try:
    mod = importlib.import_module(module)
  except ImportError as e:  # its dependencies are missing on this machine
    warnings.warn(f"kernel backend {module} unavailable ({e}); dispatch skips it", stacklevel=2)
    return None, f"cannot be imported ({e})"
  missing = [f for f in exports + ("unsupported_reason",) if not hasattr(mod, f)]
  if missing:
    return None, f"does not export {missing}"
  return mod, None


def _refusal(cand: Candidate, exports, args, static) -> tuple[object, str | None]:
  """(module, None) when `cand` takes the call, else (None, its reason)."""
  if cand.needs is not None:
    present, need = HARDWARE[cand.needs]
    if not present():
      return None, need
  mod, why = load(cand.module, exports)
  if mod is None:
    return None, why
  why = mod.unsupported_reason(*args, **static)
  return (mod, None) if why is None else (None, why)


def _describe(backends: Backends, args, static) -> str:
  names = backends.arg_names or tuple(f"arg{i}" for i in range(len(args)))
  parts = [f"{n} {tuple(a.shape)} {a.dtype}" for n, a in zip(names, args) if hasattr(a, "shape")]
  parts += [f"{k}={v!r}" for k, v in static.items()]
  return ", ".join(parts)


def select(backends: Backends, impl: str, args, static: dict | None = None):
  """The backend module that runs this call (see the module docstring for the rule)."""
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
  static = static or {}
  xla, why = load(backends.xla, backends.exports)
  if xla is None:
    raise ImportError(f"{backends.op}: the XLA backend {backends.xla} {why}")
  if impl == "xla":
    return xla
  platform = platform_of(args[0])
  candidates = backends.pallas.get(platform, ())
  reasons = []
  for cand in candidates:
    mod, why = _refusal(cand, backends.exports, args, static)
    if mod is not None:
      return mod
    reasons.append(f"{cand.module} {why}")
  if impl == "auto":
    return xla
  if not candidates:
    raise KernelUnavailable(
        f"impl='pallas': no Pallas {backends.op} backend for platform {platform!r} "
        f"(only {sorted(backends.pallas)} have one); use impl='xla' or 'auto'")
  raise KernelUnavailable(f"impl='pallas': no Pallas {backends.op} backend takes "
                          f"{_describe(backends, args, static)}: " + "; ".join(reasons)
                          + ". Use impl='auto' to fall back to XLA (or impl='xla').")
