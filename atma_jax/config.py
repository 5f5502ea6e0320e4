"""Typed, frozen configuration for atma-jax.

One `Config` holds everything a run needs: the model architecture (`ModelConfig`, every knob of
ATMA_SPEC §1), the data, the optimizer recipe (§6), the mesh, training and evaluation settings.
Presets are Python files in `configs/` exposing `config() -> Config`.

Command-line overrides address any field by dotted name (`model.num_layers=4`) and parse the
value by the field's declared type; unknown names and unparsable values raise `ConfigError`
naming the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_origin
from atma_jax.errors import AtmaError


class ConfigError(AtmaError, ValueError):
  """A configuration problem, with a message that says how to fix it."""


AttnType = Literal["polar", "nope", "rope"]
KernelImpl = Literal["auto", "pallas", "xla"]
InitScheme = Literal["reference", "live_mixers"]
SigRegMode = Literal["baseline", "weak", "discrete", "strong", "zipfian"]
DType = Literal["float32", "bfloat16", "float16", "float64"]
# model.remat: what each block keeps for the backward pass (atma_jax/model/remat.py says what
# each name saves). true / false are accepted as the old boolean spelling: true = block,
# false = none.
REMAT_POLICIES = ("none", "block", "dots", "dots_no_mlp_fc", "kernels")
REMAT_ALIASES = {"true": "block", "false": "none"}


@dataclass(frozen=True)
class ModelConfig:
  """Architecture (ATMA_SPEC §1-§5). Defaults are the canonical 378M Polar+memory model."""

  vocab_size: int = 50304
  num_layers: int = 16
  hidden_size: int = 1024
  head_dim: int = 128
  gqa_ratio: int = 4  # query heads per KV head (fixed 4 in the reference)
  attn_kernel_size: int = 4  # Canon depthwise conv width on q/k/v
  conv_kernel_size: int = 3  # LFM2 depthwise conv width
  mlp_ratio: int = 4  # MLP hidden = mlp_ratio * hidden_size (fc outputs twice that)
  global_every: int = 4  # block l is global iff l % global_every == global_offset
  global_offset: int = 2
  attn_type: AttnType = "polar"
  attn_window: Optional[int] = None  # sliding window (None = full causal)
  mem_enabled: bool = True
  mem_chunk: int = 64  # chunk of the chunked gated-delta scan (math does not depend on it)
  mem_gamma_bias: float = 3.9  # constant added to the retention logit at run time
  mem_beta_bias: float = 0.0  # constant added to the write logit at run time
  num_random_keys: int = 0  # distractor keys R (training only; 0 disables)
  rope_scale: float = 0.12  # softmax scale of the RoPE core (not 1/sqrt(d))
  init_scheme: InitScheme = "reference"
  param_dtype: DType = "float32"
  embed_dtype: DType = "bfloat16"  # the reference stores the embedding table in bf16
  compute_dtype: DType = "bfloat16"  # activation dtype
  kernel_impl: KernelImpl = "auto"  # polar / gated-delta backend
  # the gated-delta decode step's backend (None: kernel_impl). "xla" until the fused Pallas step
  # (compiled-correct on an H200: bench/results/gpu_tests_new_kernels_h200.txt) is timed.
  mem_step_impl: Optional[KernelImpl] = "xla"
  decode_attn_kernel: bool = False  # one-token decode with every row at one position: the
  # attention kernel op at a traced q_offset instead of XLA at per-row positions (kv_cache.py)
  remat: str | bool = "none"  # a REMAT_POLICIES name (true = "block", false = "none")
  # the training / eval forward runs the repeating groups of global_every blocks as one
  # lax.scan (compile time; same numbers, same parameter layout; atma_jax/model/scan.py)
  scan_layers: bool = False

  def __post_init__(self):
    # the boolean spelling (old configs, --set model.remat=true) becomes its policy name
    spelled = str(self.remat).lower() if isinstance(self.remat, bool) else self.remat
    object.__setattr__(self, "remat", REMAT_ALIASES.get(spelled, spelled))

  @property
  def num_heads(self) -> int:
    return self.hidden_size // self.head_dim

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads // self.gqa_ratio

  def is_global(self, layer: int) -> bool:
    return layer % self.global_every == self.global_offset

  def validate(self) -> None:
    for name in ("vocab_size", "num_layers", "hidden_size", "head_dim", "gqa_ratio",
                 "attn_kernel_size", "conv_kernel_size", "mem_chunk", "mlp_ratio", "global_every"):
      if getattr(self, name) < 1:
        raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive integer "
                          f"(the canonical model uses {getattr(ModelConfig, name)}); set it with "
                          f"--set model.{name}=N.")
    if not 0 <= self.global_offset < self.global_every:
      raise ConfigError(f"model.global_offset={self.global_offset} must lie in [0, "
                        f"model.global_every={self.global_every}) (block l is global iff "
                        "l % global_every == global_offset).")
    if self.hidden_size % self.head_dim:
      raise ConfigError(
          f"model.hidden_size={self.hidden_size} is not a multiple of model.head_dim={self.head_dim};"
          " choose hidden_size = num_heads * head_dim.")
    if self.num_heads % self.gqa_ratio:
      raise ConfigError(
          f"num_heads={self.num_heads} (hidden_size/head_dim) is not divisible by"
          f" model.gqa_ratio={self.gqa_ratio}; pick a gqa_ratio that divides the head count.")
    if self.attn_window is not None and self.attn_window < 1:
      raise ConfigError(f"model.attn_window={self.attn_window} must be >= 1 or None (full causal).")
    if not self.rope_scale > 0:
      raise ConfigError(f"model.rope_scale={self.rope_scale} must be > 0 (the reference uses 0.12).")
    if self.num_random_keys < 0:
      raise ConfigError("model.num_random_keys must be >= 0 (0 disables the distractor loss).")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"model.remat={self.remat!r} is not a remat policy; choose one of "
                        f"{', '.join(REMAT_POLICIES)} (true = block, false = none).")


@dataclass(frozen=True)
class DataConfig:
  """Where training/validation tokens come from (see atma_jax/data)."""

  source: Literal["embedded", "english", "bin", "hf"] = "embedded"
  path: str = ""  # english: prepared shard dir; bin: glob of reference .bin shards
  val_path: str = ""  # bin: validation shard glob (default: the *_val_* files of `path`)
  hf_name: str = ""  # hf: dataset name (needs network)
  hf_text_field: str = "text"
  cache_dir: str = "data_cache"  # tokenized embedded/english corpora are cached here
  val_fraction: float = 0.05  # embedded: deterministic share of documents held out
  seed: int = 0
  # Demonstration aid, off by default: the share of training rows replaced by passkey / NIAH
  # needle examples built from the row's own text (atma_jax/data/needle_mix.py).
  needle_mix: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
  """The reference recipe (ATMA_SPEC §6.3-§6.5)."""

  muon_lr: float = 0.02
  muon_momentum: float = 0.95
  muon_weight_decay: float = 0.01
  muon_ns_steps: int = 12
  muon_ns_coeffs: Literal["reference", "optax"] = "reference"  # (2,-1.5,0.5) or optax's quintic
  muon_batch: bool = True  # one batched Newton-Schulz per (kind, shape, dtype, sharding) group
  muon_batch_split: bool = True  # with muon_batch: each NS stack split over the mesh's devices
  embed_lr: float = 0.3
  head_lr: float = 1.0 / 320.0
  scalar_lr: float = 0.01
  adam_b1: float = 0.8
  adam_b2: float = 0.95
  adam_eps: float = 1e-10
  cooldown_frac: float = 0.7
  clip_norm: float = 1.0
  loss_reduction: Literal["sum", "mean"] = "sum"  # the reference backprops the token SUM
  sigreg_mode: SigRegMode = "baseline"
  sigreg_alpha: float = 0.0
  distractor_weight: float = 0.0


@dataclass(frozen=True)
class MeshConfig:
  """Device mesh. -1 on one axis means "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclass(frozen=True)
