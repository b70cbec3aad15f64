"""Growing a model's vocabulary: the rows of tokens added to its tokenizer (CodeGen2's sentinels on a family's
tokenizer that lacks them, for span corruption).

The vocabulary tensors are the input embedding and, when untied, the output head (its weight and bias): the
modules outside the blocks whose rows are the vocabulary. A grown model keeps every existing row bitwise; the
rows of the added tokens start as the mean of the rows before them (the tokenizer's own tokens: a padded table's
spare rows are left out of the mean), the same for every run, so a resumed run rebuilds exactly what it started
from. A tied head is the embedding itself and stays tied.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from . import architecture, empty_model


def vocabulary_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input embedding and the untied output head of `model` by module path (the modules whose rows are the
    vocabulary, outside the decoder blocks)."""
    vocab = model.config.vocab_size
    inside = {id(m) for block in architecture(model.config).blocks(model) for m in block.modules()}
    found = {name: module for name, module in model.named_modules() if id(module) not in inside and (
        (isinstance(module, nn.Embedding) and module.num_embeddings == vocab)
        or (isinstance(module, nn.Linear) and module.out_features == vocab))}
    if not any(isinstance(m, nn.Embedding) for m in found.values()):
        raise UserError(f"this {model.config.arch} model has no input embedding of {vocab} rows to grow")
    return found


def vocabulary_tensors(cfg: ModelConfig) -> list[str]:
    """State-dict names of the tensors whose first dimension is the vocabulary."""
    model = empty_model(cfg)
    return [f"{path}.{name}" for path, module in vocabulary_modules(model).items()
            for name, tensor in module.named_parameters(recurse=False) if tensor.shape[0] == cfg.vocab_size]


@torch.no_grad()
def grow_vocabulary(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int,
                    rows: range) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """`state` (of a `cfg` model) with `vocab_size` rows in its vocabulary tensors, `rows` (the added tokens' ids)
    set to the mean of the rows before `rows.start`; returns the new state (other tensors shared) and config."""
    if vocab_size < cfg.vocab_size or rows.start < 1 or rows.stop > vocab_size:
        raise UserError(f"cannot grow the vocabulary from {cfg.vocab_size} to {vocab_size} rows with new rows "
                        f"{rows.start}..{rows.stop - 1}")
    grown = dict(state)
    for name in vocabulary_tensors(cfg):
        old = state[name]
        new = torch.empty((vocab_size, *old.shape[1:]), dtype=old.dtype, device=old.device)
        new[:cfg.vocab_size] = old
        new[cfg.vocab_size:] = 0
        new[rows.start:rows.stop] = old[:rows.start].double().mean(dim=0).to(old.dtype)
        grown[name] = new
    return grown, dataclasses.replace(cfg, vocab_size=vocab_size)


def grow_model(model: nn.Module, vocab_size: int, rows: range) -> nn.Module:
    """A new model like `model` with the vocabulary grown (`grow_vocabulary`), on the same device and dtypes."""
    state, cfg = grow_vocabulary(model.state_dict(), model.config, vocab_size, rows)
    grown = empty_model(cfg)
    grown.load_state_dict(state, strict=True, assign=True)
    grown.train(model.training)
    return grown
