"""One decode step: codegen2's fused step against transformers' forward of one token with its cache.

Both on the same weights (the transformers twin holds codegen2's tensors) after the same 64-token prompts; steps
alternate between the engines and the median thread time and wall time of 10 steps each are printed, with
whether every greedy token agreed. The fused step runs eager: the matmul kernels the compiled step calls, without
its fusion of the small operations, so the ratio is the compiled decoder's floor. A quicker check than
`bench_generate.py` where a full generation takes minutes (a loaded machine, a 3B model), and one that
leaves out prefill and `generate`'s own loop.

    python benchmarks/bench_decode_step.py --shape qwen25-coder-0.5b --batches 1,8
    python benchmarks/bench_decode_step.py --shape starcoder2-3b --batches 1,8      # ~14 GB

`--split` instead times where a compiled step's time goes, for any `--dtype`: the whole compiled step against its
int8 matmuls alone (the same weights and shapes, called one after another through the op the step calls), the
rest being attention over the cache, norms, rotary and the per-call costs; thread time, interleaved, median of 40.

    python benchmarks/bench_decode_step.py --shape 93m --batches 1,8 --dtype int8-dynamic --split
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from codegen2.generation.core import prefill
from codegen2.generation.decoder import FastDecoder
from codegen2.int8 import DynamicInt8Weight, quantize_model
from codegen2.kernels import int8 as kernels
from common import SHAPES, build_ours, hf_twin, machine_line, model_config

PROMPT_TOKENS = 64
STEPS = 10


def time_steps(ours, theirs, batch: int) -> tuple[dict[str, float], dict[str, float], bool]:
    """Median thread and wall ms per step of each engine, and whether their greedy tokens stayed equal."""
    prompts = torch.randint(0, 1000, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
    cache, logits, pos = prefill(ours, prompts.tolist(), 0, PROMPT_TOKENS + STEPS + 4)
    decoder = FastDecoder(ours, batch, PROMPT_TOKENS + STEPS + 4)
    decoder.start(cache, pos)
    out = theirs(prompts, use_cache=True, logits_to_keep=1)
    tokens = {"codegen2": logits.argmax(-1), "transformers": out.logits[:, -1].argmax(-1)}
    past = out.past_key_values
    same = bool((tokens["codegen2"] == tokens["transformers"]).all())
    thread: dict[str, list[float]] = {"codegen2": [], "transformers": []}
    wall: dict[str, list[float]] = {"codegen2": [], "transformers": []}
    for i in range(STEPS + 2):
        for name in (["codegen2", "transformers"] if i % 2 == 0 else ["transformers", "codegen2"]):
            began, began_wall = time.thread_time(), time.perf_counter()
            if name == "codegen2":
                tokens[name] = decoder.step(tokens[name]).argmax(-1)
            else:
                out = theirs(tokens[name][:, None], past_key_values=past, use_cache=True)
                past, tokens[name] = out.past_key_values, out.logits[:, -1].argmax(-1)
            if i >= 2:  # the first two steps warm up
                thread[name].append(time.thread_time() - began)
                wall[name].append(time.perf_counter() - began_wall)
        same = same and bool((tokens["codegen2"] == tokens["transformers"]).all())
    return ({k: 1e3 * statistics.median(v) for k, v in thread.items()},
            {k: 1e3 * statistics.median(v) for k, v in wall.items()}, same)


def int8_matmuls(weights) -> list[tuple]:
    """Every int8 matmul weight in a decoder's `weights` (nested tuples and lists), in order, with its scheme."""
    if isinstance(weights, DynamicInt8Weight):
        return [(weights.q, weights.scales, weights.sums, True)]
    if isinstance(weights, tuple) and len(weights) == 3 and all(isinstance(t, torch.Tensor) for t in weights) \
            and weights[0].dtype == torch.int8 and weights[0].dim() == 2:
        return [(weights[0], weights[1], None, False)]  # weight-only (q, scales, ones)
    if isinstance(weights, (tuple, list)):
        return [found for item in weights for found in int8_matmuls(item)]
    return []


def split_step(model, batch: int) -> str:
    """One line: the compiled step's median thread time, its int8 matmuls' alone, and the rest."""
    prompts = torch.randint(0, 1000, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
    cache, logits, pos = prefill(model, prompts.tolist(), 0, PROMPT_TOKENS)
    decoder = FastDecoder(model, batch, 4 * PROMPT_TOKENS, compile=True)
    decoder.start(cache, pos)
    tokens = logits.argmax(-1)
    decoder.step(tokens)  # compiles
    calls = int8_matmuls(decoder.weights)
    op = (torch.ops.codegen2.int8_matmul_native.default if kernels.prepare_compiled_op()[0] == "native"
          else torch.ops.codegen2.int8_matmul.default)
    inputs = {q.shape[1]: torch.randn(batch, q.shape[1]) for q, *_ in calls}

    def matmuls() -> None:
        for q, scales, sums, dynamic in calls:
            op(inputs[q.shape[1]], q, scales, None, dynamic, sums)

    step, alone = [], []
    for _ in range(40):
        began = time.thread_time()
        decoder.step(tokens)
        step.append(time.thread_time() - began)
        began = time.thread_time()
        matmuls()
        alone.append(time.thread_time() - began)
    step_ms, alone_ms = 1e3 * statistics.median(step), 1e3 * statistics.median(alone)
    megabytes = sum(q.numel() for q, *_ in calls) / 1e6
    return (f"step {step_ms:.2f} ms (thread time; cache {PROMPT_TOKENS + 1}-{PROMPT_TOKENS + 41} columns), its "
            f"{len(calls)} int8 matmuls alone {alone_ms:.2f} ms ({megabytes:.0f} MB, {megabytes / alone_ms:.1f} GB/s), "
            f"the rest {step_ms - alone_ms:.2f} ms; matmul op {op.name()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen25-coder-0.5b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layers", type=int, default=0, help="cut the shape to this many layers (0: all)")
    parser.add_argument("--split", action="store_true", help="where the compiled step's time goes (no transformers)")
    parser.add_argument("--dtype", default="float32", help="with --split: float32, int8 or int8-dynamic")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    cfg = model_config(args.shape, **({"n_layer": args.layers} if args.layers else {}))
    ours = build_ours(cfg).eval()
    if args.split:
        model = quantize_model(ours, fmt=args.dtype) if args.dtype != "float32" else ours.use_decode_layout()
        for batch in [int(b) for b in args.batches.split(",")]:
            with torch.inference_mode():
                print(f"{args.shape} {args.dtype} batch {batch}: {split_step(model, batch)}", flush=True)
        return
    theirs = hf_twin(ours).eval()
    ours.use_decode_layout()
    for batch in [int(b) for b in args.batches.split(",")]:
        with torch.inference_mode():
            thread, wall, same = time_steps(ours, theirs, batch)
        print(f"{args.shape} batch {batch}: step thread time codegen2 {thread['codegen2']:.1f} ms, transformers "
              f"{thread['transformers']:.1f} ms: {thread['transformers'] / thread['codegen2']:.2f}x; wall "
              f"{wall['codegen2']:.1f} / {wall['transformers']:.1f} ms: "
              f"{wall['transformers'] / wall['codegen2']:.2f}x; same greedy tokens: {same}", flush=True)


if __name__ == "__main__":
    main()
