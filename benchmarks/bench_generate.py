"""Greedy generation speed: codegen2 (float32, bfloat16, int8 formats) against CTranslate2 and transformers.

For each shape and batch size: 64-token prompts (random ids, seeded), then exactly 128 new tokens
(no early stop) in every engine, on the CPU. Contenders, all on the same weights:
- `codegen2 <dtype>`: `generate_ids` with the default decoder on the model loaded in that weight format
  (`--decoders model,fast,compiled` adds columns for the other decoders, float32 only); `int8` is
  weight-only, `int8-dynamic` the same weights with activations rounded to int8 per row;
- `ctranslate2 float32` / `ctranslate2 int8`: CTranslate2 (if installed) on the same weights converted by its
  own converter, compute type float32 and int8 (its int8: int8 weights and int8 activations; the peer of
  both codegen2 int8 formats);
- `transformers`: `generate` of the family's own class on the same tensors (`CodeGenForCausalLM`,
  `Qwen2ForCausalLM`, `Starcoder2ForCausalLM`; float32; left out at 1b, `--no-transformers`).
CTranslate2 converts CodeGen and Qwen2, not StarCoder2 (its converter has no loader for it: the run says so).
Shapes: `tiny`, CodeGen `93m`, `125m` and `1b`, and the presets `qwen25-coder-0.5b`, `qwen25-coder-1.5b` and
`starcoder2-3b` (random weights of their exact shapes).
The greedy tokens of every engine are compared with a reference (codegen2 float32, else codegen2 int8); on
random weights the logits are nearly tied, so bf16/int8 agreement here says little (docs/inference.md
measures it on a trained model). Runs alternate between engines; the table gives the median new tokens/s,
the range over runs and the ratios of medians against the peers of the same weight format.

The machine's read bandwidth is measured before the first shape and after the last (the best of several
1 GiB reads, sums and MKL GEMVs, more than this CPU's last-level cache, same thread count) and printed
with the load average; for batch 1 each int8 rate is compared with its bound, bandwidth / bytes read per
token (int8 weights and scales, norms, biases and the KV cache at the mean generated length), using the
best bandwidth measured.
The run ends with one table of the int8 targets: each ratio with "met" or "missed by X%".

Also timed: one typical infill request (CodeGen2 format: 96-token prefix, <mask_1>, 32-token suffix,
<|endoftext|> <sep> <mask_1>, then up to 24 tokens), as request latency in milliseconds.

    python benchmarks/bench_generate.py --threads 1                    # tiny, 125m, 1b; batch 1 and 8
    python benchmarks/bench_generate.py --shapes tiny --batches 1 --repeats 7 --threads 1
    python benchmarks/bench_generate.py --int8-targets --threads 1     # only what the int8 targets need
    python benchmarks/bench_generate.py --shapes qwen25-coder-0.5b --dtypes float32 --threads 1
    python benchmarks/bench_generate.py --shapes 93m,125m --dtypes int8-dynamic --no-transformers --threads 1 \
        --python-op-peer     # the int8 matmuls through the C++ op against the Python op, in one run
    python benchmarks/bench_generate.py --shapes starcoder2-3b --dtypes float32 --threads 1 --engine-per-process \
        --engines codegen2,transformers --new-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.int8 import quantize_model, use_int8_format
from codegen2.kernels import int8 as kernels
from codegen2.options import DEFAULT_DECODER
from common import (
    SHAPES,
    Summary,
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
TARGET_VS_TRANSFORMERS = 3.0  # CodeGen shapes; issue 22's family shapes: FAMILY_VS_TRANSFORMERS by batch
FAMILY_VS_TRANSFORMERS = {1: 1.3, 8: 1.5}
TARGET_VS_CT2 = 1.0
TARGET_BANDWIDTH = 0.80  # 1b batch-1 int8 decoding, fraction of the bandwidth bound (issue 25)
CT2_MODEL_TYPES = ("codegen", "llama", "qwen2")  # model types CTranslate2's converter loads (not starcoder2)
CT2_TYPES = {"float32": "float32", "int8": "int8", "int8-dynamic": "int8"}  # codegen2 dtype -> its CTranslate2 peer
INT8_FORMATS = ("int8", "int8-dynamic")
ENGINES = ("codegen2", "transformers", "ctranslate2")
INT8_TARGET_SHAPES = ("93m", "125m", "1b", "qwen25-coder-0.5b")
TARGET_WEIGHT_ONLY = 0.8  # weight-only int8 at batch 8, against int8-dynamic (issue 25)
BANDWIDTH_MIB = 1024  # the probe's buffer: well above the 260 MiB L3 of the Xeon these runs use


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
    """`model`'s weights as a transformers directory of its family (streamed, so a 1B model is not held twice)."""
    import transformers
    from tokenizers import Tokenizer, models

    from codegen2.models import architecture

    directory.mkdir(parents=True, exist_ok=True)
    mapping = architecture(model.config).hf
    config = mapping.config_to_hf(model.config, 0, "float32")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(mapping.state_to_hf(model.state_dict(), model.config), directory / "model.safetensors")
    # CTranslate2 reads its vocabulary from a tokenizer: one made-up token string per id, the last named as the
    # end of text transformers' Qwen2Tokenizer would otherwise add as one more token (prompts never use it).
    vocab = {f"t{i}": i for i in range(model.config.vocab_size - 1)} | {"<|endoftext|>": model.config.vocab_size - 1}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), bos_token="t0", eos_token="t0",
        unk_token="t0")
    tokenizer.save_pretrained(directory)
    return directory


def ct2_generators(hf_dir: Path, dtypes: list[str], threads: int, workdir: Path) -> dict[str, object]:
    """CTranslate2 generators (by compute type) for the weights in `hf_dir`, converted by its own converter."""
    try:
        import ctranslate2
    except ImportError:
        return {}
    model_type = json.loads((hf_dir / "config.json").read_text())["model_type"]
    if model_type not in CT2_MODEL_TYPES:
        print(f"CTranslate2 columns skipped: CTranslate2 {ctranslate2.__version__}'s converter has no loader for "
              f"{model_type!r} models")
        return {}
    out = {}
    for compute_type in dict.fromkeys(CT2_TYPES[d] for d in dtypes if d in CT2_TYPES):
        target = workdir / f"ct2-{compute_type}"
        ctranslate2.converters.TransformersConverter(str(hf_dir), low_cpu_mem_usage=True).convert(
            str(target), quantization=compute_type)
        out[compute_type] = ctranslate2.Generator(str(target), device="cpu", compute_type=compute_type,
                                                  intra_threads=threads or torch.get_num_threads())
    return out


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers a decode step reads (the embedding reads one row per token: left out)."""
    if getattr(model.config, "tie_word_embeddings", False):  # the head reads the whole table every token
        embedding = set()
    else:
        table = model.transformer.wte if model.config.arch == "codegen" else model.model.embed_tokens
        embedding = {t.data_ptr() for t in table.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if t.data_ptr() not in embedding)


def kv_bytes(cfg, batch: int, new_tokens: int, dtype_bytes: int = 4) -> int:
    """Mean bytes of cached keys and values read per step over the generation (prompt + half the new tokens)."""
    return 2 * cfg.n_layer * batch * (PROMPT_TOKENS + new_tokens // 2) * cfg.kv_heads * cfg.head_dim * dtype_bytes


def build_formats(ours, dtypes: list[str]) -> dict[str, object]:
    """The model in each weight format requested (float32 last, so the others are copies of it)."""
    models = {}
    if "bfloat16" in dtypes:
        models["bfloat16"] = copy.deepcopy(ours).to(torch.bfloat16).use_decode_layout()
    int8_formats = [d for d in dtypes if d in INT8_FORMATS]
    if int8_formats:  # quantized once; the other int8 format is a copy of the int8 model (1 byte per weight)
        keep_float = "float32" in dtypes or "bfloat16" in dtypes
        quantized = quantize_model(copy.deepcopy(ours) if keep_float else ours, fmt=int8_formats[0])
        for name in int8_formats:
            models[name] = quantized if name == int8_formats[0] else use_int8_format(copy.deepcopy(quantized), name)
    if "float32" in dtypes:
        models["float32"] = ours.use_decode_layout()
    return {d: models[d] for d in dtypes}


def run_shape(shape: str, args: argparse.Namespace, dtypes: list[str], use_transformers: bool, bandwidth: float,
              targets: list[dict], record: list[dict]) -> None:
    """Time the engines of `args.engines` on `shape`; the int8 rates and their peers are appended to `targets`,
    each batch's samples and tokens to `record`."""
    cfg = model_config(shape, **({"n_layer": args.layers} if args.layers else {}))
    ours = build_ours(cfg).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    tokenizer = IdTokenizer(cfg.vocab_size)
    engines = args.engines.split(",")
    cut = f" cut to {args.layers} layers" if args.layers else ""
    print(f"\n== {shape}{cut}: {n_params / 1e6:.1f}M parameters, {PROMPT_TOKENS} prompt tokens + {args.new_tokens} new "
          f"tokens, greedy; weight formats {', '.join(dtypes)}; default decoder {DEFAULT_DECODER!r}; "
          f"engines {', '.join(engines)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = hf_twin(ours).eval() if use_transformers and "transformers" in engines else None
        ct2 = {}
        if not args.no_ct2 and "ctranslate2" in engines:
            ct2 = ct2_generators(write_hf_directory(ours, Path(tmp) / "hf"), dtypes, args.threads, Path(tmp))
        models = build_formats(ours, dtypes) if "codegen2" in engines else {}
        del ours
        for batch in [int(b) for b in args.batches.split(",")]:
            generator = torch.Generator().manual_seed(batch)
            prompts = torch.randint(0, cfg.vocab_size - 4, (batch, PROMPT_TOKENS), generator=generator)
            contenders = make_contenders(prompts, theirs, ct2, models, args, tokenizer)
            tokens = first_runs(contenders, batch)
            results = interleaved(contenders, repeats=args.repeats, warmup=0)
            record.append({"batch": batch, "samples": {n: s.samples for n, s in results.items()}, "tokens": tokens})
            report_batch(shape, cfg, batch, results, tokens, args.new_tokens, models, bandwidth, targets)
        if theirs is not None and "float32" in models and cfg.arch == "codegen":  # CodeGen2's infill format
            infill_latency(models["float32"], theirs, tokenizer, args.repeats)


def make_contenders(prompts: torch.Tensor, theirs, ct2: dict, models: dict, args: argparse.Namespace,
                    tokenizer: IdTokenizer) -> dict:
    """name -> a function generating exactly `args.new_tokens` greedy tokens per prompt row with that engine."""
    new_tokens = args.new_tokens
    contenders = {}
    if theirs is not None:
        def run_transformers() -> list[list[int]]:
            with torch.inference_mode():
                out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            return out[:, PROMPT_TOKENS:].tolist()

        contenders["transformers"] = run_transformers
    start_tokens = [[f"t{i}" for i in row] for row in prompts.tolist()]
    for compute_type, generator_ct2 in ct2.items():
        def run_ct2(g=generator_ct2) -> list[list[int]]:
            results = g.generate_batch(start_tokens, max_length=new_tokens, min_length=new_tokens,
                                       beam_size=1, include_prompt_in_result=False, end_token=[])
            return [r.sequences_ids[0] for r in results]

        contenders[f"ctranslate2 {compute_type}"] = run_ct2
    params = SamplingParams(max_new_tokens=new_tokens)
    decoders = [d for d in args.decoders.split(",") if d and d != DEFAULT_DECODER]
    for dtype, model in models.items():
        for decoder in [DEFAULT_DECODER] + (decoders if dtype == "float32" else []):
            def run_ours(m=model, decoder=decoder) -> list[list[int]]:
                return [c.token_ids for c in generate_ids(m, tokenizer, prompts.tolist(), params,
                                                          stop_ids=(), decoder=decoder)]

            contenders[f"codegen2 {dtype}" + ("" if decoder == DEFAULT_DECODER else f" {decoder}")] = run_ours
    for dtype in [d for d in INT8_FORMATS if d in models and args.python_op_peer]:
        contenders[f"codegen2 {dtype} python-op"] = with_python_op(contenders[f"codegen2 {dtype}"])
    return contenders


def with_python_op(run):
    """`run` with the int8 matmuls through the Python op `codegen2::int8_matmul` (and the compiled step's Python
    wrapper), as before the C++ op: an A/B of the two in one process (each has its own compiled graph)."""
    def wrapped() -> list[list[int]]:
        saved = os.environ.get("CODEGEN2_INT8_OP")
        os.environ["CODEGEN2_INT8_OP"] = "python"
        kernels.reset()
        try:
            return run()
        finally:
            if saved is None:
                os.environ.pop("CODEGEN2_INT8_OP")
            else:
                os.environ["CODEGEN2_INT8_OP"] = saved
            kernels.reset()
            kernels.prepare_compiled_op()  # the other contenders' prompts through the C++ op again

    return wrapped


def first_runs(contenders: dict, batch: int) -> dict[str, list[list[int]]]:
    """Each engine's first generation (where a decoder compiles, it compiles here): its tokens, by name."""
    tokens = {}
    for name, run in contenders.items():
        began = time.perf_counter()
        tokens[name] = run()
        if name.startswith("codegen2"):
            print(f"-- batch {batch}: {name}: first generation (compile included) "
                  f"{time.perf_counter() - began:.1f} s", flush=True)
    return tokens


def report_batch(shape: str, cfg, batch: int, results: dict[str, Summary], tokens: dict[str, list[list[int]]],
                 new_tokens: int, models: dict, bandwidth: float, targets: list[dict]) -> None:
    """The table of one batch size: token agreement, rates, ratios against the peers and the int8 bound."""
    reference_name = next((n for n in ("codegen2 float32", *(f"codegen2 {d}" for d in INT8_FORMATS)) if n in tokens),
                          next(iter(tokens)))
    reference = tokens[reference_name]
    same = {name: sum(a == b for x, y in zip(reference, got) for a, b in zip(x, y)) for name, got in tokens.items()}
    agreement = [f"{name} {100 * n / (batch * new_tokens):.0f}%" for name, n in same.items() if name != reference_name]
    work = batch * new_tokens
    print(f"-- batch {batch}: greedy tokens equal to {reference_name}'s: {', '.join(agreement) or '-'}")
    print(f"{'engine':<28}{'new tokens/s median (range)':>32}{'spread':>9}{'ms/step':>9}")
    for name, summary in results.items():
        print(f"{name:<28}{str(summary.rate(work)):>32}{spread(summary):>9}{1e3 * summary.median / new_tokens:>9.2f}")
    rate = {name: summary.rate(work).median for name, summary in results.items()}
    for name in [n for n in results if n.startswith("codegen2")]:
        if name.endswith(" python-op"):  # the A/B of --python-op-peer
            print(ratio_line(f"{name.removesuffix(' python-op')} / {name}", rate[name],
                             rate[name.removesuffix(" python-op")]))
            continue
        dtype = name.split()[1]
        if "transformers" in rate and dtype == "float32":
            target = FAMILY_VS_TRANSFORMERS.get(batch) if cfg.arch != "codegen" else TARGET_VS_TRANSFORMERS
            print(ratio_line(f"{name} / transformers", rate["transformers"], rate[name], target))
        peer = f"ctranslate2 {CT2_TYPES[dtype]}" if dtype in CT2_TYPES else None  # bf16: no CPU peer
        if peer in rate:
            print(ratio_line(f"{name} / {peer}", rate[peer], rate[name], TARGET_VS_CT2))
            if dtype in INT8_FORMATS and shape in INT8_TARGET_SHAPES:
                targets.append({"what": f"{shape} batch {batch}: codegen2 {dtype} / {peer}",
                                "ours": rate[name], "peer": rate[peer], "target": TARGET_VS_CT2})
    if batch > 1 and all(f"codegen2 {d}" in rate for d in INT8_FORMATS):
        weight_only, dynamic = rate["codegen2 int8"], rate["codegen2 int8-dynamic"]
        print(ratio_line("codegen2 int8 / codegen2 int8-dynamic", dynamic, weight_only, TARGET_WEIGHT_ONLY))
        targets.append({"what": f"{shape} batch {batch}: codegen2 int8 / codegen2 int8-dynamic",
                        "ours": weight_only, "peer": dynamic, "target": TARGET_WEIGHT_ONLY})
    for int8_name in [d for d in INT8_FORMATS if f"codegen2 {d}" in rate and batch == 1 and d in models]:
        per_token = weight_bytes(models[int8_name]) + kv_bytes(cfg, batch, new_tokens)
        bound = bandwidth * 1e9 / per_token
        ours = rate[f"codegen2 {int8_name}"]
        print(f"bandwidth bound, {int8_name} batch 1: {per_token / 1e6:.0f} MB per token / "
              f"{bandwidth:.1f} GB/s = {bound:.1f} tokens/s; "
              + ratio_line(f"codegen2 {int8_name} / bound", bound, ours, TARGET_BANDWIDTH))
        if shape == "1b":
            targets.append({"what": f"1b batch 1: codegen2 {int8_name} / bandwidth bound", "ours": ours,
                            "bytes_per_token": per_token, "target": TARGET_BANDWIDTH})
    sys.stdout.flush()


def run_engines_apart(shape: str, args: argparse.Namespace, bandwidth: float, targets: list[dict]) -> None:
    """`shape` with each engine in its own process, one after another (a model too big to hold twice: a 3B
    float32 model is 12 GB), on the same seeded weights and prompts; then one table from their samples."""
    cfg = model_config(shape, **({"n_layer": args.layers} if args.layers else {}))
    merged: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            out = Path(tmp) / f"{engine}.json"
            argv = [a for a in sys.argv[1:] if a != "--engine-per-process"]
            subprocess.run([sys.executable, __file__, *argv, "--shapes", shape, "--engines", engine,
                            "--json-out", str(out)], check=True)
            for batch_record in json.loads(out.read_text()):
                entry = merged.setdefault(batch_record["batch"], {"samples": {}, "tokens": {}})
                entry["samples"].update(batch_record["samples"])
                entry["tokens"].update(batch_record["tokens"])
    print(f"\n== {shape}, one process per engine ({args.engines}), run one after another:")
    for batch, entry in sorted(merged.items()):
        results = {name: Summary(samples) for name, samples in entry["samples"].items()}
        report_batch(shape, cfg, batch, results, entry["tokens"], args.new_tokens, {}, bandwidth, targets)


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
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per engine (median reported; "
                        "default 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch and CTranslate2 threads (0: torch's default)")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8,int8-dynamic",
                        help="codegen2 weight formats (at 1b only the int8 ones unless --big-float is given)")
    parser.add_argument("--decoders", default="", help="extra float32 columns for other decoders: model,fast,compiled")
    parser.add_argument("--no-ct2", action="store_true", help="leave CTranslate2 out")
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers out (always at 1b)")
    parser.add_argument("--big-float", action="store_true", help="at 1b, also float32/bfloat16 (needs ~12 GB)")
    parser.add_argument("--int8-targets", action="store_true",
                        help="only the int8 targets: shapes 93m,125m,1b,qwen25-coder-0.5b, formats int8,int8-dynamic, "
                             "CTranslate2 int8, "
                             "no transformers, repeats 3 (unless given)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="new tokens per row (default 128)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from " + ", ".join(ENGINES))
    parser.add_argument("--engine-per-process", action="store_true",
                        help="run each engine in its own process, one after another (for starcoder2-3b's 12 GB)")
    parser.add_argument("--layers", type=int, default=0,
                        help="cut every shape to this many layers (same widths, head and embedding): a quicker proxy")
    parser.add_argument("--python-op-peer", action="store_true",
                        help="also each int8 format through the Python op (before the C++ op), in the same run")
    parser.add_argument("--json-out", help=argparse.SUPPRESS)  # a child of --engine-per-process writes its samples
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.int8_targets else 5)
    if args.int8_targets:
        args.shapes, args.dtypes, args.no_transformers = ",".join(INT8_TARGET_SHAPES), ",".join(INT8_FORMATS), True
    parse_threads(args.threads)
    print(machine_line())
    began = time.perf_counter()
    child = args.json_out is not None
    bandwidths = [0.0 if child else probe_bandwidth("before the first shape")]
    targets: list[dict] = []
    record: list[dict] = []
    for shape in args.shapes.split(","):
        dtypes = args.dtypes.split(",")
        if shape == "1b" and not args.big_float:
            dtypes = [d for d in dtypes if d in INT8_FORMATS] or dtypes
        if args.engine_per_process:
            run_engines_apart(shape, args, max(bandwidths), targets)
        else:
            run_shape(shape, args, dtypes, not args.no_transformers and shape != "1b", max(bandwidths), targets,
                      record)
    if child:
        Path(args.json_out).write_text(json.dumps(record))
        return
    bandwidths.append(probe_bandwidth("after the last shape"))
    print_targets(targets, max(bandwidths))
    print(f"\nwhole run: {(time.perf_counter() - began) / 60:.1f} min")


