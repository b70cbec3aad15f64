"""Greedy generation speed: codegen2 against transformers `generate` and CTranslate2, same weights.

For each shape and batch size: 64-token prompts (random ids, seeded), then exactly 128 new tokens
(no early stop) in every engine, fp32 on CPU. transformers runs the HF twin of the codegen2 model;
CTranslate2 (if the `ctranslate2` package is installed) runs the same weights converted from that twin's
saved directory with its own converter. codegen2 runs `generate_ids` on a model switched to its inference
weight layout (`CodeGenModel.use_decode_layout`: same values, input-major memory order) with each of its
decoders: "model" (the model's forward with a KV cache), "fast" (`decode.FastDecoder`, eager) and
"compiled" (the same step under torch.compile; its one-time compile is timed and printed separately).
The greedy tokens of the engines are compared (they should agree: same weights, same arithmetic up to
rounding), then runs alternate between engines; the table gives the median new tokens/s, the range over
runs and the ratios of medians.

Also timed: one typical infill request (CodeGen2 format: 96-token prefix, <mask_1>, 32-token suffix,
<|endoftext|> <sep> <mask_1>, then up to 24 tokens), as request latency in milliseconds.

    python benchmarks/bench_generate.py                        # tiny and ~125M shapes, batch 1 and 8
    python benchmarks/bench_generate.py --shapes tiny --batches 1 --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from codegen2.sampling import SamplingParams, generate_ids
from common import (
    SHAPES,
    build_ours,
    fmt,
    hf_twin,
    interleaved,
    machine_line,
    model_config,
    parse_threads,
    ratio_line,
    spread,
)

PROMPT_TOKENS = 64
NEW_TOKENS = 128
TARGET_VS_TRANSFORMERS = 3.0
TARGET_VS_CT2 = 1.0


class IdTokenizer:
    """The little of a tokenizer that `generate_ids` uses, for prompts given as ids."""

    def __init__(self, vocab_size: int):
        self.eot_id = vocab_size - 1
        self.sep_id = vocab_size - 2
        self.eom_id = vocab_size - 3
        self.mask_1 = vocab_size - 4

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def ct2_generator(hf_model, threads: int, workdir: Path):
    """CTranslate2 generator for the weights of `hf_model`, converted by CTranslate2's own converter."""
    try:
        import ctranslate2
    except ImportError:
        return None
    import transformers
    from tokenizers import Tokenizer, models

    hf_dir, ct2_dir = workdir / "hf", workdir / "ct2"
    hf_model.save_pretrained(hf_dir)
    # CTranslate2 reads its vocabulary from a tokenizer: one made-up token string per id.
    vocab = {f"t{i}": i for i in range(hf_model.config.vocab_size)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), bos_token="t0", eos_token="t0",
        unk_token="t0")
    tokenizer.save_pretrained(hf_dir)
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(ct2_dir), quantization="float32")
    return ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type="float32",
                                 intra_threads=threads or torch.get_num_threads())


