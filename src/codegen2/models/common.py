"""Pieces every architecture shares: the forward around the blocks, the static KV cache and rotary frequencies.

The KV cache holds `cfg.kv_heads` key/value heads per layer (n_head, or fewer with grouped-query
attention); masks over it come from `codegen2.masks`, so every architecture decodes with the same rule.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, ModelConfig
from ..masks import forward_attention_mask


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout that draws nothing when off (p 0 or eval), so models without dropout keep their RNG stream."""
    return nn.functional.dropout(x, p, training=True) if training and p > 0 else x


def refuse_dropout(cfg: ModelConfig, family: str) -> None:
    """A family whose blocks apply no dropout refuses a config that asks for it (one line naming the fields)."""
    asked = {n: getattr(cfg, n) for n in ("embedding_dropout", "residual_dropout", "attention_dropout")
             if getattr(cfg, n)}
    if asked:
        raise ConfigError(f"{', '.join(f'model.{n}={v}' for n, v in asked.items())}: {family} applies no dropout "
                          "(leave them at 0)")


def rotary_angles(rotary_dim: int, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Angles [..., rotary_dim / 2] in fp32: pair i of a head turns by p / theta^(2i / rotary_dim) at position p.

    How pairs are laid out in a head (GPT-J interleaved, or LLaMA's two halves) is the architecture's business.
    """
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.int64).float() / rotary_dim
    return positions.float()[..., None] * (1.0 / (theta ** exponents))


HUGE_PAGE = 2 << 20  # bytes of an x86-64 transparent huge page
MADV_HUGEPAGE = 14


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose whole 2 MiB extents the kernel is asked to back with huge pages.

    A weight streamed once per token (a one-row GEMV) then costs 512x fewer TLB misses: Qwen2.5-Coder-0.5B's
    step matrices at one row took 139-146 against 149-158 ms (thread time, interleaved, one thread). Linux
    only, and only where transparent huge pages are `madvise` or `always`; elsewhere an ordinary tensor. The
    tensor is a view into a buffer 2 MiB longer (the slack is never touched, so never resident).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    libc = _libc()
    if nbytes < HUGE_PAGE or libc is None:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    libc.madvise(ctypes.c_void_p(raw.data_ptr() + offset), ctypes.c_size_t(nbytes // HUGE_PAGE * HUGE_PAGE),
                 MADV_HUGEPAGE)  # before the first write, so the pages are faulted in huge
    return raw[offset:offset + nbytes].view(dtype).view(shape)


def on_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is where `huge_page_empty` would put it: on a 2 MiB boundary, or anywhere if it is smaller
    than a huge page or the platform has none (so callers never move a tensor for nothing)."""
    nbytes = tensor.numel() * tensor.element_size()
    return nbytes < HUGE_PAGE or _libc() is None or tensor.data_ptr() % HUGE_PAGE == 0


_LIBC: ctypes.CDLL | bool | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else False
            if _LIBC:
                _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


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


class DecoderLM(nn.Module):
    """The forward every architecture runs, around its own parts, so the rules live once.

    Positions, the attention mask (the one rule in `masks.py`), the KV cache, activation checkpointing and
    last-position logits are handled here; a subclass says what its parts are through five hooks:
    `decoder_layers()` (the blocks, each called as `block(x, rotary, mask, cache, layer)`), `embed(ids)`,
    `rotations(position_ids, n_positions)` (the rotary table its blocks take), `final_norm(x)` and `logits(x)`.
    """

    activation_checkpointing: bool = False

    def __init__(self, cfg: ModelConfig, check_config: Callable[[ModelConfig], None]):
        """Check `cfg` (the shapes every family needs, then the family's own) before any part is built."""
        super().__init__()
        cfg.validate()
        check_config(cfg)
        self.config = cfg

    def init_unless_meta(self) -> None:
        """Fresh weights once the parts are built, unless they are on the meta device (a loader fills them)."""
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, T].

        doc_ids [B, T] forbids attention across packed documents; prefix_len [B] makes the first P
        positions bidirectional (prefix-LM); with `cache`, the tokens continue the cached ones.
        `last_only` returns logits of the last position only ([B, 1, vocab]: what sampling needs after a
        prompt).
        """
        batch, time = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + time, device=input_ids.device)[None].expand(batch, time)
        rotary = self.rotations(position_ids, past + time)
        mask = forward_attention_mask(doc_ids, prefix_len, time, input_ids.device, cache,
                                      window=self.config.sliding_window)
        x = self.embed(input_ids)
        for layer, block in enumerate(self.decoder_layers()):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rotary, mask, use_reentrant=False)
            else:
                x = block(x, rotary, mask, cache, layer)
        x = self.final_norm(x)
        if cache is not None:
            cache.length = past + time
        if last_only:
            x = x[:, -1:]
        return x if return_hidden else self.logits(x)

    @torch.no_grad()
    def use_decode_layout(self) -> DecoderLM:
        """Store the widening projections (out_features > in_features) input-major: for inference on CPU.

        Values, names and shapes stay the same; only the memory order of those [out, in] weights flips
        (each becomes the transpose of a contiguous [in, out] matrix). Multiplying one or a few tokens by
        an input-major matrix runs MKL's streaming kernel instead of one that repacks the weight on every
        call: decoding a 125M CodeGen on one core took 30-33 ms per token instead of 41-46 ms. For training
        (many tokens per matmul) the layout is neutral to slightly slower, so leave it off there.
        Checkpoint writers save `.contiguous()` copies, so saved files are unchanged.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.out_features > module.in_features:
                module.weight.data = module.weight.data.t().contiguous().t()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def init_normal(model: Any, residual: tuple[str, ...], generator: torch.Generator | None = None) -> None:
    """GPT-2 style init shared by the families: Normal(0, init_std) matrices and embeddings, the residual output
    projections (names ending in `residual`) scaled by 1/sqrt(2 * n_layer), biases zero, norms one.

    `model` may be a stand-in exposing only `config` and `named_modules()` (FSDP initialises one module at a
    time), so modules are visited in order and told apart by type and name only: the generator draws the same
    numbers either way.
    """
    std = model.config.init_std
    residual_std = std / math.sqrt(2 * model.config.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, residual_std if name.endswith(residual) else std, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std, generator=generator)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
