"""A hung rank: one of two gloo ranks stalls for longer than the collective timeout, inside a step, inside a
checkpoint save or at start-up. Both ranks end with one line naming their rank and where the run was (exit 75,
retry later), no traceback, and the same command (with `--resume` once the run exists) then finishes.

The two ranks are launched as torchrun would start them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), but directly,
so that each rank's own stderr and exit code can be read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from codegen2.checkpoint import latest_checkpoint, list_checkpoints
from codegen2.distributed import COLLECTIVE_TIMEOUT_ENV, HANG_ENV
from codegen2.errors import EXIT_RETRY_LATER
from conftest import load_stress

stress = load_stress()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(config_path: Path, run_dir: Path, extra_env: dict[str, str]) -> list[tuple[int, str]]:
    """Two ranks of `codegen2 train --parallel ddp` (with --resume once the run exists); their (exit code, stderr)."""
    port = str(free_port())
    resume = ["--resume"] if (run_dir / "config.toml").is_file() else []
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **extra_env}
        cmd = [sys.executable, "-m", "codegen2.cli", "train", "--config", str(config_path), "--out", str(run_dir),
               "--parallel", "ddp", *resume]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


@pytest.mark.parametrize("stage, intact", [
    ("at step 6", 4),  # rank 1 sleeps before step 6's collectives
    ("while saving the checkpoint of step 8", 4),  # ... inside the save: rank 0 waits at the save's barrier
    ("at start-up", None),  # ... before the ranks agree on the run's lock: nothing written yet
])
def test_a_hung_rank_ends_every_rank_in_one_line_and_the_run_resumes(tmp_path, stage, intact):
    config = stress.share_prepared(stress.tiny_config(tmp_path, **{"train.max_steps": 8}), tmp_path)
    config_path = stress.write_config(config, tmp_path / "config.toml")
    run_dir = tmp_path / "run"
    results = launch_ranks(config_path, run_dir, {COLLECTIVE_TIMEOUT_ENV: "3", HANG_ENV: f"1:{stage}:8"})
    for rank, (code, err) in enumerate(results):
        assert code == EXIT_RETRY_LATER, err
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert f"rank {rank} of 2: a collective failed {stage} (" in errors[0] and "--resume" in errors[0]
    latest = latest_checkpoint(run_dir)
    assert (latest.name if latest else None) == (f"step_{intact:08d}" if intact else None)  # the last one intact
    assert not list((run_dir / "checkpoints").glob("*.tmp-*")) if (run_dir / "checkpoints").is_dir() else True

    results = launch_ranks(config_path, run_dir, {COLLECTIVE_TIMEOUT_ENV: "60"})
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "step_00000008"


def test_under_the_launcher_a_hung_rank_exits_75(tmp_path):
    """Through `python -m codegen2.launch` (torchrun's arguments), a hung rank reaches the caller as 75, retry
    later: torchrun alone exits 1, and its SIGTERM to the surviving rank does not turn the run into a crash."""
    config = stress.share_prepared(stress.tiny_config(tmp_path, **{"train.max_steps": 8}), tmp_path)
    config_path = stress.write_config(config, tmp_path / "config.toml")
    command = [sys.executable, "-m", "codegen2.launch", "--standalone", "--nproc_per_node", "2", "-m", "codegen2.cli",
               "train", "--config", str(config_path), "--out", str(tmp_path / "run"), "--parallel", "ddp"]
    done = subprocess.run(command, env={**os.environ, COLLECTIVE_TIMEOUT_ENV: "3", HANG_ENV: "1:at step 6:8"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == EXIT_RETRY_LATER, done.stderr[-3000:]
    assert "error: rank 0 of 2: a collective failed at step 6 (" in done.stderr
    assert "exit 75" in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr
