"""int8 matmul kernels alone: codegen2's native kernel against PyTorch's, on every weight of a model shape.

Each pass multiplies 1 or 8 rows (`--rows`; 512 is a batch-8 prompt) by all the matmul weights of a shape (125M,
1B, Qwen2.5-Coder-0.5B), each weight its own tensor (1B: 805 MB of int8, far beyond the last-level cache, so
weights stream from memory as in decoding): the fused Q/K/V+fc_in, out_proj and fc_out of every layer (and the
125M lm_head). Reported: GB/s of int8 weights read per second (the median of interleaved repeats), each kernel
against PyTorch's kernel for the same format in the same run, and weight-only's time over int8-dynamic's.
Kernels: `native` (kernels/int8_matmul.c; int8-dynamic with precomputed row sums), `torch` (int8:
`_weight_int8pack_mm` on a bf16 copy of the input; int8-dynamic: row quantization + `torch._int_mm`), and the
float32 `mm` of a 1B layer's weights as the memory's yardstick (4 bytes per weight, so its GB/s are bytes too).

    python benchmarks/bench_int8_kernels.py --threads 1       # about 2 minutes on the 2-core machine
    python benchmarks/bench_int8_kernels.py --threads 1 --kernels native,amx,vnni,avx2,torch --rows 1,8,32
    python benchmarks/bench_int8_kernels.py --threads 1 --kernels native --rows 8,512 --shapes 1b,qwen25-coder-0.5b

`--kernels` adds columns for the native kernel's paths forced one by one (`amx`, `vnni`, `avx2`: kernels/int8.py;
`native` is the rule's choice), each against PyTorch's kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from codegen2.int8 import int8_dynamic_linear, int8_linear
from codegen2.kernels import int8 as native
from common import machine_line, parse_threads

SHAPES = {  # (in, out) of each matmul weight, in decode order
    "125m": [(768, 5376), (768, 768), (3072, 768)] * 12 + [(768, 51200)],
    "1b": [(2048, 14336), (2048, 2048), (8192, 2048)] * 16,
    # fused Q/K/V, o_proj, fused gate/up, down_proj of 24 layers (the head left out: tied to the embedding)
    "qwen25-coder-0.5b": [(896, 1152), (896, 896), (896, 9728), (4864, 896)] * 24,
}


def use_kernel(name: str) -> None:
    os.environ["CODEGEN2_INT8_KERNEL"] = "auto" if name == "native" else name
    native.reset()
    if name == "native" and not native.native_available()[0]:
        raise SystemExit(f"the native int8 kernel cannot run here: {native.native_available()[1]}")


def report(what: str, nbytes: int, kernels: list[str], times: dict[str, list[float]]) -> None:
    """GB/s of int8 weights per kernel and format, each against torch's, and weight-only's time over int8-dynamic's."""
    repeats = len(next(iter(times.values())))
    print(f"== {what}: {nbytes / 1e6:.0f} MB of int8 weights per pass, median of {repeats}, "
          f"load {os.getloadavg()[0]:.2f}")
    median = {key: statistics.median(samples) for key, samples in times.items()}
    for fmt in ("int8-dynamic", "int8"):
        rate = {kernel: nbytes / median[f"{fmt} {kernel}"] / 1e9 for kernel in kernels}
        print(f"{fmt:13s} " + "   ".join(f"{kernel} {rate[kernel]:5.1f} GB/s" for kernel in kernels)
              + "".join(f"   {kernel} / torch {rate[kernel] / rate['torch']:.2f}x"
                        for kernel in kernels if kernel != "torch" and "torch" in rate))
    # the weight-only target (issue 25) is >= 0.8x int8-dynamic's tokens/s
    print("int8 / int8-dynamic time: " + "   ".join(
        f"{kernel} {median[f'int8 {kernel}'] / median[f'int8-dynamic {kernel}']:.2f}x" for kernel in kernels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kernels", default="native,torch", help="from native, amx, vnni, avx2, torch")
    parser.add_argument("--rows", default="1,8", help="input rows per matmul, comma-separated (512: a b8 prompt)")
    parser.add_argument("--shapes", default="125m,1b", help=f"comma-separated, from {', '.join(SHAPES)}")
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    parse_threads(args.threads)
    print(machine_line())
    use_kernel("native")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        dims = SHAPES[shape]
        weights = []
        for k, n in dims:
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            weights.append((q, torch.rand(n, generator=gen) * 1e-3 + 1e-4, native.row_sums(q),
                            torch.ones(n, dtype=torch.bfloat16)))
        nbytes = sum(q.numel() for q, *_ in weights)
        for rows in [int(r) for r in args.rows.split(",")]:
            inputs = {k: torch.randn(rows, k, generator=gen) for k, _ in dims}
            runs = {
                "int8-dynamic": lambda: [int8_dynamic_linear(inputs[q.shape[1]], q, s, None, r)
                                         for q, s, r, _ in weights],
                "int8": lambda: [int8_linear(inputs[q.shape[1]], q, s, ones) for q, s, _, ones in weights],
            }
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for fmt, run in runs.items():
                    for kernel in kernels:
                        use_kernel(kernel)
                        run()  # warm (and the first call decides the kernel)
                        began = time.perf_counter()
                        run()
                        times.setdefault(f"{fmt} {kernel}", []).append(time.perf_counter() - began)
            report(f"{shape}, {rows} row(s)", nbytes, kernels, times)
    use_kernel("native")
    w = torch.randn(2048, 8192, generator=gen)
    x = torch.randn(1, 2048, generator=gen)
    layers = [w.clone() for _ in range(8)]  # 512 MiB of fp32
    samples = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        for layer in layers:
            torch.mm(x, layer)
        samples.append(time.perf_counter() - began)
    print(f"float32 mm, 1 row, {sum(t.numel() for t in layers) * 4 / 1e6:.0f} MB: "
          f"{sum(t.numel() for t in layers) * 4 / min(samples) / 1e9:.1f} GB/s (best of {args.repeats})")


if __name__ == "__main__":
    main()
