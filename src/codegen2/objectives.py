"""Training objectives: turn one packed chunk of raw tokens into one training example.

Everything here is a pure function of token ids (numpy integer arrays) and a numpy Generator.
The data loader takes a chunk of ``seq_len + 1`` tokens from a packed stream of documents (each
ending with ``<|endoftext|>``) and calls :func:`make_example`, which draws everything from
``objective_rng(seed, sample_index)`` alone, so a sample never depends on access order and a
resumed run sees exactly the same data (docs/design.md §1).

Objectives (chosen per sequence by :func:`choose_objective`)
-----------------------------------------------------------
causal
    ``input = chunk[:-1]``, ``labels = chunk[1:]``; every position is trained.

span (CodeGen2 file-level span corruption)
    The chunk is split after every ``<|endoftext|>`` into document pieces and each piece is
    corrupted on its own, so no span crosses a file boundary. A piece with spans ``s1..sk`` becomes::

        pre <mask_1> mid <mask_2> post <|endoftext|> <sep> <mask_1> s1 <eom> <mask_2> s2 <eom>

    A piece cut by the chunk end (no trailing ``<|endoftext|>``) still gets ``<|endoftext|> <sep>``
    before its spans, so decoding cannot tell the two apart: :func:`decode_span_corruption` always
    returns the document with its ``<|endoftext|>``. Numbering restarts at ``<mask_1>`` per piece.

    Sampling (bounds unpublished; ours, from :class:`~codegen2.config.ObjectiveConfig`): a ratio
    ``r ~ U[corruption_ratio_min, corruption_ratio_max]``; target masked total
    ``t = clip(round(r * n), 1, n - 1)`` for ``n`` content tokens (the trailing eot excluded);
    span lengths ``~ U[span_len_min, span_len_max]`` until their sum reaches ``t`` (the last span
    is clipped so the sum equals ``t`` exactly, which is the only way a span can be shorter than
    ``span_len_min``), at most ``min(max_spans, len(special.masks))`` spans. The spans are then
    placed uniformly at random among all layouts that keep at least one visible token between two
    spans (so two mask sentinels are never adjacent); trailing spans are dropped if they cannot fit.
    Pieces with fewer than ``max(min_doc_tokens, 2)`` content tokens stay unchanged.

fim (Bavarian et al. 2022, with CodeGen2's sentinels as markers, or in the model's own infill format)
    Per piece, two cut points ``~ U[0, n]`` split the content into prefix / middle / suffix::

        PSM: <mask_1> prefix <mask_2> suffix <sep> middle <eom> [<|endoftext|>]
        SPM: <mask_2> suffix <mask_1> prefix <sep> middle <eom> [<|endoftext|>]

    ``<|endoftext|>`` is kept only if the piece had one. Each piece is SPM with probability
    ``fim_spm_rate``. Pieces with fewer than ``max(min_doc_tokens, 1)`` content tokens stay unchanged.
    With ``SpecialIds.fim`` (a tokenizer without CodeGen2's sentinels: `native_special_ids`), the layout is the
    model's format from `codegen2.infill`, its middle closed by the format's end token (the end-of-text for
    Qwen2.5-Coder / StarCoder2 / DeepSeek-Coder, ``▁<EOT>`` for CodeLlama) so the model learns to stop::

        PSM: P prefix S suffix M middle end [<end-of-text>]     SPM: P S suffix M prefix middle end [...]

    A piece that starts with the family's BOS keeps it in front.

Fitting the sequence length (both span and fim)
-----------------------------------------------
The transformed sequence must be exactly ``seq_len + 1`` tokens. Pieces are transformed in order
against the space left (the *budget*). A piece that fits whole is kept whole. The first piece that
does not fit is truncated: it keeps the longest head whose transformed form fits the budget (it has
no eot then), or, if that head is too short to transform, its raw head fills the budget unchanged.
All later pieces, i.e. the tail of the raw chunk, are dropped. If the result is shorter than
``seq_len + 1`` it is padded with ``<|endoftext|>``; padding targets get label -100 and padding
positions get their own document id (one more than the last piece's).

Prefix-LM (``cfg.prefix_lm``)
-----------------------------
The first ``prefix_len`` input positions attend bidirectionally and get label -100:
span: up to and including the first piece's ``<sep>`` (its corrupted context); fim: up to and
including the first piece's ``<sep>`` (the format's middle marker M), the token that starts the middle;
causal, and span/fim when the first piece was left unchanged: a split drawn uniformly in ``[1, min(len(first piece),
seq_len - 1)]``. Without prefix-LM, ``prefix_len`` is 0.

The decoders assume that document tokens never contain the sentinel ids themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codegen2.config import ObjectiveConfig
from codegen2.errors import UserError
from codegen2.infill import FORMATS, InfillFormat, Specials, end_id

IGNORE_INDEX = -100
OBJECTIVE_CODES = {"causal": 0, "span": 1, "fim": 2}
OBJECTIVE_NAMES = tuple(OBJECTIVE_CODES)  # in code order: index i is the objective with code i
SPAN_FIXED_OVERHEAD = 2  # <|endoftext|> <sep> for a piece cut by the chunk end (worst case)
FIM_OVERHEAD = 4  # <mask_1> <mask_2> <sep> <eom>
_RNG_DOMAIN = 0x0B1EC7  # separates these streams from other users of the same seed


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens the objectives write (docs/design.md §3)."""

    eot: int  # <|endoftext|>, also the padding id
    sep: int | None  # <sep> (None: a tokenizer without CodeGen2's sentinels)
    eom: int | None  # <eom>
    masks: tuple[int, ...]  # masks[k-1] is the id of <mask_k>
    fim: tuple[int, int, int] | None = None  # the model's own FIM markers (prefix, suffix, middle), if not sentinels
    fim_end: int | None = None  # the token closing a middle in that format
    bos: int | None = None  # the family's BOS, kept first in a FIM piece

    def __post_init__(self) -> None:
        ids = tuple(i for i in (self.eot, self.sep, self.eom, *self.masks, *(self.fim or ())) if i is not None)
        if any(int(i) < 0 for i in ids):
            raise UserError(f"special token ids must be non-negative, got {ids[:3]} and masks {self.masks[:4]}...")
        if len(set(ids)) != len(ids):
            raise UserError("special token ids (eot, sep, eom, masks) must be distinct")
        object.__setattr__(self, "masks", tuple(int(m) for m in self.masks))

    @property
    def middle_marker(self) -> int | None:
        """The token after which a FIM middle starts (prefix-LM's bidirectional prefix ends there)."""
        return self.fim[2] if self.fim is not None else self.sep


