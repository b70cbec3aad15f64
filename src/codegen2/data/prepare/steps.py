"""The prepare pipeline's stages as datatrove `PipelineStep`s (run by any datatrove executor).

1. `ReadStep` (N tasks): read this task's share of the files of every source and split, apply the quality
   filters and decontamination, and write the kept documents with their content hash and MinHash signature.
2. `BandsStep` (up to `bands` tasks): for each LSH band, group equal band hashes and keep the candidate
   pairs whose signatures agree in at least `threshold` of the positions.
3. `ClusterStep` (1 task): union-find over exact-duplicate pairs (equal content hash) and verified near
   pairs; in each cluster the member with the smallest key hash is kept, whatever its split.
4. `TokenizerStep` (1 task): the given tokenizer, or a BPE trained on a sample of the kept training documents.
5. `TokenizeStep` (N tasks): tokenize the kept documents of one read task.
6. `MergeStep` (1 task): concatenate every source's and split's documents in key-hash order into shards,
   write `removed.jsonl` (and `redacted.jsonl`), the held-out documents' text (`heldout.jsonl`, for evaluation)
   and, last, `manifest.json`.

Every decision depends on document keys (source name + path), never on which task saw a document, so the
output is byte-identical for any number of tasks and workers. Each task writes its files under temporary
names and renames them when done; datatrove records the task as complete only after that, so a killed
prepare resumed with `--resume` redoes exactly the unfinished tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from codegen2.config import Config
from codegen2.data.documents import SPLITS, stable_fraction
from codegen2.data.prepare.decontaminate import Decontaminator
from codegen2.data.prepare.filters import CodeFilter
from codegen2.data.prepare.minhash import (
    EMPTY,
    MinHasher,
    band_candidates,
    band_hashes,
    connected_components,
    estimated_jaccard,
)
from codegen2.data.prepare.secrets import SecretScanner
from codegen2.data.prepare.shards import (
    FORMAT,
    FORMAT_VERSION,
    HELDOUT_DOCUMENTS,
    MANIFEST,
    ShardWriter,
    token_dtype,
)
from codegen2.data.sources import data_sources
from codegen2.fsutil import atomic_file, commit_file, staging_path, staging_token

MINHASH_SEED = 42
TOKENIZE_BATCH_CHARS = 4_000_000


# --------------------------------------------------------------------------------------- helpers
def quiet_datatrove_logs() -> None:
    """datatrove logs every task's start, pipeline and stats at INFO, and failures with a traceback; our
    stages report progress and errors (one line) themselves. Its per-task log files stay in logs/."""
    from loguru import logger

    logger.disable("datatrove")


PAUSE_ENV = "CODEGEN2_PREPARE_PAUSE_S"
PAUSE_MARK = "test hook: task pausing"


def task_done_pause() -> None:
    """Test hook: sleep between a task's last output and datatrove's completion mark, so that kills in the
    kill/resume test land in every stage and in that window (set PAUSE_ENV to seconds)."""
    seconds = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if seconds > 0:
        print(f"{PAUSE_MARK} {seconds:g} s", file=sys.stderr, flush=True)  # the task is past its fork: safe to signal
        time.sleep(seconds)


def key_hash(source: str, path: str, salt: str) -> int:
    digest = hashlib.blake2b(f"{salt}\x00{source}\x00{path}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def write_atomic(path: Path, write) -> None:
    """Write via `write(tmp_path)` then rename, so a kill never leaves a partial file under the real name."""
    with atomic_file(path) as tmp:
        write(tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8"))


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    write_atomic(path, write)


class Progress:
    """A line on stderr every `every` seconds: long stages show they are alive."""

    def __init__(self, label: str, every: float = 15.0):
        self.label, self.every, self.last, self.start = label, every, time.monotonic(), time.monotonic()

    def update(self, docs: int, chars: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(f"{self.label}: {docs:,} documents, {chars / 1e6:,.1f} M characters, {now - self.start:,.0f} s",
                  file=sys.stderr, flush=True)


class PrepareStep(PipelineStep):
    """Shared state of our steps: the config, the output directory and the number of read tasks."""

    type = "codegen2"

    def __init__(self, config: Config, out: str, read_tasks: int):
        super().__init__()
        self.config, self.out, self.read_tasks = config, out, read_tasks

    @property
    def work(self) -> Path:
        return Path(self.out) / "work"

    def begin(self, stage: str) -> Path:
        """Every stage's start: datatrove's logs quiet, and work/STAGE (where the stage writes) created."""
        quiet_datatrove_logs()
        out_dir = self.work / stage
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir

    def source_names(self) -> list[str]:
        return [s.name for s in data_sources(self.config.data, "train", all_kinds=True)]

    def load_meta(self) -> list[dict[str, np.ndarray]]:
        metas = []
        for r in range(self.read_tasks):
            with np.load(self.work / "read" / f"{r:05d}.meta.npz") as meta:
                metas.append({k: meta[k] for k in meta.files})
        return metas


# --------------------------------------------------------------------------------------- 1. read
class ReadTask:
    """What one read task decides and collects: per source and split its counts, the removed documents, and per
    kept document its meta columns and MinHash signature."""

    def __init__(self, p, patterns: dict[str, str]):
        self.p = p
        self.code_filter = CodeFilter(p.max_file_bytes, p.max_line_length, p.max_mean_line_length,
                                      p.min_alphanum_fraction, p.drop_autogenerated)
        self.decontaminator = Decontaminator(patterns)
        self.scanner = SecretScanner()
        self.hasher = MinHasher(p.minhash_perms, p.minhash_ngram, MINHASH_SEED)
        self.counts: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
        self.removed: list[dict[str, str]] = []
        self.redacted: list[dict] = []  # kept documents whose secrets were replaced: where, and counts by kind
        self.columns: dict[str, list] = defaultdict(list)
        self.signatures: list[np.ndarray] = []

    def keep(self, doc, source, source_index: int, split_index: int) -> str | None:
        """Count `doc`, then filter, redact and decontaminate it; a kept document's columns and signature are
        recorded and its text (secrets replaced) returned."""
        split = SPLITS[split_index]
        c = self.counts[source.name][split]
        c["docs_in"] += 1
        c["chars_in"] += len(doc.text)
        where = {"source": source.name, "split": split, "path": doc.path}
        reason = self.code_filter.reason(doc.text, source.kind)
        if reason is not None:
            c[reason] += 1
            self.removed.append({**where, "reason": reason})
            return None
        text = self.redact(doc.text, source, c, where) if source.secrets else doc.text
        if text is None:
            return None
        label = self.decontaminator.match(text)
        if label is not None:
            c["decontaminated"] += 1
            self.removed.append({**where, "reason": "decontaminated", "matched": label})
            return None
        self.record(text, source, doc.path, source_index, split_index)
        return text

    def redact(self, text: str, source, c: Counter, where: dict[str, str]) -> str | None:
        """The secrets stage: `text` with its secrets replaced, or None for a file that is mostly secret. Only
        counts by kind are recorded (`redacted_KIND`; `removed.jsonl`, `redacted.jsonl`), never the secret."""
        result = self.scanner.redact(text)
        if not result.counts:
            return text
        for kind, n in result.counts.items():
            c[f"redacted_{kind}"] += n
        found = dict(sorted(result.counts.items()))
        if result.removed:
            c["secrets"] += 1
            self.removed.append({**where, "reason": "secrets", "secrets": found})
            return None
        self.redacted.append({**where, "secrets": found})
        return result.text

    def record(self, text: str, source, path: str, source_index: int, split_index: int) -> None:
        """A kept document's meta columns and MinHash signature."""
        content = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        columns = self.columns
        columns["source"].append(source_index)
        columns["split"].append(split_index)
        columns["key"].append(key_hash(source.name, path, "key"))
        columns["order"].append(key_hash(source.name, path, "order"))
        columns["content_lo"].append(int.from_bytes(content[:8], "little"))
        columns["content_hi"].append(int.from_bytes(content[8:], "little"))
        columns["chars"].append(len(text))
        self.signatures.append(self.hasher.signature(text, self.p.minhash_min_tokens) if self.p.near_dedup
                               else np.full(self.p.minhash_perms, EMPTY, dtype=np.uint32))

    def meta(self) -> dict[str, np.ndarray]:
        """The task's meta.npz arrays: one row per kept document."""
        columns, perms = self.columns, self.p.minhash_perms
        return {
            "source": np.asarray(columns["source"], dtype=np.int32),
            "split": np.asarray(columns["split"], dtype=np.int8),
            "key": np.asarray(columns["key"], dtype=np.uint64),
            "order": np.asarray(columns["order"], dtype=np.uint64),
            "content": np.stack([np.asarray(columns["content_lo"], dtype=np.uint64),
                                 np.asarray(columns["content_hi"], dtype=np.uint64)], axis=1).reshape(-1, 2),
            "chars": np.asarray(columns["chars"], dtype=np.int64),
            "signature": np.stack(self.signatures) if self.signatures else np.empty((0, perms), dtype=np.uint32),
        }


