"""The rules every generation request meets, whether it comes from `codegen2 sample`/`infill` or the server.

One home for them so that the command line and the HTTP API accept and refuse the same things. A check
raises `RequestError` naming the offending parameter in the caller's own vocabulary (`--max-new-tokens`
on the command line, `max_tokens` in the API); the CLI prints it as one line, the server answers 400.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from .errors import UserError

MAX_TEMPERATURE = 2.0  # OpenAI's bound; above it sampling is close to uniform noise
MAX_STOPS = 16
MAX_STOP_CHARS = 256

Style = Literal["cli", "api"]
_NAMES: dict[Style, dict[str, str]] = {
    "cli": {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
            "top_k": "--top-k", "stop": "--stop", "seed": "--seed", "prompt": "the prompt"},
    "api": {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "stop": "stop", "seed": "seed", "prompt": "prompt"},
}


class RequestError(UserError):
    """A request that cannot be served; `param` is the API name of the offending parameter."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _name(param: str, style: Style) -> str:
    return _NAMES[style][param]


def check_sampling(*, max_new_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                   style: Style = "cli") -> None:
    """Bounds of the sampling parameters that do not depend on the model (None: not given, default used)."""
    def bad(param: str, rule: str, value) -> RequestError:
        return RequestError(f"{_name(param, style)}={value} {rule}", _NAMES["api"][param])

    if max_new_tokens is not None and max_new_tokens < 1:
        raise bad("max_new_tokens", "must be at least 1", max_new_tokens)
    if temperature is not None and not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise bad("temperature", f"must lie in [0, {MAX_TEMPERATURE:g}] (0 = greedy)", temperature)
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise bad("top_p", "must lie in (0, 1] (1 = no nucleus filtering)", top_p)
    if top_k is not None and top_k < 0:
        raise bad("top_k", "must be >= 0 (0 = no top-k filtering)", top_k)
    if seed is not None and not 0 <= seed <= 2**62:
        raise bad("seed", "must lie in [0, 2**62]", seed)


def check_stops(stops: Sequence[str], style: Style = "cli") -> tuple[str, ...]:
    name = _name("stop", style)
    if len(stops) > MAX_STOPS:
        raise RequestError(f"{name} has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    for stop in stops:
        if not stop:
            raise RequestError(f"{name} strings must not be empty", "stop")
        if len(stop) > MAX_STOP_CHARS:
            raise RequestError(f"a {name} string is {len(stop)} characters; at most {MAX_STOP_CHARS}", "stop")
    return tuple(stops)


def check_prompt(ids: Sequence[int], where: str) -> None:
    """A left-to-right prompt needs at least one token to continue from."""
    if not ids:
        raise RequestError(f"{where} is empty: give at least one token of prompt", "prompt")


def check_infill(prefix: str, suffix: str) -> None:
    """An infill needs something around the hole: with neither prefix nor suffix it is an unprompted sample."""
    if not prefix and not suffix:
        raise RequestError("the prefix and the suffix are both empty: give at least one of them", "prompt")


def check_context(prompt_tokens: int, max_new_tokens: int, n_ctx: int, where: str, style: Style = "cli") -> None:
    """The prompt and every token asked for must fit the model's context."""
    name = _name("max_new_tokens", style)
    if prompt_tokens >= n_ctx:
        raise RequestError(f"{where} is {prompt_tokens} tokens, too long for the model context of {n_ctx} tokens",
                           "prompt", code="context_length_exceeded")
    if prompt_tokens + max_new_tokens > n_ctx:
        raise RequestError(f"{name}={max_new_tokens} plus {where} ({prompt_tokens} tokens) exceeds the model "
                           f"context of {n_ctx} tokens; ask for at most {n_ctx - prompt_tokens}", "max_tokens",
                           code="context_length_exceeded")


def check_text_size(texts: Mapping[str, str], max_token_bytes: int, n_ctx: int, where: str) -> None:
    """Refuse text whose size alone proves it too long for the context, before anyone tokenizes it.

    With a tokenizer that keeps every byte of its input and whose tokens each stand for at most
    `max_token_bytes` bytes, N bytes need at least ceil(N / max_token_bytes) tokens. When that lower
    bound already fills the context, no tokenization can fit; anything that might fit passes. `texts`
    maps each field's name to its text (prompt, suffix, any editor field that joins the same context).
    """
    sizes = {name: len(text.encode("utf-8", "surrogatepass")) for name, text in texts.items()}
    total = sum(sizes.values())
    at_least = -(-total // max_token_bytes)
    if at_least >= n_ctx:
        param = max(sizes, key=sizes.__getitem__)
        raise RequestError(f"{where} is {total} bytes, so at least {at_least} tokens (no token covers more than "
                           f"{max_token_bytes} bytes): too long for the model context of {n_ctx} tokens", param,
                           code="context_length_exceeded")
