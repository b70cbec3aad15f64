"""Corpora for the fault tests and the fault drill: ordinary code files, and a corpus holding one entry of every
odd kind a corpus from the wild brings (tests/test_faults.py checks each is skipped with its reason;
benchmarks/fault_drills.py prepares it over many rounds).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from codegen2.data.formats import HUGE_FILE_BYTES

NORMAL = 10  # ordinary files in the hostile corpus, one reached through a symlink


def code_corpus(root: Path, n: int) -> Path:
    """`n` small, distinct Python files under `root`."""
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"mod{i}.py").write_text(
            f'def scale_{i}(values):\n    """Multiply every value by {i} and add {i * i}."""\n'
            f"    return [v * {i} + {i * i} for v in values]\n\n\nclass Counter{i}:\n    start = {i}\n",
            encoding="utf-8")
    return root


def hostile_corpus(root: Path, outside: Path) -> dict[bytes, str]:
    """NORMAL ordinary files (one through a symlink) and one entry of every odd kind; returns the raw relative
    path of each odd entry and the reason it must be skipped with."""
    code_corpus(root, NORMAL - 1)
    outside.mkdir()
    (outside / "target.py").write_text("def linked(a, b):\n    return a - b  # reached through a symlink\n")
    os.symlink(outside / "target.py", root / "linked.py")
    (root / os.fsdecode(b"caf\xe9.py")).write_text("x = 1\n")
    (root / os.fsdecode(b"dir\xff")).mkdir()
    (root / os.fsdecode(b"dir\xff") / "inner.py").write_text("y = 2\n")
    os.symlink(root / "missing.py", root / "dangling.py")
    os.symlink("loop.py", root / "loop.py")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")
    os.mkfifo(root / "pipe.py")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock.py"))
    server.close()  # the socket file stays
    (root / "locked").mkdir()
    (root / "locked" / "never.py").write_text("z = 3\n")
    for name in ("vanishing.py", "growing.py", "unreadable.py"):
        (root / name).write_text(f"# {name}\nvalue = '{name}'\n")
    (root / "empty.py").write_bytes(b"")
    with open(root / "huge.py", "wb") as handle:
        handle.truncate(HUGE_FILE_BYTES + 1)  # sparse: no disk used
    (root / "blob.py").write_bytes(b"\x00\x01\x02 not text")
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    return {b"caf\xe9.py": "name_not_utf8", b"dir\xff/inner.py": "name_not_utf8", b"dangling.py": "dangling_symlink",
            b"loop.py": "symlink_loop", b"sub/up": "symlinked_dir", b"pipe.py": "fifo", b"sock.py": "socket",
            b"locked": "unreadable_dir", b"vanishing.py": "vanished", b"growing.py": "changed_while_read",
            b"unreadable.py": "unreadable", b"empty.py": "empty", b"huge.py": "huge", b"blob.py": "binary",
            b"latin1.py": "not_utf8"}
