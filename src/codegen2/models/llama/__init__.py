"""The LLaMA architecture (CodeGen2.5, DeepSeek-Coder, CodeLlama, and most code models since): RMSNorm, SwiGLU,
half-split rotary, GQA; and Qwen2 (Qwen2.5-Coder), the same block with q/k/v biases, as its own registry entry."""

from __future__ import annotations

from ..spec import Architecture
from .decode import decode_step, decode_weights
from .hf import HF_MAPPING, QWEN2_HF_MAPPING
from .model import (
    LlamaModel,
    Qwen2Model,
    check_config,
    count_parameters,
    matmul_parameters,
    qwen2_count_parameters,
)

ARCHITECTURE = Architecture(
    name="llama", model_cls=LlamaModel, check_config=check_config, hf=HF_MAPPING,
    matmul_parameters=matmul_parameters, count_parameters=count_parameters,
    decode_weights=decode_weights, decode_step=decode_step,
)

QWEN2_ARCHITECTURE = Architecture(
    name="qwen2", model_cls=Qwen2Model, check_config=check_config, hf=QWEN2_HF_MAPPING,
    matmul_parameters=matmul_parameters, count_parameters=qwen2_count_parameters,
    decode_weights=decode_weights, decode_step=decode_step,
)
