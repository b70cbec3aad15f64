"""Exact resume for today's families on 2 CPU processes (gloo): Qwen2 (tied embeddings) and StarCoder2 (a window
shorter than the sequence, and its dropouts, so every rank's RNG must come back too), under DDP and FSDP2.

A run killed with SIGKILL (once inside a checkpoint write, once at a random moment of training, taking every
process or one rank down) and resumed with `--resume` ends bitwise identical to the uninterrupted run of the same
parallelism: same data in the same order, same losses, same weights (benchmarks/kill_resume_stress.py's
machinery and ARCH_OVERRIDES, as tests/test_resume.py uses them for CodeGen and LLaMA). The FSDP2 cases take
about 75 s each on a shared 2-core machine and are marked slow; the DDP ones about 50 s.
"""

from __future__ import annotations

import random

import pytest

from conftest import load_stress

stress = load_stress()


@pytest.mark.parametrize("suite", ["qwen2", "starcoder2"], indirect=True)
@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])  # about a minute each
def test_killed_and_resumed_two_rank_run_is_bitwise_identical(suite, tmp_path, parallel):
    base, config, path = suite
    reference = stress.reference_run(path, base / f"ref-2-{parallel}", 2, parallel)
    run = tmp_path / "killed"
    kills = stress.killed_run(config, path, run, 2, parallel, kills=2, rng=random.Random(len(parallel)),
                              kinds=["save", "step"], pause_s=0.2, in_order=True)
    assert len(kills) == 2 and kills[0].landed, kills
    assert stress.compare_runs(reference, run) == [], [k.landed for k in kills]
    assert [r["step"] for r in stress.read_log(run)] == list(range(1, config.train.max_steps + 1))
