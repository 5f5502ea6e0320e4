"""Basic layers: Linear, Embed, RMSNorm (learnable and weightless), depthwise causal conv, MLP.

Dimension glossary
  B batch   T time   C channels   K conv taps   D hidden   F MLP hidden (= mlp_ratio * D)

Numerics (ATMA_SPEC §2.3, §2.4, §2.5): parameters are stored in the param dtype and cast to the
activation dtype at use (torch `weight.type_as(x)`); matmuls accumulate in fp32 and round once to
the activation dtype (the cuBLAS epilogue adds the bias before rounding); norm statistics and
conv accumulation are fp32. The Linear backward is torch's too: the output cotangent arrives in
the activation dtype and both gradient matmuls take it as is (bf16 x bf16, fp32 accumulation);
JAX's own transpose of the fp32-accumulating dot would upcast it and run both as fp32 (TF32)
GEMMs, which took a third of an H100 train step (bench/results/train_step_profile_h100_run1.json).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from atma_jax.model import init, remat
# fp32 for half/single activations (statistics, gates, accumulation), fp64 stays fp64: the one
# copy lives beside the Polar oracle and is re-exported here for the model modules.
from pallas_kernels.polar_attention import stats_dtype  # noqa: F401

# Weightless RMS-norm eps: torch's default for F.rms_norm without eps is the machine epsilon of
# the computation type, fp32 for bf16/fp16/fp32 inputs (spec §2.3).
FP32_EPS = 2.0 ** -23
RMSNORM_EPS = 1e-6  # learnable-weight RMSNorm modules (hard-coded 1e-6 in the reference)


def rms_norm(x: jax.Array, eps: float = FP32_EPS) -> jax.Array:
  """Weightless RMS-norm over the last axis; mean square in fp32 (fp64 for fp64 input)."""
  xf = x.astype(stats_dtype(x.dtype))
  ms = jnp.mean(xf * xf, axis=-1, keepdims=True)
  return (xf * jax.lax.rsqrt(ms + eps)).astype(x.dtype)


def l2_normalize(x: jax.Array, floor: float = 1e-12) -> jax.Array:
  """x / max(||x||, floor) over the last axis (torch F.normalize), finite gradient at x = 0."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, floor * floor))


