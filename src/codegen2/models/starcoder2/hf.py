"""StarCoder2 <-> Hugging Face `starcoder2` (`Starcoder2ForCausalLM`): config.json keys; tensors need no change.

codegen2's parameter names are transformers' own, so weights move as they are. Variants this implementation
does not compute (no biases, another activation, MLP or norm type, rope scaling other than linear, a head_dim
other than hidden_size / num_attention_heads) are refused with the key that says so. transformers' config
defaults to tied embeddings, so a config.json without `tie_word_embeddings` is tied here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import ModelConfig
from ...errors import UserError
from ..llama.hf import (
    check_keys,
    head_dim_from_hf,
    rope_from_hf,
    same_state,
    shared_config_from_hf,
    shared_config_to_hf,
    validated,
)
from ..spec import HFMapping
from .model import check_config

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
DROPOUTS = ("embedding_dropout", "residual_dropout", "attention_dropout")  # config.json and ModelConfig alike
_SUPPORTED = {"hidden_act": ("gelu_pytorch_tanh", ("gelu_pytorch_tanh",)), "use_bias": (True, (True,)),
              "mlp_type": ("default", ("default",)), "norm_type": ("layer_norm", ("layer_norm",))}


def config_from_hf(raw: dict[str, Any], file: Path, overrides: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a checked Starcoder2ForCausalLM config.json (`overrides` such as mp_num do not apply)."""
    check_keys(raw, file, _REQUIRED_KEYS, _SUPPORTED)
    if overrides.get("mp_num") is not None:
        raise UserError(f"{file}: mp_num applies to CodeGen checkpoints only; this is a StarCoder2 model")
    window = raw.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise UserError(f"{file}: sliding_window={window!r} must be an integer or null")
    head_dim = head_dim_from_hf(raw, file)
    theta, factor = rope_from_hf(raw, file)
    return validated(ModelConfig(**shared_config_from_hf(raw, head_dim, theta, factor), arch="starcoder2",
                                 n_ctx=int(raw.get("max_position_embeddings") or 4096),
                                 layer_norm_eps=float(raw.get("norm_epsilon", 1e-5)),
                                 tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
                                 sliding_window=window, **dropouts_from_hf(raw, file)), file, check_config)


def dropouts_from_hf(raw: dict[str, Any], file: Path) -> dict[str, float]:
    """The three dropout rates (transformers' defaults 0), each a number in [0, 1) or refused naming its key."""
    rates = {}
    for key in DROPOUTS:
        value = raw.get(key) or 0.0
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise UserError(f"{file}: {key}={value!r} must be a number in [0, 1)")
        rates[key] = float(value)
    return rates


def config_to_hf(cfg: ModelConfig, eot_id: int, dtype_name: str) -> dict[str, Any]:
    """config.json for transformers' Starcoder2ForCausalLM (no remote code), the run's dropouts included."""
    return {"architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2",
            **shared_config_to_hf(cfg, eot_id, dtype_name), "hidden_act": "gelu_pytorch_tanh",
            "norm_epsilon": cfg.layer_norm_eps, "sliding_window": cfg.sliding_window, "use_bias": True,
            "mlp_type": "default", "norm_type": "layer_norm", **{key: getattr(cfg, key) for key in DROPOUTS}}


HF_MAPPING = HFMapping(model_type="starcoder2", config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                       state_to_hf=same_state, state_from_hf=same_state, convert_state=same_state)
