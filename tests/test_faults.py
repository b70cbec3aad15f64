"""Faults from real clusters and corpora: a requeued Slurm job resumes with the arguments it was started
with (a real change of the data is one line), and one odd entry of a corpus never stops its preparation."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codegen2 import cli
from codegen2.checkpoint import list_checkpoints
from codegen2.config import DataConfig, SourceConfig, load_config, save_config
from codegen2.data.arguments import data_change, data_with_paths
from codegen2.data.documents import stable_fraction
from codegen2.data.pipeline import prepare_data
from codegen2.data.prepare.shards import PreparedData
from codegen2.errors import EXIT_FIX_INPUT, EXIT_RETRY_LATER
from codegen2.fsutil import DirectoryLock
from codegen2.launch import launcher_exit_code
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "benchmarks"))
from fault_corpus import NORMAL, code_corpus, hostile_corpus  # shared with benchmarks/fault_drills.py

# ------------------------------------------------------------------------------------------ requeue
SRUN = """#!/usr/bin/env bash
# srun stand-in: record the command line, then run the train command that torchrun would start (one process).
printf '%s\\n' "$@" > "$ARGV_LOG"
while [ "$1" != "codegen2.cli" ]; do shift; done
shift
exec "$PYTHON" -m codegen2.cli "$@"
"""
SRUN_LAUNCH = """#!/usr/bin/env bash
# srun stand-in that runs the command as given (srun's own options dropped, `python` the test's interpreter):
# the real launcher and its workers, on this machine.
printf '%s\\n' "$@" > "$ARGV_LOG"
while [ "${1#--}" != "$1" ]; do shift; done
[ "$1" = python ] && shift && set -- "$PYTHON" "$@"
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: record the call; `show hostnames` names this machine.
echo "$@" >> "$SCONTROL_LOG"
[ "$1 $2" = "show hostnames" ] && echo localhost
exit 0
"""


def _slurm_env(tmp_path: Path, srun: str = SRUN) -> dict[str, str]:
    """The environment of a batch script as Slurm starts it, with srun and scontrol stood in for (scontrol's
    calls go to tmp_path/scontrol.log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", srun), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO / "src"), "ARGV_LOG": str(tmp_path / "srun-argv.txt"),
            "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "RUN_DIR": str(tmp_path / "run"),
            "SLURM_JOB_NAME": "codegen2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "1"}


def _requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.is_file() else []


def _sbatch(tmp_path: Path, args: list[str], srun: str = SRUN, **env) -> subprocess.CompletedProcess:
    """Run scripts/slurm_train.sbatch as Slurm would start it, with srun and scontrol stood in for."""
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm_train.sbatch"), *args],
                          env={**_slurm_env(tmp_path, srun), **env}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def test_a_requeued_slurm_job_resumes_with_the_same_arguments(tmp_path):
    """docs/distributed.md's `sbatch scripts/slurm_train.sbatch --preset ... --data DIR`: the requeue adds --resume
    to the same arguments and training goes on from the last checkpoint; other data is refused in one line."""
    corpus = code_corpus(tmp_path / "code", 24)
    overrides = [a for kv in tiny_overrides(corpus, **{"train.max_steps": 4, "train.checkpoint_every": 2})
                 for a in ("--set", kv)]
    args = ["--preset", "tiny", "--data", str(corpus), *overrides]
    first = _sbatch(tmp_path, args)
    assert first.returncode == 0, first.stderr[-2000:]
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    final = load_file(run / "checkpoints" / "step_00000004" / "model.safetensors")
    for path in (run / "checkpoints" / "step_00000004").iterdir():  # preempted after the checkpoint of step 2
        path.unlink()
    (run / "checkpoints" / "step_00000004").rmdir()
    requeued = _sbatch(tmp_path, args)
    argv = (tmp_path / "srun-argv.txt").read_text().split("\n")
    assert argv[:3] == ["--kill-on-bad-exit=1", "python", "-m"] and argv[3] == "codegen2.launch"
    assert argv[argv.index("codegen2.cli"):][:7] == ["codegen2.cli", "train", "--out", str(run), "--parallel", "fsdp",
                                                      "--resume"]
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert "resuming from" in requeued.stderr and "step_00000002" in requeued.stderr
    resumed = load_file(run / "checkpoints" / "step_00000004" / "model.safetensors")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)  # the same run
    other = code_corpus(tmp_path / "other", 3)
    refused = _sbatch(tmp_path, ["--preset", "tiny", "--data", str(other), *overrides])
    assert refused.returncode == 2 and refused.stderr.count("\n") == 2, refused.stderr  # the note and one error
    error = refused.stderr.splitlines()[-1]
    assert error.startswith("error: --data cannot change the data") and f"adds source {other}" in error
    assert "trained to step 4" in error
    assert _requeues(tmp_path) == []  # "fix the input" (exit 2) is not requeued