class ReadStep(PrepareStep):
    name = "read, filter, decontaminate, sign"

    def __init__(self, config: Config, out: str, read_tasks: int, patterns: dict[str, str]):
        super().__init__(config, out, read_tasks)
        self.patterns = patterns

    def run(self, data, rank: int = 0, world_size: int = 1):
        out_dir = self.begin("read")
        task = ReadTask(self.config.prepare, self.patterns)
        progress = Progress(f"read task {rank + 1}/{world_size}")
        total_docs = total_chars = 0
        docs_tmp = staging_path(out_dir / f"{rank:05d}.docs.jsonl", staging_token())
        with open(docs_tmp, "w", encoding="utf-8") as docs_file:
            for split_index, split in enumerate(SPLITS):
                for source_index, source in enumerate(data_sources(self.config.data, split, all_kinds=True)):
                    source.max_doc_chars = 0  # the size filter decides instead of truncating
                    for doc in source.documents(shard=(rank, world_size)):
                        total_docs, total_chars = total_docs + 1, total_chars + len(doc.text)
                        progress.update(total_docs, total_chars)
                        text = task.keep(doc, source, source_index, split_index)
                        if text is not None:
                            docs_file.write(json.dumps({"path": doc.path, "text": text}, ensure_ascii=False) + "\n")
                    for why, n in source.skipped.items():
                        task.counts[source.name][split][f"skipped_{why}"] += n
                    task.removed.extend({"source": source.name, "split": split, **entry}
                                        for entry in source.skipped.entries)
        meta = task.meta()

        def write_meta(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **meta)

        write_atomic(out_dir / f"{rank:05d}.meta.npz", write_meta)
        write_json(out_dir / f"{rank:05d}.removed.json", task.removed)
        write_json(out_dir / f"{rank:05d}.redacted.json", task.redacted)
        write_json(out_dir / f"{rank:05d}.counts.json", {s: dict(v) for s, v in task.counts.items()})
        commit_file(docs_tmp, out_dir / f"{rank:05d}.docs.jsonl")
        self.stat_update("documents", value=total_docs)
        task_done_pause()
        if data:
            yield from data


