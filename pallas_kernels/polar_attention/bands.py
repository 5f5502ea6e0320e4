"""Causal / window band arithmetic of the Polar attention backends, written once.

Every backend (Pallas-Triton `gpu_tiles` / `gpu_forward` / `gpu_backward`, Mosaic-GPU
`gpu_mosaic`, Pallas-TPU `tpu`, XLA `xla_streaming`) asks the same questions: which (query row,
key) pairs are visible, which key blocks a query tile visits, which of them need the mask, and
which query tiles a key block serves. These are plain integer functions: the arguments are
Python ints or traced int32 scalars (a program id, a loop index, a traced `q_offset`), and with
only Python ints they return Python ints (launch-time arithmetic).

Positions are absolute: query row `i` of a call sits at `q_offset + i`; it sees key `j` iff
`j <= q_offset + i` (causal), `j < tk` (a real key, not padding) and, with a window `W`,
`j > q_offset + i - W`.

A band is `(lo, full_lo, full_hi, hi)` in block units: blocks outside `[lo, hi)` hold no visible
pair and are skipped; blocks in `[full_lo, full_hi)` are visible to every row (no mask); the rest
of `[lo, hi)` needs the mask. Divisions are of non-negative values (`lax.div`, C division, in
traced code: the kernels' cheapest integer op).

Dimension glossary: bq / bk query / key block, nq number of query blocks, tk key rows (None: no
key-length bound, e.g. Tq == Tk padded alike), W window.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _static(*xs) -> bool:
  return all(isinstance(x, int) for x in xs)


def div(x, n):
  """floor(x / n) for x >= 0, n > 0."""
  return x // n if _static(x, n) else lax.div(x, n)


def cdiv(x, n):
  """ceil(x / n) for x >= 0, n > 0."""
  return div(x + (n - 1), n)


def minimum(a, b):
  return min(a, b) if _static(a, b) else jnp.minimum(a, b)


def maximum(a, b):
  return max(a, b) if _static(a, b) else jnp.maximum(a, b)


def clip(x, lo, hi):
  return minimum(maximum(x, lo), hi)


def _const(value: int, *like):
  """`value` in the kind of `like`: a Python int when they all are, else a scalar of their
  integer dtype (int32 in kernels, int64 under x64), so loop bounds agree in type."""
  traced = [x for x in like if not isinstance(x, int)]
  return value if not traced else jnp.asarray(value, jnp.result_type(*traced))


def visible(rows, cols, *, tk, window):
  """bool mask of visible (row, key) pairs; rows / cols absolute positions, broadcastable."""
  valid = cols <= rows
  if tk is not None:
    valid = valid & (cols < tk)
  if window is not None:
    valid = valid & (cols > rows - window)
  return valid


def key_span(p0, p1, *, tk, window):
  """Key positions [first, end) holding every key visible to some query row in [p0, p1]."""
  end = p1 + 1 if tk is None else minimum(p1 + 1, tk)
  first = _const(0, p0, p1) if window is None else maximum(p0 - window + 1, 0)
  return first, end


def key_range(p0, p1, *, bk, tk, window):
  """Key blocks [lo, hi) holding every key visible to some query row in [p0, p1] (the blocks
  of `key_span`)."""
  first, end = key_span(p0, p1, tk=tk, window=window)
  return div(first, bk), cdiv(end, bk)


def key_band(p0, p1, *, bk, tk, window):
  """Key blocks for query rows at positions [p0, p1] -> (lo, full_lo, full_hi, hi)."""
  lo, hi = key_range(p0, p1, bk=bk, tk=tk, window=window)
  full_lo = lo if window is None else cdiv(maximum(p1 - window + 1, 0), bk)
  full_hi = div(p0 + 1, bk) if tk is None else minimum(div(p0 + 1, bk), tk // bk)
  full_lo = clip(full_lo, lo, hi)
  full_hi = clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def query_band(k0, k1, *, bq, nq, q_offset, tk_block_ok, window):
  """Query blocks (of nq, block 0 at position q_offset) whose rows see keys [k0, k1]
  -> (lo, full_lo, full_hi, hi) as in `key_band`. `tk_block_ok`: no key of the block is past
  tk (a block crossing tk is always masked)."""
  lo = div(maximum(k0 - q_offset, 0), bq)
  full_lo = cdiv(maximum(k1 - q_offset, 0), bq)
  if window is None:
    hi = _const(nq, k0, k1)
    full_hi = _const(nq, k0, k1)
  else:
    hi = minimum(cdiv(maximum(k1 + window - q_offset, 0), bq), nq)
    full_hi = cdiv(maximum(k0 + window - q_offset - bq + 1, 0), bq)
  full_hi = jnp.where(tk_block_ok, full_hi, 0)
  full_lo = clip(full_lo, lo, hi)
  full_hi = clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def unmasked_steps(band, lo, hi):
  """The unmasked blocks of `band` (e.g. one warpgroup's rows) as steps of a loop over the blocks
  [lo, hi) of an enclosing band (the whole tile's rows), counted from lo -> (s_lo, s_hi): the
  loop runs steps [0, s_lo) masked, [s_lo, s_hi) unmasked and [s_hi, hi - lo) masked."""
  _, full_lo, full_hi, _ = band
  full_lo = clip(full_lo, lo, hi)
  return full_lo - lo, clip(full_hi, full_lo, hi) - lo


def keys_of_query_block(i, *, bq, bk, tk, q_offset, window):
  """`key_band` of query block i (rows q_offset + i*bq ... + bq - 1)."""
  p0 = q_offset + i * bq
  return key_band(p0, p0 + bq - 1, bk=bk, tk=tk, window=window)


def queries_of_key_block(j, *, bq, bk, nq, tk, q_offset, window):
  """`query_band` of key block j (keys j*bk ... j*bk + bk - 1)."""
  k0 = j * bk
  return query_band(k0, k0 + bk - 1, bq=bq, nq=nq, q_offset=q_offset,
                    tk_block_ok=(j + 1) * bk <= tk, window=window)