def probe_bandwidth(when: str) -> float:
    """The read bandwidth now (best of several 1 GiB reads), printed with the load average it was measured at."""
    bandwidth = read_bandwidth(megabytes=BANDWIDTH_MIB, repeats=7)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"read bandwidth {when}: {bandwidth:.1f} GB/s (best of 7 sums and 7 MKL GEMVs over {BANDWIDTH_MIB} MiB, "
          f"{torch.get_num_threads()} thread(s); load average {load})", flush=True)
    return bandwidth


def print_targets(targets: list[dict], bandwidth: float) -> None:
    """Every int8 target measured in this run, with its ratio and verdict (bandwidth: the best probe)."""
    if not targets:
        return
    print(f"\n== int8 targets (CTranslate2 int8 quantizes activations too; bandwidth bound at {bandwidth:.1f} GB/s, "
          f"the best probe of this run)")
    for t in targets:
        if "peer" in t:
            line = ratio_line(t["what"], t["peer"], t["ours"], t["target"])
            print(f"{line}   [{t['ours']:.1f} vs {t['peer']:.1f} tokens/s]")
        else:
            bound = bandwidth * 1e9 / t["bytes_per_token"]
            line = ratio_line(t["what"], bound, t["ours"], t["target"])
            print(f"{line}   [{t['ours']:.1f} tokens/s, bound {bound:.1f} = {bandwidth:.1f} GB/s / "
                  f"{t['bytes_per_token'] / 1e6:.0f} MB per token]")


if __name__ == "__main__":
    main()
