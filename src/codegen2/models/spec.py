"""What an architecture tells the rest of codegen2: one `Architecture` record per model family.

Training, distribution, metrics, decoding and the Hugging Face layer never look inside a model; they ask
its `Architecture` (found with `codegen2.models.architecture(cfg)`). So a new family is one module that
builds such a record plus one entry in `codegen2.models.ARCHITECTURES` (docs/design.md §6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig


@dataclass(frozen=True)
class HFMapping:
    """How one architecture meets Hugging Face transformers (config.json and state-dict names/layout).

    - `model_type`: config.json's `model_type` this architecture reads and writes.
    - `config_from_hf(raw, where, overrides)`: a ModelConfig from a checked config.json dict; `where` names
      the file for errors; `overrides` are the user's explicit choices (e.g. {"mp_num": 8} for CodeGen).
    - `config_to_hf(cfg, eot_id, dtype_name)`: the config.json dict of an export.
    - `state_to_hf(state, cfg)` / `state_from_hf(state, cfg)`: rename / re-layout tensors on export / import
      (identity when codegen2's names are the HF ones).
    - `convert_state(state, source_cfg, target_cfg)`: adapt a state dict between two configs of this
      architecture that differ only in layout (CodeGen's qkv grouping), for `train.init_from`.
    - `layout_fields`: the ModelConfig fields whose difference `convert_state` absorbs.
    """

    model_type: str
    config_from_hf: Callable[[dict, Path, dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig, int, str], dict]
    state_to_hf: Callable[[dict, ModelConfig], dict]
    state_from_hf: Callable[[dict, ModelConfig], dict]
    convert_state: Callable[[dict, ModelConfig, ModelConfig], dict]
    layout_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class Architecture:
    """One model family (see the module docstring for who calls what).

    - `model_cls(cfg)`: a `models.common.DecoderLM`, which runs the forward `(input_ids, *, position_ids=None,
      doc_ids=None, prefix_len=None, cache=None, return_hidden=False, last_only=False) -> logits [B, T, vocab]`
      around the family's hooks. Two of its methods serve the rest of codegen2 through this record:
      `decoder_layers()`, the repeated layers in order (the unit of FSDP sharding, per-block compile and
      activation checkpointing; see `blocks`), and `init_weights(generator)`, fresh weights (see `init_weights`).
    - `matmul_parameters(cfg)`: weights that multiply activations (for FLOPs, `metrics.flops_per_token`).
    - `count_parameters(cfg)`: exact parameter count without building the model.
    - `check_config(cfg)`: raise ConfigError for shapes this family cannot build.
    - `decode_weights(model, batch)` -> W and `decode_step(W, tokens, pos, col, keys, values, valid)` -> logits
      [B, vocab] for one new token per row, its key/value written at cache column `col`: the fused one-token
      step `decode.FastDecoder` runs (eager or compiled). W is any nest of tensors and Python constants;
      tokens, pos [B] (token ids and rotary positions); col a 0-d int64 tensor; keys/values per layer
      [B, kv_heads, capacity, head_dim]; valid [B, capacity] (False at left padding). `batch` is the rows each
      step will have (2 for any batch of a dynamic-batch decoder): a family may lay its weights out for it.
    - `hf`: its Hugging Face mapping.
    """

    name: str
    model_cls: type[nn.Module]
    matmul_parameters: Callable[[ModelConfig], int]
    count_parameters: Callable[[ModelConfig], int]
    check_config: Callable[[ModelConfig], None]
    decode_weights: Callable[[nn.Module, int], Any]
    decode_step: Callable[..., torch.Tensor]
    hf: HFMapping

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The repeated layers of `model`, in order."""
        return list(model.decoder_layers())

    def init_weights(self, model: Any, generator: torch.Generator | None = None) -> None:
        """Fresh weights. `model` may be a stand-in exposing only `config` and `named_modules()` (FSDP
        initialises one module at a time), so the family's `init_weights` visits modules in order and decides
        by module type and name only."""
        self.model_cls.init_weights(model, generator)
