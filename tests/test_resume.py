"""Exact resume: runs killed with SIGKILL (inside a checkpoint write, and at a random moment of training) and
resumed with `--resume` end bitwise identical to an uninterrupted run, with the same data in the same order,
for 1 process and for 2 FSDP processes. The short form of benchmarks/kill_resume_stress.py (10 random kills)."""

from __future__ import annotations

import random

import pytest

from conftest import load_stress

stress = load_stress()


@pytest.mark.parametrize("suite", ["codegen", "llama"], indirect=True)
@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_and_resumed_run_is_bitwise_identical(suite, tmp_path, nproc):
    base, config, path = suite
    if nproc == 1:
        reference = stress.reference_run(path, base / "ref-1", 1, "none", in_process=True)
    else:
        reference = stress.reference_run(path, base / "ref-2-fsdp", 2, "fsdp")
    run = tmp_path / "killed"
    # First kill lands inside a (slowed-down) checkpoint write; the second at a random point of training.
    # With 2 processes the first takes every process down at once, the second only one rank.
    kills = stress.killed_run(config, path, run, nproc, "fsdp", kills=2, rng=random.Random(nproc),
                              kinds=["save", "step"], pause_s=0.2, in_order=True)
    assert len(kills) == 2 and kills[0].landed, kills
    assert stress.compare_runs(reference, run) == [], [k.landed for k in kills]
    log = stress.read_log(run)
    assert [r["step"] for r in log] == list(range(1, config.train.max_steps + 1))