def native_special_ids(specials: Specials, fmt: InfillFormat | str) -> SpecialIds:
    """Special ids for FIM training in the model's own infill format (a tokenizer without CodeGen2's sentinels)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    if fmt.layout not in ("psm", "spm"):
        raise UserError(f"infill format {fmt.name!r} is CodeGen2's: build its ids with the tokenizer's special_ids()")
    return SpecialIds(eot=specials.eot, sep=None, eom=None, masks=(), fim=fmt.marker_ids(specials),
                      fim_end=end_id(specials, fmt), bos=specials.bos)


def codegen2_special_ids(num_masks: int = 899) -> SpecialIds:
    """The ids used by the published CodeGen2 tokenizer: <mask_N> = 51200 - N (docs/design.md §3)."""
    if not 1 <= num_masks <= 899:
        raise UserError(f"num_masks={num_masks} must lie in [1, 899] for the CodeGen2 tokenizer")
    return SpecialIds(eot=50256, sep=50299, eom=50300, masks=tuple(51200 - n for n in range(1, num_masks + 1)))


@dataclass
class Example:
    """One training sequence; labels[t] is the target for input position t (-100: no loss)."""

    input_ids: np.ndarray  # int64 [seq_len]
    labels: np.ndarray  # int64 [seq_len]
    doc_ids: np.ndarray  # int64 [seq_len]; piece i -> i, padding -> (last piece id) + 1
    prefix_len: int  # bidirectional prefix length (0 unless cfg.prefix_lm)
    objective: str  # "causal" | "span" | "fim"


# ---------------------------------------------------------------------------------------------
# Randomness and the mixture


def objective_rng(seed: int, sample_index: int) -> np.random.Generator:
    """A generator that depends only on (seed, sample_index), never on how many draws came before."""
    if int(seed) < 0 or int(sample_index) < 0:
        raise UserError(f"seed={seed} and sample_index={sample_index} must be non-negative")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(sample_index), _RNG_DOMAIN]))


def choose_objective(rng: np.random.Generator, cfg: ObjectiveConfig) -> str:
    """One uniform draw: u < span_rate -> span; u < span_rate + fim_rate -> fim; else causal."""
    u = rng.random()
    if u < cfg.span_rate:
        return "span"
    if u < cfg.span_rate + cfg.fim_rate:
        return "fim"
    return "causal"


# ---------------------------------------------------------------------------------------------
# Documents


def split_documents(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    """Split after every eot; each piece keeps its trailing eot (the last piece may have none)."""
    tokens = np.asarray(tokens)
    cuts = np.flatnonzero(tokens == eot) + 1
    pieces = np.split(tokens, cuts)
    return [p for p in pieces if len(p)]


def _content(doc: np.ndarray, eot: int) -> tuple[np.ndarray, bool]:
    has_eot = len(doc) > 0 and int(doc[-1]) == eot
    return (doc[:-1] if has_eot else doc), has_eot


# ---------------------------------------------------------------------------------------------
# Span corruption


def _max_spans(cfg: ObjectiveConfig, special: SpecialIds) -> int:
    return min(cfg.max_spans, len(special.masks))


def _span_min_content(cfg: ObjectiveConfig) -> int:
    return max(cfg.min_doc_tokens, 2)


def _plan_spans(n: int, ratio: float, candidates: np.ndarray, cap: int) -> list[int]:
    """Span lengths (in position order) for n content tokens, from pre-drawn candidate lengths."""
    target = min(max(int(round(ratio * n)), 1), n - 1)
    lengths: list[int] = []
    total = 0
    for cand in candidates[:cap]:
        if total >= target:
            break
        length = min(int(cand), target - total)
        lengths.append(length)
        total += length
    while lengths and total + len(lengths) - 1 > n:  # no room for the separating gaps
        total -= lengths.pop()
    return lengths


def _place_spans(n: int, lengths: list[int], rng: np.random.Generator) -> list[int]:
    """Start positions, uniform over layouts with >= 1 visible token between consecutive spans."""
    k = len(lengths)
    free = n - sum(lengths) - (k - 1)  # tokens that can go anywhere once the mandatory gaps are set
    slots = np.sort(rng.choice(free + k, size=k, replace=False))
    starts, before = [], 0
    for slot, length in zip(slots.tolist(), lengths):
        starts.append(slot + before)  # free tokens before this span + mandatory gaps + earlier spans
        before += length
    return starts


def _corrupt_layout(content: np.ndarray, starts: list[int], lengths: list[int], special: SpecialIds) -> np.ndarray:
    body, tail, pos = [], [], 0
    for i, (start, length) in enumerate(zip(starts, lengths)):
        mask = np.array([special.masks[i]], dtype=np.int64)
        body += [content[pos:start], mask]
        tail += [mask, content[start:start + length], np.array([special.eom], dtype=np.int64)]
        pos = start + length
    body += [content[pos:], np.array([special.eot, special.sep], dtype=np.int64)]
    return np.concatenate(body + tail).astype(np.int64)


def span_corrupt(
    doc: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig, special: SpecialIds, budget: int
) -> np.ndarray:
    """Corrupt one document piece into at most `budget` tokens (see the module docstring).

    If the corrupted whole piece does not fit, the longest head of the piece whose corrupted form
    fits is used instead; if no such head is long enough to corrupt, the raw head doc[:budget].
    """
    return _span_piece(doc, rng, cfg, special, budget)[0]


def _span_piece(doc: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig, special: SpecialIds,
                budget: int) -> tuple[np.ndarray, bool]:
    """span_corrupt, also saying whether the whole piece was kept (False: it was truncated)."""
    doc = np.asarray(doc, dtype=np.int64)
    budget = max(int(budget), 0)
    content, has_eot = _content(doc, special.eot)
    cap = _max_spans(cfg, special)
    n, min_n = len(content), _span_min_content(cfg)
    if n < min_n or cap < 1:
        return doc[:budget], len(doc) <= budget
    ratio = rng.uniform(cfg.corruption_ratio_min, cfg.corruption_ratio_max)
    candidates = rng.integers(cfg.span_len_min, cfg.span_len_max + 1, size=cap)
    lengths = _plan_spans(n, ratio, candidates, cap)
    if n + 3 * len(lengths) + SPAN_FIXED_OVERHEAD > budget:
        # Truncate: the largest m with m + 3k(m) + 2 <= budget (k(m) grows with m, so scan down).
        m = min(n - 1, budget - 3 - SPAN_FIXED_OVERHEAD)
        while m >= min_n:
            lengths = _plan_spans(m, ratio, candidates, cap)
            if m + 3 * len(lengths) + SPAN_FIXED_OVERHEAD <= budget:
                break
            m -= 1
        if m < min_n:
            return doc[:budget], False
        content, n, whole = content[:m], m, False
    else:
        whole = True
    starts = _place_spans(n, lengths, rng)
    return _corrupt_layout(content, starts, lengths, special), whole


def decode_span_corruption(tokens: np.ndarray, special: SpecialIds) -> np.ndarray:
    """Invert the span layout of one corrupted piece; returns the document with its eot.

    A piece without the `<|endoftext|> <sep>` marker was left uncorrupted and is returned as is.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    marker = np.flatnonzero((tokens[:-1] == special.eot) & (tokens[1:] == special.sep))
    if len(marker) == 0:
        return tokens.copy()
    split = int(marker[0])
    body, tail = tokens[: split + 1], tokens[split + 2:]
    mask_index = {m: i for i, m in enumerate(special.masks)}
    spans: dict[int, np.ndarray] = {}
    pos = 0
    while pos < len(tail):
        idx = mask_index.get(int(tail[pos]))
        ends = np.flatnonzero(tail[pos + 1:] == special.eom)
        if idx is None or len(ends) == 0:
            raise UserError(f"malformed span section at token {split + 2 + pos}: expected <mask_k> ... <eom>")
        end = pos + 1 + int(ends[0])
        spans[idx] = tail[pos + 1:end]
        pos = end + 1
    out, seen = [], 0
    for tok in body.tolist():
        idx = mask_index.get(tok)
        if idx is None:
            out.append(np.array([tok], dtype=np.int64))
            continue
        if idx not in spans:
            raise UserError(f"<mask_{idx + 1}> appears in the context but has no span")
        out.append(spans[idx])
        seen += 1
    if seen != len(spans):
        raise UserError(f"{len(spans)} spans but {seen} mask sentinels in the context")
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# FIM


