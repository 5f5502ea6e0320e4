"""The reference's `config.json` (its `AtmaConfig`, spec §1.1, §6.9) <-> our `ModelConfig`.

The reference writes every `AtmaConfig` field, with `dtype` as the string "bfloat16". Fields
that do not change the math or the weights (backend switches, `max_position_embeddings`,
`rms_norm_eps`, which the modules hard-code to 1e-6) are written with the values the reference
trainers use and ignored on import. Architecture knobs the reference fixes in code (GQA 1:4,
MLP ratio 4, one global block per four at offset 2, RoPE scale 0.12) must hold in our config
for an export to be loadable by the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from atma_jax.config import ConfigError, ModelConfig

# AtmaConfig's fields, in declaration order, with its defaults (model/config.py).
REFERENCE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "num_hidden_layers": 16,
    "hidden_size": 1024,
    "head_dim": 128,
    "attn_kernel_size": 4,
    "conv_kernel_size": 3,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "dtype": "bfloat16",
    "tie_word_embeddings": False,
    "num_random_keys": 0,
    "attn_online": False,
    "attn_k_block": 512,
    "attn_kernel": "triton",
    "attn_type": "polar",
    "wall_gate_bias": None,
    "attn_window": 1024,
    "mem_enabled": True,
    "mem_chunk": 128,
    "mem_gamma_bias": 3.9,
    "mem_beta_bias": 0.0,
    "mem_kernel": "auto",
}

# reference field -> our ModelConfig field (the fields that define the architecture / math).
FIELD_MAP: dict[str, str] = {
    "vocab_size": "vocab_size",
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "head_dim": "head_dim",
    "attn_kernel_size": "attn_kernel_size",
    "conv_kernel_size": "conv_kernel_size",
    "num_random_keys": "num_random_keys",
    "attn_type": "attn_type",
    "attn_window": "attn_window",
    "mem_enabled": "mem_enabled",
    "mem_chunk": "mem_chunk",
    "mem_gamma_bias": "mem_gamma_bias",
    "mem_beta_bias": "mem_beta_bias",
}

# Architecture knobs the reference hard-codes; our config must agree to export.
FIXED_IN_REFERENCE: dict[str, Any] = {
    "gqa_ratio": 4,
    "mlp_ratio": 4,
    "global_every": 4,
    "global_offset": 2,
    "rope_scale": 0.12,
}

SUPPORTED_ATTN_TYPES = ("polar", "nope", "rope")


def check_exportable(cfg: ModelConfig) -> None:
  """Raises ConfigError if the reference cannot express `cfg`."""
  bad = [f"model.{k}={getattr(cfg, k)!r} (reference fixes {v!r})"
         for k, v in FIXED_IN_REFERENCE.items() if getattr(cfg, k) != v]
  if bad:
    raise ConfigError(
        "this model cannot be written in the reference layout: " + "; ".join(bad) +
        ". The PyTorch reference hard-codes these; export only models trained with them.")


def reference_config(cfg: ModelConfig, *, max_position_embeddings: int = 1024) -> dict[str, Any]:
  """config.json content for `cfg`, every AtmaConfig field in the reference's order."""
  check_exportable(cfg)
  out = dict(REFERENCE_DEFAULTS)
  for theirs, ours in FIELD_MAP.items():
    out[theirs] = getattr(cfg, ours)
  out["max_position_embeddings"] = int(max_position_embeddings)
  return out


def _type_error(name: str, value: Any, want: str) -> str:
  return f"{name}={value!r} (expected {want})"


def _check_types(data: dict[str, Any]) -> list[str]:
  problems = []
  ints = ("vocab_size", "num_hidden_layers", "hidden_size", "head_dim", "attn_kernel_size",
          "conv_kernel_size", "num_random_keys", "mem_chunk", "max_position_embeddings",
          "attn_k_block")
  for k in ints:
    v = data[k]
    if not isinstance(v, int) or isinstance(v, bool):
      problems.append(_type_error(k, v, "an integer"))
  for k in ("mem_gamma_bias", "mem_beta_bias", "rms_norm_eps"):
    if not isinstance(data[k], (int, float)) or isinstance(data[k], bool):
      problems.append(_type_error(k, data[k], "a number"))
  for k in ("mem_enabled", "attn_online", "tie_word_embeddings"):
    if not isinstance(data[k], bool):
      problems.append(_type_error(k, data[k], "true/false"))
  w = data["attn_window"]
  if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
    problems.append(_type_error("attn_window", w, "a positive integer or null"))
  if data["attn_type"] not in SUPPORTED_ATTN_TYPES:
    hint = (" (the 'wall' diagnostic core is not ported)" if data["attn_type"] == "wall" else "")
    problems.append(f"attn_type={data['attn_type']!r} is not supported here{hint}; supported: "
                    f"{', '.join(SUPPORTED_ATTN_TYPES)}")
  if data["tie_word_embeddings"]:
    problems.append("tie_word_embeddings=true: the reference never ties (embedding and LM head "
                    "are separate tensors); this config cannot come from its trainers")
  return problems


def model_config_from_reference(config_json: dict[str, Any] | str,
                                base: ModelConfig | None = None) -> ModelConfig:
  """Our ModelConfig for a reference config.json (a dict, or a path to the file).

  Missing fields take AtmaConfig's defaults, as `AtmaConfig(**cfg)` in the reference does (note
  its default `attn_window` is 1024). Non-architecture fields of ours (dtypes, kernel backend,
  init scheme, remat) come from `base` (default: ModelConfig()).
  """
  if isinstance(config_json, str):
    import json
    try:
      with open(config_json) as f:
        config_json = json.load(f)
    except FileNotFoundError:
      raise ConfigError(f"reference config {config_json} does not exist; pass the config.json "
                        "saved beside the weights (--config).") from None
    except json.JSONDecodeError as e:
      raise ConfigError(f"reference config {config_json} is not valid JSON ({e}).") from None
  if not isinstance(config_json, dict):
    raise ConfigError("a reference config.json must hold a JSON object of AtmaConfig fields.")
  unknown = sorted(set(config_json) - set(REFERENCE_DEFAULTS))
  if unknown:
    raise ConfigError(f"reference config has unknown fields {unknown}; AtmaConfig's fields are "
                      f"{list(REFERENCE_DEFAULTS)}. Is this the config.json of an ATMA checkpoint?")
  data = {**REFERENCE_DEFAULTS, **config_json}
  problems = _check_types(data)
  if problems:
    raise ConfigError("reference config.json is not usable: " + "; ".join(problems) + ".")
  base = base or ModelConfig()
  cfg = dataclasses.replace(base, **{ours: data[theirs] for theirs, ours in FIELD_MAP.items()},
                            **FIXED_IN_REFERENCE)
  try:
    cfg.validate()
  except ConfigError as e:
    raise ConfigError(f"reference config.json describes an invalid architecture: {e}") from None
  return cfg
