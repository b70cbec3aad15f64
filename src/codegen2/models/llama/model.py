"""The LLaMA decoder (CodeGen2.5, DeepSeek-Coder, CodeLlama) and Qwen2 (Qwen2.5-Coder), its twin with q/k/v biases.

Pre-norm blocks with RMSNorm, SwiGLU MLP, rotary (optionally with linear position scaling), grouped-query attention.

Parameter names are those of Hugging Face `LlamaForCausalLM` (`model.embed_tokens`, `model.layers.N.self_attn.
q_proj`, ..., `lm_head`), so a state dict moves between codegen2 and transformers unchanged. Each block is
sequential, `h = x + attn(norm_1(x))`, then `h + mlp(norm_2(h))`; rotary turns the two halves of every query and
key head (dims i and i + head_dim / 2 rotate together: the HF convention, unlike GPT-J's interleaved pairs).
Masks come from `codegen2.masks` and keys/values go through the shared `KVCache`, as for every architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, ModelConfig
from ...int8 import embedding_weight, mm
from ...masks import sdpa_is_causal
from ..common import DecoderLM, KVCache, init_normal, refuse_dropout, rotary_angles


class RotaryTable:
    """cos / sin of every position up to the context length, per device, computed once in fp32.

    Kept outside the module's parameters and buffers, so state dicts stay exactly the HF ones. Linear rope
    scaling (`scaling` > 1: DeepSeek-Coder, long-context CodeLlama variants) turns every pair `scaling` times
    slower, as if positions were divided by it.
    """

    def __init__(self, head_dim: int, n_ctx: int, theta: float, scaling: float = 1.0):
        self.head_dim, self.n_ctx, self.theta, self.scaling = head_dim, n_ctx, theta, scaling
        self.tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device, min_positions: int = 0) -> torch.Tensor:
        """[positions, head_dim / 2, 2] (cos, sin), covering at least max(n_ctx, min_positions) positions."""
        table = self.tables.get(device)
        if table is None or table.shape[0] < min_positions:
            angles = rotary_angles(self.head_dim, torch.arange(max(self.n_ctx, min_positions), device=device),
                                   self.theta)
            if self.scaling != 1.0:
                angles = angles / self.scaling
            table = torch.stack((angles.cos(), angles.sin()), dim=-1)
            self.tables[device] = table
        return table

    def __call__(self, position_ids: torch.Tensor, min_positions: int = 0) -> torch.Tensor:
        """[B, T, head_dim / 2, 2] for position_ids [B, T]; the bound is a host integer (no device read-back)."""
        return self.table(position_ids.device, min_positions)[position_ids]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves of x's last axis: (a, b) -> (a cos - b sin, b cos + a sin), computed in fp32."""
    first, second = (x if x.dtype == torch.float32 else x.float()).chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


