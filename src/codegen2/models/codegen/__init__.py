"""The CodeGen / CodeGen2 architecture: GPT-J style parallel block, fused [Q|V|K] projection in mp_num groups."""

from __future__ import annotations

from ...config import ConfigError, ModelConfig
from ..spec import Architecture
from .decode import decode_step, decode_weights
from .hf import HF_MAPPING
from .model import CodeGenModel, count_parameters, matmul_parameters


def check_config(cfg: ModelConfig) -> None:
    if cfg.n_head % cfg.mp_num:
        raise ConfigError(f"model.mp_num={cfg.mp_num} does not divide model.n_head={cfg.n_head}")
    if cfg.kv_heads != cfg.n_head:
        raise ConfigError(f"model.n_kv_head={cfg.n_kv_head}: CodeGen has no grouped-query attention (leave it unset)")
    if cfg.tie_word_embeddings:
        raise ConfigError("model.tie_word_embeddings=true: CodeGen has a separate lm_head")


ARCHITECTURE = Architecture(
    name="codegen", model_cls=CodeGenModel, check_config=check_config, hf=HF_MAPPING,
    matmul_parameters=matmul_parameters, count_parameters=count_parameters,
    decode_weights=decode_weights, decode_step=decode_step,
)
