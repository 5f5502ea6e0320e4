"""Muon for the matrix parameters of the blocks (ATMA_SPEC §6.3, pitfalls §10.18).

Per parameter `P` with (already clipped) gradient `g` and momentum buffer `Mb`:

    Mb <- mu Mb + (1 - mu) g                     (lerp towards the gradient, mu = 0.95)
    U  <- (1 - mu) g + mu Mb                      (Nesterov blend)
    U  <- NS(U) * sqrt(max(1, rows / cols))       (torch (out, in) orientation)
    P  <- P (1 - lr_t wd) - lr_t U                (decoupled weight decay first)

`NS` is the Newton-Schulz orthogonalization in bf16: work on the transpose if rows > cols,
`X = U / (||U||_F + 1e-7)`, then `steps` times `A = X X^T; X <- a X + (b A + c A A) X` with the
reference coefficients (a, b, c) = (2, -1.5, 0.5) and 12 steps. `ns_coeffs="optax"` swaps in
optax's own Newton-Schulz (its quintic coefficients and step count).

The algorithm is defined on torch's layouts; our leaves are stored differently, so each leaf
has a *kind* that says how to view it as a (batch of) torch matrices:

| kind     | our leaf            | torch view                | NS matrix                |
|----------|---------------------|---------------------------|--------------------------|
| "linear" | kernel `[in, out]`  | weight `(out, in)`        | the transpose            |
| "conv"   | kernel `[K, C]`     | weight `(C, 1, K)`        | C separate `1 x K` rows  |
| "matrix" | e.g. v_null `[H, d]`| same layout               | the leaf itself          |

Batching (`optim.muon_batch`, on by default): the leaves that share (kind, shape, dtype,
sharding) are stacked along a new leading axis `N` and orthogonalized by ONE Newton-Schulz chain
(`orthogonalized_updates`), then unstacked. Every step of NS acts on the last two axes only (the
Frobenius norm too), so each matrix is treated exactly as alone; the program holds one NS chain
per distinct shape instead of one per matrix (atma_378m: 12 chains instead of 120).

Splitting the stack over the mesh (`optim.muon_batch_split`, on by default): on a mesh of more
than one device, the stack `[N, ...]` (zero-padded to `Np`, the next multiple of the device
count D) is re-sharded so that its leading axis is split over every mesh axis and each matrix is
whole on one device: each device runs NS on its `Np / D` matrices with no collective inside the
chain, and the result is re-sharded back to the leaves' own shardings (`P(None, *spec)`) before
it is unstacked. A zero matrix stays zero through NS (`0 / (0 + eps)`), and every matrix is
computed alone on one device, so the result equals the single-device batched NS (bit-equal on
XLA:CPU). With the split off, the stack keeps the leaves' sharding on its trailing axes
(leading axis unsharded) and every device runs every chain.

Dimension glossary: R, C = rows, columns of the torch-orientation matrix; K = conv taps;
Ch = conv channels; N = matrices stacked into one batched NS; Np = N padded to a multiple of D,
the number of devices of the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from atma_jax.sharding import entry_axes

REFERENCE_NS_COEFFS = (2.0, -1.5, 0.5)
MUON_KINDS = ("linear", "conv", "matrix")


def _bf16_matmul(a, b):
  """bf16 x bf16 -> bf16 with fp32 accumulation (what a torch bf16 matmul does)."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def newton_schulz_reference(u_RC: jax.Array, steps: int = 12,
                            coeffs=REFERENCE_NS_COEFFS, eps: float = 1e-7) -> jax.Array:
  """The reference's bf16 Newton-Schulz over the last two axes (batched over leading axes)."""
  a, b, c = coeffs
  x = u_RC.astype(jnp.bfloat16)
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
  x = x / (norm.astype(jnp.bfloat16) + eps)
  for _ in range(steps):
    a_RR = _bf16_matmul(x, jnp.swapaxes(x, -1, -2))
    b_RR = b * a_RR + c * _bf16_matmul(a_RR, a_RR)
    x = a * x + _bf16_matmul(b_RR, x)
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x


def newton_schulz_optax(u_RC: jax.Array) -> jax.Array:
  """optax's own Newton-Schulz (its default coefficients and steps), per matrix."""
  from optax.contrib._muon import orthogonalize_via_newton_schulz
  coeffs = jnp.asarray((3.4445, -4.7750, 2.0315), jnp.float32)
  fn = lambda m: orthogonalize_via_newton_schulz(m, coeffs, 5)
  for _ in range(u_RC.ndim - 2):
    fn = jax.vmap(fn)
  return fn(u_RC.astype(jnp.float32))


def to_torch_view(x, kind: str):
  """Our leaf layout -> batch of torch-orientation matrices `[..., R, C]`."""
  if kind == "linear":
    return jnp.swapaxes(x, -1, -2)
  if kind == "conv":  # [K, Ch] -> (Ch, 1, K)
    return jnp.swapaxes(x, -1, -2)[..., :, None, :]
  if kind == "matrix":
    return x
  raise ValueError(f"unknown Muon parameter kind {kind!r}; expected one of {MUON_KINDS}")


def from_torch_view(x, kind: str):
  if kind == "linear":
    return jnp.swapaxes(x, -1, -2)
  if kind == "conv":
    return jnp.swapaxes(x[..., :, 0, :], -1, -2)
  return x


