"""One decode step: codegen2's fused step against transformers' forward of one token with its cache.

Both on the same weights (the transformers twin holds codegen2's tensors) after the same 64-token prompts; steps
alternate between the engines and the median thread time and wall time of 10 steps each are printed, with
whether every greedy token agreed. The fused step runs eager: the matmul kernels the compiled step calls, without
its fusion of the small operations, so the ratio is the compiled decoder's floor. A quicker check than
`bench_generate.py` where a full generation takes minutes (a loaded machine, a 3B model), and one that
leaves out prefill and `generate`'s own loop.

    python benchmarks/bench_decode_step.py --shape qwen25-coder-0.5b --batches 1,8
    python benchmarks/bench_decode_step.py --shape starcoder2-3b --batches 1,8      # ~14 GB
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from codegen2.generation.core import prefill
from codegen2.generation.decoder import FastDecoder
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen25-coder-0.5b", help=f"one of {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layers", type=int, default=0, help="cut the shape to this many layers (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    cfg = model_config(args.shape, **({"n_layer": args.layers} if args.layers else {}))
    ours = build_ours(cfg).eval()
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
