"""Model architectures behind one interface: `build_model(cfg)` and the `ARCHITECTURES` registry.

`ModelConfig.arch` names an entry of `ARCHITECTURES`; each entry is an `Architecture` record
(`models/spec.py`) that tells the rest of codegen2 everything it needs: the module class, its blocks (for
FSDP sharding, per-block compile and activation checkpointing), initialisation, FLOP and parameter counts,
the fused decode step for `decode.FastDecoder`, and the Hugging Face mapping. Shared pieces live in
`models/common.py` (`KVCache`, `rotary_angles`); attention masks come from `codegen2.masks`
(`forward_attention_mask`, `sdpa_is_causal`, `decode_step_bias`).

Adding an architecture: write `models/<name>.py` (or a `models/<name>/` package) exposing an
`ARCHITECTURE = Architecture(...)`, then add one entry to `ARCHITECTURES` below (and the module to
the import line).
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from . import codegen, llama
from .spec import Architecture, HFMapping

ARCHITECTURES: dict[str, Architecture] = {
    "codegen": codegen.ARCHITECTURE,
    "llama": llama.ARCHITECTURE,
}

__all__ = ["ARCHITECTURES", "Architecture", "HFMapping", "architecture", "build_model"]


def architecture(cfg: ModelConfig) -> Architecture:
    """The `Architecture` record of `cfg.arch` (ModelConfig.validate has checked the name)."""
    return ARCHITECTURES[cfg.arch]


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of `cfg`'s architecture (built on the current default device)."""
    return architecture(cfg).model_cls(cfg)