class TrainConfig:
  seq_len: int = 2048
  global_batch: int = 256  # sequences per optimizer step
  micro_batch: int = 16  # sequences per micro-step (global, across all devices)
  prefetch: int = 2  # batches put on the devices ahead of the step (0: read at each step)
  mfu_peak: str = "datasheet"  # MFU's peak: datasheet, measured (bf16 matmul) or TFLOP/s
  # gradients summed over data-parallel devices every "micro" step, or once per "step" (pure
  # data parallel, aux losses off; atma_jax/train/accumulate.py)
  grad_reduce: Literal["micro", "step"] = "micro"
  steps: int = 18722
  seed: int = 0
  run_dir: str = "runs/default"
  log_every: int = 10
  eval_every: int = 125
  eval_batches: int = 8  # validation micro-batches per evaluation
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  # a step with a non-finite loss or gradient: "stop" the run (nothing saved after the last
  # finite checkpoint) or "skip" its update (parameters and optimizer state unchanged)
  on_nonfinite: Literal["stop", "skip"] = "stop"
  # JAX's persistent compilation cache (atma_jax/compile_cache.py): a folder, "off", or "auto"
  # ($ATMA_COMPILE_CACHE, else JAX's own setting, else ~/.cache/atma_jax/jax_cache)
  compile_cache: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
  """Defaults of eval.py. Lengths default to the training length x 1, 2, 4, ..., 32."""

  depths: tuple[float, ...] = (0.1, 0.5, 0.9)
  trials: int = 16
  num_docs: int = 4
  seed: int = 1234
  logits_chunk: int = 8192


