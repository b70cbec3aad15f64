"""Writing files so that a kill at any moment leaves either the old or the new version, never half of one.

Everything is first written under a staging name (`<name>.tmp-<token>`, next to the final path), fsynced,
then renamed into place and the parent directory fsynced. A name containing `.tmp-` is never a finished
file or directory: `remove_stale_temporaries` deletes what an interrupted write left behind. Deleting a
directory renames it to a staging name first, so a half-deleted tree is never read as a whole one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

STAGING = ".tmp-"  # marks a staging name: never a finished file or directory
REPLACED = ".tmp-old-"  # an existing directory moved aside while its replacement is renamed into place


def staging_path(final: str | Path, token: str) -> Path:
    """Where `final` is written before it is renamed into place (`token` keeps concurrent writers apart)."""
    final = Path(final)
    return final.parent / f"{final.name}{STAGING}{token}"


def is_staging(path: str | Path) -> bool:
    return STAGING in Path(path).name


def fsync_path(path: str | Path) -> None:
    """fsync a file or directory so a rename that follows is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (children before parents)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a staging path to write `path`'s new content to; on success fsync it and rename it into place.

    On an exception the staging file is removed and `path` keeps its old content (or stays absent).
    """
    path = Path(path)
    tmp = staging_path(path, str(os.getpid()))
    try:
        yield tmp
        commit_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit_file(tmp: str | Path, final: str | Path) -> None:
    """Make the fully written file `tmp` (a `staging_path`) durable and atomically visible as `final`."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(Path(final).parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path`'s content with `data` atomically and durably."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path`'s content with `text` (UTF-8) atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


def commit_directory(tmp: str | Path, final: str | Path) -> None:
    """Make the fully written directory `tmp` durable and atomically visible as `final`."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if final.exists():
        # The old copy stays restorable until the swap is done (remove_stale_temporaries puts it back if we
        # die in between).
        trash = final.parent / f"{final.name}{REPLACED}{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success fsync its files and rename it to `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(final, str(os.getpid()))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_atomically(path: str | Path, reason: str) -> None:
    """Delete a file or directory; a directory is first renamed to a staging name (`reason` goes into it), so
    a kill mid-delete never leaves a partial one under its own name."""
    path = Path(path)
    if path.is_dir():
        doomed = staging_path(path, f"{reason}-{os.getpid()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif path.exists():
        path.unlink()


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete the staging files and directories an interrupted write left in `directory`, and put back a
    directory caught mid-swap by `commit_directory` whose replacement never landed."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if REPLACED in p.name:
            final = directory / p.name.split(STAGING)[0]
            if not final.exists():
                os.rename(p, final)
                continue
        if is_staging(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def umask() -> int:
    """This process's umask, read without changing it (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
