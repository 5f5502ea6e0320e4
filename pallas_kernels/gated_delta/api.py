"""The gated delta rule op: dispatch and custom VJP on plain (per-shard) arrays (docs/DESIGN.md).

  gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, *, initial_state=None,
                   output_final_state=False, chunk_size=64, impl="auto")
      -> (o_BTHV f32, final_state_BHKV f32 | None)
  gated_delta_step(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV, *, impl="auto")
      -> (o_BHV f32, state_BHKV f32)

Convention and math: `reference.py` (ATMA_SPEC §4.4): per token `S <- gamma S;
u = beta (v - S^T k); S <- S + k u^T; o = S^T q`, state `[K, V]`. q, k unit-normalized by the
caller; log_gamma <= 0, beta in [0, 1], fp32. Differentiable in q, k, v, log_gamma, beta and
the initial state.

`impl` (decided at trace time by `pallas_kernels.dispatch` from the `BACKENDS` table):
  "xla"    chunked XLA path (`xla_chunked.py`), differentiated by checkpointed autodiff;
  "pallas" the platform's Pallas backend (`gpu_triton` on GPU, `tpu` on TPU), error naming the
           reason when it is absent or does not support the shapes;
  "auto"   Pallas on GPU/TPU when available and supported, else "xla".
A Pallas backend's `gated_delta_fwd` and `gated_delta_bwd` are joined here into the one
`custom_vjp` (residuals = the primal inputs, see `xla_chunked.py`); a backend without a `bwd`
gets the XLA path's recompute-and-differentiate backward. A backend that also exports
`gated_delta_fwd_residuals` (GPU-Triton) saves its forward's prepass (w, u, T0, and each
sequence piece's start state and transition when its tuning says so) as extra residuals and
gets them back as `gated_delta_bwd(..., prepass=...)`: no prepass rerun in the backward, for
B*Tp*H*((K + V)*itemsize + 4*C) more bytes per layer (gpu_triton docstring).

`gated_delta_step` (one decode token) has its own table, `STEP_BACKENDS`: the oracle's step
reordered to read the state twice and write it once (`xla_step.py`) is its XLA backend and CPU
path, the fused in-place kernel `gpu_step` its GPU one. Decode never differentiates the step;
under autodiff the kernel is not used: the op's JVP (and so its VJP) is the oracle's, on the
oracle's primal output.

Mesh-free: batch rows and heads are independent, so a caller that shards wraps
`gated_delta_rule` in `jax.shard_map` over batch and heads.

Dimension glossary: B batch, T tokens, H heads, K key/query dim, V value dim.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import dispatch
from pallas_kernels.gated_delta import reference, xla_chunked

IMPLS = dispatch.IMPLS
_P = "pallas_kernels.gated_delta."
# platform -> Pallas candidates, preferred first (pallas_kernels.dispatch)
BACKENDS = dispatch.Backends(
    op="gated delta", xla=_P + "xla_chunked",
    pallas={"gpu": (dispatch.Candidate(_P + "gpu_triton"),),
            "tpu": (dispatch.Candidate(_P + "tpu"),)},
    exports=("gated_delta_fwd",),
    arg_names=("q", "k", "v", "log_gamma", "beta", "initial_state"))
STEP_BACKENDS = dispatch.Backends(
    op="gated delta step", xla=_P + "xla_step",
    pallas={"gpu": (dispatch.Candidate(_P + "gpu_step"),)},
    exports=("gated_delta_step",),
    arg_names=("q", "k", "v", "log_gamma", "beta", "state"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pallas_rule(mod, chunk_size: int, q, k, v, log_gamma, beta, s0):
  return mod.gated_delta_fwd(q, k, v, log_gamma, beta, s0, chunk_size=chunk_size)


def _pallas_rule_fwd(mod, chunk_size, q, k, v, log_gamma, beta, s0):
  primals = (q, k, v, log_gamma, beta, s0)
  fwd_res = getattr(mod, "gated_delta_fwd_residuals", None)
  if fwd_res is None or getattr(mod, "gated_delta_bwd", None) is None:
    out = _pallas_rule(mod, chunk_size, *primals)
    return out, (primals, None)  # residuals = the primal inputs
  o, s_final, prepass = fwd_res(*primals, chunk_size=chunk_size)
  return (o, s_final), (primals, prepass)  # + the forward's prepass (w, u, T0): no rerun


def _pallas_rule_bwd(mod, chunk_size, res, cts):
  do_BTHV, dsT_BHKV = cts
  primals, prepass = res
  bwd = getattr(mod, "gated_delta_bwd", None) or xla_chunked.gated_delta_bwd
  extra = {} if prepass is None else {"prepass": prepass}
  grads = bwd(*primals, do_BTHV, dsT_BHKV, chunk_size=chunk_size, **extra)
  return tuple(g.astype(x.dtype) for g, x in zip(grads, primals))


_pallas_rule.defvjp(_pallas_rule_fwd, _pallas_rule_bwd)


def _run_backend(impl: str, chunk_size: int, q, k, v, log_gamma, beta, s0):
  """Picks the backend for these arrays and runs it: (o_BTHV, final_state_BHKV)."""
  args = (q, k, v, log_gamma, beta, s0)
  mod = dispatch.select(BACKENDS, impl, args, {"chunk_size": chunk_size})
  if mod.__name__ == BACKENDS.xla:  # differentiated by (checkpointed) autodiff
    return mod.gated_delta_fwd(*args, chunk_size=chunk_size)
  return _pallas_rule(mod, chunk_size, *args)


def gated_delta_rule(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH, *, initial_state=None,
                     output_final_state: bool = False, chunk_size: int = 64, impl: str = "auto"):
  """Gated delta rule over T tokens: `(o_BTHV, final_state_BHKV or None)`, both fp32.

  `initial_state` `[B, H, K, V]` (None = zeros) carries a chunked prefill; set
  `output_final_state=True` to get the state after the last token.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int (e.g. 64); got {chunk_size!r}")
  reference.check_gated_delta_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH, beta_BTH,
                                     initial_state)
  # the oracle's own rule: fp64 when ANY input (state included) is fp64, else fp32
  dt, s0_BHKV = reference.initial_state_or_zeros(q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH,
                                                 beta_BTH, initial_state)
  log_gamma_BTH, beta_BTH = log_gamma_BTH.astype(dt), beta_BTH.astype(dt)
  o_BTHV, sT_BHKV = _run_backend(impl, chunk_size, q_BTHK, k_BTHK, v_BTHV, log_gamma_BTH,
                                 beta_BTH, s0_BHKV)
  return o_BTHV, (sT_BHKV if output_final_state else None)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pallas_step(mod, q, k, v, log_gamma, beta, state):
  return mod.gated_delta_step(q, k, v, log_gamma, beta, state)


@_pallas_step.defjvp
def _pallas_step_jvp(mod, primals, tangents):
  """Differentiated, the step falls back to the oracle (primal and JVP; its VJP by transpose)."""
  del mod
  return jax.jvp(reference.gated_delta_step, primals, tangents)


def gated_delta_step(q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV, *,
                     impl: str = "auto"):
  """One decode token (the oracle's step math): `(o_BHV, new_state_BHKV)`, fp32 (fp64 when an
  input is). `impl` picks the backend from `STEP_BACKENDS` (the fused in-place kernel on GPU);
  under autodiff the oracle runs whatever `impl` says (see the module docstring)."""
  args = (q_BHK, k_BHK, v_BHV, log_gamma_BH, beta_BH, state_BHKV)
  reference.check_gated_delta_step_shapes(*args)
  mod = dispatch.select(STEP_BACKENDS, impl, args)
  if mod.__name__ == STEP_BACKENDS.xla:
    return mod.gated_delta_step(*args)
  return _pallas_step(mod, *args)
