"""One benchmark run of a loaded model: sample every task (left to right or infill), then execute the samples.

The library behind `codegen2 eval humaneval|infill-single|infill-multi`: the command checks its flags, loads
the model and the tasks, and calls `sample_benchmark`, then `score_benchmark` with a started sandbox.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..generation.sampling import SamplingParams
from ..infill import Specials, resolve_format
from ..options import LIBRARY_DECODER
from . import generation
from .scoring import ScoreReport, results_path, score_samples
from .tasks import INFILL_BENCHMARKS, write_jsonl


@dataclass
class BenchmarkSamples:
    """The samples of a run, the file they were written to, and how they were drawn (for pass_at_k.json)."""

    rows: list[dict]
    samples_file: Path
    context: dict  # prompts fitted to the context: how many lost their start or were skipped
    params: SamplingParams  # as used, stop strings included
    seconds: float


def sample_benchmark(loaded, tasks: list[dict], benchmark: str, params: SamplingParams, n: int, out: Path, *,
                     batch_size: int = 8, decoder: str = LIBRARY_DECODER, progress: bool = True,
                     infill_format: str | None = None) -> BenchmarkSamples:
    """Draw `n` samples of every task with `params` (the benchmark sets the stop strings) and write them to
    OUT/samples.jsonl; sample j of task i is seeded with params.seed + i * n + j. Infilling benchmarks use
    `infill_format` (None: the model's detected format)."""
    from ..generation.decoder import compile_report

    infilling = None
    if benchmark in INFILL_BENCHMARKS:
        infilling = resolve_format(infill_format, loaded.config.arch, Specials.of(loaded.tokenizer))
    params = dataclasses.replace(params, stop=() if infilling else generation.HUMANEVAL_STOP)
    n_ctx = loaded.config.n_ctx
    if params.max_new_tokens >= n_ctx:
        raise UserError(f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in the model context "
                        f"of {n_ctx} tokens; use at most {n_ctx - 1} (fewer leaves more of each prompt)")
    context = generation.context_report(loaded.tokenizer, tasks, infilling, params.max_new_tokens, n_ctx)
    if context["truncated"] or context["skipped"]:
        print(f"note: with --max-new-tokens {params.max_new_tokens} in a context of {n_ctx} tokens, "
              f"{context['truncated']} of {len(tasks)} prompts lose their start and {context['skipped']} are skipped "
              f"(empty completion, scored as failed); see \"context\" in pass_at_k.json", file=sys.stderr)
    if infilling:
        complete = generation.infill_middle(loaded, params, infilling, decoder=decoder)
    else:
        complete = generation.left_to_right(loaded, params, decoder=decoder)
    started = time.perf_counter()
    rows = generation.sample_tasks(tasks, n, complete, batch_size=batch_size,
                                   seed=params.seed, progress=progress)
    seconds = time.perf_counter() - started
    if compile_report():
        print(compile_report(), file=sys.stderr)
    samples_file = out / "samples.jsonl"
    write_jsonl(samples_file, rows)
    return BenchmarkSamples(rows=rows, samples_file=samples_file, context=context, params=params, seconds=seconds)


def score_benchmark(samples: BenchmarkSamples, tasks_by_id: dict[str, dict], executor, benchmark: str,
                    timeout: float, ks: list[int], progress: bool = True) -> ScoreReport:
    """Execute the samples in `executor` and write their per-sample results beside samples.jsonl."""
    report = score_samples(samples.rows, tasks_by_id, executor, timeout=timeout, ks=ks, benchmark=benchmark,
                           progress=progress)
    write_jsonl(results_path(samples.samples_file), report.rows)
    return report
