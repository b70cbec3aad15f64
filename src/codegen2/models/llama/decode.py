"""LLaMA's fused one-token decode step (run by `codegen2.generation.decoder.FastDecoder`).

The same function as `LlamaModel.forward` for one new token per row, in fewer and larger operations:

- q_proj, k_proj and v_proj become one matmul, gate_proj and up_proj another, over weights concatenated once
  (`fuse_rows`: float weights stacked by output, int8 rows by `int8.fuse_linears`). The model's parameters
  are re-pointed at views of these buffers, so no second copy of the weights exists and the state dict keeps
  its values (a LLaMA block is sequential, so unlike CodeGen's parallel block the attention and MLP matmuls
  cannot share one);
- float weights are [out, in] (transformers' own layout) for several rows: oneDNN's few-row kernel (`linear`)
  streams them 1.2-1.9x faster than MKL's (8 rows, thread time), and 1.2x faster than it streams input-major
  weights. For one float32 row on the CPU, the fused q/k/v and gate/up buffers (the widening ones, as in
  CodeGen's decode layout) are input-major instead: MKL's one-row GEMV streams a [896, 9728] gate/up buffer at
  51-53 ms for 24 layers against 59-60 in [out, in] (Qwen2.5-Coder-0.5B, thread time), and the prompt's
  64-row GEMMs (the prefill, which runs after the decoder is built) are faster on it too (q/k/v and gate/up:
  272 against 341 ms). o_proj and down_proj stay [out, in] (input-major measured 1-4% slower for one row).
  `decode_weights` moves the two buffers into the layout of the decoder's batch (a copy of the rows that frees
  the old buffer), so a batch-1 decoder and a batch-N decoder alive together on one model would each hold their
  own. Float32 weights on the CPU also move onto 2 MiB pages (`models.common.huge_page_empty`), once;
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
from ..common import huge_page_empty, on_huge_pages
from .model import LlamaModel, tied_head

# x [B, in] @ weight [out, in]^T + bias by oneDNN, as an op the compiler calls without looking inside: inductor
# lowers oneDNN's own op only for weights frozen into the graph, and these are graph inputs. Registered with
# torch.library directly: `torch.library.custom_op`'s wrapper cost ~25 us more per call (thread time).
_LIBRARY = torch.library.Library("codegen2", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("onednn_linear", lambda x, weight, bias: torch.ops.mkldnn._linear_pointwise(
    x, weight, bias, "none", [], ""), "CPU")


@torch.library.register_fake("codegen2::onednn_linear", lib=_LIBRARY)
def _onednn_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


ONEDNN = torch.backends.mkldnn.is_available()


def linear(x: torch.Tensor, weight: torch.Tensor | tuple, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, in] @ weight + bias + residual, for a `dense_weight` / `fuse_rows` weight: float [out, in] (rows
    contiguous, or the transpose of an input-major buffer) or int8.

    One float32 row goes to MKL (its GEMV, the residual and bias added in the same call); several go to oneDNN,
    whose few-row kernel streams [out, in] weights 1.2-1.9x faster than MKL's (8 rows, thread time). Int8
    weights are `int8.mm`'s business.
    """
    if isinstance(weight, torch.Tensor) and ONEDNN and x.shape[0] > 1 and x.dtype == torch.float32 \
            and x.device.type == "cpu":
        out = torch.ops.codegen2.onednn_linear(x, weight, bias)
        return out if residual is None else out + residual
    extra = residual if bias is None else (bias if residual is None else residual + bias)
    if not isinstance(weight, torch.Tensor):
        return mm(x, weight, extra)
    return torch.mm(x, weight.t()) if extra is None else torch.addmm(extra, x, weight.t())


@torch.no_grad()
def fuse_rows(modules: list[nn.Module], input_major: bool = False, huge_pages: bool = False) -> torch.Tensor | tuple:
    """One `linear` weight for modules that read the same input, outputs in `modules` order: float weights
    stacked [sum out, in] (each module's weight becomes a row view of it: no second copy), int8 rows by
    `int8.fuse_linears`. `input_major`: the buffer is [in, sum out] and the weight its transpose (the model's
    weights then column slices of it); `huge_pages`: the buffer on 2 MiB pages (`models.common.huge_page_empty`).
    Repeated calls return the existing buffer if it is laid out as asked; else the rows move into a new one and
    the old is freed (one transient copy of the rows)."""
    if not all(isinstance(m, nn.Linear) for m in modules):
        return fuse_linears(modules)
    first = modules[0]
    fused = getattr(first, "_decode_rows", None)
    if fused is not None and first.weight.data_ptr() == fused.data_ptr() and first.weight.dtype == fused.dtype \
            and fused.t().is_contiguous() == input_major and (on_huge_pages(fused) or not huge_pages):
        return fused
    parts = [m.weight.detach() for m in modules]
    rows = sum(m.out_features for m in modules)
    if input_major:
        fused = torch.cat([w.t() for w in parts], dim=1, out=_empty((first.in_features, rows), first.weight,
                                                                    huge_pages)).t()
    else:
        fused = torch.cat(parts, out=_empty((rows, first.in_features), first.weight, huge_pages))
    start = 0
    for m in modules:
        m.weight.data = fused[start:start + m.out_features]
        start += m.out_features
    first._decode_rows = fused
    return fused


