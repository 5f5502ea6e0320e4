"""The reference optimizer recipe: Muon + three AdamW groups (ATMA_SPEC §6.3-§6.5, §10.16-19).

| group    | parameters                                              | rule   | lr (initial)  |
|----------|---------------------------------------------------------|--------|---------------|
| "muon"   | every leaf with ndim >= 2 inside `blocks`               | Muon   | 0.02, wd 0.01 |
| "embed"  | `embed.embedding` (bf16 in the reference: dtype kept)   | AdamW  | 0.3           |
| "head"   | LM head `proj.kernel`                                   | AdamW  | 1/320         |
| "scalar" | every leaf with ndim < 2 (biases, norms, polar scalars) | AdamW  | 0.01          |

AdamW: betas (0.8, 0.95), eps 1e-10, no weight decay, torch's bias correction; moments are
stored in the parameter's dtype (bf16 for a bf16 embedding), the arithmetic is fp32.
Step order (§6.5): global-norm clip of ALL gradients to `clip_norm` (torch's
`clip_grad_norm_`: coefficient `min(1, max / (norm + 1e-6))`), then every group steps with
`lr * eta(step)` (schedule.py). Every parameter lands in exactly one group or the build fails.

The optimizer works on the flattened leaves of the params pytree (any pytree: an `nnx.State`
or plain dicts); group assignment is static Python data computed once from the leaf paths.
With `optim.muon_batch` the Muon leaves that share (kind, shape, dtype, sharding) run one
batched Newton-Schulz (`muon_batches`, muon.orthogonalized_updates), and with
`optim.muon_batch_split` each batch is split over the mesh's devices (one share of the matrices
per device); the state is per leaf either way, so checkpoints depend on neither switch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from atma_jax.config import OptimConfig
from atma_jax.errors import AtmaError
from atma_jax.train.muon import (decayed_update, momentum_direction, muon_leaf_update,
                                 orthogonalized_updates)
from atma_jax.train.schedule import lr_multiplier

GROUPS = ("muon", "embed", "head", "scalar")
CONV_MODULES = ("conv", "canon_q", "canon_k", "canon_v")


class OptimizerError(AtmaError, ValueError):
  """A parameter tree the recipe cannot be applied to (names the leaf and the fix)."""


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  path: str  # dotted path, e.g. "blocks.2.attn.q.kernel"
  shape: tuple[int, ...]
  group: str  # one of GROUPS
  kind: str | None  # Muon view of the leaf: "linear" | "conv" | "matrix" (None for AdamW)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def dotted_path(keypath) -> str:
  """A jax key path as "blocks.2.attn.q.kernel" (a trailing nnx `.value` dropped)."""
  names = [_key_name(k) for k in keypath]
  if names and names[-1] == "value":
    names = names[:-1]
  return ".".join(names)


def leaf_paths(params) -> list[str]:
  """Dotted path of every array leaf, in `jax.tree.leaves` order."""
  return [dotted_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def classify(params) -> list[LeafSpec]:
  """Assigns every leaf of `params` to exactly one group (ATMA_SPEC §6.3)."""
  specs = []
  for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
    parts = path.split(".")
    shape = tuple(leaf.shape)
    kind = None
    if len(shape) < 2:
      group = "scalar"
    elif parts[0] == "embed":
      group = "embed"
    elif parts[0] == "proj":
      group = "head"
    elif parts[0] == "blocks":
      group = "muon"
      if parts[-1] == "kernel" and len(parts) >= 2 and parts[-2] in CONV_MODULES:
        kind = "conv"
      elif parts[-1] == "kernel":
        kind = "linear"
      else:
        kind = "matrix"  # v_null and other raw matrices stored in torch orientation
    else:
      raise OptimizerError(
          f"parameter {path} (shape {shape}) belongs to no optimizer group: ndim >= 2 leaves "
          "must be `embed.*`, `proj.*` (LM head) or inside `blocks`. Rename the module or "
          "extend atma_jax.train.optimizer.classify.")
    specs.append(LeafSpec(path, shape, group, kind))
  seen = [s.path for s in specs]
  if len(set(seen)) != len(seen):
    dup = sorted({p for p in seen if seen.count(p) > 1})
    raise OptimizerError(f"parameter paths {dup[:3]} occur more than once; every leaf must have "
                         "a unique dotted path to be assigned to exactly one group.")
  return specs


def group_lr(spec: LeafSpec, cfg: OptimConfig) -> float:
  return {"muon": cfg.muon_lr, "embed": cfg.embed_lr, "head": cfg.head_lr,
          "scalar": cfg.scalar_lr}[spec.group]


def clip_by_global_norm(grads, max_norm: float):
  """torch `clip_grad_norm_`: fp32 global L2 norm; scale by min(1, max / (norm + 1e-6))."""
  leaves = jax.tree.leaves(grads)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))
  coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
  return jax.tree.map(lambda g: (g.astype(jnp.float32) * coef).astype(g.dtype), grads), norm


class OptState(NamedTuple):
  count: jax.Array  # optimizer steps taken (int32 scalar)
  slots: list  # per leaf: (momentum_f32,) for Muon, (m, v) in the param dtype for AdamW


def flat_shardings(param_shardings) -> list:
  """The Sharding leaves of a shardings tree (nnx.State of Variables or plain pytree)."""
  return jax.tree.leaves(param_shardings,
                         is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def muon_batches(specs: list[LeafSpec], dtypes: list, shardings: list | None = None
                 ) -> list[list[int]]:
  """Indices of the Muon leaves grouped by (kind, shape, dtype, sharding spec), in first-seen
  order; each group is orthogonalized by one batched Newton-Schulz."""
  groups: dict[tuple, list[int]] = {}
  for i, spec in enumerate(specs):
    if spec.group != "muon":
      continue
    sh = None if shardings is None else shardings[i]
    sh_key = (tuple(sh.spec), sh.mesh) if isinstance(sh, jax.sharding.NamedSharding) else sh
    groups.setdefault((spec.kind, spec.shape, str(dtypes[i]), sh_key), []).append(i)
  return list(groups.values())


class AtmaOptimizer:
  """`init(params) -> OptState`; `apply(params, grads, state) -> (params, state, stats)`.

  `shardings`: the parameters' shardings as a flat list (optional); with `cfg.muon_batch` a
  stacked Newton-Schulz batch is held at the shared sharding of its leaves.
  """

  def __init__(self, cfg: OptimConfig, specs: list[LeafSpec], total_steps: int,
               shardings: list | None = None):
    self.cfg = cfg
    self.specs = specs
    self.total_steps = total_steps
    if shardings is not None and len(shardings) != len(specs):
      raise OptimizerError(f"{len(shardings)} shardings for {len(specs)} parameters; pass the "
                           "shardings tree of the same params the optimizer is built for.")
    self.shardings = shardings

  def _check(self, params):
    paths = leaf_paths(params)
    if paths != [s.path for s in self.specs]:
      raise OptimizerError("params tree differs from the one the optimizer was built for "
                           "(rebuild it with build_optimizer(cfg, params)).")

  def init(self, params) -> OptState:
    self._check(params)
    slots = []
    for spec, p in zip(self.specs, jax.tree.leaves(params)):
      if spec.group == "muon":
        slots.append((jnp.zeros(p.shape, jnp.float32),))
      else:
        slots.append((jnp.zeros(p.shape, p.dtype), jnp.zeros(p.shape, p.dtype)))
    return OptState(count=jnp.zeros([], jnp.int32), slots=slots)

  def lr_mult(self, count):
    return lr_multiplier(count, self.total_steps, self.cfg.cooldown_frac)

  def apply(self, params, grads, state: OptState):
    cfg = self.cfg
    grads, grad_norm = clip_by_global_norm(grads, cfg.clip_norm)
    eta = self.lr_mult(state.count)
    t = (state.count + 1).astype(jnp.float32)
    bc1 = 1.0 - jnp.float32(cfg.adam_b1) ** t
    bc2 = 1.0 - jnp.float32(cfg.adam_b2) ** t
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = jax.tree.leaves(grads)
    muon_out = self._batched_muon(p_leaves, g_leaves, state.slots, eta) if cfg.muon_batch else {}
    new_p, new_slots = [], []
    for i, (spec, p, g, slot) in enumerate(zip(self.specs, p_leaves, g_leaves, state.slots)):
      lr_t = group_lr(spec, cfg) * eta
      if i in muon_out:
        upd, mb = muon_out[i]
        new_slots.append((mb,))
      elif spec.group == "muon":
        upd, mb = muon_leaf_update(
            g, slot[0], p, spec.kind, lr_t, momentum=cfg.muon_momentum,
            weight_decay=cfg.muon_weight_decay, ns_steps=cfg.muon_ns_steps,
            ns_coeffs=cfg.muon_ns_coeffs)
        new_slots.append((mb,))
      else:
        g32 = g.astype(jnp.float32)
        m = slot[0].astype(jnp.float32)
        v = slot[1].astype(jnp.float32)
        m = m + (1.0 - cfg.adam_b1) * (g32 - m)
        v = cfg.adam_b2 * v + (1.0 - cfg.adam_b2) * g32 * g32
        denom = jnp.sqrt(v) / jnp.sqrt(bc2) + cfg.adam_eps
        upd = -(lr_t / bc1) * m / denom
        new_slots.append((m.astype(slot[0].dtype), v.astype(slot[1].dtype)))
      new_p.append((p.astype(jnp.float32) + upd).astype(p.dtype))
    stats = {"grad_norm": grad_norm, "lr_mult": eta}
    new_state = OptState(count=state.count + 1, slots=new_slots)
    return jax.tree.unflatten(treedef, new_p), new_state, stats

  def _batched_muon(self, p_leaves, g_leaves, slots, eta) -> dict[int, tuple]:
    """{leaf index: (update, new momentum)} of every Muon leaf, NS batched per `muon_batches`."""
    cfg = self.cfg
    out = {}
    for idx in muon_batches(self.specs, [p.dtype for p in p_leaves], self.shardings):
      dirs = [momentum_direction(g_leaves[i], slots[i][0], cfg.muon_momentum) for i in idx]
      ortho = orthogonalized_updates(
          [u for u, _ in dirs], self.specs[idx[0]].kind, ns_steps=cfg.muon_ns_steps,
          ns_coeffs=cfg.muon_ns_coeffs,
          sharding=None if self.shardings is None else self.shardings[idx[0]],
          split=cfg.muon_batch_split)
      for i, (_, mb), o in zip(idx, dirs, ortho):
        lr_t = group_lr(self.specs[i], cfg) * eta
        out[i] = (decayed_update(o, p_leaves[i], lr_t, cfg.muon_weight_decay), mb)
    return out

  def state_shardings(self, param_shardings, scalar_sharding) -> OptState:
    """Shardings of the OptState: every slot follows its parameter."""
    sh = flat_shardings(param_shardings)
    slots = [tuple(s for _ in range(1 if spec.group == "muon" else 2))
             for spec, s in zip(self.specs, sh)]
    return OptState(count=scalar_sharding, slots=slots)


def build_optimizer(cfg: OptimConfig, params, total_steps: int,
                    param_shardings=None) -> AtmaOptimizer:
  """The optimizer for `params`; `param_shardings` (same tree, Sharding leaves) is optional."""
  sh = None if param_shardings is None else flat_shardings(param_shardings)
  return AtmaOptimizer(cfg, classify(params), total_steps, sh)


def group_summary(specs: list[LeafSpec]) -> dict[str, Any]:
  """{group: (number of leaves, number of elements)} for logs and tests."""
  out: dict[str, Any] = {g: [0, 0] for g in GROUPS}
  for s in specs:
    n = 1
    for d in s.shape:
      n *= d
    out[s.group][0] += 1
    out[s.group][1] += n
  return {g: tuple(v) for g, v in out.items()}