def fim_transform(doc: np.ndarray, rng: np.random.Generator, special: SpecialIds, spm: bool) -> np.ndarray:
    """PSM or SPM form of one piece, cut at two uniform points (see the module docstring)."""
    if special.fim is None and len(special.masks) < 2:
        raise UserError("FIM needs at least 2 mask sentinels (<mask_1>, <mask_2>) in the tokenizer")
    doc = np.asarray(doc, dtype=np.int64)
    content, has_eot = _content(doc, special.eot)
    lead = []
    if special.fim is not None and special.bos is not None and len(content) and int(content[0]) == special.bos:
        lead, content = [content[:1]], content[1:]
    i, j = sorted(rng.integers(0, len(content) + 1, size=2).tolist())
    prefix, middle, suffix = content[:i], content[i:j], content[j:]
    if special.fim is not None:
        p, s, m = (np.array([t]) for t in special.fim)
        head = [p, s, suffix, m, prefix] if spm else [p, prefix, s, suffix, m]
        end = [np.array([special.fim_end])] + ([np.array([special.eot])] if has_eot and
                                               special.fim_end != special.eot else [])
        return np.concatenate(lead + head + [middle] + end).astype(np.int64)
    m1, m2 = np.array([special.masks[0]]), np.array([special.masks[1]])
    head = [m2, suffix, m1, prefix] if spm else [m1, prefix, m2, suffix]
    end = [np.array([special.eot])] if has_eot else []
    parts = head + [np.array([special.sep]), middle, np.array([special.eom])] + end
    return np.concatenate(parts).astype(np.int64)


