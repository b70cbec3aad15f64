"""Held-out metrics that move for small models: left-to-right loss, single-line infill exact match and
infill loss.

All read only the documents the data split holds out (never trained on): for a run, the held-out documents
its prepared data kept (`heldout.jsonl` of RUN/prepared or data.prepared: filtered, deduplicated against the
training split, decontaminated); with --data (any checkpoint, a run or a LoRA run too) those of that prepared
directory or run, tokenized by the checkpoint's own tokenizer; for a checkpoint without a run and without --data,
the held-out split of the embedded corpus read from its files. Loss is next-token cross-entropy over the
held-out documents, packed into windows of the run's training length (with --data or without a run, one window
for every model, min(1024, n_ctx - 1), so that a base and its fine-tuned run compare). Infill exact match
masks non-blank lines spread over the held-out code files (chosen by a hash, so the set never changes),
gives the model the surrounding code in an infill format, and counts a hit when the first line of the
generated middle equals the masked line (leading/trailing whitespace ignored). Infill loss is the
cross-entropy of the masked line and its end-of-middle token given that prompt: it moves long before
exact matches appear, so it separates small models that all score 0% exact match.

Prompts come from the registry of infill formats (`codegen2.infill`): a run is scored in the format its
objective trained (codegen2's sentinels for span corruption, `fim` for CodeGen2's sentinel FIM, the model's own
format when its tokenizer has no sentinels); another checkpoint in its detected format, or `--infill-format`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.heldout import chunk_tokens, rows_loss, run_heldout_documents
from ..errors import UserError
from ..generation.sampling import SamplingParams, generate_ids
from ..infill import (
    Specials,
    add_infill_format_arg,
    detect_format,
    end_id,
    infill_prompt,
    infill_stop_ids,
    resolve_format,
)
from ..options import add_device_flag, add_dtype_flag


@dataclass
class InfillTask:
    path: str
    prefix: str
    line: str
    suffix: str




def default_infill_format(objective, loaded=None) -> str | None:
    """The prompt format a model trained with `objective` (an ObjectiveConfig) has seen: FIM only if FIM
    outweighs span corruption in its mixture; a tokenizer without CodeGen2's sentinels trains FIM in the
    model's own format, so that one (None: detected)."""
    if loaded is not None and not loaded.tokenizer.has_sentinels:
        return None
    return "fim" if objective.fim_rate > objective.span_rate else "codegen2"


def evaluation_data_config(data):
    """The data config whose held-out split is read from raw files (a checkpoint without a run): the given one,
    except that the embedded corpus always contributes both code and prose, as in a run's prepared data
    (which keeps a weight-0 embedded source for its held-out documents)."""
    import dataclasses

    if data.sources:
        return data
    return dataclasses.replace(data, embedded_code_weight=1.0, embedded_nl_weight=1.0)


def raw_heldout_documents(data_config) -> list:
    """The held-out split of `data_config`'s sources read from their files (see evaluation_data_config)."""
    from ..data import heldout_documents

    return heldout_documents(evaluation_data_config(data_config))


@torch.inference_mode()
def heldout_loss(model, tokenizer, texts: list[str], window: int, max_tokens: int = 100_000,
                 batch_size: int = 8) -> dict:
    """Mean next-token loss and perplexity over up to `max_tokens` held-out tokens."""
    rows = chunk_tokens(tokenizer.encode_batch(texts), tokenizer.eot_id, window, max_tokens)
    total, count = rows_loss(model, rows, batch_size)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


@torch.inference_mode()
def completion_loss(model, tokenizer, texts: list[str], window: int, max_tokens: int = 100_000,
                    batch_size: int = 8, bidirectional: bool = False) -> dict:
    """Loss on the second half of each held-out window given its first half, the way a prompt is completed.

    With `bidirectional` (a prefix-LM) the first half is read as the model's bidirectional prefix, as it was
    trained and as it samples; a causal decoder reads it left to right. Scored positions are those after the
    prefix (the prefix positions themselves are never scored in prefix-LM training), the same for both, so
    the two kinds of model are compared where each does what it was built for.
    """
    rows = chunk_tokens(tokenizer.encode_batch(texts), tokenizer.eot_id, window, max_tokens)
    split = window // 2
    total, count = rows_loss(model, rows, batch_size, split, bidirectional)
    mean = total / max(count, 1)
    return {"loss": mean, "tokens": count, "prefix_tokens": split, "bidirectional": bidirectional}


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def single_line_tasks(docs, n_tasks: int, min_line_chars: int = 4) -> list[InfillTask]:
    """Up to `n_tasks` tasks spread evenly over the held-out code files (sorted by path).

    In each file the masked lines are those ranked first by a hash of (path, line number), so the task set
    never changes between runs or checkpoints.
    """
    docs = sorted(docs, key=lambda d: d.path)
    per_file = max(1, -(-n_tasks // max(len(docs), 1)))
    tasks = []
    for doc in docs:
        lines = doc.text.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines) if len(line.strip()) >= min_line_chars]
        chosen = sorted(sorted(candidates, key=lambda i: _stable_hash(f"{doc.path}:{i}"))[:per_file])
        for i in chosen:
            tasks.append(InfillTask(path=doc.path, prefix="".join(lines[:i]), line=lines[i].rstrip("\n"),
                                    suffix="\n" + "".join(lines[i + 1:]) if lines[i].endswith("\n") else ""))
    return tasks[:n_tasks]