class LlamaAttention(nn.Module):
    """Rotary grouped-query attention; biases on q/k/v (Qwen2) and on o (StarCoder2 too) where the family has them."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False, o_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dropout = dropout  # on the attention probabilities, in training only
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=o_bias)

    def forward(self, x, rotary, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, time, _ = x.shape
        cos, sin = rotary.unbind(-1)  # [B, T, 1, head_dim / 2]: broadcast over heads
        query = apply_rotary(self.q_proj(x).view(batch, time, self.n_head, self.head_dim), cos, sin)
        key = apply_rotary(self.k_proj(x).view(batch, time, self.kv_heads, self.head_dim), cos, sin)
        value = self.v_proj(x).view(batch, time, self.kv_heads, self.head_dim)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        is_causal = mask is None and sdpa_is_causal(time, cache)
        if cache is not None:
            key, value = cache.store(layer, key, value)
        # Query head h reads key/value head h // (n_head / kv_heads), as transformers' repeat_kv lays them out.
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.kv_heads != self.n_head)
        return self.o_proj(out.transpose(1, 2).reshape(batch, time, -1))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.inner_dim, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.inner_dim, bias=False)
        self.down_proj = nn.Linear(cfg.inner_dim, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.self_attn = LlamaAttention(cfg, qkv_bias=qkv_bias)
        self.post_attention_layernorm = nn.RMSNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, rotary, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(cfg, qkv_bias) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.layer_norm_eps)


class LlamaModel(DecoderLM):
    """LLaMA causal / prefix-LM decoder returning logits [B, T, vocab] (the forward of `models.spec.Architecture`)."""

    qkv_bias = False  # biases on q_proj, k_proj and v_proj (not o_proj): Qwen2's one difference

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, self.check_config)
        self.model = self.backbone(cfg)
        # A tied head is the embedding table itself (no lm_head module), so no state dict holds it twice.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.rotary = RotaryTable(cfg.head_dim, cfg.n_ctx, cfg.rope_theta, cfg.rope_scaling_factor)
        self.init_unless_meta()

    @staticmethod
    def check_config(cfg: ModelConfig) -> None:
        """The family's own config rule (`check_config` below); a family with other rules overrides it."""
        check_config(cfg)

    def backbone(self, cfg: ModelConfig) -> nn.Module:
        """The embedding, blocks and final norm (`model.*` in the HF names); a family with other blocks overrides it."""
        return LlamaBackbone(cfg, self.qkv_bias)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) weights, residual projections (o_proj, down_proj) scaled by 1/sqrt(2 * n_layer).

        transformers initialises every LLaMA matrix with one std; the residual scaling is GPT-2's (as for
        CodeGen here), which keeps the residual stream's variance independent of depth at the start.
        Decides by module type and name only (FSDP calls it on a stand-in, one module at a time).
        """
        init_normal(self, ("o_proj", "down_proj"), generator)

    @torch.no_grad()
    def use_decode_layout(self) -> LlamaModel:
        """Keep every weight [out, in] row-major (restoring it where an input-major copy was made): the layout
        this family's fused step reads (`models/llama/decode.py`: MKL's one-row GEMV streams it as fast as
        the input-major one, oneDNN's few-row kernel faster). Values and the state dict are unchanged. Weights
        that are views of a fused decode buffer keep the layout the decoder gave it (copying them apart would
        leave the buffer alive beside the copies)."""
        fused = {m._decode_rows.untyped_storage().data_ptr() for m in self.modules() if hasattr(m, "_decode_rows")}
        for module in self.modules():
            if isinstance(module, nn.Linear) and not module.weight.is_contiguous() \
                    and module.weight.untyped_storage().data_ptr() not in fused:
                module.weight.data = module.weight.data.contiguous()
        return self

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rotations(self, position_ids: torch.Tensor, n_positions: int) -> torch.Tensor:
        return self.rotary(position_ids, n_positions)[:, :, None]  # [B, T, 1, head_dim / 2, 2]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return mm(x.reshape(-1, x.shape[-1]), tied_head(self.model.embed_tokens)).unflatten(0, x.shape[:-1])
        return self.lm_head(x)


class Qwen2Model(LlamaModel):
    """Qwen2 (Qwen2.5-Coder): the LLaMA block with biases on q/k/v; transformers hard-codes them (no config key)."""

    qkv_bias = True



def tied_head(embedding: nn.Module) -> torch.Tensor | tuple:
    """A tied output projection as a `int8.mm` weight: the [d, vocab] view of the table, or int8 rows."""
    table = embedding_weight(embedding)
    if isinstance(table, tuple):  # int8 (q, scales): the kernel also wants its bf16 ones
        q, scales = table
        return q, scales, torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device)
    return table.t()


def check_config(cfg: ModelConfig) -> None:
    """Raise ConfigError for shapes this family cannot build."""
    if cfg.rotary_dim != cfg.head_dim:
        raise ConfigError(f"model.rotary_dim={cfg.rotary_dim}: LLaMA rotates whole heads, so it must equal "
                          f"head_dim = n_embd / n_head = {cfg.head_dim}")
    if cfg.head_dim % 2:
        raise ConfigError(f"model.n_embd / model.n_head = {cfg.head_dim}: LLaMA's rotary needs an even head_dim")
    if cfg.sliding_window is not None:
        raise ConfigError(f"model.sliding_window={cfg.sliding_window}: the {cfg.arch} architecture attends to "
                          f"every earlier position (unset it)")
    refuse_dropout(cfg, f"the {cfg.arch} architecture")


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that multiply activations: per layer q, o (d^2 each), k, v (d * kv width), gate, up, down; lm_head."""
    d, kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
    return cfg.n_layer * (2 * d * d + 2 * d * kv + 3 * d * cfg.inner_dim) + cfg.vocab_size * d


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of a LLaMA model with these shapes, without building it (a tied head counts once)."""
    d = cfg.n_embd
    per_layer = 2 * d * d + 2 * d * cfg.kv_heads * cfg.head_dim + 3 * d * cfg.inner_dim + 2 * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.n_layer * per_layer + d + head


def qwen2_count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count of a Qwen2 model: LLaMA's plus the q, k and v biases of every layer."""
    return count_parameters(cfg) + cfg.n_layer * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
