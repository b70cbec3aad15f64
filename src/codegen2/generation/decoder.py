"""Fast one-token decoding for CPU inference: a static cache and one compilable step, for any architecture.

Each architecture provides its fused step (`Architecture.decode_weights` / `decode_step`, e.g.
`models/codegen/decode.py`): fewer, larger operations than its layer-by-layer forward, and nothing that
changes from step to step is a Python number, so `torch.compile(fullgraph=True)` turns the step into one
graph that serves every step of a generation. This module owns what they share: the per-layer cache
tensors, the cache column and positions, and the compile-once wrapper.

For greedy decoding of small models, `FastDecoder.greedy` runs several steps per call with the argmax inside
the graph (`greedy_chunk_size`): the per-call costs are then paid once per chunk, not per token.

`FastDecoder(compile=False)` runs the same step eagerly (no compile time; fewer ops than the model's
forward). Compiling costs seconds to tens of seconds once per batch size and process (the cache length is
a dynamic dimension of the graph): worth it for evaluation, a long batch of samples or a server.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..int8 import is_quantized
from ..kernels.int8 import prepare_compiled_op
from ..models import architecture
from ..models.common import KVCache
from .core import copy_rows, set_filled

log = logging.getLogger("codegen2")


def compile_report() -> str:
    """One line for the commands to print: what compiling the decode step cost in this process ("" if nothing)."""
    events = FastDecoder.compile_events
    if not events:
        return ""
    shapes = ", ".join(f"batch {batch}: {seconds:.1f} s" for batch, seconds in events)
    return (f"compiled the decode step once per batch size ({shapes}; every cache length and later generations "
            f"reuse it; --decoder fast skips compiling)")


def capacity_bucket(needed: int, n_ctx: int, step: int = 128) -> int:
    """Cache capacity for `needed` positions, rounded up to a multiple of `step` (at most max(needed, n_ctx)).

    The step attends only over the filled columns, so capacity is memory, not work: rounding lets a
    server reuse one cache for rows of similar lengths.
    """
    return max(needed, min(-(-needed // step) * step, n_ctx))


ATTENTION_BLOCK = 32  # the step attends over the filled cache columns rounded up to this (masked beyond `col`)
CHUNK_LAYERS = 16  # a greedy chunk's graph holds at most this many layers (k steps of n_layer layers each)
CPP_WRAPPER_MAX_LAYERS = 12  # int8 steps of at most this many layers (93m, 125m) compile with inductor's C++ wrapper
MAX_CHUNK = 4  # greedy tokens per call at most: 8 measured no faster than 4 on the tiny shape


def greedy_chunk_size(n_layer: int) -> int:
    """Greedy tokens per `FastDecoder.greedy` call for a model of `n_layer` layers (1: one step per call).

    Several steps per call save the per-call cost (dynamo's entry, the Python around each step: ~0.1 ms of
    a tiny model's 1 ms step), which matters only where a step is short; the graph and its compile time grow
    with k * n_layer, so only models of at most CHUNK_LAYERS / 2 layers use more than one.
    """
    return max(1, min(MAX_CHUNK, CHUNK_LAYERS // n_layer))


def _greedy_chunk(step, k: int, last_position: int):
    """`step` run k times, each feeding the argmax of the logits before: returns the k tokens chosen [B, k].

    Positions past `last_position` (only reached by tokens after the requested ones, which the caller
    drops) read the rotary table's last row instead of indexing past it.
    """
    def chunk(weights, tokens, pos, col, keys, values, valid):
        chosen = []
        for _ in range(k):
            logits = step(weights, tokens, pos.clamp_max(last_position), col, keys, values, valid)
            tokens = logits.argmax(dim=-1)
            chosen.append(tokens)
            pos, col = pos + 1, col + 1
        return torch.stack(chosen, dim=1)

    return chunk


class FastDecoder:
    """Decodes one token per row per step for a fixed batch and cache capacity, eager or compiled.

    Use: `start(cache, next_pos)` after an eager prefill through the model's forward into a `KVCache`, then
    `step(tokens)` per token. Rows never leave (static shapes): a finished row keeps decoding junk that
    the caller ignores.

    Each step attends over the filled columns only, rounded up to `ATTENTION_BLOCK` (views of the cache
    tensors; `masks.decode_step_bias` hides the columns past `col`), not over the whole capacity. Compiled,
    that length is a dynamic dimension of one graph, so a generation compiles once however long it runs;
    `dynamic_batch=True` (the server, whose batch follows its rows) makes the batch dynamic too, so every
    batch of two or more rows shares that graph.
    """

    _compiled: dict[str, object] = {}  # one torch.compile wrapper per (architecture, batch mode, chunk)
    compile_events: list[tuple[int | str, float]] = []  # (batch size or "any", and the chunk; seconds) per compile

    def __init__(self, model: nn.Module, batch: int, capacity: int, compile: bool = False,
                 dynamic_batch: bool = False):
        cfg = model.config
        arch = architecture(cfg)
        param = next(model.parameters())
        if dynamic_batch and batch < 2:
            raise ValueError("a dynamic-batch decoder needs at least 2 rows (batch 1 is its own graph)")
        self.device, self.dtype = param.device, param.dtype
        self._quantized = is_quantized(model)
        self.weights = arch.decode_weights(model, 2 if dynamic_batch else batch)
        # One spare column that is never attended: the step's views then never cover a whole buffer, so they
        # are never contiguous, and the graph (which guards on contiguity) serves the last block too.
        cache_shape = (batch, cfg.kv_heads, capacity + 1, cfg.head_dim)
        self.keys = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(cache_shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.ones(batch, capacity + 1, dtype=torch.bool, device=self.device)
        self.col = torch.zeros((), dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.batch = batch
        self.capacity = capacity
        self.length = 0  # cache columns filled (host copy of `col`)
        self.compile = compile
        self.dynamic_batch = dynamic_batch
        self.compile_seconds = 0.0
        self._views: tuple[int, int, list, list, torch.Tensor] | None = None
        self._arch = arch
        self.chunk = greedy_chunk_size(cfg.n_layer)  # greedy tokens per `greedy` call
        self._n_layer = cfg.n_layer
        self._last_position = cfg.n_ctx - 1
        self._fn = self._function("step")
        self._chunk_fn = None  # built on the first `greedy` call
        self._warm = {"step": not compile, "chunk": not compile}

    def _function(self, kind: str):
        """The step ("step") or the greedy chunk ("chunk"), compiled once per process if this decoder compiles."""
        arch = self._arch
        fn = arch.decode_step if kind == "step" else _greedy_chunk(arch.decode_step, self.chunk, self._last_position)
        if not self.compile:
            return fn
        # dynamic=False: the batch is static unless marked dynamic; the attended length is always marked.
        key = f"{arch.name}/{'any' if self.dynamic_batch else 'static'}-batch/{kind}"
        if kind == "chunk":
            key += f"{self.chunk}/{self._last_position}"
        # int8 on the CPU: the matmuls through the C++ op where it builds (its first build ~10 s, then cached), so
        # the graph calls them without Python; a graph of its own, as the op is chosen when the graph is traced.
        native_op = self._quantized and self.device.type == "cpu" and prepare_compiled_op()[0] == "native"
        key += "/int8-native-op" if native_op else ""
        options = self._options(kind, native_op)
        key += "/cpp-wrapper" if options.get("cpp_wrapper") else ""
        # Each (weight format, batch) is its own graph of the one function: dynamo's default of 8 per
        # function is soon reached (and with fullgraph=True it then fails).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 256)
        if key not in FastDecoder._compiled:
            FastDecoder._compiled[key] = torch.compile(fn, fullgraph=True, dynamic=False, options=options)
        return FastDecoder._compiled[key]

    def _options(self, kind: str, native_op: bool) -> dict[str, bool]:
        """inductor's options for the step or chunk graph."""
        # The graph's inputs are always this class's own cache views and the model's weights, laid out the same
        # way every call: the wrapper's ~40 per-call stride/alignment asserts cost 2-4% of a tiny step (thread
        # time, batch 1: 1.005 vs 1.03 ms; batch 8: 2.12 vs 2.20 ms).
        options = {"size_asserts": False, "alignment_asserts": False}
        short_step = self._n_layer <= CPP_WRAPPER_MAX_LAYERS
        if self.device.type == "cpu" and (kind == "chunk" or (native_op and short_step)):
            # The wrapper code in C++ rather than Python. A chunk runs k steps' worth of it per call: ~4% of a tiny
            # batch-1 token (thread time, best of 8: 0.82-0.83 vs 0.85-0.86 ms), neutral at batch 8. With the C++
            # int8 op it calls the matmuls through the dispatcher without Python (93m batch 1 step, thread time,
            # two runs: 5.61 and 4.52 against 6.04 and 4.60 ms; whole generations 1.05-1.22x at load 4-5), for a
            # longer cold compile of big graphs (Qwen2.5-Coder-0.5B cut to 12 layers: 92 against 58 s; 93m: the
            # same). So only short steps take it: the ~0.1-0.4 ms it saves is 0.5% of a 1b step, not worth minutes
            # of compile. Otherwise the one-step graph measured slower in C++ (tiny: 1.11 vs 1.06 ms).
            options["cpp_wrapper"] = True
        return options

    def start(self, cache: KVCache, next_pos: torch.Tensor) -> None:
        """Take over a prefilled cache (its first `cache.length` columns) and each row's next position."""
        length = cache.length
        if length >= self.capacity:
            raise ValueError(f"prefill of {length} positions leaves no room in a capacity of {self.capacity}")
        copy_rows(self, slice(None), cache, slice(None), 0, length)
        self.valid[:, length:] = True
        set_filled(self, length)
        self.pos.copy_(next_pos)

    def _attended(self, first: int, steps: int = 1) -> tuple[torch.Tensor, list, list, torch.Tensor]:
        """Column of this step and views of the columns attended: from `first` (rounded down to a block) to
        the filled ones plus the next `steps` (rounded up, at most the capacity)."""
        lo = first - first % ATTENTION_BLOCK
        hi = min(self.capacity, -(-(self.length + steps) // ATTENTION_BLOCK) * ATTENTION_BLOCK)
        if self._views is None or self._views[:2] != (lo, hi):
            self._views = (lo, hi, [k[:, :, lo:hi] for k in self.keys], [v[:, :, lo:hi] for v in self.values],
                           self.valid[:, lo:hi])
        col = self.col if lo == 0 else self.col - lo
        return col, self._views[2], self._views[3], self._views[4]

    def step(self, tokens: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Logits [B, vocab] after feeding `tokens` [B]; advances the cache column and positions.

        `first`: no row sees a column before it (a server's rows all start there or later), so the step
        need not attend over them.
        """
        return self._run("step", tokens, first, 1)

    def greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` [B], then each row's greedy choice, `self.chunk` times in one call: the chosen tokens
        [B, chunk], the same as `step` and argmax would give one by one. The last one is not fed yet.

        Tokens past a row's stop or its budget are wasted work the caller drops (at most chunk - 1 steps);
        the capacity must leave room for the whole chunk.
        """
        if self._chunk_fn is None:
            self._chunk_fn = self._function("chunk")
        return self._run("chunk", tokens, 0, self.chunk)

    def _run(self, kind: str, tokens: torch.Tensor, first: int, steps: int) -> torch.Tensor:
        if self.length + steps > self.capacity:
            raise ValueError(f"fast decoder cache is full ({self.capacity} positions)")
        if not 0 <= first <= self.length:
            raise ValueError(f"first column {first} is outside the filled cache (0..{self.length})")
        col, keys, values, valid = self._attended(first, steps)
        fn = self._fn if kind == "step" else self._chunk_fn
        args = (self.weights, tokens, self.pos, col, keys, values, valid)
        if not self._warm[kind]:
            out = self._compile(kind, fn, args)
        elif self.compile:
            # The graphs differ only in what dynamo must tell apart (batch size, weight format): skipping
            # the other guard checks saves ~0.2 ms per step, a tenth of a tiny model's step.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                out = fn(*args)
        else:
            out = fn(*args)
        self.col += steps
        self.pos += steps
        self.length += steps
        return out

    def _compile(self, kind: str, fn, args) -> torch.Tensor:
        """First compiled call: mark the dynamic dimensions, run (compiling if no graph fits) and record the time."""
        _, tokens, pos, _, keys, values, valid = args
        # maybe_: dynamo may still bound or specialise a dimension (no error), which only costs a recompile.
        for t in keys + values:
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(valid, 1)
        if self.dynamic_batch:
            for t in [tokens, pos, valid] + keys + values:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        began = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - began
        self.compile_seconds += seconds
        self._warm[kind] = True
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs:  # compiled (not a graph reused)
            batch = "any" if self.dynamic_batch else self.batch
            label = batch if kind == "step" else f"{batch}, {self.chunk}-token greedy chunk"
            FastDecoder.compile_events.append((label, seconds))
            log.info("decode step compiled for batch %s, every cache length: %.1f s", label, seconds)
        return out