def test_the_train_script_requeues_only_when_told_to_retry_later(tmp_path):
    """A run held by another live trainer (or a full disk) exits 75, "retry later", on every rank: through the real
    launcher (2 gloo processes, the script's own arguments) the script sees 75 and requeues the job, up to
    MAX_RETRIES times; a refused input (exit 2) is never requeued (see the test above)."""
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    two_ranks = {"srun": SRUN_LAUNCH, "SLURM_GPUS_ON_NODE": "2", "MASTER_PORT": port}
    with DirectoryLock(run, "training run"):  # another trainer holds the run
        save_config(load_config(None, preset="tiny"), run / "config.toml")
        busy = _sbatch(tmp_path, ["--preset", "tiny"], **two_ranks)
        assert busy.returncode == EXIT_RETRY_LATER, busy.stderr[-3000:]
        assert f"error: {run} is in use by another training run (PID " in busy.stderr
        assert "launch: rank 0 exited 75" in busy.stderr and "Traceback" not in busy.stderr
        assert _requeues(tmp_path) == ["requeue 4242"]
        again = _sbatch(tmp_path, ["--preset", "tiny"], SLURM_RESTART_COUNT="10", **two_ranks)
        assert again.returncode == EXIT_RETRY_LATER, again.stderr[-3000:]
        assert _requeues(tmp_path) == ["requeue 4242"]  # MAX_RETRIES (10) reached: the job ends


@pytest.mark.parametrize("failures, code", [
    ([(75, 0), (-signal.SIGTERM, 0)], EXIT_RETRY_LATER),  # the peer stopped by torchrun's SIGTERM
    ([(75, 0), (-signal.SIGKILL, 30)], EXIT_RETRY_LATER),  # ... or killed 30 s on, for not stopping
    ([(75, 0), (75, 0)], EXIT_RETRY_LATER),
    ([(2, 0), (75, 0)], EXIT_FIX_INPUT),  # the rank with the bad input, its peer saw it go
    ([(74, 0), (75, 1)], 74),
    ([(1, 0), (75, 0)], 1),  # a crash on any rank is never requeued
    ([(-signal.SIGKILL, 0), (75, 0)], 1),  # the OOM killer, say
    ([(-signal.SIGTERM, 0)], 143),
    ([(143, 0), (143, 0)], 143),
    ([(139, 0)], 1),
])
def test_the_launcher_exits_with_the_workers_documented_code(failures, code):
    assert launcher_exit_code(failures) == code


def test_the_prepare_script_requeues_only_when_told_to_retry_later(tmp_path):
    corpus = code_corpus(tmp_path / "code", 4)
    config = tmp_path / "prepare.toml"
    config.write_text(f'[data]\nheldout_fraction = 0.1\n\n[[data.sources]]\npath = "{corpus}"\n')
    env = {**_slurm_env(tmp_path), "DRY_RUN": "1", "VENV": str(Path(sys.executable).parent.parent)}
    script = ["bash", str(REPO / "scripts" / "slurm_prepare.sbatch"), str(config), str(tmp_path / "out"), "4", "short"]
    with DirectoryLock(tmp_path / "out", "data preparation"):
        busy = subprocess.run(script, env=env, capture_output=True, text=True)
    assert busy.returncode == EXIT_RETRY_LATER and _requeues(tmp_path) == ["requeue 4242"], busy.stderr[-2000:]
    config.write_text("[data\n")  # fix the input: never requeued
    bad = subprocess.run(script, env=env, capture_output=True, text=True)
    assert bad.returncode == EXIT_FIX_INPUT and _requeues(tmp_path) == ["requeue 4242"], bad.stderr[-2000:]


