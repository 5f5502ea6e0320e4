"""Small stand-ins used by the training tests (no tests here).

`StandInLM` follows the model contract (docs/DESIGN.md): `embed`, `blocks[i]` with Linear
kernels `[in, out]`, a depthwise conv kernel `[K, C]` and a `v_null` matrix, `norm`, `proj`;
`model(ids, rng=..., sigreg_mode=...) -> (h, aux)`, `model.logits(h)`. It lets the train-step,
sharding and checkpoint tests run independently of the real model. `ToyData` is a checkpointable
token iterator (a deterministic function of its position).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _p(value, axes):
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class _Lin(nnx.Module):
  def __init__(self, i, o, axes, rngs):
    self.kernel = _p(jax.random.normal(rngs.params(), (i, o)) / np.sqrt(i), axes)
    self.bias = _p(jnp.zeros((o,)), axes[1:])

  def __call__(self, x):
    return x @ self.kernel[...] + self.bias[...]


class _Block(nnx.Module):
  def __init__(self, d, rngs):
    self.fc = _Lin(d, 4 * d, ("embed", "mlp"), rngs)
    self.out = _Lin(4 * d, d, ("mlp", "embed"), rngs)
    self.conv = nnx.Module()
    self.conv.kernel = _p(jax.random.normal(rngs.params(), (3, d)) * 0.3, ("conv_taps", "embed"))
    self.v_null = _p(jnp.zeros((2, d // 2)), ("head_scalars", "head_dim"))
    self.norm1 = nnx.Module()
    self.norm1.weight = _p(jnp.ones((d,)), ("norm",))

  def __call__(self, x):
    w = self.conv.kernel[...]
    xp = jnp.pad(x, ((0, 0), (2, 0), (0, 0)))
    c = xp[:, :-2] * w[0] + xp[:, 1:-1] * w[1] + xp[:, 2:] * w[2]
    h = x + c * self.norm1.weight[...] + self.v_null[...].reshape(-1) * 0.1
    return h + self.out(jax.nn.relu(self.fc(h)))


class StandInLM(nnx.Module):
  def __init__(self, vocab=64, d=16, layers=2, *, rngs):
    self.embed = nnx.Module()
    self.embed.embedding = _p(jax.random.normal(rngs.params(), (vocab, d)), ("vocab", "embed"))
    self.blocks = nnx.List([_Block(d, rngs) for _ in range(layers)])
    self.norm = nnx.Module()
    self.norm.weight = _p(jnp.ones((d,)), ("norm",))
    self.proj = _Lin(d, vocab, ("embed", "vocab"), rngs)

  def __call__(self, ids, *, rng=None, sigreg_mode="baseline"):
    x = self.embed.embedding[...][ids]
    for b in self.blocks:
      x = b(x)
    h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.norm.weight[...]
    reg = jnp.zeros((), jnp.float32) if rng is None else jnp.mean(h) ** 2 * 0
    return h, {"reg": reg, "align": jnp.zeros((), jnp.float32)}

  def logits(self, h):
    return self.proj(h).astype(jnp.float32)


def standin_losses(cfg, model, inputs, targets, rng, *, train):
  h, aux = model(inputs, rng=rng if train else None)
  logits = model.logits(h)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(nll), aux["reg"], aux["align"]


def standin_model_fn(cfg):
  return lambda rngs: StandInLM(vocab=cfg.model.vocab_size, d=cfg.model.hidden_size,
                                layers=cfg.model.num_layers, rngs=rngs)


class ToyData:
  """Deterministic batches: step k's global batch is a fixed function of (seed, k)."""

  def __init__(self, cfg, process_index=0, process_count=1):
    t = cfg.train
    self.rows = t.global_batch // process_count
    self.T, self.V = t.seq_len, cfg.model.vocab_size
    self.seed, self.proc, self.count = cfg.data.seed, process_index, process_count
    self.pos = 0

  def __iter__(self):
    return self

  def __next__(self):
    r = np.random.default_rng([self.seed, self.pos])
    B = self.rows * self.count
    # learnable structure: next token = (token + 1) % V with noise; the GLOBAL batch is a
    # function of the step only, each process takes its rows
    start = r.integers(0, self.V, size=(B, 1))
    seq = (start + np.arange(self.T + 1)[None]) % self.V
    noise = r.random(seq.shape) < 0.1
    seq = np.where(noise, r.integers(0, self.V, size=seq.shape), seq).astype(np.int32)
    seq = seq[self.proc * self.rows:(self.proc + 1) * self.rows]
    self.pos += 1
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, s):
    self.pos = int(s["pos"])
