"""`POST /infill` in the shape of llama.cpp's server, the endpoint llama.vscode and llama.vim complete code with.

A request carries the text before the cursor (`input_prefix`), after it (`input_suffix`), the start of the
cursor's line (`prompt`, appended to the prefix as llama.cpp does) and chunks of other files (`input_extra`).
When they do not all fit the context, `fit_infill` keeps the end of the prefix and the start of the suffix at
about 3:1 of a window and fills what is left with the newest extra files. Extra files go before the prompt in
the model's repository layout where its infill format has one, else they are dropped and counted.

`n_predict: 0` is llama.vscode's warm-up (it sends its extra context ahead of time): it is answered at once
with empty content and runs nothing. The fields llama.vscode sends for llama.cpp's own scheduler and sampler
chain (`samplers`, `cache_prompt`, `t_max_*_ms`, `n_indent`, `id_slot`, `n_cmpl`, `lora`) are accepted and
ignored; `top_k` is accepted but not applied (the engine samples with temperature and top_p).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import UserError
from ..infill import Specials, infill_prompt, infill_stop_ids, repo_context, resolve_format
from ..request_checks import RequestError, check_context, check_sampling
from .engine import EngineStopped, QueueFull, RowEvent, RowRequest, Ticket
from .lifecycle import Drain, HangUps
from .protocol import ApiError, validation_error

FIM_WINDOW = 2048  # tokens of prefix + prompt + suffix at most, as llama.cpp's default batch
DEFAULT_N_PREDICT = 128  # llama.vscode's default; llama.cpp's own is unlimited
DEFAULT_TEMPERATURE = 0.8  # llama.cpp's default


class ExtraChunk(BaseModel):
    """One chunk of another file; llama.vscode adds `time` (when it picked the chunk)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = ""
    filename: str = "tmp"
    time: float | None = None


class InfillRequest(BaseModel):
    """POST /infill body, as llama.vscode (src/llama-server.ts, createRequestPayload) sends it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []
    prompt: str = ""
    n_predict: int | None = None  # 0: warm-up; -1: until the context is full
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    model: str | None = None
    # llama.cpp's scheduler, cache and sampler chain: accepted, without effect here.
    samplers: list[str] | None = None
    cache_prompt: bool | None = None
    t_max_prompt_ms: int | None = None
    t_max_predict_ms: int | None = None
    n_indent: int | None = None
    id_slot: int | None = None
    n_cmpl: int | None = None
    lora: list[dict[str, Any]] | None = None


def parse_infill(body: Any) -> InfillRequest:
    """Validate a decoded JSON body; the first problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        req = InfillRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if req.n_predict is not None and req.n_predict < -1:
        raise ApiError(400, f"n_predict={req.n_predict} must be -1 (until the context is full), 0 (warm-up) or "
                            "more", "n_predict")
    return req


# ------------------------------------------------------------------------------------- fitting
@dataclass
class Fitted:
    """What of a request goes into the prompt: token ids, the extra files kept, and how much was cut."""

    prefix: list[int]
    suffix: list[int]
    extra: list[int]  # indices of the extra files kept, in their order
    prefix_cut: int = 0
    suffix_cut: int = 0
    extra_dropped: int = 0

    @property
    def truncated(self) -> bool:
        return bool(self.prefix_cut or self.suffix_cut)


