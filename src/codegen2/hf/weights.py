"""Read Hugging Face weight files frugally and check them against the model they are for.

Supported layouts: `model.safetensors`, `pytorch_model.bin`, and either one sharded with its
`*.index.json`. safetensors files are read by `codegen2.safetensors_io`, PyTorch ones memory-mapped with
`torch.load(mmap=True)`, and every tensor goes through `safetensors_io.check_tensors`. Together with a
model built on the meta device, peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..safetensors_io import TensorSpec, check_tensors, iter_file, tensor_specs

log = logging.getLogger("codegen2")

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# Non-persistent attention buffers that old transformers versions saved alongside the weights.
IGNORED_SUFFIXES = (".attn.causal_mask", ".attn.masked_bias", ".attn.bias")
# A tied output projection is the embedding table (transformers' names for LLaMA, Qwen2 and StarCoder2).
TIED_HEAD, TIED_TO = "lm_head.weight", "model.embed_tokens.weight"


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
            yield from iter_file(file, device, converting, skip=IGNORED_SUFFIXES)
        else:
            yield from _iter_torch_bin(file)


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


def read_checked_tensors(
    path: str | Path,
    expected: dict[str, TensorSpec],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config_name: str = "config.json",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the tensors of a HF directory (or one weights file), each checked against `expected`
    (`safetensors_io.check_tensors`: unknown, duplicated, mis-shaped or, at the end, missing tensors).

    With `dtype` None the checkpoint's own floating dtype is kept (a file mixing dtypes is unified to
    its first one).
    """
    path = Path(path)
    files = [path] if path.is_file() else weight_files(path)
    items = iter_tensors(files, device, converting=dtype is not None)
    if TIED_HEAD not in expected and TIED_TO in expected:
        items = drop_tied_head(items, config_name)
    yield from check_tensors(items, expected, path, device, dtype, source=config_name)


def drop_tied_head(items: Iterator[tuple[str, torch.Tensor, Path, bool]],
                   config_name: str) -> Iterator[tuple[str, torch.Tensor, Path, bool]]:
    """Leave out a stored `lm_head.weight` of a tied model (some exports write the shared table twice); it must
    equal the embedding, else the file is not what config.json says (tie_word_embeddings)."""
    head = table = None
    for item in items:
        name, tensor, file, _ = item
        if name == TIED_HEAD:
            head = (tensor, file)
        else:
            if name == TIED_TO:
                table = tensor
            yield item
        if head is not None and table is not None:
            if head[0].shape != table.shape or not torch.equal(head[0], table.to(head[0].dtype)):
                raise UserError(f"{head[1]}: {TIED_HEAD} differs from {TIED_TO}, but {config_name} ties them "
                                f"(tie_word_embeddings); set it to false if the head is its own matrix")
            head = table = None


def expected_tensors(model: nn.Module) -> dict[str, TensorSpec]:
    """What a (meta-built) model expects from a weights file: each parameter's shape, any floating dtype."""
    return tensor_specs(dict(model.named_parameters()))


def assign_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter by `tensor` without copying it."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))


def load_into(model: nn.Module, path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> None:
    """Fill a model built on the meta device from a HF directory's weights, tensor by tensor."""
    for name, tensor in read_checked_tensors(path, expected_tensors(model), device, dtype):
        assign_parameter(model, name, tensor)
