"""Objectives: span corruption, FIM, causal, prefix-LM, mixture and determinism.

Round trips are checked both with the module's decoders and with a naive list-based decoder written
here, so an encoder and decoder that are wrong in the same way still fail.
"""

import dataclasses
import math

import numpy as np
import pytest

from codegen2.config import ObjectiveConfig
from codegen2.errors import UserError
from codegen2.objectives import (
    OBJECTIVE_CODES,
    SpecialIds,
    choose_objective,
    codegen2_special_ids,
    decode_fim,
    decode_span_corruption,
    fim_pieces,
    fim_transform,
    make_example,
    min_seq_len,
    objective_rng,
    span_corrupt,
    span_corrupt_pieces,
    split_documents,
)

EOT, SEP, EOM = 0, 1, 2
SPECIAL = SpecialIds(eot=EOT, sep=SEP, eom=EOM, masks=tuple(range(3, 35)))  # <mask_1..32> = 3..34
FIRST_TEXT_ID = 40  # document tokens are drawn from [40, 200): never a special id


def naive_span_decode(tokens, special=SPECIAL):
    """Reference: body = tokens up to the first (eot, sep); each <mask_k> in it is replaced by span k."""
    toks = [int(t) for t in tokens]
    cut = next(i for i in range(len(toks) - 1) if toks[i] == special.eot and toks[i + 1] == special.sep)
    body, tail = toks[: cut + 1], toks[cut + 2:]
    spans, current = {}, None
    for tok in tail:
        if current is None:
            current = special.masks.index(tok)
            spans[current] = []
        elif tok == special.eom:
            current = None
        else:
            spans[current].append(tok)
    assert current is None, "span section does not end with <eom>"
    out = []
    for tok in body:
        out.extend(spans.pop(special.masks.index(tok)) if tok in special.masks else [tok])
    assert not spans, "spans without a sentinel in the body"
    return out


def random_doc(rng, n, with_eot):
    doc = rng.integers(FIRST_TEXT_ID, 200, size=n)
    return np.concatenate([doc, [EOT]]) if with_eot else doc


def random_cfg(rng, **overrides):
    lo = rng.uniform(0.01, 0.6)
    span_min = int(rng.integers(1, 6))
    values = dict(
        corruption_ratio_min=lo,
        corruption_ratio_max=rng.uniform(lo, 0.95),
        span_len_min=span_min,
        span_len_max=span_min + int(rng.integers(0, 20)),
        max_spans=int(rng.integers(1, 40)),
        min_doc_tokens=int(rng.integers(0, 10)),
    )
    values.update(overrides)
    cfg = ObjectiveConfig(**values)
    cfg.validate()
    return cfg


def packed_chunk(rng, seq_len, mean_doc=40):
    """seq_len + 1 tokens of a packed stream: documents of random length, each ended by eot."""
    parts, total = [], 0
    while total < seq_len + 1:
        doc = random_doc(rng, int(rng.integers(0, 2 * mean_doc)), True)
        parts.append(doc)
        total += len(doc)
    return np.concatenate(parts)[: seq_len + 1]


# ---------------------------------------------------------------------------------------------
# Span corruption of one document


