"""Greedy generation speed: codegen2 (float32, bfloat16, int8 weights) against CTranslate2 and transformers.

For each shape and batch size: 64-token prompts (random ids, seeded), then exactly 128 new tokens
(no early stop) in every engine, on the CPU. Contenders, all on the same weights:
- `codegen2 <dtype>`: `generate_ids` with the default decoder on the model loaded in that weight format
  (`--decoders model,fast,compiled` adds columns for the other decoders, float32 only);
- `ctranslate2 float32` / `ctranslate2 int8`: CTranslate2 (if installed) on the same weights converted by its
  own converter, compute type float32 and int8 (its int8: int8 weights and int8 activations);
- `transformers`: `CodeGenForCausalLM.generate` on the HF twin (float32; left out at 1b, `--no-transformers`).
The greedy tokens of every engine are compared with a reference (codegen2 float32, else codegen2 int8); on
random weights the logits are nearly tied, so bf16/int8 agreement here says little (docs/inference.md
measures it on a trained model). Runs alternate between engines; the table gives the median new tokens/s,
the range over runs and the ratios of medians against the peers of the same weight format.

The machine's read bandwidth (a sum over 512 MB, same thread count) is measured and printed; for batch 1
the int8 rate is compared with its bound, bandwidth / bytes read per token (int8 weights and scales, norms,
biases and the KV cache at the mean generated length).

Also timed: one typical infill request (CodeGen2 format: 96-token prefix, <mask_1>, 32-token suffix,
<|endoftext|> <sep> <mask_1>, then up to 24 tokens), as request latency in milliseconds.

    python benchmarks/bench_generate.py --threads 1                    # tiny, 125m, 1b; batch 1 and 8
    python benchmarks/bench_generate.py --shapes tiny --batches 1 --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from codegen2.inference_options import DEFAULT_DECODER
from codegen2.quantize import quantize_model
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
    read_bandwidth,
    spread,
    write_safetensors,
)

PROMPT_TOKENS = 64
NEW_TOKENS = 128
TARGET_VS_TRANSFORMERS = 3.0
TARGET_VS_CT2 = 1.0
TARGET_BANDWIDTH = 0.70  # 1b batch-1 int8 decoding, fraction of the bandwidth bound
CT2_TYPES = {"float32": "float32", "int8": "int8"}  # codegen2 dtype -> CTranslate2 compute type it is held to


class IdTokenizer:
    """The little of a tokenizer that `generate_ids` uses, for prompts given as ids."""

    def __init__(self, vocab_size: int):
        self.eot_id = vocab_size - 1
        self.sep_id = vocab_size - 2
        self.eom_id = vocab_size - 3
        self.mask_1 = vocab_size - 4

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def write_hf_directory(model, directory: Path) -> Path:
    """`model`'s weights as a transformers CodeGen directory (streamed, so a 1B model is not held twice)."""
    import transformers
    from tokenizers import Tokenizer, models

    from codegen2.models.codegen.hf import hf_config_from_model

    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config_from_model(model.config, eot_id=0, dtype_name="float32")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(model.state_dict(), directory / "model.safetensors")
    # CTranslate2 reads its vocabulary from a tokenizer: one made-up token string per id.
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), bos_token="t0", eos_token="t0",
        unk_token="t0")
    tokenizer.save_pretrained(directory)
    return directory


