"""A repository as data: `--data PATH` on a git work tree reads the files git tracks, and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from codegen2.config import DataConfig, SourceConfig, load_config
from codegen2.data import formats
from codegen2.data.prepare.pipeline import prepare
from codegen2.data.sources import source_from_path, user_sources
from codegen2.errors import UserError


def git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A work tree with tracked, modified, untracked and ignored files, and symlinks in and out of the tree."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (tmp_path / "outside.py").write_text("OUTSIDE = 'never read'\n")
    (root / "pkg" / "core.py").write_text("def core():\n    return 1\n")
    (root / "pkg" / "util.py").write_text("def util():\n    return 2\n")
    (root / ".gitignore").write_text(".venv/\nbuild/\n")
    (root / "link_out.py").symlink_to(tmp_path / "outside.py")
    (root / "link_in.py").symlink_to(Path("pkg") / "core.py")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    (root / "pkg" / "util.py").write_text("def util():\n    return 3  # edited, not committed\n")
    (root / "scratch.py").write_text("UNTRACKED = 1\n")
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "site.py").write_text("IGNORED = 1\n")
    (root / "build").mkdir()
    (root / "build" / "gen.py").write_text("IGNORED = 2\n")
    return root


def _read(root: Path, **source) -> tuple[dict[str, str], object]:
    cfg = DataConfig(sources=[SourceConfig(path=str(root), **source)], heldout_fraction=0.0)
    (src,) = user_sources(cfg, "train")
    docs = {Path(d.path).relative_to(root).as_posix(): d.text for d in src.documents()}
    return docs, src


def test_reads_only_tracked_files_with_uncommitted_edits(repo):
    docs, source = _read(repo)
    assert sorted(docs) == [".gitignore", "link_in.py", "pkg/core.py", "pkg/util.py"]
    assert docs["pkg/util.py"].endswith("return 3  # edited, not committed\n")
    assert docs["link_in.py"] == docs["pkg/core.py"]  # a symlink inside the tree is read
    assert source.skipped["symlink_outside"] == 1
    assert source.git == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": True, "tracked_files": 5}


def test_git_false_reads_the_directory_as_before(repo):
    docs, source = _read(repo, git=False)
    assert {"scratch.py", ".venv/lib/site.py", "build/gen.py", "link_out.py"} <= set(docs)
    assert source.git is None


def test_a_subdirectory_of_a_work_tree_and_a_clean_tree(repo):
    git(repo, "commit", "-q", "-am", "second")
    docs, source = _read(repo / "pkg")
    assert sorted(docs) == ["core.py", "util.py"]
    assert source.git["dirty"] is False and source.git["tracked_files"] == 2


def test_prepare_records_the_commit_and_says_so(repo, tmp_path):
    config = load_config(None, preset="tiny")
    config.data.sources = [source_from_path(str(repo))]
    config.data.heldout_fraction = 0.0
    config.tokenizer.vocab_size = 400
    config.prepare.min_alphanum_fraction = 0.0
    logs: list[str] = []
    manifest = prepare(config, tmp_path / "out", log=logs.append)
    assert manifest["sources"][0]["git"] == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": True,
                                             "tracked_files": 5}
    assert f"git work tree at {git(repo, 'rev-parse', 'HEAD')[:12]}, with uncommitted edits" in logs[-1]
    assert manifest["sources"][0]["splits"]["train"]["docs_in"] == 4
    assert manifest["sources"][0]["splits"]["train"]["skipped"]["symlink_outside"] == 1
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in removed if r["reason"] == "symlink_outside"] == ["link_out.py"]


def test_git_missing_or_broken_is_one_line(repo, monkeypatch):
    (repo / ".git" / "index").write_bytes(b"not an index")
    with pytest.raises(UserError, match=r"git cannot list the tracked files .*git = false") as info:
        _read(repo)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(formats.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"git work tree but git is not installed"):
        _read(repo)