def test_span_corruption_round_trips_10000_documents():
    rng = np.random.default_rng(0)
    cfgs = [random_cfg(rng) for _ in range(50)]
    corrupted_count = 0
    for trial in range(10_000):
        cfg = cfgs[trial % len(cfgs)]
        n_masks = int(rng.integers(1, 33))
        special = dataclasses.replace(SPECIAL, masks=SPECIAL.masks[:n_masks])
        doc = random_doc(rng, int(rng.integers(0, 120)), with_eot=bool(rng.random() < 0.8))
        out = span_corrupt(doc, rng, cfg, special, budget=10_000)
        n = len(doc) - int(len(doc) > 0 and doc[-1] == EOT)
        if n < max(cfg.min_doc_tokens, 2):
            np.testing.assert_array_equal(out, doc)
            continue
        corrupted_count += 1
        body_end = int(np.flatnonzero(out == SEP)[0])  # position of <sep>
        body = out[:body_end]
        mask_pos = np.flatnonzero(np.isin(body, special.masks))
        k = len(mask_pos)
        assert 1 <= k <= min(cfg.max_spans, n_masks), trial
        assert list(body[mask_pos]) == list(special.masks[:k]), "sentinels numbered 1..k in order"
        assert np.all(np.diff(mask_pos) >= 2), "two spans must never be adjacent"
        assert body[-1] == EOT and EOT not in body[:-1], "the document's eot is never masked"
        assert len(out) == len(doc) + 3 * k + (1 if doc[-1] == EOT else 2)
        # span lengths: at most span_len_max; only the last may fall below span_len_min
        lengths = [int(e - s - 1) for s, e in zip(np.flatnonzero(np.isin(out[body_end:], special.masks)),
                                                   np.flatnonzero(out[body_end:] == EOM))]
        assert len(lengths) == k and all(1 <= x <= cfg.span_len_max for x in lengths)
        assert all(x >= cfg.span_len_min for x in lengths[:-1])
        expected = np.concatenate([doc[:n], [EOT]])
        assert naive_span_decode(out, special) == expected.tolist(), trial
        np.testing.assert_array_equal(decode_span_corruption(out, special), expected)
    assert corrupted_count > 7000


def test_masked_fraction_follows_the_drawn_ratio():
    rng = np.random.default_rng(1)
    cfg = ObjectiveConfig(corruption_ratio_min=0.1, corruption_ratio_max=0.3, span_len_min=2, span_len_max=10,
                          max_spans=200)
    special = dataclasses.replace(SPECIAL, masks=tuple(range(1000, 1200)))
    n, fractions, span_lengths = 1000, [], []
    for _ in range(400):
        out = span_corrupt(random_doc(rng, n, True), rng, cfg, special, budget=10_000)
        k = int(np.isin(out, special.masks).sum()) // 2
        # (n - masked) + k sentinels + <|endoftext|> <sep> + k (<mask_i> ... <eom>) pairs + masked
        assert len(out) == n + 3 * k + 2
        tail = out[int(np.flatnonzero(out == SEP)[0]) + 1:]
        total = len(tail) - 2 * k
        fractions.append(total / n)
        ends = np.flatnonzero(tail == EOM)
        starts = np.flatnonzero(np.isin(tail, special.masks))
        span_lengths.extend((ends - starts - 1)[:-1].tolist())  # the last one is clipped to the target
    fractions = np.array(fractions)
    assert fractions.min() >= 0.1 - 0.5 / n and fractions.max() <= 0.3 + 0.5 / n
    assert abs(fractions.mean() - 0.2) < 0.01  # uniform ratio: sd of the mean ~ 0.058 / 20
    assert min(span_lengths) >= 2 and max(span_lengths) <= 10
    assert abs(np.mean(span_lengths) - 6.0) < 0.15  # uniform lengths on [2, 10]


def test_span_placement_is_uniform_over_valid_layouts():
    # 4 content tokens, ratio fixed at 0.5 -> target 2 masked tokens, spans of length 1: two spans with
    # a gap between them, so exactly three layouts: masked positions {0,2}, {0,3}, {1,3}.
    cfg = ObjectiveConfig(corruption_ratio_min=0.5, corruption_ratio_max=0.5, span_len_min=1, span_len_max=1,
                          min_doc_tokens=2)
    rng = np.random.default_rng(2)
    doc = np.array([50, 51, 52, 53, EOT])
    counts = {}
    for _ in range(3000):
        out = span_corrupt(doc, rng, cfg, SPECIAL, budget=100)
        body = out[: int(np.flatnonzero(out == EOT)[0])]
        layout = tuple(np.flatnonzero(np.isin(body, SPECIAL.masks)))
        counts[layout] = counts.get(layout, 0) + 1
    assert set(counts) == {(0, 2), (0, 3), (1, 3)}, counts  # body positions (the spans are 1 token)
    for c in counts.values():
        assert abs(c - 1000) < 5 * math.sqrt(3000 * (1 / 3) * (2 / 3))


