"""Continuous batching: unrelated requests decode together on one model, joining and leaving at any step.

One background thread owns the model. Each step it (1) admits waiting rows while there is room,
prefilling them as one left-padded batch and merging their keys/values into the running cache,
(2) picks the next token of every row with that row's own temperature, top-p and seeded generator,
(3) hands new text to the row's sink and drops rows that finished or were cancelled, (4) feeds the
new tokens through the model. All rows share one cache length; a row's tokens sit right-aligned with
padding before them, which the attention mask hides, and positions count from the row's first token,
so a row's logits do not depend on its batch mates (up to floating-point rounding of other shapes).

A finished row leaves its batch slot dead rather than forcing a copy of the whole cache; a new row
is copied into a dead slot in place when it fits. The cache is rebuilt (compacted, resized with
headroom) only when a row cannot be placed, or when most slots are dead and nobody is waiting:
rebuilding at every join and leave took half of the step time at batch 64.

Prefill, the step and the cache copies are the generation core's (`generation.core`), sampling is
`generation.sampling.choose_tokens`, and each row is seeded exactly as `generate_ids` seeds its rows, so a
request served alone reproduces `codegen2 sample` / `codegen2 infill` with the same seed token for token.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generation.core import copy_rows, prefill, set_filled, step
from ..generation.decoder import FastDecoder, capacity_bucket, compile_report
from ..generation.sampling import SamplingParams, choose_tokens
from ..models.common import KVCache
from ..options import DECODERS, LIBRARY_DECODER
from .text import IncrementalText

log = logging.getLogger("codegen2.serve")

FAST_CAPACITY_STEP = 64  # the fused step's cache capacity grows in multiples of this (memory; not recompiles)


@dataclass
class RowRequest:
    """One sequence to generate: a prompt's token ids and how to sample its continuation."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    stream: bool = False  # send text as it is generated, not only at the end


@dataclass
class RowEvent:
    """New text of row `index` of a submission; `finish_reason` is set on the row's last event.

    When the row does not stream, its only event carries the whole text.
    """

    index: int
    text: str
    finish_reason: str | None = None  # "stop", "length" or "error"
    completion_tokens: int = 0
    error: str | None = None


Sink = Callable[[RowEvent], None]


def check_rows(rows: list[RowRequest], n_ctx: int) -> None:
    """Rows the engine can run: a non-empty prompt that, with max_tokens, fits the context."""
    for spec in rows:
        if not spec.prompt_ids:
            raise ValueError("a row needs at least one prompt token")
        if spec.max_tokens < 1 or len(spec.prompt_ids) + spec.max_tokens > n_ctx:
            raise ValueError(f"prompt ({len(spec.prompt_ids)} tokens) + max_tokens ({spec.max_tokens}) "
                             f"must fit the context of {n_ctx} tokens")


class QueueFull(Exception):
    """The waiting queue cannot take this submission now; the client should retry later."""


class EngineStopped(Exception):
    """The engine no longer accepts work (the server is shutting down)."""


class Ticket:
    """Handle of one submission: its rows can be cancelled together (e.g. the client went away)."""

    def __init__(self, engine, size: int, ticket_id: int = -1):
        self._engine = engine  # a BatchEngine or a ProcessEngine
        self.size = size
        self.id = ticket_id
        self.cancelled = False

    def cancel(self) -> None:
        self._engine.cancel(self)