def orthogonalized_update(u, kind: str, *, ns_steps: int = 12, ns_coeffs: str = "reference"):
  """NS(U) * sqrt(max(1, R / C)) in torch orientation, returned in our layout (fp32)."""
  t = to_torch_view(u, kind)
  rows, cols = t.shape[-2], t.shape[-1]
  if ns_coeffs == "reference":
    o = newton_schulz_reference(t, steps=ns_steps)
  elif ns_coeffs == "optax":
    o = newton_schulz_optax(t)
  else:
    raise ValueError(f"optim.muon_ns_coeffs={ns_coeffs!r}; expected 'reference' or 'optax'.")
  o = o.astype(jnp.float32) * jnp.float32(max(1.0, rows / cols) ** 0.5)
  return from_torch_view(o, kind)


def split_stack_shardings(sharding, n: int):
  """(shardings that walk a stack of `n` leaves onto every device, padded length `Np`).

  `sharding` is the leaves' `NamedSharding` (spec `S` over the trailing axes). The walk starts
  at `P(None, *S)` and ends at `P(axes, None, ...)` with `axes` every mesh axis of size > 1, so
  each matrix is whole on one device; each stage moves one group of mesh axes to the leading
  axis (first the axes the leaves are replicated over: a local slice; then each sharded trailing
  axis in turn: one all-to-all over its mesh axes), so that no stage gathers the whole stack.
  `Np` = `n` rounded up to a multiple of the number of devices along `axes`. `([], n)` where
  there is nothing to split over (one device, no `NamedSharding`).
  """
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return [], n
  mesh = sharding.mesh
  spec = list(sharding.spec)
  big = lambda axes: tuple(a for a in axes if mesh.shape[a] > 1)
  used = {a for e in spec for a in entry_axes(e)}
  lead = big(a for a in mesh.axis_names if a not in used)
  trailing = [big(entry_axes(e)) or None for e in spec]
  stages = [P(None, *trailing)]
  if lead:
    stages.append(P(lead, *trailing))
  for i, axes in enumerate(trailing):
    if axes:
      lead = lead + axes
      trailing[i] = None
      stages.append(P(lead, *trailing))
  if not lead:
    return [], n
  d = 1
  for a in lead:
    d *= mesh.shape[a]
  return [jax.sharding.NamedSharding(mesh, st) for st in stages], -(-n // d) * d


def orthogonalized_updates(us: list, kind: str, *, ns_steps: int = 12,
                           ns_coeffs: str = "reference", sharding=None,
                           split: bool = False) -> list:
  """`orthogonalized_update` of every leaf in `us` (same kind, shape and dtype) by one batched NS.

  The leaves are stacked to `[N, *shape]`. With a `NamedSharding` of the leaves, the stack and
  the result are held at `P(None, *spec)` (the leaves' own sharding, leading axis unsharded);
  with `split` as well, NS runs on the stack padded to `[Np, *shape]` and split over the mesh
  (`split_stack_shardings`: each device orthogonalizes `Np / D` whole matrices), and the result
  is re-sharded to `P(None, *spec)` before it is unstacked.
  """
  if len({(u.shape, u.dtype) for u in us}) != 1:
    raise ValueError("orthogonalized_updates stacks leaves of one shape and dtype; got "
                     f"{sorted({(tuple(u.shape), str(u.dtype)) for u in us})}.")
  n = len(us)
  leaf_sh = None
  walk, n_pad = [], n
  if isinstance(sharding, jax.sharding.NamedSharding):
    leaf_sh = jax.sharding.NamedSharding(sharding.mesh, P(None, *sharding.spec))
    if split:
      walk, n_pad = split_stack_shardings(sharding, n)
  if n == 1 and not walk:
    return [orthogonalized_update(us[0], kind, ns_steps=ns_steps, ns_coeffs=ns_coeffs)]
  hold = lambda x, sh: jax.lax.with_sharding_constraint(x, sh) if sh is not None else x
  u_N = hold(jnp.stack(us), leaf_sh)
  if walk:
    u_N = jnp.pad(u_N, [(0, n_pad - n)] + [(0, 0)] * (u_N.ndim - 1))
    for sh in walk:
      u_N = hold(u_N, sh)
  o_N = orthogonalized_update(u_N, kind, ns_steps=ns_steps, ns_coeffs=ns_coeffs)
  if walk:
    for sh in walk[::-1]:
      o_N = hold(o_N, sh)
    o_N = o_N[:n]
  o_N = hold(o_N, leaf_sh)
  return [o_N[i] for i in range(n)]


def momentum_direction(g, mb, momentum: float):
  """(Nesterov direction U, new momentum buffer Mb), both fp32, in our leaf layout."""
  g = g.astype(jnp.float32)
  mb = mb + (1.0 - momentum) * (g - mb)  # lerp towards the gradient
  u = g + momentum * (mb - g)  # Nesterov blend (1 - mu) g + mu Mb
  return u, mb


def decayed_update(o, p, lr_t, weight_decay: float):
  """`-lr_t (wd P + O)`, so `P + update = P (1 - lr_t wd) - lr_t O`."""
  return -lr_t * (weight_decay * p.astype(jnp.float32) + o)


def muon_leaf_update(g, mb, p, kind: str, lr_t, *, momentum: float, weight_decay: float,
                     ns_steps: int, ns_coeffs: str):
  """One Muon step for one leaf -> (update to add to `p`, new momentum buffer `mb`)."""
  u, mb = momentum_direction(g, mb, momentum)
  o = orthogonalized_update(u, kind, ns_steps=ns_steps, ns_coeffs=ns_coeffs)
  return decayed_update(o, p, lr_t, weight_decay), mb
