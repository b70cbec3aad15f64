"""LLaMA <-> Hugging Face `llama` (`LlamaForCausalLM`): config.json keys; tensors need no change.

codegen2's parameter names are transformers' own, so weights move as they are (import and export are
bitwise). config.json variants this implementation does not compute (biases, another activation, rope
scaling, a head_dim other than hidden_size / num_attention_heads) are refused with the key that says so,
instead of loading into a model that would silently compute something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...config import ConfigError, ModelConfig
from ...errors import UserError
from ..spec import HFMapping
from .model import check_config

_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _rope_theta(raw: dict[str, Any], file: Path) -> float:
    """The rotary base from `rope_theta` (transformers 4) or `rope_parameters` (transformers 5); default 10000."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling")
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else None
    if scaling or rope_type != "default":
        raise UserError(f"{file}: rope scaling ({scaling or params}) is not supported; only plain rotary "
                        f"embeddings (rope_type 'default') are")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise UserError(f"{file}: rope_theta={theta!r} must be a positive number")
    return float(theta)


def config_from_hf(raw: dict[str, Any], file: Path, overrides: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a checked LlamaForCausalLM config.json (`overrides` such as CodeGen's mp_num do not apply)."""
    missing = [key for key in _REQUIRED_KEYS if not isinstance(raw.get(key), int)]
    if missing:
        raise UserError(f"{file}: missing or non-integer key(s) {', '.join(missing)}")
    if overrides.get("mp_num") is not None:
        raise UserError(f"{file}: mp_num applies to CodeGen checkpoints only; this is a LLaMA model")
    refused = {"hidden_act": ("silu", raw.get("hidden_act", "silu")),
               "attention_bias": (False, raw.get("attention_bias", False)),
               "mlp_bias": (False, raw.get("mlp_bias", False))}
    for key, (supported, value) in refused.items():
        if value != supported:
            raise UserError(f"{file}: {key}={value!r} is not supported (codegen2's LLaMA uses {supported!r})")
    d, n_head = raw["hidden_size"], raw["num_attention_heads"]
    if d % n_head:
        raise UserError(f"{file}: hidden_size={d} is not divisible by num_attention_heads={n_head}")
    head_dim = raw.get("head_dim") or d // n_head
    if head_dim != d // n_head:
        raise UserError(f"{file}: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                        f"{d // n_head}; that layout is not supported")
    cfg = ModelConfig(
        arch="llama",
        vocab_size=raw["vocab_size"],
        n_layer=raw["num_hidden_layers"],
        n_embd=d,
        n_head=n_head,
        n_kv_head=raw.get("num_key_value_heads") or n_head,
        rotary_dim=head_dim,
        n_ctx=int(raw.get("max_position_embeddings") or 2048),
        n_inner=raw["intermediate_size"],
        layer_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        init_std=float(raw.get("initializer_range", 0.02)),
        rope_theta=_rope_theta(raw, file),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    try:
        cfg.validate()
        check_config(cfg)
    except ConfigError as exc:
        raise UserError(f"{file}: {exc}") from None
    return cfg


def config_to_hf(cfg: ModelConfig, eot_id: int, dtype_name: str) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM (no remote code).

    The rotary base is written both ways (`rope_theta` for transformers 4, `rope_parameters` for 5).
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.inner_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": dtype_name,
    }


def _same(state: dict[str, torch.Tensor], *_: ModelConfig) -> dict[str, torch.Tensor]:
    """codegen2's names and layout are transformers' own: nothing to change."""
    return state


HF_MAPPING = HFMapping(model_type="llama", config_from_hf=config_from_hf, config_to_hf=config_to_hf,
                       state_to_hf=_same, state_from_hf=_same, convert_state=_same)