class Cancellable(abc.ABC):
    """What both engines share: a submission is cancelled once, under the engine's lock."""

    _lock: threading.Condition | threading.Lock

    def cancel(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            self._forget(ticket)

    @abc.abstractmethod
    def _forget(self, ticket: Ticket) -> None:
        """Drop the cancelled submission's rows (called once, with the lock held)."""


@dataclass
class _Prefilled:
    """New rows prefilled together: rows `index` of `cache`, with their next logits and positions."""

    rows: list[_Row]
    cache: KVCache
    index: torch.Tensor
    logits: torch.Tensor
    next_pos: torch.Tensor


@dataclass
class _Row:
    spec: RowRequest
    index: int
    ticket: Ticket
    sink: Sink
    text: IncrementalText
    generator: torch.Generator | None = None
    sampled: int = 0
    start: int = 0  # cache column of the row's first prompt token
    done: bool = False

    @property
    def remaining(self) -> int:
        """Tokens this row may still feed through the model (an upper bound of cache columns it needs)."""
        return self.spec.max_tokens - self.sampled


@dataclass
class EngineStats:
    """What `snapshot` reports, in its order: the rows now, then totals since the engine started."""

    active: int = 0
    waiting: int = 0
    steps: int = 0
    rows_finished: int = 0
    rows_cancelled: int = 0
    rows_failed: int = 0
    tokens_generated: int = 0
    max_batch_seen: int = 0
    busy_seconds: float = 0.0


class BatchEngine(Cancellable):
    """Runs submitted rows on `model` with continuous batching in a background thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_cache_len: int | None = None,
        max_prefill_tokens: int = 8192,
        bidirectional_prompt: bool = False,
        decoder: str = LIBRARY_DECODER,
    ):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
        # "model": the model's forward over a KVCache whose batch grows and shrinks with the rows. "fast" /
        # "compiled": the fused decode step (`FastDecoder`) over a batch of slots that follows the rows
        # (at least 2) and a bucketed capacity; rows join and leave slots through `masks.slot_key_valid`.
        # Compiled, the batch and the attended cache length are dynamic dimensions of one graph, compiled
        # here, before the first request (`warm_up`), so no request ever waits for a compile.
        self.decoder = decoder
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = model.config.n_ctx
        self.vocab_size = model.config.vocab_size
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        # Rows of different ages share one cache length, so it can exceed one context window.
        self.max_cache_len = max_cache_len or 2 * self.n_ctx
        self.max_prefill_tokens = max_prefill_tokens
        self.bidirectional_prompt = bidirectional_prompt
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

        self._lock = threading.Condition()
        self._waiting: collections.deque[_Row] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()
        # State below is touched only by the engine thread. Slot i is batch row i of the cache; a
        # finished row leaves its slot dead (None) until a new row takes it or the cache is rebuilt.
        self._slots: list[_Row | None] = []
        self._cache: KVCache | None = None
        self._logits: torch.Tensor | None = None  # [slots, vocab]: next-token logits of every slot
        self._next_pos: torch.Tensor | None = None  # [slots]: position of the next fed token
        self.compile_seconds = self.warm_up() if decoder == "compiled" else 0.0

    # ------------------------------------------------------------------------------ public API
    @property
    def max_rows_per_submit(self) -> int:
        """A submission with more rows than this could never be queued."""
        return self.max_queue

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile the server's decode step (any batch of 2+ slots, any cache length) now; returns its seconds.

        Runs two steps on a throw-away decoder of 2 slots, so the graph the engine's decoders share exists
        before the first request; the model's weights are only read.
        """
        compiled = len(FastDecoder.compile_events)
        decoder = FastDecoder(self.model, 2, 2 * FAST_CAPACITY_STEP, compile=True, dynamic_batch=True)
        set_filled(decoder, 1)
        tokens = torch.zeros(2, dtype=torch.long, device=self.device)
        for _ in range(2):
            decoder.step(tokens)
        seconds = sum(s for _, s in FastDecoder.compile_events[compiled:])
        if seconds:
            log.warning("%s", compile_report())
        return seconds

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="codegen2-batch-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; rows still waiting or running end with an error event."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for row in waiting + self._live_rows():
            self._emit(row, RowEvent(row.index, "", "error", row.sampled, error="the server is shutting down"))
        self._reset()

    def submit(self, rows: list[RowRequest], sink: Sink) -> Ticket:
        """Queue rows (all or none); `sink` receives their events from the engine thread."""
        check_rows(rows, self.n_ctx)
        ticket = Ticket(self, len(rows))
        decode = self.tokenizer.decode
        new = [_Row(spec, i, ticket, sink, IncrementalText(decode, spec.stop)) for i, spec in enumerate(rows)]
        with self._lock:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) + len(new) > self.max_queue:
                raise QueueFull(f"the server is busy ({len(self._waiting)} sequences waiting, "
                                f"queue limit {self.max_queue}); retry later")
            self._waiting.extend(new)
            self.stats.waiting = len(self._waiting)
            self._lock.notify_all()
        return ticket

    def _forget(self, ticket: Ticket) -> None:
        """Waiting rows leave the queue now, running rows at the next step."""
        before = len(self._waiting)
        self._waiting = collections.deque(r for r in self._waiting if r.ticket is not ticket)
        self.stats.rows_cancelled += before - len(self._waiting)
        self.stats.waiting = len(self._waiting)

    def snapshot(self) -> dict:
        with self._lock:
            stats = dataclasses.asdict(self.stats)
        stats["busy_seconds"] = round(stats["busy_seconds"], 3)
        return {**stats, "max_batch_size": self.max_batch_size, "max_queue": self.max_queue}

    # --------------------------------------------------------------------------- engine thread
    def _live(self) -> list[int]:
        return [i for i, row in enumerate(self._slots) if row is not None]

    def _live_rows(self) -> list[_Row]:
        return [row for row in self._slots if row is not None]

    def _reset(self) -> None:
        self._slots, self._cache, self._logits, self._next_pos = [], None, None, None

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not self._waiting and not self._slots:
                        self._lock.wait()
                    if self._stopping:
                        return
                began = time.perf_counter()
                try:
                    self._step()
                except Exception as exc:  # keep serving: fail the rows in flight, not the server
                    log.exception("decoding step failed")
                    self._fail_running(f"generation failed: {type(exc).__name__}: {exc}")
                with self._lock:
                    self.stats.busy_seconds += time.perf_counter() - began
                    self.stats.active = len(self._live())

    def _step(self) -> None:
        self._admit()
        live = self._live()
        if not live:
            self._reset()
            return
        tokens = self._choose(live)
        for slot in live:
            row = self._slots[slot]
            assert row is not None
            if row.ticket.cancelled:
                with self._lock:
                    self.stats.rows_cancelled += 1
                self._slots[slot] = None
            elif self._advance(row, int(tokens[slot])):
                self._slots[slot] = None
        with self._lock:
            self.stats.steps += 1
            self.stats.tokens_generated += len(live)
        live = self._live()
        if not live:
            self._reset()
            return
        if len(self._slots) - len(live) >= max(4, len(live)) and not self._waiting:
            # Mostly dead slots and nobody to take them: shrink, so dead slots stop costing compute.
            tokens = tokens[torch.tensor(live, dtype=torch.long, device=tokens.device)]
            self._rebuild(live)
            if len(self._slots) > len(live):  # a fast decoder keeps at least 2 slots: pad with a dead one
                pad = tokens.new_full((len(self._slots) - len(live),), self.tokenizer.eot_id)
                tokens = torch.cat((tokens, pad))
        self._feed(tokens)

    def _feed(self, tokens: torch.Tensor) -> None:
        """One decode step for every slot; dead slots decode junk at position 0 until reused."""
        assert self._cache is not None and self._next_pos is not None
        alive = torch.tensor([row is not None for row in self._slots], device=self._next_pos.device)
        # No live row sees columns before its own first one: attention starts at the earliest of those.
        first = min(row.start for row in self._slots if row is not None)
        compiled_before = len(FastDecoder.compile_events)
        self._logits = step(self.model, self._cache, tokens, self._next_pos, first)
        if len(FastDecoder.compile_events) > compiled_before:  # not expected after warm_up; shown if it happens
            log.warning("%s", compile_report())
        if self.decoder != "model":  # the decoder advanced every slot's position itself
            self._next_pos.masked_fill_(~alive, 0)
        else:
            self._next_pos = torch.where(alive, self._next_pos + 1, torch.zeros_like(self._next_pos))

    def _choose(self, live: list[int]) -> torch.Tensor:
        """Next token of every slot (dead slots get a dummy), grouping rows that share temperature and top-p."""
        assert self._logits is not None
        logits = self._logits.float()
        groups: dict[tuple[float, float], list[int]] = collections.defaultdict(list)
        for slot in live:
            row = self._slots[slot]
            assert row is not None
            groups[(row.spec.temperature, row.spec.top_p)].append(slot)
        if len(groups) == 1 and len(live) == len(self._slots):
            (temperature, top_p), = groups
            params = SamplingParams(temperature=temperature, top_p=top_p)
            return choose_tokens(logits, params, [row.generator for row in self._live_rows()])
        tokens = torch.full((len(self._slots),), self.tokenizer.eot_id, dtype=torch.long, device=logits.device)
        for (temperature, top_p), slots in groups.items():
            index = torch.tensor(slots, dtype=torch.long, device=logits.device)
            params = SamplingParams(temperature=temperature, top_p=top_p)
            generators = [self._slots[s].generator for s in slots]  # type: ignore[union-attr]
            tokens[index] = choose_tokens(logits[index], params, generators)
        return tokens

    def _advance(self, row: _Row, token: int) -> bool:
        """Record a sampled token; emit text; True when the row has finished."""
        row.sampled += 1
        reason = None
        if token in row.spec.stop_ids:
            reason = "stop"
        elif row.text.add(token):
            reason = "stop"
        elif row.sampled >= row.spec.max_tokens:
            reason = "length"
        if reason is None:
            if row.spec.stream:
                delta = row.text.take()
                if delta:
                    self._emit(row, RowEvent(row.index, delta))
            return False
        text = row.text.take(final=True) if row.spec.stream else row.text.text
        row.done = True
        self._emit(row, RowEvent(row.index, text, reason, row.sampled))
        with self._lock:
            self.stats.rows_finished += 1
        return True

    def _emit(self, row: _Row, event: RowEvent) -> None:
        try:
            row.sink(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop its rows
            row.ticket.cancelled = True

    def _fail_running(self, message: str) -> None:
        rows = self._live_rows()
        for row in rows:
            self._emit(row, RowEvent(row.index, "", "error", row.sampled, error=message))
        with self._lock:
            self.stats.rows_failed += len(rows)
        self._reset()

    # ------------------------------------------------------------------------- admission, cache
    def _span(self) -> int:
        """Cache columns the live rows occupy once leading all-padding columns are dropped."""
        rows = self._live_rows()
        if not rows or self._cache is None:
            return 0
        return self._cache.length - min(r.start for r in rows)

    def _take_admissible(self) -> list[_Row]:
        """Pop waiting rows (oldest first) that fit the batch, the prefill budget and the cache bound."""
        rows = self._live_rows()
        free = self.max_batch_size - len(rows)
        span = self._span()
        remaining = max((r.remaining for r in rows), default=0)
        taken: list[_Row] = []
        longest = 0
        with self._lock:
            while self._waiting and len(taken) < free:
                row = self._waiting[0]
                if row.ticket.cancelled:
                    self._waiting.popleft()
                    continue
                new_longest = max(longest, len(row.spec.prompt_ids))
                new_remaining = max(remaining, row.spec.max_tokens)
                fits_cache = max(span, new_longest) + new_remaining <= self.max_cache_len
                fits_prefill = new_longest * (len(taken) + 1) <= self.max_prefill_tokens
                if taken and not fits_prefill or (taken or rows) and not fits_cache:
                    break
                taken.append(self._waiting.popleft())
                longest, remaining = new_longest, new_remaining
            self.stats.waiting = len(self._waiting)
        return taken

    def _admit(self) -> None:
        new = self._take_admissible()
        if not new:
            return
        for row in new:
            if row.spec.temperature > 0:
                row.generator = torch.Generator().manual_seed(int(row.spec.seed))
        cache, logits, next_pos = prefill(self.model, [r.spec.prompt_ids for r in new], self.tokenizer.eot_id,
                                          bidirectional=self.bidirectional_prompt)
        for row, pos in zip(new, next_pos.tolist()):
            row.start = cache.length - int(pos)  # column of its first token in the prefill cache
        leftover = self._place_in_dead_slots(new, cache, logits, next_pos)
        if leftover:
            index = torch.tensor(leftover, dtype=torch.long, device=self.device)
            self._rebuild(self._live(), _Prefilled([new[i] for i in leftover], cache, index, logits[index],
                                                   next_pos[index]))
        with self._lock:
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._live()))

    def _place_in_dead_slots(self, new: list[_Row], fresh: KVCache, logits: torch.Tensor,
                             next_pos: torch.Tensor) -> list[int]:
        """Copy prefilled rows into dead slots of the running cache where they fit; return the others.

        A row fits when its prompt is no longer than the cache so far (it is right-aligned there) and
        its whole generation fits the remaining capacity. This costs one row's copy, not a rebuild.
        """
        cache = self._cache
        dead = [i for i, row in enumerate(self._slots) if row is None]
        if cache is None or not dead:
            return list(range(len(new)))
        assert self._logits is not None and self._next_pos is not None
        length, leftover = cache.length, []
        capacity = cache.capacity if self.decoder != "model" else cache.max_len
        for j, row in enumerate(new):
            n = len(row.spec.prompt_ids)
            if not dead or n > length or length + row.spec.max_tokens > capacity:
                leftover.append(j)
                continue
            slot = dead.pop(0)
            row.start = copy_rows(cache, slot, fresh, j, fresh.length - n, length)
            self._logits[slot] = logits[j]
            self._next_pos[slot] = next_pos[j]
            self._slots[slot] = row
        if len(leftover) < len(new):
            set_filled(cache, length)  # the padding of the model's cache changed
        return leftover

    def _rebuild(self, keep: list[int], new: _Prefilled | None = None) -> None:
        """A fresh cache holding the kept slots' rows plus `new` rows, one slot each.

        Rows stay right-aligned and leading all-padding columns are dropped. The capacity covers the
        longest remaining generation plus headroom, so that later rows can take dead slots in place.
        """
        kept = [row for row in (self._slots[i] for i in keep) if row is not None]
        parts: list[tuple[list[_Row], object, torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        if kept:
            assert self._cache is not None and self._logits is not None and self._next_pos is not None
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            parts.append((kept, self._cache, index, min(r.start for r in kept), self._logits[index],
                          self._next_pos[index]))
        if new is not None:
            parts.append((new.rows, new.cache, new.index, 0, new.logits, new.next_pos))
        rows = [row for part in parts for row in part[0]]
        if not rows:
            self._reset()
            return
        length = max(src.length - first for _, src, _, first, _, _ in parts)
        needed = length + max(1, max(r.remaining for r in rows))
        cache = self._new_cache(len(rows), max(needed, min(self.max_cache_len, needed + max(64, length))))
        done = 0
        for part_rows, src, index, first, _, _ in parts:
            lo = copy_rows(cache, slice(done, done + len(part_rows)), src, index, first, length)
            for row in part_rows:
                row.start += lo - first
            done += len(part_rows)
        set_filled(cache, length)
        self._install(cache, rows, torch.cat([part[4] for part in parts]), torch.cat([part[5] for part in parts]))

    def _new_cache(self, rows: int, capacity: int):
        """An empty cache for `rows` rows: the model's `KVCache`, or a fused decoder's batch of slots.

        The compiled step's batch and attended length are dynamic, so the batch follows the rows (a lone
        row gets a dead partner slot: batch 1 would be a graph of its own) and the capacity, a multiple of
        `FAST_CAPACITY_STEP`, is only memory.
        """
        if self.decoder == "model":
            return KVCache(self.model.config, rows, capacity, device=self.device, dtype=self.dtype)
        return FastDecoder(self.model, max(2, rows), capacity_bucket(capacity, self.max_cache_len, FAST_CAPACITY_STEP),
                           compile=self.decoder == "compiled", dynamic_batch=True)

    def _install(self, cache, rows: list[_Row], logits: torch.Tensor, positions: torch.Tensor) -> None:
        """Make `cache` the running one, its first slots holding `rows` (a fused decoder's extra slot is dead)."""
        if isinstance(cache, KVCache):
            self._slots, self._cache, self._logits, self._next_pos = list(rows), cache, logits, positions
            return
        self._slots = rows + [None] * (cache.batch - len(rows))
        self._logits = logits.new_zeros(cache.batch, logits.shape[-1])
        self._logits[:len(rows)] = logits
        cache.pos[:len(rows)] = positions
        self._cache, self._next_pos = cache, cache.pos  # the decoder advances its own positions
