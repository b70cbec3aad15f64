"""LLaMA's fused one-token decode step (run by `codegen2.generation.decoder.FastDecoder`).

The same function as `LlamaModel.forward` for one new token per row, in fewer and larger operations:

- q_proj, k_proj and v_proj become one matmul, gate_proj and up_proj another, over weights concatenated once
  (`int8.fuse_linears`: input-major floats, the layout MKL's one/few-row kernels stream fastest, or int8
  rows); o_proj and down_proj are stored input-major too. The model's parameters are re-pointed at views of
  these buffers, so no second copy of the weights exists and the state dict keeps its values (a LLaMA block
  is sequential, so unlike CodeGen's parallel block the attention and MLP matmuls cannot share one);
- keys and values live in one preallocated tensor per layer, written at a position *tensor*, and attention
  runs over the whole capacity with an additive mask (`masks.decode_step_bias`), so `torch.compile` makes
  one graph for every step. Grouped-query attention reads each key/value head once for its group of queries.

Qwen2's q/k/v biases join the fused matmul as one bias vector (None for LLaMA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...int8 import embed, embedding_weight, fuse_linears, linear_weight, mm
from ...masks import decode_step_bias
from .model import LlamaModel, tied_head


@torch.no_grad()
def fuse_decode_weights(model: LlamaModel) -> list[tuple]:
    """Per layer (norm_1 w, w_qkv, b_qkv, w_o, norm_2 w, w_gate_up, w_down) as `int8.mm` weights.

    Float weights are input-major: q/k/v and gate/up are fused by `int8.fuse_linears` (the model's own
    weights become views of the fused buffers), o_proj and down_proj are re-laid input-major in place (same
    values); int8 weights keep the kernel's row form. Repeated calls return the existing fusion.
    """
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        w_qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        w_gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        for linear in (attn.o_proj, mlp.down_proj):
            if isinstance(linear, nn.Linear) and linear.weight.stride(0) != 1:
                linear.weight.data = linear.weight.data.t().contiguous().t()
        layers.append((block.input_layernorm.weight, w_qkv, fuse_biases([attn.q_proj, attn.k_proj, attn.v_proj]),
                       linear_weight(attn.o_proj),
                       block.post_attention_layernorm.weight, w_gate_up, linear_weight(mlp.down_proj)))
    return layers


def fuse_biases(modules: list[nn.Module]) -> torch.Tensor | None:
    """The biases of Linear modules fused by `int8.fuse_linears`, side by side (a small copy), or None."""
    if modules[0].bias is None:
        return None
    return torch.cat([m.bias.detach() for m in modules])


def decode_weights(model: LlamaModel) -> tuple:
    """What `decode_step` reads: (fused layers, head, rotary table, static shape), views of the model's weights."""
    if isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.stride(0) != 1:
        model.use_decode_layout()  # before fusing: it would copy the fused views apart again
    cfg = model.config
    norm = model.model.norm.weight
    head_w = tied_head(model.model.embed_tokens) if model.lm_head is None else linear_weight(model.lm_head)
    head = (embedding_weight(model.model.embed_tokens), norm, head_w)
    shape = (cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.inner_dim, cfg.layer_norm_eps)
    return fuse_decode_weights(model), head, model.rotary.table(norm.device), shape


def decode_step(weights: tuple, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """LLaMA's one-token step (arguments as in `models.spec.Architecture.decode_step`); `weights` is
    `decode_weights(model)`: fused layers, the head (embedding, final norm, output weight), rotary table, shape."""
    layers, head, rotary, shape = weights
    n_head, kv_heads, head_dim, inner, eps = shape
    embed_w, norm_w, head_w = head
    d = norm_w.shape[0]
    bias = decode_step_bias(valid, col, keys[0].dtype)
    cos, sin = rotary[pos][:, None].unbind(-1)  # [B, 1, head_dim / 2]: broadcast over heads
    index = col.reshape(1)
    x = embed(tokens, embed_w, norm_w.dtype)
    for (norm_1, w_qkv, b_qkv, w_o, norm_2, w_gate_up, w_down), k_cache, v_cache in zip(layers, keys, values):
        qkv = mm(F.rms_norm(x, (d,), norm_1, eps), w_qkv, b_qkv)
        attended = attend_cached(qkv, cos, sin, k_cache, v_cache, index, bias, (n_head, kv_heads, head_dim))
        x = mm(attended, w_o, x)
        gate, up = mm(F.rms_norm(x, (d,), norm_2, eps), w_gate_up).split((inner, inner), dim=1)
        x = mm(F.silu(gate) * up, w_down, x)
    return mm(F.rms_norm(x, (d,), norm_w, eps), head_w)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The half-split rotation of `models.llama.model.apply_rotary`, in x's dtype (fp32 tables broadcast)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(x.dtype)


def attend_cached(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, index: torch.Tensor, bias: torch.Tensor,
                  heads: tuple[int, int, int]) -> torch.Tensor:
    """One new token's grouped-query attention over the cache, shared by the rotary families' steps: rotary on
    q and k, the new key and value written at column `index` first; `heads` = (n_head, kv_heads, head_dim).
    Returns [B, n_head * head_dim]."""
    n_head, kv_heads, head_dim = heads
    batch = qkv.shape[0]
    query, key, value = qkv.split((n_head * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=1)
    query = rotate_halves(query.reshape(batch, n_head, head_dim), cos, sin)
    key = rotate_halves(key.reshape(batch, kv_heads, head_dim), cos, sin)
    k_cache.index_copy_(2, index, key.unsqueeze(2))
    v_cache.index_copy_(2, index, value.reshape(batch, kv_heads, 1, head_dim))
    # Queries grouped by the key/value head they read: [B, kv_heads, group, head_dim].
    grouped = query.reshape(batch, kv_heads, n_head // kv_heads, head_dim) * head_dim ** -0.5
    scores = torch.matmul(grouped, k_cache.transpose(-1, -2))
    return torch.matmul((scores + bias).softmax(dim=-1), v_cache).reshape(batch, n_head * head_dim)
