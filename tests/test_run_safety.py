"""Training never loses or overwrites work: another run's directory is refused, pruning touches only this
run's checkpoints, a model that cannot fit is refused before any work, --init-from keeps its tokenizer,
SIGINT/SIGTERM save a checkpoint, and damaged checkpoint files are named in one line (resume falls back)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from codegen2 import checkpoint as ckpt
from codegen2 import cli
from codegen2.config import ConfigError, dump_toml, load_config
from codegen2.errors import UserError
from codegen2.safetensors_io import read_file
from codegen2.tokenizer import CodeGenTokenizer
from codegen2.train import train


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _one_line_error(argv, capsys) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    return captured.err


@pytest.fixture
def finished_run(tiny_config, tmp_path):
    """A trained run (4 steps, checkpoints at 2 and 4) and the config file it was made from."""
    config = tiny_config(**{"train.max_steps": 4, "train.checkpoint_every": 2})
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(dump_toml(config))
    train(config, tmp_path / "run")
    return tmp_path / "run", config_file


def test_a_new_run_refuses_a_directory_holding_another_run(finished_run, capsys):
    run, config_file = finished_run
    before = _files(run)
    message = _one_line_error(["train", "--config", str(config_file), "--out", str(run), "--max-steps", "2"], capsys)
    assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    assert "2 checkpoints up to step 4" in message
    with pytest.raises(UserError, match="already holds a run"):
        train(load_config(config_file), run)
    assert _files(run) == before  # not one byte changed


def test_overwrite_replaces_the_previous_run_whole(finished_run, capsys):
    run, config_file = finished_run
    (run / "notes.txt").write_text("mine")
    assert cli.main(["train", "--config", str(config_file), "--out", str(run), "--overwrite", "--max-steps", "1",
                     "--checkpoint-every", "1"]) == 0
    assert "removed the previous run" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000001"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]
    assert load_config(run / "config.toml").train.max_steps == 1
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: left alone


def test_resume_needs_a_run_and_excludes_overwrite(tmp_path, capsys, finished_run):
    message = _one_line_error(["train", "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert "nothing to resume" in message and not (tmp_path / "empty").exists()
    run, _ = finished_run
    assert "choose one" in _one_line_error(["train", "--out", str(run), "--resume", "--overwrite"], capsys)


def test_pruning_touches_only_this_runs_older_checkpoints(tmp_path):
    state = {"w": torch.zeros(2)}
    for step, run_id in ((1, "ours"), (2, "ours"), (3, "ours"), (5, "theirs"), (9, "theirs"), (12, "ours")):
        ckpt.write_checkpoint(tmp_path, step, state, {"run_id": run_id})
    ckpt.prune_checkpoints(tmp_path, keep_last=2, run_id="ours", before_step=3)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [2, 3, 5, 9, 12]


def test_resumed_run_keeps_its_run_id_so_pruning_continues(tiny_config, tmp_path):
    config = tiny_config(**{"train.max_steps": 3, "train.checkpoint_every": 1, "train.keep_last": 2})
    train(config, tmp_path / "run", stop_after=2)
    config.train.max_steps = 4
    train(config, tmp_path / "run", resume=True)
    found = ckpt.list_checkpoints(tmp_path / "run")
    assert [ckpt.checkpoint_step(p) for p in found] == [3, 4]
    assert len({ckpt.read_meta(p)["run_id"] for p in found}) == 1


def test_no_preset_means_tiny_and_a_model_too_big_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("codegen2.train.train", _fake_train(seen))
    assert cli.main(["train", "--out", str(tmp_path / "default")]) == 0
    assert seen["config"].preset == "tiny" and seen["config"].model.n_layer == 4
    assert "using the tiny preset" in capsys.readouterr().err
    monkeypatch.undo()

    started = time.monotonic()
    message = _one_line_error(["train", "--preset", "16b", "--out", str(tmp_path / "big")], capsys)
    assert "GiB" in message and "16b preset" in message and "--preset tiny" in message
    assert time.monotonic() - started < 20 and not (tmp_path / "big").exists()


def test_memory_estimate_counts_weights_gradients_optimizer_and_activations():
    from codegen2.train import training_memory_bytes

    config = load_config(preset="tiny")
    n, total, activations = training_memory_bytes(config)
    assert n == 5_254_656 and total - activations == 16 * n and activations > 0
    config.train.activation_checkpointing = True
    assert training_memory_bytes(config)[2] < activations
    _, per_rank, _ = training_memory_bytes(load_config(preset="1b"), world_size=4, parallel="fsdp")
    assert per_rank < training_memory_bytes(load_config(preset="1b"))[1]


def test_init_from_uses_the_source_runs_tokenizer(finished_run, tiny_config, tmp_path):
    source, _ = finished_run
    other = tmp_path / "other-corpus"
    other.mkdir()
    for name in ("json/encoder.py", "csv.py", "argparse.py"):
        (other / Path(name).name).write_text((Path(json.__file__).parents[1] / name).read_text(encoding="utf-8"))
    config = tiny_config(**{"train.max_steps": 1, "train.init_from": str(source)})
    config.data.sources[0].path = str(other)
    train(config, tmp_path / "continued")
    assert CodeGenTokenizer.load(tmp_path / "continued").fingerprint() == CodeGenTokenizer.load(source).fingerprint()
    config.tokenizer.path = str(source / "tokenizer.json")
    with pytest.raises(ConfigError, match="brings its own tokenizer"):
        train(config, tmp_path / "conflict")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_at_the_last_finished_step(finished_run, tmp_path, sig, code):
    _, config_file = finished_run
    run = tmp_path / f"signalled-{sig.name}"
    command = [sys.executable, "-m", "codegen2.cli", "train", "--config", str(config_file), "--out", str(run),
               "--max-steps", "100000", "--checkpoint-every", "100000"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    logged = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("step "):
            logged.append(int(line.split()[1].split("/")[0]))
            if len(logged) >= 3:
                break
    assert len(logged) >= 3, "training did not start in time"
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(60) == code, rest
    (saved,) = ckpt.list_checkpoints(run)
    step = ckpt.checkpoint_step(saved)
    assert step >= logged[-1] and f"{sig.name}: stopped after step {step}" in rest
    assert ckpt.checkpoint_problem(saved, need_trainer_state=True) is None
    records = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(records) <= step
    resumed = subprocess.run([sys.executable, "-m", "codegen2.cli", "train", "--out", str(run), "--resume",
                              "--max-steps", str(step + 1)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stderr, resumed.stderr


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00" * 8 + data[8:])


@pytest.mark.parametrize("victim, how", [(ckpt.WEIGHTS, "truncate"), (ckpt.WEIGHTS, "garble"),
                                         (ckpt.TRAINER_STATE, "truncate"), (ckpt.META, "truncate")])
def test_resume_falls_back_to_the_newest_intact_checkpoint(finished_run, victim, how, capsys):
    run, _ = finished_run
    _damage(run / "checkpoints" / "step_00000004" / victim, how)
    result = train(load_config(run / "config.toml"), run, resume=True)
    err = capsys.readouterr().err
    assert f"step_00000004 cannot be resumed from: {run / 'checkpoints' / 'step_00000004' / victim}" in err
    assert "resuming from" in err and "step_00000002 at step 2" in err
    assert result.final_step == 4


def test_resume_with_every_checkpoint_damaged_is_an_error(finished_run):
    run, _ = finished_run
    for path in ckpt.list_checkpoints(run):
        _damage(path / ckpt.WEIGHTS, "truncate")
    with pytest.raises(UserError, match="no intact checkpoint"):
        train(load_config(run / "config.toml"), run, resume=True)


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_commands_name_a_damaged_weights_file_in_one_line(finished_run, capsys, how):
    run, _ = finished_run
    weights = run / "checkpoints" / "step_00000004" / ckpt.WEIGHTS
    _damage(weights, how)
    for argv in (["sample", "--checkpoint", str(run), "--prompt", "x"],
                 ["infill", "--checkpoint", str(run), "--prefix", "a", "--suffix", "b"],
                 ["eval", "heldout", "--checkpoint", str(run)],
                 ["serve", "--checkpoint", str(run), "--port", "1"]):
        message = _one_line_error(argv, capsys)
        assert str(weights) in message and "--step 2" in message, (argv, message)
    assert cli.main(["sample", "--checkpoint", str(run), "--step", "2", "--prompt", "x", "--max-new-tokens", "2",
                     "--decoder", "model"]) == 0


# ------------------------------------------------------------------------------------------ friction
def _fake_train(seen: dict):
    """Stands in for codegen2.train.train in CLI tests: records the config it was given."""
    def fake(config, run_dir, **kwargs):
        seen["config"] = config
        return SimpleNamespace(interrupted="", final_step=0, tokens_seen=0, last_loss=0.0)

    return fake


def test_jsonl_field_error_names_the_field_and_data_can_name_it(tmp_path, monkeypatch):
    from codegen2.config import DataConfig
    from codegen2.data import data_sources, source_from_path

    data = tmp_path / "code.jsonl"
    data.write_text("\n".join(json.dumps({"path": f"m{i}.py", "content": f"def f{i}():\n    return {i}\n" * 20})
                              for i in range(30)) + "\n")
    with pytest.raises(UserError) as err:
        for source in data_sources(DataConfig(sources=[source_from_path(str(data))]), "train"):
            list(source.documents())
    assert 'field = "content"' in str(err.value) and f"--data {data}:content" in str(err.value), err.value
    seen = {}
    monkeypatch.setattr("codegen2.train.train", _fake_train(seen))
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--data", f"{data}:content"]) == 0
    (source,) = seen["config"].data.sources
    assert (source.path, source.field) == (str(data), "content")
    assert sum(1 for s in data_sources(seen["config"].data, "train") for _ in s.documents()) > 20


def test_resume_takes_data_for_an_imported_run_but_not_for_a_trained_one(finished_run, tmp_path, capsys,
                                                                         monkeypatch):
    run, _ = finished_run
    corpus = tmp_path / "mine"
    corpus.mkdir()
    (corpus / "a.py").write_text("x = 1\n")
    message = _one_line_error(["train", "--out", str(run), "--resume", "--data", str(corpus)], capsys)
    assert "trained to step 4" in message and "--init-from" in message
    imported = tmp_path / "imported"
    imported.mkdir()
    for name in ("config.toml", "tokenizer.json"):
        (imported / name).write_bytes((run / name).read_bytes())
    weights = read_file(run / "checkpoints" / "step_00000004" / ckpt.WEIGHTS)
    ckpt.write_checkpoint(imported, 0, weights, {"tokens_seen": 0, "imported_from": "somewhere"})
    seen = {}
    monkeypatch.setattr("codegen2.train.train", _fake_train(seen))
    assert cli.main(["train", "--out", str(imported), "--resume", "--data", str(corpus)]) == 0
    assert load_config(imported / "config.toml").data.sources[0].path == str(corpus)
    assert seen["config"].data.sources[0].path == str(corpus)


def test_mfu_never_exceeds_one_when_the_peak_was_measured_under_load():
    from codegen2.metrics import Throughput

    meter = Throughput(flops_per_token=1e6, peak_flops=1e6)  # "measured" far below what the step achieves
    meter.start()
    time.sleep(0.01)
    meter.update(10_000)
    assert meter.mfu() == 1.0 and meter.peak_flops > 1e6


def test_verbose_works_after_the_subcommand():
    parser = cli.build_parser()
    assert parser.parse_args(["info", "--preset", "tiny", "-v"]).verbose
    assert parser.parse_args(["-v", "info", "--preset", "tiny"]).verbose
    assert not parser.parse_args(["info", "--preset", "tiny"]).verbose
    assert parser.parse_args(["eval", "heldout", "--checkpoint", "x", "--verbose"]).verbose


def test_weights_files_get_the_usual_file_mode(tmp_path):
    path = ckpt.write_checkpoint(tmp_path, 1, {"w": torch.zeros(3)}, {})
    umask = os.umask(0)
    os.umask(umask)
    assert (path / ckpt.WEIGHTS).stat().st_mode & 0o777 == 0o666 & ~umask == (path / ckpt.META).stat().st_mode & 0o777


def test_training_summary_names_skipped_and_cut_documents():
    from codegen2.train import data_summary

    stats = {"summary": {"tokenizer": "trained", "mine": "3 docs, 10 tokens, weight 1.00"},
             "sources": [{"name": "mine", "skipped": {"binary": 2, "not_utf8": 1, "empty": 0}, "truncated": 4}]}
    assert data_summary(stats)["mine"] == ("3 docs, 10 tokens, weight 1.00; skipped 2 binary, 1 not utf8; "
                                           "4 cut to data.max_doc_chars")
