"""int8 weights: quantizing tensors, the int8 modules a model is swapped to, and the matmuls they run.

int8 stores each row of a Linear weight (one output channel) as int8 values times one float scale,
`w[n, k] ~= q[n, k] * scale[n]` with `scale[n] = max_k |w[n, k]| / 127`, and each row of an Embedding
the same way. Activations stay floating point: a matmul multiplies its fp32 input by the int8 rows and then
applies the fp32 scales and bias. Decoding one token reads every weight once, so a quarter of fp32's bytes is
up to four times the tokens/s where memory bandwidth bounds the step (DESIGN §6). The scheme is generic: every
`nn.Linear` and `nn.Embedding` is replaced, whatever the architecture calls it; norms and the rest stay in
floating point.

`int8-dynamic` keeps the same int8 weights and also quantizes activations: each row of a matmul's input
is rounded to int8 with its own scale (`max|row| / 127`, computed per call), the product runs int8 x int8
with exact int32 sums, and the row and channel scales are applied afterwards. That is CTranslate2's int8
scheme; it trades a little accuracy (docs/inference.md) for int8 multiply-adds (VNNI), four times as many
per instruction as fp32's, which decides the speed when several rows share a weight (batch 8).

The matmuls run on codegen2's native CPU kernel (`kernels/int8_matmul.c`: AVX2, AVX-512 VNNI or AMX paths, near
the memory's speed at batch 1 and 8) where it can run, else on PyTorch's: `_weight_int8pack_mm` for weight-only int8 (it
reads a bfloat16 copy of the input: on this CPU its fp32-input path is a scalar loop) and `torch._int_mm` for
int8-dynamic; `kernels/int8.py` says which and why.

A quantized model is for inference only: its modules refuse to run in training mode and its parameters
have `requires_grad` off. The int8 directory written by `codegen2 quantize` (weights plus a manifest) is
read and written by `codegen2.quantize`. This module also parses the weight-format names of `--dtype`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .kernels.int8 import int8_matmul, note_kernel_choice, row_sums, use_native
from .options import INFERENCE_DTYPES
from .safetensors_io import release_mapped_pages

QMAX = 127
INT8_FORMATS = ("int8", "int8-dynamic")
# Elements quantized at once (8 MiB of fp32): bounds the fp32 work buffer and the file pages of a source chunk
# resident together. With 4,096-row chunks a 1B model's [2048, 8192] weights held 128 MiB of both at the end
# of a load, when the int8 model is nearly complete: 1.37 GiB peak against 1.25 GiB after (docs/inference.md).
CHUNK_ELEMENTS = 2**21
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "qint8": "int8", "int8_dynamic": "int8-dynamic", "int8dynamic": "int8-dynamic"}
INFERENCE_NOTE = "int8 is weight-only, int8-dynamic also quantizes activations; there is no int4 or float16 " \
                 "inference path"


def parse_dtype(name: str | torch.dtype | None, where: str = "--dtype",
                accepted: tuple[str, ...] = INFERENCE_DTYPES) -> str | None:
    """One of `accepted` (a subset of `options.DTYPES`, the one list of names; None stays None: keep
    the checkpoint's own dtype), or a one-line UserError naming `where` and the names it takes."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    value = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if value not in accepted:
        note = f" ({INFERENCE_NOTE})" if accepted == INFERENCE_DTYPES else ""
        raise UserError(f"{where}: unknown weight dtype {name!r}; choose one of {', '.join(accepted)}{note}")
    return value


def compute_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The floating dtype a model in format `name` computes in (both int8 formats keep fp32 activations)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    return torch.float32 if is_int8_format(name) else getattr(torch, name)


def is_int8_format(name: str | torch.dtype | None) -> bool:
    """True for the int8 formats (weight-only `int8` and `int8-dynamic`): both store int8 weights."""
    return name in INT8_FORMATS


# --------------------------------------------------------------------------------------------- kernels
def quantize_rows(weight: torch.Tensor, chunk_rows: int | None = None,
                  after_chunk: Callable[[torch.Tensor], None] | None = None,
                  work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales fp32 [N]) with weight[n] ~= q[n] * scales[n]; rows processed in chunks.

    Each chunk (`chunk_rows` rows, default CHUNK_ELEMENTS worth) is copied into one fp32 work buffer and
    quantized there in place, so quantizing allocates nothing per chunk. `work` (a flat fp32 tensor) lets a
    loader share one buffer across all its tensors: per-tensor buffers, freed between the int8 weights that
    stay, fragment the heap and keep tens of MB resident. `after_chunk(source_rows)` lets a caller drop the
    pages of a memory-mapped source as soon as they are quantized. An all-zero row gets scale 1 (q = 0).
    """
    rows, cols = weight.shape
    chunk_rows = min(rows, chunk_rows or max(1, CHUNK_ELEMENTS // max(cols, 1)))
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    scales = torch.empty(rows, dtype=torch.float32, device=weight.device)
    if work is None or work.numel() < chunk_rows * cols or work.device != weight.device:
        work = torch.empty(chunk_rows * cols, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, chunk_rows):
        source = weight[start:start + chunk_rows]
        block = work[: source.numel()].view(source.shape)
        block.copy_(source)  # the source stays untouched
        low, high = torch.aminmax(block, dim=1)
        amax = torch.maximum(low.abs(), high.abs())
        scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
        q[start:start + chunk_rows].copy_(block.div_(scale[:, None]).round_().clamp_(-QMAX, QMAX))
        scales[start:start + chunk_rows] = scale
        if after_chunk is not None:
            after_chunk(source)
    return q, scales


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, ones: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (q * scales[:, None]).T + bias, in x's dtype; q [N, K] int8 contiguous.

    The kernel multiplies a bfloat16 input by the int8 rows and applies `ones` (bf16 [N]); the fp32 scales
    and the bias are applied afterwards in one fp32 op, so scales keep their full precision.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if use_native(x):
        return int8_matmul(x.reshape(-1, k), q, scales, bias).reshape(*lead, q.shape[0]).to(x.dtype)
    flat = x.reshape(-1, k).to(torch.bfloat16)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.ops.aten._weight_int8pack_mm(flat, q, ones)
    out = torch.addcmul(bias, out, scales) if bias is not None else torch.mul(out, scales)
    return out.reshape(*lead, q.shape[0]).to(x.dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 row scales [M, 1]) with x[m] ~= q[m] * scale[m], scale = max|x[m]| / 127 (zero rows: 1)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None = None, sums: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (q * scales[:, None]).T + bias with x quantized per row to int8: int8 x int8 -> int32.

    Each input row gets its own scale, so a row's result never depends on the other rows of a batch.
    The int32 sums are exact; the fp32 rescale (row scale x channel scale) and the bias follow in one op.
    `sums` (`row_sums(q)`, kept by the caller) saves the native kernel recomputing them.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if use_native(x):
        out = int8_matmul(x.reshape(-1, k), q, scales, bias, dynamic=True, sums=sums)
        return out.reshape(*lead, q.shape[0]).to(x.dtype)
    flat, row_scale = quantize_activations(x.reshape(-1, k).float())
    out = torch._int_mm(flat, q.t())  # q [N, K] row-major is the [K, N] operand, transposed: no copy
    out = out * row_scale * scales  # the native paths' rounding steps, in their order: the same bits
    out = out + bias if bias is not None else out
    return out.reshape(*lead, q.shape[0]).to(x.dtype)


def check_int8_kernel(device: torch.device | str, dynamic: bool = False) -> None:
    """Raise a UserError when this torch build has no int8 matmul for the format on `device`.

    For `int8-dynamic` the probe also checks that int8 x int8 sums are exact at full scale: a CPU without
    VNNI multiplies u8 x s8 pairs into saturating int16 lanes in some kernels, which would corrupt results.
    """
    device = torch.device(device)
    name = "int8-dynamic" if dynamic else "int8"
    if device.type == "cpu":
        note_kernel_choice()
    try:  # the same functions the model calls, so the probe covers whichever kernel they pick
        if dynamic:
            q = torch.full((8, 64), QMAX, dtype=torch.int8, device=device)
            x = torch.full((1, 64), -float(QMAX), device=device)  # row scale 1: x is its own int8 value
            exact = int8_dynamic_linear(x, q, torch.ones(8, device=device))
            if not bool((exact == -QMAX * QMAX * 64).all()):
                raise UserError(f"--dtype int8-dynamic: the int8 x int8 matmul on {device.type} is not exact "
                                f"(it saturates; a CPU without VNNI); use --dtype int8 there")
        else:
            q = torch.ones(8, 32, dtype=torch.int8, device=device)
            int8_linear(torch.ones(1, 32, device=device), q, torch.ones(8, device=device),
                        torch.ones(8, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "int8 x int8 (dynamic)" if dynamic else "int8 weight-only"
        raise UserError(f"--dtype {name}: torch {torch.__version__} has no {kind} matmul kernel on "
                        f"{device.type} ({first[:120]}); use --dtype bfloat16 or float32 there") from None


# --------------------------------------------------------------------------------------------- modules
class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 rows with fp32 per-row scales (inference only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("_ones", torch.ones(out_features, dtype=torch.bfloat16, device=device),
                             persistent=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        # int8-dynamic only: each row's sum of int8 weights, which the native kernel needs (not saved)
        self.register_buffer("weight_sum", None, persistent=False)
        self.dynamic = False  # True: int8-dynamic (activations quantized per row too); see `set_dynamic`

    def set_weight(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        self.weight, self.weight_scale = q, scales
        if self._ones.is_meta or self._ones.device != q.device:
            self._ones = torch.ones(self.out_features, dtype=torch.bfloat16, device=q.device)
        self.weight_sum = row_sums(q) if self.dynamic and not q.is_meta else None

    def set_dynamic(self, dynamic: bool) -> None:
        """Switch between int8 (weight-only) and int8-dynamic; the weights stay the same."""
        self.dynamic = dynamic
        self.weight_sum = row_sums(self.weight) if dynamic and not self.weight.is_meta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise UserError("int8 weights are for inference only: a quantized model cannot be trained "
                            "(load the float32 or bfloat16 checkpoint to train)")
        if self.dynamic:
            return int8_dynamic_linear(x, self.weight, self.weight_scale, self.bias, self.weight_sum)
        return int8_linear(x, self.weight, self.weight_scale, self._ones, self.bias)

    def extra_repr(self) -> str:
        kind = "int8-dynamic" if self.dynamic else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kind}"


class Int8Embedding(nn.Module):
    """An Embedding whose rows are int8 with one fp32 scale each; looked-up rows come out in `out_dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.out_dtype = num_embeddings, embedding_dim, out_dtype
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    def set_weight(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        self.weight, self.weight_scale = q, scales

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise UserError("int8 weights are for inference only: a quantized model cannot be trained")
        rows = F.embedding(ids, self.weight).to(self.out_dtype)
        return rows * F.embedding(ids, self.weight_scale[:, None]).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


QUANTIZED = (Int8Linear, Int8Embedding)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for m in model.modules())


def use_int8_format(model: nn.Module, name: str, device: torch.device | str | None = None) -> nn.Module:
    """Set how a quantized model's Linear layers multiply: `int8` (weight-only) or `int8-dynamic`.

    The int8 weights are the same in both; only the activations differ. Checks the format's kernel on
    `device` (default: the model's).
    """
    if name not in INT8_FORMATS:
        raise ValueError(f"not an int8 format: {name!r}")
    dynamic = name == "int8-dynamic"
    check_int8_kernel(device if device is not None else next(model.buffers()).device, dynamic=dynamic)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.set_dynamic(dynamic)
    return model


def int8_format(model: nn.Module) -> str | None:
    """"int8", "int8-dynamic", or None for a floating-point model."""
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not linears:
        return "int8" if is_quantized(model) else None
    return "int8-dynamic" if linears[0].dynamic else "int8"


def _replacement(module: nn.Module, float_dtype: torch.dtype) -> nn.Module | None:
    if isinstance(module, nn.Linear):
        return Int8Linear(module.in_features, module.out_features, module.bias is not None,
                          device=module.weight.device, bias_dtype=float_dtype)
    if isinstance(module, nn.Embedding):
        return Int8Embedding(module.num_embeddings, module.embedding_dim, device=module.weight.device,
                             out_dtype=float_dtype)
    return None


def swap_modules(model: nn.Module, float_dtype: torch.dtype = torch.float32,
                 skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Replace every nn.Linear / nn.Embedding (except names where `skip` is true) by its int8 twin, unfilled.

    Returns the replaced modules' names. Works on a model built on the meta device (the loaders fill
    the new modules tensor by tensor) or on a real one (`quantize_model` fills them from the old weights).
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or skip(name):
            continue
        new = _replacement(module, float_dtype)
        if new is None:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, new)
        replaced.append(name)
    return replaced


@torch.no_grad()
def quantize_model(model: nn.Module, skip: Callable[[str], bool] = lambda name: False,
                   fmt: str = "int8") -> nn.Module:
    """Quantize a loaded floating-point model in place to int8 weights (`fmt`: int8 or int8-dynamic); eval mode."""
    originals = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    float_dtype = next(iter(originals.values())).weight.dtype if originals else torch.float32
    check_int8_kernel(next(model.parameters()).device)
    names = swap_modules(model, float_dtype, skip)
    for name in names:
        old, new = originals[name], model.get_submodule(name)
        new.set_weight(*quantize_rows(old.weight.detach()))
        if isinstance(old, nn.Linear) and old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
    return freeze(use_int8_format(model, fmt))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a quantized model is never trained by accident."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def quantized_names(model: nn.Module) -> dict[str, str]:
    """{module name: "linear" | "embedding"} of the int8 modules."""
    return {name: "linear" if isinstance(m, Int8Linear) else "embedding"
            for name, m in model.named_modules() if isinstance(m, QUANTIZED)}


# ------------------------------------------------------------------------------- decode-step weights
# A fused decode step (models/*/decode.py) holds each matmul weight in the form its format multiplies
# fastest: a float weight input-major ([in, out] contiguous, MKL's streaming layout for one or few rows), an
# int8 weight as the kernel's (q [out, in], scales, ones) triple, an int8-dynamic one as a
# `DynamicInt8Weight` (q, scales). `mm` multiplies any of them.

class DynamicInt8Weight(NamedTuple):
    """An int8-dynamic `mm` weight: q [out, in] int8 rows, their fp32 scales and int32 row sums (`row_sums`)."""
    q: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor


def linear_weight(module: nn.Module) -> torch.Tensor | tuple:
    """`module`'s weight for `mm`: float as an [in, out] view, int8 as (q, scales, ones) or DynamicInt8Weight."""
    if isinstance(module, Int8Linear):
        if module.dynamic:
            return DynamicInt8Weight(module.weight, module.weight_scale, module.weight_sum)
        return module.weight, module.weight_scale, module._ones
    return module.weight.t()


@torch.no_grad()
def fuse_linears(modules: list[nn.Module]) -> torch.Tensor | tuple:
    """One `mm` weight for Linear modules that read the same input: outputs side by side, in `modules` order.

    float: [in, sum out] input-major; int8: rows concatenated (q [sum out, in], scales, ones). The modules'
    own weights are re-pointed at slices of the fused buffer (int8 row slices stay contiguous), so no
    second copy exists and the model still runs and saves as before. Repeated calls return the same fusion.
    """
    first = modules[0]
    cached = getattr(first, "_decode_fused", None)
    dynamic = getattr(first, "dynamic", False)
    if cached is not None and cached[0] == first.weight.data_ptr() and cached[2] == dynamic:
        return cached[1]
    if all(isinstance(m, Int8Linear) for m in modules):
        if any(m.dynamic != dynamic for m in modules):
            raise ValueError("cannot fuse int8 and int8-dynamic projections into one matmul")
        q = torch.cat([m.weight for m in modules])
        scales = torch.cat([m.weight_scale for m in modules])
        start = 0
        for m in modules:
            m.set_weight(q[start:start + m.out_features], scales[start:start + m.out_features])
            start += m.out_features
        fused = (DynamicInt8Weight(q, scales, torch.cat([m.weight_sum for m in modules])) if dynamic else
                 (q, scales, torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device)))
    elif any(isinstance(m, Int8Linear) for m in modules):
        raise ValueError("cannot fuse int8 and floating-point projections into one matmul")
    else:
        fused = torch.cat([m.weight.t() for m in modules], dim=1).contiguous()
        start = 0
        for m in modules:
            m.weight.data = fused[:, start:start + m.out_features].t()
            start += m.out_features
    first._decode_fused = (first.weight.data_ptr(), fused, dynamic)
    return fused


def mm(x: torch.Tensor, weight: torch.Tensor | tuple, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, in] times a decode-step weight (`linear_weight` / `fuse_linears`), plus bias."""
    if isinstance(weight, DynamicInt8Weight):
        return int8_dynamic_linear(x, weight.q, weight.scales, bias=bias, sums=weight.sums)
    if isinstance(weight, tuple):
        return int8_linear(x, *weight, bias=bias)
    return torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)


def embedding_weight(module: nn.Module) -> torch.Tensor | tuple:
    """An embedding table for `embed`: the float tensor, or (q, scales) for int8."""
    return (module.weight, module.weight_scale) if isinstance(module, Int8Embedding) else module.weight


def embed(tokens: torch.Tensor, table: torch.Tensor | tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of an `embedding_weight` table (int8 rows come out in `dtype`)."""
    if isinstance(table, tuple):
        q, scales = table
        return F.embedding(tokens, q).to(dtype) * scales[tokens, None].to(dtype)
    return F.embedding(tokens, table)


# -------------------------------------------------------------------------------------- load and save
def assign_streamed(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], float_dtype: torch.dtype,
                    release: Callable[[torch.Tensor], None] | None = None) -> None:
    """Fill a meta-built model whose Linear/Embedding were swapped to int8, from float tensors streamed by name.

    The weight of an int8 module is quantized as it arrives, CHUNK_ELEMENTS at a time (`release` is
    called on each consumed chunk of the source, e.g. to drop memory-mapped pages); every other tensor
    is converted to `float_dtype` and assigned. The full-precision model never exists.
    """
    work = None  # one fp32 chunk buffer for every weight (see quantize_rows)
    for name, tensor in tensors:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, QUANTIZED) and leaf == "weight":
            if work is None:
                work = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32, device=tensor.device)
            module.set_weight(*quantize_rows(tensor, after_chunk=release, work=work))
        else:
            value = tensor.to(float_dtype)
            if release is not None and value.data_ptr() != tensor.data_ptr():
                release(tensor)
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        del tensor


def quantize_streamed(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]],
                      device: str | torch.device = "cpu", fmt: str = "int8") -> nn.Module:
    """Fill a meta-built floating model with int8 weights quantized while its float tensors stream in.

    `tensors` is a lazy reader (checked against the floating model before this swaps its modules): each
    weight is quantized CHUNK_ELEMENTS at a time, the file pages of a chunk dropped as soon as it is done,
    so the peak is about the int8 model plus one chunk (a 1B-shaped fp32 checkpoint: see docs/inference.md).
    """
    check_int8_kernel(device, dynamic=fmt == "int8-dynamic")
    swap_modules(model, torch.float32)
    assign_streamed(model, tensors, torch.float32, release=release_mapped_pages)
    _return_freed_memory()
    return freeze(use_int8_format(model, fmt, device))


def _return_freed_memory() -> None:
    """Give the heap's freed pages back to the system (glibc keeps them otherwise); a no-op elsewhere."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
