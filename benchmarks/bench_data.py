"""Data-pipeline throughput per core against what the `tiny` preset's training step consumes.

Stages, on the embedded corpus (Python standard library code and docs), with the tiny preset's settings
(4096-token BPE, sequences of 256, micro-batches of 8, 50% file-level span corruption):

1. tokenisation: `CodeGenTokenizer.encode_batch` of whole documents (done once, by the data preparation);
2. mixture + packing + objective: `BatchLoader.step_batches` (what the background worker runs every step).

Rates are tokens per CPU-second of this process (all its threads together), i.e. per core. The pipeline
rate per core combines the stages (their per-token costs add up); the ratio to the training step's
tokens/s (codegen2's step as in `bench_train_step.py`, same process) says how many times over one core
keeps a tiny-preset training run fed. Target: 20x.

    python benchmarks/bench_data.py [--chars 4000000] [--steps 40] [--repeats 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch

from bench_train_step import codegen2_step
from codegen2.config import load_config
from codegen2.data import BatchLoader, PackedMixture, embedded_sources
from codegen2.tokenizer import train_tokenizer
from codegen2.train import build_optimizer
from common import build_ours, fmt, machine_line, model_config, parse_threads

TARGET = 20.0


def cpu_seconds(fn) -> float:
    """CPU time of this process (every thread) spent in fn()."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def corpus_texts(config, chars: int) -> list[list[str]]:
    """Documents of each embedded source, up to `chars` characters in all (split by mixture weight)."""
    sources = embedded_sources(config.data, "train")
    total_weight = sum(s.weight for s in sources)
    texts = []
    for source in sources:
        budget, taken = chars * source.weight / total_weight, []
        for doc in source.documents():
            taken.append(doc.text)
            budget -= len(doc.text)
            if budget <= 0:
                break
        texts.append(taken)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=4_000_000, help="characters of corpus to tokenise")
    parser.add_argument("--steps", type=int, default=40, help="training steps' worth of batches to build per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each stage (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the training step")
    args = parser.parse_args()
    parse_threads(args.threads)
    print(machine_line())

    config = load_config(preset="tiny")
    texts = corpus_texts(config, args.chars)
    start = time.perf_counter()
    tokenizer = train_tokenizer([t for group in texts for t in group][:2000], config.tokenizer.vocab_size,
                                config.tokenizer.num_masks)
    print(f"corpus: {sum(map(len, texts))} documents, {sum(len(t) for g in texts for t in g):,} characters; "
          f"BPE ({tokenizer.vocab_size} tokens) trained in {time.perf_counter() - start:.1f} s (not timed below)")

    # 1. Tokenisation.
    encoded: list[list[list[int]]] = []
    token_seconds = []
    for _ in range(args.repeats):
        encoded = []
        token_seconds.append(cpu_seconds(lambda: encoded.extend(
            tokenizer.encode_batch(group, literal_specials=True) for group in texts)))
    streams = [np.fromiter(itertools.chain.from_iterable(ids + [tokenizer.eot_id] for ids in group), dtype=np.int64)
               for group in encoded]
    n_tokens = sum(len(s) for s in streams)
    tokenise_rate = n_tokens / statistics.median(token_seconds)

    # 2. Mixture + packing + objective, as the training loop's background worker builds them.
    t = config.train
    mixture = PackedMixture(streams, [s.weight for s in embedded_sources(config.data, "train")], t.seq_len, t.seed)
    loader = BatchLoader(mixture, config.objective, tokenizer.special_ids(), t.micro_batch_size, 1, t.seed)
    batch_seconds = []
    for run in range(args.repeats):
        first = run * args.steps  # fresh samples every run: nothing is served from a cache twice
        steps = range(first, first + args.steps)
        batch_seconds.append(cpu_seconds(lambda: [loader.step_batches(step) for step in steps]))
    batch_tokens = args.steps * t.micro_batch_size * t.seq_len
    batch_rate = batch_tokens / statistics.median(batch_seconds)
    pipeline_rate = 1.0 / (1.0 / tokenise_rate + 1.0 / batch_rate)

    # What the training step consumes: codegen2's tiny step, same batch shape (wall-clock tokens/s).
    cfg = model_config("tiny", vocab_size=config.model.vocab_size)
    model = build_ours(cfg).train()
    optimizer = build_optimizer(model, t)
    batch = loader.step_batches(0)[0]
    codegen2_step(model, optimizer, batch.input_ids, batch.labels)
    step_seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        codegen2_step(model, optimizer, batch.input_ids, batch.labels)
        step_seconds.append(time.perf_counter() - start)
    train_rate = t.micro_batch_size * t.seq_len / statistics.median(step_seconds)

    def spread(samples: list[float]) -> str:
        return f"±{100 * (max(samples) - min(samples)) / (2 * statistics.median(samples)):.0f}%"

    print(f"tokenisation:                      {fmt(tokenise_rate):>12} tokens/s per core ({spread(token_seconds)}, "
          f"{n_tokens:,} tokens)")
    print(f"mixture + packing + objective:     {fmt(batch_rate):>12} tokens/s per core ({spread(batch_seconds)}, "
          f"{args.steps} steps of {t.micro_batch_size}x{t.seq_len})")
    print(f"whole pipeline:                    {fmt(pipeline_rate):>12} tokens/s per core")
    print(f"tiny training step consumes:       {fmt(train_rate):>12} tokens/s ({torch.get_num_threads()} threads, "
          f"{spread(step_seconds)})")
    ratio = pipeline_rate / train_rate
    verdict = "met" if ratio >= TARGET else f"missed by {100 * (1 - ratio / TARGET):.0f}%"
    print(f"pipeline per core / training consumption: {ratio:.1f}x (target >= {TARGET:g}x: {verdict}); "
          f"per-step batches alone: {batch_rate / train_rate:.1f}x")


if __name__ == "__main__":
    main()
