"""The int8 directory written by `codegen2 quantize`: its one writer and its one reader.

The directory holds config.json and the tokenizer (as an exported HF directory does), `model.safetensors`
with the int8 weights and their `<module>.weight_scale` tensors, and the `quantization.json` manifest that
names the int8 modules and the format they multiply in. A large model is converted once and later loaded in
int8 directly, without ever holding its float weights. transformers cannot read it (its weights are int8).
The int8 tensors, modules and matmuls themselves are `codegen2.int8`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .fsutil import atomic_directory
from .hf.config import CONFIG_FILE
from .int8 import (
    INT8_FORMATS,
    Int8Linear,
    check_int8_kernel,
    freeze,
    int8_format,
    quantized_names,
    swap_modules,
    use_int8_format,
)
from .safetensors_io import read_checked, tensor_specs, write_file

MANIFEST = "quantization.json"
WEIGHTS = "model.safetensors"
SCHEME = "int8 weight-only, symmetric, one fp32 scale per output channel (row): scale = max|row| / 127"


def save_quantized(model: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `model.safetensors` (int8 weights + `<module>.weight_scale`) and the `quantization.json` manifest.

    `directory` is written as is: a whole int8 directory goes through `write_int8_directory`, which stages
    it so that a crash leaves nothing half done.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = quantized_names(model)
    if not modules:
        raise UserError("save_quantized: the model has no int8 modules (quantize it first)")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    manifest = {"format": "int8", "scheme": SCHEME, "compute_dtype": "float32",
                "inference_format": int8_format(model), "modules": modules, **(extra or {})}
    write_file(state, directory / WEIGHTS, metadata={"format": "pt", "codegen2_quantization": "int8"})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return directory


def write_int8_directory(model: nn.Module, out_dir: str | Path, hf_config: dict, tokenizer,
                         extra: dict | None = None) -> Path:
    """Write a whole int8 directory atomically: config.json (`hf_config`), the tokenizer, weights and manifest."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_quantized(model, tmp, extra=extra)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
    return out_dir


def read_manifest(directory: str | Path) -> dict | None:
    """The quantization manifest of a checkpoint directory, or None when its weights are floating point."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the quantization manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "int8" \
            or not isinstance(manifest.get("modules"), dict):
        raise UserError(f"{path}: not a codegen2 int8 manifest (needs \"format\": \"int8\" and a \"modules\" map)")
    return manifest


def load_quantized_into(model: nn.Module, directory: str | Path, manifest: dict,
                        device: str | torch.device = "cpu", fmt: str | None = None) -> nn.Module:
    """Fill a meta-built floating model from a directory written by `save_quantized`, tensor by tensor.

    `fmt` (int8 or int8-dynamic) chooses how it multiplies; None: the format it was saved from.
    Each tensor is copied out of the memory-mapped file (the int8 kernel needs aligned rows, which a
    tensor at an arbitrary file offset does not have) and the file's pages are dropped behind it.
    """
    directory = Path(directory)
    modules = manifest["modules"]
    unknown = [n for n in modules if n not in dict(model.named_modules())]
    if unknown:
        raise UserError(f"{directory / MANIFEST}: modules {unknown[:3]} are not in this model's architecture")
    fmt = fmt or manifest.get("inference_format") or "int8"
    if fmt not in INT8_FORMATS:
        raise UserError(f"{directory / MANIFEST}: unknown inference_format {fmt!r} (one of {', '.join(INT8_FORMATS)})")
    check_int8_kernel(device, dynamic=fmt == "int8-dynamic")
    swap_modules(model, torch.float32, skip=lambda name: name not in modules)
    expected = dict(model.state_dict(keep_vars=True))
    specs = tensor_specs(expected, exact_dtype=True)
    for name, tensor in read_checked(directory / WEIGHTS, specs, device, source=f"{CONFIG_FILE} and {MANIFEST}",
                                     copy=True):
        module_name, _, leaf = name.rpartition(".")
        value = nn.Parameter(tensor, requires_grad=False) if isinstance(expected[name], nn.Parameter) else tensor
        setattr(model.get_submodule(module_name), leaf, value)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.set_weight(module.weight, module.weight_scale)
    return freeze(use_int8_format(model, fmt, device))
