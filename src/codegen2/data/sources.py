"""Data sources: named, weighted streams of documents for one split (train or held-out).

With no `[[data.sources]]` the embedded default corpus is used (see `codegen2.data.embedded`):
a code source (the standard library) and a natural-language source (pydoc topics and
docstrings), weighted by `embedded_code_weight` / `embedded_nl_weight`. Otherwise each configured
source is read by the reader of its format (see `codegen2.data.formats`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from codegen2.config import SOURCE_KINDS, DataConfig, SourceConfig
from codegen2.data import embedded
from codegen2.data.documents import Document, is_heldout, split_filter
from codegen2.data.formats import READERS, Keep, Skipped, detect_format, git_tree, in_shard, skip_file, walk_files
from codegen2.errors import UserError

__all__ = ["Document", "Source", "is_heldout", "embedded_sources", "user_sources", "data_sources",
           "heldout_documents", "source_from_path"]


@dataclass
class Source:
    """One weighted stream of documents; `documents()` can be iterated any number of times."""

    name: str
    kind: str
    weight: float
    split: str
    description: str  # what to name in messages (a path, "Python standard library")
    read: Callable[[Keep, Counter, tuple[int, int] | None], Iterator[Document]]
    keep: Keep
    identity: dict[str, Any]  # settings that change the documents, for the cache fingerprint
    roots: list[Path]  # files or directories whose contents the documents come from
    max_doc_chars: int = 0
    skipped: Skipped = field(default_factory=Skipped)  # of the last documents() pass (counts, and the files)
    truncated: int = 0
    other_split: int = 0  # documents of the other split passed over in the last pass (held out, for "train")
    secrets: bool = True  # whether prepare's secrets stage runs on it
    git: dict[str, Any] | None = None  # a git work tree's commit, dirty flag and tracked-file count (manifest)

    def documents(self, shard: tuple[int, int] | None = None) -> Iterator[Document]:
        """This split's documents (with `shard=(rank, world_size)`, that task's share of the files);
        empty ones are skipped and long ones truncated, both counted."""
        self.skipped, self.truncated, self.other_split = Skipped(), 0, 0

        def keep(key: str) -> bool:
            kept = self.keep(key)
            self.other_split += not kept
            return kept

        for doc in self.read(keep, self.skipped, shard):
            if not doc.text:
                skip_file(self.skipped, "empty", doc.path)
                continue
            if 0 < self.max_doc_chars < len(doc.text):
                self.truncated += 1
                doc = replace(doc, text=doc.text[: self.max_doc_chars])
            yield doc

    def fingerprint(self) -> str:
        """Changes whenever the settings or any underlying file (size, mtime) change."""
        state = {"identity": self.identity, "split": self.split, "max_doc_chars": self.max_doc_chars,
                 "files": [_file_signature(root) for root in self.roots]}
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _file_signature(root: Path) -> list[tuple[str, int, int]]:
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    out = []
    for rel, path in walk_files(root):
        st = path.stat()
        out.append((rel, st.st_size, st.st_mtime_ns))
    return out


# ------------------------------------------------------------------------------------- embedded
def _shard(files: list[str], shard: tuple[int, int] | None) -> list[str]:
    return [rel for rel in files if in_shard(rel, shard)]


def embedded_sources(cfg: DataConfig, split: str, all_kinds: bool = False) -> list[Source]:
    """The default corpus for `split` ("train" or "heldout"); a source with weight 0 is left out unless
    `all_kinds` (preparation keeps both, so every run's held-out split has code and prose)."""
    keep = split_filter(split, cfg.heldout_fraction)
    weights = {"code": cfg.embedded_code_weight, "nl": cfg.embedded_nl_weight}
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise UserError(f"data.embedded_code_weight={weights['code']} and data.embedded_nl_weight={weights['nl']} "
                        "must be non-negative with a positive sum")
    files = embedded.stdlib_files(cfg.embedded_max_files)
    root = embedded.stdlib_root()
    identity = {"corpus": "python-stdlib", "python": sys.version, "root": str(root),
                "max_files": cfg.embedded_max_files, "heldout_fraction": cfg.heldout_fraction}
    roots = [root / rel for rel in files]
    sources = []
    if weights["code"] > 0 or all_kinds:
        sources.append(Source(
            name="stdlib-code", kind="code", weight=weights["code"], split=split,
            description=f"Python standard library ({root})",
            read=lambda keep, skipped, shard: embedded.code_documents(_shard(files, shard), keep, skipped),
            keep=keep, identity={**identity, "kind": "code"}, roots=roots, max_doc_chars=cfg.max_doc_chars,
            secrets=cfg.secrets))
    if weights["nl"] > 0 or all_kinds:
        from pydoc_data import topics

        sources.append(Source(
            name="stdlib-nl", kind="nl", weight=weights["nl"], split=split,
            description="Python documentation (pydoc topics and standard-library docstrings)",
            read=lambda keep, skipped, shard: embedded.nl_documents(_shard(files, shard), keep, skipped,
                                                                     topics=shard is None or shard[0] == 0),
            keep=keep, identity={**identity, "kind": "nl"}, roots=[Path(topics.__file__), *roots],
            max_doc_chars=cfg.max_doc_chars, secrets=cfg.secrets))
    return sources


# ------------------------------------------------------------------------------------------ user
def source_from_path(path: str) -> SourceConfig:
    """What `--data PATH` means: one code source of weight 1 (the path must exist)."""
    if not path:
        raise UserError("--data needs a path")
    if not Path(path).expanduser().exists():
        raise UserError(f"--data {path}: no such file or directory")
    return SourceConfig(path=path, kind="code", weight=1.0)


def _source_name(scfg: SourceConfig, taken: set[str]) -> str:
    base = scfg.name or Path(scfg.path.rstrip("/")).name.split(".")[0] or "source"
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def user_sources(cfg: DataConfig, split: str) -> list[Source]:
    """The configured `[[data.sources]]` for `split`, validated (paths exist, formats resolve)."""
    keep = split_filter(split, cfg.heldout_fraction)
    taken: set[str] = set()
    sources = []
    for index, scfg in enumerate(cfg.sources):
        if not scfg.path:
            raise UserError(f"data source #{index + 1} (data.sources[{index}]) has an empty path")
        scfg.validate()
        root = Path(scfg.path).expanduser()
        if not root.exists():
            raise UserError(f"data source {scfg.path!r}: no such file or directory")
        tree = git_tree(root) if scfg.git and scfg.format in ("auto", "dir") else None
        fmt = "dir" if tree else detect_format(root, scfg.format, scfg.include, scfg.exclude)
        reader = READERS[fmt]
        identity = {"path": str(root.resolve()), "format": fmt, "kind": scfg.kind, "field": scfg.field,
                    "include": scfg.include, "exclude": scfg.exclude, "skip_bad_lines": scfg.skip_bad_lines,
                    "heldout_fraction": cfg.heldout_fraction, "git": tree.commit if tree else None}
        sources.append(Source(
            name=_source_name(scfg, taken), kind=scfg.kind, weight=scfg.weight, split=split,
            description=scfg.path,
            read=(lambda keep, skipped, shard, reader=reader, root=root, scfg=scfg, tree=tree:
                  reader(root, scfg, keep, skipped, shard, tree) if tree else reader(root, scfg, keep, skipped, shard)),
            keep=keep, identity=identity, roots=[root / rel for rel in tree.files] if tree else [root],
            max_doc_chars=cfg.max_doc_chars, secrets=cfg.secrets and scfg.secrets,
            git=tree.manifest() if tree else None))
    return sources


def data_sources(cfg: DataConfig, split: str, all_kinds: bool = False) -> list[Source]:
    """User sources if any are configured, else the embedded corpus (with `all_kinds`, both of its sources)."""
    return user_sources(cfg, split) if cfg.sources else embedded_sources(cfg, split, all_kinds)


def heldout_documents(cfg: DataConfig, kind: str | None = None) -> list[Document]:
    """All held-out documents (optionally of one kind), for evaluation; never in any training cache."""
    if kind not in (None, *SOURCE_KINDS):
        raise UserError(f"kind={kind!r} must be one of {', '.join(SOURCE_KINDS)} or None")
    return [doc for source in data_sources(cfg, "heldout") if kind in (None, source.kind)
            for doc in source.documents()]