def test_the_prepare_script_submitted_again_continues(tmp_path):
    """scripts/slurm_prepare.sbatch submitted again with the same arguments (after a failure or a preemption)
    continues the prepare in OUT_DIR (DRY_RUN: the stage scripts are written, nothing is submitted)."""
    corpus = code_corpus(tmp_path / "code", 4)
    config = tmp_path / "prepare.toml"
    config.write_text(f'[data]\nheldout_fraction = 0.1\n\n[[data.sources]]\npath = "{corpus}"\n')
    env = {**os.environ, "DRY_RUN": "1", "VENV": str(Path(sys.executable).parent.parent),
           "PYTHONPATH": str(REPO / "src")}
    for _ in range(2):
        done = subprocess.run(["bash", str(REPO / "scripts" / "slurm_prepare.sbatch"), str(config),
                               str(tmp_path / "out"), "4", "short"], env=env, capture_output=True, text=True)
        assert done.returncode == 0 and "dry run, not submitted" in done.stderr, done.stderr[-2000:]


def test_the_same_sources_spelled_otherwise_are_the_same_data(tmp_path, monkeypatch):
    corpus = code_corpus(tmp_path / "code", 2)
    monkeypatch.chdir(tmp_path)
    saved = data_with_paths(DataConfig(), [str(corpus)])
    for spelling in ("code", "code/", f"{corpus}/../code", "./code"):
        assert data_change(saved, data_with_paths(saved, [spelling])) == "", spelling
    assert data_change(saved, saved) == ""


def test_a_real_data_change_is_named(tmp_path):
    corpus = code_corpus(tmp_path / "code", 2)
    saved = DataConfig(sources=[SourceConfig(path=str(corpus), kind="nl", weight=0.5)])
    assert data_change(saved, data_with_paths(saved, [str(corpus)])) == \
        f"source {corpus}: kind 'nl' -> 'code'; source {corpus}: weight 0.5 -> 1.0"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"content": "x = 1"}\n')
    with_field = data_with_paths(DataConfig(), [f"{jsonl}:content"])
    assert data_change(with_field, data_with_paths(DataConfig(), [str(jsonl)])) == \
        f"source {jsonl}: field 'content' -> 'text'"
    assert data_change(DataConfig(sources=[SourceConfig(path=str(corpus))]), DataConfig()) == \
        f"drops source {corpus}"
    assert data_change(DataConfig(prepared=str(corpus)), DataConfig()) == f"prepared data {corpus} -> (none)"


