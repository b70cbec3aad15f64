"""From a Config to training data: sources -> tokenizer -> token caches -> packed mixture."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from codegen2.config import Config
from codegen2.data.cache import build_token_cache
from codegen2.data.documents import stable_fraction
from codegen2.data.formats import mark_not_data
from codegen2.data.mixture import PackedMixture
from codegen2.data.sources import Source, data_sources
from codegen2.errors import UserError
from codegen2.tokenizer import CodeGenTokenizer, train_tokenizer

log = logging.getLogger(__name__)


def sample_texts(source: Source, budget: int, seed: int) -> list[str]:
    """A deterministic sample of about `budget` characters of `source`'s documents.

    Documents are ranked by a seeded hash of their path and taken in that order while they fit
    (streaming, memory bounded by the budget), so the sample spreads over the whole source
    instead of favouring the first files of a sorted directory.
    """
    if budget <= 0:
        return []
    heap: list[tuple[float, str, str]] = []  # (-priority, path, text): the kept documents
    total = 0
    smallest: tuple[float, str, str] | None = None  # in case no whole document fits
    for doc in source.documents():
        priority = stable_fraction(doc.path, f"tokenizer-sample:{seed}")
        if smallest is None or priority < smallest[0]:
            smallest = (priority, doc.path, doc.text)
        heapq.heappush(heap, (-priority, doc.path, doc.text))
        total += len(doc.text)
        while total > budget and heap:
            total -= len(heapq.heappop(heap)[2])
    if not heap and smallest is not None:
        return [smallest[2][:budget]]
    return [text for _, _, text in sorted(heap, key=lambda item: (-item[0], item[1]))]


def tokenizer_training_texts(sources: Iterable[Source], total_chars: int, seed: int) -> list[str]:
    """Split the character budget between sources by their mixture weights."""
    sources = list(sources)
    weight_sum = sum(s.weight for s in sources)
    texts: list[str] = []
    for source in sources:
        texts.extend(sample_texts(source, int(total_chars * source.weight / weight_sum), seed))
    return texts


def resolve_tokenizer(config: Config, run_dir: Path, sources: list[Source],
                      tokenizer: CodeGenTokenizer | None) -> tuple[CodeGenTokenizer, dict[str, Any]]:
    """The given tokenizer, else tokenizer.path, else the run's saved one, else a newly trained one."""
    saved = run_dir / "tokenizer.json"
    if tokenizer is not None:
        info = {"origin": "given"}
    elif config.tokenizer.path:
        tokenizer, info = CodeGenTokenizer.load(config.tokenizer.path), {"origin": config.tokenizer.path}
    elif saved.is_file():
        tokenizer, info = CodeGenTokenizer.load(saved), {"origin": str(saved)}
    else:
        texts = tokenizer_training_texts(sources, config.tokenizer.train_chars, config.train.seed)
        log.info("training a %d-token BPE on %d characters", config.tokenizer.vocab_size, sum(map(len, texts)))
        tokenizer = train_tokenizer(texts, config.tokenizer.vocab_size, config.tokenizer.num_masks)
        info = {"origin": "trained", "train_chars": sum(map(len, texts)), "train_docs": len(texts)}
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                        f"{config.model.vocab_size}; set model.vocab_size to at least {tokenizer.vocab_size}")
    if not saved.is_file():
        tokenizer.save(run_dir)
    info.update(vocab_size=tokenizer.vocab_size, num_masks=tokenizer.num_masks, saved=str(saved))
    return tokenizer, info


def prepared_data(config: Config, run_dir: Path, tokenizer: CodeGenTokenizer | None
                  ) -> tuple[CodeGenTokenizer, PackedMixture, dict[str, Any]]:
    """Training data from a `codegen2 data prepare` directory: its tokenizer and memory-mapped train shards.

    Nothing is tokenized and no raw file is read. The run must use the directory's tokenizer: a different
    one (given, in tokenizer.path, or saved in the run directory by an earlier run) is an error.
    """
    from codegen2.data.prepare import PreparedData

    data = PreparedData.open(config.data.prepared)
    theirs = CodeGenTokenizer.load(data.root / "tokenizer.json")
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
    sources = [s for s in data.sources if s["splits"]["train"]["tokens"] > 0]
    if not sources:
        raise UserError(f"prepared data {data.root}: no training tokens")
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
                     "chunks": n, "shards": len(t["shards"])}
                    for s, w, n in zip(sources, mixture.weights, mixture.num_chunks) for t in [s["splits"]["train"]]],
        "tokens": int(sum(len(st) for st in streams)),
        "num_samples_per_epoch": mixture.num_samples_per_epoch,
    }
    stats["summary"] = {
        "data": f"prepared {data.root}: {shards} shard(s) memory-mapped, no tokenization, no raw-file walk",
        **{s["name"]: f"{s['docs']} docs, {s['tokens']:,} tokens, weight {s['weight']:.2f}" for s in stats["sources"]},
    }
    return theirs, mixture, stats


def prepare_data(config: Config, run_dir: str | Path, tokenizer: CodeGenTokenizer | None = None,
                 progress: bool = True) -> tuple[CodeGenTokenizer, PackedMixture, dict[str, Any]]:
    """Everything training needs from the data side, reusing the run's tokenizer and caches if present.

    With `data.prepared`, the shards of that directory (see `prepared_data`); otherwise the sources are
    tokenized into the run's token cache.
    """
    run_dir = Path(run_dir)
    if config.data.prepared:
        run_dir.mkdir(parents=True, exist_ok=True)
        return prepared_data(config, run_dir, tokenizer)
    mark_not_data(run_dir)  # `--data .` with the run inside it must not train on the run's files
    sources = data_sources(config.data, "train")
    tokenizer, tokenizer_info = resolve_tokenizer(config, run_dir, sources, tokenizer)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else run_dir / "data"
    caches = [build_token_cache(s, tokenizer, cache_dir, config.train.seed, progress=progress) for s in sources]
    mixture = PackedMixture([c.tokens for c in caches], [s.weight for s in sources], config.train.seq_len,
                            config.train.seed, names=[s.name for s in sources])
    stats: dict[str, Any] = {
        "tokenizer": tokenizer_info,
        "sources": [
            {"name": s.name, "kind": s.kind, "weight": float(w), "docs": c.manifest["docs"],
             "tokens": c.manifest["tokens"], "chunks": n, "skipped": c.manifest["skipped"],
             "truncated": c.manifest["truncated"], "heldout_docs": c.manifest.get("other_split"),
             "cache": str(c.path), "reused": c.reused}
            for s, c, w, n in zip(sources, caches, mixture.weights, mixture.num_chunks)
        ],
        "tokens": int(sum(c.manifest["tokens"] for c in caches)),
        "num_samples_per_epoch": mixture.num_samples_per_epoch,
    }
    stats["summary"] = {
        "tokenizer": tokenizer_info["origin"],
        **{s["name"]: f"{s['docs']} docs, {s['tokens']:,} tokens, weight {s['weight']:.2f}" for s in stats["sources"]},
    }
    return tokenizer, mixture, stats
