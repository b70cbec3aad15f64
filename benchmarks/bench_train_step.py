"""Training-step throughput: codegen2 against transformers' CodeGenForCausalLM, same weights and batch.

One step = forward + cross-entropy + backward + gradient clipping (1.0) + AdamW update, for both engines:
codegen2 runs `codegen2.train.train_step` itself (with its `build_optimizer`); transformers computes its
own shifted loss from `labels` and uses the AdamW that its Trainer picks by default (torch's fused AdamW).
Both see identical weights and token batches (targets are the next tokens in both). Runs alternate between
the engines; the table gives the median tokens/s, the range over runs, the ratio of medians and the model
FLOP utilisation against a fp32 matmul peak measured in the same rounds (MFU: FLOPs per token from
`codegen2.metrics.flops_per_token`).

    python benchmarks/bench_train_step.py                      # tiny and ~125M shapes
    python benchmarks/bench_train_step.py --shapes tiny --repeats 7 --threads 1 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from codegen2.config import TrainConfig
from codegen2.data.loader import Batch
from codegen2.metrics import flops_per_token
from codegen2.train import StepSettings, build_optimizer, compile_blocks, train_step

DEFAULT_BATCH = {"tiny": (8, 256), "125m": (4, 512)}  # (batch, sequence length)
TARGET_RATIO = 1.15
TARGET_MFU = 0.75


def codegen2_step(model, optimizer, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`codegen2.train.train_step` itself on one micro-batch (all causal), clipping at 1.0; returns the loss."""
    batch = Batch(input_ids=input_ids, labels=labels, doc_ids=torch.zeros_like(input_ids),
                  prefix_len=torch.zeros(len(input_ids), dtype=torch.int64),
                  objective=torch.zeros(len(input_ids), dtype=torch.int64),
                  sample_index=torch.arange(len(input_ids)))
    targets = (labels != -100).sum().float()
    _, loss_sum, _ = train_step(model, optimizer, [batch], targets, StepSettings(grad_clip=1.0))
    return loss_sum.sum() / targets


def transformers_step(model, optimizer, input_ids: torch.Tensor) -> torch.Tensor:
    """What a transformers user runs: the model's own loss from `labels`, then the same update."""
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class MatmulPeak:
    """fp32 matmul FLOP/s of this CPU, sampled between the timed steps so it sees the same load."""

    def __init__(self, size: int = 1024, tries: int = 3):
        self.a, self.b = torch.randn(size, size), torch.randn(size, size)
        self.flops, self.tries = 2.0 * size**3, tries
        self.samples: list[float] = []

    def __call__(self) -> None:
        best = float("inf")
        for _ in range(self.tries):
            start = time.perf_counter()
            torch.mm(self.a, self.b)
            best = min(best, time.perf_counter() - start)
        self.samples.append(self.flops / best)

    def median(self) -> float:
        return statistics.median(self.samples)


def run_shape(shape: str, batch: int, seq_len: int, repeats: int, use_compile: bool, attn: str) -> None:
    cfg = common.model_config(shape)
    ours = common.build_ours(cfg).train()
    theirs = common.hf_twin(ours, attn_implementation=attn).train()
    hyper = TrainConfig(lr=1e-4)
    our_opt = build_optimizer(ours, hyper)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=hyper.lr, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
                                  weight_decay=0.0, fused=True)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=generator)
    labels = torch.cat([input_ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    tokens = batch * seq_len
    # Same weights, same targets: the first losses must agree before anything is timed.
    loss_ours = codegen2_step(ours, our_opt, input_ids, labels).item()
    loss_theirs = transformers_step(theirs, their_opt, input_ids).item()

    peak_sampler = MatmulPeak()
    contenders = {
        "transformers": lambda: transformers_step(theirs, their_opt, input_ids),
        "codegen2": lambda: codegen2_step(ours, our_opt, input_ids, labels),
        "matmul peak": peak_sampler,
    }
    compile_seconds = None
    if use_compile:
        compiled = common.build_ours(cfg).train()
        compiled_opt = build_optimizer(compiled, hyper)
        compile_blocks(compiled)
        start = time.perf_counter()
        codegen2_step(compiled, compiled_opt, input_ids, labels)
        compile_seconds = time.perf_counter() - start
        contenders["codegen2 compiled"] = lambda: codegen2_step(compiled, compiled_opt, input_ids, labels)

    results = common.interleaved(contenders, repeats=repeats, warmup=1)
    results.pop("matmul peak")
    peak = peak_sampler.median()
    flops = flops_per_token(cfg, seq_len)
    params = sum(p.numel() for p in ours.parameters())
    print(f"\n== {shape}: {params / 1e6:.1f}M parameters, batch {batch} x {seq_len} tokens, "
          f"transformers attention: {theirs.config._attn_implementation}")
    print(f"first-step loss: codegen2 {loss_ours:.5f}, transformers {loss_theirs:.5f} "
          f"(|diff| {abs(loss_ours - loss_theirs):.1e})")
    print(f"fp32 matmul peak (median of rounds): {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {flops / 1e6:.1f}M")
    if compile_seconds is not None:
        print(f"torch.compile of the blocks + first step: {compile_seconds:.1f} s (not in the figures below)")
    print(f"{'engine':<20}{'tokens/s median (range)':>30}{'spread':>9}{'MFU':>8}")
    for name, summary in results.items():
        rate = summary.rate(tokens)
        print(f"{name:<20}{str(rate):>30}{common.spread(summary):>9}{100 * rate.median * flops / peak:>7.1f}%")
    base = results["transformers"].rate(tokens).median
    for name in [n for n in results if n.startswith("codegen2")]:
        rate = results[name].rate(tokens).median
        print(common.ratio_line(f"{name} / transformers tokens/s", base, rate, TARGET_RATIO)
              + f"; MFU {100 * rate * flops / peak:.1f}% (target >= {100 * TARGET_MFU:.0f}%: "
              f"{'met' if rate * flops / peak >= TARGET_MFU else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,125m", help=f"comma-separated, from {', '.join(common.SHAPES)}")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (0: per-shape default)")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0: per-shape default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per engine (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true", help="also time codegen2 with torch.compile'd blocks")
    parser.add_argument("--attn", default="sdpa", help="transformers attn_implementation (falls back to eager)")
    args = parser.parse_args()
    common.parse_threads(args.threads)
    print(common.machine_line())
    for shape in args.shapes.split(","):
        batch, seq_len = DEFAULT_BATCH[shape]
        run_shape(shape, args.batch or batch, args.seq_len or seq_len, args.repeats, args.compile, args.attn)


if __name__ == "__main__":
    main()
