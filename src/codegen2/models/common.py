"""Pieces every architecture shares: the static KV cache and rotary frequencies.

The KV cache holds `cfg.kv_heads` key/value heads per layer (n_head, or fewer with grouped-query
attention); masks over it come from `codegen2.masks`, so every architecture decodes with the same rule.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def rotary_angles(rotary_dim: int, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Angles [..., rotary_dim / 2] in fp32: pair i of a head turns by p / theta^(2i / rotary_dim) at position p.

    How pairs are laid out in a head (GPT-J interleaved, or LLaMA's two halves) is the architecture's business.
    """
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.int64).float() / rotary_dim
    return positions.float()[..., None] * (1.0 / (theta ** exponents))


class KVCache:
    """Preallocated keys/values for every layer, so decoding never reallocates or concatenates.

    `valid` marks real (not padding) key positions for left-padded prompt batches; `doc_ids` keeps the
    document index of cached positions when document masking is used.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.max_len = max_len
        self.length = 0
        self.has_padding = False

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's [B, H, T, D] keys/values and return views over everything cached so far."""
        end = self.length + key.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions exceed its capacity of {self.max_len}")
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, self.length, end - self.length).copy_(key)
        values.narrow(2, self.length, end - self.length).copy_(value)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences)."""
        self.keys = self.keys[:, index]
        self.values = self.values[:, index]
        self.valid = self.valid[index]
