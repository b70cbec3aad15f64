"""Throughput accounting (FLOPs per token, the device's peak, MFU) and training memory planning.

FLOPs per trained token (forward + backward, PaLM appendix B):

    6 * N  +  12 * n_layer * n_embd * seq_len

N counts the weights of every matrix multiplication (`Architecture.matmul_parameters`: for CodeGen qkv_proj,
out_proj, fc_in, fc_out of each layer and lm_head; the token embedding is a lookup; biases and norms cost
O(N / n_embd) and are left out). Each such weight costs 2 FLOPs per token forward and 4 backward. The
second term is attention's two products, q.k over seq_len keys and the weighted sum of values, each
2 * n_embd * seq_len FLOPs per token and layer forward (n_head * head_dim = n_embd whatever the number of
key/value heads), times 3 for forward + backward; like PaLM and Megatron it counts the full
seq_len x seq_len square, not the causal half. tests/test_distributed.py checks this formula against
torch's FlopCounterMode on the real model.

MFU = achieved model FLOP/s / the device's peak: a table of dense bf16 tensor-core peaks for known
GPUs (used whatever the training precision), or on CPU a measured fp32 matmul peak at the current
thread count, which is the physical limit there. Recomputation (activation checkpointing) is not
counted as useful work, so it lowers MFU, as it should.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .head_loss import chunk_positions
from .lora import LoraSettings, select_targets
from .models import architecture, build_model

# Dense (no sparsity) bf16 tensor-core peaks with fp32 accumulation, FLOP/s, from vendor data sheets.
# Matched by substring of torch.cuda.get_device_name in this order, so specific names come first.
GPU_PEAK_BF16 = {
    "B200": 2250e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 35.6e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (module docstring)."""
    return 6.0 * architecture(cfg).matmul_parameters(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def measure_cpu_matmul_peak(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best observed FLOP/s of a square matmul on this CPU with the current thread count.

    Its operands come from a private generator: the global RNG (LoRA dropout draws from it) is restored by
    a resume just before this runs, and must continue where the interrupted run left it."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, dtype=dtype, generator=generator)
    b = torch.randn(size, size, dtype=dtype, generator=generator)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """Peak FLOP/s of `device` and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 datasheet"
        return 0.0, f"{name} (unknown peak)"
    return measure_cpu_matmul_peak(), "measured CPU fp32 matmul"


class Throughput:
    """Tokens/s over a sliding window of steps, MFU and ETA."""

    def __init__(self, flops_per_token: float, peak_flops: float, window: int = 20):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def start(self) -> None:
        """Mark the moment training starts, so the first step already has a rate."""
        self.samples = [(time.perf_counter(), 0)]

    def update(self, tokens: int) -> None:
        self.samples.append((time.perf_counter(), tokens))
        self.samples = self.samples[-(self.window + 1):]

    def exclude(self, seconds: float) -> None:
        """Leave out a pause (an evaluation) that was not training: shift the window's samples forward."""
        self.samples = [(t + seconds, n) for t, n in self.samples]

    def tokens_per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        elapsed = self.samples[-1][0] - self.samples[0][0]
        tokens = sum(t for _, t in self.samples[1:])
        return tokens / elapsed if elapsed > 0 else 0.0

    def mfu(self, world_size: int = 1) -> float:
        """Achieved / peak FLOP/s, never above 1: a CPU peak measured while other work held the cores is
        too low, so a faster training step raises it to what the step achieved (the peak is the device's
        limit, whatever the load was at the moment it was measured)."""
        if self.peak_flops <= 0:
            return 0.0
        achieved = self.tokens_per_second() * self.flops_per_token / world_size
        self.peak_flops = max(self.peak_flops, achieved)
        return achieved / self.peak_flops

    def eta_seconds(self, steps_left: int) -> float:
        if len(self.samples) < 2:
            return float("nan")
        per_step = (self.samples[-1][0] - self.samples[0][0]) / (len(self.samples) - 1)
        return per_step * steps_left


def format_duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# ------------------------------------------------------------------------------------------ memory planning
@dataclass
class MemoryPlan:
    """Bytes per rank that training holds, by kind: a floor (allocator slack, buffers and kernels' scratch
    come on top). `activations` is for the checkpointing chosen; both variants are kept for `codegen2 info`."""

    parameters: int
    trained: int  # parameters with gradients and optimizer state
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_plain: int  # without activation checkpointing
    activations_checkpointed: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def lora_layers(cfg: ModelConfig, settings: LoraSettings) -> list[tuple[int, int]]:
    """(in_features, out_features) of each layer `settings` adapts, from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return [(model.get_submodule(name).in_features, model.get_submodule(name).out_features)
            for name in select_targets(model, settings.targets)]


def _activations(cfg: ModelConfig, tokens: int, seq_len: int, adapter_inputs: int,
                 head_trains: bool) -> tuple[int, int]:
    """(plain, checkpointed) activation bytes of one micro-batch, in fp32: Korthikanti et al. (2022),
    34 * d + 5 * heads * seq_len values per token and layer, plus what the adapters keep (their inputs and
    rank-sized middles: `adapter_inputs` values per token over all layers); checkpointing keeps each layer's
    input and recomputes one layer at a time. The loss (`head_loss`) holds one chunk's logits, log-softmax and
    their gradients (fp32) at a time, and the final hidden states' gradient."""
    per_layer = 4 * tokens * (34 * cfg.n_embd + 5 * cfg.n_head * seq_len + adapter_inputs // max(1, cfg.n_layer))
    chunk = min(tokens, chunk_positions(cfg.vocab_size, cfg.n_embd, head_trains))
    loss = 4 * 4 * chunk * cfg.vocab_size + 4 * tokens * cfg.n_embd
    return per_layer * cfg.n_layer + loss, 4 * tokens * cfg.n_embd * cfg.n_layer + per_layer + loss


def plan_training_memory(cfg: ModelConfig, seq_len: int, micro_batch_size: int, *, checkpointing: bool = False,
                         world_size: int = 1, parallel: str = "none", lora: LoraSettings | None = None,
                         base_bytes: int = 4) -> MemoryPlan:
    """What training `cfg` needs per rank. Full training: fp32 weights, gradients and AdamW's two moments,
    16 bytes per parameter, split over the ranks by FSDP. LoRA: the frozen base at `base_bytes` per
    parameter (2 in bf16) and 16 bytes per adapter parameter; gradients and moments for the adapters only (FSDP
    splits both over the ranks)."""
    n = architecture(cfg).count_parameters(cfg)
    shards = world_size if parallel == "fsdp" else 1
    tokens = micro_batch_size * seq_len
    if lora is None:
        trained, weights, adapter_inputs = n, 4 * n // shards, 0
    else:
        layers = lora_layers(cfg, lora)
        trained = sum(lora.rank * (fan_in + fan_out) for fan_in, fan_out in layers)
        weights = (base_bytes * n + 4 * trained) // shards  # FSDP shards the frozen base and the adapters alike
        adapter_inputs = sum(fan_in + lora.rank for fan_in, _ in layers)
    trained_here = trained // shards
    plain, checkpointed = _activations(cfg, tokens, seq_len, adapter_inputs, head_trains=lora is None)
    return MemoryPlan(parameters=n, trained=trained, weights=weights, gradients=4 * trained_here,
                      optimizer=8 * trained_here, activations=checkpointed if checkpointing else plain,
                      activations_plain=plain, activations_checkpointed=checkpointed)
