"""Issue 24's disk-space and one-writer faults: a full disk at checkpoint or prepare time is one line with the
"retry later" exit code and leaves the last checkpoint whole; staging names carry their writer, and a start
removes only what dead writers of this host left; a second writer of a run or prepare directory is refused."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codegen2 import checkpoint as ckpt
from codegen2 import cli, fsutil
from codegen2.errors import EXIT_FIX_INPUT, EXIT_RETRY_LATER, EXIT_STORAGE, RetryLater
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _train_args(run: Path, corpus: Path, *extra: str, **settings) -> list[str]:
    overrides = tiny_overrides(corpus, **{"train.max_steps": 4, "train.checkpoint_every": 2, **settings})
    return ["train", "--out", str(run), "--data", str(corpus), *extra, *(a for kv in overrides for a in ("--set", kv))]


def _staging_left(run: Path) -> list[str]:
    return sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir() if fsutil.is_staging(p))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------------------------- staging
def test_staging_names_carry_their_writer(tmp_path):
    path = fsutil.staging_path(tmp_path / "step_00000002", fsutil.staging_token())
    assert path.name == f"step_00000002.tmp-{os.getpid()}@{fsutil.host_name()}"
    assert fsutil.staging_owner(path) == (os.getpid(), fsutil.host_name())
    assert fsutil.staging_owner(tmp_path / "x.tmp-prune-12@node-1.cluster") == (12, "node-1.cluster")
    assert fsutil.staging_owner(tmp_path / "x.tmp-34") == (34, "")  # a name from before hosts were named
    assert fsutil.staging_owner(tmp_path / "step_00000002") is None


def test_a_start_removes_only_the_staging_of_dead_writers_on_its_host(tmp_path):
    """A live trainer's staging directory survives another start; a dead one's, or an old unnamed one, goes;
    another host's is left alone (its process cannot be checked from here)."""
    root = tmp_path / ckpt.CHECKPOINTS
    root.mkdir()
    host, dead = fsutil.host_name(), _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"live": f"step_00000002.tmp-{live.pid}@{host}", "dead": f"step_00000004.tmp-{dead}@{host}",
                 "other_host": f"step_00000006.tmp-{dead}@some-other-node", "old": f"step_00000008.tmp-{dead}",
                 "pruned": f"step_00000010.tmp-prune-{dead}@{host}", "live_file": f"meta.json.tmp-{live.pid}@{host}"}
        for key, name in names.items():
            (root / name).mkdir() if key != "live_file" else (root / name).write_text("{}")
        (root / f"step_00000012.tmp-old-{dead}@{host}").mkdir()  # caught mid-swap: its replacement never landed
        ckpt.remove_stale_temporaries(tmp_path)
        left = sorted(p.name for p in root.iterdir())
        assert left == sorted([names["live"], names["other_host"], names["live_file"], "step_00000012"])
    finally:
        live.kill()
        live.wait()
    ckpt.remove_stale_temporaries(tmp_path)  # now that the writer is dead
    assert sorted(p.name for p in root.iterdir()) == sorted([names["other_host"], "step_00000012"])


# ---------------------------------------------------------------------------------------- full disk
def test_a_checkpoint_that_does_not_fit_is_one_line_and_resume_later_works(tmp_path, small_corpus, monkeypatch,
                                                                           capsys):
    run = tmp_path / "run"
    assert cli.main(_train_args(run, small_corpus, **{"train.max_steps": 2})) == 0
    before = (run / ckpt.CHECKPOINTS / "step_00000002" / ckpt.WEIGHTS).read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(fsutil, "free_bytes", lambda directory: 12_345)  # the disk filled up meanwhile
    assert cli.main(_train_args(run, small_corpus, "--resume")) == EXIT_RETRY_LATER
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: no space to write a checkpoint in {run / ckpt.CHECKPOINTS}: needs about ")
    assert "12,345 bytes free" in err[-1] and "Traceback" not in "\n".join(err)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]
    assert (run / ckpt.CHECKPOINTS / "step_00000002" / ckpt.WEIGHTS).read_bytes() == before
    assert _staging_left(run) == []
    monkeypatch.undo()  # room again
    assert cli.main(_train_args(run, small_corpus, "--resume")) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize("code, exit_code", [(errno.ENOSPC, EXIT_RETRY_LATER), (errno.EDQUOT, EXIT_RETRY_LATER),
                                             (errno.EIO, EXIT_STORAGE), (errno.EROFS, EXIT_STORAGE)])
def test_a_checkpoint_write_that_fails_is_one_line_and_leaves_no_staging(tmp_path, small_corpus, monkeypatch, capsys,
                                                                         code, exit_code):
    run = tmp_path / "run"
    assert cli.main(_train_args(run, small_corpus, **{"train.max_steps": 2})) == 0
    capsys.readouterr()
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_save)
    assert cli.main(_train_args(run, small_corpus, "--resume")) == exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(run / ckpt.CHECKPOINTS) in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"] and _staging_left(run) == []
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main(_train_args(run, small_corpus, "--resume")) == 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000004"]


@pytest.mark.parametrize("write", ["torch.save({'w': torch.zeros(1 << 20)}, tmp / 'trainer_state.pt')",
                                   "safetensors_io.write_file({'w': torch.zeros(1 << 20)}, tmp / 'w.safetensors', {})"])
