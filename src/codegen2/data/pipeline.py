"""From a Config to training data: every run trains from a prepared directory (docs/data.md).

With `data.prepared`, the directory `codegen2 data prepare` wrote. Otherwise the run prepares its own sources
(`--data PATH`, `[[data.sources]]` or the embedded corpus) with the same stages on datatrove's local executor,
in this process, into `RUN/prepared`: one data path. A resumed run reuses that directory (the raw files are no
longer needed); a run stopped while preparing continues the preparation where it stopped.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from codegen2.config import Config
from codegen2.data.formats import mark_not_data
from codegen2.data.mixture import PackedMixture
from codegen2.errors import UserError
from codegen2.tokenizer import CodeGenTokenizer

RUN_PREPARED = "prepared"  # RUN/prepared: the in-line prepared data of a run
OLD_TOKEN_CACHE = "data"  # RUN/data: the per-run token cache of codegen2 before the one data path
TASK_BYTES = 4 << 20  # in-line preparation: about one task per 4 MiB of raw data (at most one per core)


def run_prepared_dir(config: Config, run_dir: str | Path) -> Path:
    """Where a run's prepared data lives: `data.prepared`, else the run's own `RUN/prepared`."""
    return Path(config.data.prepared).expanduser() if config.data.prepared else Path(run_dir) / RUN_PREPARED


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def inline_tasks(config: Config) -> int:
    """Tasks (= workers) of an in-line preparation: one per TASK_BYTES of raw data, at most one per usable core,
    so small data runs in this process (no worker start-up) and the embedded corpus uses every core. The
    prepared output is the same for any number."""
    from codegen2.data.prepare.pipeline import source_bytes

    return max(1, min(usable_cores(), source_bytes(config) // TASK_BYTES))


def _inline_config(config: Config, run_dir: Path, tokenizer: CodeGenTokenizer | None) -> Config:
    """The config the run's sources are prepared with: the tokenizer is the given one (saved as the run's
    tokenizer.json), else tokenizer.path, else the run's saved tokenizer.json, else one trained by the prepare."""
    config = copy.deepcopy(config)
    saved = run_dir / "tokenizer.json"
    if tokenizer is not None:
        if saved.is_file() and CodeGenTokenizer.load(saved).fingerprint() != tokenizer.fingerprint():
            raise UserError(f"{saved} is another tokenizer than the one this run was given; start a new run")
        if not saved.is_file():
            tokenizer.save(run_dir)
        config.tokenizer.path = str(saved)
    elif not config.tokenizer.path and saved.is_file():
        config.tokenizer.path = str(saved)
    return config


