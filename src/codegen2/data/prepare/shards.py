"""Token shards of a prepared data directory: how they are written and how training reads them.

A prepared directory (`codegen2 data prepare --out DIR`) holds, per source and split, the documents'
tokens, each document followed by `<|endoftext|>`, concatenated in a fixed order (a hash of the
document's source and path, so the order never depends on how the work was split into tasks) and cut
into files of `shard_tokens` tokens: `shards/SOURCE/SPLIT-00000.bin`, raw little-endian uint16 (uint32
for vocabularies over 65,536). `manifest.json`, written last and atomically, lists every shard with its
token count and SHA-256; a directory without it is unfinished and is never read. `heldout.jsonl` holds the
text of the held-out documents (those of the `heldout` shards, in the same order) for evaluation.

Training memory-maps the shards of each source as one `ShardedStream` (no copy, no tokenization).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codegen2.data.documents import Document
from codegen2.errors import UserError
from codegen2.fsutil import commit_file, staging_path, staging_token

MANIFEST = "manifest.json"
HELDOUT_DOCUMENTS = "heldout.jsonl"
FORMAT = "codegen2-prepared"
FORMAT_VERSION = 2  # 2: heldout.jsonl (the held-out documents' text) added
READABLE_VERSIONS = (1, 2)  # version 1 trains; evaluation needs version 2's heldout.jsonl


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def is_prepared_dir(path: str | Path) -> bool:
    """Whether `path` is a directory `codegen2 data prepare` wrote (finished or not)."""
    path = Path(path).expanduser()
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / "plan.json").is_file())


class ShardedStream:
    """A read-only 1-D token array made of memory-mapped shard files (slicing returns a copy)."""

    ndim = 1

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype("<u2")
        self.starts = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("ShardedStream supports contiguous slices only")
        start, stop, _ = item.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces, pos = [], start
        for i in range(first, len(self.arrays)):
            if pos >= stop:
                break
            offset = pos - int(self.starts[i])
            take = min(stop - pos, len(self.arrays[i]) - offset)
            pieces.append(self.arrays[i][offset:offset + take])
            pos += take
        return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)


class ShardWriter:
    """Appends token arrays and cuts them into files of exactly `shard_tokens` tokens (the last shorter)."""

    def __init__(self, directory: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.directory, self.split, self.shard_tokens, self.dtype = directory, split, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._written = 0
        self._hash = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._tmp = staging_path(self.directory / name, staging_token())
        self._file = open(self._tmp, "wb")
        self._written, self._hash = 0, hashlib.sha256()

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        commit_file(self._tmp, self.directory / name)  # fsynced, then renamed into place
        self.shards.append({"file": name, "tokens": self._written, "sha256": self._hash.hexdigest()})
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens) - pos, self.shard_tokens - self._written)
            data = tokens[pos:pos + take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._written += take
            pos += take
            if self._written == self.shard_tokens:
                self._close()

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


@dataclass
class PreparedData:
    """A finished prepared directory: its manifest and memory-mapped token streams."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> PreparedData:
        root = Path(root).expanduser()
        path = root / MANIFEST
        if not root.is_dir():
            raise UserError(f"prepared data {root}: no such directory")
        if not path.is_file():
            hint = " (an unfinished prepare: run `codegen2 data prepare ... --resume` on it)" \
                if (root / "plan.json").is_file() else ""
            raise UserError(f"prepared data {root}: no {MANIFEST}{hint}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
                manifest.get("version") not in READABLE_VERSIONS:
            raise UserError(f"{path}: not a codegen2 prepared-data manifest (version "
                            f"{' or '.join(map(str, READABLE_VERSIONS))})")
        return cls(root=root, manifest=manifest)

    @property
    def sources(self) -> list[dict[str, Any]]:
        return self.manifest["sources"]

    def stream(self, source: dict[str, Any], split: str) -> ShardedStream:
        """The token stream of one source's split, memory-mapped (shard sizes are checked)."""
        dtype = np.dtype(self.manifest["dtype"])
        arrays = []
        for shard in source["splits"][split]["shards"]:
            path = self.root / "shards" / source["name"] / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"prepared data {self.root}: shard {path} is missing or has the wrong size")
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        return ShardedStream(arrays)

    def heldout_documents(self, kind: str | None = None) -> list[Document]:
        """The held-out documents this directory kept (of one kind, or all), from `heldout.jsonl`: exactly the
        documents of the held-out shards, in their order. Evaluation reads these, never the raw sources."""
        entry = self.manifest.get("heldout_documents")
        path = self.root / HELDOUT_DOCUMENTS
        if entry is None:
            raise UserError(f"prepared data {self.root} has no {HELDOUT_DOCUMENTS} (prepared by an older codegen2); "
                            "prepare it again to evaluate on its held-out split")
        try:
            data = path.read_bytes()
        except OSError:
            raise UserError(f"prepared data {self.root}: {HELDOUT_DOCUMENTS} is missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise UserError(f"prepared data {self.root}: {HELDOUT_DOCUMENTS} does not match its manifest "
                            "(damaged or truncated)")
        docs = []
        for line in data.decode("utf-8").splitlines():
            record = json.loads(line)
            if kind in (None, record["kind"]):
                docs.append(Document(text=record["text"], path=record["path"], kind=record["kind"]))
        return docs

    def check(self) -> None:
        """Every shard the manifest lists, and heldout.jsonl, are present with their sizes (a truncated or
        missing file is an error); contents are not hashed, so this stays cheap for large directories."""
        for source in self.sources:
            for split in source["splits"]:
                self.stream(source, split)
        entry = self.manifest.get("heldout_documents")
        path = self.root / HELDOUT_DOCUMENTS
        if entry is not None and (not path.is_file() or path.stat().st_size != entry["bytes"]):
            raise UserError(f"prepared data {self.root}: {HELDOUT_DOCUMENTS} is missing or has the wrong size")
