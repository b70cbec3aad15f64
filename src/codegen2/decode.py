"""Fast one-token decoding for CPU inference: fused projections, a static cache, one compilable step.

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

`FastDecoder(compile=False)` runs the same step eagerly (no compile time; fewer ops than the model's
forward). Compiling costs tens of seconds once per (batch, capacity) shape: worth it for evaluation or
a long batch of samples, not for one short `codegen2 sample`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .model import CodeGenModel, KVCache


@torch.no_grad()
def fuse_decode_weights(model: CodeGenModel) -> list[tuple[torch.Tensor, ...]]:
    """Per layer (ln_w, ln_b, w_in, b_in, w_out, b_out): w_in = [qkv | fc_in] and w_out = [out_proj ; fc_out].

    Both are stored input-major ([in, out] contiguous). The model's own weights become views of them
    (same values, the layout `CodeGenModel.use_decode_layout` would pick for the widening ones), so the
    model still runs, trains and saves as before. Repeated calls return the existing fusion.
    """
    layers = []
    d = model.config.n_embd
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        qkv, fc_in, out, fc_out = attn.qkv_proj.weight, mlp.fc_in.weight, attn.out_proj.weight, mlp.fc_out.weight
        fused = getattr(block, "_decode_fused", None)
        if fused is None or fused[0].data_ptr() != qkv.data_ptr():
            w_in = torch.cat((qkv.t(), fc_in.t()), dim=1).contiguous()  # [d, 3d + inner]
            w_out = torch.cat((out.t(), fc_out.t()), dim=0).contiguous()  # [d + inner, d]
            qkv.data = w_in[:, : 3 * d].t()
            fc_in.data = w_in[:, 3 * d:].t()
            out.data = w_out[:d].t()
            fc_out.data = w_out[d:].t()
            block._decode_fused = (w_in, w_out)
        w_in, w_out = block._decode_fused
        b_in = torch.cat((torch.zeros(3 * d, dtype=w_in.dtype, device=w_in.device), mlp.fc_in.bias))
        layers.append((block.ln_1.weight, block.ln_1.bias, w_in, b_in, w_out, mlp.fc_out.bias))
    return layers


def decode_step(
    weights: list[tuple[torch.Tensor, ...]],
    head: tuple[torch.Tensor, ...],
    rotary: torch.Tensor,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    col: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    valid: torch.Tensor,
    shape: tuple[int, int, int, float],
) -> torch.Tensor:
    """Logits [B, vocab] for one new token per row, appended to the cache at column `col`.

    tokens, pos [B] (token ids and rotary positions), col a 0-d int64 tensor, keys/values per layer
    [B, H, capacity, D], valid [B, capacity] (False at left padding). `head` is (wte, ln_f w, ln_f b,
    lm_head weight [d, vocab] input-major, lm_head bias); `rotary` the [n_ctx, 3, width, 2] table of
    `model.rotary` (angle 0 for V). Only tensors flow through here, so one compiled graph fits all steps.
    """
    mp_num, n_head, head_dim, eps = shape
    wte, ln_f_w, ln_f_b, head_w, head_b = head
    batch, d = tokens.shape[0], wte.shape[1]
    capacity = keys[0].shape[2]
    seen = valid & (torch.arange(capacity, device=tokens.device) <= col)
    # Additive mask [B, 1, 1, capacity]: SDPA's CPU kernel with a mask is slow for a single query, and two
    # matmuls and a softmax are all one query needs.
    bias = torch.zeros(seen.shape, dtype=keys[0].dtype, device=tokens.device).masked_fill(~seen, float("-inf"))
    bias = bias[:, None, None, :]
    scale = head_dim ** -0.5
    cos, sin = rotary[pos][:, None, :, None].unbind(-1)  # [B, 1, 3, 1, width]: broadcast over groups, heads
    width = cos.shape[-1]
    index = col.reshape(1)
    x = F.embedding(tokens, wte)
    for (ln_w, ln_b, w_in, b_in, w_out, b_out), k_cache, v_cache in zip(weights, keys, values):
        h = F.layer_norm(x, (d,), ln_w, ln_b, eps)
        both = torch.addmm(b_in, h, w_in)
        qkv, up = both[:, : 3 * d], both[:, 3 * d:]
        qkv = qkv.reshape(batch, mp_num, 3, -1, head_dim)
        rot, rest = qkv[..., : 2 * width].unflatten(-1, (width, 2)), qkv[..., 2 * width:]
        real, imag = rot.unbind(-1)
        rot = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
        qkv = torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot
        query, value, key = (t.reshape(batch, n_head, 1, head_dim) for t in qkv.unbind(2))
        k_cache.index_copy_(2, index, key)
        v_cache.index_copy_(2, index, value)
        scores = torch.matmul(query * scale, k_cache.transpose(-1, -2)) + bias  # [B, H, 1, capacity]
        attended = torch.matmul(scores.softmax(dim=-1), v_cache)
        inner = torch.cat((attended.reshape(batch, d), F.gelu(up, approximate="tanh")), dim=1)
        x = torch.addmm(torch.add(x, b_out), inner, w_out)
    x = F.layer_norm(x, (d,), ln_f_w, ln_f_b, eps)
    return torch.addmm(head_b, x, head_w)


def capacity_bucket(needed: int, n_ctx: int, step: int = 128) -> int:
    """Cache capacity for `needed` positions, rounded up to a multiple of `step` (at most max(needed, n_ctx)).

    A compiled step is specialised to its capacity: rounding lets generations of similar lengths share one
    graph instead of compiling again, at the price of attending over a few masked columns.
    """
    return max(needed, min(-(-needed // step) * step, n_ctx))


class FastDecoder:
    """Decodes one token per row per step for a fixed batch and cache capacity, eager or compiled.

    Use: `start(cache, next_pos)` after an eager prefill through `CodeGenModel` into a `KVCache`, then
    `step(tokens)` per token. Rows never leave (static shapes): a finished row keeps decoding junk that
    the caller ignores.
    """

    _compiled: dict[int, object] = {}  # one torch.compile wrapper per process; inductor caches graphs

    def __init__(self, model: CodeGenModel, batch: int, capacity: int, compile: bool = False):
        cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if model.lm_head.weight.stride(0) != 1:
            model.use_decode_layout()  # before fusing: it would copy the fused views apart again
        self.weights = fuse_decode_weights(model)
        t = model.transformer
        self.head = (t.wte.weight, t.ln_f.weight, t.ln_f.bias, model.lm_head.weight.t(), model.lm_head.bias)
        model.rotary(torch.zeros(1, 1, dtype=torch.long, device=self.device))  # builds this device's table
        self.rotary = model.rotary.tables[self.device]
        self.shape = (cfg.mp_num, cfg.n_head, cfg.head_dim, cfg.layer_norm_eps)
        cache_shape = (batch, cfg.n_head, capacity, cfg.head_dim)
        self.keys = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)
        self.col = torch.zeros((), dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.capacity = capacity
        self.length = 0  # cache columns filled (host copy of `col`)
        self.compile = compile
        self.compile_seconds = 0.0
        self._fn = decode_step
        if compile:
            if 0 not in FastDecoder._compiled:
                FastDecoder._compiled[0] = torch.compile(decode_step, fullgraph=True, dynamic=False)
            self._fn = FastDecoder._compiled[0]
        self._warm = not compile

    def start(self, cache: KVCache, next_pos: torch.Tensor) -> None:
        """Take over a prefilled cache (its first `cache.length` columns) and each row's next position."""
        length = cache.length
        if length >= self.capacity:
            raise ValueError(f"prefill of {length} positions leaves no room in a capacity of {self.capacity}")
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k[:, :, :length] = cache.keys[layer, :, :, :length]
            v[:, :, :length] = cache.values[layer, :, :, :length]
        self.valid[:, :length] = cache.valid[:, :length]
        self.valid[:, length:] = True
        self.col.fill_(length)
        self.pos.copy_(next_pos)
        self.length = length

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] after feeding `tokens` [B]; advances the cache column and positions."""
        if self.length >= self.capacity:
            raise ValueError(f"fast decoder cache is full ({self.capacity} positions)")
        if not self._warm:
            began = time.perf_counter()
            logits = self._fn(self.weights, self.head, self.rotary, tokens, self.pos, self.col, self.keys,
                              self.values, self.valid, self.shape)
            self.compile_seconds = time.perf_counter() - began
            self._warm = True
        elif self.compile:
            # The graph was specialised on these very tensors (shapes, dtypes, devices): skipping dynamo's
            # guard checks saves ~0.2 ms per step, a tenth of a tiny model's step.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                logits = self._fn(self.weights, self.head, self.rotary, tokens, self.pos, self.col, self.keys,
                                  self.values, self.valid, self.shape)
        else:
            logits = decode_step(self.weights, self.head, self.rotary, tokens, self.pos, self.col, self.keys,
                                 self.values, self.valid, self.shape)
        self.col += 1
        self.pos += 1
        self.length += 1
        return logits
