"""LoRA runs: training only the adapters over a frozen base, bitwise resume, a base that changed refused, and
every command that takes a run (load, --step, export-hf merged and --adapter-only, --adapter) on one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import torch

from codegen2.checkpoint import WEIGHTS, latest_checkpoint, list_checkpoints, read_meta
from codegen2.errors import UserError
from codegen2.loading import load_checkpoint, load_lora_run
from codegen2.safetensors_io import read_file
from codegen2.train import train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = {"train.lora.rank": 4, "train.lora.alpha": 8.0, "train.lr": 1e-2}


@pytest.fixture(scope="module")
def base_run(small_corpus, tmp_path_factory):
    """A tiny CodeGen run (qkv in 4 groups, as transformers computes) trained for a few steps: the base."""
    from codegen2.config import SourceConfig, load_config
    from conftest import tiny_overrides

    def make(**extra):
        config = load_config(None, overrides=tiny_overrides(small_corpus, **{"model.mp_num": 4, **extra}))
        config.data.sources = [SourceConfig(path=str(small_corpus), kind="code", weight=1.0, include=["*.py"])]
        config.data.heldout_fraction = 0.0
        return config.validate()

    root = tmp_path_factory.mktemp("lora")
    train(make(**{"train.max_steps": 3}), root / "base")
    return root / "base", make


def lora_config(make, base, **extra):
    return make(**{"train.init_from": str(base), **LORA, **extra})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codegen2.cli", *args], capture_output=True, text=True, timeout=300)


def ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 300, 42, 7, 99, 256, 11]])


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="module")
def lora_run(base_run):
    base, make = base_run
    run = base.parent / "lora"
    result = train(lora_config(make, base), run)
    return run, result


def test_only_adapters_train_are_checkpointed_and_resume_is_bitwise(base_run, lora_run, tmp_path):
    base, make = base_run
    run, straight = lora_run
    saved = read_file(latest_checkpoint(run) / WEIGHTS)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if ".lora_B." in k)  # B moved away from zero
    optim = torch.load(latest_checkpoint(run) / "trainer_state.pt", weights_only=False)["optimizer"]
    assert set(optim["state"]) == set(saved)  # optimizer state for the adapters only
    meta = read_meta(latest_checkpoint(run))["lora"]
    assert (meta["rank"], meta["targets"]) == (4, "all-linear") and meta["base"]["path"] == str(base.resolve())

    config = lora_config(make, base)
    train(config, tmp_path / "b", stop_after=4)  # "crash" after step 4; the last checkpoint is step 3
    resumed = train(config, tmp_path / "b", resume=True)
    assert resumed.final_step == straight.final_step == 6
    again = read_file(latest_checkpoint(tmp_path / "b") / WEIGHTS)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert [r["loss"] for r in straight.history][3:] == [r["loss"] for r in resumed.history]


def test_resume_refuses_a_base_that_changed(base_run, tmp_path):
    base, make = base_run
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    train(lora_config(make, copy), tmp_path / "run", stop_after=3)
    weights = latest_checkpoint(copy) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="not the one its adapters were trained on") as info:
        train(lora_config(make, copy), tmp_path / "run", resume=True)
    assert "\n" not in str(info.value)


def test_loading_a_lora_run_merges_it_and_step_picks_the_checkpoint(lora_run):
    run, _ = lora_run
    unmerged = load_lora_run(run, latest_checkpoint(run), "cpu").model
    merged = load_checkpoint(run)
    with torch.no_grad():
        assert max_diff(merged.model(ids()), unmerged(ids())) <= 1e-5
    first = list_checkpoints(run)[0]
    assert load_checkpoint(run, step=3).source == str(first)
    assert not any(".lora_" in k for k in merged.model.state_dict())


def test_merged_export_loads_in_transformers_with_the_unmerged_logits(lora_run, tmp_path):
    run, _ = lora_run
    out = tmp_path / "merged"
    done = run_cli("export-hf", str(run), str(out))
    assert done.returncode == 0, done.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    unmerged = load_lora_run(run, latest_checkpoint(run), "cpu").model
    with torch.no_grad():
        assert max_diff(hf(ids()).logits, unmerged(ids())) <= 1e-4


def test_adapter_only_export_loads_in_peft_as_adapter_and_in_from_pretrained(base_run, lora_run, tmp_path):
    import codegen2

    base, _ = base_run
    run, _ = lora_run
    hf_base = tmp_path / "base-hf"
    assert run_cli("export-hf", str(base), str(hf_base)).returncode == 0
    out = tmp_path / "adapter"
    done = run_cli("export-hf", str(run), str(out), "--adapter-only")
    assert done.returncode == 0, done.stderr
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_base), out).eval()
    unmerged = load_lora_run(run, latest_checkpoint(run), "cpu").model
    over_hf = load_checkpoint(hf_base, adapter=out)  # --adapter: PEFT's layout over the HF base
    over_run = load_checkpoint(base, adapter=run)  # --adapter: a LoRA run over its own base
    api = codegen2.from_pretrained(hf_base, adapter=out)  # the Python API, PEFT's layout
    api_run = codegen2.from_pretrained(base, adapter=run, dtype="bfloat16")  # a LoRA run, merged before the cast
    with torch.no_grad():
        want = unmerged(ids())
        assert max_diff(reference(ids()).logits, want) <= 1e-4
        assert max_diff(over_hf.model(ids()), want) <= 1e-4
        assert max_diff(over_run.model(ids()), want) <= 1e-5
        assert max_diff(api(ids()), reference(ids()).logits) <= 1e-4 and api.tokenizer is not None
        assert not any(".lora_" in k for k in api.state_dict())
        assert api_run.lm_head.weight.dtype == torch.bfloat16 and max_diff(api_run(ids()), want) <= 0.1
    with pytest.raises(UserError, match="not the one its adapters were trained on"):
        load_checkpoint(hf_base, adapter=run)  # same weights, but not the files the run's fingerprint names


def test_sample_with_adapter_equals_sample_of_the_run(base_run, lora_run):
    base, _ = base_run
    run, _ = lora_run
    common = ("--prompt", "def f(x):\n", "--max-new-tokens", "6")
    of_run = run_cli("sample", "--checkpoint", str(run), *common)
    with_adapter = run_cli("sample", "--checkpoint", str(base), "--adapter", str(run), *common)
    assert of_run.returncode == 0 and with_adapter.returncode == 0, (of_run.stderr, with_adapter.stderr)
    assert of_run.stdout == with_adapter.stdout
    infill = run_cli("infill", "--checkpoint", str(run), "--prefix", "a = ", "--suffix", "\n", "--max-new-tokens", "4")
    assert infill.returncode == 0, infill.stderr


def test_init_from_alone_takes_the_shapes_and_the_finetuning_recipe(base_run, small_corpus, tmp_path):
    base, _ = base_run
    done = run_cli("train", "--init-from", str(base), "--data", str(small_corpus), "--lora", "2", "--out",
                   str(tmp_path / "run"), "--max-steps", "2", "--set", "train.num_threads=1")
    assert done.returncode == 0, done.stderr
    assert "shapes come from" in done.stderr and "LoRA rank 2" in done.stderr
    refused = run_cli("train", "--preset", "tiny", "--init-from", str(base), "--data", str(small_corpus), "--lora",
                      "2", "--out", str(tmp_path / "other"))
    assert refused.returncode == 2 and "shapes differ" in refused.stderr


@pytest.mark.parametrize("args, needle", [
    (("--lora", "2", "--set", "train.lora.targets=nothing_here"), "matches no linear layer"),
    (("--lora", "4096"), "is larger than layer"),
    (("--lora", "0"), "the rank must be at least 1"),
    (("--set", "train.lora.rank=-1"), "must be >= 0"),
])
def test_bad_lora_input_is_one_line(base_run, small_corpus, tmp_path, args, needle):
    base, _ = base_run
    done = run_cli("train", "--init-from", str(base), "--data", str(small_corpus), "--out", str(tmp_path / "run"),
                   "--max-steps", "1", *args)
    assert done.returncode == 2 and needle in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()[-1]) > 0 and "Traceback" not in done.stderr


def test_lora_without_base_and_bad_adapter_directories_are_one_line(base_run, lora_run, tmp_path):
    base, _ = base_run
    run, _ = lora_run
    done = run_cli("train", "--preset", "tiny", "--lora", "4", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "--init-from" in done.stderr
    (tmp_path / "empty").mkdir()
    missing = run_cli("sample", "--checkpoint", str(base), "--adapter", str(tmp_path / "empty"), "--prompt", "x")
    assert missing.returncode == 2 and "missing adapter_config.json" in missing.stderr
    refused = run_cli("export-hf", str(base), str(tmp_path / "y"), "--adapter-only")
    assert refused.returncode == 2 and "not LoRA adapters" in refused.stderr


def test_ddp_activation_checkpointing_and_compile_follow_the_single_process_run(base_run, tmp_path):
    """Without dropout (each rank draws its own mask) two DDP ranks, activation checkpointing and
    torch.compile all end at the single-process adapters."""
    from codegen2.config import save_config

    base, make = base_run
    extra = {"train.global_batch_tokens": 512, "train.lora.dropout": 0.0, "train.max_steps": 3}
    single = train(lora_config(make, base, **extra), tmp_path / "single")
    config = lora_config(make, base, **extra)
    save_config(config, tmp_path / "lora.toml")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "codegen2.cli", "train", "--config", str(tmp_path / "lora.toml"), "--out",
                           str(tmp_path / "ddp"), "--parallel", "ddp"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpointed = train(lora_config(make, base, **extra, **{"train.activation_checkpointing": True,
                                                             "train.compile": True}), tmp_path / "ckpt")
    want = read_file(latest_checkpoint(tmp_path / "single") / WEIGHTS)
    for other in ("ddp", "ckpt"):
        got = read_file(latest_checkpoint(tmp_path / other) / WEIGHTS)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=f"{other} {name}")
    assert [r["loss"] for r in checkpointed.history] == pytest.approx([r["loss"] for r in single.history], rel=1e-5)


def test_info_prints_full_and_lora_memory_and_the_fit_check_uses_it():
    from codegen2.config import load_config
    from codegen2.train import memory_plan

    done = run_cli("info", "--preset", "codegen25-7b", "--lora", "16", "--seq-len", "2048")
    assert done.returncode == 0, done.stderr
    assert "LoRA rank 16" in done.stdout and "trained parameters 39,976,960" in done.stdout
    config = load_config(preset="1b", overrides=["train.init_from=\"x\"", "train.lora.rank=16",
                                                 "train.micro_batch_size=1"])
    lora = memory_plan(config)
    config.train.lora.rank = 0
    full = memory_plan(config)
    assert lora.trained == 8_388_608 and lora.gradients == 4 * lora.trained and lora.optimizer == 8 * lora.trained
    assert lora.weights + lora.gradients + lora.optimizer < 0.3 * (full.weights + full.gradients + full.optimizer)


def test_eval_heldout_scores_runs_and_lora_runs_on_another_prepared_directory(base_run, lora_run, tmp_path):
    """`eval heldout --checkpoint RUN --data DIR`: a run, a LoRA run and a base with --adapter, each with its own
    tokenizer, on DIR's held-out documents at one window, so that before and after compare."""
    import json

    from codegen2 import cli
    from codegen2.data import prepare_data
    from codegen2.data.prepare import PreparedData
    from codegen2.eval.heldout import heldout_loss
    from codegen2.tokenizer import CodeGenTokenizer

    base, make = base_run
    run, _ = lora_run
    config = make()
    config.data.heldout_fraction = 0.5
    prepare_data(config, tmp_path / "other", CodeGenTokenizer.load(base), log=lambda message: None)
    prepared = tmp_path / "other" / "prepared"
    code = [d.text for d in PreparedData.open(prepared).heldout_documents() if d.kind == "code"]
    assert code
    results = {}
    for name, args in {"base": [str(base)], "lora": [str(run)], "adapter": [str(base), "--adapter", str(run)]}.items():
        out = tmp_path / f"{name}.json"
        assert cli.main(["eval", "heldout", "--checkpoint", *args, "--data", str(prepared), "--n-infill", "0",
                         "--max-tokens", "2000", "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())["code"]
    loaded = load_checkpoint(run)
    want = heldout_loss(loaded.model, loaded.tokenizer, code, min(1024, loaded.config.n_ctx - 1), 2000)
    assert results["lora"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert results["adapter"]["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert results["base"]["tokens"] == want["tokens"] and results["base"]["loss"] != want["loss"]
    assert not (run / "eval" / "heldout.json").exists()  # another data set's numbers never replace the run's own


def test_serve_with_adapter_answers_as_the_run_under_the_adapters_name(base_run, lora_run):
    import socket

    import httpx

    base, _ = base_run
    run, _ = lora_run
    of_run = run_cli("sample", "--checkpoint", str(run), "--prompt", "def f(x):\n", "--max-new-tokens", "6")
    assert of_run.returncode == 0, of_run.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "codegen2.cli", "serve", "--checkpoint", str(base), "--adapter",
                             str(run), "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stdout.read()
            try:
                models = httpx.get(url + "/v1/models", timeout=30).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == [run.name]  # the tuned model, not the base, by default
        answer = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": run.name, "prompt": "def f(x):\n", "max_tokens": 6, "temperature": 0.0}).json()
        assert answer["choices"][0]["text"] and answer["choices"][0]["text"] in of_run.stdout
    finally:
        proc.terminate()
        proc.wait(30)
