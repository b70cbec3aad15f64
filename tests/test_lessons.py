"""The lessons study (experiments/lessons): arms differ from the reference in exactly the intended keys at equal
budgets; the report's verdicts follow its stated rules; the one command trains, evaluates, resumes and reports."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

from codegen2.config import load_config
from codegen2.models import architecture

LESSONS = Path(__file__).resolve().parents[1] / "experiments" / "lessons"


def load(name: str):
    if name not in sys.modules:
        sys.path.insert(0, str(LESSONS))
        spec = importlib.util.spec_from_file_location(name, LESSONS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def flat(config) -> dict:
    out = {}
    for section in ("model", "objective", "data", "tokenizer", "train"):
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            out[f"{section}.{key}"] = value
    return out


EXPECTED_DIFFERENCES = {  # arm -> the keys in which it differs from the reference arm
    "causal_decoder": set(),
    "prefix_lm": {"objective.prefix_lm"},
    "causal_only": {"objective.span_rate"},
    "span_only": {"objective.span_rate"},
    "fim": {"objective.span_rate", "objective.fim_rate"},
    "code_only": {"data.embedded_code_weight", "data.embedded_nl_weight"},
    "prose_only": {"data.embedded_code_weight", "data.embedded_nl_weight"},
    "llama": {"model.arch", "model.n_kv_head", "model.n_inner", "model.rotary_dim", "model.layer_norm_eps"},
}


def test_arms_differ_from_the_reference_in_one_thing_only_at_equal_budgets(tmp_path):
    study = load("study")
    arms = {arm.name: arm for arm in study.load_arms()}
    assert set(arms) == set(EXPECTED_DIFFERENCES)
    shared = study.shared_overrides(tmp_path, None, [])
    configs = {name: load_config(LESSONS / "common.toml", overrides=arm.overrides + shared)
               for name, arm in arms.items()}
    reference = flat(configs["causal_decoder"])
    for name, config in configs.items():
        values = flat(config)
        assert {k for k in values if values[k] != reference[k]} == EXPECTED_DIFFERENCES[name], name
    assert configs["fim"].objective.fim_spm_rate == 0.5 and configs["span_only"].objective.span_rate == 1.0
    assert configs["prose_only"].data.embedded_code_weight == 0 and configs["code_only"].data.embedded_nl_weight == 0
    # The LLaMA arm is the llama-tiny preset's model, with as many weights as the reference's tiny model.
    llama_tiny = load_config(preset="llama-tiny").model
    assert configs["llama"].model == llama_tiny
    counts = {name: architecture(configs[name].model).count_parameters(configs[name].model)
              for name in ("llama", "causal_decoder")}
    assert abs(counts["llama"] / counts["causal_decoder"] - 1) < 0.01, counts


def fake_run(root: Path, arm: str, seed: int, code: float, nl: float, infill: float, em: float, fmt="codegen2"):
    run = root / f"{arm}-seed{seed}"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({
        "code": {"loss": code, "tokens": 1000}, "nl": {"loss": nl, "tokens": 500},
        "code_completion": {"loss": code - 0.25},
        "infill": {"exact_match": em, "tasks": 10, "format": fmt}, "infill_loss": {"loss": infill}}))
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 8.0, "tokens": 100},
        {"step": 2, "tokens": 200, "eval_code_loss": code + 1, "eval_nl_loss": nl + 1},
        {"step": 4, "tokens": 400, "eval_code_loss": code + 0.5, "eval_nl_loss": nl + 0.5},
        {"step": 6, "tokens": 600, "eval_code_loss": code, "eval_nl_loss": nl}]) + "\n")
    (run / "config.toml").write_text('[model]\nn_layer = 4\nn_embd = 256\nn_head = 4\nvocab_size = 4096\n'
                                     '[train]\nmax_steps = 6\nmicro_batch_size = 8\nseq_len = 256\nlr = 0.002\n'
                                     'warmup_steps = 1\n')


def write_study(root: Path, table: dict) -> None:
    for arm, per_seed in table.items():
        for seed, values in enumerate(per_seed, 1):
            fake_run(root, arm, seed, *values, fmt="fim" if arm == "fim" else "codegen2")


ARMS = [(name, name.replace("_", " ")) for name in EXPECTED_DIFFERENCES]


def test_report_table_plots_and_verdicts_that_reproduce(tmp_path):
    report = load("report")
    write_study(tmp_path / "runs", {  # (code loss, prose loss, infill loss, exact match) per seed
        "causal_decoder": [(3.00, 4.00, 2.00, 0.10), (3.02, 4.02, 2.02, 0.12)],
        "prefix_lm": [(3.01, 4.01, 2.01, 0.10), (3.03, 4.03, 2.03, 0.11)],  # no clear gain
        "causal_only": [(2.90, 3.90, 5.00, 0.00), (2.91, 3.91, 5.02, 0.00)],  # better L2R, cannot infill
        "span_only": [(3.30, 4.30, 1.80, 0.15), (3.31, 4.31, 1.82, 0.14)],
        "fim": [(3.01, 4.01, 2.30, 0.08), (3.02, 4.02, 2.31, 0.09)],
        "code_only": [(2.98, 5.00, 2.00, 0.10), (2.99, 5.01, 2.01, 0.11)],
        "prose_only": [(5.00, 3.50, 4.00, 0.00), (5.01, 3.51, 4.01, 0.00)],
        "llama": [(2.99, 4.00, 2.01, 0.11), (3.02, 4.03, 2.02, 0.12)],  # within seed noise of causal_decoder
    })
    doc = tmp_path / "docs" / "lessons.md"
    text = report.write_report(tmp_path / "runs", ARMS, [1, 2], doc, tmp_path / "docs" / "lessons", "CMD")
    assert doc.read_text() == text and "CMD" in text
    assert text.count("\n| `") == 8
    assert ("| `causal_decoder` | causal decoder | 2 | 3.010 (3.000–3.020) | 2.760 (2.750–2.770) "
            "| 4.010 (4.000–4.020) |") in text
    assert "**Lesson 1 reproduces" in text and "**Lesson 2 reproduces" in text
    assert "**Lesson 3 reproduces" in text and "**Lesson 4 reproduces" in text
    assert "**The architecture check holds" in text
    assert "[fim]" in text and "6 steps = 12,288 training tokens per run" in text
    for name in ("lesson1_architecture.png", "lesson2_3_objectives.png", "lesson4_data.png", "architecture.png"):
        png = tmp_path / "docs" / "lessons" / name
        assert png.read_bytes()[:4] == b"\x89PNG" and f"](lessons/{name})" in text


def test_report_says_when_a_lesson_does_not_reproduce(tmp_path):
    report = load("report")
    write_study(tmp_path / "runs", {
        "causal_decoder": [(3.00, 4.00, 2.00, 0.10), (3.01, 4.01, 2.01, 0.10)],
        "prefix_lm": [(2.80, 3.80, 1.90, 0.12), (2.81, 3.81, 1.91, 0.12)],  # clearly better: lesson 1 fails
        "causal_only": [(3.005, 4.0, 2.50, 0.00), (3.006, 4.0, 2.50, 0.00)],  # 50/50 costs nothing: lesson 2 fails
        "span_only": [(3.10, 4.1, 1.00, 0.30), (3.11, 4.1, 1.01, 0.30)],  # 50/50 keeps < half the infill gain
        "code_only": [(2.50, 5.0, 2.0, 0.1), (2.51, 5.0, 2.0, 0.1)],  # the mixture far from code-only
        "prose_only": [(3.10, 3.5, 4.0, 0.0), (3.11, 3.5, 4.0, 0.0)],
        "llama": [(3.20, 4.2, 2.2, 0.05), (3.21, 4.2, 2.2, 0.05)],  # clearly worse than causal_decoder
    })
    text = report.write_report(tmp_path / "runs", ARMS, [1, 2], tmp_path / "lessons.md", tmp_path / "plots", "CMD")
    assert "**Lesson 1 does not reproduce: the prefix-LM is clearly better on held-out code loss" in text
    assert "**Lesson 2 does not reproduce: the 50/50 mixture is no worse left to right" in text
    assert "**Lesson 3 does not reproduce" in text and "**Lesson 4 does not reproduce" in text
    assert "**The architecture check does not hold: the LLaMA block is clearly worse on held-out code loss" in text
    assert "| `fim` |" not in text  # an arm without runs is left out, not invented


def test_one_command_trains_evaluates_resumes_and_reports(tmp_path):
    study = load("study")
    args = ["--out", str(tmp_path / "runs"), "--arms", "causal_decoder,prefix_lm", "--seeds", "1,2", "--steps", "2",
            "--n-infill", "3", "--eval-tokens", "400", "--doc", str(tmp_path / "lessons.md"),
            "--plots", str(tmp_path / "plots"),
            "--set", "data.embedded_max_files=40", "--set", "data.heldout_fraction=0.2",
            "--set", "tokenizer.train_chars=60000", "--set", "tokenizer.vocab_size=600",
            "--set", "model.vocab_size=600", "--set", "train.eval_tokens=300", "--set", "train.seq_len=64",
            "--set", "model.n_layer=1"]
    assert study.main(args) == 0
    for arm in ("causal_decoder", "prefix_lm"):
        for seed in (1, 2):
            run = tmp_path / "runs" / f"{arm}-seed{seed}"
            result = json.loads((run / "eval.json").read_text())
            assert {"code", "code_completion", "nl", "infill", "infill_loss"} <= set(result)
            assert result["code_completion"]["bidirectional"] == (arm == "prefix_lm")
            assert any("eval_code_loss" in json.loads(line) for line in (run / "log.jsonl").read_text().splitlines())
    config = (tmp_path / "runs" / "prefix_lm-seed2" / "config.toml").read_text()
    assert "prefix_lm = true" in config and "seed = 2" in config and "max_steps = 2" in config
    text = (tmp_path / "lessons.md").read_text()
    assert "**Lesson 1" in text and text.count("\n| `") == 2
    # Everything finished: a second call only rebuilds the report, and says the runs are done.
    before = (tmp_path / "runs" / "study.json").read_text()
    assert study.main(args) == 0
    assert (tmp_path / "runs" / "study.json").read_text() == before
    # --reevaluate scores finished runs again (after the metrics changed) without training them again.
    log = (tmp_path / "runs" / "prefix_lm-seed1" / "train.log").read_text()
    assert study.main(args + ["--arms", "prefix_lm", "--seeds", "1", "--reevaluate"]) == 0
    assert (tmp_path / "runs" / "prefix_lm-seed1" / "train.log").read_text() == log
