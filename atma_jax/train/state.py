"""The train state pytree and its (sharded) creation.

`TrainState(step, params, opt_state, rng)`: `params` is the `nnx.State` of the model's
`nnx.Param`s (the graphdef lives outside, static), `opt_state` the `OptState` of
`AtmaOptimizer`, `rng` a raw uint32 PRNG key from which each step folds in its step number.
Parameters are created directly in their shardings (jit with `out_shardings`), so a model
larger than one device's memory never exists unsharded.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from atma_jax.config import Config
from atma_jax.train.mesh import param_shardings, replicated
from atma_jax.train.optimizer import AtmaOptimizer, build_optimizer


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nnx.State of nnx.Param
  opt_state: Any  # optimizer.OptState
  rng: jax.Array  # uint32[2]


def default_model_fn(cfg: Config) -> Callable[[nnx.Rngs], nnx.Module]:
  from atma_jax.model import Atma
  return lambda rngs: Atma(cfg.model, rngs=rngs)


def abstract_model(cfg: Config, model_fn=None):
  """(graphdef, abstract params State) without allocating anything."""
  model_fn = model_fn or default_model_fn(cfg)
  model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(cfg.train.seed)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


class StateSetup(NamedTuple):
  graphdef: Any
  optimizer: AtmaOptimizer
  abstract: TrainState  # ShapeDtypeStructs with shardings (restore target)
  shardings: TrainState
  notes: list  # sharding notes (replicated dims)


def setup_state(cfg: Config, mesh: Mesh, model_fn=None) -> StateSetup:
  graphdef, abs_params = abstract_model(cfg, model_fn)
  notes: list[str] = []
  p_sh = param_shardings(mesh, abs_params, notes)
  opt = build_optimizer(cfg.optim, abs_params, cfg.train.steps, p_sh)
  rep = replicated(mesh)
  sh = TrainState(step=rep, params=p_sh, opt_state=opt.state_shardings(p_sh, rep), rng=rep)
  abs_state = jax.eval_shape(lambda p: _fresh(p, opt, cfg.train.seed), abs_params)
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_state, sh)
  return StateSetup(graphdef, opt, abs_state, sh, notes)


def _fresh(params, opt: AtmaOptimizer, seed: int) -> TrainState:
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0x7A1)  # independent of the init stream
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt.init(params),
                    rng=rng)


def init_state(cfg: Config, setup: StateSetup, model_fn=None) -> TrainState:
  """A fresh TrainState, born in its shardings."""
  model_fn = model_fn or default_model_fn(cfg)

  def make():
    model = model_fn(nnx.Rngs(cfg.train.seed))
    params = nnx.state(model, nnx.Param)
    return _fresh(params, setup.optimizer, cfg.train.seed)

  return jax.jit(make, out_shardings=setup.shardings)()