def test_a_real_writer_hitting_a_file_size_limit_is_retry_later(tmp_path, write):
    """The real torch.save and safetensors writer under RLIMIT_FSIZE (what a full disk looks like to them: a
    RuntimeError from torch's zip writer, safetensors' own error, or an OSError) become RetryLater naming the
    directory, and the staging directory goes."""
    script = (
        "import resource, signal, sys, torch\n"
        "from codegen2 import fsutil, safetensors_io\n"
        "from codegen2.errors import RetryLater\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "try:\n"
        "    with fsutil.atomic_directory(sys.argv[1]) as tmp:\n"
        f"        {write}\n"
        "except RetryLater as exc:\n"
        "    print(exc)\n"
        "    sys.exit(75)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "step_00000002")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 75, done.stderr[-2000:]
    assert done.stdout.startswith(f"no space to write step_00000002 in {tmp_path}: ")
    assert list(tmp_path.iterdir()) == []


def test_a_prepare_stage_that_does_not_fit_is_one_line(tmp_path, small_corpus, monkeypatch, capsys):
    out = tmp_path / "prepared"
    monkeypatch.setattr(fsutil, "free_bytes", lambda directory: 1000)
    code = cli.main(["data", "prepare", "--data", str(small_corpus), "--out", str(out),
                     *(a for kv in tiny_overrides(small_corpus) for a in ("--set", kv))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_RETRY_LATER, err
    assert err[-1].startswith(f"error: no space to write prepare stage read in {out}: needs about ")
    assert "1,000 bytes free" in err[-1]
    monkeypatch.undo()
    assert cli.main(["data", "prepare", "--data", str(small_corpus), "--out", str(out), "--resume",
                     *(a for kv in tiny_overrides(small_corpus) for a in ("--set", kv))]) == 0
    assert (out / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------- one writer
def _start_trainer(run: Path, corpus: Path, *extra: str, pause: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), ckpt.SAVE_PAUSE_ENV: str(pause)}
    return subprocess.Popen([sys.executable, "-m", "codegen2.cli", *_train_args(run, corpus, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, process: subprocess.Popen, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_two_trainers_on_one_run(tmp_path, small_corpus):
    """A second `train --resume` while the first lives is refused in one line naming the first's PID and host,
    and touches nothing (the first's staging directory stays); once the first is killed with SIGKILL, the
    same command resumes (the OS dropped the lock) and finishes."""
    run = tmp_path / "run"
    first = _start_trainer(run, small_corpus, pause=60.0)  # stays inside its first checkpoint write
    try:
        _wait_for(lambda: (run / ckpt.CHECKPOINTS).is_dir() and _staging_left(run), first)
        staging = _staging_left(run)
        second = subprocess.run([sys.executable, "-m", "codegen2.cli", *_train_args(run, small_corpus, "--resume")],
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True,
                                timeout=240)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == EXIT_RETRY_LATER, second.stderr[-2000:]
        assert lines[-1] == (f"error: {run} is in use by another training run (PID {first.pid} on host "
                             f"{fsutil.host_name()}); wait for it to end or stop it, then run again")
        assert "Traceback" not in second.stderr
        assert _staging_left(run) == staging and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = subprocess.run([sys.executable, "-m", "codegen2.cli", *_train_args(run, small_corpus, "--resume")],
                             env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert _staging_left(run) == []  # the killed writer's staging went at the resume
    assert load_file(run / ckpt.CHECKPOINTS / "step_00000004" / ckpt.WEIGHTS)


def test_a_second_prepare_of_one_output_is_refused(tmp_path):
    """`data prepare --out` holds OUT/.lock while it runs: another prepare of OUT (local or Ray executor, or a
    run's in-line prepare) is refused in one line; the lock goes with the holder."""
    out = tmp_path / "prepared"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from codegen2.fsutil import DirectoryLock\n"
                               "DirectoryLock(sys.argv[1], 'data preparation').acquire()\n"
                               "print('locked', flush=True)\n"
                               "time.sleep(120)\n", str(out)],
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RetryLater, match=rf"^{out} is in use by another data preparation \(PID {holder.pid} on"):
            fsutil.DirectoryLock(out, "data preparation").acquire()
    finally:
        holder.kill()
        holder.wait()
    with fsutil.DirectoryLock(out, "data preparation"):  # dropped by the OS with the dead holder
        assert (out / fsutil.LOCK_FILE).read_text() == f"{os.getpid()} {fsutil.host_name()}\n"


def test_prepare_refuses_an_output_another_prepare_holds(tmp_path, small_corpus, capsys):
    out = tmp_path / "prepared"
    with fsutil.DirectoryLock(out, "data preparation"):
        code = cli.main(["data", "prepare", "--data", str(small_corpus), "--out", str(out),
                         *(a for kv in tiny_overrides(small_corpus) for a in ("--set", kv))])
    assert code == EXIT_RETRY_LATER
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {out} is in use by another data ")
    assert sorted(p.name for p in out.iterdir()) == [fsutil.LOCK_FILE]


def test_exit_codes_are_distinct():
    assert len({0, EXIT_FIX_INPUT, EXIT_STORAGE, EXIT_RETRY_LATER, 130, 143}) == 6
