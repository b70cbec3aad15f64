"""Token cache: each source's split tokenized once, shuffled by document, stored as one `.npy`.

Layout: the documents in a seeded random order, each followed by one `<|endoftext|>`, as uint16
(vocabularies up to 65,536) or uint32. Beside it a JSON manifest records what was built (document
and token counts, skipped counts, the tokenizer and source fingerprints). A later run (or a
resume) whose fingerprints match memory-maps the existing file instead of tokenizing again.
Both files are written under temporary names and renamed into place, so an interrupted build
never leaves a cache that looks valid, and several processes building at once are harmless.

Special-token strings that occur in the documents' text are encoded as plain text, so data can
never contain a sentinel id (the objectives rely on that).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from codegen2.data.documents import Document
from codegen2.data.formats import mark_not_data
from codegen2.data.sources import Source
from codegen2.errors import UserError
from codegen2.tokenizer import CodeGenTokenizer

CACHE_VERSION = 1
BATCH_CHARS = 4_000_000  # text handed to the tokenizer's parallel batch encoder at once
BATCH_DOCS = 2048


@dataclass
class TokenCache:
    tokens: np.ndarray  # read-only memory map of the packed stream
    manifest: dict[str, Any]
    path: Path
    reused: bool  # True when an existing cache was found and loaded


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_key(source: Source, tokenizer: CodeGenTokenizer, seed: int) -> str:
    state = f"{CACHE_VERSION}|{source.fingerprint()}|{tokenizer.fingerprint()}|{seed}"
    return hashlib.sha256(state.encode()).hexdigest()[:20]


def document_order(num_docs: int, seed: int, name: str) -> np.ndarray:
    """The seeded order in which a source's documents are concatenated."""
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return np.random.default_rng(np.random.SeedSequence([seed, name_key])).permutation(num_docs)


def _batches(docs: Iterator[Document]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc.text)
        chars += len(doc.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _load_existing(npy: Path, manifest_path: Path, key: str) -> TokenCache | None:
    if not (npy.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        tokens = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None  # unreadable: rebuild
    if manifest.get("key") != key or len(tokens) != manifest.get("tokens"):
        return None
    return TokenCache(tokens=tokens, manifest=manifest, path=npy, reused=True)


def build_token_cache(source: Source, tokenizer: CodeGenTokenizer, cache_dir: str | Path, seed: int,
                      progress: bool = True) -> TokenCache:
    """Tokenize `source` into `cache_dir` (or reuse a matching cache) and memory-map the result."""
    cache_dir = Path(cache_dir)
    mark_not_data(cache_dir)
    key = cache_key(source, tokenizer, seed)
    npy = cache_dir / f"{source.name}-{source.split}-{key}.npy"
    manifest_path = npy.with_suffix(".json")
    existing = _load_existing(npy, manifest_path, key)
    if existing is not None:
        return existing

    dtype = token_dtype(tokenizer.vocab_size)
    stem = f".{npy.stem}.{os.getpid()}"
    raw_path, tmp_npy = cache_dir / f"{stem}.raw.tmp", cache_dir / f"{stem}.npy.tmp"
    lengths: list[int] = []
    try:
        with open(raw_path, "wb") as raw, tqdm(desc=f"tokenizing {source.name}", unit=" docs",
                                                 disable=None if progress else True) as bar:
            for texts in _batches(source.documents()):
                for ids in tokenizer.encode_batch(texts, literal_specials=True):
                    ids.append(tokenizer.eot_id)
                    np.asarray(ids, dtype=dtype).tofile(raw)
                    lengths.append(len(ids))
                bar.update(len(texts))
        if not lengths:
            skipped = ", ".join(f"{n} {why}" for why, n in sorted(source.skipped.items())) or "none skipped"
            raise UserError(f"data source {source.description}: no {source.split} documents ({skipped})")
        sizes = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        total = int(sizes.sum())
        packed = np.memmap(raw_path, dtype=dtype, mode="r", shape=(total,))
        out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=dtype, shape=(total,))
        pos = 0
        for doc in document_order(len(sizes), seed, source.name):
            n = int(sizes[doc])
            out[pos:pos + n] = packed[starts[doc]:starts[doc] + n]
            pos += n
        out.flush()
        del out, packed
        os.replace(tmp_npy, npy)
    finally:
        for tmp in (raw_path, tmp_npy):
            tmp.unlink(missing_ok=True)
    manifest = {
        "version": CACHE_VERSION, "key": key, "source": source.name, "kind": source.kind,
        "description": source.description, "split": source.split, "docs": len(lengths), "tokens": total,
        "dtype": dtype.name, "skipped": dict(source.skipped), "truncated": source.truncated,
        "other_split": source.other_split, "seed": seed,
        "eot_id": tokenizer.eot_id, "tokenizer": tokenizer.fingerprint(), "source_fingerprint": source.fingerprint(),
    }
    _write_json_atomic(manifest_path, manifest)
    return TokenCache(tokens=np.load(npy, mmap_mode="r"), manifest=manifest, path=npy, reused=False)