def test_span_corrupt_truncates_to_budget():
    rng = np.random.default_rng(3)
    cfg = ObjectiveConfig(min_doc_tokens=8, max_spans=5, span_len_max=20)
    truncated = 0
    for _ in range(500):
        doc = random_doc(rng, int(rng.integers(1, 200)), bool(rng.random() < 0.5))
        budget = int(rng.integers(0, 250))
        out = span_corrupt(doc, rng, cfg, SPECIAL, budget=budget)
        assert len(out) <= budget
        if SEP not in out:  # left raw: the whole document if it fits, else its head filling the budget
            np.testing.assert_array_equal(out, doc[:budget])
            continue
        decoded = decode_span_corruption(out, SPECIAL)
        k = int(np.isin(out, SPECIAL.masks).sum()) // 2
        has_eot = doc[-1] == EOT
        if len(out) == len(doc) + 3 * k + (1 if has_eot else 2):  # the whole piece
            np.testing.assert_array_equal(decoded, doc if has_eot else np.append(doc, EOT))
        else:  # a head of it, using the budget up to less than one more span's overhead
            truncated += 1
            m = len(decoded) - 1
            assert m < len(doc) - has_eot
            np.testing.assert_array_equal(decoded[:m], doc[:m])
            assert budget - 3 <= len(out) <= budget
    assert truncated > 50


# ---------------------------------------------------------------------------------------------
# File level


def check_span_pieces(chunk, pieces):
    originals = split_documents(chunk, EOT)
    assert len(pieces) <= len(originals)
    for i, (orig, out) in enumerate(zip(originals, pieces)):
        last = i == len(pieces) - 1
        if SEP not in out:
            np.testing.assert_array_equal(out, orig if not last else orig[: len(out)])
            continue
        decoded = decode_span_corruption(out, SPECIAL)
        assert naive_span_decode(out) == decoded.tolist()
        if not last or (len(decoded) == len(orig) and orig[-1] == EOT):
            np.testing.assert_array_equal(decoded, orig)  # a whole piece decodes to its original
        else:  # the piece cut by the budget: a head of the original (its eot is the layout's)
            np.testing.assert_array_equal(decoded[:-1], orig[: len(decoded) - 1])
            assert len(decoded) - 1 < len(orig)
    return originals


def test_file_level_span_corruption_respects_documents_and_length():
    rng = np.random.default_rng(4)
    cfg = ObjectiveConfig(span_rate=1.0, max_spans=6, span_len_max=12)
    padded = 0
    for trial in range(400):
        seq_len = int(rng.integers(min_seq_len(cfg), 300))
        chunk = packed_chunk(rng, seq_len, mean_doc=int(rng.integers(5, 80)))
        pieces = span_corrupt_pieces(chunk, np.random.default_rng(trial), cfg, SPECIAL)
        check_span_pieces(chunk, pieces)
        total = sum(map(len, pieces))
        assert total <= seq_len + 1
        ex = make_example(chunk, trial, 99, cfg, SPECIAL)
        assert ex.objective == "span"
        for arr in (ex.input_ids, ex.labels, ex.doc_ids):
            assert arr.shape == (seq_len,) and arr.dtype == np.int64
        ex_pieces = span_corrupt_pieces(chunk, _rng_after_choice(99, trial, cfg), cfg, SPECIAL)
        check_span_pieces(chunk, ex_pieces)
        seq = np.concatenate(ex_pieces)
        real = len(seq)
        padded += real < seq_len + 1
        full = np.concatenate([seq, np.full(seq_len + 1 - real, EOT)])
        np.testing.assert_array_equal(ex.input_ids, full[:-1])
        expected_labels = full[1:].copy()
        expected_labels[real - 1:] = -100
        np.testing.assert_array_equal(ex.labels, expected_labels)
        expected_docs = np.concatenate([np.full(len(p), i) for i, p in enumerate(ex_pieces)]
                                       + [np.full(seq_len + 1 - real, len(ex_pieces))])
        np.testing.assert_array_equal(ex.doc_ids, expected_docs[:-1])  # no span crosses a boundary
        assert ex.prefix_len == 0
    assert padded > 0  # the padding path was exercised


