"""What `--data PATH` names on the command line, and whether a resumed run is given its own data again.

`--data` takes source paths (`PATH[:FIELD]`: a directory, JSONL, Parquet or HF dataset) or one prepared
directory. A requeued job (scripts/slurm_train.sbatch) or a rerun after a kill passes the same `--data`
with `--resume`: that is a resume. Sources are the same when their resolved paths, kinds, fields and
weights are; the files' contents do not count, since a resumed run trains from its prepared data.
"""

from __future__ import annotations

import copy
from pathlib import Path

from codegen2.checkpoint import trained_step
from codegen2.config import DataConfig, SourceConfig
from codegen2.data.prepare.shards import is_prepared_dir
from codegen2.data.sources import source_from_path
from codegen2.errors import UserError


def sources_from_paths(paths: list[str], configured: list[SourceConfig]) -> list[SourceConfig]:
    """`--data PATH[:FIELD]` sources first, then the configured ones not named again."""
    given = []
    for item in paths:
        path, field = item, ""
        head, sep, tail = item.rpartition(":")
        if sep and head and not Path(item).exists() and Path(head).exists() and tail.isidentifier():
            path, field = head, tail  # file.jsonl:content names the text field
        source = source_from_path(path)
        if field:
            source.field = field
        source.validate()
        given.append(source)
    named = {s.path for s in given}
    return given + [s for s in configured if s.path not in named]


def data_with_paths(data: DataConfig, paths: list[str]) -> DataConfig:
    """A copy of `data` that trains on `paths`: one prepared directory, or sources put ahead of the
    configured ones."""
    data = copy.deepcopy(data)
    prepared = [p for p in paths if is_prepared_dir(p)]
    if prepared:
        if len(paths) > 1:
            raise UserError("--data with a prepared directory takes no other --data paths")
        data.prepared = str(Path(prepared[0]).resolve())
    elif paths:
        data.sources = sources_from_paths(paths, data.sources)
    return data


def _resolved(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def data_change(old: DataConfig, new: DataConfig) -> str:
    """What differs between two data settings, in words ("" when they train on the same data): the prepared
    directory, and sources added, dropped, or with another kind, field or weight (by resolved path)."""
    if _resolved(old.prepared) != _resolved(new.prepared):
        return f"prepared data {old.prepared or '(none)'} -> {new.prepared or '(none)'}"
    before = {_resolved(s.path): s for s in old.sources}
    after = {_resolved(s.path): s for s in new.sources}
    changes = [f"adds source {path}" for path in after if path not in before]
    changes += [f"drops source {path}" for path in before if path not in after]
    for path in before.keys() & after.keys():
        a, b = before[path], after[path]
        changes += [f"source {path}: {what} {x!r} -> {y!r}" for what, x, y in
                    (("kind", a.kind, b.kind), ("field", a.field, b.field), ("weight", a.weight, b.weight)) if x != y]
    return "; ".join(sorted(changes))


def resume_data(data: DataConfig, paths: list[str], run_dir: Path) -> DataConfig | None:
    """The data a resumed run trains on when it is given `--data paths`: None when they name the run's own data
    (go on), the new data for a run that has not trained yet (imported weights), else a one-line UserError
    naming what changed."""
    given = data_with_paths(data, paths)
    change = data_change(data, given)
    if not change:
        return None
    trained = trained_step(run_dir)
    if trained:
        raise UserError(f"--data cannot change the data of {run_dir} ({change}): it has trained to step {trained} "
                        f"on its own; resume without --data, or start a new run from its weights with "
                        f"--init-from {run_dir}")
    return given
