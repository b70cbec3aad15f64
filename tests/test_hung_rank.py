"""A hung rank: one of two gloo ranks stalls inside a step for longer than the collective timeout. Both ranks end
with one line naming their rank and the step (exit 75, retry later), no traceback, and `--resume` then finishes.

The two ranks are launched as torchrun would start them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), but directly,
so that each rank's own stderr and exit code can be read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from codegen2.checkpoint import latest_checkpoint
from codegen2.distributed import COLLECTIVE_TIMEOUT_ENV
from codegen2.errors import EXIT_RETRY_LATER
from codegen2.train import HANG_ENV
from conftest import load_stress

stress = load_stress()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(config_path: Path, run_dir: Path, extra_env: dict[str, str], resume: bool) -> list[tuple[int, str]]:
    """Two ranks of `codegen2 train --parallel ddp`; their (exit code, stderr)."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **extra_env}
        cmd = [sys.executable, "-m", "codegen2.cli", "train", "--config", str(config_path), "--out", str(run_dir),
               "--parallel", "ddp", *(["--resume"] if resume else [])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def test_a_hung_rank_ends_every_rank_in_one_line_and_the_run_resumes(tmp_path):
    config = stress.share_prepared(stress.tiny_config(tmp_path, **{"train.max_steps": 8}), tmp_path)
    config_path = stress.write_config(config, tmp_path / "config.toml")
    run_dir = tmp_path / "run"
    hang = {COLLECTIVE_TIMEOUT_ENV: "3", HANG_ENV: "1:6:8"}  # rank 1 sleeps 8 s before step 6's collective
    results = launch_ranks(config_path, run_dir, hang, resume=False)
    for rank, (code, err) in enumerate(results):
        assert code == EXIT_RETRY_LATER, err
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert f"rank {rank} of 2" in errors[0] and "step 6" in errors[0] and "--resume" in errors[0]
    assert latest_checkpoint(run_dir).name.endswith("4")  # the checkpoint before the hang is intact

    results = launch_ranks(config_path, run_dir, {COLLECTIVE_TIMEOUT_ENV: "60"}, resume=True)
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert latest_checkpoint(run_dir).name.endswith("8")
