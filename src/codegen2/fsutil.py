"""Writing files so that a kill at any moment leaves either the old or the new version, never half of one.

Everything is first written under a staging name (`<name>.tmp-<PID>@<HOST>`, next to the final path), fsynced,
then renamed into place and the parent directory fsynced. A name containing `.tmp-` is never a finished
file or directory: `remove_stale_temporaries` deletes what an interrupted write left behind, and only that:
the staging of a process that still lives, or of another host (a shared filesystem), is left alone. Deleting
a directory renames it to a staging name first, so a half-deleted tree is never read as a whole one.

A write that fails for lack of space (ENOSPC, EDQUOT, EFBIG) or because the storage failed (EIO, EROFS)
becomes one line naming the directory (`storage_errors`), and `check_space` refuses a write that cannot fit
before it starts. `DirectoryLock` keeps a second writer out of a directory (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import RetryLater, StorageError

STAGING = ".tmp-"  # marks a staging name: never a finished file or directory
REPLACED = ".tmp-old-"  # an existing directory moved aside while its replacement is renamed into place
# The owner at the end of a staging name: `.tmp-[REASON-]PID@HOST`, or `.tmp-[REASON-]PID` before hosts were named.
_OWNER = re.compile(r"\.tmp-(?:[a-z]+-)?(\d+)(?:@(.+))?$")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file size limit (RLIMIT_FSIZE, a quota)
STORAGE_FAILED = (errno.EIO, errno.EROFS)
LOCK_FILE = ".lock"


def host_name() -> str:
    """This host's name as it goes into staging names and lock files (no '/' and no whitespace)."""
    return re.sub(r"[\s/]", "_", socket.gethostname()) or "localhost"


def staging_token(reason: str = "") -> str:
    """`[REASON-]PID@HOST`: who writes a staging name, so that a start removes only what dead writers left."""
    return f"{reason + '-' if reason else ''}{os.getpid()}@{host_name()}"


def staging_path(final: str | Path, token: str) -> Path:
    """Where `final` is written before it is renamed into place (`token`, from `staging_token`, keeps concurrent
    writers apart and names the owner)."""
    final = Path(final)
    return final.parent / f"{final.name}{STAGING}{token}"


def staging_owner(path: str | Path) -> tuple[int, str] | None:
    """(PID, host) of the process that wrote staging name `path` ("" host: a name from before hosts were named,
    taken as this host's), or None when the name carries no owner."""
    match = _OWNER.search(Path(path).name)
    return (int(match.group(1)), match.group(2) or "") if match else None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def abandoned(path: str | Path) -> bool:
    """A staging name whose writer is gone: a dead process of this host, or no owner in the name. Another
    host's staging is never abandoned from here: its process cannot be checked."""
    owner = staging_owner(path)
    if owner is None:
        return True
    pid, host = owner
    if host and host != host_name():
        return False
    return pid != os.getpid() and not process_alive(pid)


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
    tmp = staging_path(path, staging_token())
    try:
        with storage_errors(path.parent, path.name):
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
        trash = final.parent / f"{final.name}{REPLACED}{staging_token()}"
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
    tmp = staging_path(final, staging_token())
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with storage_errors(final.parent, final.name):
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
        doomed = staging_path(path, staging_token(reason))
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    elif path.exists():
        path.unlink()


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete the staging files and directories an interrupted write left in `directory`, and put back a
    directory caught mid-swap by `commit_directory` whose replacement never landed. Only what dead writers of
    this host left (`abandoned`): a live writer's staging, or another host's, stays."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        if not is_staging(p) or not abandoned(p):
            continue
        if REPLACED in p.name:
            final = directory / p.name.split(STAGING)[0]
            if not final.exists():
                os.rename(p, final)
                continue
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


# ------------------------------------------------------------------------------------ disk space
def free_bytes(directory: str | Path) -> int:
    """Bytes free to this user in `directory` (or its nearest existing parent)."""
    directory = Path(directory)
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    return shutil.disk_usage(directory).free


def no_space_message(directory: str | Path, what: str, needed: int | None = None) -> str:
    free = free_bytes(directory)
    need = f"needs about {needed:,} bytes, " if needed is not None else ""
    return (f"no space to write {what} in {directory}: {need}{free:,} bytes free; free some space there and run "
            f"the same command again (with --resume)")


def check_space(directory: str | Path, needed: int, what: str) -> None:
    """Refuse, before writing, `what` (about `needed` bytes) that cannot fit in `directory`."""
    if free_bytes(directory) < needed:
        raise RetryLater(no_space_message(directory, what, needed))


def _torch_write_failure(exc: RuntimeError) -> bool:
    """torch.save reports a failed write (a full disk, a file size limit) as a RuntimeError from its zip writer."""
    text = str(exc)
    return "PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text


@contextlib.contextmanager
def storage_errors(directory: str | Path, what: str) -> Iterator[None]:
    """Turn a write into `directory` that fails for lack of space (RetryLater) or a failing filesystem
    (StorageError) into one line naming the directory, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise RetryLater(no_space_message(directory, what)) from None
        if exc.errno in STORAGE_FAILED:
            raise StorageError(f"writing {what} in {directory} failed: {os.strerror(exc.errno)}; check that "
                               f"filesystem (mounted read-only? a failing disk?) before running again") from None
        raise
    except RuntimeError as exc:
        if _torch_write_failure(exc):
            raise RetryLater(no_space_message(directory, what)) from None
        raise


# ------------------------------------------------------------------------------------ one writer
class DirectoryLock:
    """An exclusive `flock` on DIRECTORY/.lock, held while one process writes the directory (a training run, a
    data preparation). The OS drops it when the process dies, so a killed writer never blocks its own restart.
    The holder writes "PID HOST" into the file, and a second writer is refused in one line naming them. Where
    the filesystem has no flock (ENOLCK, EOPNOTSUPP) the lock is skipped with a warning (docs/reliability.md)."""

    def __init__(self, directory: str | Path, what: str):
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise RetryLater(f"{self.path.parent} is in use by another {self.what} (PID {pid} on host {host}); "
                             f"wait for it to end or stop it, then run again") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {self.path.parent}: this filesystem cannot lock ({os.strerror(exc.errno)}); nothing "
                  f"keeps a second {self.what} out of it", file=sys.stderr)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {host_name()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
