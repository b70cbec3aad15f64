"""Hugging Face `codegen` config.json <-> codegen2 `ModelConfig`, and the qkv-grouping (mp_num) decision.

The published CodeGen2 config.json files do not say how the fused qkv projection is grouped: the
1B and 3.7B checkpoints use 8 groups, the 7B and 16B ones 4 (DESIGN §3), and transformers assumes 4.
A wrong guess loads without any error and produces garbage, so the choice is made in one place,
from (in order) an explicit argument, an `mp_num` key in config.json (codegen2's export writes one),
or the published shapes, and it is always logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import UserError

log = logging.getLogger("codegen2")

CONFIG_FILE = "config.json"
# (n_embd, n_layer) of the published checkpoints trained with 8 qkv groups: CodeGen2-1B and -3.7B.
EIGHT_GROUP_SHAPES = {(2048, 16): "CodeGen2-1B", (4096, 16): "CodeGen2-3.7B"}
TRANSFORMERS_MP_NUM = 4  # the grouping transformers' CodeGen implementation hard-codes
_REQUIRED_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The raw config.json of a Hugging Face directory, checked to describe a CodeGen model."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a Hugging Face model directory with {CONFIG_FILE})")
    if not file.is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}; a Hugging Face CodeGen directory needs one next to its weights")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type != "codegen":
        raise UserError(f"{file}: model_type is {model_type!r}, but only 'codegen' (CodeGen / CodeGen2) is supported")
    missing = [key for key in _REQUIRED_KEYS if not isinstance(raw.get(key), int)]
    if missing:
        raise UserError(f"{file}: missing or non-integer key(s) {', '.join(missing)}")
    activation = raw.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        raise UserError(f"{file}: activation_function {activation!r} is not supported (CodeGen uses 'gelu_new')")
    if raw.get("tie_word_embeddings", False):
        raise UserError(f"{file}: tie_word_embeddings=true is not supported; CodeGen checkpoints have a separate lm_head")
    return raw


def detect_mp_num(hf_config: dict[str, Any]) -> int:
    """The qkv grouping of a checkpoint: config.json's `mp_num` if present, else from the published shapes.

    CodeGen2-1B (n_embd 2048, 16 layers) and -3.7B (n_embd 4096, 16 layers) give 8; everything else
    (CodeGen2-7B/16B, CodeGen1, transformers' own saves) gives 4.
    """
    explicit = hf_config.get("mp_num")
    if explicit is not None:
        if not isinstance(explicit, int) or explicit < 1:
            raise UserError(f"{CONFIG_FILE}: mp_num must be a positive integer, got {explicit!r}")
        log.info("qkv grouping mp_num=%d (from the mp_num key of %s)", explicit, CONFIG_FILE)
        return explicit
    shape = (hf_config.get("n_embd"), hf_config.get("n_layer"))
    if shape in EIGHT_GROUP_SHAPES:
        log.info("qkv grouping mp_num=8 (n_embd=%d, n_layer=%d is the shape of %s, trained with 8 groups; "
                 "pass mp_num to override)", shape[0], shape[1], EIGHT_GROUP_SHAPES[shape])
        return 8
    log.info("qkv grouping mp_num=%d (the transformers layout; n_embd=%s, n_layer=%s is not a published "
             "8-group shape; pass mp_num to override)", TRANSFORMERS_MP_NUM, shape[0], shape[1])
    return TRANSFORMERS_MP_NUM


def choose_mp_num(hf_config: dict[str, Any], mp_num: int | None, where: str | Path) -> int:
    """An explicit `mp_num` wins over detection; either way it must divide n_head."""
    if mp_num is None:
        chosen = detect_mp_num(hf_config)
    else:
        recorded = hf_config.get("mp_num")
        if recorded is not None and recorded != mp_num:
            log.warning("%s: config.json records mp_num=%s but mp_num=%d was requested; using %d",
                        where, recorded, mp_num, mp_num)
        else:
            log.info("qkv grouping mp_num=%d (given explicitly)", mp_num)
        chosen = mp_num
    n_head = hf_config["n_head"]
    if chosen < 1 or n_head % chosen:
        raise UserError(f"{where}: mp_num={chosen} does not divide n_head={n_head}; the published checkpoints "
                        f"use mp_num=8 (1B, 3.7B) or mp_num=4 (7B, 16B)")
    return chosen


def model_config_from_hf(hf_config: dict[str, Any], mp_num: int, where: str | Path = CONFIG_FILE) -> ModelConfig:
    """Map HF codegen keys onto ModelConfig (n_positions is the context length; rotary_dim None = full head)."""
    n_embd, n_head = hf_config["n_embd"], hf_config["n_head"]
    if n_embd % n_head:
        raise UserError(f"{where}: n_embd={n_embd} is not divisible by n_head={n_head}")
    head_dim = n_embd // n_head
    rotary_dim = hf_config.get("rotary_dim", 64)
    if rotary_dim is None:
        rotary_dim = head_dim
    if rotary_dim > head_dim or rotary_dim % 2:
        raise UserError(f"{where}: rotary_dim={rotary_dim} must be even and at most head_dim={head_dim}")
    n_ctx = hf_config.get("n_positions") or hf_config.get("n_ctx") or 2048
    cfg = ModelConfig(
        vocab_size=hf_config["vocab_size"],
        n_layer=hf_config["n_layer"],
        n_embd=n_embd,
        n_head=n_head,
        rotary_dim=rotary_dim,
        n_ctx=int(n_ctx),
        n_inner=hf_config.get("n_inner"),
        mp_num=mp_num,
        layer_norm_eps=float(hf_config.get("layer_norm_epsilon", 1e-5)),
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )
    cfg.validate()
    return cfg


def load_hf_config(path: str | Path, mp_num: int | None = None) -> ModelConfig:
    """ModelConfig of a Hugging Face CodeGen directory, with its qkv grouping decided (and logged)."""
    raw = read_hf_config(path)
    return model_config_from_hf(raw, choose_mp_num(raw, mp_num, path), Path(path) / CONFIG_FILE)


def hf_config_from_model(cfg: ModelConfig, eot_id: int, dtype_name: str) -> dict[str, Any]:
    """config.json for transformers' CodeGenForCausalLM (no remote code), weights in the 4-group layout.

    `mp_num` is recorded so that codegen2 never mistakes an exported 1B-shaped model for the 8-group
    published one; transformers keeps unknown keys as plain attributes.
    """
    return {
        "architectures": ["CodeGenForCausalLM"],
        "model_type": "codegen",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_ctx,
        "n_ctx": cfg.n_ctx,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "rotary_dim": cfg.rotary_dim,
        "n_inner": cfg.n_inner,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": False,
        "dtype": dtype_name,
        "mp_num": TRANSFORMERS_MP_NUM,
    }
