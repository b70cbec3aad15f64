"""The StarCoder2 architecture: LayerNorm and biases everywhere, GELU (tanh) MLP, rotary GQA, a sliding window."""

from __future__ import annotations

from ..spec import Architecture
from .decode import decode_step, decode_weights
from .hf import HF_MAPPING
from .model import Starcoder2Model, check_config, count_parameters, matmul_parameters

ARCHITECTURE = Architecture(
    name="starcoder2", model_cls=Starcoder2Model, check_config=check_config, hf=HF_MAPPING,
    matmul_parameters=matmul_parameters, count_parameters=count_parameters,
    decode_weights=decode_weights, decode_step=decode_step,
)
