"""The StarCoder2 decoder: LayerNorm with bias, biases on every linear, a GELU (tanh) MLP, rotary GQA, a sliding window.

Parameter names are those of Hugging Face `Starcoder2ForCausalLM` (`model.layers.N.self_attn.q_proj`, ...,
`mlp.c_fc`, `mlp.c_proj`), so a state dict moves between codegen2 and transformers unchanged. The block is
LLaMA's with other parts: `h = x + attn(norm_1(x))`, then `h + c_proj(gelu_tanh(c_fc(norm_2(h))))`; attention
and rotary are LLaMA's (half-split rotary, transformers' repeat_kv grouping) with biases on q/k/v and o. The
sliding window (`ModelConfig.sliding_window`) is part of the mask rule in `codegen2.masks`, which the shared
forward applies; the cache is masked, not rolled. StarCoder2's dropouts (config.json's `embedding_dropout`,
`residual_dropout`, `attention_dropout`; 0.1 in the published configs) apply in training where transformers
applies them, in the same order, and never in eval mode (decoding, evaluation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, ModelConfig
from ..common import KVCache, dropout, init_normal
from ..llama.model import LlamaAttention, LlamaModel


class Starcoder2MLP(nn.Module):
    """c_proj(gelu_tanh(c_fc(x))): not gated, biases on both."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.inner_dim)
        self.c_proj = nn.Linear(cfg.inner_dim, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Starcoder2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.self_attn = LlamaAttention(cfg, qkv_bias=True, o_bias=True, dropout=cfg.attention_dropout)
        self.post_attention_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = Starcoder2MLP(cfg)
        self.residual_dropout = cfg.residual_dropout

    def forward(self, x, rotary, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), rotary, mask, cache, layer)
        x = x + dropout(attended, self.residual_dropout, self.training)
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.residual_dropout, self.training)


class Starcoder2Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Starcoder2Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)


class Starcoder2Model(LlamaModel):
    """StarCoder2 causal / prefix-LM decoder: LLaMA's forward, head and rotary around StarCoder2's blocks."""

    @staticmethod
    def check_config(cfg: ModelConfig) -> None:
        check_config(cfg)

    def backbone(self, cfg: ModelConfig) -> nn.Module:
        return Starcoder2Backbone(cfg)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dropout(self.model.embed_tokens(input_ids), self.config.embedding_dropout, self.training)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh weights as LLaMA's (`common.init_normal`), the residual projections being o_proj and c_proj."""
        init_normal(self, ("o_proj", "c_proj"), generator)


def check_config(cfg: ModelConfig) -> None:
    """Raise ConfigError for shapes this family cannot build."""
    if cfg.rotary_dim != cfg.head_dim:
        raise ConfigError(f"model.rotary_dim={cfg.rotary_dim}: StarCoder2 rotates whole heads, so it must equal "
                          f"head_dim = n_embd / n_head = {cfg.head_dim}")
    if cfg.head_dim % 2:
        raise ConfigError(f"model.n_embd / model.n_head = {cfg.head_dim}: rotary needs an even head_dim")


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that multiply activations: per layer q, o (d^2 each), k, v (d * kv width), c_fc, c_proj; lm_head."""
    d, kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
    return cfg.n_layer * (2 * d * d + 2 * d * kv + 2 * d * cfg.inner_dim) + cfg.vocab_size * d


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of a StarCoder2 model with these shapes, without building it (a tied head counts once)."""
    d, kv, inner = cfg.n_embd, cfg.kv_heads * cfg.head_dim, cfg.inner_dim
    attention = 2 * (d * d + d) + 2 * (d * kv + kv)
    per_layer = attention + 2 * d * inner + inner + d + 4 * d  # MLP, then two LayerNorms (weight and bias)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.n_layer * per_layer + 2 * d + head