# --------------------------------------------------------------------------------------- 2. bands
class BandsStep(PrepareStep):
    name = "near-dedup LSH bands"

    def run(self, data, rank: int = 0, world_size: int = 1):
        out_dir = self.begin("bands")
        p = self.config.prepare
        metas = self.load_meta()
        signatures = np.concatenate([m["signature"] for m in metas])
        keys = np.concatenate([m["key"] for m in metas])
        has_sig = signatures[:, 0] != EMPTY if len(signatures) else np.zeros(0, dtype=bool)
        candidates = np.flatnonzero(has_sig)
        edges = [np.empty((0, 2), dtype=np.int64)]
        if p.near_dedup and candidates.size > 1:
            for band in range(rank, p.minhash_bands, world_size):
                cols = signatures[candidates, band * p.minhash_rows:(band + 1) * p.minhash_rows]
                hashes = band_hashes(cols, 1, p.minhash_rows)[:, 0]
                pairs = candidates[band_candidates(hashes, keys[candidates])]
                keep = estimated_jaccard(signatures, pairs) >= p.minhash_threshold
                edges.append(pairs[keep])
        all_edges = np.unique(np.concatenate(edges), axis=0) if sum(len(e) for e in edges) else edges[0]
        save_npy(out_dir / f"{rank:05d}.npy", all_edges)
        task_done_pause()
        if data:
            yield from data


