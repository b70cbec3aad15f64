"""The HTTP layer: FastAPI routes speaking the OpenAI completions API in front of a `BatchEngine`.

Handlers never run the model: they validate, tokenize, submit rows to the engine and wait on an
asyncio queue that the engine thread feeds. A client that disconnects (mid-stream or while waiting
for a whole completion) cancels its rows, so its batch slots free up at the next step; it is counted
and logged in aggregate (`lifecycle.HangUps`). `app.state.drain.begin()` (the serve command calls it on
SIGTERM) refuses new work and cancels what is still running after a grace period (`lifecycle.Drain`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..infill import Specials, detect_format
from .editors import answer_infill
from .engine import BatchEngine, EngineStopped, QueueFull, RowEvent, Ticket
from .lifecycle import Drain, HangUps
from .process import ProcessEngine
from .protocol import (
    ApiError,
    check_model_name,
    check_prompt_size,
    choice,
    completion_body,
    completion_id,
    parse_request,
    plan_request,
    token_byte_bound,
    usage,
)

T = TypeVar("T")
MAX_BODY_BYTES = 8 * 1024 * 1024
TOKENIZE_IN_THREAD_CHARS = 20_000  # longer prompts are tokenized off the event loop
MAX_UNREAD_EVENTS = 4096  # events of one request waiting for its client to read them; beyond: cancelled
ENGINE_STOP_SECONDS = 2.0  # at shutdown, after the drain: the engine's last step, the model process's exit


def create_app(engine: BatchEngine | ProcessEngine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app serving `engine`; the engine thread starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    hang_ups, drain = HangUps(), Drain()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        drain.attach(asyncio.get_running_loop())
        engine.start()
        flusher = asyncio.ensure_future(hang_ups.run())
        try:
            yield
        finally:
            flusher.cancel()
            hang_ups.flush()
            await run_in_threadpool(engine.stop, ENGINE_STOP_SECONDS)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            message = ("missing API key: send 'Authorization: Bearer KEY'" if not header
                       else "incorrect API key provided")
            raise ApiError(401, message, type_="authentication_error", code="invalid_api_key")

    app = FastAPI(title="codegen2", lifespan=lifespan, dependencies=[Depends(require_key)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    app.state.hang_ups, app.state.drain = hang_ups, drain
    tokenizer = engine.tokenizer
    # The family is not known here; detection by the tokenizer alone tries CodeGen2's sentinels first, as every
    # family whose tokenizer holds them does.
    infill_format = detect_format("", Specials.of(tokenizer))
    max_token_bytes = token_byte_bound(tokenizer)
    n_ctx = engine.n_ctx
    vocab_size = engine.vocab_size

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else headers
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def _hung_up(_request: Request, _exc: ClientDisconnect) -> Response:
        hang_ups.record()  # gone while sending its body: nobody reads an answer
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, f"invalid request: {exc.errors()[0].get('msg')}").body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "stopping" if drain.stopping else "ok", "model": model_name,
                **await run_in_threadpool(engine.snapshot), "clients_hung_up": hang_ups.total}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "codegen2",
                "context_length": n_ctx}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        check_model_name(name, model_name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _refuse_if_stopping(drain)
        body = await _before_drain_ends(_read_json(request, max_body_bytes), drain)
        req = parse_request(body)
        check_model_name(req.model, model_name)
        check_prompt_size(req, max_token_bytes, n_ctx)
        prompt_chars = len(req.prompt) if isinstance(req.prompt, str) else len(json.dumps(body.get("prompt")))
        if prompt_chars + len(req.suffix or "") > TOKENIZE_IN_THREAD_CHARS:
            plan = await run_in_threadpool(plan_request, req, tokenizer, n_ctx, vocab_size, infill_format)
        else:
            plan = plan_request(req, tokenizer, n_ctx, vocab_size, infill_format)

        if len(plan.rows) > engine.max_rows_per_submit:
            raise ApiError(400, f"this request asks for {len(plan.rows)} sequences; this server accepts at most "
                                f"{engine.max_rows_per_submit} at once", "n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RowEvent] = asyncio.Queue()
        submitted: list[Ticket] = []

        def deliver(event: RowEvent) -> None:  # on the event loop
            events.put_nowait(event)
            if events.qsize() > MAX_UNREAD_EVENTS and submitted and not submitted[0].cancelled:
                # A client that stops reading without closing (a dead peer, a stalled editor) would hold its
                # batch slots until max_tokens and its events in memory: cancel, as if it had hung up.
                submitted[0].cancel()
                hang_ups.record()
                events.put_nowait(RowEvent(-1, "", "error", error="the client stopped reading; cancelled"))

        def sink(event: RowEvent) -> None:  # called from the engine thread
            loop.call_soon_threadsafe(deliver, event)

        _refuse_if_stopping(drain)
        try:
            ticket = engine.submit(plan.rows, sink)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type_="server_overloaded", code="queue_full") from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), type_="server_overloaded") from None
        submitted.append(ticket)
        cid = completion_id()
        if plan.stream:
            return StreamingResponse(_stream(plan, ticket, events, cid, model_name, hang_ups, drain),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await _wait_for_rows(request, ticket, len(plan.rows), events, hang_ups, drain)
        failed = [e for e in results if e.finish_reason == "error"]
        if failed:
            raise ApiError(500, failed[0].error or "generation failed", type_="server_error")
        choices = []
        for event in results:
            text = event.text
            if plan.echo:
                text = plan.prompt_texts[event.index // plan.n] + text
            choices.append(choice(event.index, text, event.finish_reason))
        completion_tokens = sum(e.completion_tokens for e in results)
        return JSONResponse(completion_body(cid, model_name, choices, usage(plan.prompt_tokens, completion_tokens)))

    @app.post("/infill")
    async def infill(request: Request) -> Response:  # llama.cpp's shape, for llama.vscode and llama.vim
        _refuse_if_stopping(drain)
        body = await _before_drain_ends(_read_json(request, max_body_bytes), drain)
        return await answer_infill(request, body, engine, model_name, infill_format, hang_ups, drain)

    return app


def _refuse_if_stopping(drain: Drain) -> None:
    if drain.stopping:
        raise ApiError(503, "the server is shutting down", type_="server_overloaded")


async def _before_drain_ends(work: Awaitable[T], drain: Drain) -> T:
    """`work`'s result, or a 503 once a shutdown's grace has run out (a client that never sends its whole body)."""
    task = asyncio.ensure_future(work)
    expired = asyncio.ensure_future(drain.expired())
    try:
        await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        expired.cancel()
        finished = task.done()
        task.cancel()  # a no-op once done
    if not finished:
        raise ApiError(503, "the server is shutting down", type_="server_overloaded")
    return task.result()


async def _wait_for_rows(request: Request, ticket: Ticket, count: int, events: asyncio.Queue, hang_ups: HangUps,
                         drain: Drain) -> list[RowEvent]:
    """The final events of a whole completion; cancels its rows if the client leaves or the drain runs out."""
    collect = asyncio.ensure_future(_collect(count, events))
    gone = asyncio.ensure_future(_client_gone(request))
    expired = asyncio.ensure_future(drain.expired())
    try:
        await asyncio.wait({collect, gone, expired}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        expired.cancel()
        if not collect.done():
            collect.cancel()
            ticket.cancel()
    if collect.done() and not collect.cancelled():
        return collect.result()
    if drain.stopping:
        raise ApiError(503, "the server is shutting down; this request was cancelled", type_="server_overloaded")
    hang_ups.record()
    raise ApiError(499, "the client closed the request")  # nobody is listening any more


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes")
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


async def _collect(count: int, events: asyncio.Queue) -> list[RowEvent]:
    """Wait for the final event of every row; results in row order (or just the first error)."""
    done: dict[int, RowEvent] = {}
    while len(done) < count:
        event = await events.get()
        if event.finish_reason == "error":
            return [event]
        if event.finish_reason is not None:
            done[event.index] = event
    return [done[i] for i in range(count)]


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body was read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _next_events(events: asyncio.Queue, expired: asyncio.Future) -> list[RowEvent] | None:
    """Every event ready now (waiting for the first), or None once the drain has run out."""
    if events.empty():
        get = asyncio.ensure_future(events.get())
        try:
            await asyncio.wait({get, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            get.cancel()  # a no-op once done; else the stream ended (drain, client gone) while waiting
        if not get.done() or get.cancelled():
            return None
        batch = [get.result()]
    else:
        batch = [events.get_nowait()]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


async def _stream(plan, ticket: Ticket, events: asyncio.Queue, cid: str, model_name: str, hang_ups: HangUps,
                  drain: Drain) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of new text, a final chunk per choice, then [DONE].

    A shutdown that runs out of grace ends the stream with a 503 error event.
    """
    created = int(time.time())

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model_name, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return _sse(body)

    remaining = len(plan.rows)
    completion_tokens = 0
    finished = False
    expired = asyncio.ensure_future(drain.expired())
    try:
        if plan.echo:
            yield "".join(chunk([choice(i, plan.prompt_texts[i // plan.n], None)]) for i in range(len(plan.rows)))
        while remaining:
            batch = await _next_events(events, expired)
            if batch is None:
                ticket.cancel()
                yield _sse(ApiError(503, "the server is shutting down; this request was cancelled",
                                    type_="server_overloaded").body())
                break
            out = []
            for event in batch:
                if event.finish_reason == "error":
                    out.append(_sse(ApiError(500, event.error or "generation failed", type_="server_error").body()))
                    remaining = 0
                    break
                out.append(chunk([choice(event.index, event.text, event.finish_reason)]))
                if event.finish_reason is not None:
                    remaining -= 1
                    completion_tokens += event.completion_tokens
            yield "".join(out)
        if plan.include_usage:
            yield chunk([], usage(plan.prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        expired.cancel()
        if not finished and not ticket.cancelled:  # (a stalled reader's ticket was cancelled, and counted)
            hang_ups.record()
        ticket.cancel()  # a no-op once every row has finished; frees the slots of a client that left
