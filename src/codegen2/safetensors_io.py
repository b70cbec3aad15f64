"""The one reader and writer of safetensors files, and the one set of checks for tensors loaded into a model.

Every weights file codegen2 reads (a run's checkpoint, a Hugging Face directory, an int8 directory) goes
through `check_tensors`: a tensor the model does not have, one that appears twice, a wrong shape or dtype,
or (at the end) a tensor the model needs but the file lacks is a one-line UserError naming the file and the
tensor. A truncated or garbled file is refused from its header before any tensor is read.

Tensors are memory-mapped (safetensors' mmap), so a tensor kept as it is stored is paged in from the file
once and never copied; with a dtype conversion safetensors reads each tensor with pread instead, so only one
unconverted tensor exists at a time. `release_mapped_pages` drops the file pages of a tensor once copied.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError
from .fsutil import umask


class TensorSpec(NamedTuple):
    """What a model expects under one name: its shape, and its dtype (None: any floating dtype)."""
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


def tensor_specs(tensors: Mapping[str, torch.Tensor], exact_dtype: bool = False) -> dict[str, TensorSpec]:
    """The specs of a model's tensors (e.g. `model.named_parameters()` of a meta-built model)."""
    return {name: TensorSpec(tuple(t.shape), t.dtype if exact_dtype else None) for name, t in tensors.items()}


# ------------------------------------------------------------------------------------------- files
def file_problem(path: str | Path) -> str | None:
    """Why a safetensors file cannot be read whole (header or size), without loading its tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            header_len = int.from_bytes(head, "little")
            if header_len > size - 8:
                return "truncated (header cut short)"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated ({size:,} of {expected:,} bytes)"
    return None


def _open(path: Path, device: str, converting: bool):
    """(handle, file_mapped): pread (safetensors >= 0.8) when converting, else zero-copy mmap."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    problem = file_problem(path)
    if problem:
        raise UserError(f"{path}: {problem}; the file is damaged (an earlier checkpoint may be intact)")
    try:
        if converting:
            try:
                return safe_open(str(path), framework="pt", device=device, backend="pread"), False
            except TypeError:
                pass
        return safe_open(str(path), framework="pt", device=device), device == "cpu"
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def iter_file(path: str | Path, device: str | torch.device = "cpu", converting: bool = False,
              skip: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor, Path, bool]]:
    """Yield (name, tensor, file, file_mapped) one tensor at a time; names ending in `skip` are not read.

    `file_mapped` says the tensor's memory is a private mapping of the file (clean pages, never written).
    """
    path = Path(path)
    handle, mapped = _open(path, str(device), converting)
    with handle:
        for name in handle.keys():
            if not (skip and name.endswith(skip)):
                yield name, handle.get_tensor(name), path, mapped


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


# ------------------------------------------------------------------------------------------ checks
def _check_one(name: str, tensor: torch.Tensor, file: Path, expected: Mapping[str, TensorSpec], seen: set[str],
               source: str) -> None:
    if name not in expected:
        raise UserError(f"{file}: unexpected tensor {name} (shape {list(tensor.shape)}); this is not a "
                        f"checkpoint matching {source}")
    if name in seen:
        raise UserError(f"{file}: tensor {name} appears twice in the checkpoint")
    spec = expected[name]
    if tuple(tensor.shape) != tuple(spec.shape):
        raise UserError(f"{file}: tensor {name} has shape {list(tensor.shape)} but {source} implies "
                        f"{list(spec.shape)}; fix {source} or use the matching weights")
    if spec.dtype is None and not tensor.is_floating_point():
        raise UserError(f"{file}: tensor {name} has dtype {tensor.dtype}; weights must be floating point")
    if spec.dtype is not None and tensor.dtype != spec.dtype:
        raise UserError(f"{file}: tensor {name} has dtype {tensor.dtype} but {source} implies {spec.dtype}")


def require_all(expected: Mapping[str, Any], present: Iterable[str], where: str = "") -> None:
    """A UserError naming `where` (a file; may be empty) and the first tensors of `expected` (specs or
    tensors, anything with a shape) not in `present`."""
    present = set(present)
    missing = [name for name in expected if name not in present]
    if missing:
        shown = ", ".join(f"{n} {list(expected[n].shape)}" for n in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}the weights lack {len(missing)} tensor(s) of this model (missing tensor(s) "
                        f"{shown}{more}); they come from another model or a damaged checkpoint")


def check_tensors(items: Iterable[tuple[str, torch.Tensor, Path, bool]], expected: Mapping[str, TensorSpec],
                  where: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  source: str = "config.json", copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from `iter_file`-style items, each checked against `expected` and moved to `device`.

    Floating tensors (specs without a dtype) become `dtype`; with None, the first tensor's dtype (a file
    mixing dtypes is unified). `copy` always copies (the source's file pages are dropped behind it); else a
    tensor kept as stored stays memory-mapped. After the last item, a missing tensor names `where`.
    """
    seen: set[str] = set()
    target = dtype
    for name, source_tensor, file, mapped in items:
        _check_one(name, source_tensor, file, expected, seen, source)
        if expected[name].dtype is None:
            target = target or source_tensor.dtype
            tensor = source_tensor.to(device=device, dtype=target, copy=copy)
        else:
            tensor = source_tensor.to(device=device, copy=copy)
        if mapped and tensor.data_ptr() != source_tensor.data_ptr():
            release_mapped_pages(source_tensor)
        del source_tensor
        seen.add(name)
        yield name, tensor
    require_all(expected, seen, str(where))


def read_checked(path: str | Path, expected: Mapping[str, TensorSpec], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, source: str = "config.json",
                 copy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the tensors of one safetensors file, checked (see `check_tensors`)."""
    items = iter_file(path, device, converting=dtype is not None)
    return check_tensors(items, expected, path, device, dtype, source, copy)


def read_file(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as stored (no model to check them against)."""
    return {name: tensor for name, tensor, _, _ in iter_file(path, device)}


# ------------------------------------------------------------------------------------------ writer
def write_file(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with the file mode every other file gets (it creates files 0600).

    Not atomic by itself: callers write into a staging directory (`fsutil.atomic_directory`)."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as exc:  # its I/O failures carry only a message: give callers the OSError it names
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
    os.chmod(path, 0o666 & ~umask())
