"""Fast one-token decoding for CPU inference: a static cache and one compilable step, for any architecture.

Each architecture provides its fused step (`Architecture.decode_weights` / `decode_step`, e.g.
`models/codegen/decode.py`): fewer, larger operations than its layer-by-layer forward, and nothing that
changes from step to step is a Python number, so `torch.compile(fullgraph=True)` turns the step into one
graph that serves every step of a generation. This module owns what they share: the per-layer cache
tensors, the cache column and positions, and the compile-once wrapper.

`FastDecoder(compile=False)` runs the same step eagerly (no compile time; fewer ops than the model's
forward). Compiling costs tens of seconds once per (batch, capacity) shape: worth it for evaluation or
a long batch of samples, not for one short `codegen2 sample`.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .models import architecture
from .models.common import KVCache

log = logging.getLogger("codegen2")


def compile_report() -> str:
    """One line for the commands to print: what compiling the decode step cost in this process ("" if nothing)."""
    events = FastDecoder.compile_events
    if not events:
        return ""
    shapes = ", ".join(f"batch {shape[0]} x cache {capacity}: {seconds:.1f} s" for shape, capacity, seconds in events)
    return (f"compiled the decode step once per shape ({shapes}; later generations of these shapes reuse it; "
            f"--decoder fast skips compiling)")


def capacity_bucket(needed: int, n_ctx: int, step: int = 128) -> int:
    """Cache capacity for `needed` positions, rounded up to a multiple of `step` (at most max(needed, n_ctx)).

    A compiled step is specialised to its capacity: rounding lets generations of similar lengths share one
    graph instead of compiling again, at the price of attending over a few masked columns.
    """
    return max(needed, min(-(-needed // step) * step, n_ctx))


class FastDecoder:
    """Decodes one token per row per step for a fixed batch and cache capacity, eager or compiled.

    Use: `start(cache, next_pos)` after an eager prefill through the model's forward into a `KVCache`, then
    `step(tokens)` per token. Rows never leave (static shapes): a finished row keeps decoding junk that
    the caller ignores.
    """

    _compiled: dict[str, object] = {}  # one torch.compile wrapper per architecture; inductor caches graphs
    compile_events: list[tuple[tuple[int, ...], int, float]] = []  # (batch shape, capacity, seconds) per compile

    def __init__(self, model: nn.Module, batch: int, capacity: int, compile: bool = False,
                 dynamic: bool | None = False):
        cfg = model.config
        arch = architecture(cfg)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.weights = arch.decode_weights(model)
        cache_shape = (batch, cfg.kv_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)
        self.col = torch.zeros((), dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.capacity = capacity
        self.length = 0  # cache columns filled (host copy of `col`)
        self.compile = compile
        self.compile_seconds = 0.0
        self._fn = arch.decode_step
        if compile:
            # dynamic=False: one graph per (batch, capacity), the fastest; None (the server, whose batch and
            # capacity change as rows come and go): a second shape makes dynamo compile one graph for all.
            key = f"{arch.name}/{dynamic}"
            # Each (weight format, batch, capacity) is its own graph of the one `decode_step` function:
            # dynamo's default of 8 per function is soon reached (and with fullgraph=True it then fails).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 256)
            if key not in FastDecoder._compiled:
                FastDecoder._compiled[key] = torch.compile(arch.decode_step, fullgraph=True, dynamic=dynamic)
            self._fn = FastDecoder._compiled[key]
        self._warm = not compile

    def start(self, cache: KVCache, next_pos: torch.Tensor) -> None:
        """Take over a prefilled cache (its first `cache.length` columns) and each row's next position."""
        length = cache.length
        if length >= self.capacity:
            raise ValueError(f"prefill of {length} positions leaves no room in a capacity of {self.capacity}")
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k[:, :, :length] = cache.keys[layer, :, :, :length]
            v[:, :, :length] = cache.values[layer, :, :, :length]
        self.valid[:, :length] = cache.valid[:, :length]
        self.valid[:, length:] = True
        self.col.fill_(length)
        self.pos.copy_(next_pos)
        self.length = length

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] after feeding `tokens` [B]; advances the cache column and positions."""
        if self.length >= self.capacity:
            raise ValueError(f"fast decoder cache is full ({self.capacity} positions)")
        if not self._warm:
            began = time.perf_counter()
            logits = self._fn(self.weights, tokens, self.pos, self.col, self.keys, self.values, self.valid)
            self.compile_seconds = time.perf_counter() - began
            self._warm = True
            if self.compile_seconds > 1.0:  # a first call that compiled (reusing a graph takes milliseconds)
                FastDecoder.compile_events.append((tuple(tokens.shape), self.capacity, self.compile_seconds))
            log.info("decode step compiled for batch %d, cache %d: %.1f s", tokens.shape[0], self.capacity,
                     self.compile_seconds)
        elif self.compile:
            # The graph was specialised on these very tensors (shapes, dtypes, devices): skipping dynamo's
            # guard checks saves ~0.2 ms per step, a tenth of a tiny model's step.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                logits = self._fn(self.weights, tokens, self.pos, self.col, self.keys, self.values, self.valid)
        else:
            logits = self._fn(self.weights, tokens, self.pos, self.col, self.keys, self.values, self.valid)
        self.col += 1
        self.pos += 1
        self.length += 1
        return logits
