"""The CodeGen decoder (docs/design.md §3), with a static KV cache for decoding.

Parameter names and the fused-qkv layout are exactly those of the published checkpoints, so a
state dict moves between codegen2 and Hugging Face `codegen` with at most a regrouping of qkv rows
(see `models/codegen/hf.py`). The block is GPT-J style: one LayerNorm feeds attention and the MLP in parallel,
`h = x + attn(ln_1(x)) + mlp(ln_1(x))`, with partial interleaved rotary embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, ModelConfig
from ...masks import sdpa_is_causal
from ..common import DecoderLM, KVCache, init_normal, refuse_dropout, rotary_angles


def rotary_table(rotary_dim: int, head_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Rotations [..., width, 2] (cos, sin) in fp32 for the given absolute positions.

    Pair (2i, 2i+1) of a head rotates by angle p / 10000^(2i / rotary_dim) (GPT-J interleaved layout). The
    table spans the whole head (width head_dim / 2) with angle 0 past `rotary_dim`, so the pass-through
    dims need no slicing; for an odd head_dim it spans only the rotated dims (width rotary_dim / 2).
    """
    angles = rotary_angles(rotary_dim, positions)
    width = head_dim // 2 if head_dim % 2 == 0 else rotary_dim // 2
    if width > rotary_dim // 2:
        angles = torch.cat((angles, angles.new_zeros(*angles.shape[:-1], width - rotary_dim // 2)), dim=-1)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the leading 2 * width dims of x's last axis by `table` [..., width, 2] (broadcast), in fp32.

    An interleaved pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1], so in eager mode the
    rotation is one complex multiplication: one kernel forward and one backward. Inductor generates no
    code for complex numbers, so under torch.compile the same product is spelled out in real arithmetic,
    which it fuses into one kernel.
    """
    width = table.shape[-2]
    if 2 * width != x.shape[-1]:
        return torch.cat((apply_rotary(x[..., : 2 * width].contiguous(), table), x[..., 2 * width:]), dim=-1)
    pairs = (x if x.dtype == torch.float32 else x.float()).unflatten(-1, (width, 2))
    if torch.compiler.is_compiling():
        real, imag = pairs.unbind(-1)
        cos, sin = table.unbind(-1)
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(table))
    rotated = rotated.flatten(-2)
    return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


class RotaryCache:
    """Rotations of every position up to the context length, per device, computed once.

    Kept outside the module's parameters and buffers, so state dicts stay exactly the checkpoints'.
    Each entry holds [positions, 3, width, 2]: the rotation for Q and K and none (angle 0) for V, so
    the fused [Q | V | K] projection output is rotated as it lies, in one operation.
    """

    def __init__(self, rotary_dim: int, head_dim: int, n_ctx: int):
        self.rotary_dim, self.head_dim, self.n_ctx = rotary_dim, head_dim, n_ctx
        self.tables: dict[torch.device, torch.Tensor] = {}

    def __call__(self, position_ids: torch.Tensor, min_positions: int = 0) -> torch.Tensor:
        """[B, T, 3, width, 2] rotations for position_ids [B, T], all below max(n_ctx, min_positions).

        The bound comes from the caller (host integers) so that no device value is read back here.
        """
        device = position_ids.device
        table = self.tables.get(device)
        if table is None or table.shape[0] < min_positions:
            positions = torch.arange(max(self.n_ctx, min_positions), device=device)
            rot = rotary_table(self.rotary_dim, self.head_dim, positions)
            none = torch.stack((torch.ones_like(rot[..., 0]), torch.zeros_like(rot[..., 1])), dim=-1)
            table = torch.stack((rot, none, rot), dim=1)
            self.tables[device] = table
        return table[position_ids]


class CodeGenAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.mp_num = cfg.mp_num
        self.qkv_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, rotary, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, time, width = x.shape
        # Output rows are mp_num groups, each [Q | V | K] for n_head / mp_num consecutive heads; `rotary`
        # [B, T, 1, 3, 1, width, 2] rotates Q and K and leaves V (angle 0) as it is.
        qkv = self.qkv_proj(x).view(batch, time, self.mp_num, 3, -1, self.head_dim)
        query, value, key = apply_rotary(qkv, rotary).unbind(3)
        heads = (batch, time, self.n_head, self.head_dim)
        query, key, value = (t.reshape(heads).transpose(1, 2) for t in (query, key, value))
        if cache is not None:
            key, value = cache.store(layer, key, value)
        if mask is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=sdpa_is_causal(time, cache))
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

    def forward(self, x, rotary, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        normed = self.ln_1(x)
        return x + self.attn(normed, rotary, mask, cache, layer) + self.mlp(normed)


class CodeGenTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(CodeGenBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)


class CodeGenModel(DecoderLM):
    """CodeGen causal / prefix-LM decoder returning logits [B, T, vocab] (the forward is `DecoderLM`'s)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, check_config)
        self.transformer = CodeGenTransformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=True)
        self.rotary = RotaryCache(cfg.rotary_dim, cfg.head_dim, cfg.n_ctx)
        self.init_unless_meta()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 style init; residual output projections (out_proj, fc_out) scaled by 1/sqrt(2 * n_layer)."""
        init_normal(self, ("out_proj", "fc_out"), generator)

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def rotations(self, position_ids: torch.Tensor, n_positions: int) -> torch.Tensor:
        return self.rotary(position_ids, n_positions)[:, :, None, :, None]  # broadcast over groups, heads

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def check_config(cfg: ModelConfig) -> None:
    """Raise ConfigError for shapes this family cannot build."""
    if cfg.n_head % cfg.mp_num:
        raise ConfigError(f"model.mp_num={cfg.mp_num} does not divide model.n_head={cfg.n_head}")
    if cfg.kv_heads != cfg.n_head:
        raise ConfigError(f"model.n_kv_head={cfg.n_kv_head}: CodeGen has no grouped-query attention (leave it unset)")
    if cfg.tie_word_embeddings:
        raise ConfigError("model.tie_word_embeddings=true: CodeGen has a separate lm_head")
    if cfg.sliding_window is not None or cfg.rope_scaling_factor != 1.0:
        raise ConfigError(f"model.sliding_window={cfg.sliding_window}, model.rope_scaling_factor="
                          f"{cfg.rope_scaling_factor}: CodeGen has neither (leave them unset)")
    refuse_dropout(cfg, "CodeGen")


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that multiply activations: per layer qkv (3 d^2), out (d^2), fc_in and fc_out (2 d inner); lm_head."""
    d = cfg.n_embd
    return cfg.n_layer * (4 * d * d + 2 * d * cfg.inner_dim) + cfg.vocab_size * d


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of a CodeGen model with these shapes, without building it."""
    d, inner, v = cfg.n_embd, cfg.inner_dim, cfg.vocab_size
    per_layer = 2 * d + 3 * d * d + d * d + (d * inner + inner) + (inner * d + d)
    return v * d + cfg.n_layer * per_layer + 2 * d + (v * d + v)
