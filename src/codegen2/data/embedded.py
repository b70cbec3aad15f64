"""The embedded default corpus: text that ships with every Python installation.

Code: the `.py` files of the running interpreter's standard library. Test packages (`test`,
`tests`, `idle_test` directories) and installed third-party packages (`site-packages`) are left
out: the tests hold deliberately odd files (bad encodings, syntax errors, generated data) and
would more than double the corpus with repetitive code.

Natural language: the pydoc topic help texts (`pydoc_data.topics`) and the docstrings of the
standard library's modules, classes and functions, read with `ast` (modules are never imported:
importing would run their code). All docstrings of one file form one document, so a file's prose
is held out together with its code.

Keys for the held-out split: the path relative to the standard library root, and "topic:NAME".
With `embedded_max_files`, the files are chosen by a salted hash of that relative path (a
deterministic, representative sample, independent of the held-out hash).
"""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

from codegen2.data.documents import Document, stable_fraction

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_files: int = 0) -> list[str]:
    """Relative POSIX paths of the chosen standard-library `.py` files, in a stable order."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in sorted(filenames) if f.endswith(".py"))
    if max_files > 0:
        found = sorted(found, key=lambda rel: stable_fraction(rel, "embedded-select"))[:max_files]
    return sorted(found)


def _read_stdlib_file(rel: str, skipped: Counter) -> str | None:
    try:
        text = (stdlib_root() / rel).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped["not_utf8"] += 1
        return None
    return text.removeprefix("\ufeff")


def code_documents(files: list[str], keep: Callable[[str], bool], skipped: Counter) -> Iterator[Document]:
    root = stdlib_root()
    for rel in files:
        if not keep(rel):
            continue
        text = _read_stdlib_file(rel, skipped)
        if text is not None:
            yield Document(text=text, path=str(root / rel), kind="code")


def docstrings(source: str) -> list[str]:
    """Docstrings of the module and of every class and function, in source order."""
    with warnings.catch_warnings():  # e.g. invalid escape sequences in old modules: not our concern
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                found.append((getattr(node, "lineno", 0), doc.strip()))
    return [doc for _, doc in sorted(found, key=lambda item: item[0])]


def topic_documents(keep: Callable[[str], bool]) -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if keep(f"topic:{name}") and topics[name].strip():
            yield Document(text=topics[name].strip() + "\n", path=f"pydoc_data.topics:{name}", kind="nl")


@cache
def _file_docstrings(rel: str, size: int, mtime_ns: int) -> tuple[str, ...] | None:
    """Docstrings of one standard-library file, memoised (parsing is the slow part of the NL corpus)."""
    skipped: Counter = Counter()
    text = _read_stdlib_file(rel, skipped)
    if text is None:
        return None
    try:
        return tuple(docstrings(text))
    except SyntaxError:
        return None


def nl_documents(files: list[str], keep: Callable[[str], bool], skipped: Counter,
                 topics: bool = True) -> Iterator[Document]:
    if topics:
        yield from topic_documents(keep)
    root = stdlib_root()
    for rel in files:
        if not keep(rel):
            continue
        st = (root / rel).stat()
        docs = _file_docstrings(rel, st.st_size, st.st_mtime_ns)
        if docs is None:
            skipped["unparsable"] += 1
        elif docs:
            yield Document(text="\n\n".join(docs) + "\n", path=f"{root / rel}:docstrings", kind="nl")
