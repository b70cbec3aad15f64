"""MinHash signatures, LSH banding and clustering for near-deduplication (BigCode's settings, DESIGN §6).

A document is the set of its n-grams (default 5) of code tokens, where tokens are the pieces left after
splitting on `[^A-Za-z_0-9]` (so punctuation and whitespace never count). Its signature holds, for each of
`num_perm` (256) hash functions, the smallest hash of any of its n-grams; two signatures agree in a given
position with probability equal to the documents' Jaccard similarity. LSH cuts the signature into
`bands` x `rows` (25 x 10, datasketch's `optimal_param` for threshold 0.7 and 256 permutations):
documents that agree on every row of some band become candidates.

Hashing, all deterministic across processes and machines (Python's `hash()` is salted, so unusable):
- each distinct token -> 64 bits of BLAKE2b;
- an n-gram -> a polynomial combination of its token hashes mod 2^64 (vectorised over the document);
- hash function i -> multiply-shift `((a_i * x + b_i) mod 2^64) >> 32` with odd `a_i` (Dietzfelbinger's
  universal family), giving 32-bit values; `a`, `b` come from a seeded numpy generator.

Candidates are verified before they join a cluster: a pair whose signatures agree in fewer than
`threshold` of the positions (estimated Jaccard below the threshold) is dropped. BigCode's pipeline
unions every band collision; verification removes the collisions of pairs far below the threshold
(at Jaccard 0.6 one band of 10 rows collides with probability 14%), which are false positives.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

TOKEN_SPLIT = re.compile(r"[^A-Za-z_0-9]+")
_MASK32 = np.uint64(0xFFFFFFFF)
_SHINGLE_BASE = np.uint64(0x100000001B3)  # an odd 64-bit multiplier (the FNV prime) for n-gram combination
EMPTY = np.uint32(0xFFFFFFFF)


def code_tokens(text: str) -> list[str]:
    """Tokens of code for near-dedup: maximal runs of [A-Za-z_0-9]."""
    return [t for t in TOKEN_SPLIT.split(text) if t]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of n-grams of code tokens (the exact-Jaccard reference; documents shorter than n have none)."""
    tokens = code_tokens(text)
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two documents' n-gram sets."""
    sa, sb = ngrams(a, n), ngrams(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _token_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class MinHasher:
    """Signatures of `num_perm` 32-bit hashes over n-grams of code tokens."""

    num_perm: int = 256
    ngram: int = 5
    seed: int = 42

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        object.__setattr__(self, "_a", a)
        object.__setattr__(self, "_b", b)

    def shingle_hashes(self, text: str, min_tokens: int = 0) -> np.ndarray:
        """Distinct uint64 hashes of the document's n-grams (empty when it has fewer than max(n, min_tokens) tokens)."""
        tokens = code_tokens(text)
        if len(tokens) < max(self.ngram, min_tokens):
            return np.empty(0, dtype=np.uint64)
        vocab: dict[str, int] = {}
        ids = [vocab.setdefault(t, len(vocab)) for t in tokens]
        table = np.fromiter((_token_hash(t) for t in vocab), dtype=np.uint64, count=len(vocab))
        h = table[np.asarray(ids, dtype=np.int64)]
        count = len(tokens) - self.ngram + 1
        combined = np.zeros(count, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(self.ngram):
                combined = combined * _SHINGLE_BASE + h[k:k + count]
        return np.unique(combined)

    def signature(self, text: str, min_tokens: int = 0) -> np.ndarray:
        """uint32[num_perm]; all EMPTY for a document without n-grams or with fewer than `min_tokens` tokens."""
        shingles = self.shingle_hashes(text, min_tokens)
        if shingles.size == 0:
            return np.full(self.num_perm, EMPTY, dtype=np.uint32)
        out = np.empty(self.num_perm, dtype=np.uint32)
        step = max(1, (1 << 21) // max(shingles.size, 1))  # bound the [perms, shingles] temporary to ~16 MB
        with np.errstate(over="ignore"):
            for start in range(0, self.num_perm, step):
                a = self._a[start:start + step, None]
                b = self._b[start:start + step, None]
                hashed = (a * shingles[None, :] + b) >> np.uint64(32)
                out[start:start + step] = hashed.min(axis=1).astype(np.uint32)
        return out


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[n, bands]: one hash per band of each signature (equal bands give equal hashes)."""
    n = signatures.shape[0]
    if signatures.shape[1] < bands * rows:
        raise ValueError(f"signatures of {signatures.shape[1]} hashes cannot make {bands} bands of {rows} rows")
    sig = signatures[:, :bands * rows].astype(np.uint64).reshape(n, bands, rows)
    multipliers = np.random.default_rng(0xBA4D).integers(1, 2**63, size=rows, dtype=np.uint64) * np.uint64(2) + 1
    with np.errstate(over="ignore"):
        mixed = (sig * multipliers[None, None, :]).sum(axis=2, dtype=np.uint64)
        mixed ^= mixed >> np.uint64(29)
    return mixed


def band_candidates(band: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """int64[m, 2] pairs (first, other): within each group of equal band hashes, every member is paired
    with the member of the smallest `order_key`, so the pairs do not depend on the input order."""
    if band.size < 2:
        return np.empty((0, 2), dtype=np.int64)
    order = np.lexsort((order_key, band))
    sorted_band = band[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_band[1:] != sorted_band[:-1]]))
    group_first = np.repeat(order[starts], np.diff(np.concatenate([starts, [band.size]])))
    mask = group_first != order
    return np.stack([group_first[mask], order[mask]], axis=1).astype(np.int64)


def estimated_jaccard(signatures: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of agreeing signature positions for each pair (the MinHash estimate of Jaccard)."""
    if pairs.size == 0:
        return np.empty(0, dtype=np.float64)
    out = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), 65536):
        chunk = pairs[start:start + 65536]
        out[start:start + len(chunk)] = (signatures[chunk[:, 0]] == signatures[chunk[:, 1]]).mean(axis=1)
    return out


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find over `n` nodes: int64[n] component label = the smallest node index of its component."""
    parent = np.arange(n, dtype=np.int64)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
