"""The architecture seam: every part of codegen2 reaches a model family through its `Architecture` record."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from codegen2.config import SOURCE_FORMATS, ConfigError, ModelConfig
from codegen2.data.formats import READERS
from codegen2.metrics import flops_per_token
from codegen2.models import ARCHITECTURES, architecture, build_model
from codegen2.models.codegen.model import CodeGenModel
from codegen2.objectives import OBJECTIVE_CODES, OBJECTIVE_NAMES

TINY = dict(vocab_size=64, n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_ctx=32, mp_num=2)
# LLaMA and its kin rotate whole heads; exercise GQA and a window too
ARCH_SHAPE = {"llama": dict(rotary_dim=8, n_kv_head=2), "qwen2": dict(rotary_dim=8, n_kv_head=2),
              "starcoder2": dict(rotary_dim=8, n_kv_head=2, sliding_window=8)}


def test_registry_builds_the_configured_architecture():
    cfg = ModelConfig(**TINY)
    assert cfg.arch == "codegen" and architecture(cfg) is ARCHITECTURES["codegen"]
    model = build_model(cfg)
    assert isinstance(model, CodeGenModel)
    assert list(architecture(cfg).blocks(model)) == list(model.transformer.h)


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="model.arch='mamba' must be one of codegen"):
        architecture(ModelConfig(**TINY, arch="mamba"))


def test_codegen_refuses_llama_only_settings():
    with pytest.raises(ConfigError, match="n_kv_head"):
        architecture(ModelConfig(**TINY, n_kv_head=2))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        architecture(ModelConfig(**TINY, tie_word_embeddings=True))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_parameter_counts_match_the_built_model(name):
    cfg = ModelConfig(**{**TINY, **ARCH_SHAPE.get(name, {}), "arch": name})
    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        model = build_model(cfg)
    assert arch.count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2) - cfg.vocab_size * cfg.n_embd  # not wte
    assert arch.matmul_parameters(cfg) == matmul
    assert flops_per_token(cfg, 16) == 6.0 * matmul + 12.0 * cfg.n_layer * cfg.n_embd * 16


def test_a_new_architecture_needs_only_its_record(monkeypatch):
    """Register a variant under a new name: config validation, build_model and the FLOP count follow it."""
    variant = dataclasses.replace(ARCHITECTURES["codegen"], name="variant")
    monkeypatch.setitem(ARCHITECTURES, "variant", variant)
    cfg = ModelConfig(**{**TINY, "arch": "variant"})
    cfg.validate()
    assert isinstance(build_model(cfg), CodeGenModel)
    assert flops_per_token(cfg, 8) == flops_per_token(ModelConfig(**TINY), 8)


def test_names_listed_once():
    assert tuple(READERS) == SOURCE_FORMATS
    assert OBJECTIVE_NAMES == tuple(sorted(OBJECTIVE_CODES, key=OBJECTIVE_CODES.get))
