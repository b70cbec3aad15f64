"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process loss curve on the same data,
checkpoints move between 1 and 2 ranks, bf16 FSDP and activation checkpointing run on CPU, the MFU formula
agrees with torch's FLOP counter, and `codegen2 plot` draws a run.

Launches go through `python -m torch.distributed.run --standalone --nproc_per_node 2 -m codegen2.cli train`.
The reference runs are shared with tests/test_resume.py (same config, cached under pytest's base temp dir).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from codegen2 import checkpoint as ckpt
from codegen2.metrics import flops_per_token
from codegen2.safetensors_io import read_file
from codegen2.train import train
from conftest import load_stress

stress = load_stress()


def log(run: Path) -> list[dict]:
    return stress.read_log(run)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return read_file(ckpt.latest_checkpoint(run) / ckpt.WEIGHTS)


def assert_close_runs(a: Path, b: Path, atol: float = 2e-5) -> None:
    """Same data in the same order (hash chain), loss curves and final weights equal within fp tolerance."""
    log_a, log_b = log(a), log(b)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    assert [r["data_hash"] for r in log_a] == [r["data_hash"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=atol, rtol=1e-4, msg=name)


def copy_up_to(run: Path, step: int, dest: Path) -> Path:
    """A run directory as a crash after `step`'s checkpoint would leave it (later checkpoints gone)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(stress.DONE_MARKER))
    for later in ckpt.list_checkpoints(dest):
        if ckpt.checkpoint_step(later) > step:
            shutil.rmtree(later)
    return dest


@pytest.mark.parametrize("suite", ["codegen", "llama"], indirect=True)
def test_ddp_and_fsdp_on_two_processes_follow_the_single_process_run(suite, tmp_path):
    base, config, path = suite
    single = stress.reference_run(path, base / "ref-1", 1, "none", in_process=True)
    fsdp = stress.reference_run(path, base / "ref-2-fsdp", 2, "fsdp")
    ddp = stress.run_to_end(path, tmp_path / "ddp", 2, "ddp") and tmp_path / "ddp"

    assert len(log(single)) == config.train.max_steps
    assert_close_runs(single, ddp)
    assert_close_runs(single, fsdp)
    # Micro-batch m of one process is rank m of two, so DDP's gradient all-reduce adds the same two terms
    # as one process's accumulation: the weights agree bit for bit (only the logged loss sums associate
    # differently).
    w_single, w_ddp = final_weights(single), final_weights(ddp)
    assert all(torch.equal(w_single[k], w_ddp[k]) for k in w_single)

    meta = ckpt.read_meta(ckpt.latest_checkpoint(fsdp))
    assert (meta["world_size"], meta["micro_batch_size"], meta["grad_accum"], meta["format"]) == (2, 4, 1, "sharded")
    assert meta["next_sample_index"] == 6 * 8
    shards = ckpt.latest_checkpoint(fsdp) / ckpt.SHARDED
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    consolidated = ckpt.consolidate_sharded(shards)
    weights = final_weights(fsdp)
    assert all(torch.equal(consolidated[k], weights[k]) for k in weights)
    assert {k: v.dtype for k, v in weights.items()} == {k: torch.float32 for k in weights}


def test_two_rank_fsdp_checkpoint_resumes_on_one_process(suite, tmp_path, capsys):
    base, config, path = suite
    fsdp = stress.reference_run(path, base / "ref-2-fsdp", 2, "fsdp")
    run = copy_up_to(fsdp, 3, tmp_path / "run")
    train(config, run, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint layout 2 ranks x micro-batch 4 x accumulation 1, now 1 x 4 x 2" in err
    assert "global sample index 3 * 8 = 24" in err
    assert_close_runs(fsdp, run)


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks_with_activation_checkpointing(suite, tmp_path):
    base, config, path = suite
    single = stress.reference_run(path, base / "ref-1", 1, "none", in_process=True)
    run = copy_up_to(single, 3, tmp_path / "run")
    launch = stress.Launch.start(stress.train_command(path, run, 2, "fsdp") +
                                 ["--set", "train.activation_checkpointing=true"], stress.launch_env())
    assert launch.wait() == 0, "".join(launch.transcript[-30:])
    assert "now 2 x 4 x 1" in "".join(launch.transcript)
    assert_close_runs(single, run)


def test_bf16_fsdp_trains_on_cpu(suite, tmp_path):
    """The GPU recipe (FSDP2 with bf16 parameters, fp32 reduction and master weights) exercised on gloo."""
    base, config, path = suite
    single = stress.reference_run(path, base / "ref-1", 1, "none", in_process=True)
    launch = stress.Launch.start(stress.train_command(path, tmp_path / "bf16", 2, "fsdp") +
                                 ["--set", 'train.precision="bf16"'], stress.launch_env())
    assert launch.wait() == 0, "".join(launch.transcript[-30:])
    assert "(fsdp, bf16)" in "".join(launch.transcript)
    fp32, bf16 = log(single), log(tmp_path / "bf16")
    assert [r["data_hash"] for r in bf16] == [r["data_hash"] for r in fp32]
    for a, b in zip(fp32, bf16):
        assert abs(a["loss"] - b["loss"]) < 0.05, (a, b)
    assert bf16[-1]["loss"] < bf16[0]["loss"] - 0.2
    assert all(v.dtype == torch.float32 for v in final_weights(tmp_path / "bf16").values())


@pytest.mark.parametrize("arch", ["codegen", "llama"])
def test_activation_checkpointing_gives_the_same_losses(tiny_config, tmp_path, arch):
    shape = stress.ARCH_OVERRIDES[arch]
    plain = train(tiny_config(**shape, **{"train.max_steps": 2}), tmp_path / "plain")
    recomputed = train(tiny_config(**shape, **{"train.max_steps": 2, "train.activation_checkpointing": True}),
                       tmp_path / "ac")
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in recomputed.history]
    assert [r["grad_norm"] for r in plain.history] == [r["grad_norm"] for r in recomputed.history]


@pytest.mark.parametrize("arch", ["codegen", "llama"])
def test_flops_per_token_matches_torch_flop_counter(arch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from codegen2.config import ModelConfig
    from codegen2.models import build_model

    shape = dict(mp_num=2) if arch == "codegen" else dict(arch="llama", n_kv_head=2, n_inner=200)
    for d, layers, seq, vocab in [(128, 2, 96, 500), (64, 3, 160, 300)]:
        rotary_dim = 8 if arch == "codegen" else d // 4
        cfg = ModelConfig(vocab_size=vocab, n_layer=layers, n_embd=d, n_head=4, rotary_dim=rotary_dim, n_ctx=seq,
                          **shape)
        model = build_model(cfg)
        tokens = torch.randint(0, vocab, (2, seq))
        # The math backend runs attention as matmuls that the counter sees (fused kernels are not counted).
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(tokens).sum().backward()
        assert flops_per_token(cfg, seq) == counter.get_total_flops() / tokens.numel()


def test_log_has_throughput_and_plot_draws_it(suite, tmp_path):
    from codegen2.cli import main

    base, config, path = suite
    fsdp = stress.reference_run(path, base / "ref-2-fsdp", 2, "fsdp")
    records = log(fsdp)
    for record in records:
        assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1 and record["grad_norm"] > 0
        assert {"loss_causal", "loss_span", "eta_s", "lr", "data_hash"} <= set(record)
    assert any((fsdp / "tensorboard").glob("events.out.tfevents.*"))
    assert main(["plot", str(fsdp), "--out", str(tmp_path / "plots")]) == 0
    for name in ("loss.png", "throughput.png", "optimizer.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
