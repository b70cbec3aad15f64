"""Attention masks: causal, prefix-LM (bidirectional prefix) and document masking for packed sequences.

One function builds every mask the model needs, so training (packed documents, prefix-LM) and
decoding (a KV cache, left-padded prompt batches) share the same rule (DESIGN §1):

    allowed[i, j] = (j <= i  or  (i < P and j < P))  and  doc[i] == doc[j]  and  key_valid[j]

Positions are absolute: with a KV cache, query i of the current chunk sits at `past_len + i`.
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
) -> torch.Tensor | None:
    """Return a boolean mask [B, 1, T, past_len + T] (True = may attend), or None for plain causal.

    doc_ids: [B, T] document index of each query position (keys of the cache use `past_doc_ids`).
    prefix_len: [B] length P of the bidirectional prefix, in absolute positions.
    key_valid: [B, past_len + T] False for padding keys (left-padded prompts).
    """
    if doc_ids is None and prefix_len is None and key_valid is None:
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
