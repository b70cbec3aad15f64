"""Checks every architecture passes, shared by test_llama.py and test_families.py.

`check_against_transformers` saves the transformers model to a directory, loads it through codegen2's loader
and checks, for one batch of token ids: the parameter count, the logits of the full forward, the KV cache fed
chunk by chunk, the fused decode step (eager) continuing a prefilled cache, and greedy tokens against
`generate`. `check_low_precision_decoding` checks that int8 and bf16 weights run the same in the forward
and in the fused decode step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from codegen2 import from_pretrained
from codegen2.config import ModelConfig
from codegen2.generation.decoder import FastDecoder
from codegen2.models import architecture, build_model
from codegen2.models.common import KVCache


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norm weights around 1, so activations keep their scale), eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3
            p.copy_(noise + (1.0 if name.endswith("layernorm.weight") else 0.0))
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def chunks(length: int) -> list[tuple[int, int]]:
    """Uneven pieces of [0, length): a prompt, a single token, a middle piece and the rest."""
    cuts = [0, length // 4 - 1, length // 4, length // 2 + 3, length]
    return list(zip(cuts[:-1], cuts[1:]))


def check_against_transformers(hf: torch.nn.Module, directory: Path, ids: torch.Tensor,
                               greedy_prompt: int = 12, greedy_tokens: int = 10) -> dict[str, float]:
    """Run every check of the module docstring; returns the measured max abs differences by name."""
    hf.save_pretrained(directory)
    ours = from_pretrained(directory, load_tokenizer=False)
    cfg = ours.config
    assert ours.num_parameters() == hf.num_parameters() == architecture(cfg).count_parameters(cfg)
    batch, length = ids.shape
    diffs = {}
    with torch.no_grad():
        full = ours(ids)
        diffs["logits"] = max_diff(full, hf(ids).logits)
        cache = KVCache(cfg, batch, length + 8)
        diffs["cache"] = max_diff(torch.cat([ours(ids[:, a:b], cache=cache) for a, b in chunks(length)], 1), full)
        cache = KVCache(cfg, batch, length + 8)
        start = length // 4
        ours(ids[:, :start], cache=cache)
        decoder = FastDecoder(ours, batch, length + 8)
        decoder.start(cache, torch.full((batch,), start))
        diffs["fast_step"] = max(max_diff(decoder.step(ids[:, t]), full[:, t]) for t in range(start, length))
        assert torch.equal(ours(ids), full)  # fusing re-points the weights; the forward is unchanged
    assert diffs["logits"] <= 1e-4 and diffs["cache"] <= 1e-5 and diffs["fast_step"] <= 1e-5, diffs
    prompt = ids[:2, :greedy_prompt]
    reference = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=greedy_tokens,
                            do_sample=False, pad_token_id=0)
    mine = prompt
    with torch.no_grad():
        for _ in range(greedy_tokens):
            mine = torch.cat([mine, ours(mine)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(mine, reference)
    return diffs


def check_low_precision_decoding(cfg: ModelConfig, ids: torch.Tensor, prefill: int = 8) -> None:
    """`quantize` swaps every Linear / Embedding: the forward and the fused step both run the swapped weights
    (int8, then bf16), each within a bf16-sized distance of the float32 forward and of each other."""
    from codegen2.int8 import Int8Linear, is_quantized, quantize_model

    batch, length = ids.shape
    for form in ("int8", "bf16"):
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():
            reference = model(ids)
        if form == "int8":
            quantize_model(model)
            assert is_quantized(model) and isinstance(model.model.layers[0].self_attn.k_proj, Int8Linear)
        else:
            model.to(torch.bfloat16)
        with torch.no_grad():
            full = model(ids)
            assert max_diff(full.float(), reference) < 0.03 * reference.abs().max()
            cache = KVCache(cfg, batch, length + 8, dtype=full.dtype)
            model(ids[:, :prefill], cache=cache)
            decoder = FastDecoder(model, batch, length + 8)
            decoder.start(cache, torch.full((batch,), prefill))
            for t in range(prefill, length):
                # bf16 rounds activations (and PyTorch's int8 kernel reads a bf16 copy): bf16-sized differences.
                step = decoder.step(ids[:, t])
                assert max_diff(step.float(), full[:, t].float()) <= 0.02 * full.abs().max().item(), (form, t)


def check_engine_matches_solo_runs(model: torch.nn.Module, tokenizer, decoder: str) -> None:
    """The server's continuous-batching engine: rows join at different steps, each ends as it would alone."""
    from codegen2.generation.sampling import SamplingParams, generate_ids
    from codegen2.serve.engine import BatchEngine, RowRequest

    engine = BatchEngine(model, tokenizer, max_batch_size=4, max_queue=16, decoder=decoder)
    specs = [RowRequest(tokenizer.encode("def g(x):\n" + "    y = x\n" * k), max_tokens=4 + 3 * k,
                        temperature=0.0 if k % 2 else 0.8, seed=k, stop_ids=(tokenizer.eot_id,)) for k in range(6)]
    results: dict[int, tuple[str, str]] = {}

    def sink_for(i):
        def sink(event):
            if event.finish_reason:
                results[i] = (event.text, event.finish_reason)
        return sink

    with torch.inference_mode():
        for step in range(500):
            if step < len(specs) * 2 and step % 2 == 0:
                engine.submit([specs[step // 2]], sink_for(step // 2))
            engine._step()
            if len(results) == len(specs):
                break
    for i, spec in enumerate(specs):
        params = SamplingParams(max_new_tokens=spec.max_tokens, temperature=spec.temperature)
        ref = generate_ids(model, tokenizer, [spec.prompt_ids], params, stop_ids=spec.stop_ids, seeds=[spec.seed])[0]
        assert results[i] == (ref.text, ref.finish_reason), i
    assert sum(len(text) for text, _ in results.values()) > 20  # real text, not empty rows