class Linear(nnx.Module):
  """y = x @ kernel + bias with kernel [in, out]; torch-default init U(+-1/sqrt(in))."""

  def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str | None],
               param_dtype, rngs: nnx.Rngs):
    in_axis, out_axis = axes
    bound = init.linear_bound(in_features)
    self.in_features, self.out_features = in_features, out_features
    self.kernel = init.param(
        init.uniform(rngs.params(), (in_features, out_features), bound, param_dtype),
        (in_axis, out_axis))
    self.bias = init.param(init.uniform(rngs.params(), (out_features,), bound, param_dtype),
                           (out_axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear(x, self.kernel.get_value(), self.bias.get_value())

  def column_blocks(self, x: jax.Array, parts: int) -> tuple[jax.Array, ...]:
    """`jnp.split(self(x), parts, -1)` as `parts` matmuls on the kernel's column blocks: the
    backward then adds their input gradients instead of concatenating the blocks' cotangents
    into one [..., out] tensor first (a copy that took 7% of an H100 train step)."""
    if self.out_features % parts:
      raise ValueError(f"out_features={self.out_features} does not split into {parts} blocks")
    w_IO, b_O, n = self.kernel.get_value(), self.bias.get_value(), self.out_features // parts
    return tuple(linear(x, w_IO[:, i * n:(i + 1) * n], b_O[i * n:(i + 1) * n])
                 for i in range(parts))


# XLA's GPU simplifier rewrites a dot whose left operand is one row (a vector, once the unit
# axes are dropped) into multiply + reduce when the weight has < 10M elements: at batch-1 decode
# every projection of the 378M model went that way: 1.06 of the step's 1.41 ms of GPU time
# (bench/results/profile_decode_b1_2k_h200.json, "off"), i.e. ~0.6 TB/s derived from the 653 MB
# of Linear weights (bench/gemv_rows.py counts them).
# With MIN_GEMM_ROWS = 2 a single row is padded to two (zeros, sliced off; results unchanged),
# which keeps the dot a GEMM. Measured on one H200 in one call (bench/gemv_rows.py,
# bench/results/gemv_rows_h200.json): the 93 Linears of the 378M model on one bf16 row took
# 937 us as multiply + reduce and 189 us padded to two rows (4.96x). 1 restores the old form.
MIN_GEMM_ROWS = 2


@jax.custom_vjp
def linear(x_BI: jax.Array, kernel_IO: jax.Array, bias_O: jax.Array) -> jax.Array:
  """round_to_x_dtype(x @ kernel + bias), accumulated in fp32 (`...` leading axes allowed)."""
  acc = stats_dtype(x_BI.dtype)
  lead, rows = x_BI.shape[:-1], math.prod(x_BI.shape[:-1])
  if 0 < rows < MIN_GEMM_ROWS:  # (an empty batch stays empty)
    x_RI = jnp.pad(x_BI.reshape(rows, -1), ((0, MIN_GEMM_ROWS - rows), (0, 0)))
    y_RO = jnp.einsum("ri,io->ro", x_RI, kernel_IO.astype(x_BI.dtype), preferred_element_type=acc)
    y = y_RO[:rows].reshape(*lead, kernel_IO.shape[-1])
  else:
    y = jnp.einsum("...i,io->...o", x_BI, kernel_IO.astype(x_BI.dtype), preferred_element_type=acc)
  return (y + bias_O.astype(acc)).astype(x_BI.dtype)


def _linear_fwd(x_BI, kernel_IO, bias_O):
  return linear(x_BI, kernel_IO, bias_O), (x_BI, kernel_IO, bias_O)


def _linear_bwd(res, g_BO):
  x_BI, kernel_IO, bias_O = res
  acc = stats_dtype(x_BI.dtype)
  g_BO = g_BO.astype(x_BI.dtype)
  dx_BI = jnp.einsum("...o,io->...i", g_BO, kernel_IO.astype(x_BI.dtype),
                     preferred_element_type=acc).astype(x_BI.dtype)
  dkernel_IO = jnp.einsum("...i,...o->io", x_BI, g_BO, preferred_element_type=acc)
  dbias_O = jnp.sum(g_BO.astype(acc), axis=tuple(range(g_BO.ndim - 1)))
  return dx_BI, dkernel_IO.astype(kernel_IO.dtype), dbias_O.astype(bias_O.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


class Embed(nnx.Module):
  """Token embedding table `embedding [V, D]`, N(0, 1), stored in `dtype` (bf16 in the reference)."""

  def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = init.param(init.normal(rngs.params(), (vocab_size, dim), dtype),
                                ("vocab", "embed"))

  def __call__(self, ids_BT: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.embedding.get_value(), ids_BT, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
  """Learnable RMSNorm (eps 1e-6): statistics in fp32, weight cast to the activation dtype."""

  def __init__(self, dim: int, *, param_dtype, eps: float = RMSNORM_EPS):
    self.eps = eps
    self.weight = init.param(jnp.ones((dim,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.eps) * self.weight.get_value().astype(x.dtype)


def causal_depthwise_conv(x_BTC: jax.Array, w_KC: jax.Array,
                          tail_BKC: jax.Array | None = None) -> jax.Array:
  """y_t[c] = sum_m w[m, c] x_{t-(K-1)+m}[c], zero left padding (tap K-1 = current token).

  Cross-correlation orientation of torch's Conv1d; accumulated in fp32, returned in x's dtype.
  `tail_BKC` [B, K-1, C] replaces the zero padding by the K-1 inputs before x (a decode cache).
  """
  K = w_KC.shape[0]
  T = x_BTC.shape[1]
  acc = stats_dtype(x_BTC.dtype)
  xf = x_BTC.astype(acc)
  w = w_KC.astype(x_BTC.dtype).astype(acc)  # torch casts the weight to the activation dtype
  if tail_BKC is None:
    x_pad = jnp.pad(xf, ((0, 0), (K - 1, 0), (0, 0)))
  else:
    x_pad = jnp.concatenate([tail_BKC.astype(x_BTC.dtype).astype(acc), xf], axis=1)
  y = sum(x_pad[:, m:m + T, :] * w[m] for m in range(K))
  return y.astype(x_BTC.dtype)


def conv_tail_after(x_BTC: jax.Array, tail_BKC: jax.Array,
                    lengths_B: jax.Array | None) -> jax.Array:
  """The K-1 conv inputs before position lengths[b] of `concat(tail, x)` per row: the tail a
  causal conv needs to continue after each row's real tokens (padding never enters it).
  `lengths_B=None`: every row's T inputs are real (a static slice)."""
  Km1 = tail_BKC.shape[1]
  x_ext = jnp.concatenate([tail_BKC, x_BTC.astype(tail_BKC.dtype)], axis=1)
  if lengths_B is None:
    return x_ext[:, x_BTC.shape[1]:]
  idx_BK = lengths_B.astype(jnp.int32)[:, None] + jnp.arange(Km1, dtype=jnp.int32)[None, :]
  return jnp.take_along_axis(x_ext, idx_BK[:, :, None], axis=1)


class DepthwiseConv(nnx.Module):
  """Depthwise causal conv weights `kernel [K, C]` (torch [C, 1, K]); default U(+-1/sqrt(K))."""

  def __init__(self, channels: int, kernel_size: int, *, channel_axis: str, param_dtype,
               rngs: nnx.Rngs):
    self.kernel = init.param(
        init.uniform(rngs.params(), (kernel_size, channels), init.conv_bound(kernel_size),
                     param_dtype),
        ("conv_taps", channel_axis))

  def __call__(self, x_BTC: jax.Array) -> jax.Array:
    return causal_depthwise_conv(x_BTC, self.kernel.get_value())

  def cached(self, x_BTC: jax.Array, tail_BKC: jax.Array, lengths_B: jax.Array | None):
    """Continues from `tail` [B, K-1, C]: (y [B, T, C], tail after each row's `lengths` real
    inputs). Outputs at padded positions (t >= lengths[b]) are meaningless."""
    y_BTC = causal_depthwise_conv(x_BTC, self.kernel.get_value(), tail_BKC)
    return y_BTC, conv_tail_after(x_BTC, tail_BKC, lengths_B)


class MLP(nnx.Module):
  """proj(g * relu(a)^2) with [a | g] = fc(x): squared ReLU on the FIRST half (spec §2.4)."""

  def __init__(self, dim: int, ratio: int, *, param_dtype, rngs: nnx.Rngs):
    hidden = ratio * dim
    self.fc = Linear(dim, 2 * hidden, axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
    self.proj = Linear(hidden, dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    a_BTF, g_BTF = remat.tag(self.fc.column_blocks(x_BTD, 2), remat.MLP_FC)
    r_BTF = jax.nn.relu(a_BTF)
    return self.proj(g_BTF * (r_BTF * r_BTF))
