"""Our parameter state <-> the reference's state dict, with validation before any compute.

    state_dict_from_params(cfg, params) -> {torch key: np.ndarray in torch layout and dtype}
    params_from_state_dict(cfg, sd)     -> nnx.State of Params, the structure of `Atma(cfg)`

Both directions go through `layout.reference_layout(cfg)` (spec §9). The state dict is checked
against it first (missing keys, unexpected keys, shapes, vocab, RoPE buffer) and every problem is
reported at once in one `InteropError`, with what the weights look like and how to fix it;
weights holding NaN or Inf are refused, naming the tensors.
The memory gate constants (3.9, 0.0) live in the config, not in the biases: biases map 1:1.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from atma_jax.config import ModelConfig
from atma_jax.errors import AtmaError
from atma_jax.interop import layout as L
from atma_jax.interop.ref_config import check_exportable

_COMPILE_PREFIX = "_orig_mod."


class InteropError(AtmaError, ValueError):
  """A checkpoint that does not fit the architecture; the message lists every problem and the fix."""


# ---------------------------------------------------------------------------------------------
# Our parameter state, flattened.


def _leaf_value(v: Any) -> Any:
  if hasattr(v, "get_value"):
    return v.get_value()
  return getattr(v, "value", v)


def flat_params(params: Any) -> dict[tuple, Any]:
  """{path: leaf} for an nnx.State (or a nested dict/list of arrays)."""
  from flax import nnx
  if isinstance(params, nnx.State):
    return {tuple(p): _leaf_value(v) for p, v in nnx.to_flat_state(params)}
  out: dict[tuple, Any] = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, prefix + (k,))
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(v, prefix + (i,))
    else:
      out[prefix] = _leaf_value(node)

  walk(params, ())
  return out


def _fmt_path(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _check_model_matches_layout(cfg: ModelConfig, flat: Mapping[tuple, Any]) -> None:
  """Our params must be exactly the layout's non-buffer entries with the mapped shapes."""
  entries = [e for e in L.reference_layout(cfg) if e.kind != "buffer"]
  by_path = {e.path: e for e in entries}
  problems = []
  for path, e in by_path.items():
    if path not in flat:
      problems.append(f"param {_fmt_path(path)} (for {e.key}) is missing")
    elif tuple(np.shape(flat[path])) != e.jax_shape:
      problems.append(f"param {_fmt_path(path)} has shape {tuple(np.shape(flat[path]))}, "
                      f"expected {e.jax_shape} (for {e.key} {e.shape})")
  extra = sorted(_fmt_path(p) for p in flat if p not in by_path)
  if extra:
    problems.append(f"params with no reference tensor: {extra[:8]}"
                    + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
  if problems:
    raise InteropError(
        "the model's parameters do not follow the reference layout (docs/DESIGN.md 'Model "
        "contract'):\n  - " + "\n  - ".join(problems) +
        "\nFix: the params must come from Atma(cfg) for this same ModelConfig.")


def state_dict_from_params(cfg: ModelConfig, params: Any,
                           embed_dtype: str = "bfloat16") -> dict[str, np.ndarray]:
  """The reference state dict (torch key -> numpy array, torch layout, saved dtypes).

  The embedding is written in bf16 as the reference trainers save it (`embed_dtype="float32"`
  keeps full precision for fp32-embedding models); everything else fp32. RoPE models also get
  the `attn.rotary.angular_freq` buffer.
  """
  check_exportable(cfg)
  flat = flat_params(params)
  _check_model_matches_layout(cfg, flat)
  sd: dict[str, np.ndarray] = {}
  for e in L.reference_layout(cfg):
    if e.kind == "buffer":
      sd[e.key] = L.rope_buffer(cfg)
      continue
    a = L.to_torch_layout(e, np.asarray(flat[e.path]))
    if e.kind == "embed" and embed_dtype != "bfloat16":
      a = np.asarray(flat[e.path]).astype(np.dtype(embed_dtype))
    sd[e.key] = a
  return sd


# ---------------------------------------------------------------------------------------------
# Validation of a foreign state dict.


def strip_compile_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Drops torch.compile's `_orig_mod.` prefix (the reference's own loaders do the same)."""
  return {(k[len(_COMPILE_PREFIX):] if k.startswith(_COMPILE_PREFIX) else k): v
          for k, v in sd.items()}


def describe_state_dict(sd: Mapping[str, Any]) -> str:
  """What architecture a state dict looks like (for error messages), best effort."""
  keys = set(sd)
  facts = []
  try:
    if "embed.weight" in sd:
      V, D = np.shape(sd["embed.weight"])
      facts += [f"vocab_size={V}", f"hidden_size={D}"]
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and
              k.split(".")[1].isdigit()}
    if blocks:
      facts.append(f"num_hidden_layers={max(blocks) + 1}")
    glob = sorted({int(k.split(".")[1]) for k in keys if k.endswith(".attn.q.weight")})
    if glob:
      g = glob[0]
      pre = f"blocks.{g}.attn."
      if pre + "mu_proj.weight" in keys:
        kind = "polar"
      elif pre + "w_wall.weight" in keys:
        kind = "wall"
      elif pre + "canon_q.weight" in keys:
        kind = "nope"
      else:
        kind = "rope"
      facts.append(f"attn_type={kind}")
      facts.append(f"mem_enabled={'true' if pre + 'mem.gate.weight' in keys else 'false'}")
      if pre + "k.weight" in sd and pre + "q.weight" in sd:
        q_out = np.shape(sd[pre + "q.weight"])[0]
        if pre + "v_null" in sd:
          facts.append(f"head_dim={np.shape(sd[pre + 'v_null'])[1]}")
        facts.append(f"q features={q_out} (= 2 * heads * head_dim)")
      facts.append(f"global blocks={glob}")
  except Exception:  # noqa: BLE001 - a hint only; never mask the real error
    pass
  return ", ".join(facts) if facts else "no recognizable ATMA tensors"


def non_finite_counts(a: Any) -> str:
  """Empty if every value of `a` is finite, else a count such as "3 NaN and 1 Inf value(s)"."""
  a = np.asarray(a)
  if a.dtype == L.BF16:
    a = a.astype(np.float32)
  if a.dtype.kind != "f" or np.isfinite(a).all():
    return ""
  nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
  parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n]
  return " and ".join(parts) + " value(s)"


def validate_state_dict(cfg: ModelConfig, sd: Mapping[str, Any], *, source: str = "weights",
                        fix: str = "") -> None:
  """Raises InteropError listing every mismatch between `sd` and the layout of `cfg`, then if
  any tensor holds a NaN or Inf (naming the tensors)."""
  entries = {e.key: e for e in L.reference_layout(cfg)}
  problems = []
  missing = [k for k in entries if k not in sd]
  unexpected = sorted(k for k in sd if k not in entries)
  if missing:
    problems.append(f"{len(missing)} missing key(s): {missing[:10]}"
                    + (" ..." if len(missing) > 10 else ""))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected key(s): {unexpected[:10]}"
                    + (" ..." if len(unexpected) > 10 else ""))
  emb = sd.get("embed.weight")
  if emb is not None and np.ndim(emb) == 2 and np.shape(emb)[0] != cfg.vocab_size:
    problems.append(f"vocab mismatch: the config says vocab_size={cfg.vocab_size} but "
                    f"embed.weight has {np.shape(emb)[0]} rows")
  for k, e in entries.items():
    if k in sd and tuple(np.shape(sd[k])) != e.shape:
      problems.append(f"shape mismatch at {k}: weights {tuple(np.shape(sd[k]))}, "
                      f"config expects {e.shape}")
  for k, e in entries.items():
    if e.kind == "buffer" and k in sd and tuple(np.shape(sd[k])) == e.shape:
      want = L.rope_buffer(cfg)
      got = np.asarray(sd[k], dtype=np.float32)
      if not np.allclose(got, want, rtol=1e-5, atol=0):
        problems.append(f"{k} holds different RoPE frequencies (max |diff| "
                        f"{float(np.max(np.abs(got - want))):.3g}) than the reference's "
                        "(1/1024)^linspace(0,1,d/4) + zeros; this is not an ATMA RoPE checkpoint")
  for k, v in sd.items():
    dt = np.asarray(v).dtype if not hasattr(v, "dtype") else np.dtype(v.dtype)
    if k in entries and dt.kind not in "fV" and dt != L.BF16:
      problems.append(f"{k} has non-float dtype {dt}")
  if problems:
    raise InteropError(
        f"{source} do not match the architecture of the config "
        f"(attn_type={cfg.attn_type}, mem_enabled={cfg.mem_enabled}, "
        f"num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, head_dim={cfg.head_dim}, "
        f"vocab_size={cfg.vocab_size}):\n  - " + "\n  - ".join(problems) +
        f"\nThe weights look like: {describe_state_dict(sd)}.\n"
        + (fix or "Fix: pass the config.json saved with these weights (--config), or weights "
           "trained with this config."))
  counts = {k: non_finite_counts(sd[k]) for k in sorted(entries) if k in sd}
  bad = [(k, n) for k, n in counts.items() if n]
  if bad:
    listed = "; ".join(f"{k} holds {n}" for k, n in bad[:5])
    more = f" (+{len(bad) - 5} more tensors)" if len(bad) > 5 else ""
    raise InteropError(f"{source} hold non-finite values: {listed}{more}. These are the weights "
                       "of a diverged or corrupt run; use an earlier checkpoint of it.")


# ---------------------------------------------------------------------------------------------
# Foreign state dict -> our params.


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract param state) of Atma(cfg) without allocating any weights."""
  from flax import nnx

  from atma_jax.model import Atma
  model = nnx.eval_shape(lambda: Atma(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def params_from_state_dict(cfg: ModelConfig, sd: Mapping[str, Any], *, source: str = "weights",
                           abstract: tuple | None = None):
  """nnx.State of Params for Atma(cfg) holding the tensors of `sd` (validated first).

  Leaves take the dtype of the model's own parameters (embedding in `embed_dtype`, the rest in
  `param_dtype`). `abstract` = (graphdef, abstract params) skips rebuilding the model.
  """
  import jax.numpy as jnp
  from flax import nnx
  sd = strip_compile_prefix(sd)
  validate_state_dict(cfg, sd, source=source)
  _, abstract_params = abstract if abstract is not None else abstract_model(cfg)
  flat_abs = list(nnx.to_flat_state(abstract_params))
  _check_model_matches_layout(cfg, {tuple(p): _leaf_value(v) for p, v in flat_abs})
  by_path = {e.path: e for e in L.reference_layout(cfg) if e.kind != "buffer"}
  new = []
  for path, var in flat_abs:
    e = by_path[tuple(path)]
    leaf = _leaf_value(var)
    value = L.from_torch_layout(e, np.asarray(sd[e.key]), leaf.dtype)
    new.append((path, var.replace(jnp.asarray(value))))
  return nnx.from_flat_state(new)


def model_from_state_dict(cfg: ModelConfig, sd: Mapping[str, Any], *, source: str = "weights"):
  """(graphdef, params) ready for `nnx.merge`."""
  graphdef, abstract = abstract_model(cfg)
  return graphdef, params_from_state_dict(cfg, sd, source=source, abstract=(graphdef, abstract))
