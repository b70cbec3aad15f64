"""Attention masks: causal, prefix-LM (bidirectional prefix) and document masking for packed sequences.

One function builds every mask the model needs, so training (packed documents, prefix-LM) and
decoding (a KV cache, left-padded prompt batches) share the same rule (docs/design.md §1):

    allowed[i, j] = (j <= i  or  (i < P and j < P))  and  doc[i] == doc[j]  and  key_valid[j]
                    and  |i - j| < W                        (only with a sliding window W)

Positions are absolute: with a KV cache, query i of the current chunk sits at `past_len + i`. A sliding
window (StarCoder2's `sliding_window`) limits how far apart a query and a key may be: a causal query sees its
own key and the W - 1 before it (transformers' rule), and a bidirectional prefix longer than W is banded the
same way in both directions, so no position ever sees farther than W - 1 away. Distances count cache columns,
which equal position differences within a row (a row's tokens are contiguous, left padding before them).
"""

from __future__ import annotations

import torch


def build_attention_mask(
    doc_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    *,
    past_len: int = 0,
    key_valid: torch.Tensor | None = None,
    past_doc_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor | None:
    """Return a boolean mask [B, 1, T, past_len + T] (True = may attend), or None for plain causal.

    doc_ids: [B, T] document index of each query position (keys of the cache use `past_doc_ids`).
    prefix_len: [B] length P of the bidirectional prefix, in absolute positions.
    key_valid: [B, past_len + T] False for padding keys (left-padded prompts).
    window: W, the sliding window (None: unlimited).
    """
    if doc_ids is None and prefix_len is None and key_valid is None and window is None:
        return None
    if seq_len is None:
        if doc_ids is None:
            raise ValueError("seq_len is required when doc_ids is not given")
        seq_len = doc_ids.shape[1]
    if device is None:
        for t in (doc_ids, prefix_len, key_valid):
            if t is not None:
                device = t.device
                break
    total = past_len + seq_len
    query_pos = torch.arange(past_len, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None]  # [1, T, S]
    if prefix_len is not None:
        p = prefix_len.to(device).view(-1, 1, 1)
        allowed = allowed | ((query_pos[None] < p) & (key_pos[None] < p))
    if window is not None:
        allowed = allowed & ((query_pos - key_pos).abs() < window)[None]
    if doc_ids is not None:
        keys_doc = doc_ids if past_doc_ids is None else torch.cat([past_doc_ids, doc_ids], dim=1)
        if keys_doc.shape[1] != total:
            raise ValueError("doc ids of the cache and of the new tokens do not cover all keys")
        allowed = allowed & (doc_ids[:, :, None] == keys_doc[:, None, :])
    if key_valid is not None:
        # A padding query keeps its own key so that no softmax row is empty; its output is unused.
        diagonal = key_pos == query_pos
        allowed = allowed & (key_valid[:, None, :].to(device) | diagonal[None])
    return allowed[:, None]


def forward_attention_mask(doc_ids: torch.Tensor | None, prefix_len: torch.Tensor | None, seq_len: int,
                           device: torch.device, cache=None, window: int | None = None) -> torch.Tensor | None:
    """The mask a model's forward passes to SDPA for `seq_len` new tokens (after `cache.length` cached ones).

    None means "no explicit mask": plain causal over a fresh sequence, or one new token attending to every
    cached key (see `sdpa_is_causal`). Every architecture's forward calls this, so they share one rule;
    `window` is the model's sliding window (None: unlimited), which needs a mask once keys reach past it.
    """
    past = cache.length if cache is not None else 0
    windowed = window is not None and past + seq_len > window
    if doc_ids is not None or prefix_len is not None or windowed:
        key_valid = cache.valid[:, : past + seq_len] if cache is not None and cache.has_padding else None
        return build_attention_mask(doc_ids, prefix_len, seq_len, device, past_len=past, key_valid=key_valid,
                                    window=window if windowed else None)
    if cache is not None and seq_len == 1 and cache.has_padding:
        # One decoded token may see every cached key that is not padding (it is itself valid).
        return cache.valid[:, None, None, : past + 1]
    if cache is not None and (cache.has_padding or (past > 0 and seq_len > 1)):
        key_valid = cache.valid[:, : past + seq_len]
        return build_attention_mask(None, None, seq_len, device, past_len=past, key_valid=key_valid)
    return None


def sdpa_is_causal(seq_len: int, cache=None) -> bool:
    """With no explicit mask: causal over a fresh sequence; a single token (or a continuation) sees all keys.

    Call before the layer's keys are stored, i.e. while `cache.length` still counts only earlier tokens.
    """
    return seq_len > 1 and (cache is None or cache.length == 0)


def decode_step_bias(valid: torch.Tensor, col: torch.Tensor, dtype: torch.dtype,
                     window: int | None = None) -> torch.Tensor:
    """Additive mask [B, 1, 1, capacity] for one new token per row written at cache column `col`.

    The same rule as `forward_attention_mask` for one token: it sees the keys up to and including its own
    column that are not padding, and with a sliding `window` only the last `window` of them. Additive rather
    than boolean because the fused decode step attends with two matmuls and a softmax (SDPA's CPU kernel
    with a mask is slow for a single query).
    """
    columns = torch.arange(valid.shape[1], device=valid.device)
    seen = valid & (columns <= col)
    if window is not None:
        seen = seen & (columns > col - window)
    bias = torch.zeros(seen.shape, dtype=dtype, device=valid.device).masked_fill(~seen, float("-inf"))
    return bias[:, None, None, :]


def slot_key_valid(capacity: int, first: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Key columns [capacity] a row placed in a shared decode batch may attend to: its own, from `first` on.

    Continuous batching (serve/engine.py) writes a new row's prompt keys right-aligned at columns
    [first, length) of a slot another row may have held; the columns before `first` are someone else's or
    padding. Columns past `length` become the row's as it decodes; `decode_step_bias` hides the ones not
    written yet.
    """
    return torch.arange(capacity, device=device) >= first
