"""The CodeGen / CodeGen2 architecture: GPT-J style parallel block, fused [Q|V|K] projection in mp_num groups."""

from __future__ import annotations

from ..spec import Architecture
from .decode import decode_step, decode_weights
from .hf import HF_MAPPING
from .model import CodeGenModel, check_config, count_parameters, matmul_parameters

ARCHITECTURE = Architecture(
    name="codegen", model_cls=CodeGenModel, check_config=check_config, hf=HF_MAPPING,
    matmul_parameters=matmul_parameters, count_parameters=count_parameters,
    decode_weights=decode_weights, decode_step=decode_step,
)