@dataclass(frozen=True)
class Config:
  name: str = "atma_378m"
  model: ModelConfig = field(default_factory=ModelConfig)
  data: DataConfig = field(default_factory=DataConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  eval: EvalConfig = field(default_factory=EvalConfig)

  def validate(self) -> "Config":
    self.model.validate()
    t = self.train
    positive = ("steps", "log_every", "eval_every", "micro_batch", "global_batch",
                "keep_checkpoints")
    for name in positive:
      if getattr(t, name) < 1:
        raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 1; "
                          f"set e.g. --set train.{name}=1.")
    for name in ("checkpoint_every", "eval_batches", "prefetch"):
      if getattr(t, name) < 0:
        raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 0 (0 turns it off).")
    if t.global_batch % t.micro_batch:
      raise ConfigError(
          f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch="
          f"{t.micro_batch}; set global_batch to k * micro_batch.")
    if t.seq_len < 2:
      raise ConfigError("train.seq_len must be >= 2.")
    parse_mfu_peak(t.mfu_peak)
    o = self.optim
    if not 0.0 <= o.cooldown_frac <= 1.0:
      raise ConfigError("optim.cooldown_frac must lie in [0, 1].")
    for name in ("muon_lr", "embed_lr", "head_lr", "scalar_lr", "muon_weight_decay",
                 "sigreg_alpha", "distractor_weight"):
      if not getattr(o, name) >= 0:  # also rejects NaN
        raise ConfigError(f"optim.{name}={getattr(o, name)} must be >= 0.")
    for name in ("muon_momentum", "adam_b1", "adam_b2"):
      if not 0.0 <= getattr(o, name) < 1.0:
        raise ConfigError(f"optim.{name}={getattr(o, name)} must lie in [0, 1).")
    if not (o.adam_eps > 0 and o.clip_norm > 0 and o.muon_ns_steps >= 1):
      raise ConfigError(f"optim.adam_eps={o.adam_eps} and optim.clip_norm={o.clip_norm} must be "
                        f"> 0 and optim.muon_ns_steps={o.muon_ns_steps} >= 1.")
    e = self.eval
    for name in ("trials", "num_docs", "logits_chunk"):
      if getattr(e, name) < 1:
        raise ConfigError(f"eval.{name}={getattr(e, name)} must be >= 1.")
    if any(not 0.0 <= d <= 1.0 for d in e.depths):
      raise ConfigError(f"eval.depths={e.depths}: every needle depth must lie in [0, 1].")
    if not 0.0 <= self.data.val_fraction < 1.0:
      raise ConfigError(f"data.val_fraction={self.data.val_fraction} must lie in [0, 1).")
    if not 0.0 <= self.data.needle_mix <= 1.0:
      raise ConfigError(f"data.needle_mix={self.data.needle_mix} must lie in [0, 1] (the share "
                        "of training rows made needle examples; 0 turns it off).")
    if self.data.needle_mix > 0 and t.seq_len < 64:
      raise ConfigError(f"data.needle_mix needs train.seq_len >= 64 (the needle scaffold takes "
                        f"~30 tokens); got {t.seq_len}.")
    return self


