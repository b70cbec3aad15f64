"""The CodeGen decoder (DESIGN §3), with a static KV cache for decoding.

Parameter names and the fused-qkv layout are exactly those of the published checkpoints, so a
state dict moves between codegen2 and Hugging Face `codegen` with at most a regrouping of qkv rows
(see `hf.py`). The block is GPT-J style: one LayerNorm feeds attention and the MLP in parallel,
`h = x + attn(ln_1(x)) + mlp(ln_1(x))`, with partial interleaved rotary embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .masks import build_attention_mask


def rotary_tables(rotary_dim: int, head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-head rotation tables [..., head_dim] in fp32 for the given absolute positions.

    Pair (2i, 2i+1) of the first `rotary_dim` dims rotates by angle p / 10000^(2i / rotary_dim): `cos` holds
    cos for both dims of the pair, `sin` holds (-sin, +sin). Dims past `rotary_dim` get cos 1, sin 0, so
    one fused expression rotates a whole head with no slicing or concatenation (cheaper backward).
    """
    exponents = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.int64).float() / rotary_dim
    angles = positions.float()[..., None] * (1.0 / (10000 ** exponents))
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = torch.stack((-angles.sin(), angles.sin()), dim=-1).flatten(-2)
    if rotary_dim < head_dim:
        rest = head_dim - rotary_dim
        cos = torch.cat((cos, cos.new_ones(*cos.shape[:-1], rest)), dim=-1)
        sin = torch.cat((sin, sin.new_zeros(*sin.shape[:-1], rest)), dim=-1)
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J interleaved rotary on x [B, T, H, D] with tables [B or 1, T, D]; computed in fp32 as the original."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    out = x.float() * cos[:, :, None, :] + swapped.float() * sin[:, :, None, :]
    return out.to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer, so decoding never reallocates or concatenates.

    `valid` marks real (not padding) key positions for left-padded prompt batches; `doc_ids` keeps the
    document index of cached positions when document masking is used.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
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
        self.keys[layer, :, :, self.length:end] = key
        self.values[layer, :, :, self.length:end] = value
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences)."""
        self.keys = self.keys[:, index]
        self.values = self.values[:, index]
        self.valid = self.valid[index]


class CodeGenAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.mp_num = cfg.mp_num
        self.qkv_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, time, width = x.shape
        # Output rows are mp_num groups, each [Q | V | K] for n_head / mp_num consecutive heads.
        query, value, key = self.qkv_proj(x).view(batch, time, self.mp_num, 3, width // self.mp_num).unbind(3)
        heads = (batch, time, self.n_head, self.head_dim)
        query = apply_rotary(query.reshape(heads), cos, sin).transpose(1, 2)
        key = apply_rotary(key.reshape(heads), cos, sin).transpose(1, 2)
        value = value.reshape(heads).transpose(1, 2)
        if cache is not None:
            key, value = cache.store(layer, key, value)
        if mask is None:
            # Without an explicit mask: causal over a fresh sequence, or one new token attending to all.
            is_causal = time > 1 and (cache is None or cache.length == 0)
            out = F.scaled_dot_product_attention(query, key, value, is_causal=is_causal)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, time, width))


class CodeGenMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.n_embd, cfg.inner_dim)
        self.fc_out = nn.Linear(cfg.inner_dim, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class CodeGenBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CodeGenAttention(cfg)
        self.mlp = CodeGenMLP(cfg)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        normed = self.ln_1(x)
        return x + self.attn(normed, cos, sin, mask, cache, layer) + self.mlp(normed)


class CodeGenTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(CodeGenBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)


class CodeGenModel(nn.Module):
    """CodeGen causal / prefix-LM decoder returning logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.transformer = CodeGenTransformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=True)
        self.activation_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 style init; residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = residual_std if name.endswith(("out_proj", "fc_out")) else std
                module.weight.normal_(0.0, scale, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` [B, T].

        doc_ids [B, T] forbids attention across packed documents; prefix_len [B] makes the first P
        positions bidirectional (prefix-LM); with `cache`, the tokens continue the cached ones.
        """
        batch, time = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + time, device=input_ids.device)[None].expand(batch, time)
        cos, sin = rotary_tables(self.config.rotary_dim, self.config.head_dim, position_ids)
        mask = None
        if doc_ids is not None or prefix_len is not None or (cache is not None and cache.has_padding):
            key_valid = cache.valid[:, : past + time] if cache is not None and cache.has_padding else None
            mask = build_attention_mask(doc_ids, prefix_len, time, input_ids.device, past_len=past, key_valid=key_valid)
        elif cache is not None and past > 0 and time > 1:
            mask = build_attention_mask(None, None, time, input_ids.device, past_len=past,
                                        key_valid=torch.ones(batch, past + time, dtype=torch.bool, device=input_ids.device))
        x = self.transformer.wte(input_ids)
        for layer, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, layer)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length = past + time
        if return_hidden:
            return x
        return self.lm_head(x)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of a CodeGen model with these shapes, without building it."""
    d, inner, v = cfg.n_embd, cfg.inner_dim, cfg.vocab_size
    per_layer = 2 * d + 3 * d * d + d * d + (d * inner + inner) + (inner * d + d)
    return v * d + cfg.n_layer * per_layer + 2 * d + (v * d + v)