def _rng_after_choice(seed, index, cfg):
    rng = objective_rng(seed, index)
    choose_objective(rng, cfg)
    return rng


def test_file_level_fim_round_trips():
    rng = np.random.default_rng(5)
    cfg = ObjectiveConfig(span_rate=0.0, fim_rate=1.0, fim_spm_rate=0.5, min_doc_tokens=1)
    spm = psm = 0
    for trial in range(300):
        seq_len = int(rng.integers(min_seq_len(cfg), 300))
        chunk = packed_chunk(rng, seq_len, mean_doc=30)
        ex = make_example(chunk, trial, 5, cfg, SPECIAL)
        assert ex.objective == "fim" and ex.input_ids.shape == (seq_len,)
        pieces = fim_pieces(chunk, _rng_after_choice(5, trial, cfg), cfg, SPECIAL)
        seq = np.concatenate(pieces)
        np.testing.assert_array_equal(ex.input_ids[: min(len(seq), seq_len)], seq[:seq_len])
        originals = split_documents(chunk, EOT)
        for i, out in enumerate(pieces):
            decoded = decode_fim(out, SPECIAL)
            orig = originals[i]
            if out[0] in SPECIAL.masks[:2]:
                spm += out[0] == SPECIAL.masks[1]
                psm += out[0] == SPECIAL.masks[0]
                assert len(out) == len(decoded) + 4
            if i < len(pieces) - 1:
                np.testing.assert_array_equal(decoded, orig)
            else:
                np.testing.assert_array_equal(decoded, orig[: len(decoded)])
    assert spm > 200 and psm > 200 and abs(spm - psm) < 0.2 * (spm + psm)


def test_fim_transform_formats():
    rng = np.random.default_rng(6)
    m1, m2 = SPECIAL.masks[:2]
    for trial in range(2000):
        with_eot = bool(rng.random() < 0.5)
        doc = random_doc(rng, int(rng.integers(0, 40)), with_eot)
        spm = bool(trial % 2)
        out = fim_transform(doc, rng, SPECIAL, spm=spm)
        sep, eom = int(np.flatnonzero(out == SEP)[0]), int(np.flatnonzero(out == EOM)[0])
        content = doc[:-1] if with_eot else doc
        inner = int(np.flatnonzero(out == (m1 if spm else m2))[0])
        first, second = out[1:inner], out[inner + 1:sep]
        prefix, suffix = (second, first) if spm else (first, second)
        middle = out[sep + 1:eom]
        assert out[0] == (m2 if spm else m1)
        np.testing.assert_array_equal(np.concatenate([prefix, middle, suffix]), content)
        assert out[eom + 1:].tolist() == ([EOT] if with_eot else [])
        np.testing.assert_array_equal(decode_fim(out, SPECIAL), doc)


def test_fim_cut_points_are_uniform():
    # two cut points uniform on [0, n], sorted: compare mean part lengths with exact enumeration
    n, rng = 10, np.random.default_rng(12)
    pairs = [sorted((a, b)) for a in range(n + 1) for b in range(n + 1)]
    want = np.mean([[i, j - i, n - j] for i, j in pairs], axis=0)
    got = []
    for _ in range(4000):
        out = fim_transform(random_doc(rng, n, True), rng, SPECIAL, spm=False)
        m2, sep = int(np.flatnonzero(out == SPECIAL.masks[1])[0]), int(np.flatnonzero(out == SEP)[0])
        got.append([m2 - 1, len(out) - sep - 3, sep - m2 - 1])  # prefix, middle, suffix lengths
    np.testing.assert_allclose(np.mean(got, axis=0), want, atol=0.15)