def parse_mfu_peak(spec: str) -> str | float:
  """`train.mfu_peak` -> "datasheet", "measured" or a peak in FLOP/s (given in TFLOP/s)."""
  text = str(spec).strip().lower()
  if text in ("datasheet", "measured"):
    return text
  try:
    tflops = float(text)
  except ValueError:
    tflops = -1.0
  if not tflops > 0:
    raise ConfigError(f"train.mfu_peak={spec!r} is not datasheet, measured or a positive number "
                      "of TFLOP/s per device (e.g. --set train.mfu_peak=790).")
  return tflops * 1e12


# ---------------------------------------------------------------------------------------------
# Overrides, (de)serialization, presets.


def _parse_bool(text: str) -> bool:
  low = text.strip().lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _parse_value(text: str, tp: Any, where: str) -> Any:
  """Parses `text` as a value of the annotated type `tp`."""
  origin = get_origin(tp)
  args = get_args(tp)
  if origin in (typing.Union, types.UnionType):
    non_none = [a for a in args if a is not type(None)]
    if type(None) in args and text.strip().lower() in ("none", "null", ""):
      return None
    errors = []
    for a in non_none:
      try:
        return _parse_value(text, a, where)
      except (ValueError, ConfigError) as e:
        errors.append(str(e))
    raise ValueError("; ".join(errors))
  if origin is Literal:
    if text in args:
      return text
    raise ValueError(f"expected one of {list(args)}, got {text!r}")
  if origin is tuple:
    items = [s for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
    inner = args[0] if args else str
    return tuple(_parse_value(s.strip(), inner, where) for s in items)
  if tp is bool:
    return _parse_bool(text)
  if tp is int:
    return int(text.replace("_", ""))
  if tp is float:
    return float(text)
  if tp is str:
    return text
  raise ValueError(f"cannot parse a value of type {tp}")


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def override(cfg: Config, assignments: list[str]) -> Config:
  """Applies `section.field=value` assignments; raises ConfigError on unknown names/bad values."""
  for item in assignments:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form section.field=value "
                        "(e.g. --set model.num_layers=4).")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    cfg = _set_path(cfg, parts, value, key)
  return cfg.validate()