# --------------------------------------------------------------------------------------- 3. cluster
class ClusterStep(PrepareStep):
    name = "dedup clusters"

    def __init__(self, config: Config, out: str, read_tasks: int, band_tasks: int):
        super().__init__(config, out, read_tasks)
        self.band_tasks = band_tasks

    def run(self, data, rank: int = 0, world_size: int = 1):
        out_dir = self.begin("dedup")
        p = self.config.prepare
        metas = self.load_meta()
        sizes = [len(m["key"]) for m in metas]
        keys = np.concatenate([m["key"] for m in metas])
        content = np.concatenate([m["content"] for m in metas])
        source = np.concatenate([m["source"] for m in metas])
        split = np.concatenate([m["split"] for m in metas])
        n = len(keys)
        edges = [np.load(self.work / "bands" / f"{r:05d}.npy") for r in range(self.band_tasks)] if p.near_dedup else []
        if p.exact_dedup and n:
            # every document joins the document of the smallest key with the same content
            order = np.lexsort((keys, content[:, 1], content[:, 0]))
            same = np.all(content[order][1:] == content[order][:-1], axis=1)
            starts = np.flatnonzero(np.concatenate([[True], ~same]))
            first = np.repeat(order[starts], np.diff(np.concatenate([starts, [n]])))
            mask = first != order
            edges.append(np.stack([first[mask], order[mask]], axis=1))
        edge_array = np.concatenate(edges) if edges else np.empty((0, 2), dtype=np.int64)
        component = connected_components(n, edge_array) if len(edge_array) else np.arange(n)
        # keeper of each component: the member with the smallest key hash
        by_comp = np.lexsort((keys, component))
        comp_sorted = component[by_comp]
        heads = np.concatenate([[True], comp_sorted[1:] != comp_sorted[:-1]]) if n else np.zeros(0, dtype=bool)
        keeper = np.empty(n, dtype=np.int64)
        keeper[by_comp] = np.repeat(by_comp[heads], np.diff(np.concatenate([np.flatnonzero(heads), [n]])))
        drop = keeper != np.arange(n)
        names = self.source_names()
        paths = self._paths(metas)
        removed, counts = [], defaultdict(lambda: defaultdict(Counter))
        for i in np.flatnonzero(drop).tolist():
            k = int(keeper[i])
            exact = bool(np.all(content[i] == content[k]))
            reason = "exact_duplicate" if exact else "near_duplicate"
            counts[names[source[i]]][SPLITS[split[i]]][reason] += 1
            removed.append({"source": names[source[i]], "split": SPLITS[split[i]], "path": paths[i], "reason": reason,
                            "duplicate_of": paths[k], "duplicate_of_source": names[source[k]]})
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for r in range(self.read_tasks):
            save_npy(out_dir / f"{r:05d}.keep.npy", ~drop[offsets[r]:offsets[r + 1]])
        write_json(out_dir / "removed.json", removed)
        write_json(out_dir / "counts.json", {s: {sp: dict(c) for sp, c in v.items()} for s, v in counts.items()})
        task_done_pause()
        if data:
            yield from data

    def _paths(self, metas: list[dict[str, np.ndarray]]) -> list[str]:
        paths = []
        for r in range(self.read_tasks):
            with open(self.work / "read" / f"{r:05d}.docs.jsonl", encoding="utf-8") as handle:
                paths.extend(json.loads(line)["path"] for line in handle)
        return paths