# ---------------------------------------------------------------------------------------------
# Causal, prefix-LM


def naive_doc_ids(chunk):
    ids, current = [], 0
    for tok in chunk:
        ids.append(current)
        current += tok == EOT
    return ids


def test_causal_labels_are_the_shifted_chunk():
    rng = np.random.default_rng(7)
    cfg = ObjectiveConfig(span_rate=0.0)
    for trial in range(50):
        chunk = packed_chunk(rng, 64, mean_doc=10).astype(np.uint16)  # token caches may be uint16
        ex = make_example(chunk, trial, 0, cfg, SPECIAL)
        assert ex.objective == "causal" and ex.prefix_len == 0
        np.testing.assert_array_equal(ex.input_ids, chunk[:-1])
        np.testing.assert_array_equal(ex.labels, chunk[1:])
        np.testing.assert_array_equal(ex.doc_ids, naive_doc_ids(chunk)[:-1])


@pytest.mark.parametrize("objective", ["causal", "span", "fim"])
def test_prefix_lm_labels_ignore_exactly_the_prefix(objective):
    rates = {"causal": (0.0, 0.0), "span": (1.0, 0.0), "fim": (0.0, 1.0)}[objective]
    cfg = ObjectiveConfig(span_rate=rates[0], fim_rate=rates[1], prefix_lm=True)
    plain = dataclasses.replace(cfg, prefix_lm=False)
    rng = np.random.default_rng(8)
    prefixes = []
    for trial in range(200):
        seq_len = int(rng.integers(40, 120))
        chunk = packed_chunk(rng, seq_len, mean_doc=30)
        ex = make_example(chunk, trial, 3, cfg, SPECIAL)
        ref = make_example(chunk, trial, 3, plain, SPECIAL)  # same draws up to the prefix
        np.testing.assert_array_equal(ex.input_ids, ref.input_ids)
        np.testing.assert_array_equal(ex.doc_ids, ref.doc_ids)
        assert ref.prefix_len == 0
        P = ex.prefix_len
        assert 1 <= P <= seq_len
        assert (ex.labels[:P] == -100).all()
        np.testing.assert_array_equal(ex.labels[P:], ref.labels[P:])
        assert (ex.doc_ids[:P] == 0).all(), "the prefix lies inside the first document"
        first = split_documents(chunk, EOT)[0]
        transformed_first = ex.input_ids[: int((ex.doc_ids == 0).sum())]
        if objective != "causal" and SEP in transformed_first:
            assert ex.input_ids[P - 1] == SEP and SEP not in ex.input_ids[: P - 1]
            if objective == "span":
                assert ex.input_ids[P - 2] == EOT  # the whole corrupted context
        else:
            assert P <= min(len(first), seq_len - 1)
            prefixes.append((P, min(len(first), seq_len - 1)))
    if objective == "causal":  # uniform in [1, hi]: the mean of (P - 1) / (hi - 1) is about 1/2
        ratios = [(p - 1) / (hi - 1) for p, hi in prefixes if hi > 1]
        assert abs(np.mean(ratios) - 0.5) < 0.08


# ---------------------------------------------------------------------------------------------
# Mixture and determinism


