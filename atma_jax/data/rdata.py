"""A minimal reader for R's lazy-load databases (`.rdx` index + `.rdb` objects), without R.

Enough of R's XDR serialization (format versions 2 and 3) to read data packages such as
`janeaustenr`: character / integer / logical / double vectors, lists, pairlists, attributes,
symbols and references. Other object types raise `RDataError`.

`.rdx` is a gzip file holding a serialized list whose `variables` element maps object names to
`(offset, length)` in the `.rdb` file; each `.rdb` record is a 4-byte big-endian uncompressed
size followed by a zlib stream (or, for R's other compressions, a type byte then bzip2 / xz /
raw data) of a serialized object.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from typing import Any

from atma_jax.errors import AtmaError


class RDataError(AtmaError, ValueError):
  """The file uses an R serialization feature this reader does not support."""


# SEXP type codes and serialization pseudo-types.
NILSXP, SYMSXP, LISTSXP, LANGSXP, CHARSXP = 0, 1, 2, 6, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP = 10, 13, 14, 16, 19, 20, 24
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP, ALTREP_SXP = 252, 251, 250, 238
_NA_INT = -(2**31)


class _Reader:

  def __init__(self, data: bytes):
    self.data, self.pos, self.refs = data, 0, []

  def ints(self, n: int) -> tuple[int, ...]:
    out = struct.unpack_from(f">{n}i", self.data, self.pos)
    self.pos += 4 * n
    return out

  def int(self) -> int:
    return self.ints(1)[0]

  def length(self) -> int:
    n = self.int()
    if n == -1:
      hi, lo = self.ints(2)
      n = (hi << 32) + (lo & 0xFFFFFFFF)
    return n

  def header(self) -> None:
    if self.data[:2] != b"X\n":
      raise RDataError(f"not XDR-serialized R data (starts with {self.data[:2]!r}).")
    self.pos = 2
    version = self.int()
    self.ints(2)  # writer R version, minimal reader version
    if version == 3:
      n = self.int()
      self.pos += n  # native encoding name
    elif version != 2:
      raise RDataError(f"unsupported R serialization version {version}.")

  def item(self) -> Any:
    flags = self.int()
    kind = flags & 0xFF
    has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
    if kind in (NILVALUE_SXP, NILSXP, EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP,
                MISSINGARG_SXP, BASENAMESPACE_SXP):
      return None
    if kind == REFSXP:
      idx = flags >> 8 or self.int()
      return self.refs[idx - 1]
    if kind == SYMSXP:
      name = self.item()
      self.refs.append(name)
      return name
    if kind == CHARSXP:
      n = self.int()
      if n == -1:
        return None
      raw = self.data[self.pos:self.pos + n]
      self.pos += n
      return raw.decode("utf-8" if flags & (1 << 15) or not flags & (1 << 14) else "latin-1",
                        errors="replace")
    if kind in (LISTSXP, LANGSXP):  # pairlist: attr?, tag?, car, cdr
      out: dict | list = {}
      while True:
        if has_attr:
          self.item()
        tag = self.item() if has_tag else None
        value = self.item()
        out[tag if tag is not None else len(out)] = value
        flags = self.int()
        kind = flags & 0xFF
        if kind not in (LISTSXP, LANGSXP):
          self.pos -= 4
          self.item()  # the terminating cdr (normally NULL)
          return out
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
    if kind in (LGLSXP, INTSXP):
      n = self.length()
      vals = [None if v == _NA_INT else v for v in self.ints(n)]
    elif kind == REALSXP:
      n = self.length()
      vals = list(struct.unpack_from(f">{n}d", self.data, self.pos))
      self.pos += 8 * n
    elif kind == RAWSXP:
      n = self.length()
      vals = self.data[self.pos:self.pos + n]
      self.pos += n
    elif kind in (STRSXP, VECSXP, EXPRSXP):
      n = self.length()
      vals = [self.item() for _ in range(n)]
    elif kind == ALTREP_SXP:
      self.item()  # class info
      state = self.item()
      self.item()  # attributes
      return state
    else:
      raise RDataError(f"R object type {kind} is not supported by this minimal reader.")
    if has_attr:
      attrs = self.item()
      names = attrs.get("names") if isinstance(attrs, dict) else None
      if kind == VECSXP and isinstance(names, list) and len(names) == len(vals):
        return dict(zip(names, vals))
    return vals


def unserialize(data: bytes) -> Any:
  r = _Reader(data)
  r.header()
  return r.item()


def _inflate(record: bytes) -> bytes:
  size = struct.unpack(">I", record[:4])[0]
  body = record[4:]
  if body[:1] in (b"Z", b"2", b"X", b"0"):  # R's typed compression; zlib streams start 0x78
    kind, body = body[:1], body[1:]
    out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
           b"0": lambda b: b}[kind](body)
  else:
    out = zlib.decompress(body)
  if len(out) != size:
    raise RDataError(f"record inflated to {len(out)} bytes, header says {size}.")
  return out


def read_lazyload_db(stem: str) -> dict[str, Any]:
  """All objects of `<stem>.rdx` / `<stem>.rdb`, by name."""
  with gzip.open(stem + ".rdx", "rb") as f:
    index = unserialize(f.read())
  if not isinstance(index, dict) or "variables" not in index:
    raise RDataError(f"{stem}.rdx is not a lazy-load index (no `variables`).")
  out = {}
  with open(stem + ".rdb", "rb") as f:
    blob = f.read()
  for name, (offset, length) in index["variables"].items():
    out[name] = unserialize(_inflate(blob[offset:offset + length]))
  return out
