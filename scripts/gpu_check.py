"""The sections of scripts/gpu_check.sh: one training step benchmark or one decoding comparison per call.

    train  --arch A   a training step under FSDP2 (run under torchrun), bf16, per-block torch.compile and
                      activation checkpointing, synthetic tokens: tokens/s, MFU, peak memory. codegen and llama
                      are 1B-shaped (width 2048, 16 layers); qwen2 is Qwen2.5-Coder-0.5B's shape (tied
                      embeddings, vocabulary 151,936); starcoder2 is StarCoder2-3B's layer in 8 layers, with a
                      1024-token window (shorter than the 2048-token step) and its published dropouts.
    decode --arch A   the 1B shape in bf16: codegen2's generate_ids (compiled fused decoder) against
                      transformers' generate on the same weights, greedy, batch 1 and 32: tokens/s and ratio.
    lora              LoRA (rank 16, every linear layer of the blocks) at codegen25-7b's shape on one GPU: a bf16
                      base of random weights built on the meta device and materialised on the GPU in bf16, fp32
                      adapters, activation checkpointing, one sequence of 2048 tokens: peak memory (target 20 GiB).

`--cpu-smoke` runs the same code on the CPU with tiny shapes, fp32 and the eager fused decoder, so the
script can be checked on a machine without a GPU. Each call appends one JSON line per result to
`--results` and prints it; an architecture that is not registered is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from codegen2.config import Config, ModelConfig
from codegen2.data.loader import Batch
from codegen2.generation.sampling import SamplingParams, generate_ids
from codegen2.metrics import device_peak_flops, flops_per_token
from codegen2.models import ARCHITECTURES, architecture, build_model

# 1B-shaped (CodeGen2-1B's width and depth); LLaMA gets a SwiGLU MLP of about the same parameter count.
SHAPES = {
    "codegen": dict(vocab_size=51200, n_layer=16, n_embd=2048, n_head=16, rotary_dim=64, n_ctx=2048, mp_num=4),
    "llama": dict(arch="llama", vocab_size=51200, n_layer=16, n_embd=2048, n_head=16, rotary_dim=128, n_ctx=2048,
                  n_inner=5632, layer_norm_eps=1e-6),
    # The qwen25-coder-0.5b preset (0.49B parameters).
    "qwen2": dict(arch="qwen2", vocab_size=151936, n_layer=24, n_embd=896, n_head=14, n_kv_head=2, n_inner=4864,
                  rotary_dim=64, n_ctx=2048, layer_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    # starcoder2-3b's layer (0.92B parameters in 8 layers), a window that bites within the step, dropouts 0.1.
    "starcoder2": dict(arch="starcoder2", vocab_size=49152, n_layer=8, n_embd=3072, n_head=24, n_kv_head=2,
                       n_inner=12288, rotary_dim=128, n_ctx=2048, rope_theta=1e6, tie_word_embeddings=True,
                       sliding_window=1024, embedding_dropout=0.1, residual_dropout=0.1, attention_dropout=0.1),
}
SMOKE = dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_ctx=256)
SMOKE_WINDOW = 24  # starcoder2's window under --cpu-smoke: shorter than its 64-token step
LORA_PRESET = "codegen25-7b"
LORA_TARGET_GIB = 20.0


def model_config(arch: str, smoke: bool) -> ModelConfig:
    shape = dict(SHAPES[arch])
    if smoke:
        shape.update(SMOKE, rotary_dim=8 if arch == "codegen" else 16, n_inner=None if arch == "codegen" else 176)
        if arch == "starcoder2":
            shape["sliding_window"] = SMOKE_WINDOW
    return ModelConfig(**shape)


def report(results: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def synthetic_batch(cfg: ModelConfig, batch: int, seq_len: int, generator: torch.Generator) -> Batch:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=generator)
    zeros = torch.zeros(batch, dtype=torch.int64)
    return Batch(input_ids=ids[:, :-1], labels=ids[:, 1:], doc_ids=torch.zeros(batch, seq_len, dtype=torch.int64),
                 prefix_len=zeros, objective=zeros, sample_index=torch.arange(batch))


def train_section(args) -> dict:
    from codegen2.distributed import init_distributed, shutdown
    from codegen2.train import StepSettings, _autocast, build_optimizer, build_training_model, train_step

    smoke = args.cpu_smoke
    env = init_distributed("cpu" if smoke else "cuda")
    try:
        config = Config(model=model_config(args.arch, smoke))
        t = config.train
        t.seq_len, t.micro_batch_size = (64, 2) if smoke else (2048, args.micro_batch)
        t.compile, t.activation_checkpointing = not smoke or args.compile, True
        t.precision = "fp32" if smoke else "bf16"
        parallel = "fsdp" if env.distributed else "none"
        autocast, bf16 = _autocast(env.device, t.precision)
        model = build_training_model(config, env, parallel, bf16=bf16 and parallel == "fsdp")
        optimizer = build_optimizer(model, t)
        settings = StepSettings(device=env.device, world_size=env.world_size, parallel=parallel, autocast=autocast,
                                grad_clip=1.0)
        generator = torch.Generator().manual_seed(env.rank)
        batch = synthetic_batch(config.model, t.micro_batch_size, t.seq_len, generator)
        targets = torch.tensor(float(batch.labels.numel() * env.world_size), device=env.device)

        def step() -> float:
            _, loss_sum, _ = train_step(model, optimizer, [batch], targets, settings)
            return float(loss_sum.sum() / batch.labels.numel())  # reads back: the step has finished

        started = time.perf_counter()
        first_loss = step()
        warmup_s = time.perf_counter() - started
        step()
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        started = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        elapsed = time.perf_counter() - started
        tokens_per_s = args.steps * t.micro_batch_size * t.seq_len * env.world_size / elapsed
        peak, peak_source = device_peak_flops(env.device)
        mfu = tokens_per_s * flops_per_token(config.model, t.seq_len) / (peak * env.world_size) if peak else 0.0
        record = {"section": f"train {args.arch}", "device": device_name(env.device), "parallel": parallel,
                  "precision": t.precision, "compile": t.compile, "activation_checkpointing": True,
                  "parameters": architecture(config.model).count_parameters(config.model),
                  "batch": f"{t.micro_batch_size} x {t.seq_len}", "first_step_s": round(warmup_s, 1),
                  "first_loss": round(first_loss, 4), "last_loss": round(loss, 4),
                  "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 4), "peak_source": peak_source}
        if env.device.type == "cuda":
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(env.device) / 2**30, 2)
        return record if env.is_main else {}
    finally:
        shutdown(env)


def lora_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    """Random weights built on the meta device and materialised on `device` directly in `dtype` (a 7B base in
    fp32 would need 27 GB before the cast), then frozen with fp32 LoRA adapters (rank 16, every block linear)."""
    from codegen2.lora import LoraSettings
    from codegen2.train import attach_adapters

    with torch.device("meta"):
        model = build_model(cfg)
    model.to(dtype).to_empty(device=device)
    architecture(cfg).init_weights(model, generator)
    attach_adapters(model, LoraSettings(), base_bf16=dtype == torch.bfloat16, generator=generator)
    model.activation_checkpointing = True
    return model


def lora_section(args) -> dict:
    from codegen2.config import load_config
    from codegen2.train import StepSettings, _autocast, build_optimizer, train_step

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    config = load_config(preset=LORA_PRESET)
    if smoke:
        config.model = model_config("llama", smoke=True)
    t = config.train
    t.seq_len, t.micro_batch_size = (64, 1) if smoke else (2048, 1)
    autocast, bf16 = _autocast(device, "fp32" if smoke else "bf16")
    generator = torch.Generator(device=device).manual_seed(0)
    model = lora_model(config.model, device, torch.bfloat16 if bf16 else torch.float32, generator)
    optimizer = build_optimizer(model, t)
    settings = StepSettings(device=device, autocast=autocast, grad_clip=1.0)
    batch = synthetic_batch(config.model, t.micro_batch_size, t.seq_len, torch.Generator().manual_seed(0))
    targets = torch.tensor(float(batch.labels.numel()), device=device)
    losses, times = [], []
    for _ in range(args.steps):
        started = time.perf_counter()
        _, loss_sum, _ = train_step(model, optimizer, [batch], targets, settings)
        losses.append(float(loss_sum.sum() / batch.labels.numel()))  # reads back: the step has finished
        times.append(time.perf_counter() - started)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record = {"section": f"lora {LORA_PRESET}", "device": device_name(device), "base_dtype": "bfloat16" if bf16
              else "float32", "activation_checkpointing": True, "lora_rank": 16, "trained_parameters": trained,
              "parameters": sum(p.numel() for p in model.parameters()),
              "batch": f"{t.micro_batch_size} x {t.seq_len}", "first_step_s": round(times[0], 1),
              "step_s": round(min(times[1:] or times), 2), "first_loss": round(losses[0], 4),
              "last_loss": round(losses[-1], 4)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        record.update(peak_mem_gib=round(peak, 2), target_gib=LORA_TARGET_GIB, within_target=peak <= LORA_TARGET_GIB,
                      peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 2))
    return record


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def hf_twin(model: torch.nn.Module):
    """transformers' own model class for this architecture, holding `model`'s weights (via its HF mapping)."""
    import transformers

    cfg = model.config
    mapping = architecture(cfg).hf
    dtype = next(model.parameters()).dtype
    hf_config = dict(mapping.config_to_hf(cfg, 0, str(dtype).removeprefix("torch.")))
    model_type = hf_config.pop("model_type")
    hf_config.pop("architectures", None)
    config = transformers.AutoConfig.for_model(model_type, **hf_config)
    twin = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = mapping.state_to_hf({k: v.detach().contiguous() for k, v in model.state_dict().items()}, cfg)
    missing, unexpected = twin.load_state_dict(state, strict=False)
    if unexpected or any("embed_positions" not in name and "rotary" not in name for name in missing):
        raise RuntimeError(f"weights do not line up with transformers: missing {missing}, unexpected {unexpected}")
    return twin.to(device=next(model.parameters()).device, dtype=dtype).eval()


class IdTokenizer:
    """What generate_ids reads from a tokenizer when prompts are token ids and nothing stops early."""

    def __init__(self, vocab_size: int):
        self.eot_id = vocab_size - 1

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, out


def decode_section(args) -> list[dict]:
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = model_config(args.arch, smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg)
    model = model.to(dtype).eval()
    twin = hf_twin(model)
    prompt_len, new_tokens = (16, 16) if smoke else (128, 64)
    decoder = "fast" if smoke and not args.compile else "compiled"
    records = []
    for batch in (1, 4) if smoke else (1, 32):
        prompts = torch.randint(0, cfg.vocab_size - 1, (batch, prompt_len), generator=torch.Generator().manual_seed(7))
        record = compare_decoding(model, twin, prompts, new_tokens, decoder, args.repeats)
        records.append({"section": f"decode {args.arch}", "device": device_name(device), "dtype": str(dtype)[6:],
                        "decoder": decoder, "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                        **record})
    return records


def compare_decoding(model, twin, prompts: torch.Tensor, new_tokens: int, decoder: str, repeats: int) -> dict:
    """Greedy generation of `new_tokens` after `prompts` [B, P] by both engines: best-of-`repeats` tokens/s."""
    device = next(model.parameters()).device
    tokenizer = IdTokenizer(model.config.vocab_size)
    params = SamplingParams(max_new_tokens=new_tokens)
    batch, prompt_len = prompts.shape

    def ours():
        return [c.token_ids for c in generate_ids(model, tokenizer, prompts.tolist(), params, decoder=decoder)]

    def theirs():
        with torch.inference_mode():
            ids = prompts.to(device)
            out = twin.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.eot_id)
        return out[:, prompt_len:].tolist()

    first_ours, _ = timed(ours, device)  # compiles the decode step for this shape
    timed(theirs, device)
    ours_s, ours_ids = min((timed(ours, device) for _ in range(repeats)), key=lambda r: r[0])
    theirs_s, theirs_ids = min((timed(theirs, device) for _ in range(repeats)), key=lambda r: r[0])
    ours_rate, theirs_rate = batch * new_tokens / ours_s, batch * new_tokens / theirs_s
    return {"first_call_s": round(first_ours, 1), "codegen2_tokens_per_s": round(ours_rate, 1),
            "transformers_tokens_per_s": round(theirs_rate, 1), "ratio": round(ours_rate / theirs_rate, 3),
            "rows_with_identical_greedy_tokens": sum(a == b for a, b in zip(ours_ids, theirs_ids)) / batch}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["train", "decode", "lora"])
    parser.add_argument("--arch", default="llama", help="architecture (lora: always codegen25-7b's, a llama)")
    parser.add_argument("--results", type=Path, required=True, help="JSON-lines file to append results to")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the script itself)")
    parser.add_argument("--compile", action="store_true", help="with --cpu-smoke: also compile (slower)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (lora: steps in all)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences of 2048 tokens per training step")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per engine (best kept)")
    args = parser.parse_args()
    if args.arch not in ARCHITECTURES:
        report(args.results, {"section": f"{args.section} {args.arch}", "skipped": f"architecture {args.arch!r} is "
                              f"not registered (have: {', '.join(ARCHITECTURES)})"})
        return 0
    if args.section == "train":
        record = train_section(args)
        if record:
            report(args.results, record)
    elif args.section == "lora":
        report(args.results, lora_section(args))
    else:
        for record in decode_section(args):
            report(args.results, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
