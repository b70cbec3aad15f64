"""Training from a prepared directory: shards memory-mapped on every rank (no tokenization, the log says so),
exact resume under torchrun after kills, and a prepared directory made with another tokenizer refused. The
in-line path (a run's own sources into RUN/prepared) gives the same data after Ctrl-C and --resume, and under
torchrun is prepared once, by rank 0."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from codegen2.cli import main as cli_main
from codegen2.data import prepare_data
from codegen2.data.prepare import PreparedData
from codegen2.data.prepare.steps import PAUSE_ENV, PAUSE_MARK
from codegen2.errors import UserError
from codegen2.tokenizer import train_tokenizer
from conftest import load_stress

stress = load_stress()


@pytest.fixture(scope="module")
def prepared_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("prepared-train")
    config = stress.share_prepared(stress.tiny_config(base), base)
    return base, config


def test_prepare_data_reads_the_shards_of_a_prepared_directory(prepared_setup, tmp_path):
    base, config = prepared_setup
    tokenizer, mixture, stats = prepare_data(config, tmp_path / "run")
    data = PreparedData.open(config.data.prepared)
    assert tokenizer.fingerprint() == data.manifest["tokenizer"]["fingerprint"]
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert "no tokenization" in stats["summary"]["data"]
    stream = data.stream(data.sources[0], "train")
    assert len(mixture.streams[0]) == len(stream) == data.sources[0]["splits"]["train"]["tokens"]
    sample = mixture[5]
    assert sample.shape == (config.train.seq_len + 1,) and sample.max() < tokenizer.vocab_size
    # the same sample for the same (seed, index), whatever else was read before
    assert np.array_equal(prepare_data(config, tmp_path / "run")[1][5], sample)


def test_prepared_directory_with_another_tokenizer_is_refused(prepared_setup, tmp_path, capsys):
    base, config = prepared_setup
    other = train_tokenizer(["def f(x):\n    return x\n" * 50], 400, 8)
    other.save(tmp_path / "run")  # a run that already has its own tokenizer
    with pytest.raises(UserError, match="tokenized with another tokenizer"):
        prepare_data(config, tmp_path / "run")
    code = cli_main(["train", "--preset", "tiny", "--data", config.data.prepared, "--out", str(tmp_path / "run"),
                     "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: prepared data") and "another tokenizer" in err[-1]


@pytest.mark.slow
def test_torchrun_two_ranks_train_from_prepared_data_and_resume_exactly(prepared_setup):
    base, config = prepared_setup
    path = stress.write_config(config, base / "config.toml")
    reference = base / "reference"
    launch = stress.run_to_end(path, reference, 2, "ddp")
    transcript = "".join(launch.transcript)
    assert "no tokenization, no raw-file walk" in transcript, transcript[-2000:]
    assert "tokenizing" not in transcript and "training a" not in transcript
    run = base / "killed"
    kills = stress.killed_run(config, path, run, 2, "ddp", kills=1, rng=random.Random(3), kinds=["step"],
                              pause_s=0.0, in_order=True)
    assert len(kills) == 1
    assert stress.compare_runs(reference, run) == []


# ------------------------------------------------------------- the in-line path: the same stages, RUN/prepared
def _same_prepared_output(a, b) -> None:
    """Shards, removed.jsonl, heldout.jsonl and the manifest's counts are the same in two prepared directories."""
    files = sorted(p.relative_to(a) for p in (a / "shards").rglob("*.bin"))
    assert files and files == sorted(p.relative_to(b) for p in (b / "shards").rglob("*.bin"))
    for name in [*files, "removed.jsonl", "heldout.jsonl", "tokenizer.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (PreparedData.open(d).manifest for d in (a, b))
    assert ma["sources"] == mb["sources"] and ma["totals"] == mb["totals"]


@pytest.mark.slow
def test_ctrl_c_during_the_inline_prepare_then_resume_gives_the_same_data(tmp_path):
    config = stress.tiny_config(tmp_path)
    config.data.heldout_fraction, config.train.max_steps = 0.2, 2
    path = stress.write_config(config, tmp_path / "config.toml")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "codegen2.cli", "train", "--config", str(path), "--out", str(run)]
    env = {**os.environ, PAUSE_ENV: "3"}  # each finished task waits, so the interrupt lands inside the prepare
    # SIGINT at its default in the child, as from a shell: an earlier test or library may leave it ignored in
    # this process, and an ignored SIGINT is inherited (Python then never raises KeyboardInterrupt).
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    in_stage_3 = False
    for line in process.stderr:
        lines.append(line)
        in_stage_3 = in_stage_3 or line.startswith("stage 3/6")
        if in_stage_3 and line.startswith(PAUSE_MARK):
            # inside the task's pause, past its fork (a signal during a fork's at-fork hooks is dropped by Python)
            process.send_signal(signal.SIGINT)
            break
    lines.extend(process.stderr)
    assert process.wait(timeout=60) == 130, "".join(lines)
    assert any("interrupted while preparing the data in" in line and "--resume` continues it" in line
               for line in lines), "".join(lines)
    assert not (run / "prepared" / "manifest.json").exists() and not list(run.glob("checkpoints/*"))
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing the run's data preparation" in resumed.stderr
    assert "stage 1/6 read: all 1 tasks already done" in resumed.stderr
    reference = tmp_path / "reference"
    prepare_data(config, reference)
    _same_prepared_output(run / "prepared", reference / "prepared")


@pytest.mark.slow
def test_torchrun_two_ranks_prepare_once_inline(tmp_path):
    """Under torchrun only rank 0 prepares the run's sources; rank 1 says it waits, then both train from them."""
    config = stress.tiny_config(tmp_path)
    config.train.max_steps = 2
    path = stress.write_config(config, tmp_path / "config.toml")
    launch = stress.run_to_end(path, tmp_path / "run", 2, "ddp")
    transcript = "".join(launch.transcript)
    assert transcript.count("preparing the run's data into") == 1, transcript[-3000:]
    assert f"rank 1 waits for rank 0 to prepare the data in {tmp_path / 'run' / 'prepared'}" in transcript
    assert "the run's prepared data" in transcript and "step 2/2" in transcript
    reference = tmp_path / "reference"
    prepare_data(config, reference)
    _same_prepared_output(tmp_path / "run" / "prepared", reference / "prepared")