def _changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for k in sorted(set(old) | set(new))
                for key in _changed_settings(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def prepare_inline(config: Config, run_dir: Path, tokenizer: CodeGenTokenizer | None = None, log=None) -> Path:
    """Prepare the run's sources into RUN/prepared (local executor, in this process), continue a preparation
    that was stopped, or reuse a finished one without reading any raw file; returns the directory."""
    from codegen2.data.prepare.pipeline import PLAN, prepare, prepare_settings, settings_fingerprint
    from codegen2.data.prepare.shards import MANIFEST

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    out = run_dir / RUN_PREPARED
    if (out / MANIFEST).is_file():
        settings = open_checked(out).manifest.get("settings", {})
        now = prepare_settings(config)
        changed = [k for section in ("data", "prepare")
                   for k in _changed_settings(settings.get(section), now[section], f"{section}.")]
        if changed:
            raise UserError(f"{out}: the run's data was prepared with other settings than its config has now "
                            f"({', '.join(changed[:4])}); resume without changing them, or start a new run")
        return out
    old_cache = run_dir / OLD_TOKEN_CACHE
    if not out.exists() and old_cache.is_dir() and any(old_cache.glob("*.npy")):
        log(f"note: {run_dir} was started on the per-run token cache of an earlier codegen2 ({old_cache}); "
            f"its sources are prepared again into {out} (filtered and deduplicated), so training continues on "
            "another sample order")
    inline = _inline_config(config, run_dir, tokenizer)
    resume = (out / PLAN).is_file()
    if resume:
        plan = _read_json(out / PLAN, out)
        tasks = int(plan.get("tasks", 1))
        if plan.get("fingerprint") != settings_fingerprint(prepare_settings(inline)):
            raise UserError(f"{out}: the run's unfinished data preparation was started with other settings "
                            "(sources, filters, tokenizer); resume with the run's config unchanged, or start "
                            "afresh with --overwrite")
        log(f"continuing the run's data preparation in {out} ({tasks} task(s))")
    else:
        tasks = inline_tasks(inline)
        log(f"preparing the run's data into {out} (filters, dedup, decontamination, tokenizer, shards; "
            f"{tasks} task(s) on this machine)")
    try:
        prepare(inline, out, tasks=tasks, workers=tasks, resume=resume, log=log)
    except KeyboardInterrupt:
        log(f"interrupted while preparing the data in {out}; `codegen2 train --out {run_dir} --resume` continues it")
        raise
    return out


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"prepared data {root}: {path.name} is unreadable ({exc}); the directory is damaged") \
            from None
    if not isinstance(value, dict):
        raise UserError(f"prepared data {root}: {path.name} is damaged")
    return value


def prepared_data(config: Config, run_dir: Path, tokenizer: CodeGenTokenizer | None, root: Path | None = None
                  ) -> tuple[CodeGenTokenizer, PackedMixture, dict[str, Any]]:
    """Training data from a prepared directory (`root`, else `data.prepared`): its tokenizer and memory-mapped
    train shards.

    Nothing is tokenized and no raw file is read. The run must use the directory's tokenizer: a different
    one (given, in tokenizer.path, or saved in the run directory by an earlier run) is an error.
    """
    from codegen2.data.prepare import PreparedData

    data = PreparedData.open(root or config.data.prepared)
    try:
        theirs = CodeGenTokenizer.load(data.root / "tokenizer.json")
    except Exception as exc:  # noqa: BLE001 - any unreadable tokenizer file is the same user-facing problem
        raise UserError(f"prepared data {data.root}: tokenizer.json is unreadable ({exc})") from None
    if theirs.fingerprint() != data.manifest["tokenizer"]["fingerprint"]:
        raise UserError(f"prepared data {data.root}: tokenizer.json does not match its manifest (was it replaced?)")
    saved = run_dir / "tokenizer.json"
    for origin, other in (("the given tokenizer", tokenizer),
                          (f"tokenizer.path={config.tokenizer.path}", config.tokenizer.path or None),
                          (f"the run's {saved}", saved if saved.is_file() else None)):
        if other is not None:
            other = other if isinstance(other, CodeGenTokenizer) else CodeGenTokenizer.load(other)
            if other.fingerprint() != theirs.fingerprint():
                raise UserError(f"prepared data {data.root} was tokenized with another tokenizer than {origin}; "
                                "prepare the data again with that tokenizer (tokenizer.path), or start a new run")
    if not saved.is_file():
        theirs.save(run_dir)
    if theirs.vocab_size > config.model.vocab_size:
        raise UserError(f"the prepared data's tokenizer has {theirs.vocab_size} tokens but model.vocab_size="
                        f"{config.model.vocab_size}; set model.vocab_size to at least {theirs.vocab_size}")
    # a source of weight 0 (the embedded corpus's prose in a code-only run) is prepared for its held-out
    # documents but not trained on
    sources = [s for s in data.sources if s["splits"]["train"]["tokens"] > 0 and s["weight"] > 0]
    if not sources:
        raise UserError(f"prepared data {data.root}: no training documents ({what_was_dropped(data)})")
    streams = [data.stream(s, "train") for s in sources]
    mixture = PackedMixture(streams, [s["weight"] for s in sources], config.train.seq_len, config.train.seed,
                            names=[s["name"] for s in sources])
    shards = sum(len(s["splits"]["train"]["shards"]) for s in sources)
    info = {"origin": str(data.root / "tokenizer.json"), "vocab_size": theirs.vocab_size,
            "num_masks": theirs.num_masks, "saved": str(saved)}
    stats: dict[str, Any] = {
        "tokenizer": info,
        "prepared": str(data.root),
        "sources": [{"name": s["name"], "kind": s["kind"], "weight": float(w), "docs": t["docs"], "tokens": t["tokens"],
                     "chunks": n, "shards": len(t["shards"]), "skipped": t.get("skipped", {}),
                     "removed": t.get("removed", {}), "heldout_docs": s["splits"]["heldout"]["docs"]}
                    for s, w, n in zip(sources, mixture.weights, mixture.num_chunks) for t in [s["splits"]["train"]]],
        "tokens": int(sum(len(st) for st in streams)),
        "num_samples_per_epoch": mixture.num_samples_per_epoch,
    }
    # in-line: the run prepared (or reused) its own data just before; else nothing of the raw data is touched
    where = f"the run's prepared data {data.root}: {shards} shard(s) memory-mapped" if root is not None else \
        f"prepared {data.root}: {shards} shard(s) memory-mapped, no tokenization, no raw-file walk"
    stats["summary"] = {
        "data": where,
        **{s["name"]: f"{s['docs']} docs, {s['tokens']:,} tokens, weight {s['weight']:.2f}" for s in stats["sources"]},
    }
    return theirs, mixture, stats


