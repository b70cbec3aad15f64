"""build_attention_mask against a naive double loop over docs/design.md §1's rule.

allowed[i, j] = (j <= i or (i < P and j < P)) and doc[i] == doc[j]
"""

import numpy as np
import pytest
import torch

from codegen2.masks import build_attention_mask


def naive_mask(doc_ids, prefix_len, batch, T, past_len=0, key_valid=None):
    """Python loops, absolute positions: query i sits at past_len + i, keys at 0 .. past_len + T - 1."""
    S = past_len + T
    out = np.zeros((batch, 1, T, S), dtype=bool)
    for b in range(batch):
        P = 0 if prefix_len is None else int(prefix_len[b])
        for qi in range(T):
            i = past_len + qi
            for j in range(S):
                ok = j <= i or (i < P and j < P)
                if doc_ids is not None:
                    ok = ok and doc_ids[b][i] == doc_ids[b][j]
                if key_valid is not None:
                    ok = ok and (bool(key_valid[b][j]) or j == i)
                out[b, 0, qi, j] = ok
    return out


def random_doc_ids(rng, batch, T):
    """Non-decreasing document ids per row, as packing produces them (some rows a single document)."""
    starts = rng.random((batch, T)) < rng.uniform(0.0, 0.4)
    starts[:, 0] = False
    return np.cumsum(starts, axis=1)


def test_plain_causal_is_none():
    assert build_attention_mask(None, None, 8) is None


@pytest.mark.parametrize("use_docs,use_prefix", [(True, False), (False, True), (True, True)])
def test_matches_naive_rule(use_docs, use_prefix):
    rng = np.random.default_rng(7)
    for trial in range(60):
        batch, T = int(rng.integers(1, 4)), int(rng.integers(1, 14))
        docs = random_doc_ids(rng, batch, T) if use_docs else None
        prefix = rng.integers(0, T + 1, size=batch) if use_prefix else None
        if prefix is not None and trial % 5 == 0:
            prefix[0] = [0, T][trial % 2]  # the edges: no prefix, all prefix
        got = build_attention_mask(
            None if docs is None else torch.tensor(docs, dtype=torch.long),
            None if prefix is None else torch.tensor(prefix, dtype=torch.long),
            T,
        )
        assert got.dtype == torch.bool and tuple(got.shape) == (batch, 1, T, T)
        np.testing.assert_array_equal(got.numpy(), naive_mask(docs, prefix, batch, T), err_msg=f"trial {trial}")
        assert got.diagonal(dim1=-2, dim2=-1).all()  # no query is left without a key


def test_matches_naive_rule_with_cache_and_padding():
    rng = np.random.default_rng(11)
    for trial in range(40):
        batch, T, past = int(rng.integers(1, 4)), int(rng.integers(1, 8)), int(rng.integers(0, 6))
        docs = random_doc_ids(rng, batch, past + T)
        prefix = rng.integers(0, past + T + 1, size=batch)
        valid = rng.random((batch, past + T)) < 0.8
        got = build_attention_mask(
            torch.tensor(docs[:, past:]), torch.tensor(prefix), T, past_len=past,
            key_valid=torch.tensor(valid), past_doc_ids=torch.tensor(docs[:, :past]),
        )
        want = naive_mask(docs, prefix, batch, T, past_len=past, key_valid=valid)
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"trial {trial}")


def test_decode_step_bias_matches_naive_rule_for_one_token():
    """The fused decode step's additive mask allows exactly what the naive rule allows for one new token."""
    rng = np.random.default_rng(3)
    from codegen2.masks import decode_step_bias

    batch, capacity, col = 3, 9, 5
    valid = torch.from_numpy(rng.random((batch, capacity)) < 0.7)
    valid[:, col] = True  # the new token's own column is always real
    bias = decode_step_bias(valid, torch.tensor(col), torch.float32)
    expected = naive_mask(None, None, batch, 1, past_len=col, key_valid=valid[:, : col + 1].numpy())
    assert bias.shape == (batch, 1, 1, capacity)
    assert torch.equal(torch.isfinite(bias[..., : col + 1]), torch.from_numpy(expected))
    assert torch.isinf(bias[..., col + 1:]).all()


class _Cache:
    def __init__(self, valid, length):
        self.valid, self.length, self.has_padding = valid, length, bool((~valid[:, :length]).any())


@pytest.mark.parametrize("past,T,pad", [(0, 5, False), (4, 1, True), (4, 3, True), (4, 3, False), (4, 1, False)])
def test_forward_attention_mask_matches_naive_rule(past, T, pad):
    """None (SDPA's implicit masks) or an explicit mask: either way what the naive rule allows."""
    from codegen2.masks import forward_attention_mask, sdpa_is_causal

    batch = 2
    valid = torch.ones(batch, past + T, dtype=torch.bool)
    if pad:
        valid[0, :2] = False
    cache = _Cache(valid, past) if past or pad else None
    mask = forward_attention_mask(None, None, T, torch.device("cpu"), cache)
    expected = naive_mask(None, None, batch, T, past_len=past, key_valid=valid.numpy())
    if mask is None:
        causal = torch.ones(T, past + T, dtype=torch.bool).tril(past) if sdpa_is_causal(T, cache) else \
            torch.ones(T, past + T, dtype=torch.bool)
        mask = causal.expand(batch, 1, T, past + T)
    assert torch.equal(mask.expand(batch, 1, T, past + T), torch.from_numpy(expected))
