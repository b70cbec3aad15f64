"""Training: the loss falls, a killed-and-resumed run ends bitwise equal, the CLI reports bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from codegen2.checkpoint import WEIGHTS, latest_checkpoint, list_checkpoints
from codegen2.safetensors_io import read_file
from codegen2.train import lr_at, seed_rngs, train


def test_loss_falls_and_run_directory_is_complete(tiny_config, tmp_path):
    config = tiny_config(**{"train.max_steps": 12, "train.checkpoint_every": 6})
    result = train(config, tmp_path / "run")
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0] - 0.5
    run = tmp_path / "run"
    assert (run / "config.toml").is_file() and (run / "tokenizer.json").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000006", "step_00000012"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"loss_causal", "loss_span", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(records[-1])

    out = run_cli("sample", "--checkpoint", str(run), "--prompt", "def f(x):\n", "--max-new-tokens", "8")
    assert out.returncode == 0 and out.stdout.startswith("def f(x):\n"), out.stderr
    out = run_cli("infill", "--checkpoint", str(run), "--prefix", "a = ", "--suffix", "\n", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr


def test_resume_after_interruption_is_bitwise_identical(tiny_config, tmp_path):
    config = tiny_config()
    straight = train(config, tmp_path / "a")
    train(config, tmp_path / "b", stop_after=4)  # "crash" after step 4; the last checkpoint is step 3
    # Lose everything written after the last checkpoint, as a kill would.
    resumed = train(config, tmp_path / "b", resume=True)
    assert resumed.final_step == straight.final_step == 6
    a = read_file(latest_checkpoint(tmp_path / "a") / WEIGHTS)
    b = read_file(latest_checkpoint(tmp_path / "b") / WEIGHTS)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))  # redone steps are not logged twice
    assert [r["loss"] for r in log] == [r["loss"] for r in straight.history]


def test_schedule_warms_up_then_decays_to_the_floor(tiny_config):
    t = tiny_config(**{"train.max_steps": 100, "train.warmup_steps": 10, "train.lr": 1.0,
                       "train.min_lr_ratio": 0.1}).train
    assert lr_at(0, t) == 0.1 and lr_at(9, t) == 1.0
    assert abs(lr_at(55, t) - 0.55) < 1e-9
    assert abs(lr_at(100, t) - 0.1) < 1e-12


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codegen2.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 1e-3\n")
    out = run_cli("train", "--config", str(bad), "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "unknown config key 'train.learning_rate'" in out.stderr and "lr" in out.stderr
    assert "Traceback" not in out.stderr

    out = run_cli("train", "--preset", "tiny", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "missing" in out.stderr and "Traceback" not in out.stderr

    out = run_cli("sample", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "x")
    assert out.returncode == 2 and "checkpoint not found" in out.stderr


def test_cli_info_prints_exact_parameter_counts():
    out = run_cli("info", "--preset", "16b")
    assert out.returncode == 0 and "16,032,155,648" in out.stdout


def test_eval_every_logs_heldout_loss_without_changing_training(tiny_config, tmp_path):
    from codegen2.data.heldout import run_heldout_documents
    from codegen2.eval.heldout import heldout_loss
    from codegen2.loading import load_checkpoint

    settings = {"train.eval_every": 4, "train.eval_tokens": 300, "train.log_every": 3}
    probed_config = tiny_config(**settings)
    probed_config.data.heldout_fraction = 0.3
    plain_config = tiny_config(**{"train.log_every": 3})
    plain_config.data.heldout_fraction = 0.3
    train(probed_config, tmp_path / "probed")
    train(plain_config, tmp_path / "plain")

    records = [json.loads(line) for line in (tmp_path / "probed" / "log.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if "eval_code_loss" in r]
    assert evaluated == [4, 6]  # every 4 steps and at the end
    assert [r["step"] for r in records if "loss" in r] == [1, 3, 6]
    a = read_file(latest_checkpoint(tmp_path / "probed") / WEIGHTS)
    b = read_file(latest_checkpoint(tmp_path / "plain") / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating never changes what training does

    loaded = load_checkpoint(tmp_path / "probed")
    # the probe scores the run's prepared held-out documents (RUN/prepared/heldout.jsonl)
    texts = [d.text for d in run_heldout_documents(probed_config, tmp_path / "probed") if d.kind == "code"]
    assert texts
    direct = heldout_loss(loaded.model, loaded.tokenizer, texts, window=probed_config.train.seq_len,
                          max_tokens=300, batch_size=probed_config.train.micro_batch_size)
    assert abs(records[-1]["eval_code_loss"] - direct["loss"]) < 1e-5


def test_each_rank_draws_its_own_dropout_masks():
    """Ranks share the weights' seed but not dropout's: rank r seeds torch with seed + r, so a dropout mask is
    not copied across the ranks' batches, and one process (rank 0) draws exactly as before."""
    masks = []
    for rank in (0, 1, 0):
        seed_rngs(1234, rank)
        masks.append(torch.nn.functional.dropout(torch.ones(256), p=0.5))
    assert torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[0], masks[1])
    torch.manual_seed(1234)
    assert torch.equal(masks[0], torch.nn.functional.dropout(torch.ones(256), p=0.5))
