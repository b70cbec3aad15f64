"""LLaMA <-> Hugging Face `llama` (`LlamaForCausalLM`) and Qwen2 <-> `qwen2` (`Qwen2ForCausalLM`): config.json keys.

codegen2's parameter names are transformers' own, so weights move as they are (import and export are
bitwise). config.json variants this implementation does not compute (LLaMA's biases, another activation,
rope scaling other than linear, Qwen2's sliding window, a head_dim other than hidden_size /
num_attention_heads) are refused with the key that says so, instead of loading into a model that would
silently compute something else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...config import ConfigError, ModelConfig
from ...errors import UserError
from ..spec import HFMapping
from .model import check_config

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


_ROPE_TYPES = ("default", "linear")


def rope_from_hf(raw: dict[str, Any], file: Path) -> tuple[float, float]:
    """(rotary base, linear scaling factor) from `rope_theta` / `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5). Scaling kinds other than linear are refused, naming the key."""
    theta = raw.get("rope_theta") or 10000.0  # transformers 5 writes null here, the base in rope_parameters
    factor = 1.0
    for key in ("rope_scaling", "rope_parameters"):
        params = raw.get(key)
        if not params:
            continue
        kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else None
        if kind not in _ROPE_TYPES:
            raise UserError(f"{file}: {key}={params!r}: rope scaling of type {kind!r} is not supported; only "
                            f"{' and '.join(_ROPE_TYPES)} are")
        theta = params.get("rope_theta", theta)
        if kind == "linear":
            factor = params.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
                raise UserError(f"{file}: {key}.factor={factor!r} must be a positive number")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise UserError(f"{file}: rope_theta={theta!r} must be a positive number")
    return float(theta), float(factor)


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's rotary keys, both ways: `rope_theta` / `rope_scaling` (transformers 4), `rope_parameters` (5)."""
    if cfg.rope_scaling_factor == 1.0:
        return {"rope_theta": cfg.rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    factor = cfg.rope_scaling_factor
    return {"rope_theta": cfg.rope_theta, "rope_scaling": {"type": "linear", "rope_type": "linear", "factor": factor},
            "rope_parameters": {"rope_type": "linear", "factor": factor, "rope_theta": cfg.rope_theta}}


def check_keys(raw: dict[str, Any], file: Path, required: tuple[str, ...], supported: dict[str, tuple]) -> None:
    """Refuse a config.json that lacks an integer `required` key or sets a key of `supported` (key -> (default,
    the values codegen2 computes)) to anything else; each error names the key."""
    missing = [key for key in required if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool)]
    if missing:
        raise UserError(f"{file}: missing or non-integer key(s) {', '.join(missing)}")
    for key, (default, values) in supported.items():
        value = raw.get(key, default)
        if value not in values:
            raise UserError(f"{file}: {key}={value!r} is not supported (codegen2 computes "
                            f"{' or '.join(repr(v) for v in values)})")


def head_dim_from_hf(raw: dict[str, Any], file: Path) -> int:
    """hidden_size / num_attention_heads, refusing a config.json whose head_dim says otherwise."""
    d, n_head = raw["hidden_size"], raw["num_attention_heads"]
    if d % n_head:
        raise UserError(f"{file}: hidden_size={d} is not divisible by num_attention_heads={n_head}")
    head_dim = raw.get("head_dim") or d // n_head
    if head_dim != d // n_head:
        raise UserError(f"{file}: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                        f"{d // n_head}; that layout is not supported")
    return head_dim


def validated(cfg: ModelConfig, file: Path, check: Callable[[ModelConfig], None] = check_config) -> ModelConfig:
    """`cfg` after ModelConfig.validate and the family's `check`, a complaint reported against its config.json."""
    try:
        cfg.validate()
        check(cfg)
    except ConfigError as exc:
        raise UserError(f"{file}: {exc}") from None
    return cfg


def config_from_hf(raw: dict[str, Any], file: Path, overrides: dict[str, Any], arch: str = "llama") -> ModelConfig:
    """ModelConfig of a checked LlamaForCausalLM config.json (`overrides` such as CodeGen's mp_num do not apply)."""
    if arch == "qwen2":
        supported = {"hidden_act": ("silu", ("silu",)), "use_sliding_window": (False, (False,))}
    else:
        supported = {"hidden_act": ("silu", ("silu",)), "attention_bias": (False, (False,)),
                     "mlp_bias": (False, (False,))}
    check_keys(raw, file, _REQUIRED_KEYS, supported)
    if overrides.get("mp_num") is not None:
        raise UserError(f"{file}: mp_num applies to CodeGen checkpoints only; this is a {arch} model")
    head_dim = head_dim_from_hf(raw, file)
    theta, factor = rope_from_hf(raw, file)
    return validated(ModelConfig(**shared_config_from_hf(raw, head_dim, theta, factor), arch=arch,
                                 n_ctx=int(raw.get("max_position_embeddings") or 2048),
                                 layer_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                                 tie_word_embeddings=bool(raw.get("tie_word_embeddings", False))), file)


def shared_config_from_hf(raw: dict[str, Any], head_dim: int, theta: float, factor: float) -> dict[str, Any]:
    """The ModelConfig fields that LLaMA, Qwen2 and StarCoder2 read from the same config.json keys."""
    return {"vocab_size": raw["vocab_size"], "n_layer": raw["num_hidden_layers"], "n_embd": raw["hidden_size"],
            "n_head": raw["num_attention_heads"],
            "n_kv_head": raw.get("num_key_value_heads") or raw["num_attention_heads"], "rotary_dim": head_dim,
            "n_inner": raw["intermediate_size"], "init_std": float(raw.get("initializer_range", 0.02)),
            "rope_theta": theta, "rope_scaling_factor": factor}


def qwen2_config_from_hf(raw: dict[str, Any], file: Path, overrides: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a Qwen2ForCausalLM config.json; a sliding window (`use_sliding_window: true`, or a
    `layer_types` entry other than full attention) is refused, naming the key."""
    layer_types = raw.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise UserError(f"{file}: layer_types={layer_types!r}: only full_attention layers are supported "
                        f"(Qwen2's sliding window is not)")
    return config_from_hf(raw, file, overrides, arch="qwen2")


def config_to_hf(cfg: ModelConfig, eot_id: int, dtype_name: str) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM or, for a Qwen2 model, Qwen2ForCausalLM (no remote code).

    The rotary settings are written both ways (`rope_theta` / `rope_scaling` for transformers 4,
    `rope_parameters` for 5).
    """
    if cfg.arch == "qwen2":
        family = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                  "sliding_window": None, "max_window_layers": cfg.n_layer}
    else:
        family = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                  "mlp_bias": False}
    return {**family, **shared_config_to_hf(cfg, eot_id, dtype_name), "head_dim": cfg.head_dim,
            "hidden_act": "silu", "rms_norm_eps": cfg.layer_norm_eps}


def shared_config_to_hf(cfg: ModelConfig, eot_id: int, dtype_name: str) -> dict[str, Any]:
    """The config.json keys that LLaMA, Qwen2 and StarCoder2 spell alike: sizes, rotary, ids, dtype."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.inner_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.n_ctx,
        "initializer_range": cfg.init_std,
        **rope_to_hf(cfg),
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": dtype_name,
    }


def same_state(state: dict[str, torch.Tensor], *_: ModelConfig) -> dict[str, torch.Tensor]:
    """codegen2's names and layout are transformers' own: nothing to change."""
    return state


HF_MAPPING = HFMapping(model_type="llama", config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                       state_to_hf=same_state, state_from_hf=same_state, convert_state=same_state)
QWEN2_HF_MAPPING = HFMapping(model_type="qwen2", config_from_hf=qwen2_config_from_hf, config_to_hf=config_to_hf,
                             state_to_hf=same_state, state_from_hf=same_state, convert_state=same_state)
