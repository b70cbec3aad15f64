"""Training from a prepared directory: shards memory-mapped on every rank (no tokenization, the log says so),
exact resume under torchrun after kills, and a prepared directory made with another tokenizer refused."""

from __future__ import annotations

import random

import numpy as np
import pytest

from codegen2.cli import main as cli_main
from codegen2.data import prepare_data
from codegen2.data.prepare import PreparedData
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
