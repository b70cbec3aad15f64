"""CodeGen's fused one-token decode step (run by `codegen2.generation.decoder.FastDecoder`).

A decode step of a small model costs what its dispatch costs: the layer-by-layer `CodeGenModel.forward`
runs about 160 ATen ops per token. This module computes the same function with fewer, larger pieces:

- the two matmuls that read `ln_1(x)` (qkv_proj and fc_in) become one, and the two that write into the
  residual (out_proj and fc_out) another, over weights concatenated once, input-major (the layout MKL's
  one/few-row kernels stream fastest). The model's parameters are re-pointed at slices of the fused
  buffers, so no second copy of the weights exists and the state dict keeps its values;
- keys and values live in one preallocated tensor per layer, written at a position *tensor* with
  `index_copy_`, and attention runs over the whole capacity with a mask. Nothing that changes from step
  to step is a Python number, so `torch.compile(fullgraph=True)` turns `decode_step` into one graph
  that serves every step of a generation (inductor's C++ backend on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...int8 import embed, embedding_weight, fuse_linears, linear_weight, mm
from ...masks import decode_step_bias
from .model import CodeGenModel


@torch.no_grad()
def fuse_decode_weights(model: CodeGenModel) -> list[tuple]:
    """Per layer (ln_w, ln_b, w_in, b_in, w_out, b_out): w_in = [qkv | fc_in] and w_out = [out_proj ; fc_out].

    Float weights are stored input-major ([in, out] contiguous). The model's own weights become views of them
    (same values, the layout `CodeGenModel.use_decode_layout` would pick for the widening ones), so the
    model still runs, trains and saves as before. int8 weights (`int8.py`) fuse w_in by rows; out_proj and
    fc_out keep their own per-row scales, so w_out is the list of both and the step runs two matmuls.
    Repeated calls return the existing fusion.
    """
    layers = []
    d = model.config.n_embd
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        w_in = fuse_linears([attn.qkv_proj, mlp.fc_in])
        if isinstance(w_in, tuple):
            w_out = [linear_weight(attn.out_proj), linear_weight(mlp.fc_out)]
        else:
            out, fc_out = attn.out_proj.weight, mlp.fc_out.weight
            w_out = getattr(block, "_decode_fused_out", None)
            if w_out is None or w_out.data_ptr() != out.data_ptr():
                w_out = torch.cat((out.t(), fc_out.t()), dim=0).contiguous()  # [d + inner, d]
                out.data = w_out[:d].t()
                fc_out.data = w_out[d:].t()
                block._decode_fused_out = w_out
        b_in = torch.cat((torch.zeros(3 * d, dtype=mlp.fc_in.bias.dtype, device=mlp.fc_in.bias.device),
                          mlp.fc_in.bias))
        layers.append((block.ln_1.weight, block.ln_1.bias, w_in, b_in, w_out, mlp.fc_out.bias))
    return layers


def decode_weights(model: CodeGenModel, batch: int) -> tuple:
    """What `decode_step` reads: (fused layers, head, rotary table, static shape), views of the model's weights
    (one input-major layout for every `batch`)."""
    if isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.stride(0) != 1:
        model.use_decode_layout()  # before fusing: it would copy the fused views apart again
    t = model.transformer
    head = (embedding_weight(t.wte), t.ln_f.weight, t.ln_f.bias, linear_weight(model.lm_head), model.lm_head.bias)
    device = t.ln_f.weight.device
    model.rotary(torch.zeros(1, 1, dtype=torch.long, device=device))  # builds this device's table
    cfg = model.config
    return fuse_decode_weights(model), head, model.rotary.tables[device], (cfg.mp_num, cfg.n_head, cfg.head_dim,
                                                                          cfg.layer_norm_eps)


def decode_step(weights: tuple, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """CodeGen's one-token step (arguments as in `models.spec.Architecture.decode_step`).

    `weights` is `decode_weights(model, batch)`: per-layer fused weights; the head (wte, ln_f w, ln_f b, lm_head
    weight [d, vocab] input-major, lm_head bias); the [n_ctx, 3, width, 2] table of `model.rotary` (angle 0
    for V); the static shape. Only tensors flow through here, so one compiled graph fits all steps.
    """
    layers, head, rotary, shape = weights
    mp_num, n_head, head_dim, eps = shape
    wte, ln_f_w, ln_f_b, head_w, head_b = head
    batch, d = tokens.shape[0], ln_f_w.shape[0]
    bias = decode_step_bias(valid, col, keys[0].dtype)
    scale = head_dim ** -0.5
    cos, sin = rotary[pos][:, None, :, None].unbind(-1)  # [B, 1, 3, 1, width]: broadcast over groups, heads
    width = cos.shape[-1]
    index = col.reshape(1)
    x = embed(tokens, wte, ln_f_w.dtype)
    for (ln_w, ln_b, w_in, b_in, w_out, b_out), k_cache, v_cache in zip(layers, keys, values):
        h = F.layer_norm(x, (d,), ln_w, ln_b, eps)
        both = mm(h, w_in, b_in)
        qkv, up = both[:, : 3 * d], both[:, 3 * d:]
        qkv = qkv.reshape(batch, mp_num, 3, -1, head_dim)
        rot, rest = qkv[..., : 2 * width].unflatten(-1, (width, 2)), qkv[..., 2 * width:]
        real, imag = rot.float().unbind(-1)  # rotated in fp32, as the model's forward does
        rot = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).to(qkv.dtype)
        qkv = torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
        query, value, key = (t.reshape(batch, n_head, 1, head_dim) for t in qkv.unbind(2))
        k_cache.index_copy_(2, index, key)
        v_cache.index_copy_(2, index, value)
        scores = torch.matmul(query * scale, k_cache.transpose(-1, -2)) + bias  # [B, H, 1, capacity]
        attended = torch.matmul(scores.softmax(dim=-1), v_cache)
        attended, act = attended.reshape(batch, d), F.gelu(up, approximate="tanh")
        if isinstance(w_out, list):  # int8: out_proj and fc_out have their own scales
            x = x + mm(attended, w_out[0]) + mm(act, w_out[1], b_out)
        else:
            x = torch.addmm(torch.add(x, b_out), torch.cat((attended, act), dim=1), w_out)
    x = F.layer_norm(x, (d,), ln_f_w, ln_f_b, eps)
    return mm(x, head_w, head_b)
