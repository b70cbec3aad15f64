"""LLaMA's fused one-token decode step (run by `codegen2.decode.FastDecoder`).

The same function as `LlamaModel.forward` for one new token per row, in fewer and larger operations:

- q_proj, k_proj and v_proj become one matmul, gate_proj and up_proj another, over weights concatenated once,
  input-major (the layout MKL's one/few-row kernels stream fastest); o_proj and down_proj are stored
  input-major too. The model's parameters are re-pointed at views of these buffers, so no second copy of the
  weights exists and the state dict keeps its values (a LLaMA block is sequential, so unlike CodeGen's
  parallel block the attention and MLP matmuls cannot share one);
- keys and values live in one preallocated tensor per layer, written at a position *tensor*, and attention
  runs over the whole capacity with an additive mask (`masks.decode_step_bias`), so `torch.compile` makes
  one graph for every step. Grouped-query attention reads each key/value head once for its group of queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...masks import decode_step_bias
from .model import LlamaModel


@torch.no_grad()
def fuse_decode_weights(model: LlamaModel) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (norm_1 w, w_qkv [d, (H + 2 Hkv) D], w_o [H D, d], norm_2 w, w_gate_up [d, 2 inner], w_down [inner, d]).

    Repeated calls return the existing fusion (as long as the model's weights still point into it).
    """
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        fused = getattr(block, "_decode_fused", None)
        if fused is None or fused[0].data_ptr() != attn.q_proj.weight.data_ptr():
            projections = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
            fused = []
            for group in projections:
                weight = torch.cat([p.weight.t() for p in group], dim=1).contiguous()
                start = 0
                for p in group:
                    p.weight.data = weight[:, start:start + p.out_features].t()
                    start += p.out_features
                fused.append(weight)
            for p in (attn.o_proj, mlp.down_proj):
                p.weight.data = p.weight.data.t().contiguous().t()
            block._decode_fused = tuple(fused)
        w_qkv, w_gate_up = block._decode_fused
        layers.append((block.input_layernorm.weight, w_qkv, attn.o_proj.weight.t(),
                       block.post_attention_layernorm.weight, w_gate_up, mlp.down_proj.weight.t()))
    return layers


def decode_weights(model: LlamaModel) -> tuple:
    """What `decode_step` reads: (fused layers, head, rotary table, static shape), views of the model's weights."""
    if model.lm_head is not None and model.lm_head.weight.stride(0) != 1:
        model.use_decode_layout()  # before fusing: it would copy the fused views apart again
    cfg = model.config
    head_w = model.head_weight()
    head = (model.model.embed_tokens.weight, model.model.norm.weight, head_w.t())
    shape = (cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.inner_dim, cfg.layer_norm_eps)
    return fuse_decode_weights(model), head, model.rotary.table(head_w.device), shape


def decode_step(
    weights: tuple,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    col: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    valid: torch.Tensor,
) -> torch.Tensor:
    """Logits [B, vocab] for one new token per row, appended to the cache at column `col`.

    tokens, pos [B] (token ids and rotary positions), col a 0-d int64 tensor, keys/values per layer
    [B, kv_heads, capacity, head_dim], valid [B, capacity] (False at left padding).
    """
    layers, head, rotary, shape = weights
    n_head, kv_heads, head_dim, inner, eps = shape
    embed, norm_w, head_w = head
    batch, d = tokens.shape[0], embed.shape[1]
    group = n_head // kv_heads
    bias = decode_step_bias(valid, col, keys[0].dtype)
    scale = head_dim ** -0.5
    cos, sin = rotary[pos][:, None].unbind(-1)  # [B, 1, head_dim / 2]: broadcast over heads
    index = col.reshape(1)
    x = F.embedding(tokens, embed)
    for (norm_1, w_qkv, w_o, norm_2, w_gate_up, w_down), k_cache, v_cache in zip(layers, keys, values):
        qkv = torch.mm(F.rms_norm(x, (d,), norm_1, eps), w_qkv)
        query, key, value = qkv.split((n_head * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=1)
        query = _rotate(query.reshape(batch, n_head, head_dim), cos, sin)
        key = _rotate(key.reshape(batch, kv_heads, head_dim), cos, sin)
        k_cache.index_copy_(2, index, key.unsqueeze(2))
        v_cache.index_copy_(2, index, value.reshape(batch, kv_heads, 1, head_dim))
        # Queries grouped by the key/value head they read: [B, kv_heads, group, head_dim].
        scores = torch.matmul(query.reshape(batch, kv_heads, group, head_dim) * scale, k_cache.transpose(-1, -2))
        attended = torch.matmul((scores + bias).softmax(dim=-1), v_cache)
        x = torch.addmm(x, attended.reshape(batch, n_head * head_dim), w_o)
        gate, up = torch.mm(F.rms_norm(x, (d,), norm_2, eps), w_gate_up).split((inner, inner), dim=1)
        x = torch.addmm(x, F.silu(gate) * up, w_down)
    return torch.mm(F.rms_norm(x, (d,), norm_w, eps), head_w)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The half-split rotation of `models.llama.model.apply_rotary`, in x's dtype (fp32 tables broadcast)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(x.dtype)
