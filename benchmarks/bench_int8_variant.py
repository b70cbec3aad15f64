"""Greedy generation with the int8 kernel library of this tree against another build of int8_matmul.c, in one process.

Why: two processes one after the other on a shared machine differ by more than a kernel change (runs of the same
tree measured 0.77x and 0.84x weight-only / int8-dynamic); here the compiled decoder stays the same and the C++ op
is re-pointed at either library between runs (kernels/int8.py's `codegen2_int8_op_configure`), so both variants
run the same graphs on the same weights, alternating run by run. Prints tokens/s of each variant in `--dtypes`,
int8-dynamic through this tree as the peer, and whether the variants' greedy tokens agree.

    python benchmarks/bench_int8_variant.py --baseline /work/main/src/codegen2/kernels/int8_matmul.c \
        --shape qwen25-coder-0.5b --dtypes int8
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from bench_generate import IdTokenizer, build_formats
from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.kernels import int8 as kernels
from codegen2.kernels.build import load
from common import build_ours, machine_line, model_config


def point_op(lib: ctypes.CDLL) -> None:
    """Send the C++ op's calls to `lib` under the rule's current path and tile threshold."""
    kernels._state["op_lib"].codegen2_int8_op_configure(  # type: ignore[attr-defined]
        ctypes.cast(lib.int8_matmul_dynamic, ctypes.c_void_p), ctypes.cast(lib.int8_matmul_weight_only,
                                                                           ctypes.c_void_p),
        int(kernels._state["ceiling"]), kernels.tile_rows())  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="another int8_matmul.c (main's, say)")
    parser.add_argument("--shape", default="qwen25-coder-0.5b")
    parser.add_argument("--dtypes", default="int8", help="int8 formats to compare, comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    if kernels.prepare_compiled_op()[0] != "native":
        raise SystemExit("the C++ int8 op does not run here; nothing to re-point")
    libs = {"this tree": kernels._state["lib"], "baseline": load(Path(args.baseline))}
    libs["baseline"].int8_cpu_level()  # its own CPU check (the AMX permission is the process's, already granted)
    cfg = model_config(args.shape)
    models = build_formats(build_ours(cfg).eval(), sorted({*args.dtypes.split(","), "int8-dynamic"}))
    prompts = torch.randint(0, cfg.vocab_size - 4, (args.batch, 64), generator=torch.Generator().manual_seed(0))
    params, tokenizer = SamplingParams(max_new_tokens=args.new_tokens), IdTokenizer(cfg.vocab_size)
    runs = {f"{dtype} {name}": (lib, dtype) for dtype in args.dtypes.split(",") for name, lib in libs.items()}
    runs["int8-dynamic (peer)"] = (libs["this tree"], "int8-dynamic")
    tokens, times = {}, {name: [] for name in runs}
    for i in range(args.repeats + 1):  # the first round compiles and warms
        for name in (list(runs) if i % 2 else list(runs)[::-1]):
            lib, dtype = runs[name]
            point_op(lib)
            began = time.perf_counter()
            tokens[name] = [c.token_ids for c in generate_ids(models[dtype], tokenizer, prompts.tolist(), params,
                                                              stop_ids=(), decoder="compiled")]
            if i:
                times[name].append(time.perf_counter() - began)
    point_op(libs["this tree"])
    work, peer = args.batch * args.new_tokens, statistics.median(times["int8-dynamic (peer)"])
    print(f"== {args.shape} batch {args.batch}, 64 + {args.new_tokens} tokens, median of {args.repeats}")
    for name, samples in times.items():
        print(f"{name:24s} {work / statistics.median(samples):7.1f} tokens/s ({min(samples):.2f}-{max(samples):.2f} s)"
              f"   / int8-dynamic {peer / statistics.median(samples):.2f}x")
    for dtype in args.dtypes.split(","):
        same = tokens[f"{dtype} this tree"] == tokens[f"{dtype} baseline"]
        print(f"{dtype}: same greedy tokens in both builds: {same}")


if __name__ == "__main__":
    main()