def test_make_example_is_deterministic_and_order_independent():
    cfg = ObjectiveConfig(span_rate=0.4, fim_rate=0.3, prefix_lm=True)
    rng = np.random.default_rng(9)
    chunks = [packed_chunk(rng, 96, mean_doc=25) for _ in range(60)]
    forward = [make_example(chunks[i], i, 17, cfg, SPECIAL) for i in range(60)]
    order = np.random.default_rng(10).permutation(60)
    backward = {}
    for i in order:
        make_example(chunks[(i + 7) % 60], int(i) + 1000, 17, cfg, SPECIAL)  # unrelated calls in between
        backward[int(i)] = make_example(chunks[i], int(i), 17, cfg, SPECIAL)
    for i, a in enumerate(forward):
        b = backward[i]
        assert a.objective == b.objective and a.prefix_len == b.prefix_len
        for field in ("input_ids", "labels", "doc_ids"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    other_seed = [make_example(chunks[i], i, 18, cfg, SPECIAL) for i in range(60)]
    assert any(not np.array_equal(a.input_ids, b.input_ids) for a, b in zip(forward, other_seed))
    assert {e.objective for e in forward} == set(OBJECTIVE_CODES)


def test_objective_frequencies_match_the_rates():
    cfg = ObjectiveConfig(span_rate=0.3, fim_rate=0.2)
    n = 20_000
    counts = {"causal": 0, "span": 0, "fim": 0}
    for i in range(n):
        counts[choose_objective(objective_rng(123, i), cfg)] += 1
    for name, p in (("span", 0.3), ("fim", 0.2), ("causal", 0.5)):
        assert abs(counts[name] / n - p) < 5 * math.sqrt(p * (1 - p) / n), counts
    chunk = np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + 65)
    for i in range(300):  # make_example uses exactly this choice
        assert make_example(chunk, i, 123, cfg, SPECIAL).objective == choose_objective(objective_rng(123, i), cfg)


def test_rng_depends_on_seed_and_index_separately():
    draws = {(s, i): objective_rng(s, i).random() for s in range(4) for i in range(4)}
    assert len(set(draws.values())) == len(draws)
    assert objective_rng(5, 6).random() == objective_rng(5, 6).random()


# ---------------------------------------------------------------------------------------------
# Helpers and bad input


def test_split_documents():
    tokens = np.array([5, 6, EOT, EOT, 7, EOT, 8, 9])
    assert [p.tolist() for p in split_documents(tokens, EOT)] == [[5, 6, EOT], [EOT], [7, EOT], [8, 9]]
    assert [p.tolist() for p in split_documents(np.array([5, EOT]), EOT)] == [[5, EOT]]


def test_codegen2_special_ids_match_the_published_tokenizer():
    special = codegen2_special_ids(899)
    assert (special.eot, special.sep, special.eom) == (50256, 50299, 50300)
    assert special.masks[0] == 51199 and special.masks[-1] == 50301


def test_too_short_seq_len_is_a_clear_error():
    cfg = ObjectiveConfig(span_rate=0.5, min_doc_tokens=8)
    need = min_seq_len(cfg)
    assert need == 12  # 8 content tokens + <mask_1> + <|endoftext|> <sep> <mask_1> <eom>, minus the shift
    with pytest.raises(UserError, match=rf"seq_len={need - 1}.*minimum is {need}"):
        make_example(np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + need), 0, 0, cfg, SPECIAL)
    # at the minimum, a document that fills the chunk is corrupted
    chunk = np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + need + 1)
    ok = dataclasses.replace(cfg, span_rate=1.0)
    ex = make_example(chunk, 0, 0, ok, SPECIAL)
    assert SEP in ex.input_ids and len(ex.input_ids) == need


def test_other_bad_input_is_a_clear_error():
    cfg = ObjectiveConfig(span_rate=0.5)
    chunk = np.arange(FIRST_TEXT_ID, FIRST_TEXT_ID + 65)
    with pytest.raises(UserError, match="no <mask_k> sentinels"):
        make_example(chunk, 0, 0, cfg, dataclasses.replace(SPECIAL, masks=()))
    with pytest.raises(UserError, match="1-D integer array"):
        make_example(chunk.astype(float), 0, 0, cfg, SPECIAL)
    with pytest.raises(UserError, match="distinct"):
        SpecialIds(eot=0, sep=0, eom=2, masks=(3,))
    with pytest.raises(UserError, match="malformed"):
        decode_span_corruption(np.array([50, SPECIAL.masks[0], EOT, SEP, SPECIAL.masks[0], 51]), SPECIAL)
    with pytest.raises(UserError, match="malformed"):
        decode_fim(np.array([SPECIAL.masks[0], 50, 51]), SPECIAL)
