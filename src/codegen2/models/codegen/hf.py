"""CodeGen <-> Hugging Face `codegen`: config.json keys, and the qkv grouping (mp_num) decision.

The published CodeGen2 config.json files do not say how the fused qkv projection is grouped: the
1B and 3.7B checkpoints use 8 groups, the 7B and 16B ones 4 (docs/design.md §3), and transformers assumes 4.
A wrong guess loads without any error and produces garbage, so the choice is made in one place,
from (in order) an explicit argument, an `mp_num` key in config.json (codegen2's export writes one),
or the published shapes, and it is always logged. Exports regroup qkv to transformers' 4 groups;
imports keep the checkpoint's own grouping, so imported weights are bitwise the HF tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ...config import ModelConfig
from ...errors import UserError
from ..spec import HFMapping
from .model import check_config

log = logging.getLogger("codegen2")

CONFIG_FILE = "config.json"
# (n_embd, n_layer) of the published checkpoints trained with 8 qkv groups: CodeGen2-1B and -3.7B.
EIGHT_GROUP_SHAPES = {(2048, 16): "CodeGen2-1B", (4096, 16): "CodeGen2-3.7B"}
TRANSFORMERS_MP_NUM = 4  # the grouping transformers' CodeGen implementation hard-codes

def regroup_qkv(weight: torch.Tensor, n_head: int, from_mp: int, to_mp: int) -> torch.Tensor:
    """Reorder the rows of a fused qkv weight [3 * d, d] from `from_mp` to `to_mp` groups.

    With mp_num groups the rows are, per group g, [Q | V | K] for heads g * n_head / mp_num onward
    (docs/design.md §3). The function is the same whatever the grouping; only the row order differs.
    """
    if weight.dim() != 2 or weight.shape[0] != 3 * weight.shape[1]:
        raise ValueError(f"qkv weight must have shape [3 * d, d], got {list(weight.shape)}")
    for mp in (from_mp, to_mp):
        if mp < 1 or n_head % mp:
            raise ValueError(f"mp_num={mp} does not divide n_head={n_head}")
    if from_mp == to_mp:
        return weight
    d = weight.shape[1]
    # [from_mp, (q, v, k), d / from_mp, d] -> [(q, v, k), all heads in order, d] -> [to_mp, (q, v, k), ...]
    per_kind = weight.reshape(from_mp, 3, d // from_mp, d).transpose(0, 1).reshape(3, d, d)
    return per_kind.reshape(3, to_mp, d // to_mp, d).transpose(0, 1).reshape(3 * d, d).contiguous()


def is_qkv(name: str) -> bool:
    return name.endswith(".attn.qkv_proj.weight")


def regroup_state_dict(state: dict[str, torch.Tensor], n_head: int, from_mp: int,
                       to_mp: int) -> dict[str, torch.Tensor]:
    """A state dict with every fused qkv weight regrouped (other tensors shared, not copied)."""
    return {name: regroup_qkv(t, n_head, from_mp, to_mp) if is_qkv(name) else t for name, t in state.items()}


def check_hf_config(raw: dict[str, Any], file: Path) -> None:
    """Refuse CodeGen config.json variants this implementation does not compute."""
    missing = [key for key in ("vocab_size", "n_embd", "n_layer", "n_head") if not isinstance(raw.get(key), int)]
    if missing:
        raise UserError(f"{file}: missing or non-integer key(s) {', '.join(missing)}")
    activation = raw.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        raise UserError(f"{file}: activation_function {activation!r} is not supported (CodeGen uses 'gelu_new')")
    if raw.get("tie_word_embeddings", False):
        raise UserError(f"{file}: tie_word_embeddings=true is not supported; CodeGen checkpoints have a "
                        f"separate lm_head")


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
    check_config(cfg)
    return cfg


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


def config_from_hf(raw: dict[str, Any], where: Path, overrides: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a checked config.json, with the qkv grouping decided (explicit `mp_num` override first)."""
    check_hf_config(raw, where)
    return model_config_from_hf(raw, choose_mp_num(raw, overrides.get("mp_num"), where.parent), where)


def state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Exported weights: qkv in the 4-group layout transformers hard-codes."""
    return regroup_state_dict(state, cfg.n_head, cfg.mp_num, TRANSFORMERS_MP_NUM)


def state_from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Imported weights keep the checkpoint's grouping (`cfg.mp_num` is that grouping): nothing to change."""
    return state


def convert_state(state: dict[str, torch.Tensor], source: ModelConfig, target: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` of a model shaped like `source`, regrouped to `target`'s mp_num."""
    if source.mp_num == target.mp_num:
        return state
    return regroup_state_dict(state, target.n_head, source.mp_num, target.mp_num)


HF_MAPPING = HFMapping(model_type="codegen", config_from_hf=config_from_hf, config_to_hf=hf_config_from_model,
                       state_to_hf=state_to_hf, state_from_hf=state_from_hf, convert_state=convert_state,
                       layout_fields=("mp_num",))
