"""Shared helpers for the side-by-side benchmarks: interleaved timing, summaries, machine facts and a
transformers `CodeGenForCausalLM` holding exactly the weights of a codegen2 model.

The machines these run on are shared and noisy, so every benchmark times the peer and codegen2 in the
same process, alternating run by run, and reports the median of several runs with the spread
(min..max); ratios are taken between medians.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from codegen2.config import PRESETS, ModelConfig  # noqa: E402
from codegen2.models import architecture  # noqa: E402

# Shapes the issues ask for: the `tiny` preset, CodeGen shapes of ~93M, ~125M (GPT-2 small) and 1B parameters,
# and today's code models at their presets' exact shapes (random weights).
FAMILY_SHAPES = ("qwen25-coder-0.5b", "qwen25-coder-1.5b", "starcoder2-3b")
SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, n_layer=4, n_embd=256, n_head=4, rotary_dim=32, n_ctx=512, mp_num=4),
    "93m": dict(vocab_size=32000, n_layer=10, n_embd=640, n_head=8, rotary_dim=32, n_ctx=2048, mp_num=4),
    "125m": dict(vocab_size=51200, n_layer=12, n_embd=768, n_head=12, rotary_dim=64, n_ctx=2048, mp_num=4),
    # CodeGen2-1B's shape (DESIGN §3), in transformers' 4-group qkv layout so the peers can load it.
    "1b": dict(vocab_size=51200, n_layer=16, n_embd=2048, n_head=16, rotary_dim=64, n_ctx=2048, mp_num=4),
    **{name: PRESETS[name]["model"] for name in FAMILY_SHAPES},
}


@dataclass
class Summary:
    """Median and spread of repeated timings (seconds) of one contender."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def rate(self, work: float) -> Rate:
        """Work per second (e.g. tokens/s): median and the range over runs."""
        return Rate(work / self.median, work / self.high, work / self.low)


@dataclass
class Rate:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{fmt(self.median)} ({fmt(self.low)}..{fmt(self.high)})"


def fmt(value: float) -> str:
    """Three significant digits, no exponent for the magnitudes these benchmarks produce."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Summary]:
    """Time each callable `repeats` times, alternating between them (and their order) every round.

    Alternation spreads the load of other processes over all contenders instead of penalising whichever
    happened to run during a busy spell.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Summary(times) for name, times in samples.items()}


def spread(summary: Summary) -> str:
    """Relative spread of the runs, (max - min) / median, as a percentage."""
    return f"±{100 * (summary.high - summary.low) / (2 * summary.median):.0f}%"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line naming the machine, thread count, load and library versions, for the results table."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        parts = [f"{torch.cuda.get_device_name(0)}"]
    parts.append(f"torch {torch.__version__}")
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    try:
        parts.append(f"load avg {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    return "; ".join(parts)


def ratio_line(label: str, peer: float, ours: float, target: float | None = None) -> str:
    """`label: ours / peer = 1.23x (target >= 1.15x: met)` for rates where higher is better."""
    value = ours / peer
    verdict = ""
    if target is not None:
        outcome = "met" if value >= target else f"missed by {100 * (1 - value / target):.0f}%"
        verdict = f" (target >= {target:g}x: {outcome})"
    return f"{label}: {value:.2f}x{verdict}"


def model_config(shape: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**SHAPES[shape], **overrides})


def build_ours(cfg: ModelConfig, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """A codegen2 model of `cfg`'s architecture with seeded random weights (the same in every process)."""
    torch.manual_seed(seed)
    return architecture(cfg).model_cls(cfg).to(device)


def hf_twin(model: torch.nn.Module, attn_implementation: str = "sdpa"):
    """transformers' model of `model`'s family holding its weights (see `family_twin`), or for CodeGen
    CodeGenForCausalLM with a copy of them (model must use mp_num 4).

    Falls back to eager attention if transformers refuses `attn_implementation`; the implementation
    actually used is `twin.config._attn_implementation`.
    """
    import transformers

    cfg = model.config
    if cfg.arch != "codegen":
        return family_twin(model, attn_implementation)
    if cfg.mp_num != 4:
        raise ValueError("transformers hard-codes mp_num=4; build the codegen2 model with mp_num=4")
    hf_config = transformers.CodeGenConfig(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_ctx=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, rotary_dim=cfg.rotary_dim, n_inner=cfg.n_inner, activation_function="gelu_new",
        layer_norm_epsilon=cfg.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    try:
        twin = transformers.CodeGenForCausalLM._from_config(hf_config, attn_implementation=attn_implementation)
    except (ValueError, ImportError) as exc:
        print(f"transformers refused attn_implementation={attn_implementation!r} ({exc}); using eager")
        twin = transformers.CodeGenForCausalLM._from_config(hf_config, attn_implementation="eager")
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith("embed_positions") for name in missing):
        raise RuntimeError(f"weights do not line up with transformers: missing {missing}, unexpected {unexpected}")
    return twin.to(next(model.parameters()).device)


def family_twin(model: torch.nn.Module, attn_implementation: str = "sdpa"):
    """transformers' own class for `model`'s family (Qwen2ForCausalLM, Starcoder2ForCausalLM, LlamaForCausalLM)
    from the config.json codegen2 exports, its parameters the very tensors of `model` (no second copy: the
    twin is built without storage, then given them), a tied head tied to the embedding as transformers does.
    """
    import transformers

    cfg = model.config
    mapping = architecture(cfg).hf
    raw = mapping.config_to_hf(cfg, 0, "float32")
    hf_config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    hf_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        twin = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    twin.to_empty(device="cpu")  # no pages touched: the weights below replace these tensors
    missing, unexpected = twin.load_state_dict(mapping.state_to_hf(model.state_dict(), cfg), strict=False,
                                               assign=True)
    if unexpected or any(name != "lm_head.weight" or not cfg.tie_word_embeddings for name in missing):
        raise RuntimeError(f"weights do not line up with transformers: missing {missing}, unexpected {unexpected}")
    twin.tie_weights()
    rotary = twin.model.rotary_emb  # its inv_freq is a buffer outside the state dict: build it afresh
    twin.model.rotary_emb = type(rotary)(config=twin.config)
    return twin.to(next(model.parameters()).device)


def parse_threads(value: int) -> None:
    """Apply a --threads setting (0 keeps torch's default) to both engines, which share this process."""
    if value > 0:
        torch.set_num_threads(value)


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """This machine's read bandwidth in GB/s: the best of `repeats` reads of a buffer far larger than cache.

    Two readers, the best of both: a sum (1 add per 4 bytes) and MKL's matrix-vector product over the same
    bytes viewed as [rows, 1024]. On the AVX-512 Xeon the one-thread sum tops out near 10 GB/s while the
    GEMV streams 14-15 GB/s (and CTranslate2's int8 decode was measured reading 13.6 GB/s, above the sum's
    figure), so the sum alone understated the bound. Uses torch's current thread count, like the engines
    measured next to it.
    """
    buffer = torch.ones(megabytes * 2**20 // 4)
    matrix, vector = buffer.view(-1, 1024), torch.ones(1024)
    readers = (buffer.sum, lambda: torch.mv(matrix, vector))
    best = float("inf")
    for read in readers:
        read()
    for _ in range(repeats):
        for read in readers:
            began = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - began)
    return buffer.numel() * 4 / best / 1e9


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written one tensor at a time (no second copy of a large model in memory)."""
    import json
    import struct

    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            data = tensor.detach().contiguous()
            handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()).cast("B"))
