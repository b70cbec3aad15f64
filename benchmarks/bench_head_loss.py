"""The training loss's time: `codegen2.head_loss` (the head and cross-entropy a chunk of positions at a time, each
chunk's gradients taken at once) against the plain way (the full [tokens, vocab] logits through `F.cross_entropy`),
interleaved in one process on the same model and batch.

One contender is a forward and backward of the whole model at sequence 512, micro-batch 1, float32 (no optimizer
step: it is the same for both), full training and LoRA rank 16 on every linear layer of the blocks. Both give the
same loss and gradients (tests/test_chunked_loss.py); the ratio says what the chunking costs or saves in time. Peak
memory is measured per process by `bench_lora.py --only 125m`.

    python benchmarks/bench_head_loss.py                      # tiny and 125m, 7 rounds
    python benchmarks/bench_head_loss.py --shapes 125m --repeats 11 --threads 1
    python benchmarks/bench_head_loss.py --shapes 1b --modes lora --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import torch.nn.functional as F

import common
from bench_lora import cpu_line
from codegen2.head_loss import head_loss
from codegen2.lora import LoraSettings, attach_lora
from codegen2.models import build_model
from codegen2.train import output_head

SEQ = 512


def contenders(shape: str, lora: bool) -> dict:
    """The plain and the chunked forward + backward of one model of `shape`."""
    cfg = common.model_config(shape)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if lora:
        attach_lora(model, LoraSettings(rank=16, dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=generator)
    labels = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=generator)

    def plain() -> None:
        logits = model(ids)
        F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    def chunked() -> None:
        hidden = model(ids, return_hidden=True)
        head_loss(hidden, labels, *output_head(model, contextlib.nullcontext()))[0].backward()
        model.zero_grad(set_to_none=True)

    return {"plain": plain, "chunked": chunked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "125m"], choices=["tiny", "125m", "1b"])
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a shared "
                        "machine one thread is the steadier measure")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(cpu_line())
    print(common.machine_line())
    for shape in args.shapes:
        for lora in [mode == "lora" for mode in args.modes]:
            times = common.interleaved(contenders(shape, lora), args.repeats)
            plain, chunked = times["plain"], times["chunked"]
            print(f"{shape:5} {'LoRA r16' if lora else 'full    '}: forward + backward, sequence {SEQ}: plain "
                  f"{plain.median:.3f} s ({plain.low:.3f}..{plain.high:.3f}), chunked {chunked.median:.3f} s "
                  f"({chunked.low:.3f}..{chunked.high:.3f}); chunked / plain time {chunked.median / plain.median:.2f} "
                  f"(spreads {common.spread(plain)}, {common.spread(chunked)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