def fit_infill(prefix: list[int], suffix: list[int], prompt: list[int], extra: list[int], header: int,
               room: int) -> Fitted:
    """Fit prefix + prompt + suffix + extra files (`extra`: each file's tokens, `header`: the tokens their
    layout adds once) into `room` tokens.

    The prefix, prompt and suffix share a window (at most `FIM_WINDOW`; at least half the room when there are
    extra files, and all of it when they are few): the prefix keeps its last three quarters of the window, the
    suffix its first quarter less the prompt, so the text nearest the cursor survives at about 3:1. Whatever the
    three leave unused goes to extra files, newest (last) first, each whole or not at all.
    """
    if len(prompt) > room:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, more than the {room} the context leaves",
                       "prompt", code="context_length_exceeded")
    extra_total = header + sum(extra) if extra else 0
    window = min(FIM_WINDOW, room) if not extra else min(FIM_WINDOW, max(room // 2, room - extra_total))
    quarter = window // 4
    prefix_take = min(len(prefix), 3 * quarter)
    suffix_take = min(len(suffix), max(0, window - 3 * quarter - len(prompt)))
    if len(prefix) + len(prompt) + len(suffix) <= window:  # everything fits: nothing to balance
        prefix_take, suffix_take = len(prefix), len(suffix)
    left = room - prefix_take - len(prompt) - suffix_take - header
    kept: list[int] = []
    for i in reversed(range(len(extra))):
        if extra[i] <= left:
            kept.insert(0, i)
            left -= extra[i]
    return Fitted(prefix=prefix[len(prefix) - prefix_take:] + prompt, suffix=suffix[:suffix_take], extra=kept,
                  prefix_cut=len(prefix) - prefix_take, suffix_cut=len(suffix) - suffix_take,
                  extra_dropped=len(extra) - len(kept))


# ------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """The model's infill format, as /infill needs it."""

    build: Callable[[list[int], list[int], list[int]], list[int]]  # (context, prefix, suffix) -> prompt ids
    stop_ids: tuple[int, ...]
    encode_suffix: Callable[[str], list[int]]
    context: Callable[[list[tuple[str, str]]], list[int]] | None = None  # extra files laid out; None: no layout

    def file_costs(self, files: list[tuple[str, str]]) -> tuple[list[int], int]:
        """Each file's tokens in the layout and the header the layout adds once (from at most len+1 layouts)."""
        assert self.context is not None
        alone = [len(self.context([f])) for f in files]
        header = alone[0] + alone[1] - len(self.context(files[:2])) if len(files) > 1 else 0
        return [n - header for n in alone], header


def model_layout(tokenizer, infill_format: str | None) -> Layout:
    """The layout of the served model's infill format (`infill.detect_format`'s name); a 400 when it has none."""
    if infill_format is None:
        raise ApiError(400, "this model has no infill format (its tokenizer has no fill-in-the-middle tokens), "
                            "so it cannot serve /infill", "input_suffix")
    specials = Specials.of(tokenizer)
    try:
        fmt = resolve_format(infill_format, "", specials)
    except UserError as exc:
        raise ApiError(400, str(exc), "input_suffix") from None
    has_repo = fmt.repo is not None and all(t in specials.ids for t in fmt.repo)
    return Layout(
        build=lambda context, prefix, suffix: infill_prompt(specials, prefix, suffix, fmt, context),
        stop_ids=infill_stop_ids(specials, fmt),
        encode_suffix=tokenizer.encode if fmt.suffix_space else tokenizer.encode_suffix,
        context=(lambda files: repo_context(specials, fmt, tokenizer.encode, files)) if has_repo else None)


# ------------------------------------------------------------------------------------- planning
@dataclass
class InfillPlan:
    """One /infill request as engine rows, and what its answer reports."""

    rows: list[RowRequest]
    prompt_tokens: int
    fitted: Fitted | None
    n_predict: int
    temperature: float
    top_p: float
    stream: bool
    warm_up: bool = False
    extra_files: int = 0


def plan_infill(req: InfillRequest, tokenizer, n_ctx: int, infill_format: str | None) -> InfillPlan:
    """Tokenize, fit and lay out one /infill request as one engine row (none for a warm-up)."""
    try:
        check_sampling(temperature=req.temperature, top_p=req.top_p, seed=req.seed, style="api")
    except RequestError as exc:
        raise ApiError(400, str(exc), exc.param) from None
    layout = model_layout(tokenizer, infill_format)
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    n_predict = DEFAULT_N_PREDICT if req.n_predict is None else req.n_predict
    plan = InfillPlan(rows=[], prompt_tokens=0, fitted=None, n_predict=n_predict, temperature=temperature,
                      top_p=top_p, stream=req.stream, warm_up=n_predict == 0, extra_files=len(req.input_extra))
    files = [(c.filename, c.text) for c in req.input_extra]
    if plan.warm_up:  # nothing runs; the extra files a format cannot lay out are still counted
        plan.fitted = Fitted([], [], [], extra_dropped=0 if layout.context else len(files))
        return plan
    overhead = len(layout.build([], [], []))
    max_tokens = n_predict if n_predict > 0 else max(1, (n_ctx - overhead) // 4)
    room = n_ctx - max_tokens - overhead
    if room < 1:
        raise ApiError(400, f"n_predict={n_predict} leaves no room for the prompt in the model context of {n_ctx} "
                            "tokens", "n_predict", code="context_length_exceeded")
    costs, header = layout.file_costs(files) if files and layout.context else ([], 0)
    fitted = fit_infill(tokenizer.encode(req.input_prefix), layout.encode_suffix(req.input_suffix),
                        tokenizer.encode(req.prompt) if req.prompt else [], costs, header, room)
    if layout.context is None:
        fitted.extra_dropped = len(files)
    context = layout.context([files[i] for i in fitted.extra]) if fitted.extra and layout.context else []
    ids = layout.build(context, fitted.prefix, fitted.suffix)
    try:
        check_context(len(ids), max_tokens, n_ctx, "the infill prompt", style="api")
    except RequestError as exc:
        raise ApiError(400, str(exc), exc.param, code=exc.code) from None
    seed = req.seed if req.seed is not None else random.randrange(2**31 - 1)
    plan.rows = [RowRequest(prompt_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, stop_ids=layout.stop_ids, stream=True)]
    plan.prompt_tokens, plan.fitted, plan.n_predict = len(ids), fitted, max_tokens
    return plan


# ------------------------------------------------------------------------------------ responses
@dataclass
class Clock:
    """Server-side timings of one request, in llama.cpp's `timings` shape."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    end: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def timings(self, prompt_n: int, predicted_n: int) -> dict[str, float | int]:
        end = self.end or time.perf_counter()
        first = self.first or end
        prompt_ms, predicted_ms = (first - self.start) * 1e3, (end - first) * 1e3
        return {"prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / max(prompt_n, 1),
                "prompt_per_second": prompt_n / prompt_ms * 1e3 if prompt_ms > 0 else 0.0,
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / max(predicted_n, 1),
                "predicted_per_second": predicted_n / predicted_ms * 1e3 if predicted_ms > 0 else 0.0}


def final_body(plan: InfillPlan, model_name: str, n_ctx: int, content: str, finish_reason: str | None,
               predicted_n: int, clock: Clock) -> dict[str, Any]:
    """The last (or only) answer of an /infill request: `content` and what llama.vscode's status bar reads."""
    fitted = plan.fitted
    return {
        "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True, "model": model_name,
        "tokens_predicted": predicted_n, "tokens_evaluated": plan.prompt_tokens,
        "tokens_cached": plan.prompt_tokens + predicted_n,
        "generation_settings": {"n_ctx": n_ctx, "n_predict": plan.n_predict, "temperature": plan.temperature,
                                "top_p": plan.top_p, "model": model_name},
        "has_new_line": "\n" in content,
        "truncated": bool(fitted and fitted.truncated),
        "stop_type": "limit" if finish_reason == "length" else "eos" if finish_reason == "stop" else "none",
        "stopping_word": "",
        "input_extra_dropped": fitted.extra_dropped if fitted else 0,
        "timings": clock.timings(plan.prompt_tokens, predicted_n),
    }


def partial_body(content: str, prompt_tokens: int) -> dict[str, Any]:
    """One streamed piece of text, as llama.cpp streams /infill (the counts come with the final body)."""
    return {"index": 0, "content": content, "tokens": [], "stop": False, "id_slot": 0,
            "tokens_evaluated": prompt_tokens}


# ------------------------------------------------------------------------------------- handling
async def answer_infill(request: Request, body: Any, engine, model_name: str, infill_format: str | None,
                        hang_ups: HangUps, drain: Drain) -> Response:
    """Plan, run and answer one /infill request (JSON, or server-sent events with `stream`); a client that
    leaves is counted in `hang_ups`, and a shutdown that runs out of grace ends the request with a 503."""
    req = parse_infill(body)
    if req.model is not None and req.model != model_name:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'", "model",
                       code="model_not_found")
    clock = Clock()
    plan = await run_in_threadpool(plan_infill, req, engine.tokenizer, engine.n_ctx, infill_format)
    if plan.warm_up:
        return JSONResponse(final_body(plan, model_name, engine.n_ctx, "", None, 0, clock))
    if drain.stopping:
        raise ApiError(503, "the server is shutting down", type_="server_overloaded")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[RowEvent] = asyncio.Queue()
    try:
        ticket = engine.submit(plan.rows, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    except QueueFull as exc:
        raise ApiError(429, str(exc), type_="server_overloaded", code="queue_full") from None
    except EngineStopped as exc:
        raise ApiError(503, str(exc), type_="server_overloaded") from None
    if plan.stream:
        return StreamingResponse(_stream(plan, ticket, events, model_name, engine.n_ctx, clock, hang_ups, drain),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, last = await _whole(request, ticket, events, clock, hang_ups, drain)
    if last.finish_reason == "error":
        raise ApiError(500, last.error or "generation failed", type_="server_error")
    clock.end = time.perf_counter()
    return JSONResponse(final_body(plan, model_name, engine.n_ctx, text, last.finish_reason,
                                   last.completion_tokens, clock))


async def _whole(request: Request, ticket: Ticket, events: asyncio.Queue, clock: Clock, hang_ups: HangUps,
                 drain: Drain) -> tuple[str, RowEvent]:
    """The text of the one row and its final event; cancels the row if the client leaves or the drain ends."""
    pieces: list[str] = []

    async def collect() -> RowEvent:
        while True:
            event = await events.get()
            if event.text:
                clock.token()  # the row streams, so the first token's time is seen
            pieces.append(event.text)
            if event.finish_reason is not None:
                return event

    waiting = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_client_gone(request))
    expired = asyncio.ensure_future(drain.expired())
    try:
        await asyncio.wait({waiting, gone, expired}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        expired.cancel()
        if not waiting.done():
            waiting.cancel()
            ticket.cancel()
    if waiting.done() and not waiting.cancelled():
        return "".join(pieces), waiting.result()
    if drain.stopping:
        raise ApiError(503, "the server is shutting down; this request was cancelled", type_="server_overloaded")
    hang_ups.record()
    raise ApiError(499, "the client closed the request")  # nobody is listening any more


async def _client_gone(request: Request) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _next_event(events: asyncio.Queue, expired: asyncio.Future) -> RowEvent | None:
    """The next event of the row, or None once a shutdown's grace has run out."""
    get = asyncio.ensure_future(events.get())
    try:
        await asyncio.wait({get, expired}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        get.cancel()  # a no-op once done
    return get.result() if get.done() and not get.cancelled() else None


async def _stream(plan: InfillPlan, ticket: Ticket, events: asyncio.Queue, model_name: str, n_ctx: int,
                  clock: Clock, hang_ups: HangUps, drain: Drain) -> AsyncIterator[str]:
    """Server-sent events as llama.cpp streams /infill: pieces with `stop: false`, then one final body."""
    finished = False
    expired = asyncio.ensure_future(drain.expired())
    try:
        while not finished:
            event = await _next_event(events, expired)
            if event is None or event.finish_reason == "error":
                error = (ApiError(503, "the server is shutting down; this request was cancelled",
                                  type_="server_overloaded") if event is None
                         else ApiError(500, event.error or "generation failed", type_="server_error"))
                finished = True
                yield _sse(error.body())
                return
            if event.text:
                clock.token()
                yield _sse(partial_body(event.text, plan.prompt_tokens))
            if event.finish_reason is not None:
                clock.end = time.perf_counter()
                finished = True
                yield _sse(final_body(plan, model_name, n_ctx, "", event.finish_reason, event.completion_tokens,
                                      clock))
    finally:
        expired.cancel()
        if not finished:
            hang_ups.record()  # the client left mid-stream
        ticket.cancel()  # a no-op once the row has finished; frees the slot of a client that left