def ct2_generators(hf_dir: Path, dtypes: list[str], threads: int, workdir: Path) -> dict[str, object]:
    """CTranslate2 generators (by codegen2 dtype) for the weights in `hf_dir`, converted by its own converter."""
    try:
        import ctranslate2
    except ImportError:
        return {}
    out = {}
    for dtype in dtypes:
        if dtype not in CT2_TYPES:
            continue
        target = workdir / f"ct2-{dtype}"
        ctranslate2.converters.TransformersConverter(str(hf_dir), low_cpu_mem_usage=True).convert(
            str(target), quantization=CT2_TYPES[dtype])
        out[dtype] = ctranslate2.Generator(str(target), device="cpu", compute_type=CT2_TYPES[dtype],
                                           intra_threads=threads or torch.get_num_threads())
    return out


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers a decode step reads (the embedding reads one row per token: left out)."""
    embedding = {t.data_ptr() for t in model.transformer.wte.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if t.data_ptr() not in embedding)


def kv_bytes(cfg, batch: int, dtype_bytes: int = 4) -> int:
    """Mean bytes of cached keys and values read per step over the generation (prompt + half the new tokens)."""
    return 2 * cfg.n_layer * batch * (PROMPT_TOKENS + NEW_TOKENS // 2) * cfg.n_embd * dtype_bytes


def build_formats(ours, dtypes: list[str]) -> dict[str, object]:
    """The model in each weight format requested (float32 last, so the others are copies of it)."""
    models = {}
    if "bfloat16" in dtypes:
        models["bfloat16"] = copy.deepcopy(ours).to(torch.bfloat16).use_decode_layout()
    if "int8" in dtypes:
        models["int8"] = quantize_model(copy.deepcopy(ours) if "float32" in dtypes or "bfloat16" in dtypes else ours)
    if "float32" in dtypes:
        models["float32"] = ours.use_decode_layout()
    return {d: models[d] for d in dtypes}


def run_shape(shape: str, batches: list[int], repeats: int, threads: int, use_ct2: bool, dtypes: list[str],
              decoders: list[str], use_transformers: bool, bandwidth: float) -> None:
    cfg = model_config(shape)
    ours = build_ours(cfg).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    tokenizer = IdTokenizer(cfg.vocab_size)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    print(f"\n== {shape}: {n_params / 1e6:.1f}M parameters, {PROMPT_TOKENS} prompt tokens + {NEW_TOKENS} new "
          f"tokens, greedy; weight formats {', '.join(dtypes)}; default decoder {DEFAULT_DECODER!r}")
    with tempfile.TemporaryDirectory() as tmp:
        theirs = hf_twin(ours).eval() if use_transformers else None
        ct2 = {}
        if use_ct2:
            ct2 = ct2_generators(write_hf_directory(ours, Path(tmp) / "hf"), dtypes, threads, Path(tmp))
            if not ct2:
                print("CTranslate2 columns skipped: `pip install ctranslate2` to include them")
        models = build_formats(ours, dtypes)
        del ours
        for batch in batches:
            generator = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, cfg.vocab_size - 4, (batch, PROMPT_TOKENS), generator=generator)
            contenders = {}
            if theirs is not None:
                def run_transformers() -> list[list[int]]:
                    with torch.inference_mode():
                        out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
                    return out[:, PROMPT_TOKENS:].tolist()

                contenders["transformers"] = run_transformers
            start_tokens = [[f"t{i}" for i in row] for row in prompts.tolist()]
            for dtype, generator_ct2 in ct2.items():
                def run_ct2(g=generator_ct2) -> list[list[int]]:
                    results = g.generate_batch(start_tokens, max_length=NEW_TOKENS, min_length=NEW_TOKENS,
                                               beam_size=1, include_prompt_in_result=False, end_token=[])
                    return [r.sequences_ids[0] for r in results]

                contenders[f"ctranslate2 {dtype}"] = run_ct2
            for dtype, model in models.items():
                for decoder in [DEFAULT_DECODER] + [d for d in decoders if d != DEFAULT_DECODER and dtype == "float32"]:
                    def run_ours(m=model, decoder=decoder) -> list[list[int]]:
                        return [c.token_ids for c in generate_ids(m, tokenizer, prompts.tolist(), params,
                                                                  stop_ids=(), decoder=decoder)]

                    name = f"codegen2 {dtype}" + ("" if decoder == DEFAULT_DECODER else f" {decoder}")
                    contenders[name] = run_ours

            reference_name = "codegen2 float32" if "codegen2 float32" in contenders else f"codegen2 {dtypes[0]}"
            agreement, reference = [], None
            for name in [reference_name] + [n for n in contenders if n != reference_name]:
                began = time.perf_counter()
                tokens = contenders[name]()  # first run: compiles where a decoder compiles
                first = time.perf_counter() - began
                if name.startswith("codegen2"):
                    print(f"-- batch {batch}: {name}: first generation (compile included) {first:.1f} s")
                if reference is None:
                    reference = tokens
                    continue
                same = sum(a == b for x, y in zip(reference, tokens) for a, b in zip(x, y))
                agreement.append(f"{name} {100 * same / (batch * NEW_TOKENS):.0f}%")
            results = interleaved(contenders, repeats=repeats, warmup=0)
            tokens = batch * NEW_TOKENS
            print(f"-- batch {batch}: greedy tokens equal to {reference_name}'s: {', '.join(agreement)}")
            print(f"{'engine':<28}{'new tokens/s median (range)':>32}{'spread':>9}{'ms/step':>9}")
            for name, summary in results.items():
                print(f"{name:<28}{str(summary.rate(tokens)):>32}{spread(summary):>9}"
                      f"{1e3 * summary.median / NEW_TOKENS:>9.2f}")
            rate = {name: summary.rate(tokens).median for name, summary in results.items()}
            for name in [n for n in results if n.startswith("codegen2")]:
                dtype = name.split()[1]
                if "transformers" in rate and dtype == "float32":
                    print(ratio_line(f"{name} / transformers", rate["transformers"], rate[name],
                                     TARGET_VS_TRANSFORMERS))
                for peer in [f"ctranslate2 {dtype}"]:  # bfloat16 has no CTranslate2 peer on CPU and no target
                    if peer in rate:
                        print(ratio_line(f"{name} / {peer}", rate[peer], rate[name], TARGET_VS_CT2))
            if batch == 1 and "codegen2 int8" in rate:
                per_token = weight_bytes(models["int8"]) + kv_bytes(cfg, batch)
                bound = bandwidth * 1e9 / per_token
                print(f"bandwidth bound, int8 batch 1: {per_token / 1e6:.0f} MB per token / {bandwidth:.1f} GB/s = "
                      f"{bound:.1f} tokens/s; " + ratio_line("codegen2 int8 / bound", bound, rate["codegen2 int8"],
                                                             TARGET_BANDWIDTH))
        if theirs is not None and "float32" in models:
            infill_latency(models["float32"], theirs, tokenizer, repeats)


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
    parser.add_argument("--shapes", default="tiny,125m,1b", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per engine (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch and CTranslate2 threads (0: torch's default)")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8",
                        help="codegen2 weight formats (at 1b only int8 unless --big-float is given)")
    parser.add_argument("--decoders", default="", help="extra float32 columns for other decoders: model,fast,compiled")
    parser.add_argument("--no-ct2", action="store_true", help="leave CTranslate2 out")
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers out (always at 1b)")
    parser.add_argument("--big-float", action="store_true", help="at 1b, also float32/bfloat16 (needs ~12 GB)")
    args = parser.parse_args()
    parse_threads(args.threads)
    print(machine_line())
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth:.1f} GB/s (sum over 512 MB, {torch.get_num_threads()} thread(s))")
    for shape in args.shapes.split(","):
        dtypes = args.dtypes.split(",")
        if shape == "1b" and not args.big_float:
            dtypes = [d for d in dtypes if d == "int8"] or dtypes
        run_shape(shape, [int(b) for b in args.batches.split(",")], args.repeats, args.threads, not args.no_ct2,
                  dtypes, [d for d in args.decoders.split(",") if d], not args.no_transformers and shape != "1b",
                  bandwidth)


if __name__ == "__main__":
    main()