def test_resume_with_the_same_prepared_directory_goes_on(tmp_path, monkeypatch, capsys):
    """`train --data PREPARED --out RUN` then the same with --resume: the run's data is that directory."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "plan.json").write_text("{}")
    run = tmp_path / "run"
    seen = []

    def fake_train(config, run_dir, **kwargs):
        from types import SimpleNamespace

        from codegen2.config import save_config

        run_dir.mkdir(exist_ok=True)
        save_config(config, run_dir / "config.toml")
        seen.append(config.data.prepared)
        return SimpleNamespace(interrupted="", final_step=0, tokens_seen=0, last_loss=0.0)

    monkeypatch.setattr("codegen2.train.train", fake_train)
    monkeypatch.setattr("codegen2.data.arguments.trained_step", lambda run_dir: 7)
    assert cli.main(["train", "--out", str(run), "--data", str(prepared)]) == 0
    assert cli.main(["train", "--out", str(run), "--resume", "--data", str(prepared)]) == 0
    assert seen == [str(prepared.resolve())] * 2
    assert load_config(run / "config.toml").data.prepared == str(prepared.resolve())
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run), "--resume", "--data", str(code_corpus(tmp_path / "c", 1))]) == 2
    assert "(adds source" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ odd entries
@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _inject_read_faults(monkeypatch, root: Path) -> None:
    """What chmod and timing cannot stage reliably (tests run as root): a directory that cannot be listed, a file
    that cannot be opened, one deleted between listing and reading, one that grows while it is read."""
    real_open, real_read, real_scandir = os.open, os.read, os.scandir

    def fake_open(path, flags, *args, **kwargs):
        name = os.fsdecode(path)
        if name == str(root / "unreadable.py"):
            raise PermissionError(13, "Permission denied", name)
        if name == str(root / "vanishing.py") and os.path.exists(name):
            os.unlink(name)
        return real_open(path, flags, *args, **kwargs)

    def fake_read(fd, n):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target == str(root / "growing.py"):
            with open(target, "a") as handle:
                handle.write("# appended while being read\n")
        return real_read(fd, n)

    def fake_scandir(path="."):
        if not isinstance(path, int) and os.fsdecode(path) == str(root / "locked"):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "read", fake_read)
    monkeypatch.setattr(os, "scandir", fake_scandir)


def _check_skipped(out: Path, expected: dict[bytes, str], root: Path) -> None:
    """Each odd entry is in removed.jsonl once, with its reason and its raw path; the manifest counts them."""
    rows = [json.loads(line) for line in (out / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    got = {}
    for row in rows:
        raw = bytes.fromhex(row["path_bytes"]) if "path_bytes" in row else row["path"].encode()
        assert row["path"] == raw.decode("utf-8", "backslashreplace")
        got[os.path.relpath(raw, os.fsencode(root))] = row["reason"]
    assert got == expected
    manifest = PreparedData.open(out).manifest
    (source,) = manifest["sources"]
    counted: dict[str, int] = {}
    for split in source["splits"].values():
        assert split["removed"] == {}
        for reason, n in split["skipped"].items():
            counted[reason] = counted.get(reason, 0) + n
    assert counted == {reason: list(expected.values()).count(reason) for reason in set(expected.values())}
    assert manifest["totals"]["docs"] == NORMAL  # every ordinary file, the symlinked one included


def test_one_odd_entry_never_stops_a_prepare(tmp_path, monkeypatch, capsys):
    root = tmp_path / "corpus"
    expected = hostile_corpus(root, tmp_path / "outside")
    _inject_read_faults(monkeypatch, root)
    out = tmp_path / "out"
    with _deadline(120):
        code = cli.main(["data", "prepare", "--data", str(root), "--out", str(out),
                         "--set", "tokenizer.vocab_size=400", "--set", "data.heldout_fraction=0.3"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    _check_skipped(out, expected, root)
    assert "skipped" in err and "fifo 1" in err and "name_not_utf8" in err  # the summary names them
    assert not (root / "vanishing.py").exists() and (root / "pipe.py").exists()


def test_one_odd_entry_never_stops_a_run_preparing_its_own_data(tmp_path, monkeypatch):
    """The in-line prepare of `train --data DIR` (RUN/prepared) skips and counts the same entries."""
    root = tmp_path / "corpus"
    expected = hostile_corpus(root, tmp_path / "outside")
    _inject_read_faults(monkeypatch, root)
    config = load_config(None, overrides=tiny_overrides(root, **{"tokenizer.vocab_size": 400,
                                                                 "model.vocab_size": 400}))
    config.data.sources = [SourceConfig(path=str(root))]
    with _deadline(120):
        prepare_data(config, tmp_path / "run", log=lambda message: None)
    _check_skipped(tmp_path / "run" / "prepared", expected, root)


def test_the_heldout_split_of_a_name_that_is_not_utf8_hashes_its_bytes():
    """Valid names keep their split; a name that is not UTF-8 hashes its raw bytes instead of failing."""
    assert stable_fraction("pkg/mod.py", "heldout") == 0.5011707502165633  # the values before the fix
    assert stable_fraction("caf\u00e9/\u00fc.py", "heldout") == 0.9216316180291162
    raw = os.fsdecode(b"caf\xe9.py")
    assert stable_fraction(raw, "heldout") != stable_fraction(os.fsdecode(b"caf\xe8.py"), "heldout")
    assert 0 <= stable_fraction(raw, "heldout") < 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_file_without_read_permission_is_skipped(tmp_path):
    from collections import Counter

    from codegen2.data.formats import Skipped, read_text_file

    path = tmp_path / "secret.py"
    path.write_text("x = 1\n")
    path.chmod(0)
    skipped = Skipped()
    assert read_text_file(path, skipped) is None and skipped == Counter(unreadable=1)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
