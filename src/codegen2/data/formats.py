"""Readers for user data: directories of text files, JSONL, Parquet and saved HF datasets.

Every reader yields `Document`s whose held-out key passes `keep` and counts what it skips in
`skipped` (a Counter): files that are not UTF-8 or are binary, null values, and (only with
`skip_bad_lines`) malformed JSONL lines or records without the text field. Without
`skip_bad_lines` those raise a one-line `UserError` naming the file, the line and the field.
Records are only parsed when their key belongs to the split being read.

No single entry of a directory stops a reader: a name that is not UTF-8, a dangling or looping symlink,
a symlinked directory (never followed), a FIFO, socket or device (never opened for reading), an
unreadable file or directory, a file that vanishes or changes while it is read, and one over
`HUGE_FILE_BYTES` are each skipped under their reason. With a `Skipped` counter the skipped files are
also listed (for `removed.jsonl`), their paths written losslessly (`path_record`).

A directory inside a git work tree is read through git (`git_tree`): only the files git tracks, as they are in
the work tree; a tracked symlink that leads out of the source root is skipped (`symlink_outside`).

Held-out keys: a file's path relative to the source root (a single-file source: its name);
"REL:LINE" (1-based) for JSONL records; "REL:ROW" (0-based) for Parquet rows; "SPLIT:ROW" for HF
datasets.

Compressed JSONL (`.jsonl.gz`, `.jsonl.zst`) is read as a stream; a corrupt or truncated file is a
one-line error naming it (with `skip_bad_lines`: skipped and counted as `corrupt_files`).

`shard=(rank, world_size)` makes a reader read only its share of the files (chosen by a hash of the
relative path; rows of an HF dataset by row number), so parallel tasks together read each file once.

Globs (`include` / `exclude`) match the path relative to the source root, gitignore-style: `*`
and `?` stay within one path component, `**` crosses components, and a pattern without a `/`
matches the file name at any depth. An `exclude` pattern that matches a directory excludes
everything below it. Version-control and `__pycache__` directories are never read, nor are
directories marked with a `.codegen2-not-data` file (run directories and token caches).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import re
import shutil
import stat
import subprocess
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from codegen2.config import SourceConfig
from codegen2.data.documents import Document, stable_fraction
from codegen2.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst")
PARQUET_SUFFIXES = (".parquet",)
HF_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))
NEVER_READ_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__"})
# Run and cache directories carry this file, so `--data .` never trains on its own checkpoints,
# tokenizer or token caches (and their changes never invalidate the source's cache).
NOT_DATA_MARKER = ".codegen2-not-data"
BATCH_ROWS = 1024
# A file over this size is skipped ("huge") without being read: it would be dropped by any size filter
# (prepare.max_file_bytes is 1 MB by default), and reading it whole could exhaust the memory of a task.
HUGE_FILE_BYTES = 256 << 20

Keep = Callable[[str], bool]


class Skipped(Counter):
    """What a reader passed over: a count per reason, plus (in `entries`) each skipped file with its reason
    and lossless path, for `removed.jsonl`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.entries: list[dict[str, str]] = []


def path_record(path: str | Path) -> dict[str, str]:
    """A path for a JSON record, lossless and valid UTF-8: `path` is printable (bytes that are not UTF-8 as
    \\xNN); a name that is not UTF-8 also gets `path_bytes`, its raw bytes in hex."""
    raw = os.fsencode(path)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path": raw.decode("utf-8", "backslashreplace"), "path_bytes": raw.hex()}


def skip_file(skipped: Counter, reason: str, path: str | Path) -> None:
    """Count a skipped file under `reason` (and list it, when `skipped` is a `Skipped`)."""
    skipped[reason] += 1
    if isinstance(skipped, Skipped):
        skipped.entries.append({"reason": reason, **path_record(path)})


def in_shard(rel: str, shard: tuple[int, int] | None) -> bool:
    """Whether the file at relative path `rel` belongs to task `rank` of `world_size`."""
    if shard is None or shard[1] <= 1:
        return True
    rank, world_size = shard
    return int(stable_fraction(rel, "prepare-shard") * world_size) == rank


# ------------------------------------------------------------------------------------------ formats
def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any(all((path / m).is_file() for m in markers) for markers in HF_MARKERS)


