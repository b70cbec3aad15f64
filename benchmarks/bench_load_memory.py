"""Peak resident memory of `codegen2.from_pretrained` relative to the size of the weights file.

Writes a random checkpoint of a preset's shape (default `1b`: about 4.1 GB in fp32) as a Hugging Face
directory, streaming one tensor at a time so that this script never holds the model, then loads it in
a fresh child process and reads the child's peak RSS (VmHWM, which counts memory-mapped file pages
too). After loading, the child reads every parameter so that all weights really are resident when
the peak is taken. Targets: peak < 1.3 x the weights file (issue 3); loading the 1B shape as int8 peaks at
<= 1.4 GB resident (issue 13: each tensor is quantized in row chunks as it is read, its file pages dropped).

    python benchmarks/bench_load_memory.py                       # 1b, fp32, bf16 and int8 loads
    python benchmarks/bench_load_memory.py --preset tiny --formats safetensors,bin

The big files are deleted afterwards unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from codegen2.config import config_from_dict, preset_dict
from codegen2.models.codegen.hf import hf_config_from_model
from codegen2.models.codegen.model import CodeGenModel

INT8_1B_TARGET_GB = 1.4  # issue 13: loading a 1B-shaped checkpoint as int8 peaks at <= 1.4 GB (decimal) resident

CHILD = r"""
import json, sys, torch
from codegen2 import from_pretrained

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, dtype = sys.argv[1], sys.argv[2]
baseline = status("VmRSS")
model = from_pretrained(path, load_tokenizer=False,
                        dtype={"stored": None, "int8": "int8"}.get(dtype) or getattr(torch, dtype))
with torch.no_grad():
    # Reads every page of every weight (int8 weights are buffers), a million elements at a time: summing
    # a whole int8 tensor would first widen all of it to int64.
    checksum = sum(float(c.sum()) for t in model.state_dict().values() for c in t.reshape(-1).split(2**20))
    logits = model(torch.zeros(1, 8, dtype=torch.long))
print(json.dumps({"baseline_rss": baseline, "peak_rss": status("VmHWM"), "final_rss": status("VmRSS"),
                  "params": model.num_parameters(), "dtype": str(next(model.parameters()).dtype),
                  "mp_num": model.config.mp_num, "finite": bool(torch.isfinite(logits).all())}))
"""


def write_random_safetensors(model_config, path: Path, seed: int = 0) -> int:
    """Write random fp32 weights in safetensors format one tensor at a time; returns the file size."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in CodeGenModel(model_config).named_parameters()}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape in shapes.items():
            tensor = torch.randn(shape, generator=generator).mul_(0.02)
            if name.endswith(("ln_1.weight", "ln_f.weight")):
                tensor.add_(1.0)
            handle.write(memoryview(tensor.numpy()).cast("B"))
            del tensor
    return path.stat().st_size


def write_bin_from_safetensors(src: Path, dst: Path) -> int:
    """pytorch_model.bin with the same tensors (read memory-mapped, so this process never needs 2x)."""
    from safetensors.torch import load_file

    torch.save(load_file(str(src)), dst)
    return dst.stat().st_size


def measure(directory: Path, dtype: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(directory), dtype], check=True, capture_output=True,
                         text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--formats", default="safetensors", help="comma list of safetensors, bin")
    parser.add_argument("--dtypes", default="stored,bfloat16,int8",
                        help="comma list: stored (fp32), bfloat16, float16, int8 (quantized while loading)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    args = parser.parse_args()

    model_config = config_from_dict(preset_dict(args.preset)).validate().model
    root = Path(args.dir or tempfile.mkdtemp(prefix="codegen2-loadmem-"))
    rows = []
    try:
        st_dir = root / "safetensors"
        st_dir.mkdir(parents=True, exist_ok=True)
        hf_config = hf_config_from_model(model_config, eot_id=50256, dtype_name="float32")
        del hf_config["mp_num"]  # like the published checkpoints: the grouping is detected from the shape
        (st_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
        t0 = time.perf_counter()
        size = write_random_safetensors(model_config, st_dir / "model.safetensors")
        print(f"wrote {size / 2**30:.2f} GiB of random {args.preset} weights in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        dirs = {"safetensors": (st_dir, size)}
        if "bin" in args.formats.split(","):
            bin_dir = root / "bin"
            bin_dir.mkdir(exist_ok=True)
            shutil.copy(st_dir / "config.json", bin_dir)
            bin_file = write_bin_from_safetensors(st_dir / "model.safetensors", bin_dir / "pytorch_model.bin")
            dirs["bin"] = (bin_dir, bin_file)
        for fmt in args.formats.split(","):
            directory, file_size = dirs[fmt]
            for dtype in args.dtypes.split(","):
                r = measure(directory, dtype)
                r.update(format=fmt, load_dtype=dtype, file_bytes=file_size,
                         peak_over_file=round(r["peak_rss"] / file_size, 3),
                         load_increase_over_file=round((r["peak_rss"] - r["baseline_rss"]) / file_size, 3))
                rows.append(r)
                print(json.dumps(r), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| preset | file | load dtype | file GiB | baseline RSS GiB | peak RSS GiB | peak RSS GB | peak / file "
          "| load time s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {args.preset} | {r['format']} | {r['load_dtype']} | {r['file_bytes'] / 2**30:.2f} | "
              f"{r['baseline_rss'] / 2**30:.2f} | {r['peak_rss'] / 2**30:.2f} | {r['peak_rss'] / 1e9:.3f} | "
              f"{r['peak_over_file']:.2f} | {r['seconds']} |")
    for r in rows:
        if args.preset == "1b" and r["load_dtype"] == "int8":
            peak = r["peak_rss"] / 1e9
            verdict = "met" if peak <= INT8_1B_TARGET_GB else f"missed by {100 * (peak / INT8_1B_TARGET_GB - 1):.0f}%"
            print(f"1b loaded as int8 ({r['format']}): peak {peak:.3f} GB resident "
                  f"(target <= {INT8_1B_TARGET_GB} GB: {verdict})")


if __name__ == "__main__":
    main()
