"""StarCoder2's fused one-token decode step (run by `codegen2.generation.decoder.FastDecoder`).

LLaMA's step (`models/llama/decode.py`, its [out, in] weights and `linear`) with StarCoder2's parts: q/k/v
fused into one matmul with one bias vector, biases on o_proj, c_fc and c_proj (for one row added together with
the residual in one `addmm`), LayerNorm with bias, GELU (tanh). The sliding window is part of the additive
mask (`masks.decode_step_bias`), so the cache keeps every column and the step attends only to the last
`sliding_window` of them, as the full forward does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...int8 import embed, embedding_weight
from ...masks import decode_step_bias
from ..llama.decode import attend_cached, dense_weight, fuse_biases, fuse_rows, head_weight, linear
from .model import Starcoder2Model


def _norm(norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.weight, norm.bias


@torch.no_grad()
def fuse_decode_weights(model: Starcoder2Model) -> list[tuple]:
    """Per layer (norm_1, w_qkv, b_qkv, w_o, b_o, norm_2, w_fc, b_fc, w_proj, b_proj); norms as (weight, bias).

    q/k/v are fused by `fuse_rows` (the model's weights become views of the fused buffer); the other weights
    are used as they are (`dense_weight`: float [out, in], int8 rows).
    """
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        w_qkv = fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj])
        layers.append((_norm(block.input_layernorm), w_qkv, fuse_biases([attn.q_proj, attn.k_proj, attn.v_proj]),
                       dense_weight(attn.o_proj), attn.o_proj.bias, _norm(block.post_attention_layernorm),
                       dense_weight(mlp.c_fc), mlp.c_fc.bias, dense_weight(mlp.c_proj), mlp.c_proj.bias))
    return layers


def decode_weights(model: Starcoder2Model, batch: int) -> tuple:
    """What `decode_step` reads: (fused layers, head, rotary table, static shape), views of the model's weights
    ([out, in] for every `batch`: its 3B step streams at the memory's bound already)."""
    cfg = model.config
    norm = _norm(model.model.norm)
    head = (embedding_weight(model.model.embed_tokens), norm, head_weight(model))
    shape = (cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.layer_norm_eps, cfg.sliding_window)
    return fuse_decode_weights(model), head, model.rotary.table(norm[0].device), shape


def decode_step(weights: tuple, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """StarCoder2's one-token step (arguments as in `models.spec.Architecture.decode_step`); `weights` is
    `decode_weights(model, batch)`: fused layers, the head (embedding, final norm, output weight), rotary table,
    shape."""
    layers, head, rotary, shape = weights
    n_head, kv_heads, head_dim, eps, window = shape
    embed_w, (norm_w, norm_b), head_w = head
    d = norm_w.shape[0]
    bias = decode_step_bias(valid, col, keys[0].dtype, window)
    cos, sin = rotary[pos][:, None].unbind(-1)  # [B, 1, head_dim / 2]: broadcast over heads
    index = col.reshape(1)
    x = embed(tokens, embed_w, norm_w.dtype)
    for layer, k_cache, v_cache in zip(layers, keys, values):
        norm_1, w_qkv, b_qkv, w_o, b_o, norm_2, w_fc, b_fc, w_proj, b_proj = layer
        qkv = linear(F.layer_norm(x, (d,), *norm_1, eps), w_qkv, b_qkv)
        attended = attend_cached(qkv, cos, sin, k_cache, v_cache, index, bias, (n_head, kv_heads, head_dim))
        x = linear(attended, w_o, b_o, residual=x)
        hidden = F.gelu(linear(F.layer_norm(x, (d,), *norm_2, eps), w_fc, b_fc), approximate="tanh")
        x = linear(hidden, w_proj, b_proj, residual=x)
    return linear(F.layer_norm(x, (d,), norm_w, norm_b, eps), head_w)