def _set_path(obj: Any, parts: list[str], value: str, full: str) -> Any:
  names = [f.name for f in dataclasses.fields(obj)]
  head = parts[0]
  if head not in names:
    raise ConfigError(
        f"unknown config key {full!r}: {type(obj).__name__} has no field {head!r}. "
        f"Valid fields here: {', '.join(names)}.")
  tp = _field_types(type(obj))[head]
  current = getattr(obj, head)
  if len(parts) > 1:
    if not dataclasses.is_dataclass(current):
      raise ConfigError(f"config key {full!r}: {head!r} is a value, not a section.")
    return dataclasses.replace(obj, **{head: _set_path(current, parts[1:], value, full)})
  if dataclasses.is_dataclass(current):
    raise ConfigError(f"config key {full!r} names a whole section; set one of its fields, "
                      f"e.g. {full}.{dataclasses.fields(current)[0].name}=...")
  try:
    parsed = _parse_value(value, tp, full)
  except ValueError as e:
    raise ConfigError(f"bad value for {full}: {e}. Expected type {tp}.") from None
  return dataclasses.replace(obj, **{head: parsed})


def to_dict(cfg: Config) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _from_dict(cls, data: dict[str, Any], where: str):
  if not isinstance(data, dict):
    raise ConfigError(f"config section {where or 'root'} must be a JSON object.")
  hints = _field_types(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(data) - names
  if unknown:
    raise ConfigError(f"unknown config keys in {where or 'root'}: {sorted(unknown)}; "
                      f"valid keys: {sorted(names)}.")
  kwargs = {}
  for k, v in data.items():
    tp = hints[k]
    key = f"{where}.{k}".lstrip(".")
    if dataclasses.is_dataclass(tp):
      kwargs[k] = _from_dict(tp, v, key)
    elif get_origin(tp) is tuple:
      if not isinstance(v, (list, tuple)):
        raise ConfigError(f"config key {key}={v!r} must be a JSON list.")
      kwargs[k] = tuple(_check_json_value(x, get_args(tp)[0], key) for x in v)
    else:
      kwargs[k] = _check_json_value(v, tp, key)
  return cls(**kwargs)


def _check_json_value(v: Any, tp: Any, key: str) -> Any:
  """`v` (a value read from JSON) if it fits the annotated type `tp`; ConfigError otherwise."""
  origin, args = get_origin(tp), get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if v is None and type(None) in args:
      return None
    members = [a for a in args if a is not type(None)]
    for member in members[:-1]:  # the first member the value fits; the last one reports
      try:
        return _check_json_value(v, member, key)
      except ConfigError:
        pass
    tp = members[-1]
    origin, args = get_origin(tp), get_args(tp)
  if origin is Literal:
    ok = v in args
  elif tp is bool:
    ok = isinstance(v, bool)
  elif tp is int:
    ok = isinstance(v, int) and not isinstance(v, bool)
  elif tp is float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    v = float(v) if ok else v
  elif tp is str:
    ok = isinstance(v, str)
  else:
    ok = True
  if not ok:
    want = f"one of {list(args)}" if origin is Literal else getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key {key}={v!r} has the wrong type; expected {want}.")
  return v


def from_dict(data: dict[str, Any]) -> Config:
  return _from_dict(Config, data, "").validate()


def from_json(text: str) -> Config:
  return from_dict(json.loads(text))


PRESETS = ("tiny", "small", "atma_378m")


def load_preset(name: str) -> Config:
  """Loads `configs/<name>.py` (a module with `config() -> Config`)."""
  if name.endswith(".json"):
    try:
      with open(name) as f:
        text = f.read()
    except FileNotFoundError:
      raise ConfigError(f"config file {name} does not exist; pass a preset name "
                        f"({', '.join(PRESETS)}) or the path of a saved config .json (e.g. "
                        "<run_dir>/config.json).") from None
    try:
      return from_json(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f"config file {name} is not valid JSON ({e}).") from None
  mod_name = name[:-3].replace("/", ".") if name.endswith(".py") else f"configs.{name}"
  try:
    mod = importlib.import_module(mod_name)
  except ModuleNotFoundError:
    raise ConfigError(f"unknown config preset {name!r}; available presets: {', '.join(PRESETS)} "
                      "(or pass a path to a saved config .json).") from None
  return mod.config().validate()


def resolve(preset: str, assignments: list[str] | None = None) -> Config:
  return override(load_preset(preset), list(assignments or []))
