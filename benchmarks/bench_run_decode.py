"""Greedy decoding speed of a trained run of any architecture against transformers on the same weights.

`bench_generate.py` times CodeGen shapes on random weights against CTranslate2 as well; this one takes a
run directory (CodeGen or LLaMA), exports it with `export-hf`, and times `generate_ids` with each decoder
(model, fast, compiled) against the transformers class the export names, on one seeded prompt, every
engine producing exactly `--new-tokens` tokens. Engines alternate within each repeat; the median is kept.
Also reported: whether each engine's greedy tokens equal transformers'.

    python benchmarks/bench_run_decode.py --run runs/llama-tiny --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.hf import export_hf
from codegen2.loading import load_checkpoint
from codegen2.options import DECODERS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="codegen2 run directory")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(args.run, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
    vocab = loaded.tokenizer.eot_id  # ordinary tokens only
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=args.new_tokens)

    def ours(decoder: str) -> list[list[int]]:
        out = generate_ids(loaded.model, loaded.tokenizer, prompt.tolist(), params, stop_ids=[], decoder=decoder)
        return [c.token_ids for c in out]

    def theirs() -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        return out[:, args.prompt_tokens:].tolist()

    engines = {decoder: (lambda d=decoder: ours(d)) for decoder in DECODERS}
    engines["transformers"] = theirs
    began = time.perf_counter()
    ours("compiled")  # compiles once per shape; not timed
    print(f"compile (or reuse of inductor's cache): {time.perf_counter() - began:.1f} s")
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, run in engines.items():
            began = time.perf_counter()
            tokens[name] = run()
            seconds[name].append(time.perf_counter() - began)
    reference = statistics.median(seconds["transformers"])
    print(f"{loaded.config.arch} run {args.run}: batch {args.batch}, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    for name, times in seconds.items():
        median = statistics.median(times)
        same = "same tokens as transformers" if tokens[name] == tokens["transformers"] else "DIFFERENT tokens"
        print(f"  {name:12s} {args.batch * args.new_tokens / median:8.1f} new tokens/s   "
              f"x{reference / median:.2f} transformers   {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
