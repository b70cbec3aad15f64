"""The LLaMA architecture (CodeGen2.5, and most code models since): RMSNorm, SwiGLU, half-split rotary, GQA."""

from __future__ import annotations

from ...config import ConfigError, ModelConfig
from ..spec import Architecture
from .decode import decode_step, decode_weights
from .hf import HF_MAPPING
from .model import LlamaModel, count_parameters, matmul_parameters


def check_config(cfg: ModelConfig) -> None:
    if cfg.rotary_dim != cfg.head_dim:
        raise ConfigError(f"model.rotary_dim={cfg.rotary_dim}: LLaMA rotates whole heads, so it must equal "
                          f"head_dim = n_embd / n_head = {cfg.head_dim}")
    if cfg.head_dim % 2:
        raise ConfigError(f"model.n_embd / model.n_head = {cfg.head_dim}: LLaMA's rotary needs an even head_dim")


ARCHITECTURE = Architecture(
    name="llama", model_cls=LlamaModel, check_config=check_config, hf=HF_MAPPING,
    matmul_parameters=matmul_parameters, count_parameters=count_parameters,
    decode_weights=decode_weights, decode_step=decode_step,
)
