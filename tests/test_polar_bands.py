"""`bands.py` against brute force: every band every backend uses skips only blocks with no
visible (row, key) pair, leaves unmasked only blocks whose pairs are all visible, and is tight at
its ends. Python ints and traced int32 scalars give the same bands."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.polar_attention import bands

WINDOWS = (None, 1, 3, 8, 13, 40)
OFFSETS = (0, 1, 2, 3, 11)


def _visible_np(rows, cols, tk, window):
  return np.asarray(bands.visible(rows[:, None], cols[None, :], tk=tk, window=window))


def _check_band(band, n_blocks, pairs_visible, tight=True):
  """pairs_visible(b) -> bool array of the (row, key) pairs of block b. `tight`: the band's end
  blocks hold a visible pair (holds for real rows, q_offset + Tq <= Tk; padded rows past Tk may
  get a masked block that shows nothing)."""
  lo, full_lo, full_hi, hi = band
  assert lo <= full_lo <= full_hi <= hi or hi <= lo, band
  for b in range(n_blocks):
    vis = pairs_visible(b)
    if not lo <= b < hi:
      assert not vis.any(), (band, b)
    elif full_lo <= b < full_hi:
      assert vis.all(), (band, b)
  if tight and hi > lo:
    assert pairs_visible(lo).any(), ("lo", band)
    assert pairs_visible(hi - 1).any(), ("hi", band)


def test_visible_matches_the_definition():
  rows, cols = np.arange(20), np.arange(25)
  for tk, w in itertools.product((None, 7, 25), WINDOWS):
    want = (cols[None] <= rows[:, None]) & (cols[None] < (tk or 10**9))
    if w is not None:
      want &= cols[None] > rows[:, None] - w
    np.testing.assert_array_equal(_visible_np(rows, cols, tk, w), want)


def test_key_bands_of_query_blocks():
  for bq, bk, tk, off, w in itertools.product((4, 8), (4, 8), (5, 23, 40), OFFSETS, WINDOWS):
    nk = -(-tk // bk)
    for i in range(5):
      rows = off + i * bq + np.arange(bq)
      band = bands.keys_of_query_block(i, bq=bq, bk=bk, tk=tk, q_offset=off, window=w)
      _check_band(band, nk + 2, lambda b: _visible_np(rows, b * bk + np.arange(bk), tk, w),
                  tight=rows[-1] < tk)
      assert bands.key_range(rows[0], rows[-1], bk=bk, tk=tk, window=w) == (band[0], band[3])
      first, end = bands.key_span(rows[0], rows[-1], tk=tk, window=w)
      seen = np.nonzero(_visible_np(rows, np.arange(tk + 5), tk, w).any(axis=0))[0]
      assert (first, end) == ((seen[0], seen[-1] + 1) if len(seen) else (first, end))


def test_key_bands_without_a_key_bound():  # Mosaic: Tq == Tk padded alike
  for bq, bk, w in itertools.product((4, 8), (4, 8, 16), WINDOWS):
    for p0 in range(0, 40, bq):
      rows = p0 + np.arange(bq)
      band = bands.key_band(p0, p0 + bq - 1, bk=bk, tk=None, window=w)
      _check_band(band, 12, lambda b: _visible_np(rows, b * bk + np.arange(bk), None, w))


def test_unmasked_steps_of_a_warpgroup_in_its_tile():  # Mosaic: 2 warpgroups share a band
  for bq, bk, w in itertools.product((4, 8), (4, 8, 16), WINDOWS):
    for t0 in range(0, 40, 2 * bq):
      lo, hi = bands.key_range(t0, t0 + 2 * bq - 1, bk=bk, tk=None, window=w)
      for r0 in (t0, t0 + bq):
        rows = r0 + np.arange(bq)
        s_lo, s_hi = bands.unmasked_steps(
            bands.key_band(r0, r0 + bq - 1, bk=bk, tk=None, window=w), lo, hi)
        assert 0 <= s_lo <= s_hi <= hi - lo
        for s in range(hi - lo):
          vis = _visible_np(rows, (lo + s) * bk + np.arange(bk), None, w)
          assert vis.all() == (s_lo <= s < s_hi), (bq, bk, w, r0, s)


def test_query_bands_of_key_blocks():
  for bq, bk, tk, off, w in itertools.product((4, 8), (4, 8), (5, 23, 40), OFFSETS, WINDOWS):
    nq = 5
    rows = off + np.arange(nq * bq)
    for j in range(-(-tk // bk)):
      cols = j * bk + np.arange(bk)
      band = bands.queries_of_key_block(j, bq=bq, bk=bk, nq=nq, tk=tk, q_offset=off, window=w)
      band = tuple(int(x) for x in band)
      _check_band(band, nq, lambda b: _visible_np(rows[b * bq:(b + 1) * bq], cols, tk, w),
                  tight=rows[-1] < tk)


def test_traced_scalars_give_the_static_bands():
  def both(i, off):
    return (bands.keys_of_query_block(i, bq=8, bk=16, tk=70, q_offset=off, window=13)
            + bands.queries_of_key_block(i, bq=8, bk=16, nq=9, tk=70, q_offset=off, window=13))
  traced = jax.jit(both)
  for i, off in itertools.product(range(5), (0, 5, 29)):
    want = [int(x) for x in both(i, off)]
    assert [int(x) for x in traced(jnp.int32(i), jnp.int32(off))] == want
  assert bands.key_range(3, 20, bk=8, tk=17, window=None) == (0, 3)  # Python ints stay ints
  assert all(type(x) is int for x in bands.key_band(3, 20, bk=8, tk=17, window=5))
