"""The OpenAI completions request: validation, turning it into engine rows, and the response shapes.

Types are strict (no "16" for 16, no true for 1) and unknown fields are rejected, because a
silently ignored or coerced parameter gives a client samples it did not ask for. OpenAI parameters
this server cannot honour (logprobs, penalties, logit_bias, best_of != n) are rejected unless they
hold their neutral value. Every problem becomes an `ApiError` carrying an HTTP status and the name of
the offending parameter, rendered in OpenAI's error shape.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from ..infill import Specials, infill_prompt, infill_stop_ids, resolve_format
from ..request_checks import (
    RequestError,
    check_context,
    check_infill,
    check_prompt,
    check_sampling,
    check_stops,
    check_text_size,
)
from .engine import RowRequest

MAX_ROWS_PER_REQUEST = 128  # len(prompt list) * n


class ApiError(Exception):
    """A request the server refuses; rendered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions body. `None` means "the default", as OpenAI treats null."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]], checked by `prompt_token_lists`
    suffix: str | None = None
    max_tokens: int | None = None  # ranges: request_checks, shared with the command line
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(None, ge=1, le=MAX_ROWS_PER_REQUEST)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    user: str | None = None
    # Accepted only at their neutral values.
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


def parse_request(body: Any) -> CompletionRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    error = exc.errors()[0]
    param = ".".join(str(p) for p in error["loc"]) or None
    if error["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", param)
    if error["type"] == "missing":
        return ApiError(400, f"missing required argument: {param}", param)
    shown = repr(error.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ApiError(400, f"invalid value for '{param}': {error['msg'].lower()} (got {shown})", param)


# ------------------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """What one request asks the engine for, and what the response needs to report."""

    rows: list[RowRequest]
    prompt_texts: list[str]  # for echo
    prompt_tokens: int  # usage: each prompt counted once, however large n is
    n: int
    echo: bool
    stream: bool
    include_usage: bool


def prompt_token_lists(prompt: Any, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """The prompts of a request as token ids and as text, whichever form the client sent."""
    def bad(message: str) -> ApiError:
        return ApiError(400, message, "prompt")

    if prompt is None:
        raise bad("missing required argument: prompt")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                  "and not empty")
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt], list(prompt)
    if all(_is_token_id(t) for t in prompt):
        lists = [prompt]
    elif all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in prompt):
        lists = prompt
    else:
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                  "token ids (no mixing)")
    for i, ids in enumerate(lists):
        for t in ids:
            if not 0 <= t < vocab_size:
                raise bad(f"prompt[{i}] has token id {t}, outside the vocabulary [0, {vocab_size})")
    return [list(ids) for ids in lists], [tokenizer.decode(ids) for ids in lists]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model_name(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ApiError(404, f"the model '{requested}' does not exist; this server serves '{served}'", "model",
                       code="model_not_found")


def token_byte_bound(tokenizer) -> int | None:
    """The most bytes of text one token can stand for, where the tokenizer provably keeps every byte.

    A byte-level BPE without a normalizer maps each input byte to one character of a token string, so a
    token covers at most as many bytes as its string has characters (added tokens: their literal text).
    Any other tokenizer (one that may drop or shrink text) gets None: no refusal by size alone.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend", None)
    if backend is None or backend.normalizer is not None or not isinstance(backend.pre_tokenizer,
                                                                             pre_tokenizers.ByteLevel):
        return None
    return max(len(token.encode("utf-8")) for token in backend.get_vocab(with_added_tokens=True))


def check_prompt_size(req: CompletionRequest, max_token_bytes: int | None, n_ctx: int) -> None:
    """Refuse, before tokenizing, a request whose text alone proves some row too long (see `check_text_size`)."""
    if max_token_bytes is None:
        return
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt if isinstance(req.prompt, list) else []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            continue  # token ids: counted exactly by the planning checks
        name = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
        texts = {name: prompt}
        if req.suffix is not None:
            texts["suffix"] = req.suffix
        try:
            check_text_size(texts, max_token_bytes, n_ctx, " with the ".join(texts))
        except RequestError as exc:
            raise ApiError(400, str(exc), exc.param.split("[")[0], code=exc.code) from None


def plan_request(req: CompletionRequest, tokenizer, n_ctx: int, vocab_size: int,
                 infill_format: str | None = "codegen2") -> Plan:
    """Tokenize and check a request against the model; build one engine row per (prompt, choice).

    `infill_format` lays out `suffix` requests (the model's detected `infill.detect_format`; None: it has none)."""
    try:
        return _plan_request(req, tokenizer, n_ctx, vocab_size, infill_format)
    except RequestError as exc:
        raise ApiError(400, str(exc), exc.param, code=exc.code) from None


def _plan_request(req: CompletionRequest, tokenizer, n_ctx: int, vocab_size: int,
                  infill_format: str | None) -> Plan:
    _check_unsupported(req)
    check_sampling(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                   style="api")
    n = req.n or 1
    echo = bool(req.echo)
    if echo and req.suffix is not None:
        raise ApiError(400, "echo cannot be combined with suffix (an infill has no single prompt to echo)", "echo")
    stops = check_stops([] if req.stop is None else [req.stop] if isinstance(req.stop, str) else req.stop,
                        style="api")
    ids_list, texts = prompt_token_lists(req.prompt, tokenizer, vocab_size)
    if len(ids_list) * n > MAX_ROWS_PER_REQUEST:
        raise ApiError(400, f"{len(ids_list)} prompt(s) x n={n} asks for {len(ids_list) * n} sequences; "
                            f"at most {MAX_ROWS_PER_REQUEST} per request", "n")
    infill = req.suffix is not None
    if infill:
        for text in texts:
            check_infill(text, req.suffix)
        if infill_format is None:
            raise ApiError(400, "this model has no infill format, so it cannot take a suffix", "suffix")
        specials = Specials.of(tokenizer)
        try:
            fmt = resolve_format(infill_format, "", specials)
        except UserError as exc:
            raise ApiError(400, str(exc), "suffix") from None
        suffix_ids = tokenizer.encode(req.suffix) if fmt.suffix_space else tokenizer.encode_suffix(req.suffix)
        ids_list = [infill_prompt(specials, ids, suffix_ids, fmt) for ids in ids_list]
        stop_ids: tuple[int, ...] = infill_stop_ids(specials, fmt)
    else:
        for i, ids in enumerate(ids_list):
            check_prompt(ids, "prompt" if len(ids_list) == 1 else f"prompt[{i}]")
        stop_ids = (tokenizer.eot_id,)
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    for i, ids in enumerate(ids_list):
        where = "the prompt" if len(ids_list) == 1 else f"prompt[{i}]"
        if infill:
            where += " with the suffix and infill sentinels"
        check_context(len(ids), max_tokens, n_ctx, where, style="api")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    base_seed = req.seed if req.seed is not None else random.randrange(2**31 - 1)
    stream = bool(req.stream)
    rows = [
        RowRequest(prompt_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   seed=base_seed + p * n + j, stop=stops, stop_ids=stop_ids, stream=stream)
        for p, ids in enumerate(ids_list) for j in range(n)
    ]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    return Plan(rows=rows, prompt_texts=texts, prompt_tokens=sum(len(ids) for ids in ids_list), n=n, echo=echo,
                stream=stream, include_usage=include_usage)


def _check_unsupported(req: CompletionRequest) -> None:
    if req.logprobs not in (None, 0):
        raise ApiError(400, "logprobs is not supported by this server", "logprobs")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(400, "best_of other than n is not supported by this server", "best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported by this server (only 0)", name)
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")


# ------------------------------------------------------------------------------------ responses
def completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid: str, model: str, choices: list[dict], usage: dict | None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