def iter_kept_docs(work: Path, rank: int):
    """(index in the read task, path, text) of the documents of read task `rank` that dedup kept."""
    keep = np.load(work / "dedup" / f"{rank:05d}.keep.npy")
    with open(work / "read" / f"{rank:05d}.docs.jsonl", encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if keep[i]:
                record = json.loads(line)
                yield i, record["path"], record["text"]


def iter_kept_paths(work: Path, rank: int):
    """(index in the read task, path) of the kept documents of read task `rank`."""
    keep = np.load(work / "dedup" / f"{rank:05d}.keep.npy")
    with open(work / "read" / f"{rank:05d}.docs.jsonl", encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if keep[i]:
                yield i, json.loads(line)["path"]


# --------------------------------------------------------------------------------------- 4. tokenizer
class TokenizerStep(PrepareStep):
    name = "tokenizer"

    def run(self, data, rank: int = 0, world_size: int = 1):
        quiet_datatrove_logs()
        from codegen2.tokenizer import CodeGenTokenizer, train_tokenizer

        cfg = self.config
        if cfg.tokenizer.path:
            tokenizer, origin = CodeGenTokenizer.load(cfg.tokenizer.path), {"origin": cfg.tokenizer.path}
        else:
            texts = self.sample()
            print(f"training a {cfg.tokenizer.vocab_size}-token BPE on {sum(map(len, texts)):,} characters of "
                  f"{len(texts):,} kept training documents", file=sys.stderr, flush=True)
            tokenizer = train_tokenizer(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.num_masks)
            origin = {"origin": "trained", "train_chars": sum(map(len, texts)), "train_docs": len(texts)}
        tokenizer.save(Path(self.out))
        write_json(self.work / "tokenizer.json", origin)
        task_done_pause()
        if data:
            yield from data

    def sample(self) -> list[str]:
        """About `tokenizer.train_chars` characters of kept training documents, split between the sources by
        weight: each source's documents in a seeded hash order of their keys, taken while they fit (the first
        one always). Two passes (choose, then read), so the choice never depends on the order of the files."""
        sources = data_sources(self.config.data, "train", all_kinds=True)
        weight_sum = sum(s.weight for s in sources)
        budget = [int(self.config.tokenizer.train_chars * s.weight / weight_sum) for s in sources]
        salt = f"tokenizer-sample:{self.config.train.seed}"
        candidates: dict[int, list[tuple[float, str, int]]] = defaultdict(list)
        for r in range(self.read_tasks):
            meta = np.load(self.work / "read" / f"{r:05d}.meta.npz")
            source, split, chars = meta["source"], meta["split"], meta["chars"]
            for i, path in iter_kept_paths(self.work, r):
                s = int(source[i])
                if split[i] == 0 and budget[s] > 0:
                    candidates[s].append((stable_fraction(f"{sources[s].name}\x00{path}", salt), path, int(chars[i])))
        chosen: dict[tuple[int, str], float] = {}
        for s, items in candidates.items():
            total = 0
            for priority, path, size in sorted(items):
                if total + size > budget[s] and total > 0:
                    continue
                chosen[(s, path)] = priority
                total += size
        texts = []
        for r in range(self.read_tasks):
            source = np.load(self.work / "read" / f"{r:05d}.meta.npz")["source"]
            for i, path, text in iter_kept_docs(self.work, r):
                if (int(source[i]), path) in chosen:
                    texts.append((int(source[i]), chosen[(int(source[i]), path)], path, text))
        return [text for *_, text in sorted(texts)]


# --------------------------------------------------------------------------------------- 5. tokenize
class TokenizeStep(PrepareStep):
    name = "tokenize"

    def run(self, data, rank: int = 0, world_size: int = 1):
        from codegen2.tokenizer import CodeGenTokenizer

        out_dir = self.begin("tokens")
        tokenizer = CodeGenTokenizer.load(Path(self.out) / "tokenizer.json")
        dtype = token_dtype(tokenizer.vocab_size)
        progress = Progress(f"tokenize task {rank + 1}/{world_size}")
        for r in range(rank, self.read_tasks, world_size):
            index, lengths = [], []
            tmp = staging_path(out_dir / f"{r:05d}.bin", staging_token())
            docs = chars = 0
            with open(tmp, "wb") as handle:
                batch: list[tuple[int, str]] = []
                batch_chars = 0
                for i, _, text in iter_kept_docs(self.work, r):
                    batch.append((i, text))
                    batch_chars += len(text)
                    docs, chars = docs + 1, chars + len(text)
                    if batch_chars >= TOKENIZE_BATCH_CHARS:
                        self._encode(tokenizer, batch, handle, dtype, index, lengths)
                        batch, batch_chars = [], 0
                        progress.update(docs, chars)
                self._encode(tokenizer, batch, handle, dtype, index, lengths)
            save_npy(out_dir / f"{r:05d}.index.npy", np.stack([np.asarray(index, dtype=np.int64),
                                                               np.asarray(lengths, dtype=np.int64)], axis=1)
                     .reshape(-1, 2))
            commit_file(tmp, out_dir / f"{r:05d}.bin")
        task_done_pause()
        if data:
            yield from data


    @staticmethod
    def _encode(tokenizer, batch: list[tuple[int, str]], handle, dtype: np.dtype, index: list[int],
                lengths: list[int]) -> None:
        """Append the tokens of `batch` (each document + the end-of-text, after BOS where the family adds one,
        as `CodeGenTokenizer.encode_document`) to `handle`, recording index and length."""
        ids_batch = tokenizer.encode_batch([text for _, text in batch], literal_specials=True)
        bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
        for (i, _), ids in zip(batch, ids_batch):
            ids = bos + ids + [tokenizer.eot_id]
            np.asarray(ids, dtype=dtype).tofile(handle)
            index.append(i)
            lengths.append(len(ids))


# --------------------------------------------------------------------------------------- 6. merge
class MergeStep(PrepareStep):
    name = "shards and manifest"

    def __init__(self, config: Config, out: str, read_tasks: int, fingerprint: str, settings: dict[str, Any]):
        super().__init__(config, out, read_tasks)
        self.fingerprint, self.settings = fingerprint, settings

    def run(self, data, rank: int = 0, world_size: int = 1):
        quiet_datatrove_logs()
        from codegen2.tokenizer import CodeGenTokenizer

        out = Path(self.out)
        if (out / MANIFEST).is_file():  # finished before a kill that came ahead of datatrove's completion mark
            return
        tokenizer = CodeGenTokenizer.load(out / "tokenizer.json")
        dtype = token_dtype(tokenizer.vocab_size)
        sources = data_sources(self.config.data, "train", all_kinds=True)
        table, token_files = self.read_table(dtype)
        counts = self.counts(sources)
        manifest_sources, heldout_rows = [], []
        for s, source in enumerate(sources):
            shard_dir = out / "shards" / source.name
            shard_dir.mkdir(parents=True, exist_ok=True)
            splits = {}
            for sp, split in enumerate(SPLITS):
                rows = table[(table[:, 0] == s) & (table[:, 1] == sp)]
                rows = rows[np.lexsort((rows[:, 3].view(np.uint64), rows[:, 2].view(np.uint64)))]
                splits[split] = self.write_split(shard_dir, split, rows, token_files, dtype, counts[source.name][split])
                if split == "heldout":
                    heldout_rows.extend((source.name, source.kind, r, i) for r, i in rows[:, [4, 7]].tolist())
            manifest_sources.append({"name": source.name, "kind": source.kind, "weight": source.weight,
                                     "description": source.description, "splits": splits,
                                     **({"git": source.git} if source.git else {})})
        self.write_removed(out)
        heldout = self.write_heldout(out, heldout_rows)
        origin = json.loads((self.work / "tokenizer.json").read_text(encoding="utf-8"))
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.str, "eot_id": tokenizer.eot_id,
            "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, **origin},
            "config_fingerprint": self.fingerprint, "settings": self.settings, "sources": manifest_sources,
            "totals": {"docs": int(len(table)), "tokens": int(table[:, 6].sum()) if len(table) else 0},
            "heldout_documents": heldout,
        }
        write_json(out / MANIFEST, manifest)
        del token_files
        shutil.rmtree(self.work, ignore_errors=True)
        task_done_pause()
        if data:
            yield from data

    def read_table(self, dtype: np.dtype) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every kept document as a row (source, split, order, key, read task, offset, length, index in the read
        task), and each read task's tokens (memory-mapped)."""
        entries, token_files = [], []
        for r in range(self.read_tasks):
            meta = np.load(self.work / "read" / f"{r:05d}.meta.npz")
            idx = np.load(self.work / "tokens" / f"{r:05d}.index.npy")
            token_files.append(np.memmap(self.work / "tokens" / f"{r:05d}.bin", dtype=dtype, mode="r")
                               if idx[:, 1].sum() else np.empty(0, dtype=dtype))
            doc = idx[:, 0]
            offsets = (np.cumsum(idx[:, 1]) - idx[:, 1]).astype(np.int64)  # empty for a task that kept nothing
            entries.append(np.stack([meta["source"][doc].astype(np.int64), meta["split"][doc].astype(np.int64),
                                     meta["order"][doc].view(np.int64), meta["key"][doc].view(np.int64),
                                     np.full(len(doc), r, dtype=np.int64), offsets, idx[:, 1], doc], axis=1)
                           .reshape(-1, 8))
        return np.concatenate(entries), token_files

    def write_split(self, shard_dir: Path, split: str, rows: np.ndarray, token_files: list[np.ndarray],
                    dtype: np.dtype, c: Counter) -> dict[str, Any]:
        """Write one source's split (its `rows`, in shard order) into shards; returns its manifest entry."""
        writer = ShardWriter(shard_dir, split, self.config.prepare.shard_tokens, dtype)
        for _, _, _, _, r, offset, length, _ in rows.tolist():
            writer.write(token_files[r][offset:offset + length])
        shards = writer.finish()
        redacted = {k[9:]: c.pop(k) for k in sorted(c) if k.startswith("redacted_")}
        return {"docs_in": c.pop("docs_in", 0), "chars_in": c.pop("chars_in", 0),
                "removed": {k: v for k, v in sorted(c.items()) if not k.startswith("skipped_")},
                "redacted": redacted,
                "skipped": {k[8:]: v for k, v in sorted(c.items()) if k.startswith("skipped_")},
                "docs": len(rows), "tokens": int(rows[:, 6].sum()) if len(rows) else 0, "shards": shards}

    def counts(self, sources) -> dict[str, dict[str, Counter]]:
        counts: dict[str, dict[str, Counter]] = {s.name: {sp: Counter() for sp in SPLITS} for s in sources}
        files = [self.work / "read" / f"{r:05d}.counts.json" for r in range(self.read_tasks)]
        files.append(self.work / "dedup" / "counts.json")
        for path in files:
            for name, by_split in json.loads(path.read_text(encoding="utf-8")).items():
                for split, c in by_split.items():
                    counts[name][split].update(c)
        return counts

    def write_heldout(self, out: Path, rows: list[tuple[str, str, int, int]]) -> dict[str, Any]:
        """`heldout.jsonl`: the text of every kept held-out document (source, kind, path, text), in the order of
        the held-out shards. Evaluation reads it (the infill tasks need text); only held-out documents are
        kept in memory here."""
        wanted: dict[int, dict[int, int]] = defaultdict(dict)  # read task -> index in it -> output position
        for position, (_, _, r, i) in enumerate(rows):
            wanted[r][i] = position
        texts: list[tuple[str, str] | None] = [None] * len(rows)
        for r, indices in wanted.items():
            with open(self.work / "read" / f"{r:05d}.docs.jsonl", encoding="utf-8") as handle:
                for i, line in enumerate(handle):
                    if i in indices:
                        record = json.loads(line)
                        texts[indices[i]] = (record["path"], record["text"])
        digest, size = hashlib.sha256(), 0

        def write(tmp: Path) -> None:
            nonlocal size
            with open(tmp, "wb") as handle:
                for (name, kind, _, _), (path, text) in zip(rows, texts):
                    line = (json.dumps({"source": name, "kind": kind, "path": path, "text": text},
                                       ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
                    handle.write(line)
                    digest.update(line)
                    size += len(line)

        write_atomic(out / HELDOUT_DOCUMENTS, write)
        return {"file": HELDOUT_DOCUMENTS, "docs": len(rows), "bytes": size, "sha256": digest.hexdigest()}

    def write_removed(self, out: Path) -> None:
        removed = []
        for r in range(self.read_tasks):
            removed.extend(json.loads((self.work / "read" / f"{r:05d}.removed.json").read_text(encoding="utf-8")))
        removed.extend(json.loads((self.work / "dedup" / "removed.json").read_text(encoding="utf-8")))
        redacted = [row for r in range(self.read_tasks)
                    for row in json.loads((self.work / "read" / f"{r:05d}.redacted.json").read_text(encoding="utf-8"))]
        for name, rows in (("removed.jsonl", removed), ("redacted.jsonl", redacted)):
            rows.sort(key=lambda d: (d["source"], d["split"], d["path"], d.get("path_bytes", "")))
            write_atomic(out / name, lambda tmp, rows=rows: tmp.write_text(
                "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in rows), encoding="utf-8"))
