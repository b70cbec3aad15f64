"""The HTTP layer: FastAPI routes speaking the OpenAI completions API in front of a `BatchEngine`.

Handlers never run the model: they validate, tokenize, submit rows to the engine and wait on an
asyncio queue that the engine thread feeds. A client that disconnects (mid-stream or while waiting
for a whole completion) cancels its rows, so its batch slots free up at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import BatchEngine, EngineStopped, QueueFull, RowEvent, Ticket
from .process import ProcessEngine
from .protocol import (
    ApiError,
    check_model_name,
    choice,
    completion_body,
    completion_id,
    parse_request,
    plan_request,
    usage,
)

MAX_BODY_BYTES = 8 * 1024 * 1024
TOKENIZE_IN_THREAD_CHARS = 20_000  # longer prompts are tokenized off the event loop


def create_app(engine: BatchEngine | ProcessEngine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app serving `engine`; the engine thread starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

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
    tokenizer = engine.tokenizer
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

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, f"invalid request: {exc.errors()[0].get('msg')}").body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **await run_in_threadpool(engine.snapshot)}

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
        body = await _read_json(request, max_body_bytes)
        req = parse_request(body)
        check_model_name(req.model, model_name)
        prompt_chars = len(req.prompt) if isinstance(req.prompt, str) else len(json.dumps(body.get("prompt")))
        if prompt_chars + len(req.suffix or "") > TOKENIZE_IN_THREAD_CHARS:
            plan = await run_in_threadpool(plan_request, req, tokenizer, n_ctx, vocab_size)
        else:
            plan = plan_request(req, tokenizer, n_ctx, vocab_size)

        if len(plan.rows) > engine.max_rows_per_submit:
            raise ApiError(400, f"this request asks for {len(plan.rows)} sequences; this server accepts at most "
                                f"{engine.max_rows_per_submit} at once", "n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RowEvent] = asyncio.Queue()

        def sink(event: RowEvent) -> None:  # called from the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            ticket = engine.submit(plan.rows, sink)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type_="server_overloaded", code="queue_full") from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), type_="server_overloaded") from None
        cid = completion_id()
        if plan.stream:
            return StreamingResponse(_stream(plan, ticket, events, cid, model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(_collect(len(plan.rows), events))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
                ticket.cancel()
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)  # nobody is listening any more
        results = collect.result()
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

    return app


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


async def _stream(plan, ticket: Ticket, events: asyncio.Queue, cid: str, model_name: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of new text, a final chunk per choice, then [DONE]."""
    created = int(time.time())

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        body = {"id": cid, "object": "text_completion", "created": created, "model": model_name, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_
        return _sse(body)

    remaining = len(plan.rows)
    completion_tokens = 0
    try:
        if plan.echo:
            yield "".join(chunk([choice(i, plan.prompt_texts[i // plan.n], None)]) for i in range(len(plan.rows)))
        while remaining:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
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
    finally:
        ticket.cancel()  # a no-op once every row has finished; frees the slots of a client that left
