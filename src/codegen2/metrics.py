"""Throughput accounting: FLOPs per token, the device's peak, and model FLOP utilisation (MFU).

FLOPs per trained token (forward + backward) = 6 * N + 12 * n_layer * n_embd * seq_len, where N counts
every parameter that takes part in a matmul (all but the token embedding, whose lookup is free) and the
second term is the attention score and value products (PaLM appendix B). MFU = achieved model FLOP/s
divided by the device's peak: a table for known GPUs (dense bf16), or a measured fp32 matmul peak on CPU,
which is the physical limit there.
"""

from __future__ import annotations

import time

import torch

from .config import ModelConfig
from .model import count_parameters

# Dense bf16 tensor-core peaks, FLOP/s (vendor data sheets, SXM parts where there are several).
GPU_PEAK_BF16 = {
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
    "RTX 3090": 71e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    matmul_params = count_parameters(cfg) - cfg.vocab_size * cfg.n_embd
    return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def measure_cpu_matmul_peak(size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best observed FLOP/s of a square matmul on this CPU with the current thread count."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
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

    def update(self, tokens: int) -> None:
        self.samples.append((time.perf_counter(), tokens))
        self.samples = self.samples[-(self.window + 1):]

    def tokens_per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        elapsed = self.samples[-1][0] - self.samples[0][0]
        tokens = sum(t for _, t in self.samples[1:])
        return tokens / elapsed if elapsed > 0 else 0.0

    def mfu(self, world_size: int = 1) -> float:
        if self.peak_flops <= 0:
            return 0.0
        return self.tokens_per_second() * self.flops_per_token / (self.peak_flops * world_size)

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
