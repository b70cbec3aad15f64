"""`codegen2 eval ...`: sample and score HumanEval / HumanEval infilling, write tasks, score sample files.

Every command that executes code prints a summary and, as its last line, pass@k as a JSON object.
Heavy imports (torch, the model) happen inside the handlers so that `codegen2 --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from ..infill import add_infill_format_arg
from ..options import add_decoder_flag, add_device_flag, add_dtype_flag
from .tasks import INFILL_BENCHMARKS


def register(subparsers) -> argparse._SubParsersAction:
    """Add the `eval` command; returns its sub-parsers so that other modules can add commands."""
    parser = subparsers.add_parser("eval", help="evaluate: HumanEval pass@k, HumanEval infilling, held-out metrics")
    eval_sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{humaneval,infill-single,"
                                     "infill-multi,tasks,score,...}")

    p = eval_sub.add_parser("humaneval", help="sample HumanEval completions, execute them, report pass@k")
    _generation_args(p, n=1, max_new_tokens=256)
    _execution_args(p)
    p.set_defaults(func=cmd_humaneval, benchmark="humaneval")

    for name, kind in INFILL_BENCHMARKS.items():
        p = eval_sub.add_parser(name, help=f"HumanEval {kind} infilling (the model's infill format), pass@k")
        _generation_args(p, n=1, max_new_tokens=128)
        add_infill_format_arg(p)
        _execution_args(p)
        p.set_defaults(func=cmd_humaneval, benchmark=name)

    p = eval_sub.add_parser("tasks", help="write a benchmark's tasks (or its canonical solutions as samples) as JSONL")
    p.add_argument("benchmark", choices=["humaneval", *INFILL_BENCHMARKS])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--canonical-samples", action="store_true",
                   help="write {task_id, completion} rows holding the canonical solutions, for `eval score`")
    p.set_defaults(func=cmd_tasks)

    p = eval_sub.add_parser("score", help="execute an existing sample file and report pass@k")
    p.add_argument("--samples", required=True, help="JSONL (or .jsonl.gz) with task_id and completion per line")
    p.add_argument("--benchmark", default="auto", choices=["auto", "humaneval", *INFILL_BENCHMARKS],
                   help="default: recognised from the task ids")
    _execution_args(p)
    p.set_defaults(func=cmd_score)
    return eval_sub


def _generation_args(p: argparse.ArgumentParser, n: int, max_new_tokens: int) -> None:
    p.add_argument("--checkpoint", required=True, help="codegen2 run directory or Hugging Face CodeGen directory")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapters merged in at load (a LoRA run or a PEFT directory)")
    p.add_argument("--out", required=True, help="output directory (samples, per-sample results, pass@k)")
    p.add_argument("--n", type=int, default=n, help="samples per task (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, dest="top_p")
    p.add_argument("--top-k", type=int, default=0, dest="top_k", help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, dest="max_new_tokens")
    p.add_argument("--batch-size", type=int, default=8, dest="batch_size")
    add_decoder_flag(p)
    add_dtype_flag(p)
    p.add_argument("--seed", type=int, default=0, help="sample j of task i uses seed + i*n + j")
    p.add_argument("--limit", type=int, help="only the first N tasks (quick runs)")
    p.add_argument("--step", type=int, help="checkpoint step of a run (default: the newest)")
    p.add_argument("--mp-num", type=int, dest="mp_num",
                   help="qkv groups of a Hugging Face checkpoint (default: detect)")
    add_device_flag(p)


def _execution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", default="1,10,100", help="pass@k values (default %(default)s; k > n is skipped)")
    p.add_argument("--workers", type=int, help="parallel sandboxes (default: number of CPUs)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default %(default)s)")
    p.add_argument("--memory-mb", type=int, default=1024, dest="memory_mb",
                   help="address-space limit per program in MiB (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", dest="no_progress")


def _ks(args) -> list[int]:
    from .passk import parse_ks

    try:
        return parse_ks(args.k)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _executor(args):
    from .executor import Executor, SandboxLimits, default_workers

    if args.timeout <= 0:
        raise UserError(f"--timeout must be positive (got {args.timeout})")
    if args.memory_mb < 64:
        raise UserError(f"--memory-mb must be at least 64 (got {args.memory_mb})")
    return Executor(args.workers or default_workers(), SandboxLimits(memory_bytes=args.memory_mb << 20))


def _describe_isolation(info: dict | None) -> str:
    if not info:
        return "sandbox: not started"
    parts = [f"namespaces: {', '.join(info['namespaces']) or 'none'}",
             "filesystem read-only outside scratch" if info["filesystem_readonly"] else "filesystem NOT read-only",
             f"programs run as uid {info['run_uid']}" if info["run_uid"] is not None else "programs run as you"]
    if not info["network_isolated"]:
        parts.append("network NOT cut")
    return "sandbox: " + "; ".join(parts) + "".join(f"; note: {n}" for n in info.get("notes", []))


def _finish(report, out_json: Path | None, extra: dict | None = None) -> None:
    print(_describe_isolation(report.isolation), file=sys.stderr)
    summary = {**report.summary(), **(extra or {})}
    if out_json is not None:
        out_json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{report.benchmark}: {len(report.rows)} samples over {report.n_problems} tasks; "
          f"outcomes {json.dumps(report.outcomes, sort_keys=True)}")
    print(json.dumps(report.pass_at_k))


def cmd_humaneval(args) -> int:
    """Sample (left-to-right or infill), write samples, execute, write results and pass@k."""
    from ..loading import load_checkpoint
    from ..options import resolve_device
    from .benchmark import sample_benchmark, score_benchmark
    from .tasks import load_tasks

    ks = _ks(args)
    params = _checked_params(args)
    tasks_by_id = load_tasks(args.benchmark)
    tasks = list(tasks_by_id.values())[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(args.checkpoint, device=resolve_device(args.device), dtype=args.dtype,
                             mp_num=args.mp_num, step=args.step, adapter=args.adapter)
    samples = sample_benchmark(loaded, tasks, args.benchmark, params, args.n, out, batch_size=args.batch_size,
                               decoder=args.decoder, progress=not args.no_progress,
                               infill_format=getattr(args, "infill_format", None))
    with _executor(args) as executor:
        report = score_benchmark(samples, tasks_by_id, executor, args.benchmark, args.timeout, ks,
                                 progress=not args.no_progress)
    settings = {"checkpoint": str(args.checkpoint), "n": args.n, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "stop": list(samples.params.stop), "limit": args.limit, "sampling_seconds": round(samples.seconds, 2),
                "decoder": args.decoder, "dtype": args.dtype}
    _finish(report, out / "pass_at_k.json", {"settings": settings, "context": samples.context})
    return 0


def _checked_params(args):
    """The sampling parameters of the flags, each checked (by the rules `codegen2 sample` applies too)."""
    from ..generation.sampling import SamplingParams
    from ..request_checks import check_sampling

    for name, value, low in (("--n", args.n, 1), ("--batch-size", args.batch_size, 1),
                             ("--limit", 1 if args.limit is None else args.limit, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low} (got {value})")
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed)
    if args.temperature == 0 and args.n > 1:
        print("note: --temperature 0 is greedy, so all n samples of a task are identical", file=sys.stderr)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def cmd_tasks(args) -> int:
    from .tasks import load_tasks, write_jsonl

    keys = ("task_id", "prompt", "suffix", "canonical_solution", "test", "entry_point")
    tasks = load_tasks(args.benchmark).values()
    if args.canonical_samples:
        rows = [{"task_id": t["task_id"], "completion": t["canonical_solution"]} for t in tasks]
    else:
        rows = [{k: t[k] for k in keys if k in t} for t in tasks]
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} {args.benchmark} {'samples' if args.canonical_samples else 'tasks'} to {args.out}")
    return 0


def cmd_score(args) -> int:
    from .scoring import read_samples, results_path, score_samples
    from .tasks import write_jsonl

    ks = _ks(args)
    benchmark, tasks, samples = read_samples(args.samples, args.benchmark)
    with _executor(args) as executor:
        report = score_samples(samples, tasks, executor, timeout=args.timeout, ks=ks, benchmark=benchmark,
                               progress=not args.no_progress)
    write_jsonl(results_path(args.samples), report.rows)
    print(f"per-sample results: {results_path(args.samples)}", file=sys.stderr)
    _finish(report, None)
    return 0
