"""Checkpoint interop with the PyTorch ATMA reference (ATMA_SPEC §6.9, §9).

    state_dict_from_params(cfg, params) -> {torch key: np.ndarray}   (torch layout and dtypes)
    params_from_state_dict(cfg, sd)     -> nnx.State of Params for Atma(cfg)   (validated)
    model_config_from_reference(config_json) -> ModelConfig
    reference_config(cfg)               -> the reference's config.json content

Command line: `python -m atma_jax.interop {export,import,verify}` (see `cli.py`).
Files: `layout` (the §9 key/shape table and orientation map), `ref_config` (config.json <->
ModelConfig), `convert` (params <-> state dict, validation), `files` (safetensors / weights.pt /
json I/O), `runs` (our run directories), `verify` + `torch_side` (JAX vs PyTorch logits).
"""

from atma_jax.interop.convert import (InteropError, model_from_state_dict, params_from_state_dict,
                                      state_dict_from_params, validate_state_dict)
from atma_jax.interop.layout import Entry, num_reference_params, reference_layout
from atma_jax.interop.ref_config import model_config_from_reference, reference_config

__all__ = [
    "InteropError", "Entry", "model_config_from_reference", "model_from_state_dict",
    "num_reference_params", "params_from_state_dict", "reference_config", "reference_layout",
    "state_dict_from_params", "validate_state_dict",
]