def decode_fim(tokens: np.ndarray, special: SpecialIds) -> np.ndarray:
    """Invert :func:`fim_transform` (PSM or SPM); a piece not starting with a sentinel is returned as is."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if special.fim is not None:
        return _decode_native_fim(tokens, special)
    m1, m2 = special.masks[0], special.masks[1]
    if len(tokens) == 0 or int(tokens[0]) not in (m1, m2):
        return tokens.copy()

    def find(value: int, start: int) -> int:
        hits = np.flatnonzero(tokens[start:] == value)
        if len(hits) == 0:
            raise UserError(f"malformed FIM piece: token {value} not found after position {start}")
        return start + int(hits[0])

    spm = int(tokens[0]) == m2
    second = find(m1 if spm else m2, 1)
    sep = find(special.sep, second + 1)
    eom = find(special.eom, sep + 1)
    first_part, second_part = tokens[1:second], tokens[second + 1:sep]
    prefix, suffix = (second_part, first_part) if spm else (first_part, second_part)
    rest = tokens[eom + 1:]
    if len(rest) > 1 or (len(rest) == 1 and int(rest[0]) != special.eot):
        raise UserError(f"malformed FIM piece: unexpected tokens after <eom> at position {eom + 1}")
    return np.concatenate([prefix, tokens[sep + 1:eom], suffix, rest])


def _decode_native_fim(tokens: np.ndarray, special: SpecialIds) -> np.ndarray:
    """Invert the model-format PSM of :func:`fim_transform` (SPM reads as PSM with an empty prefix: the two cannot
    be told apart there, so tests of the inverse use PSM)."""
    lead = tokens[:1] if special.bos is not None and len(tokens) and int(tokens[0]) == special.bos else tokens[:0]
    body = tokens[len(lead):]
    p, s, m = special.fim
    if len(body) == 0 or int(body[0]) != p:
        return tokens.copy()
    marks = [int(np.flatnonzero(body == t)[0]) if (body == t).any() else -1 for t in (s, m)]
    ends = np.flatnonzero(body == special.fim_end)
    if min(marks) < 0 or not len(ends) or ends[-1] < marks[1]:
        raise UserError("malformed FIM piece: a marker or the end of the middle is missing")
    end = int(ends[ends > marks[1]][0])
    prefix, suffix, middle = body[1:marks[0]], body[marks[0] + 1:marks[1]], body[marks[1] + 1:end]
    rest = body[end + 1:] if special.fim_end != special.eot else body[end:]
    return np.concatenate([lead, prefix, middle, suffix, rest])


def _fim_piece(doc: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig, special: SpecialIds,
               budget: int) -> tuple[np.ndarray, bool]:
    """FIM for one piece within `budget` tokens, with the same truncation rule as span corruption;
    also says whether the whole piece was kept."""
    doc = np.asarray(doc, dtype=np.int64)
    content, _ = _content(doc, special.eot)
    min_n = max(cfg.min_doc_tokens, 1)
    if len(content) < min_n:
        return doc[:budget], len(doc) <= budget
    whole = len(doc) + FIM_OVERHEAD <= budget
    if not whole:
        m = budget - FIM_OVERHEAD
        if m < min_n:
            return doc[:budget], False
        doc = content[:m]
    return fim_transform(doc, rng, special, spm=bool(rng.random() < cfg.fim_spm_rate)), whole


# ---------------------------------------------------------------------------------------------
# Whole sequences


def min_seq_len(cfg: ObjectiveConfig) -> int:
    """Shortest seq_len at which a chunk-filling document can still be span-corrupted / FIM-transformed."""
    need = 1
    if cfg.span_rate > 0:
        need = max(need, _span_min_content(cfg) + 3 + SPAN_FIXED_OVERHEAD - 1)
    if cfg.fim_rate > 0:
        need = max(need, max(cfg.min_doc_tokens, 1) + FIM_OVERHEAD - 1)
    return need


def check_setup(seq_len: int, cfg: ObjectiveConfig, special: SpecialIds) -> None:
    """Fail early, with the setting to change, when the objective cannot work at this seq_len."""
    if cfg.span_rate > 0 and not special.masks:
        raise UserError("objective.span_rate > 0 but the tokenizer has no <mask_k> sentinels")
    if cfg.fim_rate > 0 and special.fim is None and len(special.masks) < 2:
        raise UserError("objective.fim_rate > 0 needs at least 2 <mask_k> sentinels in the tokenizer")
    need = min_seq_len(cfg)
    if seq_len < need:
        what = "span corruption" if cfg.span_rate > 0 else "FIM" if cfg.fim_rate > 0 else "training"
        raise UserError(
            f"train.seq_len={seq_len} is too short for {what}: the minimum is {need} "
            f"(objective.min_doc_tokens={cfg.min_doc_tokens} plus sentinel tokens)"
        )


def _transform_pieces(chunk: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig,
                      special: SpecialIds, transform) -> list[np.ndarray]:
    budget, out = len(chunk), []
    for piece in split_documents(chunk, special.eot):
        if budget <= 0:
            break
        new, whole = transform(piece, rng, cfg, special, budget)
        out.append(new)
        budget -= len(new)
        if not whole:
            break  # the tail of the raw chunk no longer fits: dropped
    return out


def span_corrupt_pieces(chunk: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig,
                        special: SpecialIds) -> list[np.ndarray]:
    """File-level span corruption; piece i of the output comes from split_documents(chunk)[i]."""
    return _transform_pieces(np.asarray(chunk, dtype=np.int64), rng, cfg, special, _span_piece)


def fim_pieces(chunk: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig,
               special: SpecialIds) -> list[np.ndarray]:
    """Per-piece FIM; piece i of the output comes from split_documents(chunk)[i]."""
    return _transform_pieces(np.asarray(chunk, dtype=np.int64), rng, cfg, special, _fim_piece)


def _random_prefix(first_len: int, seq_len: int, rng: np.random.Generator) -> int:
    high = max(1, min(first_len, seq_len - 1))
    return int(rng.integers(1, high + 1))


def _assemble(pieces: list[np.ndarray], total: int, eot: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Concatenate pieces, pad with eot to `total`; returns tokens, doc ids, number of real tokens."""
    seq = np.full(total, eot, dtype=np.int64)
    docs = np.full(total, len(pieces), dtype=np.int64)
    pos = 0
    for i, piece in enumerate(pieces):
        seq[pos:pos + len(piece)] = piece
        docs[pos:pos + len(piece)] = i
        pos += len(piece)
    if pos > total:
        raise AssertionError(f"transformed pieces overflow the sequence ({pos} > {total})")
    return seq, docs, pos


