"""Auxiliary losses against direct numpy transcriptions of ATMA_SPEC §5.5 / §5.6."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atma_jax.model import aux_losses

RNG = np.random.default_rng(0)


def _softplus(x):
  return np.log1p(np.exp(x))


def test_polar_distractor_matches_softmax_with_null():
  B, T, H, G, d, R = 2, 5, 4, 2, 8, 3
  q = RNG.normal(size=(B, T, H, d)).astype(np.float32)
  kr = RNG.normal(size=(B, R, G, d)).astype(np.float32)
  lg, nb, ns = (RNG.normal(size=H).astype(np.float32) for _ in range(3))
  got = aux_losses.polar_distractor(jnp.asarray(q), jnp.asarray(kr), jnp.asarray(lg),
                                    jnp.asarray(nb), jnp.asarray(ns))
  n = np.arange(1, T + 1, dtype=np.float64)  # un-windowed count
  temp = 1 + _softplus(lg)[None, :] * np.log(n)[:, None]  # [T, H]
  null = nb[None, :] + _softplus(ns)[None, :] * np.sqrt(np.log(n + 1))[:, None]
  krh = np.repeat(kr, H // G, axis=2)  # head h uses KV head h // (H/G)
  sig = np.einsum("bthd,brhd->bthr", q, krh) / math.sqrt(d)
  logits = np.concatenate([sig * temp[None, :, :, None],
                           np.broadcast_to((null * temp)[None, :, :, None], (B, T, H, 1))], -1)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, w[..., :R].sum(-1).mean(), rtol=1e-5)


def test_softmax_distractor_matches_prepended_keys():
  B, T, H, G, d, R = 1, 4, 2, 1, 8, 3
  q, k, v = (RNG.normal(size=s).astype(np.float32) for s in
             [(B, T, H, d), (B, T, G, d), (B, T, G, d)])
  kr, vr = (RNG.normal(size=(B, R, G, d)).astype(np.float32) for _ in range(2))
  y = RNG.normal(size=(B, T, H, d)).astype(np.float32)
  scale = 0.3
  got = aux_losses.softmax_distractor(*(jnp.asarray(a) for a in (q, k, v, kr, vr, y)),
                                      scale=scale)
  kc, vc = np.concatenate([kr, k], 1)[:, :, 0], np.concatenate([vr, v], 1)[:, :, 0]
  mask = np.concatenate([np.ones((T, R), bool), np.tril(np.ones((T, T), bool))], 1)
  s = scale * np.einsum("bthd,bsd->bhts", q, kc)
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  y_dist = np.einsum("bhts,bsd->bthd", p, vc)
  np.testing.assert_allclose(got, ((y_dist - y) ** 2).mean(), rtol=1e-5)


def _cov_gap(x):
  x = x - x.mean(0)
  cov = x.T @ x / (len(x) - 1 + 1e-6)
  return np.linalg.norm(cov - np.eye(x.shape[1]))


def test_sigreg_modes_match_spec():
  N, D = 40, 16  # D <= 64: no sketch, so weak/discrete/zipfian are deterministic
  x = RNG.normal(size=(1, N, D)).astype(np.float32) * 1.7 + 0.3
  key = jax.random.key(0)
  xf = x[0].astype(np.float64)
  np.testing.assert_allclose(aux_losses.sigreg(jnp.asarray(x), "weak", key), _cov_gap(xf),
                             rtol=1e-4)
  xn = xf / np.linalg.norm(xf, axis=1, keepdims=True) * math.sqrt(D)
  np.testing.assert_allclose(aux_losses.sigreg(jnp.asarray(x), "discrete", key), _cov_gap(xn),
                             rtol=1e-4)
  # zipfian: angular decorrelation + sorted-norm profile vs Zipf(1)
  c = xf - xf.mean(0)
  norms = np.maximum(np.linalg.norm(c, axis=1), 1e-6)
  u = c / norms[:, None]
  g = u.T @ u / (N - 1 + 1e-6)
  ang = np.linalg.norm(g - np.diag(np.diag(g)))
  z = 1 / np.arange(1, N + 1)
  z /= z.sum() + 1e-6
  sn = np.sort(norms)[::-1]
  want = ang + np.linalg.norm(sn / (sn.sum() + 1e-6) - z)
  np.testing.assert_allclose(aux_losses.sigreg(jnp.asarray(x), "zipfian", key), want, rtol=1e-4)
  # strong: same projection draw as the implementation, characteristic-function error
  a = np.asarray(jax.random.normal(key, (D, 64), jnp.float32), np.float64)
  a /= np.linalg.norm(a, axis=0, keepdims=True) + 1e-6
  tau = np.linspace(-5, 5, 17)
  phi = np.exp(-tau ** 2 / 2)
  arg = (xf @ a)[:, :, None] * tau
  err = ((np.cos(arg).mean(0) - phi) ** 2 + np.sin(arg).mean(0) ** 2) * phi
  want = (np.trapezoid(err, tau, axis=1) * N).mean()
  np.testing.assert_allclose(aux_losses.sigreg(jnp.asarray(x), "strong", key), want, rtol=1e-4)
  assert float(aux_losses.sigreg(jnp.asarray(x), "baseline", key)) == 0.0
  assert float(aux_losses.sigreg(jnp.asarray(x), "weak", None)) == 0.0
  with pytest.raises(ValueError, match="sigreg_mode"):
    aux_losses.sigreg(jnp.asarray(x), "other", key)


def test_sigreg_sketches_wide_inputs():
  """D > 64: 64-dim Gaussian sketch; the loss is finite, positive and changes with the key."""
  x = jnp.asarray(RNG.normal(size=(2, 16, 96)).astype(np.float32))
  a = aux_losses.sigreg(x, "weak", jax.random.key(1))
  b = aux_losses.sigreg(x, "weak", jax.random.key(2))
  assert np.isfinite(float(a)) and float(a) > 0 and float(a) != float(b)