def _task_prompts(tokenizer, tasks: list[InfillTask], context_tokens: int, fmt: str) -> list[list[int]]:
    prefix_budget = int(context_tokens * 0.6)
    suffix_budget = context_tokens - prefix_budget
    specials = Specials.of(tokenizer)
    form = resolve_format(fmt, "", specials)
    encode_suffix = tokenizer.encode if form.suffix_space else tokenizer.encode_suffix
    prompts = []
    for task in tasks:
        prefix_ids = tokenizer.encode(task.prefix)[-prefix_budget:] if task.prefix else []
        suffix_ids = encode_suffix(task.suffix)[:suffix_budget] if task.suffix else []
        prompts.append(infill_prompt(specials, prefix_ids, suffix_ids, form))
    return prompts


@torch.inference_mode()
def infill_exact_match(model, tokenizer, tasks: list[InfillTask], context_tokens: int, max_new_tokens: int = 48,
                       batch_size: int = 8, bidirectional_prompt: bool = False, fmt: str = "codegen2") -> dict:
    """Greedy infill of each masked line in format `fmt`; exact match of the first generated line."""
    prompts = _task_prompts(tokenizer, tasks, context_tokens, fmt)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=("\n",))
    stop_ids = infill_stop_ids(Specials.of(tokenizer), fmt)
    hits, examples = 0, []
    for start in range(0, len(prompts), batch_size):
        done = generate_ids(model, tokenizer, prompts[start: start + batch_size], params,
                            stop_ids=stop_ids, bidirectional_prompt=bidirectional_prompt)
        for task, completion in zip(tasks[start: start + batch_size], done):
            predicted = completion.text.split("\n", 1)[0]
            hit = predicted.strip() == task.line.strip()
            hits += hit
            if len(examples) < 3:
                examples.append({"path": task.path, "expected": task.line.strip(), "predicted": predicted.strip()})
    return {"exact_match": hits / max(len(tasks), 1), "tasks": len(tasks), "format": fmt, "examples": examples}


@torch.inference_mode()
def infill_loss(model, tokenizer, tasks: list[InfillTask], context_tokens: int, batch_size: int = 8,
                bidirectional_prompt: bool = False, fmt: str = "codegen2") -> dict:
    """Mean cross-entropy per token of each masked line followed by its format's end token (<eom> for CodeGen2's
    formats), given its infill prompt.

    Rows are right-padded, so padding never precedes a scored token; with `bidirectional_prompt` (a
    prefix-LM) each row's prompt is read bidirectionally, as at sampling time.
    """
    device = next(model.parameters()).device
    prompts = _task_prompts(tokenizer, tasks, context_tokens, fmt)
    end = end_id(Specials.of(tokenizer), fmt)
    targets = [tokenizer.encode(task.line) + [end] for task in tasks]
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = [p + t for p, t in zip(prompts[start: start + batch_size], targets[start: start + batch_size])]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), tokenizer.eot_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        chunk = slice(start, start + batch_size)
        for i, (prompt, target) in enumerate(zip(prompts[chunk], targets[chunk])):
            input_ids[i, : len(prompt) + len(target)] = torch.tensor(prompt + target)
            labels[i, len(prompt) - 1: len(prompt) + len(target) - 1] = torch.tensor(target)
        prefix_len = None
        if bidirectional_prompt:
            prefix_len = torch.tensor([len(p) for p in prompts[start: start + batch_size]], device=device)
        logits = model(input_ids.to(device), prefix_len=prefix_len)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), ignore_index=-100,
                               reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return {"loss": total / max(count, 1), "tokens": count, "tasks": len(tasks), "format": fmt}


