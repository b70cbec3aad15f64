"""What every generation loop shares: the left-padded prefill, the one-token step, stop strings, cache copies.

`generation.sampling.generate_ids` (the commands and evaluation) and `serve.engine.BatchEngine` (continuous
batching) run on these, so a request served alone reproduces `codegen2 sample` token for token.

A cache here is either the model's `KVCache` (keys/values [layer, B, H, T, D]) or a `FastDecoder` (one
[B, H, T, D] tensor per layer): both expose `keys`, `values`, `valid` [B, T] and `length`, which is all
`copy_rows` needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..masks import slot_key_valid
from ..models.common import KVCache


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest occurrence of any stop string at or after `start`, or -1."""
    cut = -1
    for stop in stops:
        at = text.find(stop, start)
        if at != -1 and (cut == -1 or at < cut):
            cut = at
    return cut


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut text at the earliest occurrence of any stop string."""
    cut = first_stop(text, stops)
    return text if cut == -1 else text[:cut]


def prefill(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, capacity: int | None = None,
            bidirectional: bool = False) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Run prompts as one left-padded batch into a new `KVCache` of `capacity` columns (default: the longest).

    Padding keys are masked and positions count from each prompt's first real token, so a prompt gives the
    same logits alone or in a batch. Returns the cache, the last logits [B, vocab] and the next positions [B].
    `bidirectional`: the whole prompt attends both ways (a prefix-LM model).
    """
    param = next(model.parameters())
    batch, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    valid = torch.zeros(batch, longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        valid[row, longest - len(prompt):] = True
    input_ids, valid = input_ids.to(param.device), valid.to(param.device)
    positions = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
    cache = KVCache(model.config, batch, capacity or longest, device=param.device, dtype=param.dtype)
    cache.valid[:, :longest] = valid
    cache.has_padding = bool((~valid).any())
    prefix_len = torch.full((batch,), longest, device=param.device) if bidirectional else None
    logits = model(input_ids, position_ids=positions, prefix_len=prefix_len, cache=cache, last_only=True)[:, -1]
    return cache, logits, positions[:, -1] + 1


def step(model: torch.nn.Module, cache, tokens: torch.Tensor, next_pos: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Logits [B, vocab] after feeding one token per row; the cache grows by one column.

    With a `KVCache` the model's forward runs at `next_pos` (the caller advances it); a `FastDecoder` keeps
    its own positions, and attends from column `first` on (no row sees an earlier one).
    """
    if isinstance(cache, KVCache):
        return model(tokens[:, None], position_ids=next_pos[:, None], cache=cache)[:, -1]
    return cache.step(tokens, first)


def copy_rows(dest, dest_rows, src, src_rows, first: int, end: int) -> int:
    """Copy rows `src_rows` of `src`, columns [first, src.length), into rows `dest_rows` of `dest`, ending at
    column `end` (right-aligned); the columns before them become padding. Returns where they start in `dest`.

    Rows may be an int, a slice or an index tensor. The columns after `end` keep their validity: a row
    decoding there writes them as it goes.
    """
    lo = end - (src.length - first)
    for layer in range(len(dest.keys)):
        dest.keys[layer][dest_rows, :, lo:end] = src.keys[layer][src_rows, :, first:src.length]
        dest.values[layer][dest_rows, :, lo:end] = src.values[layer][src_rows, :, first:src.length]
    dest.valid[dest_rows, :end] = slot_key_valid(end, lo, dest.valid.device)  # before `lo`: not this row's
    dest.valid[dest_rows, lo:end] = src.valid[src_rows, first:src.length]
    return lo


def set_filled(cache, length: int) -> None:
    """Declare the first `length` columns of `cache` filled (after `copy_rows`); the next step writes column
    `length`."""
    cache.length = length
    if isinstance(cache, KVCache):
        cache.has_padding = bool((~cache.valid[:, :length]).any())
    else:
        cache.col.fill_(length)