def run_shape(shape: str, batches: list[int], repeats: int, threads: int, use_ct2: bool, compiled: bool) -> None:
    cfg = model_config(shape)
    ours = build_ours(cfg).eval()
    theirs = hf_twin(ours).eval()
    ours.use_decode_layout()  # codegen2's inference layout (same values): see CodeGenModel.use_decode_layout
    tokenizer = IdTokenizer(cfg.vocab_size)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    print(f"\n== {shape}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
          f"{PROMPT_TOKENS} prompt tokens + {NEW_TOKENS} new tokens, greedy, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        ct2 = ct2_generator(theirs, threads, Path(tmp)) if use_ct2 else None
        if use_ct2 and ct2 is None:
            print("CTranslate2 column skipped: `pip install ctranslate2` to include it")
        for batch in batches:
            generator = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, cfg.vocab_size - 4, (batch, PROMPT_TOKENS), generator=generator)

            def run_ours(decoder: str = "model") -> list[list[int]]:
                return [c.token_ids for c in generate_ids(ours, tokenizer, prompts.tolist(), params, stop_ids=(),
                                                          decoder=decoder)]

            def run_transformers() -> list[list[int]]:
                with torch.inference_mode():
                    out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
                return out[:, PROMPT_TOKENS:].tolist()

            contenders = {"transformers": run_transformers}
            if ct2 is not None:
                start_tokens = [[f"t{i}" for i in row] for row in prompts.tolist()]

                def run_ct2() -> list[list[int]]:
                    results = ct2.generate_batch(start_tokens, max_length=NEW_TOKENS, min_length=NEW_TOKENS,
                                                 beam_size=1, include_prompt_in_result=False, end_token=[])
                    return [r.sequences_ids[0] for r in results]

                contenders["ctranslate2"] = run_ct2
            contenders["codegen2"] = run_ours
            contenders["codegen2 fast"] = lambda: run_ours("fast")
            if compiled:
                contenders["codegen2 compiled"] = lambda: run_ours("compiled")

            reference = run_ours()
            agreement = []
            for name, run in contenders.items():
                if name == "codegen2 compiled":
                    began = time.perf_counter()
                    other = run()  # compiles the decode step for this batch size and capacity
                    print(f"-- batch {batch}: compiling the decode step and one generation took "
                          f"{time.perf_counter() - began:.1f} s")
                if name != "codegen2":
                    other = run()
                    same = sum(a == b for x, y in zip(reference, other) for a, b in zip(x, y))
                    agreement.append(f"{name} {100 * same / (batch * NEW_TOKENS):.0f}%")
            results = interleaved(contenders, repeats=repeats, warmup=0)
            tokens = batch * NEW_TOKENS
            print(f"-- batch {batch}: greedy tokens equal to codegen2's: {', '.join(agreement)}")
            print(f"{'engine':<16}{'new tokens/s median (range)':>32}{'spread':>9}{'ms/step':>9}")
            for name, summary in results.items():
                print(f"{name:<16}{str(summary.rate(tokens)):>32}{spread(summary):>9}"
                      f"{1e3 * summary.median / NEW_TOKENS:>9.2f}")
            for ours_name in [n for n in results if n.startswith("codegen2")]:
                ours_rate = results[ours_name].rate(tokens).median
                print(ratio_line(f"{ours_name} / transformers", results["transformers"].rate(tokens).median,
                                 ours_rate, TARGET_VS_TRANSFORMERS))
                if "ctranslate2" in results:
                    print(ratio_line(f"{ours_name} / ctranslate2", results["ctranslate2"].rate(tokens).median,
                                     ours_rate, TARGET_VS_CT2))
        infill_latency(ours, theirs, tokenizer, repeats)


def infill_latency(ours, theirs, tokenizer: IdTokenizer, repeats: int) -> None:
    """One CodeGen2 infill request: prefix <mask_1> suffix <|endoftext|> <sep> <mask_1> -> middle <eom>."""
    generator = torch.Generator().manual_seed(99)
    prefix = torch.randint(0, tokenizer.mask_1, (96,), generator=generator).tolist()
    suffix = torch.randint(0, tokenizer.mask_1, (32,), generator=generator).tolist()
    prompt = prefix + [tokenizer.mask_1] + suffix + [tokenizer.eot_id, tokenizer.sep_id, tokenizer.mask_1]
    params = SamplingParams(max_new_tokens=24)
    stops = [tokenizer.eom_id, tokenizer.eot_id]
    prompt_tensor = torch.tensor([prompt])

    def run_transformers():
        with torch.inference_mode():
            return theirs.generate(prompt_tensor, attention_mask=torch.ones_like(prompt_tensor), do_sample=False,
                                   max_new_tokens=24, eos_token_id=stops, pad_token_id=0)

    results = interleaved({"transformers": run_transformers,
                           "codegen2": lambda: generate_ids(ours, tokenizer, [prompt], params, stop_ids=stops)},
                          repeats=repeats, warmup=1)
    made = len(generate_ids(ours, tokenizer, [prompt], params, stop_ids=stops)[0].token_ids)
    line = ", ".join(f"{name} {fmt(1e3 * s.median)} ms ({fmt(1e3 * s.low)}..{fmt(1e3 * s.high)})"
                     for name, s in results.items())
    print(f"-- infill request ({len(prompt)} prompt tokens, {made} generated): latency {line}; "
          f"transformers / codegen2 = {results['transformers'].median / results['codegen2'].median:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,125m", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch and CTranslate2 threads (0: torch's default)")
    parser.add_argument("--no-ct2", action="store_true", help="leave CTranslate2 out")
    parser.add_argument("--no-compile", action="store_true", help="leave the compiled decode step out")
    args = parser.parse_args()
    parse_threads(args.threads)
    print(machine_line())
    for shape in args.shapes.split(","):
        run_shape(shape, [int(b) for b in args.batches.split(",")], args.repeats, args.threads, not args.no_ct2,
                  not args.no_compile)


if __name__ == "__main__":
    main()
