"""Prepare tasks split a source with few files by record, so one big JSONL or Parquet file still spreads over
every task, and the prepared output stays the same for any number of tasks."""

from __future__ import annotations

import gzip
import json
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

from codegen2.config import SourceConfig, load_config
from codegen2.data.formats import jsonl_records, parquet_records
from codegen2.data.prepare.pipeline import prepare

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(n: int) -> list[str]:
    files = sorted(p for p in (STDLIB / "email").rglob("*.py") if 2000 < p.stat().st_size < 40_000)
    return [p.read_text(encoding="utf-8") for p in files[:n]]


def write_jsonl_gz(path: Path, texts: list[str], truncate: bool = False) -> None:
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(3, "{not json")  # a malformed line: skipped and counted once
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path.write_bytes(data[: len(data) * 2 // 3] if truncate else data)


def read_all(reader, root: Path, cfg: SourceConfig, tasks: int) -> tuple[list[list[str]], Counter]:
    skipped: Counter = Counter()
    shares = [[d.path for d in reader(root, cfg, lambda key: True, skipped, (rank, tasks))] for rank in range(tasks)]
    return shares, skipped


@pytest.mark.parametrize("truncate", [False, True])
def test_one_jsonl_file_is_split_between_tasks_by_record(tmp_path, truncate):
    root = tmp_path / "big.jsonl.gz"
    write_jsonl_gz(root, stdlib_texts(40), truncate=truncate)
    cfg = SourceConfig(path=str(root), skip_bad_lines=True)
    (whole,), whole_skipped = read_all(jsonl_records, root, cfg, 1)
    shares, skipped = read_all(jsonl_records, root, cfg, 3)
    assert all(shares), "every task reads a share of the single file"
    assert sorted(p for share in shares for p in share) == sorted(whole)  # disjoint, nothing lost
    assert skipped == whole_skipped  # the bad line (and the truncated file) counted once, not once per task
    assert whole_skipped["bad_lines"] == 1 and whole_skipped["corrupt_files"] == int(truncate)


def test_one_parquet_file_is_split_between_tasks_by_record(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": stdlib_texts(30)}), root)
    cfg = SourceConfig(path=str(root))
    (whole,), _ = read_all(parquet_records, root, cfg, 1)
    shares, _ = read_all(parquet_records, root, cfg, 4)
    assert all(shares) and sorted(p for share in shares for p in share) == sorted(whole)


def test_many_files_are_still_split_by_file(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    texts = stdlib_texts(24)
    for i in range(24):
        write_jsonl_gz(root / f"part-{i:02d}.jsonl.gz", texts[i:i + 1])
    shares, _ = read_all(jsonl_records, root, SourceConfig(path=str(root), skip_bad_lines=True), 3)
    for share in shares:  # whole files per task: a file's records never straddle two tasks
        files = {p.rsplit(":", 1)[0] for p in share}
        assert all(f not in {q.rsplit(":", 1)[0] for other in shares if other is not share for q in other}
                   for f in files)


def test_prepare_of_one_jsonl_file_is_identical_for_1_and_3_tasks(tmp_path):
    source = tmp_path / "big.jsonl.gz"
    write_jsonl_gz(source, stdlib_texts(40))
    outs = []
    for tasks in (1, 3):
        config = load_config(None, preset="tiny")
        config.data.sources = [SourceConfig(path=str(source), kind="code", skip_bad_lines=True)]
        config.data.heldout_fraction = 0.1
        config.tokenizer.vocab_size = 600
        config.tokenizer.train_chars = 200_000
        out = tmp_path / f"out{tasks}"
        prepare(config, out, tasks=tasks, workers=1, log=lambda m: None)
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*")
                   if p.is_file() and p.relative_to(outs[0]).parts[0] != "logs" and p.name != "plan.json")
    assert any(p.parts[0] == "shards" for p in files)
    for rel in files:
        assert (outs[1] / rel).read_bytes() == (outs[0] / rel).read_bytes(), rel


def test_more_tasks_than_files_leaves_some_tasks_empty_and_still_prepares(tmp_path):
    """A read task that gets no file (here 6 tasks for 3 files) used to crash the merge."""
    root = tmp_path / "three"
    root.mkdir()
    for i, text in enumerate(stdlib_texts(3)):
        (root / f"m{i}.py").write_text(text, encoding="utf-8")
    config = load_config(None, preset="tiny")
    config.data.sources = [SourceConfig(path=str(root), kind="code")]
    config.data.heldout_fraction = 0.0
    config.tokenizer.vocab_size = 600
    config.tokenizer.train_chars = 100_000
    manifest = prepare(config, tmp_path / "out", tasks=6, workers=1, log=lambda m: None)
    assert manifest["totals"]["docs"] == 3
