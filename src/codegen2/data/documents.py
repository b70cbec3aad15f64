"""Documents and the held-out split shared by every data source.

The split is a pure function of a document's key (a file's relative path, a "file:line" for
JSONL, a row index for tables, a topic name), hashed with SHA-256, so it is identical across
machines, Python versions and runs: a held-out file is never trained on, whatever else changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from codegen2.errors import UserError

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    """One training document: a source file, a JSONL record, a table row, a docstring collection."""

    text: str
    path: str  # where it came from (file path, "file:line", "dataset:row"), for messages and tests
    kind: str  # "code" or "nl"


def stable_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) that depends only on (salt, key). A key from a file name that is not UTF-8 (its
    undecodable bytes held as surrogate escapes, as os.walk gives them) hashes its raw bytes: no error, and
    valid keys hash exactly as before."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(key: str, fraction: float) -> bool:
    """Whether the document with this key belongs to the held-out split."""
    return stable_fraction(key, "heldout") < fraction


def split_filter(split: str, fraction: float) -> Callable[[str], bool]:
    """A predicate on document keys that keeps the keys of `split`."""
    if split not in SPLITS:
        raise UserError(f"unknown data split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"data.heldout_fraction={fraction} must lie in [0, 1)")
    want = split == "heldout"
    return lambda key: is_heldout(key, fraction) == want