def detect_format(path: Path, declared: str, include: Sequence[str] = ("**/*",), exclude: Sequence[str] = ()) -> str:
    """The concrete format of a source path ('auto' resolved from the path and, for a directory,
    from its selected files: all JSONL -> jsonl, all Parquet -> parquet, else plain text files)."""
    if declared == "hf":
        if not is_hf_dataset_dir(path):
            raise UserError(f"data source {path}: format 'hf' needs a directory written by datasets' save_to_disk "
                            "(with dataset_info.json and state.json, or dataset_dict.json)")
        return "hf"
    if declared != "auto":
        return declared
    if path.is_dir():
        if is_hf_dataset_dir(path):
            return "hf"
        # A directory of JSONL (or Parquet) shards means records, not text files to train on verbatim.
        names = [rel.lower() for rel, _ in list_files(path, include, exclude)]
        for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
            if names and all(name.endswith(suffixes) for name in names):
                return fmt
        return "dir"
    suffix, name = path.suffix.lower(), path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix == ".json":
        raise UserError(f"data source {path}: a .json file is ambiguous; name JSON Lines files *.jsonl, "
                        "or set format = \"dir\" to train on the file as plain text")
    return "dir"


# ------------------------------------------------------------------------------------------ globbing
@lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a gitignore-style glob (see the module docstring) to a regex over relative paths."""
    pattern = pattern.strip()
    anchored = pattern.startswith("/") or "/" in pattern.rstrip("/")
    pattern = pattern.strip("/")
    if not anchored:
        pattern = "**/" + pattern
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def path_selected(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether relative POSIX path `rel` passes the include globs and no exclude glob."""
    if not any(glob_regex(p).fullmatch(rel) for p in include):
        return False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return not any(glob_regex(p).fullmatch(prefix) for p in exclude for prefix in prefixes)


def mark_not_data(directory: Path) -> None:
    """Mark a directory this project writes (run, cache) so that data sources never read it."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / NOT_DATA_MARKER
    if not marker.exists():
        marker.write_text("codegen2 output: never read as training data\n", encoding="utf-8")


def entry_problem(rel: str, entry: os.DirEntry) -> str | None:
    """Why a directory entry cannot be read as a data file (None for a regular file or a symlink to one),
    decided without opening it (opening a FIFO for reading blocks) and, for a plain file, without a stat."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "name_not_utf8"
    try:
        if entry.is_file():
            return None
        mode = entry.stat().st_mode  # follows a symlink
    except FileNotFoundError:
        return "dangling_symlink" if entry.is_symlink() else "vanished"
    except OSError as exc:
        return "symlink_loop" if exc.errno == errno.ELOOP else "unreadable"
    if stat.S_ISREG(mode):
        return None
    return "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "not_a_file"


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop: not a directory (entry_problem says what it is)
        return False


def walk_files(root: Path, odd: list[tuple[str, Path, str]] | None = None) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of every regular file under `root` (files of a directory, then its
    subdirectories, each sorted by name), skipping version-control, `__pycache__` and marked directories.
    Entries that are no readable file (see `entry_problem`), symlinked directories (never followed) and
    directories that cannot be listed are left out, and appended to `odd` as (rel, path, reason)."""
    def note(rel: str, path: Path, reason: str) -> None:
        if odd is not None:
            odd.append((rel, path, reason))

    def walk(here: Path, rel_dir: str) -> Iterator[tuple[str, Path]]:
        try:
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            if not rel_dir:
                raise UserError(f"data source {root}: cannot list the directory ({exc.strerror})") from None
            note(rel_dir.rstrip("/"), here, "unreadable_dir")
            return
        subdirs = []
        for entry in entries:
            rel, path = rel_dir + entry.name, here / entry.name
            if _is_dir(entry):
                if entry.name in NEVER_READ_DIRS or (path / NOT_DATA_MARKER).exists():
                    continue
                if entry.is_symlink():
                    note(rel, path, "symlinked_dir")
                else:
                    subdirs.append(entry.name)
            elif entry.name != NOT_DATA_MARKER:
                problem = entry_problem(rel, entry)
                if problem is None:
                    yield rel, path
                else:
                    note(rel, path, problem)
        for name in subdirs:
            yield from walk(here / name, f"{rel_dir}{name}/")

    yield from walk(Path(root), "")


def list_files(root: Path, include: Sequence[str], exclude: Sequence[str], suffixes: tuple[str, ...] = (),
               odd: list[tuple[str, Path, str]] | None = None) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of the selected files under `root`, sorted; a file root is itself. Selected
    entries that are no readable file go to `odd` (see `walk_files`)."""
    if root.is_file():
        return [(root.name, root)]

    def selected(rel: str) -> bool:
        return (not suffixes or rel.lower().endswith(suffixes)) and path_selected(rel, include, exclude)

    found: list[tuple[str, Path, str]] = []
    files = [(rel, path) for rel, path in walk_files(root, found) if selected(rel)]
    if odd is not None:
        odd.extend(entry for entry in found if selected(entry[0]))
    return files


