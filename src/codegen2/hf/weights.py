"""Read Hugging Face weight files frugally and check them against the model they are for.

Supported layouts: `model.safetensors`, `pytorch_model.bin`, and either one sharded with its
`*.index.json`. Tensors are memory-mapped (safetensors' mmap, `torch.load(mmap=True)`), so a tensor
is paged in from the file once and never copied; with a dtype conversion safetensors reads each
tensor with pread instead, so only one unconverted tensor exists at a time. Together with a model
built on the meta device, peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UserError

log = logging.getLogger("codegen2")

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# Non-persistent attention buffers that old transformers versions saved alongside the weights.
IGNORED_SUFFIXES = (".attn.causal_mask", ".attn.masked_bias", ".attn.bias")


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a HF directory, preferring safetensors; shards come from their index."""
    path = Path(path)
    if (path / SAFETENSORS).is_file():
        return [path / SAFETENSORS]
    if (path / SAFETENSORS_INDEX).is_file():
        return _files_from_index(path / SAFETENSORS_INDEX)
    if (path / PYTORCH_BIN).is_file():
        return [path / PYTORCH_BIN]
    if (path / PYTORCH_BIN_INDEX).is_file():
        return _files_from_index(path / PYTORCH_BIN_INDEX)
    raise UserError(f"{path}: no weights found; expected {SAFETENSORS}, {PYTORCH_BIN}, or a sharded checkpoint "
                    f"with {SAFETENSORS_INDEX} / {PYTORCH_BIN_INDEX}")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{index}: not a valid shard index (needs a 'weight_map' object): {exc}") from None
    files = [index.parent / name for name in names]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise UserError(f"{index}: shard file(s) listed but missing: {', '.join(absent)}")
    return files


def iter_tensors(files: list[Path], device: str | torch.device = "cpu",
                 converting: bool = False) -> Iterator[tuple[str, torch.Tensor, Path, bool]]:
    """Yield (name, tensor, file, file_mapped) one tensor at a time, skipping the ignored buffers unread.

    `file_mapped` says the tensor's memory is a private mapping of the file (clean pages, never written).
    """
    for file in files:
        if file.suffix == ".safetensors":
            yield from _iter_safetensors(file, device, converting)
        else:
            yield from _iter_torch_bin(file)


def _open_safetensors(file: Path, device: str, converting: bool):
    """(handle, file_mapped): pread (safetensors >= 0.8) when converting, else zero-copy mmap."""
    if converting:
        try:
            return safe_open(str(file), framework="pt", device=device, backend="pread"), False
        except TypeError:
            pass
    return safe_open(str(file), framework="pt", device=device), device == "cpu"


def _iter_safetensors(file: Path, device, converting: bool) -> Iterator[tuple[str, torch.Tensor, Path, bool]]:
    try:
        handle, mapped = _open_safetensors(file, str(device), converting)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{file}: cannot read safetensors file ({exc})") from None
    with handle:
        for name in handle.keys():
            if not name.endswith(IGNORED_SUFFIXES):
                yield name, handle.get_tensor(name), file, mapped


def _iter_torch_bin(file: Path) -> Iterator[tuple[str, torch.Tensor, Path, bool]]:
    mapped = True
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        mapped = False
        if "zip" not in str(exc).lower() and "mmap" not in str(exc).lower():
            raise UserError(f"{file}: cannot read PyTorch weights ({exc})") from None
        log.warning("%s is in the legacy (pre-zip) torch format and cannot be memory-mapped; reading it whole", file)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc2:
            raise UserError(f"{file}: cannot read PyTorch weights ({exc2})") from None
    except Exception as exc:
        raise UserError(f"{file}: cannot read PyTorch weights ({exc})") from None
    if not isinstance(state, dict):
        raise UserError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    for name in list(state):
        tensor = state.pop(name)  # drop our reference as we go
        if not name.endswith(IGNORED_SUFFIXES):
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"{file}: entry {name} is a {type(tensor).__name__}, not a tensor")
            yield name, tensor, file, mapped


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Let the kernel drop the file pages behind a memory-mapped tensor we have copied and no longer need.

    Without this, a converted (e.g. fp32 -> bf16) checkpoint keeps every source page resident until
    the whole file is unmapped, which costs a second copy of the weights. Only for private mappings
    of a file that are never written: dropped pages would simply be read again from the file.
    Linux only; a no-op elsewhere.
    """
    if sys.platform != "linux" or tensor.device.type != "cpu" or _libc() is None:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None


def read_checked_tensors(
    path: str | Path,
    expected: dict[str, torch.Size],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config_name: str = "config.json",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the tensors of a HF directory (or one weights file), each checked against `expected`.

    With `dtype` None the checkpoint's own floating dtype is kept (a file mixing dtypes is unified to
    its first one). Raises UserError for unknown, duplicated, mis-shaped or (at the end) missing tensors.
    """
    path = Path(path)
    files = [path] if path.is_file() else weight_files(path)
    seen: set[str] = set()
    target = dtype
    for name, source, file, mapped in iter_tensors(files, device, converting=dtype is not None):
        tensor = source
        if name not in expected:
            raise UserError(f"{file}: unexpected tensor {name} (shape {list(tensor.shape)}); this is not a "
                            f"checkpoint matching {config_name}")
        if name in seen:
            raise UserError(f"{file}: tensor {name} appears twice in the checkpoint")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise UserError(f"{file}: tensor {name} has shape {list(tensor.shape)} but {config_name} implies "
                            f"{list(expected[name])}; fix {config_name} or use the matching weights")
        if not tensor.is_floating_point():
            raise UserError(f"{file}: tensor {name} has dtype {tensor.dtype}; weights must be floating point")
        if target is None:
            target = tensor.dtype
        tensor = tensor.to(device=device, dtype=target)
        if mapped and tensor.data_ptr() != source.data_ptr():
            release_mapped_pages(source)
        del source
        seen.add(name)
        yield name, tensor
    missing = [name for name in expected if name not in seen]
    if missing:
        shown = ", ".join(f"{n} {list(expected[n])}" for n in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise UserError(f"{path}: missing tensor(s) {shown}{more}")


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in model.named_parameters()}


def assign_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter by `tensor` without copying it."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))


def load_into(model: nn.Module, path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> None:
    """Fill a model built on the meta device from a HF directory's weights, tensor by tensor."""
    for name, tensor in read_checked_tensors(path, expected_shapes(model), device, dtype):
        assign_parameter(model, name, tensor)