def evaluate_heldout(loaded, documents: list, window: int, max_tokens: int = 100_000, n_infill: int = 100,
                     batch_size: int = 8, infill_format: str | None = "codegen2") -> dict:
    """Code loss, prose loss, and single-line infill exact match and loss, on the held-out `documents`
    (infill in `infill_format`; None: the model's detected format, no infill metrics if it has none)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if infill_format is None:
        infill_format = detect_format(loaded.config.arch, Specials.of(tokenizer))
    window = min(window, loaded.config.n_ctx - 1)
    code = [d for d in documents if d.kind == "code"]
    prose = [d for d in documents if d.kind == "nl"]
    result: dict = {"heldout_docs": {"code": len(code), "nl": len(prose)}}
    if code:
        result["code"] = heldout_loss(model, tokenizer, [d.text for d in code], window, max_tokens, batch_size)
        result["code_completion"] = completion_loss(model, tokenizer, [d.text for d in code], window, max_tokens,
                                                    batch_size, bidirectional=loaded.prefix_lm)
    if prose:
        result["nl"] = heldout_loss(model, tokenizer, [d.text for d in prose], window, max_tokens, batch_size)
    if code and n_infill > 0 and infill_format is not None:
        context = min(window, loaded.config.n_ctx - 64) - 4
        tasks = single_line_tasks(code, n_infill)
        result["infill"] = infill_exact_match(model, tokenizer, tasks, context, batch_size=batch_size,
                                              bidirectional_prompt=loaded.prefix_lm, fmt=infill_format)
        result["infill_loss"] = infill_loss(model, tokenizer, tasks, context, batch_size=batch_size,
                                            bidirectional_prompt=loaded.prefix_lm, fmt=infill_format)
    return result


def run_heldout(args: argparse.Namespace) -> int:
    """`codegen2 eval heldout`: the table on stderr, every number as JSON in a file (and on stdout with --json)."""
    from ..loading import load_checkpoint
    from ..options import resolve_device

    loaded = load_checkpoint(args.checkpoint, device=resolve_device(args.device), mp_num=getattr(args, "mp_num", None),
                             dtype=getattr(args, "dtype", None), step=args.step, adapter=args.adapter)
    documents, where, window, infill_format = _heldout_inputs(args, loaded)
    result = evaluate_heldout(loaded, documents, window, args.max_tokens, args.n_infill, args.batch_size,
                              infill_format)
    if "code" not in result and "nl" not in result:
        raise UserError(_no_heldout_reason(where))
    if args.baseline:
        result["untrained"] = evaluate_heldout(_untrained(loaded), documents, window, args.max_tokens, args.n_infill,
                                               args.batch_size, infill_format)
    print(summarize(result), file=sys.stderr)
    out = _json_path(args)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"every number, as JSON: {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=None), file=sys.stdout)
    return 0


def _heldout_inputs(args: argparse.Namespace, loaded) -> tuple[list, object, int, str | None]:
    """(documents, where they come from, window, infill format): a run is scored on its own prepared held-out
    documents at its training length; with --data (any checkpoint, a run too) on that data's held-out documents
    at one window for every model (min(1024, n_ctx - 1)), so that a base and its fine-tuned run compare directly;
    else the embedded corpus's. Text is tokenized with the checkpoint's own tokenizer."""
    from pathlib import Path

    from ..config import DataConfig, load_config
    from ..data.pipeline import run_prepared_dir
    from ..loading import is_run_directory

    run = Path(args.checkpoint)
    infill_format = args.infill_format
    if is_run_directory(run):
        config = load_config(run / "config.toml")
        infill_format = infill_format or default_infill_format(config.objective, loaded)
        if not args.data:
            return run_heldout_documents(config, run), run_prepared_dir(config, run), config.train.seq_len, \
                infill_format
    window = min(1024, loaded.config.n_ctx - 1)
    if args.data:
        return (*data_heldout(Path(args.data)), window, infill_format)
    return raw_heldout_documents(DataConfig()), None, window, infill_format


def data_heldout(path) -> tuple[list, object]:
    """(held-out documents, prepared directory) of --data: a prepared directory, or a run (its prepared data)."""
    from ..config import load_config
    from ..data.pipeline import run_prepared_dir
    from ..data.prepare import PreparedData
    from ..loading import is_run_directory

    if is_run_directory(path):
        config = load_config(path / "config.toml")
        return run_heldout_documents(config, path), run_prepared_dir(config, path)
    return PreparedData.open(path).heldout_documents(), path


def _untrained(loaded):
    """The same shapes freshly initialised: the number training has to beat. Seeded (without touching the
    caller's random state) so that the table is the same on every run."""
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = build_model(loaded.config).eval()
    untrained.to(next(loaded.model.parameters()).device)
    return type(loaded)(model=untrained, tokenizer=loaded.tokenizer, config=loaded.config, prefix_lm=loaded.prefix_lm)


def _json_path(args: argparse.Namespace):
    """Where the JSON goes: --out, else RUN/eval/heldout.json for a run scored on its own held-out documents (none
    for other checkpoints or with --data)."""
    from pathlib import Path

    from ..loading import is_run_directory

    if args.out:
        return Path(args.out)
    if args.data:  # another data set's numbers never replace the run's own
        return None
    return Path(args.checkpoint) / "eval" / "heldout.json" if is_run_directory(Path(args.checkpoint)) else None


def _no_heldout_reason(prepared) -> str:
    """Why a held-out evaluation has nothing to score, and what to do about it."""
    if prepared is None:
        return "no held-out documents in the embedded corpus's held-out split"
    from ..data.prepare import PreparedData

    settings = PreparedData.open(prepared).manifest.get("settings", {})
    fraction = settings.get("data", {}).get("heldout_fraction")
    if fraction == 0:
        return (f"no held-out documents: {prepared} was prepared with data.heldout_fraction = 0, so every file was "
                "trained on; train a run with --set data.heldout_fraction=0.02 to score held-out loss")
    return (f"no held-out documents in {prepared}: none of its files fell in the held-out split (data.heldout_fraction"
            f" = {fraction}, chosen by a hash of each path) or all were removed (see its removed.jsonl); use more "
            "files or a larger fraction")


# (label, how to read it from an evaluate_heldout result, format) for the before/after table
_SUMMARY_ROWS = (
    ("held-out code loss", lambda r: r["code"]["loss"], "{:.3f}"),
    ("held-out prose loss", lambda r: r["nl"]["loss"], "{:.3f}"),
    ("code completion loss (2nd half | 1st)", lambda r: r["code_completion"]["loss"], "{:.3f}"),
    ("single-line infill loss", lambda r: r["infill_loss"]["loss"], "{:.3f}"),
    ("single-line infill exact match", lambda r: 100 * r["infill"]["exact_match"], "{:.1f}%"),
)


def summarize(result: dict) -> str:
    """A short table, the untrained model (with --baseline) beside the trained one; the JSON file carries
    everything."""
    docs = result.get("heldout_docs", {})
    lines = [f"held-out split: {docs.get('code', 0)} code and {docs.get('nl', 0)} prose documents "
             f"(never trained on)"] if docs else []
    columns = [("untrained", result["untrained"])] if "untrained" in result else []
    columns.append(("trained", result))
    lines.append(f"{'':40}" + "".join(f"{name:>11}" for name, _ in columns))
    for label, read, fmt in _SUMMARY_ROWS:
        cells = []
        for _, values in columns:
            try:
                cells.append(fmt.format(read(values)))
            except KeyError:
                cells.append("-")
        if any(cell != "-" for cell in cells):
            lines.append(f"{label:40}" + "".join(f"{cell:>11}" for cell in cells))
    if "infill" in result:
        infill = result["infill"]
        hits = round(infill["exact_match"] * infill["tasks"])
        lines.append(f"(exact match: {hits} of {infill['tasks']} masked lines of held-out code, "
                     f"{infill.get('format', 'codegen2')} infill format)")
    return "\n".join(lines)


def register(eval_subparsers) -> None:
    parser = eval_subparsers.add_parser("heldout", help="held-out loss and single-line infill exact match")
    parser.add_argument("--checkpoint", required=True, help="run directory or Hugging Face directory")
    parser.add_argument("--max-tokens", type=int, default=100_000, help="held-out tokens scored for the loss")
    parser.add_argument("--n-infill", type=int, default=100,
                        help="single-line infill tasks, spread over the held-out files")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mp-num", type=int, default=None)
    add_dtype_flag(parser)
    add_device_flag(parser)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: the newest)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="LoRA adapters merged in at load (a LoRA run or a PEFT directory)")
    parser.add_argument("--baseline", action="store_true", help="also score an untrained model of the same shape")
    parser.add_argument("--data", default="", metavar="DATA_DIR",
                        help="score on the held-out documents of this prepared directory (or run directory: its "
                             "prepared data), at one window for every checkpoint, so that a base and its fine-tuned "
                             "run compare (default: a run's own held-out documents, else the embedded corpus's)")
    add_infill_format_arg(parser)
    parser.add_argument("--out", default="", metavar="FILE.json",
                        help="write every number as JSON here (default: RUN/eval/heldout.json for a run directory "
                             "without --data)")
    parser.add_argument("--json", action="store_true", help="also print that JSON on stdout, for scripts")
    parser.set_defaults(func=run_heldout)
