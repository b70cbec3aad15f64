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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from . import codegen, llama, starcoder2
from .spec import Architecture, HFMapping

ARCHITECTURES: dict[str, Architecture] = {
    "codegen": codegen.ARCHITECTURE,
    "llama": llama.ARCHITECTURE,
    "qwen2": llama.QWEN2_ARCHITECTURE,
    "starcoder2": starcoder2.ARCHITECTURE,
}

__all__ = ["ARCHITECTURES", "Architecture", "HFMapping", "architecture", "build_model", "empty_model"]


def architecture(cfg: ModelConfig) -> Architecture:
    """The `Architecture` record of `cfg.arch`, once that family has checked it can build `cfg`.

    The one check of `model.arch` (config.py knows no architecture): an unknown name, or shapes the family
    cannot build, is a one-line ConfigError, so every command fails here before any work.
    """
    arch = ARCHITECTURES.get(cfg.arch)
    if arch is None:
        raise ConfigError(f"model.arch={cfg.arch!r} must be one of {', '.join(ARCHITECTURES)}")
    arch.check_config(cfg)
    return arch


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of `cfg`'s architecture (built on the current default device)."""
    return architecture(cfg).model_cls(cfg)


@contextmanager
def _no_parameter_init() -> Iterator[None]:
    """Make `torch.nn.init` fills no-ops: on the meta device they compute nothing, yet `nn.Embedding`'s
    `normal_` goes through torch._refs, which imports torch._dynamo (about 70 MB resident and a second)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def empty_model(cfg: ModelConfig) -> nn.Module:
    """The model for `cfg` on the meta device (shapes only), for a loader to fill tensor by tensor."""
    with _no_parameter_init(), torch.device("meta"):
        return build_model(cfg)
