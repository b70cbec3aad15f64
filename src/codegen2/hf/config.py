"""Hugging Face config.json -> codegen2 `ModelConfig`, whatever the architecture.

config.json's `model_type` picks the architecture (`Architecture.hf.model_type`); that architecture's
mapping turns the keys into a ModelConfig (for CodeGen it also decides the qkv grouping, see
`models/codegen/hf.py`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import UserError
from ..models import ARCHITECTURES
from ..models.spec import Architecture

log = logging.getLogger("codegen2")

CONFIG_FILE = "config.json"


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The raw config.json of a Hugging Face directory, checked to describe a model codegen2 can build."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a Hugging Face model directory with {CONFIG_FILE})")
    if not file.is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}; a Hugging Face model directory needs one next to its weights")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a JSON object")
    architecture_of(raw, file)  # each architecture's config_from_hf checks its own keys
    return raw


def architecture_of(raw: dict[str, Any], file: Path) -> Architecture:
    """The architecture whose HF mapping reads this config.json's `model_type`."""
    model_type = raw.get("model_type")
    for arch in ARCHITECTURES.values():
        if arch.hf.model_type == model_type:
            return arch
    known = ", ".join(repr(a.hf.model_type) for a in ARCHITECTURES.values())
    raise UserError(f"{file}: model_type is {model_type!r}, but only {known} are supported")


def model_config_from_raw(raw: dict[str, Any], path: Path, mp_num: int | None = None) -> ModelConfig:
    """ModelConfig of a checked config.json of directory `path`; `mp_num` overrides CodeGen's grouping."""
    file = path / CONFIG_FILE
    return architecture_of(raw, file).hf.config_from_hf(raw, file, {"mp_num": mp_num})


def load_hf_config(path: str | Path, mp_num: int | None = None) -> ModelConfig:
    """ModelConfig of a Hugging Face directory (for CodeGen with its qkv grouping decided and logged)."""
    return model_config_from_raw(read_hf_config(path), Path(path), mp_num)
