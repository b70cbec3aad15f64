"""int8 matmul kernels alone: codegen2's native kernel against PyTorch's, on every weight of a 125M and a 1B model.

Each pass multiplies 1 or 8 rows by all the matmul weights of a model shape, each weight its own tensor (1B: 805 MB
of int8, far beyond the last-level cache, so weights stream from memory as in decoding): the fused Q/K/V+fc_in,
out_proj and fc_out of every layer (and the 125M lm_head). Reported: GB/s of int8 weights read per second (the
median of interleaved repeats) and each kernel against PyTorch's kernel for the same format in the same run.
Kernels: `native` (kernels/int8_matmul.c; int8-dynamic with precomputed row sums), `torch` (int8:
`_weight_int8pack_mm` on a bf16 copy of the input; int8-dynamic: row quantization + `torch._int_mm`), and the
float32 `mm` of a 1B layer's weights as the memory's yardstick (4 bytes per weight, so its GB/s are bytes too).

    python benchmarks/bench_int8_kernels.py --threads 1       # about 2 minutes on the 2-core machine
    python benchmarks/bench_int8_kernels.py --threads 1 --kernels native,amx,vnni,avx2,torch --rows 1,8,32

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
}


def use_kernel(name: str) -> None:
    os.environ["CODEGEN2_INT8_KERNEL"] = "auto" if name == "native" else name
    native.reset()
    if name == "native" and not native.native_available()[0]:
        raise SystemExit(f"the native int8 kernel cannot run here: {native.native_available()[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kernels", default="native,torch", help="from native, amx, vnni, avx2, torch")
    parser.add_argument("--rows", default="1,8", help="input rows per matmul, comma-separated")
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    parse_threads(args.threads)
    print(machine_line())
    use_kernel("native")
    gen = torch.Generator().manual_seed(0)
    for shape, dims in SHAPES.items():
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
            print(f"== {shape}, {rows} row(s): {nbytes / 1e6:.0f} MB of int8 weights per pass, "
                  f"median of {args.repeats}, load {os.getloadavg()[0]:.2f}")
            for fmt in runs:
                rate = {kernel: nbytes / statistics.median(times[f"{fmt} {kernel}"]) / 1e9 for kernel in kernels}
                print(f"{fmt:13s} " + "   ".join(f"{kernel} {rate[kernel]:5.1f} GB/s" for kernel in kernels)
                      + "".join(f"   {kernel} / torch {rate[kernel] / rate['torch']:.2f}x"
                                for kernel in kernels if kernel != "torch" and "torch" in rate))
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