def _empty(shape: tuple[int, int], like: torch.Tensor, huge_pages: bool) -> torch.Tensor:
    return huge_page_empty(shape, like.dtype) if huge_pages else torch.empty(shape, dtype=like.dtype,
                                                                            device=like.device)


@torch.no_grad()
def dense_weight(module: nn.Module, huge_pages: bool = False) -> torch.Tensor | tuple:
    """`module`'s weight for `linear`: a float weight made [out, in] row-major in place (same values; on 2 MiB
    pages if `huge_pages`), or int8."""
    if not isinstance(module, nn.Linear):
        return linear_weight(module)
    _settle(module.weight, huge_pages)
    return module.weight


def _settle(weight: torch.Tensor, huge_pages: bool) -> None:
    """Make a float parameter row-major, and on 2 MiB pages if `huge_pages`, in place (same values; the old
    buffer is freed once nothing else views it)."""
    if not weight.is_contiguous() or (huge_pages and not on_huge_pages(weight)):
        weight.data = _empty(tuple(weight.shape), weight, huge_pages).copy_(weight)


@torch.no_grad()
def head_weight(model: nn.Module, huge_pages: bool = False) -> torch.Tensor | tuple:
    """The output projection for `linear`: lm_head, or a tied head's embedding table itself ([vocab, d]), moved
    onto 2 MiB pages if `huge_pages` (a float table)."""
    if model.lm_head is not None:
        return dense_weight(model.lm_head, huge_pages)
    table = embedding_weight(model.model.embed_tokens)
    if isinstance(table, tuple):
        return tied_head(model.model.embed_tokens)
    _settle(table, huge_pages)
    return table


@torch.no_grad()
def fuse_decode_weights(model: LlamaModel, input_major: bool = False, huge_pages: bool = False) -> list[tuple]:
    """Per layer (norm_1 w, w_qkv, b_qkv, w_o, norm_2 w, w_gate_up, w_down) as `linear` weights: q/k/v and
    gate/up fused by `fuse_rows` (the model's own weights become views of the fused buffers; `input_major`:
    the layout of those two), o_proj and down_proj as they are; every matrix on 2 MiB pages if `huge_pages`.
    Repeated calls return the existing fusion."""
    layers = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        w_qkv = fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], input_major, huge_pages)
        w_gate_up = fuse_rows([mlp.gate_proj, mlp.up_proj], input_major, huge_pages)
        layers.append((block.input_layernorm.weight, w_qkv, fuse_biases([attn.q_proj, attn.k_proj, attn.v_proj]),
                       dense_weight(attn.o_proj, huge_pages),
                       block.post_attention_layernorm.weight, w_gate_up, dense_weight(mlp.down_proj, huge_pages)))
    return layers


def fuse_biases(modules: list[nn.Module]) -> torch.Tensor | None:
    """The biases of Linear modules fused by `int8.fuse_linears`, side by side (a small copy), or None."""
    if modules[0].bias is None:
        return None
    return torch.cat([m.bias.detach() for m in modules])


def decode_weights(model: LlamaModel, batch: int) -> tuple:
    """What `decode_step` reads for `batch` rows: (fused layers, head, rotary table, static shape), views of the
    model's weights. With float32 weights on the CPU every matrix is moved onto 2 MiB pages, and for one row the
    fused q/k/v and gate/up buffers are input-major (see the module docstring); otherwise [out, in]."""
    cfg = model.config
    norm = model.model.norm.weight
    fp32_cpu = norm.dtype == torch.float32 and norm.device.type == "cpu"
    head_w = head_weight(model, fp32_cpu)  # first: it may move a tied table, which the embedding reads too
    head = (embedding_weight(model.model.embed_tokens), norm, head_w)
    shape = (cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.inner_dim, cfg.layer_norm_eps)
    layers = fuse_decode_weights(model, batch == 1 and fp32_cpu, fp32_cpu)
    return layers, head, model.rotary.table(norm.device), shape


def decode_step(weights: tuple, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """LLaMA's one-token step (arguments as in `models.spec.Architecture.decode_step`); `weights` is
    `decode_weights(model, batch)`: fused layers, the head (embedding, final norm, output weight), rotary table,
    shape."""
    layers, head, rotary, shape = weights
    n_head, kv_heads, head_dim, inner, eps = shape
    embed_w, norm_w, head_w = head
    d = norm_w.shape[0]
    bias = decode_step_bias(valid, col, keys[0].dtype)
    cos, sin = rotary[pos][:, None].unbind(-1)  # [B, 1, head_dim / 2]: broadcast over heads
    index = col.reshape(1)
    x = embed(tokens, embed_w, norm_w.dtype)
    for (norm_1, w_qkv, b_qkv, w_o, norm_2, w_gate_up, w_down), k_cache, v_cache in zip(layers, keys, values):
        qkv = linear(F.rms_norm(x, (d,), norm_1, eps), w_qkv, b_qkv)
        attended = attend_cached(qkv, cos, sin, k_cache, v_cache, index, bias, (n_head, kv_heads, head_dim))
        x = linear(attended, w_o, residual=x)
        gate, up = linear(F.rms_norm(x, (d,), norm_2, eps), w_gate_up).split((inner, inner), dim=1)
        x = linear(F.silu(gate) * up, w_down, residual=x)
    return linear(F.rms_norm(x, (d,), norm_w, eps), head_w)


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
