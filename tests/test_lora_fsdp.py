"""LoRA under FSDP2 (2 CPU processes, gloo): the frozen base and the adapters sharded, the same losses and adapters
as one process, checkpoints in the single-process LoRA format (adapters and their optimizer state only), resume
bit for bit on FSDP and on one process, and activation checkpointing, torch.compile and a bf16 base on top."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codegen2.checkpoint import TRAINER_STATE, WEIGHTS, checkpoint_step, latest_checkpoint, list_checkpoints, read_meta
from codegen2.safetensors_io import read_file
from codegen2.train import train
from test_lora_train import base_run, lora_config  # noqa: F401 - base_run is a fixture

EXTRA = {"train.global_batch_tokens": 512, "train.lora.dropout": 0.0, "train.max_steps": 6}


def launch(config, run: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`codegen2 train` under torchrun with `nproc` CPU processes and --parallel fsdp."""
    from codegen2.config import save_config

    path = run.parent / f"{run.name}.toml"
    save_config(config, path)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "codegen2.cli", "train", "--config", str(path), "--out", str(run),
                           "--parallel", "fsdp", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def adapters(run: Path) -> dict[str, torch.Tensor]:
    return read_file(latest_checkpoint(run) / WEIGHTS)


def copy_up_to(run: Path, step: int, dest: Path) -> Path:
    """The run as a crash after `step`'s checkpoint leaves it."""
    shutil.copytree(run, dest)
    for later in list_checkpoints(dest):
        if checkpoint_step(later) > step:
            shutil.rmtree(later)
    return dest


@pytest.fixture(scope="module")
def runs(base_run, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The single-process LoRA run and the same run on two FSDP ranks."""
    base, make = base_run
    root = tmp_path_factory.mktemp("lora-fsdp")
    config = lora_config(make, base, **EXTRA)
    train(config, root / "single")
    done = launch(config, root / "fsdp")
    return root, config, done


def test_fsdp_lora_follows_the_single_process_run_and_checkpoints_adapters_only(runs):
    root, _, done = runs
    assert "(fsdp, fp32)" in done.stderr and "LoRA rank 4" in done.stderr
    assert losses(root / "fsdp") == pytest.approx(losses(root / "single"), rel=1e-5)
    want, got = adapters(root / "single"), adapters(root / "fsdp")
    assert got.keys() == want.keys() and all(".lora_" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
    last = latest_checkpoint(root / "fsdp")
    meta = read_meta(last)
    assert (meta["format"], meta["parallel"], meta["world_size"]) == ("full", "fsdp", 2) and "lora" in meta
    assert not (last / "sharded").exists()
    optim = torch.load(last / TRAINER_STATE, weights_only=False)["optimizer"]
    assert set(optim["state"]) == set(got)  # optimizer state for the adapters only, keyed as one process keys it


def test_fsdp_lora_resumes_bitwise_on_fsdp_and_on_one_process(runs, tmp_path):
    root, config, _ = runs
    resumed = copy_up_to(root / "fsdp", 3, tmp_path / "resumed")
    launch(config, resumed, "--resume")
    want, got = adapters(root / "fsdp"), adapters(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert losses(resumed) == losses(root / "fsdp")
    single = copy_up_to(root / "fsdp", 3, tmp_path / "single")
    train(config, single, resume=True)  # the FSDP run's checkpoint, continued by one process
    for name, value in adapters(single).items():
        torch.testing.assert_close(value, want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_fsdp_lora_with_activation_checkpointing_compile_and_a_bf16_base(runs, tmp_path):
    root, config, _ = runs
    launch(config, tmp_path / "ac", "--set", "train.activation_checkpointing=true", "--set", "train.compile=true")
    assert losses(tmp_path / "ac") == pytest.approx(losses(root / "single"), rel=1e-5)
    bf16 = launch(config, tmp_path / "bf16", "--set", 'train.precision="bf16"')
    assert "(fsdp, bf16)" in bf16.stderr
    for a, b in zip(losses(root / "single"), losses(tmp_path / "bf16")):
        assert abs(a - b) < 0.05
    assert all(v.dtype == torch.float32 for v in adapters(tmp_path / "bf16").values())
