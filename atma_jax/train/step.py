"""Pure train / eval steps (ATMA_SPEC §5.7, §6.5).

Dimension glossary: B global batch (sequences per optimizer step), M micro-batch (sequences per
micro-step, global), N = B / M micro-steps, T sequence length, D hidden.

    train_step(state, batch) -> (state, metrics)       eval_step(state, batch) -> metrics

Per micro-batch the objective is (§5.7)

    L = (1 - alpha) * CE + alpha * reg + lambda * align

with CE the token SUM (`optim.loss_reduction="sum"`, the reference: gradients of the sum are
accumulated over micro-batches with `lax.scan`) or the token MEAN of the whole step ("mean":
CE_micro / tokens_per_step and the aux terms / N, so the accumulated gradient is that of the
step mean). The optimizer then clips ALL gradients to global norm `clip_norm` (always active for
"sum") and steps. Randomness: `fold_in(fold_in(state.rng, step), micro)`. Where the micro-step
gradients are summed over devices (every micro-step or once per step): accumulate.py.
`metrics["finite"]` says whether the loss terms and the gradient norm are finite; with
`train.on_nonfinite="skip"` a non-finite step leaves parameters and optimizer state as they were
(the step count advances).

Micro-batch k holds rows {i * N + k}: a [B, T] batch sharded over data x fsdp in contiguous row
blocks is reshaped to [M, N, T] (sharding of dim 0 kept) and swapped to [N, M, T], so every
micro-batch is spread evenly over the same devices. Metrics stay on device (the loop fetches them
one step late).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from atma_jax.config import Config
from atma_jax.sharding import logical_to_spec, use_mesh
from atma_jax.train.accumulate import make_accumulate
from atma_jax.train.mesh import BATCH_AXES, batch_sharding, replicated
from atma_jax.train.state import StateSetup, TrainState

LOGITS_TOKENS = 16384  # tokens of [*, V] logits materialized at once in the loss


def logits_chunk(micro_batch: int, seq_len: int) -> int:
  return max(1, min(seq_len, LOGITS_TOKENS // max(micro_batch, 1)))


def model_losses(cfg: Config, model, inputs_BT, targets_BT, rng, *, train: bool):
  """(CE sum fp32, reg, align) of one batch under `model`."""
  from atma_jax.model.loss import token_nll
  o = cfg.optim
  kw = {"rng": rng, "sigreg_mode": o.sigreg_mode} if train else {}
  h_BTD, aux = model(inputs_BT, **kw)
  chunk = logits_chunk(inputs_BT.shape[0], inputs_BT.shape[1])
  with jax.named_scope("lm_head_loss"):
    nll_BT = token_nll(model, h_BTD, targets_BT, chunk)
  return jnp.sum(nll_BT.astype(jnp.float32)), aux["reg"], aux["align"]


def make_train_step(cfg: Config, setup: StateSetup, mesh: Mesh, *,
                    losses_fn: Callable = model_losses) -> Callable:
  """Jitted `train_step(state, batch)`; `batch = {"inputs", "targets"}` int32 [B, T]."""
  t, o = cfg.train, cfg.optim
  B, M, T = t.global_batch, t.micro_batch, t.seq_len
  N = B // M
  graphdef, opt = setup.graphdef, setup.optimizer
  alpha, lam = o.sigreg_alpha, o.distractor_weight
  micro_spec = P(None, *logical_to_spec(BATCH_AXES, mesh))

  def micro_loss(params, inputs_MT, targets_MT, rng):
    model = nnx.merge(graphdef, params)
    ce, reg, align = losses_fn(cfg, model, inputs_MT, targets_MT, rng, train=True)
    if o.loss_reduction == "sum":
      loss = (1.0 - alpha) * ce + alpha * reg + lam * align
    else:
      loss = (1.0 - alpha) * ce / (B * T) + (alpha * reg + lam * align) / N
    return loss, (ce, reg, align)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  accumulate = make_accumulate(cfg, mesh, grad_fn, setup.shardings.params)

  def split_micro(x_BT):
    if x_BT.shape != (B, T):
      raise ValueError(f"batch array of shape {x_BT.shape}; expected [global_batch, seq_len] = "
                       f"{(B, T)}")
    x_NMT = jnp.swapaxes(x_BT.reshape(M, N, T), 0, 1)
    return jax.lax.with_sharding_constraint(x_NMT, NamedSharding(mesh, micro_spec))

  def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
    inputs, targets = split_micro(batch["inputs"]), split_micro(batch["targets"])
    rng_step = jax.random.fold_in(state.rng, state.step)
    grads, ce, reg, align = accumulate(state.params, inputs, targets, rng_step)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    params, opt_state, stats = opt.apply(state.params, grads, state.opt_state)
    finite = (jnp.isfinite(ce) & jnp.isfinite(reg) & jnp.isfinite(align)
              & jnp.isfinite(stats["grad_norm"]))
    if t.on_nonfinite == "skip":  # drop the update: this step's batch is consumed, nothing else
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state.params, state.opt_state))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           rng=state.rng)
    metrics = {
        "loss": ce / (B * T),  # nats / token
        "grad_norm": stats["grad_norm"],
        "lr": o.muon_lr * stats["lr_mult"],
        "lr_mult": stats["lr_mult"],
        "tokens": jnp.asarray(B * T, jnp.int32),
        "reg": reg / N,
        "align": align / N,
        "finite": finite,  # loss terms and gradient norm all finite (divergence.py)
    }
    return new_state, metrics

  jitted = jax.jit(train_step, in_shardings=(setup.shardings, batch_sharding(mesh)),
                   out_shardings=(setup.shardings, replicated(mesh)), donate_argnums=(0,))
  return _with_mesh(jitted, mesh)


def make_eval_step(cfg: Config, setup: StateSetup, mesh: Mesh, *,
                   losses_fn: Callable = model_losses) -> Callable:
  """Jitted `eval_step(state, batch) -> {"loss_sum", "tokens"}` (no rng: aux losses off)."""
  graphdef = setup.graphdef

  def eval_step(state: TrainState, batch):
    model = nnx.merge(graphdef, state.params)
    ce, _, _ = losses_fn(cfg, model, batch["inputs"], batch["targets"], None, train=False)
    return {"loss_sum": ce, "tokens": jnp.asarray(batch["inputs"].size, jnp.int32)}

  jitted = jax.jit(eval_step, in_shardings=(setup.shardings, batch_sharding(mesh)),
                   out_shardings=replicated(mesh))
  return _with_mesh(jitted, mesh)


def _with_mesh(fn, mesh):
  """Traces/runs `fn` with `mesh` active so the model's logical `constrain`s see it."""

  def call(*args):
    with use_mesh(mesh):
      return fn(*args)

  call.jitted = fn
  return call
