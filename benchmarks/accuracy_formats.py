"""Accuracy of the weight formats on a trained checkpoint: float32 against bfloat16, int8 and int8-dynamic.

On the held-out split of the run's own data (never trained on): held-out code loss per format and its change
relative to float32 (target for both int8 formats: within 1%); greedy continuations of held-out prompts
compared token by token with float32's, both free-running (one early flip changes the rest of a row) and fed
float32's tokens (per-position agreement, no cascade); single-line infill exact match per format.

    python benchmarks/accuracy_formats.py --checkpoint runs/tiny            # a run directory (has held-out data)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import common  # noqa: F401  (puts src/ on the path)
from codegen2.config import load_config
from codegen2.data import heldout_documents
from codegen2.eval.heldout import evaluation_data_config, heldout_loss, infill_exact_match, single_line_tasks
from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.loading import load_checkpoint

FORMATS = ("float32", "bfloat16", "int8", "int8-dynamic")


def held_out_prompts(tokenizer, texts: list[str], count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: consecutive windows of the held-out documents (stride 4 x length)."""
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text)
        for start in range(0, len(ids) - length - 8, 4 * length):
            prompts.append(ids[start:start + length])
            if len(prompts) == count:
                return prompts
    return prompts


@torch.inference_mode()
def forced_argmax(model, prompt: list[int], continuation: list[int]) -> list[int]:
    """The model's greedy choice at every position of `continuation`, fed the continuation itself."""
    logits = model(torch.tensor([prompt + continuation]))[0, len(prompt) - 1:-1]
    return logits.argmax(-1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="codegen2 run directory (with held-out data)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts for greedy agreement")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=40_000, help="held-out tokens scored for the loss")
    parser.add_argument("--n-infill", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(f"{args.checkpoint}/config.toml")
    window = config.train.seq_len
    code = heldout_documents(evaluation_data_config(config.data), kind="code")
    texts = [d.text for d in code]
    tasks = single_line_tasks(code, args.n_infill)
    results, reference, forced_ref = {}, None, None
    for fmt in FORMATS:
        began = time.perf_counter()
        loaded = load_checkpoint(args.checkpoint, dtype=fmt)
        model, tok = loaded.model, loaded.tokenizer
        prompts = held_out_prompts(tok, texts, args.prompts, args.prompt_tokens)
        params = SamplingParams(max_new_tokens=args.new_tokens)
        tokens = [c.token_ids for c in generate_ids(model, tok, prompts, params, stop_ids=(), decoder="fast")]
        row = {"loss": heldout_loss(model, tok, texts, window, args.max_tokens)["loss"]}
        context = min(window, loaded.config.n_ctx - 64) - 4
        row["infill_exact_match"] = infill_exact_match(model, tok, tasks, context)["exact_match"]
        if reference is None:
            reference = tokens
            forced_ref = tokens
        else:
            pairs = [(a, b) for x, y in zip(reference, tokens) for a, b in zip(x, y)]
            row["greedy_free_running"] = sum(a == b for a, b in pairs) / len(pairs)
            forced = [forced_argmax(model, p, r) for p, r in zip(prompts, forced_ref)]
            pairs = [(a, b) for x, y in zip(forced_ref, forced) for a, b in zip(x, y)]
            row["greedy_per_position"] = sum(a == b for a, b in pairs) / len(pairs)
            row["loss_change"] = row["loss"] / results["float32"]["loss"] - 1
        row["seconds"] = round(time.perf_counter() - began, 1)
        results[fmt] = row
        print(json.dumps({fmt: row}), flush=True)
    print(f"\n{args.checkpoint}: {len(prompts)} held-out prompts x {args.new_tokens} greedy tokens, "
          f"{len(tasks)} single-line infill tasks, held-out code loss over {args.max_tokens:,} tokens")
    print("| format | held-out loss | vs float32 | greedy tokens = float32 (free-running) | "
          "(fed float32's tokens) | infill exact match |")
    print("|---|---|---|---|---|---|")
    for fmt, row in results.items():
        change = f"{100 * row['loss_change']:+.2f}%" if "loss_change" in row else "-"
        free = f"{100 * row['greedy_free_running']:.1f}%" if "greedy_free_running" in row else "-"
        forced = f"{100 * row['greedy_per_position']:.1f}%" if "greedy_per_position" in row else "-"
        print(f"| {fmt} | {row['loss']:.4f} | {change} | {free} | {forced} | {100 * row['infill_exact_match']:.1f}% |")


if __name__ == "__main__":
    main()
