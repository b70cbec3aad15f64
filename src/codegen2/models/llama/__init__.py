"""The LLaMA architecture (CodeGen2.5, and most code models since): RMSNorm, SwiGLU, half-split rotary, GQA."""

from __future__ import annotations

from ..spec import Architecture
from .decode import decode_step, decode_weights
from .hf import HF_MAPPING
from .model import LlamaModel, check_config, count_parameters, matmul_parameters

ARCHITECTURE = Architecture(
    name="llama", model_cls=LlamaModel, check_config=check_config, hf=HF_MAPPING,
    matmul_parameters=matmul_parameters, count_parameters=count_parameters,
    decode_weights=decode_weights, decode_step=decode_step,
)