def skip_odd(odd: list[tuple[str, Path, str]], keep: Keep, skipped: Counter,
             shard: tuple[int, int] | None) -> None:
    """Count the odd entries of a source once: in the split their path's key belongs to, by the task whose
    share their path is in."""
    for rel, path, reason in odd:
        if in_shard(rel, shard) and keep(rel):
            skip_file(skipped, reason, path)


# -------------------------------------------------------------------------------------------- git
@dataclass(frozen=True)
class GitTree:
    """What a source in a git work tree reads: the tracked files under its root, and where they come from."""

    files: tuple[str, ...]  # paths relative to the source root (POSIX), sorted, as `git ls-files` lists them
    commit: str | None  # HEAD; None before the first commit
    dirty: bool  # tracked files under the root differ from HEAD (the work tree's text is what is read)

    def manifest(self) -> dict:
        return {"commit": self.commit, "dirty": self.dirty, "tracked_files": len(self.files)}


def _in_git_work_tree(root: Path) -> bool:
    """A `.git` repository (a directory with HEAD) or gitdir file (worktrees, submodules) in `root` or above."""
    return any((parent / ".git" / "HEAD").is_file() or (parent / ".git").is_file() for parent in (root, *root.parents))


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=False)


def git_tree(root: Path) -> GitTree | None:
    """The tracked files of a directory inside a git work tree, or None when it is in none or git tracks
    nothing under it (a data directory the repository ignores is read as a plain directory). Untracked and
    ignored files are never listed, so `.git/`, virtual environments and build output stay out."""
    if not root.is_dir() or not _in_git_work_tree(root.resolve()):
        return None
    if shutil.which("git") is None:
        raise UserError(f"data source {root} is in a git work tree but git is not installed; install git, or set "
                        "git = false on the source to read the directory as plain files")
    listed = _git(root, "ls-files", "-z", "--cached", "--", ".")
    if listed.returncode != 0:
        why = (listed.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[0]
        raise UserError(f"data source {root}: git cannot list the tracked files ({why}); repair the work tree, or set "
                        "git = false on the source to read the directory as plain files")
    files = tuple(sorted({name for name in listed.stdout.decode("utf-8", "surrogateescape").split("\0") if name}))
    if not files:
        return None
    head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD")
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=no", "--", ".")
    commit = head.stdout.decode().strip() if head.returncode == 0 else None
    return GitTree(files=files, commit=commit, dirty=bool(status.stdout.strip()) or commit is None)


def tracked_files(root: Path, tree: GitTree, include: Sequence[str], exclude: Sequence[str],
                  odd: list[tuple[str, Path, str]]) -> list[tuple[str, Path]]:
    """(relative path, path) of the selected tracked files that are there to read. A symlink that leads out of
    the source root is not followed, nor one to a directory (both go to `odd`, see `walk_files`); a deleted
    file or a submodule is passed over."""
    real_root = root.resolve()
    out = []
    for rel in tree.files:
        path = root / rel
        if not path_selected(rel, include, exclude):
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(real_root):
            odd.append((rel, path, "symlink_outside"))
        elif path.is_symlink() and path.is_dir():
            odd.append((rel, path, "symlinked_dir"))
        elif path.is_file():
            out.append((rel, path))
    return out


def _shard_files(files: list[tuple[str, Path]], shard: tuple[int, int] | None) -> list[tuple[str, Path]]:
    return [(rel, path) for rel, path in files if in_shard(rel, shard)]


# A record source with fewer files than this many per task is split between tasks by record, not by file.
FILES_PER_TASK_FOR_FILE_SHARDING = 4


def _record_shards(files: list[tuple[str, Path]], keep: Keep, shard: tuple[int, int] | None
                   ) -> tuple[list[tuple[str, Path]], Keep]:
    """The files a task opens and the per-record `keep` it applies, for JSONL and Parquet sources.

    With many files, each task reads its share of the files. With few (one 50 GB JSONL is common), every
    task opens every file and keeps only its share of the records (by a hash of `file:record`), so the
    work still spreads over all tasks; lines outside the share are not even parsed. Either way the set of
    documents is the same, so the prepared output does not depend on the number of tasks."""
    if shard is None or shard[1] <= 1 or len(files) >= FILES_PER_TASK_FOR_FILE_SHARDING * shard[1]:
        return _shard_files(files, shard), keep
    return files, lambda key: in_shard(key, shard) and keep(key)


# --------------------------------------------------------------------------------------------- text
class Unreadable(Exception):
    """A file that was listed but cannot be read whole and unchanged; args[0] is the reason."""


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file, read once and checked unchanged; else `Unreadable` with the reason.
    Opened without blocking and checked to be a regular file before reading, so a FIFO or device that
    replaced the file since it was listed is never read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Unreadable("vanished") from None
    except OSError as exc:
        raise Unreadable("symlink_loop" if exc.errno == errno.ELOOP else "unreadable") from None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise Unreadable("not_a_file")
        if before.st_size > HUGE_FILE_BYTES:
            raise Unreadable("huge")
        chunks, size = [], 0
        while size < before.st_size:  # asks for one byte past the size: a file that grew is seen as changed
            chunk = os.read(fd, before.st_size + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        after = os.fstat(fd)
    except OSError:
        raise Unreadable("unreadable") from None
    finally:
        os.close(fd)
    if after.st_nlink == 0:
        raise Unreadable("vanished")
    if size != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise Unreadable("changed_while_read")
    return b"".join(chunks)


def read_text_file(path: Path, skipped: Counter) -> str | None:
    """A file's UTF-8 text, or None (counted and listed in `skipped`) when it cannot be read or is not text."""
    try:
        data = read_regular_file(path)
    except Unreadable as why:
        skip_file(skipped, why.args[0], path)
        return None
    if b"\x00" in data:
        skip_file(skipped, "binary", path)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skip_file(skipped, "not_utf8", path)
        return None
    return text.removeprefix("\ufeff")


def dir_records(root: Path, cfg: SourceConfig, keep: Keep, skipped: Counter,
                shard: tuple[int, int] | None = None, tree: GitTree | None = None) -> Iterator[Document]:
    """The text files of a directory: with `tree`, the files git tracks in it (see `git_tree`)."""
    odd: list[tuple[str, Path, str]] = []
    files = tracked_files(root, tree, cfg.include, cfg.exclude, odd) if tree else \
        list_files(root, cfg.include, cfg.exclude, odd=odd)
    if not files and not odd:
        raise UserError(f"data source {root}: no {'tracked ' if tree else ''}files match include={cfg.include} "
                        f"exclude={cfg.exclude}")
    skip_odd(odd, keep, skipped, shard)
    for rel, path in _shard_files(files, shard):
        if keep(rel):
            text = read_text_file(path, skipped)
            if text is not None:
                yield Document(text=text, path=str(path), kind=cfg.kind)


# -------------------------------------------------------------------------------------------- JSONL
def _bad_record(cfg: SourceConfig, skipped: Counter, reason: str, message: str, hint: str = "") -> None:
    if not cfg.skip_bad_lines:
        raise UserError(message + f" ({hint or 'set skip_bad_lines = true on this source to skip such lines'})")
    skipped[reason] += 1


def _field_hint(source_path: str, record: dict) -> str:
    """For a record without the configured text field: name the field that most likely holds the text."""
    texts = {key: len(value) for key, value in record.items() if isinstance(value, str)}
    if not texts:
        return ""
    best = max(texts, key=texts.get)
    return f'the text looks like it is in {best!r}: set field = "{best}" on this source, or --data {source_path}:{best}'


def _open_lines(path: Path) -> io.BufferedIOBase:
    """A binary line stream of a JSONL file, decompressing .gz / .zst on the fly."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def jsonl_records(root: Path, cfg: SourceConfig, keep: Keep, skipped: Counter,
                  shard: tuple[int, int] | None = None) -> Iterator[Document]:
    odd: list[tuple[str, Path, str]] = []
    files = list_files(root, cfg.include, cfg.exclude, JSONL_SUFFIXES, odd)
    if not files and not odd:
        raise UserError(f"data source {root}: no .jsonl files match include={cfg.include} exclude={cfg.exclude}")
    skip_odd(odd, keep, skipped, shard)
    opened, keep_record = _record_shards(files, keep, shard)
    for rel, path in opened:
        try:
            yield from _jsonl_file(rel, path, cfg, keep_record, skipped)
        except _corrupt_errors() as exc:
            kind = "zstd" if path.name.lower().endswith(".zst") else "gzip"
            if not cfg.skip_bad_lines:
                raise UserError(f"{path}: corrupt or truncated {kind} data ({exc or type(exc).__name__}); "
                                "set skip_bad_lines = true on this source to skip such files") from None
            if in_shard(rel, shard):  # counted once, by the task that owns the file
                skipped["corrupt_files"] += 1
        except OSError as exc:  # gone or unreadable since listed (after the above: BadGzipFile is an OSError)
            if in_shard(rel, shard) and keep(rel):
                skip_file(skipped, "vanished" if isinstance(exc, FileNotFoundError) else "unreadable", path)


def _jsonl_file(rel: str, path: Path, cfg: SourceConfig, keep: Keep, skipped: Counter) -> Iterator[Document]:
    with _open_lines(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip() or not keep(f"{rel}:{lineno}"):
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not valid UTF-8"
                _bad_record(cfg, skipped, "bad_lines", f"{where}: malformed JSON line ({detail})")
                continue
            if not isinstance(record, dict) or cfg.field not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                _bad_record(cfg, skipped, "missing_field", f"{where}: record has no field {cfg.field!r} (has: {keys})",
                            _field_hint(cfg.path, record) if isinstance(record, dict) else "")
                continue
            value = record[cfg.field]
            if value is None:
                skipped["null"] += 1
                continue
            if not isinstance(value, str):
                _bad_record(cfg, skipped, "missing_field",
                            f"{where}: field {cfg.field!r} is a {type(value).__name__}, not a string")
                continue
            yield Document(text=value, path=where, kind=cfg.kind)


# ------------------------------------------------------------------------------------------ Parquet
def _require_string_column(where: str, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise UserError(f"{where}: no column {field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"{where}: column {field!r} has type {kind}, not string")


def parquet_records(root: Path, cfg: SourceConfig, keep: Keep, skipped: Counter,
                    shard: tuple[int, int] | None = None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    odd: list[tuple[str, Path, str]] = []
    files = list_files(root, cfg.include, cfg.exclude, PARQUET_SUFFIXES, odd)
    if not files and not odd:
        raise UserError(f"data source {root}: no .parquet files match include={cfg.include} exclude={cfg.exclude}")
    skip_odd(odd, keep, skipped, shard)
    opened, keep_record = _record_shards(files, keep, shard)
    for rel, path in opened:
        try:
            table_file = pq.ParquetFile(path)
        except (FileNotFoundError, PermissionError) as exc:  # gone or unreadable since it was listed
            if in_shard(rel, shard) and keep(rel):
                skip_file(skipped, "vanished" if isinstance(exc, FileNotFoundError) else "unreadable", path)
            continue
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise UserError(f"{path}: cannot read Parquet file ({exc})") from None
        _require_string_column(str(path), table_file.schema_arrow, cfg.field)
        values = (v for batch in table_file.iter_batches(columns=[cfg.field], batch_size=BATCH_ROWS)
                  for v in batch.column(0).to_pylist())
        yield from _row_documents(values, f"{rel}:", f"{path}:", cfg.kind, keep_record, skipped)


# ------------------------------------------------------------------------------------- HF datasets
def load_hf_dataset(root: Path):
    """A `datasets.Dataset` from save_to_disk; of a DatasetDict, its 'train' split (or its only one)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:
        raise UserError(f"{root}: cannot load the saved Hugging Face dataset ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return "train", loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.items()))
        raise UserError(f"{root}: the dataset has splits {', '.join(loaded)}; save the one to train on "
                        "(or name it 'train')")
    return "data", loaded


def hf_records(root: Path, cfg: SourceConfig, keep: Keep, skipped: Counter,
               shard: tuple[int, int] | None = None) -> Iterator[Document]:
    split, dataset = load_hf_dataset(root)
    if shard is not None and shard[1] > 1:
        rank, world_size = shard
        keep_split = keep

        def keep(key: str) -> bool:
            return keep_split(key) and int(key.rsplit(":", 1)[1]) % world_size == rank
    if cfg.field not in dataset.column_names:
        raise UserError(f"{root}: no column {cfg.field!r} (columns: {', '.join(dataset.column_names)})")
    feature = dataset.features[cfg.field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"{root}: column {cfg.field!r} has type {feature}, not string")
    values = (v for batch in dataset.select_columns([cfg.field]).iter(batch_size=BATCH_ROWS) for v in batch[cfg.field])
    yield from _row_documents(values, f"{split}:", f"{root}:{split}:", cfg.kind, keep, skipped)


def _row_documents(values: Iterator, key_prefix: str, path_prefix: str, kind: str, keep: Keep,
                   skipped: Counter) -> Iterator[Document]:
    """Documents from a column of strings; a row's held-out key and path end in its row number."""
    for row, value in enumerate(values):
        if keep(f"{key_prefix}{row}"):
            if value is None:
                skipped["null"] += 1
            else:
                yield Document(text=value, path=f"{path_prefix}{row}", kind=kind)


# One reader per config.SOURCE_FORMATS (tests/test_architectures.py checks that they agree).
READERS = {"dir": dir_records, "jsonl": jsonl_records, "parquet": parquet_records, "hf": hf_records}
