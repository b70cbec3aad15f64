"""int8 quantization: both matmul paths (weight-only and int8-dynamic) against naive dequantized matmuls, the
quantizer's bounds, whole-model swaps (any Linear / Embedding), the decode-step weights (`mm`, fused
projections), the inference-only guard, saved int8 checkpoints, dtype names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codegen2.config import ModelConfig
from codegen2.errors import UserError
from codegen2.int8 import (
    DynamicInt8Weight,
    Int8Embedding,
    Int8Linear,
    check_int8_kernel,
    fuse_linears,
    int8_dynamic_linear,
    int8_format,
    int8_linear,
    is_quantized,
    linear_weight,
    mm,
    parse_dtype,
    quantize_model,
    quantize_rows,
)
from codegen2.models.codegen.model import CodeGenModel
from codegen2.quantize import load_quantized_into, read_manifest, save_quantized

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (fixture in conftest.py)


def small_model(seed: int = 3) -> CodeGenModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_ctx=256, mp_num=2)
    return CodeGenModel(cfg).eval()


def naive_int8_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bf16_input: bool = False):
    """Quantize by hand (per row, max|w| / 127, round half to even) and multiply in float64."""
    scale = weight.double().abs().amax(dim=1) / 127
    q = torch.clamp(torch.round(weight.double() / scale[:, None]), -127, 127)
    x = x.to(torch.bfloat16) if bf16_input else x  # PyTorch's kernel reads a bf16 copy of x
    out = x.double() @ (q * scale[:, None]).T
    return out + bias.double() if bias is not None else out, q, scale


@pytest.mark.parametrize("rows", [1, 5, 8])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_int8_matmul_matches_a_naive_dequantized_matmul(rows, with_bias, kernel, int8_kernel):
    int8_kernel(kernel)
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(rows, 80, generator=gen)
    reference, q_ref, scale_ref = naive_int8_reference(x, weight, bias, bf16_input=kernel == "torch")
    q, scales = quantize_rows(weight)
    assert torch.equal(q.double(), q_ref) and torch.allclose(scales.double(), scale_ref, rtol=1e-6)
    out = int8_linear(x, q, scales, torch.ones(96, dtype=torch.bfloat16), bias)
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    product = reference - (bias.double() if bias is not None else 0)
    if kernel == "torch":  # its only rounding beyond the reference: a bf16 output before scaling (8 mantissa bits)
        assert ((out.double() - reference).abs() <= product.abs() * 2 ** -8 + 1e-5).all()
    else:  # fp32 multiply-adds of exact int8 values: fp32 rounding of sums of |x| |q| scale only
        bound = (x.double().abs() @ (q_ref.abs() * scale_ref[:, None]).T) * 2 ** -20 + 1e-6
        assert ((out.double() - reference).abs() <= bound).all()


def naive_dynamic_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """int8-dynamic by hand: x rounded per row (max|row| / 127) and weight per channel, multiplied in float64."""
    _, q, scale = naive_int8_reference(x, weight, None)
    row_scale = x.double().abs().amax(dim=1, keepdim=True) / 127
    row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    xq = torch.clamp(torch.round(x.double() / row_scale), -127, 127)
    out = (xq @ q.T) * row_scale * scale
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("rows", [1, 5, 8, 33])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_int8_dynamic_matmul_matches_a_naive_quantized_matmul(rows, with_bias, kernel, int8_kernel):
    int8_kernel(kernel)
    gen = torch.Generator().manual_seed(100 + rows)
    weight = torch.randn(96, 80, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(rows, 80, generator=gen) * 3
    x[0, :5] = 40.0  # an outlier feature: the row's scale follows it
    if rows > 1:
        x[1] = 0.0  # an all-zero row stays exactly zero (plus bias)
    reference = naive_dynamic_reference(x, weight, bias)
    q, scales = quantize_rows(weight)
    out = int8_dynamic_linear(x, q, scales, bias)
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    # The int32 sums are exact; only the fp32 rescale and bias add round (a few ulps of the result).
    assert torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-4)
    # A row's result never depends on the rest of the batch (each row has its own scale).
    assert torch.allclose(int8_dynamic_linear(x[-1:], q, scales, bias), out[-1:], rtol=0, atol=0)
    # And the error against the float matmul stays where int8 on both sides puts it.
    exact = x.double() @ weight.double().T + (bias.double() if bias is not None else 0)
    assert (out.double() - exact).abs().max() < 0.03 * exact.abs().max()


def test_decode_step_weights_multiply_like_the_modules_in_both_int8_formats():
    torch.manual_seed(1)
    for fmt in ("int8", "int8-dynamic"):
        layers = [nn.Linear(48, 40), nn.Linear(48, 24)]
        holder = quantize_model(nn.Sequential(*layers), fmt=fmt)
        assert int8_format(holder) == fmt
        x = torch.randn(3, 48)
        with torch.no_grad():
            separate = torch.cat([holder[0](x), holder[1](x)], dim=1)
            alone = mm(x, linear_weight(holder[0]), holder[0].bias)
            fused = fuse_linears([holder[0], holder[1]])
            assert isinstance(fused, DynamicInt8Weight) == (fmt == "int8-dynamic")
            both = mm(x, fused, torch.cat([holder[0].bias, holder[1].bias]))
        assert torch.equal(alone, separate[:, :40])
        assert torch.allclose(both, separate, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the modules now read slices of the fused rows: unchanged results
            assert torch.equal(torch.cat([holder[0](x), holder[1](x)], dim=1), separate)


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_int8_dynamic_refuses_a_saturating_kernel(monkeypatch, kernel, int8_kernel):
    """A CPU whose int8 x int8 kernel saturates (no VNNI) must not silently corrupt results."""
    int8_kernel(kernel)
    if kernel == "torch":
        real = torch._int_mm
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: real(a, b).clamp(-32768, 32767))
    else:
        import codegen2.int8 as int8

        real = int8.int8_matmul
        monkeypatch.setattr(int8, "int8_matmul", lambda *args, **kw: real(*args, **kw).clamp(-32768, 32767))
    with pytest.raises(UserError, match="int8-dynamic: .*not exact.*--dtype int8"):
        check_int8_kernel("cpu", dynamic=True)
    check_int8_kernel("cpu")  # the weight-only kernel does not use it


def test_quantize_rows_error_bound_chunks_and_zero_rows():
    weight = torch.randn(37, 50)
    weight[4] = 0
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert ((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all()
    assert scales[4] == 1 and not q[4].any()
    chunked = quantize_rows(weight, chunk_rows=8)
    assert torch.equal(chunked[0], q) and torch.equal(chunked[1], scales)
    seen = []
    quantize_rows(weight, chunk_rows=16, after_chunk=lambda rows: seen.append(rows.shape[0]))
    assert seen == [16, 16, 5]


def test_any_architecture_quantizes_every_linear_and_embedding():
    class Other(nn.Module):  # not a CodeGen model: names and nesting are its own
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(50, 32)
            self.stack = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32, bias=False))
            self.norm = nn.LayerNorm(32)

        def forward(self, ids):
            return self.norm(self.stack(self.tok(ids)))

    torch.manual_seed(0)
    model = Other().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(ids)
    quantize_model(model)
    assert isinstance(model.tok, Int8Embedding) and isinstance(model.stack[0], Int8Linear)
    assert isinstance(model.stack[2], Int8Linear) and isinstance(model.norm, nn.LayerNorm)
    with torch.no_grad():
        after = model(ids)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_quantized_codegen_logits_stay_close_and_never_train():
    model = small_model()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        reference = model(ids)
    quantize_model(model)
    assert is_quantized(model)
    with torch.no_grad():
        logits = model(ids)
    assert (logits - reference).abs().max() < 0.02 * reference.abs().max()
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    with pytest.raises(UserError, match="inference only"):
        model(ids)


def test_saved_int8_checkpoint_loads_the_same_model(tmp_path):
    model = quantize_model(small_model())
    save_quantized(model, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["format"] == "int8" and manifest["modules"]["lm_head"] == "linear"
    assert manifest["modules"]["transformer.wte"] == "embedding" and manifest["inference_format"] == "int8"
    with torch.device("meta"):
        empty = CodeGenModel(model.config)
    loaded = load_quantized_into(empty, tmp_path, manifest)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    with torch.device("meta"):  # the same int8 weights run as int8-dynamic when asked
        empty = CodeGenModel(model.config)
    dynamic = load_quantized_into(empty, tmp_path, manifest, fmt="int8-dynamic")
    assert int8_format(dynamic) == "int8-dynamic"
    with torch.no_grad():
        assert (dynamic(ids) - model(ids)).abs().max() < 0.05 * model(ids).abs().max()
    (tmp_path / "quantization.json").write_text('{"format": "int4"}')
    with pytest.raises(UserError, match="not a codegen2 int8 manifest"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("name,expected", [("float32", "float32"), ("bf16", "bfloat16"), ("INT8", "int8"),
                                           ("int8-dynamic", "int8-dynamic"), ("int8_dynamic", "int8-dynamic"),
                                           (torch.bfloat16, "bfloat16"), (None, None)])
def test_dtype_names(name, expected):
    assert parse_dtype(name) == expected


@pytest.mark.parametrize("name", ["int4", "float16", "fp8", ""])
def test_unknown_dtypes_are_one_line_errors(name):
    with pytest.raises(UserError, match="unknown weight dtype") as info:
        parse_dtype(name)
    assert "\n" not in str(info.value)