def prepare_data(config: Config, run_dir: str | Path, tokenizer: CodeGenTokenizer | None = None,
                 log=None) -> tuple[CodeGenTokenizer, PackedMixture, dict[str, Any]]:
    """Everything training needs from the data side: the prepared directory's tokenizer and train shards.

    With `data.prepared`, that directory; otherwise the run's sources are prepared into RUN/prepared first
    (see `prepare_inline`). Under torchrun only rank 0 calls this until the data is prepared.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.data.prepared:
        return prepared_data(config, run_dir, tokenizer)
    mark_not_data(run_dir)  # `--data .` with the run inside it must not train on the run's files
    root = prepare_inline(config, run_dir, tokenizer, log)
    open_checked(root)
    return prepared_data(config, run_dir, tokenizer, root)


def open_checked(root: Path):
    """A run's own prepared directory, opened and checked (manifest, shard sizes, tokenizer, held-out
    documents); damage is one line that says how to recover."""
    from codegen2.data.prepare import PreparedData

    try:
        data = PreparedData.open(root)
        data.check()
        CodeGenTokenizer.load(root / "tokenizer.json")
    except UserError as exc:
        raise UserError(f"{exc} (the run's own prepared data is damaged: remove {root} and run again with "
                        "--resume to prepare it again from the sources)") from None
    except Exception as exc:  # noqa: BLE001 - an unreadable tokenizer file
        raise UserError(f"prepared data {root}: tokenizer.json is unreadable ({type(exc).__name__}); remove {root} "
                        "and run again with --resume to prepare it again from the sources") from None
    return data


def what_was_dropped(data) -> str:
    """Per source, the training documents read and what was skipped or removed, for an empty-data message."""
    parts = []
    for source in data.sources:
        split = source["splits"]["train"]
        notes = [f"{what} " + ", ".join(f"{n:,} {why.replace('_', ' ')}" for why, n in sorted(counts.items()))
                 for what, counts in (("skipped", split.get("skipped", {})), ("removed", split.get("removed", {})))
                 if any(counts.values())]
        parts.append(f"{source['name']}: {split['docs_in']:,} documents" + "".join(f", {n}" for n in notes)
                     + (", weight 0" if not source["weight"] > 0 else ""))
    return "; ".join(parts)