def make_example(chunk: np.ndarray, sample_index: int, seed: int, cfg: ObjectiveConfig,
                 special: SpecialIds) -> Example:
    """Sample `sample_index`'s objective and build its example from `chunk` (seq_len + 1 tokens)."""
    chunk = np.asarray(chunk)
    if chunk.ndim != 1 or len(chunk) < 2 or not np.issubdtype(chunk.dtype, np.integer):
        raise UserError(f"chunk must be a 1-D integer array of seq_len + 1 >= 2 tokens, got shape {chunk.shape} "
                        f"and dtype {chunk.dtype}")
    chunk = chunk.astype(np.int64)
    seq_len = len(chunk) - 1
    check_setup(seq_len, cfg, special)
    rng = objective_rng(seed, sample_index)
    objective = choose_objective(rng, cfg)
    if objective == "causal":
        pieces = split_documents(chunk, special.eot)
    else:
        build = span_corrupt_pieces if objective == "span" else fim_pieces
        pieces = build(chunk, rng, cfg, special)
    seq, docs, real = _assemble(pieces, len(chunk), special.eot)
    labels = seq[1:].copy()
    labels[max(real - 1, 0):] = IGNORE_INDEX  # targets that are padding
    prefix_len = 0
    if cfg.prefix_lm:
        first = pieces[0]
        marker = special.middle_marker if objective == "fim" else special.sep
        seps = np.flatnonzero(first == marker) if objective != "causal" and marker is not None else np.zeros(0)
        if len(seps):
            prefix_len = min(int(seps[0]) + 1, seq_len)
        else:
            prefix_len = _random_prefix(len(first), seq_len, rng)
        labels[:prefix_len] = IGNORE_INDEX
    return Example(input_ids=seq[:-1].copy(), labels=labels, doc_ids=docs[:-1].copy(),
                   prefix_len=prefix_len, objective=objective)
